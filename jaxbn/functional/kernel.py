"""The differentiable normalization: ``y = (x - mean) * invstd * weight + bias`` with its
statistics, as one ``jax.custom_jvp`` whose tangent keeps no full-size residual but ``x``.

No torch rule lives here: :class:`Normalization` says whether the statistics come from the input
(decided by :mod:`jaxbn.functional.torch_rules`) and the reductions are
:mod:`jaxbn.functional.reductions`'.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from .reductions import ChannelSums, Layout, Moments, ShiftHint, Site, moments, stats_dtype
from .strategy import Strategy


@dataclasses.dataclass(frozen=True)
class Normalization:
    """Static description of one normalization: the input layout, whether the statistics come
    from the input (:attr:`jaxbn.functional.torch_rules.Plan.uses_input_stats`) or are given
    (the running statistics eval normalizes with), and how to compute (:class:`Strategy`)."""

    layout: Layout
    input_stats: bool
    strategy: Strategy


class GivenStats(NamedTuple):
    """Per-channel statistics to normalize with instead of the input's: a layer's running
    statistics in eval."""

    mean: jax.Array
    var: jax.Array


class Centering(NamedTuple):
    """Per-channel ``(mean, mean_lo, invstd)`` a normalization used: ``x_hat = ((x - mean) -
    mean_lo) * invstd`` (``mean_lo`` is None for given statistics)."""

    mean: jax.Array
    mean_lo: jax.Array | None
    invstd: jax.Array


class Tangents(NamedTuple):
    """The tangents :func:`normalize` is linear in (the statistics inputs get none)."""

    x: jax.Array
    weight: jax.Array
    bias: jax.Array


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
    given: GivenStats | None,
    shift_hint: ShiftHint | None,
    eps: jax.Array | float,
) -> tuple[Centering, Moments | None]:
    """``(centering, moments)``: from the input's moments (which may take ``shift_hint`` as
    their shift), or from the ``given`` statistics (``moments`` None)."""
    dtype = stats_dtype(x.dtype)
    eps = jnp.asarray(eps, dtype)
    if config.input_stats:
        m = moments(x, ChannelSums(config.layout, mask), config.strategy, shift_hint)
        return Centering(m.mean, m.mean_lo, lax.rsqrt(m.biased_var + eps)), m
    invstd = lax.rsqrt(given.var.astype(dtype) + eps)
    return Centering(given.mean.astype(dtype), None, invstd), None


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def normalize(
    config: Normalization,
    x: jax.Array,
    mask: jax.Array | None,
    weight: jax.Array,
    bias: jax.Array,
    given: GivenStats | None,
    shift_hint: ShiftHint | None,
    eps: jax.Array | float,
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """Batch norm's differentiable part: ``(y, input_moments)``.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` in ``x``'s dtype, with the input's
    moments (``config.input_stats``; then ``input_moments = (mean, m2)``; ``shift_hint``, if
    given, may serve as their shift) or the ``given`` statistics (``input_moments = ()``; they
    get no gradient, as in torch). ``eps`` may be traced; like the running statistics it gets no
    gradient.

    Differentiation goes through :func:`normalize_jvp`, whose tangent map keeps no full-size
    residual but ``x`` and transposes into torch's backward formula (forward mode, reverse mode,
    vmap and higher derivatives all work).
    """
    return normalize_forward(config, (x, mask, weight, bias, given, shift_hint, eps))[0]


def normalize_forward(
    config: Normalization, primals: tuple
) -> tuple[tuple[jax.Array, tuple[jax.Array, ...]], Centering]:
    """:func:`normalize`'s outputs, and the :class:`Centering` its tangent needs.

    ``primals`` are :func:`normalize`'s array arguments, in order.
    """
    x, mask, weight, bias, given, shift_hint, eps = primals
    c, m = statistics(config, x, mask, given, shift_hint, eps)
    y = affine_normalize(config.layout, x, c.mean, c.mean_lo, c.invstd * weight, bias)
    return (y.astype(x.dtype), ((m.mean, m.m2) if m is not None else ())), c


def backward_waits(layout: Layout, dtype: jnp.dtype, strategy: Strategy) -> bool:
    """Whether the backward pass's reduction ``sum(dy * (x - mean))`` waits for ``invstd``: for
    inputs larger than :attr:`Strategy.backward_wait_bytes`.

    Only a program that holds ``dy`` while the forward pass still runs -- one layer's ``vjp``
    with ``dy`` given, as in a layer benchmark -- can start that reduction early; in a network
    ``dy`` arrives after the forward pass and the wait changes nothing. When it can, on XLA:CPU,
    an input out of cache runs faster if the reduction waits (else it runs beside the forward's
    second reduction and normalize pass and oversubscribes the cores), a small one if it does
    not.
    """
    limit = strategy.backward_wait_bytes
    return limit is not None and math.prod(layout.shape) * jnp.dtype(dtype).itemsize > limit


def after(value: jax.Array, dependency: jax.Array) -> jax.Array:
    """``value``, computed only once ``dependency`` is: ``value + 0 * dependency``, which IEEE
    arithmetic does not let XLA fold (``0 * inf`` is NaN)."""
    return value + 0 * dependency


def tangent_map(
    config: Normalization,
    x: jax.Array,
    mask: jax.Array | None,
    centering: Centering,
    weight: jax.Array,
    tangents: Tangents,
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """The tangent of :func:`normalize`, linear in ``tangents`` (``x_dot, weight_dot, bias_dot``).

    With ``x_hat = (x - mean) * invstd`` and ``mean_B`` the (masked, cross-device) batch mean::

        y_dot = invstd*w * (x_dot - mean_B(x_dot) - x_hat * mean_B(x_hat * x_dot))
                + x_hat * weight_dot + bias_dot

    (the two ``mean_B`` terms only with batch statistics). Its transpose is torch's backward:
    ``dx = invstd*w * (dy - mean(dy) - x_hat * mean(dy * x_hat))``, ``dweight = sum(dy * x_hat)``,
    ``dbias = sum(dy)`` -- two reductions and one fused pass. Rematerialized
    (:data:`normalize_tangent`, ``nothing_saveable``): linearization keeps only the inputs
    (``x`` and per-channel vectors), never ``x_hat``. The per-channel vectors multiply *before*
    broadcasting, so that the transpose reduces ``dy`` and ``dy * x_hat`` once each (shared with
    ``dbias`` and ``dweight``); ``x_hat * (...)`` is formed in its own view (``Site.TANGENT``) so
    its transposed reduction fuses on XLA:CPU (see :mod:`jaxbn.functional.reductions`).

    Rematerialized behind ``jax.checkpoint``'s CSE barrier (``prevent_cse``), which stops XLA
    from merging the recomputation with the forward pass's: XLA:CPU would otherwise share the
    forward's ``invstd * weight``, one per-channel kernel more on each norm's chain.
    """
    mean, mean_lo, invstd = centering
    x_dot, weight_dot, bias_dot = tangents
    layout = config.layout
    dtype = invstd.dtype
    scale = invstd * weight
    x_dot = x_dot.astype(dtype)

    def x_hat(x, mean, invstd, *lo):
        centered = x.astype(dtype) - mean
        if lo:
            centered = centered - lo[0]
        return centered * invstd

    centre = (mean, invstd) + ((mean_lo,) if mean_lo is not None else ())
    coefficient = weight_dot.astype(dtype)
    y_dot = x_dot * layout.channel(scale) + layout.channel(bias_dot.astype(dtype))
    stats_dot: tuple[jax.Array, ...] = ()
    if config.input_stats:
        sums = ChannelSums(layout, mask)
        count = sums.count(dtype)
        mean_dot = sums.sum(lambda t: t, (x_dot,)) / count
        projection = sums.sum(
            lambda x, t, *c: x_hat(x, *c) * t, (x, x_dot), centre
        ) / count
        coefficient = coefficient - scale * projection
        y_dot = y_dot - layout.channel(scale * mean_dot)
        stats_dot = (mean_dot, 2 * count * projection / invstd)
    # x_hat * coefficient = (x - mean) * (invstd * coefficient) - mean_lo * invstd * coefficient:
    # one broadcast in the transposed reduction sum(dy * (x - mean)) (each broadcast costs
    # XLA:CPU's reduction as much as a read), the rest folds into sum(dy).
    slope = invstd * coefficient
    center = after(mean, invstd) if backward_waits(layout, x.dtype, config.strategy) else mean
    y_dot = y_dot + layout.unview(
        (layout.view(x, Site.TANGENT).astype(dtype) - layout.channel_view(center, Site.TANGENT))
        * layout.channel_view(slope, Site.TANGENT)
    )
    if mean_lo is not None:
        y_dot = y_dot - layout.channel(mean_lo * slope)
    return y_dot.astype(x.dtype), stats_dot


normalize_tangent = jax.checkpoint(
    tangent_map, policy=jax.checkpoint_policies.nothing_saveable, static_argnums=(0,)
)
""":func:`tangent_map`, rematerialized: the backward pass recomputes it from its inputs."""


@normalize.defjvp
def normalize_jvp(config: Normalization, primals: tuple, tangents: tuple) -> tuple:
    """Primal outputs of :func:`normalize` and their tangents from :func:`normalize_tangent`."""
    x, mask, weight, *_ = primals
    x_dot, _, weight_dot, bias_dot, *_ = tangents
    out, centering = normalize_forward(config, primals)
    out_dot = normalize_tangent(
        config, x, mask, centering, weight, Tangents(x_dot, weight_dot, bias_dot)
    )
    return out, out_dot
