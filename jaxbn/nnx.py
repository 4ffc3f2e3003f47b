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

from .adapter_flags import BATCH_NORM, INSTANCE_NORM, UNSET, NormFamily, call_flags
from .core import BatchNormParams, BatchNormState, init_params, init_state

__all__ = ["BatchNorm", "InstanceNorm", "UNSET"]


class _TorchNorm(nnx.Module):
    """Variables, attributes and the call shared by the torch families (see :class:`BatchNorm`)."""

    family: ClassVar[NormFamily]

    def __init__(
        self,
        num_features: int,
        eps: float,
        momentum: float | None,
        affine: bool,
        track_running_stats: bool,
        *,
        axis: int,
        use_running_average: bool | None,
        dtype: Any,
        param_dtype: Any,
    ):
        params = init_params(num_features, param_dtype) if affine else None
        state = init_state(num_features, param_dtype) if track_running_stats else None
        for name, value in zip(BatchNormParams._fields, params or (None, None)):
            setattr(self, name, nnx.data(None) if value is None else nnx.Param(value))
        for name, value in zip(BatchNormState._fields, state or (None, None, None)):
            setattr(self, name, nnx.data(None) if value is None else nnx.BatchStat(value))
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.axis = axis
        self.use_running_average = use_running_average
        self.dtype = dtype
        self.param_dtype = param_dtype

    def _normalize(
        self,
        x: jax.Array,
        use_running_average: bool | None,
        overrides: dict[str, Any],
        **extra: Any,
    ) -> jax.Array:
        """One call: resolve the flags, read the variables, run the pure function, write back."""
        family = self.family
        if use_running_average is None:
            use_running_average = self.use_running_average
        training = None if use_running_average is None else not use_running_average
        flags = call_flags(self, family, training, "use_running_average", **overrides)
        if self.dtype is not None:
            x = jnp.asarray(x, self.dtype)
        params = None if self.weight is None else BatchNormParams(self.weight[...], self.bias[...])
        stats = tuple(getattr(self, name) for name in BatchNormState._fields)
        state = None if stats[0] is None else BatchNormState(*(v[...] for v in stats))
        y, new_state = family.apply(x, state, params, flags, **extra)
        if family.updates_buffers(flags, state is not None):
            for variable, value in zip(stats, new_state):
                variable[...] = value
        return y

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
      affine: create ``weight`` and ``bias``.
      track_running_stats: create the running statistics. Setting the attribute later changes
        behaviour exactly as in torch but never creates or removes them.
      axis: the feature axis; ``-1`` (NHWC, Flax's layout) by default, ``1`` for NCHW.
      use_running_average: NNX's mode attribute, ``not module.training`` in torch terms; set by
        ``model.train()`` / ``model.eval()``. Default ``False`` (torch modules start training).
      dtype: if set, the input is cast to it first (the output has the input's dtype, as in
        torch; a bf16 input with float32 variables is torch's mixed precision).
      param_dtype: dtype of the parameters and running statistics.
      axis_name, axis_index_groups: merge batch statistics exactly over this mapped axis
        (``shard_map`` / ``pmap`` / ``vmap``), torch's ``SyncBatchNorm``.
      rngs: accepted for signature compatibility with ``flax.nnx.BatchNorm``; unused (torch's
        initial values are constants).
    """

    family: ClassVar[NormFamily] = BATCH_NORM

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        axis: int = -1,
        use_running_average: bool | None = False,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        axis_name: Any = None,
        axis_index_groups: Any = None,
        rngs: nnx.Rngs | None = None,
    ):
        del rngs
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, axis=axis,
            use_running_average=use_running_average, dtype=dtype, param_dtype=param_dtype,
        )
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups

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
        """Normalize ``x``; when training with running stats, update them in place.

        Args:
          x: input with features on ``self.axis``.
          use_running_average: this call's mode (default: the attribute), as in
            ``flax.nnx.BatchNorm``.
          track_running_stats, momentum, eps: this call's value of the attribute of the same
            name (default: the attribute); setting the attribute is the torch way.
          mask: optional bool ``(N,)``: rows left out of the batch statistics (padding).
        """
        overrides = dict(track_running_stats=track_running_stats, momentum=momentum, eps=eps)
        return self._normalize(x, use_running_average, overrides, mask=mask)


class InstanceNorm(_TorchNorm):
    """PyTorch's ``InstanceNorm{1,2,3}d`` for Flax NNX.

    PyTorch equivalent::

        m = torch.nn.InstanceNorm2d(num_features, eps, momentum, affine, track_running_stats)
        m.track_running_stats = False  # any attribute, any time: same here
        y = m(x)                       # x in (N, C, H, W); here features are on ``axis`` (NHWC)

    Same arguments, variables and attribute flips as :class:`BatchNorm` (no ``axis_name``:
    statistics are per instance; no ``mask``), with torch's InstanceNorm defaults
    ``affine=False, track_running_stats=False`` and its semantics (:func:`jaxbn.instance_norm`):
    input statistics whenever training or ``not track_running_stats``, and existing running
    statistics are then updated in place *even in eval*; ``momentum=None`` leaves them
    unchanged; the counter never moves. The input must be batched (rank >= 3).
    """

    family: ClassVar[NormFamily] = INSTANCE_NORM

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        *,
        axis: int = -1,
        use_running_average: bool | None = False,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        del rngs
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, axis=axis,
            use_running_average=use_running_average, dtype=dtype, param_dtype=param_dtype,
        )

    def __call__(
        self,
        x: jax.Array,
        use_running_average: bool | None = None,
        *,
        track_running_stats: Any = UNSET,
        momentum: Any = UNSET,
        eps: Any = UNSET,
    ) -> jax.Array:
        """Normalize each instance of ``x``; update the running stats in place when torch would.

        Args:
          x: batched input with features on ``self.axis`` (rank >= 3).
          use_running_average: this call's mode (default: the attribute).
          track_running_stats, momentum, eps: this call's value of the attribute of the same
            name (default: the attribute); setting the attribute is the torch way.
        """
        overrides = dict(track_running_stats=track_running_stats, momentum=momentum, eps=eps)
        return self._normalize(x, use_running_average, overrides)
