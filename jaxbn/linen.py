"""``torch.nn.BatchNorm{1,2,3}d`` as a ``flax.linen`` module.

Variables carry torch's names, so a torch ``state_dict`` maps onto them 1:1::

    params:      {weight, bias}                                   # absent when affine=False
    batch_stats: {running_mean, running_var, num_batches_tracked} # absent when built with
                                                                  # track_running_stats=False

The module only translates (attributes and call arguments -> :class:`jaxbn.BatchNormFlags`,
Flax variables -> :class:`jaxbn.BatchNormState` / :class:`jaxbn.BatchNormParams`); the math is
:func:`jaxbn.batch_norm`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import validation
from .adapter_flags import UNSET, call_flags, resolve_mode
from .core import BatchNormParams, BatchNormState, batch_norm, init_params, init_state, updates_buffers

__all__ = ["BatchNorm", "UNSET"]

STATS = "batch_stats"


class BatchNorm(nn.Module):
    """PyTorch's ``BatchNorm{1,2,3}d`` (and ``LazyBatchNorm*``) for Flax linen.

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
    """

    num_features: int | None = None
    eps: float = 1e-5
    momentum: float | None = 0.1
    affine: bool = True
    track_running_stats: bool = True
    train: bool | None = None
    axis: int = -1
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        train: bool | None = None,
        *,
        track_running_stats: Any = UNSET,
        momentum: Any = UNSET,
        eps: Any = UNSET,
    ) -> jax.Array:
        """Normalize ``x``; when training with running stats, write them to ``batch_stats``.

        Args:
          x: input with features on ``self.axis``.
          train: training mode for this call (default: ``self.train``).
          track_running_stats, momentum, eps: this call's value of torch's attribute of the
            same name (default: the module's). ``track_running_stats=False`` on a module built
            with it True uses batch statistics and leaves ``batch_stats`` untouched in training,
            and the running statistics in eval, exactly like flipping the torch attribute.

        Raises:
          ValueError: training would update the running statistics but ``batch_stats`` is not
            mutable (pass ``mutable=['batch_stats']`` to ``apply``); plus everything
            :func:`jaxbn.batch_norm` raises.
        """
        training = resolve_mode(train, self.train, "train")
        flags = call_flags(
            self, training, track_running_stats=track_running_stats, momentum=momentum, eps=eps
        )
        if self.dtype is not None:
            x = jnp.asarray(x, self.dtype)
        feature_axis = validation.check_input(x, flags.axis)
        num_features = x.shape[feature_axis] if self.num_features is None else self.num_features

        params = self._params(num_features)
        stats = self._stats(num_features)
        state = None if stats is None else BatchNormState(*(v.value for v in stats))

        writes = updates_buffers(flags, state is not None) and not self.is_initializing()
        if writes and not self.is_mutable_collection(STATS):
            raise ValueError(
                "jaxbn.linen.BatchNorm is training with track_running_stats=True, which updates "
                f"the running statistics, but the '{STATS}' collection is immutable: call "
                f"model.apply(variables, x, train=True, mutable=['{STATS}']) and keep the "
                f"returned '{STATS}', or call with train=False to use the running statistics"
            )
        y, new_state = batch_norm(x, state, params, flags)
        if writes:
            for variable, value in zip(stats, new_state):
                variable.value = value
        return y

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
