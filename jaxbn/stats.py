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
from typing import NamedTuple

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


def batch_moments(x: jax.Array, feature_axis: int) -> Moments:
    """Two-pass per-channel mean and sum of squared deviations of ``x``.

    Args:
      x: floating input of any rank >= 2.
      feature_axis: the non-negative channel axis; every other axis is reduced.

    Returns:
      ``Moments`` with ``count`` a Python int and ``mean``/``m2`` of shape ``(C,)`` in
      ``stats_dtype(x.dtype)``. For an empty batch the mean and m2 are NaN/0; callers must not
      use them (torch leaves running statistics untouched then).
    """
    axes = reduction_axes(x.ndim, feature_axis)
    count = count_per_channel(x.shape, feature_axis)
    xs = x.astype(stats_dtype(x.dtype))
    n = np.asarray(count, xs.dtype)
    rough_mean = jnp.sum(xs, axis=axes) / n
    # The first sum carries the accumulation error of large values (float32 data with mean 1e4
    # over 8192 elements: 1.8e-3, more than the 1e-3 the outputs may be off). The deviations from
    # the rough mean are small and exact, so their sums correct the mean and give m2 in the same
    # (second) pass: sum((x - m)^2) = sum((x - r)^2) - n (m - r)^2 for m = r + sum(x - r) / n.
    centered = xs - broadcast_channel(rough_mean, x.ndim, feature_axis)
    correction = jnp.sum(centered, axis=axes) / n
    m2 = jnp.sum(jnp.square(centered), axis=axes) - n * jnp.square(correction)
    m2 = jnp.maximum(m2, 0)  # rounding must not turn a constant channel's 0 negative
    return Moments(count=count, mean=rough_mean + correction, m2=m2)
