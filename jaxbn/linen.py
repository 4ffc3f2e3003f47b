"""``torch.nn.BatchNorm{1,2,3}d`` and ``InstanceNorm{1,2,3}d`` as ``flax.linen`` modules.

Variables carry torch's names, so a torch ``state_dict`` maps onto them 1:1::

    params:      {weight, bias}                                   # absent when affine=False
    batch_stats: {running_mean, running_var, num_batches_tracked} # absent when built with
                                                                  # track_running_stats=False

The modules only translate (attributes and call arguments -> :class:`jaxbn.BatchNormFlags`,
Flax variables -> :class:`jaxbn.BatchNormState` / :class:`jaxbn.BatchNormParams`); the math is
:func:`jaxbn.batch_norm` / :func:`jaxbn.instance_norm`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from .adapter_flags import UNSET, call_flags
from .functional import families, validation
from .functional.strategy import Strategy
from .functional.torch_rules import BATCH_NORM, INSTANCE_NORM, Family
from .functional.types import BatchNormParams, BatchNormState, init_params, init_state

__all__ = ["BatchNorm", "InstanceNorm", "UNSET"]

STATS = "batch_stats"


class _TorchNorm(nn.Module):
    """The attributes and the call shared by the torch families (see :class:`BatchNorm`)."""

    family: ClassVar[Family]

    num_features: int | None = None
    eps: float = 1e-5
    momentum: float | None = 0.1
    affine: bool = BATCH_NORM.affine
    track_running_stats: bool = BATCH_NORM.track_running_stats
    train: bool | None = None
    axis: int = -1
    dtype: Any = None
    param_dtype: Any = jnp.float32
    strategy: Strategy | None = None

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        train: bool | None = None,
        *,
        track_running_stats: Any = UNSET,
        momentum: Any = UNSET,
        eps: Any = UNSET,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """Normalize ``x``; write ``batch_stats`` when torch would update its buffers.

        Args:
          x: input with features on ``self.axis`` (InstanceNorm: batched, rank >= 3).
          train: training mode for this call (default: ``self.train``); must be set where the
            result depends on it (always for BatchNorm, as ``flax.linen.BatchNorm``; for
            InstanceNorm only when the call tracks running statistics).
          track_running_stats, momentum, eps: this call's value of torch's attribute of the
            same name (default: the module's). ``track_running_stats=False`` on a module built
            with it True behaves exactly like flipping the torch attribute. A ``momentum`` or
            ``eps`` given as a JAX scalar is traced: a schedule compiles once.
          mask: BatchNorm only: optional bool ``(N,)``, rows left out of the batch statistics
            (padding).

        Raises:
          ValueError: the call would update the running statistics but ``batch_stats`` is not
            mutable (pass ``mutable=['batch_stats']`` to ``apply``); plus everything the pure
            function (:func:`jaxbn.batch_norm` / :func:`jaxbn.instance_norm`) raises.
        """
        family = self.family
        extra = family.mask_argument(mask)
        flags = call_flags(
            self, family, self.train if train is None else train, "train",
            self.track_running_stats, synchronize=not self.is_initializing(),
            track_running_stats=track_running_stats,
        )
        if self.dtype is not None:
            x = jnp.asarray(x, self.dtype)
        num_features = self.num_features
        if num_features is None:  # LazyBatchNorm: C from the input
            num_features = x.shape[validation.check_input(x, flags.axis)]

        params = self._params(num_features)
        stats = self._stats(num_features)
        state = None if stats is None else BatchNormState(*(v.value for v in stats))

        result = families.call(family, x, state, params, flags, momentum=momentum, eps=eps, **extra)
        # init returns the variables as torch constructs them, whatever the call would update.
        if self.is_initializing() or not result.wrote_buffers:
            return result.y
        if not self.is_mutable_collection(STATS):
            raise ValueError(
                f"jaxbn.linen.{family.name} updates its running statistics in this call "
                f"({family.writes_when}), but the '{STATS}' collection is immutable: call "
                f"model.apply(variables, x, train=..., mutable=['{STATS}']) and keep the "
                f"returned '{STATS}'"
            )
        for variable, value in zip(stats, result.new_state):
            variable.value = value
        return result.y

    def _params(self, num_features: int) -> BatchNormParams | None:
        """``weight`` and ``bias`` as torch initializes them, or ``None`` when not affine."""
        if not self.affine:
            return None
        fresh = lambda: init_params(num_features, self.param_dtype)  # noqa: E731
        return BatchNormParams(
            *(
                self.param(name, lambda _key, n=name: getattr(fresh(), n))
                for name in BatchNormParams._fields
            )
        )

    def _stats(self, num_features: int) -> tuple[nn.Variable, ...] | None:
        """The three ``batch_stats`` variables in :class:`BatchNormState` order, or ``None``."""
        if not self.track_running_stats:
            return None
        fresh = lambda: init_state(num_features, self.param_dtype)  # noqa: E731
        return tuple(
            self.variable(STATS, name, lambda n=name: getattr(fresh(), n))
            for name in BatchNormState._fields
        )


class BatchNorm(_TorchNorm):
    """PyTorch's ``BatchNorm{1,2,3}d`` (and ``LazyBatchNorm*``, ``SyncBatchNorm``) for Flax linen.

    PyTorch equivalent::

        bn = torch.nn.BatchNorm2d(num_features, eps, momentum, affine, track_running_stats)
        bn.train(train)
        y = bn(x)                    # x in (N, C, H, W); here features are on ``axis`` (NHWC)

    Linen modules are immutable, so what torch users change *after* construction
    (``bn.track_running_stats``, ``bn.momentum``, ``bn.eps``) is passed to the call instead;
    the constructor's ``track_running_stats`` and ``affine`` decide which variables exist.

    Attributes:
      num_features: C; ``None`` infers it from the input at ``init`` like ``LazyBatchNorm2d``.
      eps: added to the variance inside the square root.
      momentum: torch's convention (weight of the *new* batch; Flax's is ``1 -`` this), or
        ``None`` for a cumulative average over ``num_batches_tracked`` batches.
      affine: create ``params: {weight, bias}``.
      track_running_stats: create ``batch_stats`` (torch registers its buffers).
      train: default mode (torch's ``module.training``) when the call does not pass ``train``.
      axis: the feature axis; ``-1`` (NHWC, Flax's layout) by default, ``1`` for NCHW.
      dtype: if set, the input is cast to it first (the output has the input's dtype, as in
        torch; a bf16 input with float32 variables is torch's mixed precision).
      param_dtype: dtype of the parameters and running statistics.
      strategy: how to compute (:class:`jaxbn.Strategy`): speed choices that change the
        program, not the values beyond rounding; ``None`` (default): the default for JAX's
        default backend (:func:`jaxbn.default_strategy`).
      axis_name, axis_index_groups: merge batch statistics exactly over this mapped axis
        (``shard_map`` / ``pmap`` / ``vmap``), torch's ``SyncBatchNorm``; ignored during ``init``
        like Flax's BatchNorm.
    """

    family: ClassVar[Family] = BATCH_NORM

    axis_name: Any = None
    axis_index_groups: Any = None


class InstanceNorm(_TorchNorm):
    """PyTorch's ``InstanceNorm{1,2,3}d`` (and ``LazyInstanceNorm*``) for Flax linen.

    PyTorch equivalent::

        m = torch.nn.InstanceNorm2d(num_features, eps, momentum, affine, track_running_stats)
        m.train(train)
        y = m(x)                     # x in (N, C, H, W); here features are on ``axis`` (NHWC)

    Same attributes, variables and call-time overrides as :class:`BatchNorm` (no ``axis_name``:
    statistics are per instance, no ``mask``), with torch's InstanceNorm defaults
    ``affine=False, track_running_stats=False`` and its rules
    (:mod:`jaxbn.functional.torch_rules`). One consequence for linen: instance norm writes
    existing running statistics *even in eval* whenever it uses input statistics, so such calls
    need ``mutable=['batch_stats']``. ``train`` is needed only when the call tracks running
    statistics, so ``InstanceNorm()(x)`` just works. The input must be batched,
    ``(N, *spatial, C)`` with the default ``axis=-1``.
    """

    family: ClassVar[Family] = INSTANCE_NORM

    affine: bool = INSTANCE_NORM.affine
    track_running_stats: bool = INSTANCE_NORM.track_running_stats
