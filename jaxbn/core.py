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
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import validation
from .stats import ChannelSums, Layout, Moments, moments, stats_dtype


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


@dataclasses.dataclass(frozen=True)
class Normalization:
    """Static description of one normalization: the input layout, eps, and whether the
    statistics come from the batch (training, or eval without buffers) or are given."""

    layout: Layout
    eps: float
    batch_stats: bool


def affine_normalize(
    layout: Layout,
    x: jax.Array,
    mean: jax.Array,
    mean_lo: jax.Array | None,
    scale: jax.Array,
    bias: jax.Array,
) -> jax.Array:
    """``((x - mean) - mean_lo) * scale + bias``: one fused elementwise pass, in the stats dtype.

    The mean is subtracted before scaling (not folded into the shift), and its rounding residual
    ``mean_lo`` after that, so inputs with a large mean keep their precision at no extra memory
    traffic.
    """
    ch = layout.channel
    centered = x.astype(scale.dtype) - ch(mean)
    if mean_lo is not None:
        centered = centered - ch(mean_lo)
    return centered * ch(scale) + ch(bias)


def statistics(
    config: Normalization,
    x: jax.Array,
    mask: jax.Array | None,
    running_mean: jax.Array | None,
    running_var: jax.Array | None,
) -> tuple[jax.Array, jax.Array | None, jax.Array, Moments | None]:
    """``(mean, mean_lo, invstd, moments)``: batch moments, or the given running statistics."""
    dtype = stats_dtype(x.dtype)
    eps = np.asarray(config.eps, dtype)
    if config.batch_stats:
        m = moments(x, ChannelSums(config.layout, mask))
        return m.mean, m.mean_lo, lax.rsqrt(m.biased_var + eps), m
    invstd = lax.rsqrt(running_var.astype(dtype) + eps)
    return running_mean.astype(dtype), None, invstd, None


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def normalize(
    config: Normalization,
    x: jax.Array,
    mask: jax.Array | None,
    weight: jax.Array,
    bias: jax.Array,
    running_mean: jax.Array | None,
    running_var: jax.Array | None,
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """Batch norm's differentiable part: ``(y, batch_stats)``.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` in ``x``'s dtype, with the batch
    moments (``config.batch_stats``; then ``batch_stats = (mean, m2)``) or the given running
    statistics (``batch_stats = ()``; they get no gradient, as in torch).

    Differentiation goes through :func:`normalize_jvp`, whose tangent map keeps no full-size
    residual but ``x`` and transposes into torch's backward formula (forward mode, reverse mode,
    vmap and higher derivatives all work).
    """
    return normalize_forward(config, (x, mask, weight, bias, running_mean, running_var))[0]


def normalize_forward(
    config: Normalization, primals: tuple
) -> tuple[tuple[jax.Array, tuple[jax.Array, ...]], tuple[jax.Array, jax.Array | None, jax.Array]]:
    """:func:`normalize`'s outputs, and the ``(mean, mean_lo, invstd)`` its tangent needs.

    ``primals`` are :func:`normalize`'s array arguments, in order.
    """
    x, mask, weight, bias, running_mean, running_var = primals
    mean, mean_lo, invstd, m = statistics(config, x, mask, running_mean, running_var)
    y = affine_normalize(config.layout, x, mean, mean_lo, invstd * weight, bias).astype(x.dtype)
    return (y, ((m.mean, m.m2) if m is not None else ())), (mean, mean_lo, invstd)


@partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable, static_argnums=(0,))
def normalize_tangent(
    config: Normalization,
    x: jax.Array,
    mask: jax.Array | None,
    mean: jax.Array,
    mean_lo: jax.Array | None,
    invstd: jax.Array,
    weight: jax.Array,
    x_dot: jax.Array,
    weight_dot: jax.Array,
    bias_dot: jax.Array,
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """The tangent of :func:`normalize`, linear in ``(x_dot, weight_dot, bias_dot)``.

    With ``x_hat = (x - mean) * invstd`` and ``mean_B`` the (masked, cross-device) batch mean::

        y_dot = invstd*w * (x_dot - mean_B(x_dot) - x_hat * mean_B(x_hat * x_dot))
                + x_hat * weight_dot + bias_dot

    (the two ``mean_B`` terms only with batch statistics). Its transpose is torch's backward:
    ``dx = invstd*w * (dy - mean(dy) - x_hat * mean(dy * x_hat))``, ``dweight = sum(dy * x_hat)``,
    ``dbias = sum(dy)`` -- two reductions and one fused pass. Rematerialized
    (``nothing_saveable``): linearization keeps only the inputs (``x`` and per-channel vectors),
    never ``x_hat``. The per-channel vectors multiply *before* broadcasting, so that the
    transpose reduces ``dy`` and ``dy * x_hat`` once each (shared with ``dbias`` and
    ``dweight``); ``x_hat * (...)`` is formed in its own view (site 2) so its transposed
    reduction fuses on XLA:CPU (see :mod:`jaxbn.stats`).
    """
    layout = config.layout
    dtype = invstd.dtype
    scale = invstd * weight
    x_dot = x_dot.astype(dtype)

    def x_hat(x, mean, invstd, *lo):
        centered = x.astype(dtype) - mean
        if lo:
            centered = centered - lo[0]
        return centered * invstd

    centering = (mean, invstd) + ((mean_lo,) if mean_lo is not None else ())
    coefficient = weight_dot.astype(dtype)
    y_dot = x_dot * layout.channel(scale) + layout.channel(bias_dot.astype(dtype))
    stats_dot: tuple[jax.Array, ...] = ()
    if config.batch_stats:
        sums = ChannelSums(layout, mask)
        count = sums.count(dtype)
        mean_dot = sums.sum(lambda t: t, (x_dot,)) / count
        projection = sums.sum(
            lambda x, t, *c: x_hat(x, *c) * t, (x, x_dot), centering
        ) / count
        coefficient = coefficient - scale * projection
        y_dot = y_dot - layout.channel(scale * mean_dot)
        stats_dot = (mean_dot, 2 * count * projection / invstd)
    # x_hat * coefficient = (x - mean) * (invstd * coefficient) - mean_lo * invstd * coefficient:
    # one broadcast in the transposed reduction sum(dy * (x - mean)) (each broadcast costs
    # XLA:CPU's reduction as much as a read), the rest folds into sum(dy).
    # The centre is the mean made to wait for invstd (0 * invstd is not folded: IEEE): XLA:CPU
    # would otherwise run this reduction concurrently with the forward pass's second reduction
    # and normalize pass, oversubscribing the cores (measured ~10% slower train step).
    slope = invstd * coefficient
    center = mean + 0 * invstd
    y_dot = y_dot + layout.unview(
        (layout.view(x, 2).astype(dtype) - layout.channel_view(center, 2))
        * layout.channel_view(slope, 2)
    )
    if mean_lo is not None:
        y_dot = y_dot - layout.channel(mean_lo * slope)
    return y_dot.astype(x.dtype), stats_dot


@normalize.defjvp
def normalize_jvp(config: Normalization, primals: tuple, tangents: tuple) -> tuple:
    """Primal outputs of :func:`normalize` and their tangents from :func:`normalize_tangent`."""
    x, mask, weight, *_ = primals
    x_dot, _, weight_dot, bias_dot, _, _ = tangents
    out, (mean, mean_lo, invstd) = normalize_forward(config, primals)
    out_dot = normalize_tangent(
        config, x, mask, mean, mean_lo, invstd, weight, x_dot, weight_dot, bias_dot
    )
    return out, out_dot


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
    batch_stats = uses_batch_stats(flags, has_buffers)
    if batch_stats and mask is None and flags.axis_name is None:
        validation.check_batch_size(tuple(x.shape), feature_axis)

    layout = Layout.of(x, feature_axis, flags.axis_name, flags.axis_index_groups)
    dtype = stats_dtype(x.dtype)
    if params is None:
        weight = jnp.ones((layout.num_features,), dtype)
        bias = jnp.zeros((layout.num_features,), dtype)
    else:
        weight, bias = params.weight.astype(dtype), params.bias.astype(dtype)
    running_mean = running_var = None
    if not batch_stats:
        running_mean = lax.stop_gradient(state.running_mean)
        running_var = lax.stop_gradient(state.running_var)

    config = Normalization(layout, flags.eps, batch_stats)
    y, stats = normalize(config, x, mask, weight, bias, running_mean, running_var)

    if updates_buffers(flags, has_buffers):
        count = ChannelSums(layout, mask).count(dtype)
        batch = Moments(count=count, mean=stats[0], m2=stats[1])
        return y, update_state(state, batch, flags.momentum, flags.skip_nonfinite_updates)
    return y, state
