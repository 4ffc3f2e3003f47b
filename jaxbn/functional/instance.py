"""PyTorch's InstanceNorm{1,2,3}d as a pure function on top of batch norm's machinery.

No normalization math of its own: like torch's ``at::instance_norm``, the input ``(N, C, *S)`` is
folded into a batch of one with ``N*C`` channels, ``(1, N*C, *S)``, the buffers and affine
parameters are repeated ``N`` times, batch norm's :func:`~jaxbn.functional.batch.apply_plan`
runs on that with instance norm's own decision
(:func:`jaxbn.functional.torch_rules.instance_norm_plan`), and the updated buffers are averaged
back over the ``N`` instances. What that gives beyond the rules: the instance variance folded
into ``running_var`` is unbiased over the *spatial* size; an empty batch (``N == 0``) sets the
buffers to NaN (the mean of no instances); NaN statistics reach the buffers even with
``momentum=None`` (``0 * NaN``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from . import validation
from .batch import apply_plan, prepare_call
from .torch_rules import INSTANCE_NORM
from .types import UNSET, BatchNormFlags, BatchNormParams, BatchNormState, InstanceNormFlags


def repeat_per_instance(v: jax.Array, n: int) -> jax.Array:
    """A ``(C,)`` vector repeated for ``n`` instances, ``(n*C,)``, in the folded channel order."""
    return jnp.tile(v, n)


def average_over_instances(folded: jax.Array, old: jax.Array, n: int) -> jax.Array:
    """``(n*C,)`` per-instance updated buffers back to ``(C,)``: their mean over the ``n`` instances.

    Written as ``old + mean(folded - old)``, which equals torch's ``mean(folded)`` in exact
    arithmetic but does not round ``n`` copies of an unchanged buffer (``momentum=None``) into a
    different value: torch's plain mean can move it by a few ulps. For ``n == 0`` this is NaN, as
    in torch (the mean of no instances).
    """
    change = folded.reshape(n, old.shape[0]) - old
    return (old + jnp.mean(change, axis=0)).astype(old.dtype)


def instance_norm(
    x: jax.Array,
    state: BatchNormState | None,
    params: BatchNormParams | None,
    flags: BatchNormFlags = InstanceNormFlags(),
    *,
    momentum: Any = UNSET,
    eps: Any = UNSET,
) -> tuple[jax.Array, BatchNormState | None]:
    """PyTorch's ``InstanceNorm{1,2,3}d.forward`` (batched input) as a pure function.

    PyTorch equivalent::

        m = torch.nn.InstanceNorm2d(C, eps, momentum, affine=params is not None,
                                    track_running_stats=state is not None)
        m.track_running_stats = flags.track_running_stats  # may differ from construction
        m.train(flags.training)
        y = m(x)             # and m's buffers become new_state

    Args:
      x: floating input ``(N, C, *spatial)`` (features on ``flags.axis``; ``-1`` for
        channels-last), rank >= 3. For torch's unbatched ``(C, *spatial)`` input pass ``x[None]``.
      state: ``BatchNormState`` from :func:`jaxbn.init_state` (the layer was built with
        ``track_running_stats=True``) or ``None`` (torch's default).
      params: ``BatchNormParams`` (``affine=True``) or ``None`` (torch's default).
      flags: the module's current attributes; :class:`InstanceNormFlags` has torch's defaults.
      momentum, eps: this call's value of torch's attribute, static or traced, as in
        :func:`jaxbn.batch_norm`. (torch's instance norm does not range-check ``eps``.)

    Returns:
      ``(y, new_state)`` with torch's buffer semantics (module docstring);
      ``new_state.num_batches_tracked`` is always ``state.num_batches_tracked``.

    Raises:
      ValueError: rank < 3, feature/state/params shape mismatch, ``flags.axis_name`` set, one
        spatial element when input statistics are used (torch's "Expected more than 1 spatial
        element when training"), or eval with ``track_running_stats=True`` and no buffers (torch:
        "Expected running_mean and running_var to be defined when use_input_stats is false").
    """
    call = prepare_call(INSTANCE_NORM, x, state, params, flags, momentum, eps)
    x, state, params, plan, feature_axis = call.x, call.state, call.params, call.plan, call.feature_axis
    shape = tuple(x.shape)
    validation.check_instance_input(shape, feature_axis, call.flags.axis_name)
    validation.check_running_stats_exist(plan.uses_input_stats, state)
    if plan.uses_input_stats:
        validation.check_spatial_size(shape, feature_axis)

    n = shape[0]
    channels_first = jnp.moveaxis(x, feature_axis, 1)
    folded = channels_first.reshape((1, n * shape[feature_axis]) + channels_first.shape[2:])
    folded_state = None
    if state is not None:
        folded_state = state._replace(
            running_mean=repeat_per_instance(state.running_mean, n),
            running_var=repeat_per_instance(state.running_var, n),
        )
    folded_params = None
    if params is not None:
        folded_params = BatchNormParams(*(repeat_per_instance(p, n) for p in params))
    folded_call = dataclasses.replace(call, x=folded, state=folded_state, params=folded_params,
                                      feature_axis=1)
    y, folded_new = apply_plan(folded_call)
    y = jnp.moveaxis(y.reshape(channels_first.shape), 1, feature_axis)
    if not plan.writes_buffers:
        return y, state
    # An update the guard skipped leaves folded_new equal to folded_state: the average of no
    # change is the old value, bitwise.
    return y, state._replace(
        running_mean=average_over_instances(folded_new.running_mean, state.running_mean, n),
        running_var=average_over_instances(folded_new.running_var, state.running_var, n),
    )
