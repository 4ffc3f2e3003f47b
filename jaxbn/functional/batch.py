"""PyTorch's BatchNorm as one pure function, and the buffer update every norm family shares.

``batch_norm(x, state, params, flags) -> (y, new_state)`` reproduces
``torch.nn.BatchNorm1d/2d/3d.forward`` including every attribute a torch user can change after
construction. What torch decides (which statistics, whether the buffers move, with what weight)
is :mod:`jaxbn.functional.torch_rules`; :func:`apply_plan` carries a decision out for any family.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from . import validation
from .kernel import Normalization, normalize
from .reductions import ChannelSums, Layout, Moments, stats_dtype
from .torch_rules import BATCH_NORM, Plan, update_factor
from .types import BatchNormFlags, BatchNormParams, BatchNormState


def update_state(
    state: BatchNormState,
    moments: Moments,
    plan: Plan,
    skip_nonfinite: bool = False,
) -> BatchNormState:
    """One torch buffer update: the counter counts (if ``plan.counts``); the statistics move
    unless the batch is empty.

    ``running = f * batch + (1 - f) * running`` with the *unbiased* batch variance, in torch's
    order of operations, ``f`` from :func:`jaxbn.functional.torch_rules.update_factor`. Nothing
    here is differentiable (torch updates buffers under no_grad). With ``skip_nonfinite`` a
    non-empty batch whose mean or unbiased variance is non-finite in any channel leaves the whole
    state (counter included) unchanged.
    """
    count = state.num_batches_tracked + 1 if plan.counts else state.num_batches_tracked
    if isinstance(moments.count, int) and moments.count == 0:
        # torch returns early for an empty input: buffers untouched, counter already incremented.
        return state._replace(num_batches_tracked=count)
    dtype = stats_dtype(state.running_mean.dtype)
    f = update_factor(plan.momentum, count, dtype)
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


def apply_plan(
    x: jax.Array,
    state: BatchNormState | None,
    params: BatchNormParams | None,
    flags: BatchNormFlags,
    plan: Plan,
    feature_axis: int,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, BatchNormState | None]:
    """Normalize ``x`` (validated; features on ``feature_axis``) as ``plan`` says, and update the
    buffers if it says so. Every family's pure function ends here."""
    layout = Layout.of(x, feature_axis, flags.axis_name, flags.axis_index_groups)
    dtype = stats_dtype(x.dtype)
    if params is None:
        weight = jnp.ones((layout.num_features,), dtype)
        bias = jnp.zeros((layout.num_features,), dtype)
    else:
        weight, bias = params.weight.astype(dtype), params.bias.astype(dtype)
    running_mean = running_var = None
    if not plan.uses_input_stats:
        running_mean = lax.stop_gradient(state.running_mean)
        running_var = lax.stop_gradient(state.running_var)

    config = Normalization(layout, flags.eps, plan.uses_input_stats)
    y, input_moments = normalize(config, x, mask, weight, bias, running_mean, running_var)

    if plan.writes_buffers:
        count = ChannelSums(layout, mask).count(dtype)
        batch = Moments(count=count, mean=input_moments[0], m2=input_moments[1])
        return y, update_state(state, batch, plan, flags.skip_nonfinite_updates)
    return y, state


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
    plan = BATCH_NORM.plan(flags, state is not None)
    if plan.uses_input_stats and mask is None and flags.axis_name is None:
        validation.check_batch_size(tuple(x.shape), feature_axis)
    return apply_plan(x, state, params, flags, plan, feature_axis, mask)
