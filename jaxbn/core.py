"""PyTorch's BatchNorm as one pure function: the only place the normalization math lives.

``batch_norm(x, state, params, flags) -> (y, new_state)`` reproduces
``torch.nn.BatchNorm1d/2d/3d.forward`` including every attribute a torch user can change after
construction. The decision torch makes, in its words (``_BatchNorm.forward``):

* batch statistics are used when ``training`` or when the layer has no buffers;
* buffers are updated only when ``training and track_running_stats`` and buffers exist;
* the update factor is ``momentum``, or ``1 / num_batches_tracked`` after the increment when
  ``momentum is None``.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Hashable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import validation
from .stats import Moments, batch_moments, broadcast_channel, stats_dtype


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class BatchNormFlags:
    """The call-time attributes of a torch BatchNorm module.

    A hashable pytree without array leaves, so ``jax.jit(batch_norm)(x, state, params, flags)``
    treats it as static: changing a flag retraces, new data does not.

    Attributes:
      training: ``module.training`` (``.train()`` / ``.eval()``).
      track_running_stats: the *current* value of ``module.track_running_stats``. Whether buffers
        exist (its value at construction) is whether ``state`` is None.
      momentum: torch's momentum, the weight of the *new* batch (Flax's momentum is ``1 -`` this),
        or ``None`` for a cumulative average driven by ``num_batches_tracked``.
      eps: added to the variance inside the square root.
      axis: the feature axis. ``1`` is PyTorch's layout (N, C, ...); ``-1`` is channels-last.
      axis_name: a named mapped axis (or tuple of names) of ``shard_map``/``pmap``/``vmap`` over
        which batch statistics are merged exactly, as ``torch.nn.SyncBatchNorm`` does. ``None``
        (default): statistics of the local batch.
      axis_index_groups: optional groups of device indices along ``axis_name`` that are
        synchronized separately (torch's ``process_group``). JAX supports this under ``pmap``
        only; under ``shard_map`` use a mesh axis per group instead (see docs/scaling.md).
      skip_nonfinite_updates: opt-in guard (not in torch). When True and a training batch yields
        a non-finite batch mean or variance in any channel, the running statistics *and*
        ``num_batches_tracked`` stay as they were (torch poisons them with NaN for good); the
        output is still computed from the batch statistics. Default False: torch parity.
    """

    training: bool = True
    track_running_stats: bool = True
    momentum: float | None = 0.1
    eps: float = 1e-5
    axis: int = 1
    axis_name: Hashable | tuple[Hashable, ...] | None = None
    axis_index_groups: tuple[tuple[int, ...], ...] | None = None
    skip_nonfinite_updates: bool = False

    def __post_init__(self) -> None:
        for name in ("training", "track_running_stats", "skip_nonfinite_updates"):
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):
                raise TypeError(
                    f"BatchNormFlags.{name} must be a Python bool (flags are static), "
                    f"got {type(value).__name__}"
                )
            object.__setattr__(self, name, bool(value))
        if self.momentum is not None:
            if not isinstance(self.momentum, numbers.Real) or isinstance(self.momentum, bool):
                raise TypeError(
                    "BatchNormFlags.momentum must be a Python float or None, "
                    f"got {type(self.momentum).__name__}"
                )
            object.__setattr__(self, "momentum", float(self.momentum))
        if not isinstance(self.eps, numbers.Real) or isinstance(self.eps, bool):
            raise TypeError(f"BatchNormFlags.eps must be a Python float, got {type(self.eps).__name__}")
        object.__setattr__(self, "eps", float(self.eps))
        if not isinstance(self.axis, (int, np.integer)) or isinstance(self.axis, bool):
            raise TypeError(f"BatchNormFlags.axis must be an int, got {type(self.axis).__name__}")
        object.__setattr__(self, "axis", int(self.axis))
        if isinstance(self.axis_name, list):
            object.__setattr__(self, "axis_name", tuple(self.axis_name))
        if self.axis_index_groups is not None:
            groups = tuple(tuple(int(i) for i in group) for group in self.axis_index_groups)
            object.__setattr__(self, "axis_index_groups", groups)

    def replace(self, **changes) -> "BatchNormFlags":
        """A copy with some attributes changed, like assigning to the torch module's attributes."""
        return dataclasses.replace(self, **changes)


class BatchNormState(NamedTuple):
    """torch's buffers, under torch's names. ``None`` in their place means no buffers."""

    running_mean: jax.Array
    running_var: jax.Array
    num_batches_tracked: jax.Array


class BatchNormParams(NamedTuple):
    """torch's affine parameters (``weight`` is gamma, ``bias`` is beta)."""

    weight: jax.Array
    bias: jax.Array


def counter_dtype() -> jnp.dtype:
    """int64 (torch's dtype) when ``jax_enable_x64`` is on, else JAX's default int32."""
    return jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.int64))


def init_state(num_features: int, dtype: jnp.dtype = jnp.float32) -> BatchNormState:
    """Fresh buffers as ``torch.nn.BatchNorm*d(num_features)`` registers them.

    ``running_mean = 0``, ``running_var = 1``, ``num_batches_tracked = 0``.
    """
    return BatchNormState(
        running_mean=jnp.zeros((num_features,), dtype),
        running_var=jnp.ones((num_features,), dtype),
        num_batches_tracked=jnp.zeros((), counter_dtype()),
    )


def init_params(num_features: int, dtype: jnp.dtype = jnp.float32) -> BatchNormParams:
    """Affine parameters as torch's ``reset_parameters`` sets them: ``weight = 1``, ``bias = 0``."""
    return BatchNormParams(
        weight=jnp.ones((num_features,), dtype), bias=jnp.zeros((num_features,), dtype)
    )


def uses_batch_stats(flags: BatchNormFlags, has_buffers: bool) -> bool:
    """torch's ``bn_training``: batch statistics in training, or in eval without buffers."""
    return flags.training or not has_buffers


def updates_buffers(flags: BatchNormFlags, has_buffers: bool) -> bool:
    """torch passes the buffers for updating only when training and tracking, and they exist."""
    return flags.training and flags.track_running_stats and has_buffers


def update_factor(momentum: float | None, count: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Weight of the new batch: ``momentum``, or ``1 / num_batches_tracked`` (after the increment)."""
    if momentum is None:
        return (1.0 / count.astype(dtype)).astype(dtype)
    return jnp.asarray(momentum, dtype)


def update_state(
    state: BatchNormState,
    moments: Moments,
    momentum: float | None,
    skip_nonfinite: bool = False,
) -> BatchNormState:
    """One torch buffer update: the counter always counts; the stats move unless the batch is empty.

    ``running = f * batch + (1 - f) * running`` with the *unbiased* batch variance, in torch's
    order of operations. Nothing here is differentiable (torch updates buffers under no_grad).
    With ``skip_nonfinite`` a non-empty batch whose mean or unbiased variance is non-finite in
    any channel leaves the whole state (counter included) unchanged.
    """
    count = state.num_batches_tracked + 1
    if isinstance(moments.count, int) and moments.count == 0:
        # torch returns early for an empty input: buffers untouched, counter already incremented.
        return state._replace(num_batches_tracked=count)
    dtype = stats_dtype(state.running_mean.dtype)
    f = update_factor(momentum, count, dtype)
    mean = lax.stop_gradient(moments.mean).astype(dtype)
    var = lax.stop_gradient(moments.unbiased_var).astype(dtype)
    running_mean = f * mean + (1 - f) * state.running_mean.astype(dtype)
    running_var = f * var + (1 - f) * state.running_var.astype(dtype)
    if not isinstance(moments.count, int):
        # Data-dependent count (mask / cross-device): an empty global batch changes nothing.
        nonempty = moments.count > 0
        running_mean = jnp.where(nonempty, running_mean, state.running_mean.astype(dtype))
        running_var = jnp.where(nonempty, running_var, state.running_var.astype(dtype))
    new_state = BatchNormState(
        running_mean=running_mean.astype(state.running_mean.dtype),
        running_var=running_var.astype(state.running_var.dtype),
        num_batches_tracked=count,
    )
    if skip_nonfinite:
        finite = jnp.all(jnp.isfinite(mean)) & jnp.all(jnp.isfinite(var))
        if not isinstance(moments.count, int):
            finite = finite | (moments.count == 0)  # an empty batch still counts, as in torch
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    return new_state


def normalize(
    x: jax.Array,
    mean: jax.Array,
    var: jax.Array,
    params: BatchNormParams | None,
    eps: float,
    feature_axis: int,
) -> jax.Array:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` as one fused elementwise pass.

    Computed in ``stats_dtype(x.dtype)`` (float32 for half inputs) and returned in ``x.dtype``.
    The mean is subtracted before scaling (not folded into the shift) so that inputs with a large
    mean keep their precision.
    """
    dtype = stats_dtype(x.dtype)
    invstd = lax.rsqrt(var.astype(dtype) + np.asarray(eps, dtype))
    scale = invstd if params is None else invstd * params.weight.astype(dtype)
    per_channel = lambda v: broadcast_channel(v, x.ndim, feature_axis)  # noqa: E731
    y = (x.astype(dtype) - per_channel(mean.astype(dtype))) * per_channel(scale)
    if params is not None:
        y = y + per_channel(params.bias.astype(dtype))
    return y.astype(x.dtype)


def batch_norm(
    x: jax.Array,
    state: BatchNormState | None,
    params: BatchNormParams | None,
    flags: BatchNormFlags = BatchNormFlags(),
    *,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, BatchNormState | None]:
    """PyTorch's ``BatchNorm{1,2,3}d.forward`` as a pure function.

    PyTorch equivalent::

        bn = torch.nn.BatchNorm2d(C, eps, momentum, affine=params is not None,
                                  track_running_stats=state is not None)
        bn.track_running_stats = flags.track_running_stats  # may differ from construction
        bn.train(flags.training)
        y = bn(x)            # and bn's buffers become new_state

    Args:
      x: floating input of rank >= 2, features on ``flags.axis``. bf16/fp16 inputs may use
        float32 state and params; statistics are then accumulated in float32.
      state: ``BatchNormState`` (torch's buffers), or ``None`` for a layer built with
        ``track_running_stats=False``.
      params: ``BatchNormParams`` (weight, bias), or ``None`` for ``affine=False``.
      flags: the module's current attributes; see :class:`BatchNormFlags`.
      mask: optional bool array of shape ``(N,)`` over axis 0: rows where it is False (padding)
        are left out of the batch statistics but still normalized. Equivalent to torch on the
        valid rows only.

    Returns:
      ``(y, new_state)``: ``y`` has ``x``'s shape and dtype; ``new_state`` is ``state`` with
      torch's buffer update applied (``None`` when ``state`` is ``None``). No gradient flows into
      the running statistics.

    Raises:
      ValueError: rank < 2, feature axis out of range, feature-count or shape mismatch of a state
        or params field, or one value per channel when batch statistics are used.
      TypeError: non-floating input, or state/params dtypes torch would reject as mixed.
    """
    feature_axis = validation.check_input(x, flags.axis)
    validation.check_state_and_params(x, state, params, feature_axis)
    validation.check_mask(mask, tuple(x.shape), feature_axis)
    has_buffers = state is not None

    if uses_batch_stats(flags, has_buffers):
        if mask is None and flags.axis_name is None:
            validation.check_batch_size(tuple(x.shape), feature_axis)
        moments = batch_moments(
            x, feature_axis, mask, flags.axis_name, flags.axis_index_groups
        )
        mean, var = moments.mean, moments.biased_var
    else:
        moments = None
        mean = lax.stop_gradient(state.running_mean)
        var = lax.stop_gradient(state.running_var)

    y = normalize(x, mean, var, params, flags.eps, feature_axis)

    if updates_buffers(flags, has_buffers):
        return y, update_state(state, moments, flags.momentum, flags.skip_nonfinite_updates)
    return y, state
