"""``torch.nn.BatchNorm{1,2,3}d`` and ``InstanceNorm{1,2,3}d`` as Flax NNX modules.

NNX modules are mutable Python objects, like torch's: set ``bn.track_running_stats``,
``bn.momentum`` or ``bn.eps`` after construction and the next call behaves exactly as the torch
module with the same attribute would. ``model.train()`` / ``model.eval()`` (and ``nnx.view``)
switch modes the NNX way, through ``use_running_average``.

State carries torch's names: ``weight``, ``bias`` (:class:`flax.nnx.Param`, ``None`` when
``affine=False``) and ``running_mean``, ``running_var``, ``num_batches_tracked``
(:class:`flax.nnx.BatchStat`, ``None`` when built with ``track_running_stats=False``, as torch
registers ``None`` buffers). The math is :func:`jaxbn.batch_norm` / :func:`jaxbn.instance_norm`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from .adapter_flags import UNSET, call_flags
from .functional import families
from .functional.strategy import Strategy
from .functional.torch_rules import BATCH_NORM, INSTANCE_NORM, Family
from .functional.types import BatchNormParams, BatchNormState, init_params, init_state

__all__ = ["BatchNorm", "InstanceNorm", "UNSET"]


class _TorchNorm(nnx.Module):
    """Variables, attributes and the call shared by the torch families (see :class:`BatchNorm`).

    ``affine`` and ``track_running_stats`` default to ``None``: torch's default for the family.
    """

    family: ClassVar[Family]

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool | None = None,
        track_running_stats: bool | None = None,
        *,
        axis: int = -1,
        use_running_average: bool | None = False,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        axis_name: Any = None,
        axis_index_groups: Any = None,
        strategy: Strategy | None = None,
        rngs: nnx.Rngs | None = None,
    ):
        del rngs  # torch's initial values are constants
        family = self.family
        family.check_sync(axis_name, axis_index_groups)
        affine = family.affine if affine is None else affine
        if track_running_stats is None:
            track_running_stats = family.track_running_stats
        params = init_params(num_features, param_dtype) if affine else None
        state = init_state(num_features, param_dtype) if track_running_stats else None
        for name, value in zip(BatchNormParams._fields, params or (None, None)):
            setattr(self, name, nnx.data(None) if value is None else nnx.Param(value))
        for name, value in zip(BatchNormState._fields, state or (None, None, None)):
            setattr(self, name, nnx.data(None) if value is None else nnx.BatchStat(value))
        attributes = dict(
            num_features=num_features, eps=eps, momentum=momentum, affine=affine,
            track_running_stats=track_running_stats, axis=axis,
            use_running_average=use_running_average, dtype=dtype, param_dtype=param_dtype,
            axis_name=axis_name, axis_index_groups=axis_index_groups, strategy=strategy,
        )
        for name, value in attributes.items():  # torch's attribute names, assignable later
            setattr(self, name, value)

    def __call__(
        self,
        x: jax.Array,
        use_running_average: bool | None = None,
        *,
        track_running_stats: Any = UNSET,
        momentum: Any = UNSET,
        eps: Any = UNSET,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """Normalize ``x``; update the running statistics in place when torch would.

        Args:
          x: input with features on ``self.axis`` (InstanceNorm: batched, rank >= 3).
          use_running_average: this call's mode (default: the attribute), as in
            ``flax.nnx.BatchNorm``.
          track_running_stats, momentum, eps: this call's value of the attribute of the same
            name (default: the attribute); setting the attribute is the torch way. A
            ``momentum`` or ``eps`` given as a JAX scalar is traced: a schedule compiles once.
          mask: BatchNorm only: optional bool ``(N,)``, rows left out of the batch statistics
            (padding).
        """
        family = self.family
        extra = family.mask_argument(mask)
        if use_running_average is None:
            use_running_average = self.use_running_average
        training = None if use_running_average is None else not use_running_average
        stats = tuple(getattr(self, name) for name in BatchNormState._fields)
        has_buffers = stats[0] is not None
        flags = call_flags(
            self, family, training, "use_running_average", has_buffers,
            track_running_stats=track_running_stats,
        )
        if self.dtype is not None:
            x = jnp.asarray(x, self.dtype)
        params = None if self.weight is None else BatchNormParams(self.weight[...], self.bias[...])
        state = BatchNormState(*(v[...] for v in stats)) if has_buffers else None
        result = families.call(family, x, state, params, flags, momentum=momentum, eps=eps, **extra)
        if result.wrote_buffers:
            for variable, value in zip(stats, result.new_state):
                variable[...] = value
        return result.y

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Used by ``nnx.view(model, use_running_average=...)``."""
        if use_running_average is not None:
            self.use_running_average = use_running_average


class BatchNorm(_TorchNorm):
    """PyTorch's ``BatchNorm{1,2,3}d`` (and ``SyncBatchNorm``) for Flax NNX.

    PyTorch equivalent::

        bn = torch.nn.BatchNorm2d(num_features, eps, momentum, affine, track_running_stats)
        bn.momentum = None           # any attribute, any time: same here
        bn.eval()                    # here: bn.eval() / model.eval() (use_running_average=True)
        y = bn(x)                    # x in (N, C, H, W); here features are on ``axis`` (NHWC)

    Args:
      num_features: C (NNX creates its variables eagerly, so unlike linen it is required).
      eps: added to the variance inside the square root.
      momentum: torch's convention (weight of the *new* batch; Flax's is ``1 -`` this), or
        ``None`` for a cumulative average over ``num_batches_tracked`` batches.
      affine: create ``weight`` and ``bias`` (default True, as in torch).
      track_running_stats: create the running statistics (default True, as in torch). Setting
        the attribute later changes behaviour exactly as in torch but never creates or removes
        them.
      axis: the feature axis; ``-1`` (NHWC, Flax's layout) by default, ``1`` for NCHW.
      use_running_average: NNX's mode attribute, ``not module.training`` in torch terms; set by
        ``model.train()`` / ``model.eval()``. Default ``False`` (torch modules start training).
      dtype: if set, the input is cast to it first (the output has the input's dtype, as in
        torch; a bf16 input with float32 variables is torch's mixed precision).
      param_dtype: dtype of the parameters and running statistics.
      axis_name, axis_index_groups: merge batch statistics exactly over this mapped axis
        (``shard_map`` / ``pmap`` / ``vmap``), torch's ``SyncBatchNorm``.
      strategy: how to compute (:class:`jaxbn.Strategy`): speed choices that change the
        program, not the values beyond rounding; ``None`` (default): the default for JAX's
        default backend (:func:`jaxbn.default_strategy`). An attribute, like the others.
      rngs: accepted for signature compatibility with ``flax.nnx.BatchNorm``; unused (torch's
        initial values are constants).
    """

    family: ClassVar[Family] = BATCH_NORM


class InstanceNorm(_TorchNorm):
    """PyTorch's ``InstanceNorm{1,2,3}d`` for Flax NNX.

    PyTorch equivalent::

        m = torch.nn.InstanceNorm2d(num_features, eps, momentum, affine, track_running_stats)
        m.track_running_stats = False  # any attribute, any time: same here
        y = m(x)                       # x in (N, C, H, W); here features are on ``axis`` (NHWC)

    Same arguments, variables and attribute flips as :class:`BatchNorm`, with torch's
    InstanceNorm defaults ``affine=False, track_running_stats=False`` and its rules
    (:mod:`jaxbn.functional.torch_rules`): no ``axis_name`` and no ``mask`` (statistics are per
    instance; passing either raises ``TypeError``); running statistics are updated in place even
    in eval whenever input statistics are used. The input must be batched (rank >= 3).
    """

    family: ClassVar[Family] = INSTANCE_NORM
