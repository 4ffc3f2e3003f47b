"""PyTorch's BatchNorm as one pure function, and the buffer update every norm family shares.

``batch_norm(x, state, params, flags) -> (y, new_state)`` reproduces
``torch.nn.BatchNorm1d/2d/3d.forward`` including every attribute a torch user can change after
construction. What torch decides (which statistics, whether the buffers move, with what weight)
is :mod:`jaxbn.functional.torch_rules`; :func:`apply_plan` carries a decision out for any family.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from . import validation
from .kernel import GivenStats, Normalization, normalize
from .reductions import ChannelSums, Layout, Moments, ShiftHint, stats_dtype
from .strategy import Strategy, resolve_strategy
from .torch_rules import BATCH_NORM, Family, Plan, update_factor
from .types import UNSET, BatchNormFlags, BatchNormParams, BatchNormState


@dataclasses.dataclass(frozen=True)
class Call:
    """One call, validated and decided: what :func:`apply_plan` carries out.

    Attributes:
      x, state, params: the arrays, as JAX arrays.
      flags: the static flags, overrides folded in.
      plan: torch's decision (with a traced ``momentum`` in it if one was given).
      feature_axis: the non-negative channel axis of ``x``.
      eps: a float, or a traced scalar.
      strategy: how to compute (``flags.strategy``, or the backend's default).
    """

    x: jax.Array
    state: BatchNormState | None
    params: BatchNormParams | None
    flags: BatchNormFlags
    plan: Plan
    feature_axis: int
    eps: Any
    strategy: Strategy


def prepare_call(
    family: Family,
    x: jax.Array,
    state: BatchNormState | None,
    params: BatchNormParams | None,
    flags: BatchNormFlags,
    momentum: Any,
    eps: Any,
) -> Call:
    """Validate the arguments and decide the call: the checks every family shares, the static
    overrides folded into ``flags``, torch's plan with a traced ``momentum`` in it if given, the
    strategy resolved.

    NumPy arguments become JAX arrays first, so eager calls see the dtypes a jitted call sees
    (float64 becomes float32 when ``jax_enable_x64`` is off, in both).
    """
    validation.check_argument_types(x, state, params, flags)
    x, state, params = jax.tree.map(validation.as_jax, (x, state, params))
    flags, momentum, eps = validation.split_overrides(flags, momentum, eps)
    feature_axis = validation.check_input(x, flags.axis)
    validation.check_state_and_params(x, state, params, feature_axis)
    plan = family.plan(flags, state is not None)
    if momentum is not UNSET:
        plan = dataclasses.replace(plan, momentum=momentum)
    return Call(x, state, params, flags, plan, feature_axis, flags.eps if eps is UNSET else eps,
                resolve_strategy(flags.strategy))


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
    count = state.num_batches_tracked
    if plan.counts:  # saturating: an int32 counter (x64 off) stops at 2**31 - 1 instead of wrapping
        count = count + (count < jnp.iinfo(count.dtype).max).astype(count.dtype)
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
    call: Call, mask: jax.Array | None = None, running_mean_as_shift: bool = False
) -> tuple[jax.Array, BatchNormState | None]:
    """Normalize ``call.x`` as ``call.plan`` says, and update the buffers if it says so. Every
    family's pure function ends here.

    ``running_mean_as_shift``: offer the buffers' running mean as the shift of the batch
    statistics (:func:`jaxbn.functional.reductions.moments`; the strategy decides whether to
    take it); only for a family whose running statistics describe the batch being normalized
    (batch norm, not instance norm's average over instances).
    """
    state, plan = call.state, call.plan
    layout = Layout.of(call.x, call.feature_axis, call.flags.axis_name,
                       call.flags.axis_index_groups)
    dtype = stats_dtype(call.x.dtype)
    if call.params is None:
        weight = jnp.ones((layout.num_features,), dtype)
        bias = jnp.zeros((layout.num_features,), dtype)
    else:
        weight, bias = call.params.weight.astype(dtype), call.params.bias.astype(dtype)
    given = shift_hint = None
    if state is not None and not plan.uses_input_stats:
        given = jax.tree.map(lax.stop_gradient, GivenStats(state.running_mean, state.running_var))
    if state is not None and plan.uses_input_stats and running_mean_as_shift:
        shift_hint = ShiftHint(state.running_mean, state.running_var, state.num_batches_tracked)
        shift_hint = jax.tree.map(lax.stop_gradient, shift_hint)

    config = Normalization(layout, plan.uses_input_stats, call.strategy)
    y, input_moments = normalize(config, call.x, mask, weight, bias, given, shift_hint, call.eps)

    if plan.writes_buffers:
        count = ChannelSums(layout, mask).count(dtype)
        batch = Moments(count=count, mean=input_moments[0], m2=input_moments[1])
        return y, update_state(state, batch, plan, call.flags.skip_nonfinite_updates)
    return y, state


def batch_norm(
    x: jax.Array,
    state: BatchNormState | None,
    params: BatchNormParams | None,
    flags: BatchNormFlags = BatchNormFlags(),
    *,
    mask: jax.Array | None = None,
    momentum: Any = UNSET,
    eps: Any = UNSET,
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
      momentum, eps: this call's value of torch's attribute, overriding ``flags``. A Python
        number (or ``None`` for momentum) is static like ``flags``; a JAX/NumPy scalar is a
        *traced* value, so a schedule (``bn.momentum`` changed every step in torch) compiles
        once. A traced ``eps`` is not range-checked (its value is unknown at trace time).

    Returns:
      ``(y, new_state)``: ``y`` has ``x``'s shape and dtype; ``new_state`` is ``state`` with
      torch's buffer update applied (``None`` when ``state`` is ``None``). No gradient flows into
      the running statistics.

    Raises:
      ValueError: rank < 2, feature axis out of range, feature-count or shape mismatch of a state
        or params field, one value per channel when batch statistics are used, or an ``eps``
        torch refuses (``<= 0`` with batch statistics, ``< 0`` with running ones).
      TypeError: arguments of the wrong type (e.g. a torch tensor, a dict for ``state``),
        non-floating input, or state/params dtypes torch would reject as mixed.
    """
    call = prepare_call(BATCH_NORM, x, state, params, flags, momentum, eps)
    shape = tuple(call.x.shape)
    if mask is not None:
        validation.check_array("mask", mask)
        mask = validation.as_jax(mask)
    validation.check_mask(mask, shape, call.feature_axis)
    validation.check_eps(call.eps, call.plan.uses_input_stats)
    if call.plan.uses_input_stats and mask is None and call.flags.axis_name is None:
        validation.check_batch_size(shape, call.feature_axis)
    return apply_plan(call, mask, running_mean_as_shift=True)
