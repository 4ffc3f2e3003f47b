"""PyTorch's InstanceNorm{1,2,3}d as a pure function on top of :func:`jaxbn.batch_norm`.

No normalization math of its own: like torch's ``at::instance_norm``, the input ``(N, C, *S)`` is
folded into a batch of one with ``N*C`` channels, ``(1, N*C, *S)``, the buffers and affine
parameters are repeated ``N`` times, batch norm runs on that, and the updated buffers are averaged
back over the ``N`` instances. That reproduces torch's InstanceNorm semantics (shared
``_NormBase``, different ``forward``):

* input statistics are used when ``training or not track_running_stats`` (torch's
  ``use_input_stats``) -- so, unlike batch norm, an *eval* call with ``track_running_stats=False``
  normalizes with the instance statistics even when buffers exist;
* whenever input statistics are used and buffers exist, the buffers are updated -- even in eval,
  and even when ``track_running_stats`` was flipped to False after construction;
* the update is ``running = (1-m)*running + m*mean_over_N(instance stat)`` with the instance
  variance *unbiased* over the spatial size; ``momentum=None`` means ``m = 0`` (no cumulative
  average), so the buffers keep their values -- unless the batch statistics are NaN
  (``0 * NaN``), and an empty batch (``N == 0``) sets them to NaN (the mean of nothing);
* ``num_batches_tracked`` exists (when buffers do) but never changes;
* eval with ``track_running_stats=True`` normalizes with the running statistics.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from . import validation
from .core import BatchNormFlags, BatchNormParams, BatchNormState, batch_norm


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class InstanceNormFlags(BatchNormFlags):
    """:class:`BatchNormFlags` with torch's InstanceNorm default ``track_running_stats=False``.

    ``torch.nn.InstanceNorm*d(C)`` is built with ``affine=False, track_running_stats=False`` (so
    pass ``params=None, state=None``), ``momentum=0.1``, ``eps=1e-5``. ``axis_name`` and
    ``axis_index_groups`` do not apply (statistics are per instance).
    """

    track_running_stats: bool = False


def use_input_stats(flags: BatchNormFlags) -> bool:
    """torch's ``self.training or not self.track_running_stats`` for instance norm."""
    return flags.training or not flags.track_running_stats


def updates_buffers(flags: BatchNormFlags, has_buffers: bool) -> bool:
    """torch's instance norm updates existing buffers whenever it uses input statistics (even in eval)."""
    return use_input_stats(flags) and has_buffers


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

    Returns:
      ``(y, new_state)`` with torch's buffer semantics (module docstring);
      ``new_state.num_batches_tracked`` is always ``state.num_batches_tracked``.

    Raises:
      ValueError: rank < 3, feature/state/params shape mismatch, ``flags.axis_name`` set, one
        spatial element when input statistics are used (torch's "Expected more than 1 spatial
        element when training"), or eval with ``track_running_stats=True`` and no buffers (torch:
        "Expected running_mean and running_var to be defined when use_input_stats is false").
    """
    feature_axis = validation.check_input(x, flags.axis)
    shape = tuple(x.shape)
    validation.check_instance_input(shape, feature_axis, flags.axis_name)
    validation.check_state_and_params(x, state, params, feature_axis)
    input_stats = use_input_stats(flags)
    if input_stats:
        validation.check_spatial_size(shape, feature_axis)
    elif state is None:
        raise ValueError(
            "Expected running_mean and running_var to be defined when use_input_stats is false: "
            "eval with track_running_stats=True needs state (the layer has no buffers)"
        )

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
    folded_flags = BatchNormFlags(
        training=input_stats,
        track_running_stats=True,
        momentum=0.0 if flags.momentum is None else flags.momentum,
        eps=flags.eps,
        axis=1,
        skip_nonfinite_updates=flags.skip_nonfinite_updates,
    )
    y, folded_new = batch_norm(folded, folded_state, folded_params, folded_flags)
    y = jnp.moveaxis(y.reshape(channels_first.shape), 1, feature_axis)

    if state is None or not input_stats:
        return y, state
    # batch_norm counts exactly the updates it applied (its guard may have skipped this one).
    applied = folded_new.num_batches_tracked != folded_state.num_batches_tracked
    new_state = state._replace(
        **{
            name: jnp.where(
                applied,
                average_over_instances(getattr(folded_new, name), getattr(state, name), n),
                getattr(state, name),
            )
            for name in ("running_mean", "running_var")
        }
    )
    return y, new_state
