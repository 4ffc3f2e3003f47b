"""Per-channel batch statistics: the reductions behind batch normalization.

Statistics are returned as :class:`Moments` ``(count, mean, m2)`` where ``m2`` is the sum of squared
deviations from the mean. That triple is what torch's kernels compute (``var_sum``), what the
unbiased running-variance update needs (``m2 / (count - 1)``) and what merges exactly across
devices (Chan et al.'s parallel formula), so every caller derives what it needs from it.

Accuracy before speed: the mean and the squared deviations are reduced in two passes (mean
first, then ``sum((x - mean)**2)``), never as ``E[x^2] - E[x]^2``, which loses every digit for
data whose mean is large relative to its spread. Half-precision inputs are accumulated in
float32, like torch's ``opmath`` type.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Moments(NamedTuple):
    """Per-channel statistics of a batch.

    Attributes:
      count: elements per channel that went into the statistics (a Python ``int`` when it is
        known at trace time).
      mean: per-channel mean, shape ``(C,)``, in :func:`stats_dtype` of the input.
      m2: per-channel sum of squared deviations from ``mean`` (torch's ``var_sum``).
    """

    count: int | jax.Array
    mean: jax.Array
    m2: jax.Array

    @property
    def biased_var(self) -> jax.Array:
        """``m2 / count``: the variance batch norm normalizes with."""
        return self.m2 / self.count

    @property
    def unbiased_var(self) -> jax.Array:
        """``m2 / (count - 1)``: the variance torch folds into ``running_var``."""
        return self.m2 / (self.count - 1)


def stats_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """The dtype statistics are accumulated in: float32 for 16-bit floats, else ``dtype``."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.float32) if dtype.itemsize < 4 else dtype


def reduction_axes(ndim: int, feature_axis: int) -> tuple[int, ...]:
    """Every axis but the (non-negative) feature axis."""
    return tuple(a for a in range(ndim) if a != feature_axis)


def count_per_channel(shape: tuple[int, ...], feature_axis: int) -> int:
    """Elements per channel, ``N * prod(spatial)`` in torch's words (static)."""
    return math.prod(d for a, d in enumerate(shape) if a != feature_axis)


def broadcast_channel(v: jax.Array, ndim: int, feature_axis: int) -> jax.Array:
    """Reshape a ``(C,)`` vector so it broadcasts along ``feature_axis`` of a rank-``ndim`` array."""
    shape = [1] * ndim
    shape[feature_axis] = v.shape[0]
    return v.reshape(shape)


def masked(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """``x`` with the rows where ``mask`` (shape ``(N,)``, axis 0) is False replaced by zeros.

    ``where`` rather than a multiply, so NaN/inf padding cannot leak into the statistics.
    """
    if mask is None:
        return x
    return jnp.where(mask.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros((), x.dtype))


def local_moments(x: jax.Array, feature_axis: int, mask: jax.Array | None = None) -> Moments:
    """Two-pass per-channel moments of this device's ``x`` (rows where ``mask`` is False excluded).

    Without a mask ``count`` is a static Python int; with one it is a traced scalar in the stats
    dtype (number of valid rows times the elements per row and channel).
    """
    axes = reduction_axes(x.ndim, feature_axis)
    dtype = stats_dtype(x.dtype)
    xs = x.astype(dtype)
    count = count_per_channel(x.shape, feature_axis)
    if mask is not None:
        per_row = count // x.shape[0] if x.shape[0] else 0
        count = jnp.sum(mask.astype(dtype)) * per_row
    n = jnp.asarray(count, dtype)
    rough_mean = jnp.sum(masked(xs, mask), axis=axes) / n
    # The first sum carries the accumulation error of large values (float32 data with mean 1e4
    # over 8192 elements: 1.8e-3, more than the 1e-3 the outputs may be off). The deviations from
    # the rough mean are small and exact, so their sums correct the mean and give m2 in the same
    # (second) pass: sum((x - m)^2) = sum((x - r)^2) - n (m - r)^2 for m = r + sum(x - r) / n.
    centered = masked(xs - broadcast_channel(rough_mean, x.ndim, feature_axis), mask)
    correction = jnp.sum(centered, axis=axes) / n
    m2 = jnp.sum(jnp.square(centered), axis=axes) - n * jnp.square(correction)
    m2 = jnp.maximum(m2, 0)  # rounding must not turn a constant channel's 0 negative
    # A channel holding inf has an infinite mean (as in torch), not the NaN of inf - inf.
    mean = jnp.where(jnp.isfinite(correction), rough_mean + correction, rough_mean)
    return Moments(count=count, mean=mean, m2=m2)


def all_reduce_moments(
    moments: Moments, axis_name: Any, axis_index_groups: Any = None
) -> Moments:
    """Exact moments of the union of every device's batch along ``axis_name``.

    Chan et al.'s parallel merge of each device's ``(count, mean, m2)``::

        N = sum(n_i);  mean = sum(n_i * mean_i) / N;  m2 = sum(m2_i + n_i * (mean_i - mean)**2)

    as two ``psum``s of per-channel vectors (the second needs the global mean), so uneven (or
    empty) per-device batches are weighted by their counts, as torch's SyncBatchNorm does, and
    the result is replicated. It equals single-device moments of the concatenated batch.
    """
    dtype = moments.mean.dtype
    count = jnp.asarray(moments.count, dtype)
    present = count > 0
    zero = jnp.zeros((), dtype)
    # A device with an empty batch has a NaN mean: give it exactly zero weight.
    local_mean = jnp.where(present, moments.mean, zero)
    total, weighted_sum = psum(
        (count, count * local_mean), axis_name, axis_index_groups=axis_index_groups
    )
    mean = weighted_sum / total
    spread = jnp.where(present, moments.m2 + count * jnp.square(local_mean - mean), zero)
    m2 = psum(spread, axis_name, axis_index_groups=axis_index_groups)
    return Moments(count=total, mean=mean, m2=m2)


def psum(value: Any, axis_name: Any, axis_index_groups: Any = None) -> Any:
    """``jax.lax.psum`` that says why ``axis_index_groups`` fails outside ``pmap``.

    JAX implements index groups for ``pmap`` only; ``shard_map`` raises a bare
    ``NotImplementedError`` and ``vmap`` a terse one.
    """
    try:
        return jax.lax.psum(value, axis_name, axis_index_groups=axis_index_groups)
    except NotImplementedError as e:
        if axis_index_groups is None:
            raise
        raise NotImplementedError(
            f"BatchNormFlags.axis_index_groups={axis_index_groups} is only supported by JAX under "
            f"jax.pmap (this JAX raised {type(e).__name__}: {e!s:.200}). Under shard_map, give "
            "each group its own mesh axis and pass only the inner axis as axis_name."
        ) from e


def batch_moments(
    x: jax.Array,
    feature_axis: int,
    mask: jax.Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
) -> Moments:
    """Per-channel moments of the (global, unmasked part of the) batch.

    Args:
      x: floating input of any rank >= 2.
      feature_axis: the non-negative channel axis; every other axis is reduced.
      mask: optional bool ``(N,)`` over axis 0; False rows are excluded.
      axis_name: optional named axis (or tuple of names) to merge statistics across devices.
      axis_index_groups: optional device groups for the merge (as in ``jax.lax.psum``).

    Returns:
      ``Moments`` in ``stats_dtype(x.dtype)``; ``count`` is a Python int when neither a mask nor
      an axis name makes it data-dependent. An empty batch gives a NaN mean; callers must not use
      it (torch leaves running statistics untouched then).
    """
    moments = local_moments(x, feature_axis, mask)
    if axis_name is not None:
        moments = all_reduce_moments(moments, axis_name, axis_index_groups)
    return moments
