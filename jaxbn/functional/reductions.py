"""Per-channel batch statistics: the reductions behind batch normalization.

Every per-channel sum jaxbn takes -- the forward statistics and the tangent map whose transpose
is the backward pass -- goes through :meth:`ChannelSums.sum`, the one place where rows excluded
by a ``mask`` are dropped and sums are merged across devices along ``axis_name``. Statistics are
:class:`Moments` ``(count, mean, m2)`` where ``m2`` is the sum of squared deviations from the
mean: what torch's kernels compute (``var_sum``), what the unbiased running-variance update needs
(``m2 / (count - 1)``).

Accuracy before speed, at two reads of the input:

1. the mean is reduced from ``x - shift``, with a per-channel ``shift`` taken from the data (the
   first valid element of each channel) -- or, where the strategy says so, the layer's running
   mean where it lies as close (:func:`running_shifted`) -- so a large common offset (data with
   mean 1e4 and unit variance, say) never enters the float32 accumulator; the mean is kept as
   ``mean + mean_lo`` (a float32 value and the rounding residual) so normalizing
   ``(x - mean) - mean_lo`` loses no digits either;
2. ``m2`` is reduced from the squared deviations from that mean (two-pass), never as
   ``E[x^2] - E[x]^2``. Half-precision inputs are accumulated in float32 (torch's ``opmath``).

On XLA:CPU the two sums cannot share one read (it fuses no sibling reductions), so one-pass
shifted sums would cost the same two reads and be less robust. On a CUDA GPU,
:mod:`jaxbn.functional.gpu_moments` (opt-in, :class:`~jaxbn.functional.strategy.Strategy`)
computes the same moments in one read.

**Views.** Each reduction site reads the input through its own reshaped *view* (leading unit
axes, then ``(N, M, C[, P])``: rows, the axes between rows and channels, channels, the axes
after). XLA:CPU fuses a reduction with the elementwise work feeding it only if every
intermediate -- including the broadcast of a per-channel vector -- has no user outside that
reduction; common-subexpression elimination would otherwise merge the broadcasts of ``mean``
used by a reduction and by the normalize pass, and the reduction would then read a
materialized full-size broadcast. Distinct view shapes keep the broadcasts distinct. The views
are free reshapes of a contiguous array (and harmless on GPU). Explicitly sharded inputs
(``jax.make_mesh`` + ``NamedSharding``) skip them and keep the input's shape, so XLA's
partitioner only ever all-reduces per-channel vectors.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable, Hashable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from . import gpu_moments
from .strategy import OneRead, Strategy, resolve_strategy


class Site(enum.IntEnum):
    """The reduction sites: each reads the input through its own view (module docstring), with
    this many leading unit axes."""

    MEAN = 0  # the forward sum of x - shift
    M2 = 1  # the forward sum of squared deviations
    TANGENT = 2  # the tangent's x_hat * (...) term, whose transpose is the backward's reduction
    RESIDUAL = 3  # the exact residual of a mean shifted by untrusted running statistics


class Moments(NamedTuple):
    """Per-channel statistics of a batch.

    Attributes:
      count: elements per channel that went into the statistics (a Python ``int`` when it is
        known at trace time).
      mean: per-channel mean, shape ``(C,)``, in :func:`stats_dtype` of the input.
      m2: per-channel sum of squared deviations from the mean (torch's ``var_sum``).
      mean_lo: the rest of the exact mean, ``mean + mean_lo`` (``mean``'s rounding residual, or
        a measured ``mean(x - mean)`` where the shift was untrusted; ``0.0`` when not tracked).
        Normalizing with ``(x - mean) - mean_lo`` keeps full precision for data whose mean is
        large relative to its spread.
    """

    count: int | jax.Array
    mean: jax.Array
    m2: jax.Array
    mean_lo: jax.Array | float = 0.0

    @property
    def biased_var(self) -> jax.Array:
        """``m2 / count``: the variance batch norm normalizes with."""
        return self.m2 / self.count

    @property
    def unbiased_var(self) -> jax.Array:
        """``m2 / (count - 1)``: the variance torch folds into ``running_var``."""
        return self.m2 / (self.count - 1)


class ShiftHint(NamedTuple):
    """A layer's running statistics offered in training as the shift of the batch statistics
    (:func:`running_shifted`): ``mean`` is the shift; ``var`` and ``batches``
    (``num_batches_tracked``) say whether it can be trusted. Never what is normalized with."""

    mean: jax.Array
    var: jax.Array
    batches: jax.Array


def stats_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """The dtype statistics are accumulated in: float32 for 16-bit floats, else ``dtype``."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.float32) if dtype.itemsize < 4 else dtype


def count_per_channel(shape: tuple[int, ...], feature_axis: int) -> int:
    """Elements per channel, ``N * prod(spatial)`` in torch's words (static)."""
    return math.prod(d for a, d in enumerate(shape) if a != feature_axis)


def explicit_spec(a: jax.Array) -> tuple[Any, ...] | None:
    """The per-axis sharding of ``a`` when it is explicitly sharded ("sharding in types", e.g.
    placed with ``NamedSharding`` on a ``jax.make_mesh`` mesh), else None."""
    sharding = getattr(jax.typeof(a), "sharding", None)
    if sharding is None or getattr(sharding.mesh, "empty", True):
        return None
    spec = tuple(sharding.spec) + (None,) * (a.ndim - len(sharding.spec))
    return spec if any(s is not None for s in spec) else None


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static geometry of a batch-norm input and the devices its batch is spread over.

    Attributes:
      shape: the (local) input shape.
      feature_axis: the non-negative channel axis.
      axis_name: named mapped axis (or tuple of names) to sum across, or None.
      axis_index_groups: device groups for the sums (as in ``jax.lax.psum``).
      spec: the input's explicit per-axis sharding (see :func:`explicit_spec`), or None.
    """

    shape: tuple[int, ...]
    feature_axis: int
    axis_name: Hashable | tuple[Hashable, ...] | None = None
    axis_index_groups: tuple[tuple[int, ...], ...] | None = None
    spec: tuple[Any, ...] | None = None

    @classmethod
    def of(
        cls, x: jax.Array, feature_axis: int, axis_name: Any = None, axis_index_groups: Any = None
    ) -> "Layout":
        """The layout of input ``x``."""
        return cls(tuple(x.shape), feature_axis, axis_name, axis_index_groups, explicit_spec(x))

    @property
    def num_features(self) -> int:
        return self.shape[self.feature_axis]

    @property
    def views(self) -> bool:
        """Whether reduction sites read through views: not for explicitly sharded inputs, whose
        reshapes JAX's sharding rules and XLA's partitioner do not see through (it gathered the
        batch in the backward pass)."""
        return self.spec is None

    @property
    def middle(self) -> int:
        """``M``: the product of the axes between the rows (axis 0) and the channels."""
        return math.prod(self.shape[1 : self.feature_axis]) if self.feature_axis != 0 else 1

    @property
    def blocks(self) -> tuple[int, ...]:
        """``(N, [M,] C[, P])``: rows, axes between rows and channels, channels, axes after.

        ``M`` and ``P`` are dropped when they are 1: XLA:CPU reduces far slower with a trailing
        unit axis after the channels, and measurably slower with a unit axis between rows and
        channels; leading unit axes cost nothing.
        """
        rows = self.shape[0] if self.feature_axis != 0 else 1
        after = math.prod(self.shape[self.feature_axis + 1 :])
        middle = (self.middle,) if self.middle != 1 else ()  # keep 0
        return (rows, *middle, self.num_features) + ((after,) if after != 1 else ())  # keep 0

    def site_shape(self, site: int | None) -> tuple[int, ...]:
        """The shape reduction site ``site`` computes in: ``site`` leading unit axes + blocks,
        or the input's own shape (``site`` None, or views impossible)."""
        if site is None or not self.views:
            return self.shape
        return (1,) * site + self.blocks

    def channel_axis(self, site: int | None) -> int:
        """Where the channels are in :meth:`site_shape`."""
        if site is None or not self.views:
            return self.feature_axis
        return site + (2 if self.middle != 1 else 1)

    def row_axis(self, site: int | None) -> int:
        """Where the rows (axis 0 of the input) are in :meth:`site_shape`."""
        return 0 if site is None or not self.views else site

    def view(self, a: jax.Array, site: int | None) -> jax.Array:
        """A full-size array (in the input's shape) seen through site ``site``'s view."""
        return a.reshape(self.site_shape(site))

    def unview(self, a: jax.Array) -> jax.Array:
        """A full-size array seen through any view, back in the input's shape."""
        return a.reshape(self.shape)

    def channel_view(self, v: jax.Array, site: int | None) -> jax.Array:
        """A ``(C,)`` vector broadcast over site ``site``'s shape.

        Broadcast from the ``(C,)`` vector itself (not a reshaped ``(1, .., C, ..)`` one), so that
        the transpose -- a reduction in the backward pass -- sums straight to ``(C,)``: XLA:CPU
        reduces far slower into a ``(1, .., C)`` result. Explicitly sharded inputs get the
        reshaped vector instead, broadcast implicitly by the arithmetic it enters, which keeps
        the input's sharding (a full-size replicated broadcast would make the transpose gather
        the batch).
        """
        shape = self.site_shape(site)
        if self.spec is not None:
            axis = self.channel_axis(site)
            return v.reshape(tuple(d if i == axis else 1 for i, d in enumerate(shape)))
        return jax.lax.broadcast_in_dim(v, shape, (self.channel_axis(site),))

    def row_view(self, mask: jax.Array, site: int | None) -> jax.Array:
        """A ``(N,)`` row mask shaped to broadcast over site ``site``'s shape."""
        shape = [1] * len(self.site_shape(site))
        shape[self.row_axis(site)] = mask.shape[0]
        return mask.reshape(shape)

    def channel(self, v: jax.Array) -> jax.Array:
        """A ``(C,)`` vector broadcast over the input's shape (see :meth:`channel_view`)."""
        return self.channel_view(v, None)


@dataclasses.dataclass(frozen=True)
class ChannelSums:
    """Per-channel sums over the (global, unmasked part of the) batch: the one place where
    masked rows are dropped and sums cross devices.

    Attributes:
      layout: the input's :class:`Layout`.
      mask: optional bool ``(N,)`` over axis 0; rows where it is False are left out.
    """

    layout: Layout
    mask: jax.Array | None = None

    def sum(
        self,
        fn: Callable[..., jax.Array],
        arrays: tuple[jax.Array, ...],
        vectors: tuple[jax.Array, ...] = (),
        site: int | None = None,
    ) -> jax.Array:
        """``sum over valid rows and devices of fn(*arrays, *vectors)``, per channel.

        ``fn`` is applied elementwise to the full-size ``arrays`` and per-channel ``vectors``,
        in the input's own shape or seen through reduction site ``site``'s view (see the module
        docstring); masked rows are replaced by zeros with ``where`` (so NaN/inf padding cannot
        leak in) and the result is summed over every axis but the channels, then across
        ``axis_name``.
        """
        lay = self.layout
        values = fn(*(lay.view(a, site) for a in arrays),
                    *(lay.channel_view(v, site) for v in vectors))
        if self.mask is not None:
            keep = lay.row_view(self.mask, site)
            values = jnp.where(keep, values, jnp.zeros((), values.dtype))
        axes = tuple(i for i in range(values.ndim) if i != lay.channel_axis(site))
        return psum(jnp.sum(values, axis=axes), lay.axis_name, lay.axis_index_groups)

    def count(self, dtype: jnp.dtype) -> int | jax.Array:
        """Elements per channel in the (global, valid part of the) batch.

        A static Python ``int`` without mask and ``axis_name``; else a traced scalar of ``dtype``.
        """
        lay = self.layout
        count = count_per_channel(lay.shape, lay.feature_axis)
        if self.mask is None and lay.axis_name is None:
            return count
        if self.mask is None:
            local = jnp.asarray(count, dtype)
        else:
            per_row = count // lay.shape[0] if lay.shape[0] else 0
            local = jnp.sum(self.mask.astype(dtype)) * per_row
        return psum(local, lay.axis_name, lay.axis_index_groups)

    def shift(self, x: jax.Array, dtype: jnp.dtype) -> jax.Array:
        """A per-channel value from the data near its mean, to subtract before summing.

        The first element of each channel in the first valid row (zero if there is none). Rows
        spread over devices contribute their average instead: across ``axis_name`` each device's
        first valid row, and when the rows are explicitly sharded, every valid row (a slice of
        ``N x C`` elements, no device needs another's row). Any finite value is correct; one
        close to the data keeps the sums small (:func:`finite_shift`).
        """
        lay = self.layout
        sharded = lay.spec or (None,) * len(lay.shape)
        if math.prod(lay.shape) == 0:  # no rows, or an empty spatial axis: nothing to read
            return jnp.zeros((lay.num_features,), dtype)
        mask = self.mask
        if lay.feature_axis != 0 and sharded[0] is None:  # one row: the first valid one
            first = 0 if mask is None else jnp.argmax(mask)
            x = jax.lax.dynamic_slice_in_dim(x, first, 1, axis=0)
            mask = None if mask is None else jnp.any(mask)[None]
        # The first element along every other axis that is not the channels or sharded.
        index = tuple(
            slice(None) if i in (0, lay.feature_axis) or sharded[i] is not None else slice(0, 1)
            for i in range(len(lay.shape))
        )
        corner = x[index]
        corner_layout = Layout.of(corner, lay.feature_axis, lay.axis_name, lay.axis_index_groups)
        sums = ChannelSums(corner_layout, mask)
        count = sums.count(dtype)
        total = sums.sum(lambda t: t.astype(dtype), (corner,))
        if isinstance(count, int):
            shift = total / count
        else:
            shift = jnp.where(count > 0, total / jnp.maximum(count, 1), jnp.zeros((), dtype))
        return finite_shift(shift)


def finite_shift(shift: jax.Array) -> jax.Array:
    """``shift`` with its non-finite values (an inf or NaN element read first, or in a running
    mean) replaced by 0: subtracting one would turn a channel holding ``inf`` into NaN
    (``inf - inf``) where torch's mean is ``inf``."""
    return jnp.where(jnp.isfinite(shift), shift, jnp.zeros((), shift.dtype))


def moments(
    x: jax.Array, sums: ChannelSums, strategy: Strategy, shift_hint: ShiftHint | None = None
) -> Moments:
    """Per-channel moments of the (global, unmasked part of the) batch, by the first of these
    paths that ``strategy`` allows and that applies:

    1. the one-read kernel (:func:`one_read_mode`): one read of ``x``, on CUDA only unless
       interpreted (elsewhere path 2 or 3);
    2. the running mean as the shift (:func:`uses_shift_hint`, :func:`running_shifted`): two
       reads, no read of a shift before the first;
    3. the two-pass statistics about a data element (:func:`data_shifted`).

    All three compute the same values to rounding and differentiate alike. Returns ``Moments``
    in ``stats_dtype(x.dtype)`` with ``mean_lo`` set. An empty batch gives a NaN mean; callers
    must not use it (torch leaves running statistics untouched then).
    """
    count = sums.count(stats_dtype(x.dtype))
    hint = shift_hint if uses_shift_hint(sums, count, shift_hint, strategy) else None
    mode = one_read_mode(sums, x.dtype, strategy)
    if mode is OneRead.OFF:
        mean, m2, mean_lo = two_reads(sums, count, x, hint)
    elif mode is OneRead.INTERPRETED:
        mean, m2, mean_lo = data_shifted(sums, count, x, partial(one_read, True))
    else:  # the compiled kernel on CUDA, the two reads elsewhere
        mean, m2, mean_lo = lax.platform_dependent(
            x, hint, default=partial(two_reads, sums, count),
            cuda=lambda x, _: data_shifted(sums, count, x, partial(one_read, False)),
        )
    return Moments(count=count, mean=mean, m2=m2, mean_lo=mean_lo)


def two_reads(
    sums: ChannelSums, count: int | jax.Array, x: jax.Array, hint: ShiftHint | None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(mean, m2, mean_lo)`` in XLA: shifted by the running mean (``hint`` given), else by a
    data element."""
    if hint is None:
        return data_shifted(sums, count, x)
    return running_shifted(sums, count, x, hint)


def uses_shift_hint(
    sums: ChannelSums, count: int | jax.Array, shift_hint: ShiftHint | None, strategy: Strategy
) -> bool:
    """Whether the running mean shifts the statistics: the strategy takes it, a layer offers it,
    and the batch is static, non-empty and not explicitly sharded (a traced count -- a mask, an
    ``axis_name`` -- or sharded rows keep the data shift)."""
    return (strategy.running_mean_shift and shift_hint is not None and isinstance(count, int)
            and count > 0 and sums.layout.views)


def one_read_mode(sums: ChannelSums, dtype: jnp.dtype, strategy: Strategy) -> OneRead:
    """How the one-read kernel computes these statistics: as ``strategy`` says where it applies
    (:func:`jaxbn.functional.gpu_moments.applies`), else not at all."""
    lay = sums.layout
    mode = strategy.one_read
    if mode is OneRead.OFF or not gpu_moments.applies(
        lay.shape, lay.feature_axis, dtype, sums.mask is not None, lay.spec is not None,
        interpret=mode is OneRead.INTERPRETED,
    ):
        return OneRead.OFF
    return mode


def data_shifted(
    sums: ChannelSums, count: int | jax.Array, x: jax.Array,
    offset_m2: Callable[..., tuple[jax.Array, jax.Array]] | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(mean, m2, mean_lo)``, shifted by a value read from the batch
    (:meth:`ChannelSums.shift`): ``offset_m2(sums, count, x, shift)`` gives ``(mean - shift,
    m2)``, :func:`two_pass` unless the one-read kernel does."""
    shift = sums.shift(x, stats_dtype(x.dtype))
    offset, m2 = (offset_m2 or two_pass)(sums, count, x, shift)
    mean, mean_lo = shifted_mean(shift, offset)
    return mean, m2, mean_lo


RUNNING_SHIFT_TRUST = 4.0
"""How far (in running standard deviations) the batch mean may lie from the running mean for the
running mean to serve as the shift with a data element's accuracy: an element of normal data
lies this near its mean with probability 0.99994."""


def trusts_running_shift(hint: ShiftHint, offset: jax.Array) -> jax.Array:
    """Whether the running mean shifted the batch as well as a data element would: the layer has
    seen a batch, and every channel's batch mean lies within :data:`RUNNING_SHIFT_TRUST` running
    standard deviations of it (``offset`` is batch mean minus running mean). A non-finite running
    statistic or offset anywhere says no."""
    spread = RUNNING_SHIFT_TRUST * jnp.sqrt(hint.var.astype(offset.dtype))
    within = jnp.isfinite(hint.mean) & jnp.isfinite(spread) & (jnp.abs(offset) <= spread)
    return (hint.batches > 0) & jnp.all(within)


def running_shifted(
    sums: ChannelSums, count: int, x: jax.Array, hint: ShiftHint
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(mean, m2, mean_lo)`` with the running mean as the shift: as accurate as a data element,
    without reading one first.

    :meth:`ChannelSums.shift` reads the batch before the first sum can start: one small kernel on
    every norm's critical path, which costs XLA:CPU's train steps far more than its work. The
    running mean is known before the batch. It is trusted
    (:func:`trusts_running_shift`) when the layer has seen a batch and every channel's batch mean
    lies within :data:`RUNNING_SHIFT_TRUST` running standard deviations of it; then the float32
    sum of ``x - shift`` is as accurate as with a data element, and ``mean_lo`` is ``mean``'s
    rounding residual, as in :func:`two_pass`. Otherwise (a fresh layer, stale or non-finite
    statistics) a third read -- run only then (``lax.cond``), beside the second -- measures the
    exact residual ``mean(x - mean)``, whatever the shift's accumulation error was. For XLA:CPU
    (:attr:`Strategy.running_mean_shift`): an XLA:GPU conditional reads its predicate on the host.
    """
    shift = finite_shift(hint.mean.astype(stats_dtype(x.dtype)))
    offset = mean_offset(sums, count, x, shift)
    mean, rounding = shifted_mean(shift, offset)

    def residual(x: jax.Array, mean: jax.Array) -> jax.Array:
        return mean_offset(sums, count, x, mean, site=Site.RESIDUAL)

    trusted = trusts_running_shift(hint, offset)
    mean_lo = lax.cond(trusted, lambda x, mean: rounding, residual, x, mean)
    return mean, deviations_m2(sums, count, x, mean, mean_lo), mean_lo


def shifted_mean(shift: jax.Array, offset: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(mean, mean_lo)`` of ``shift + offset``: the float sum and what it rounded away.

    Exact: ``mean`` is the float rounding of ``shift + offset``, so ``(shift - mean) + offset``
    loses nothing while the offset is small against the shift (a shift near the data keeps it
    so).
    """
    mean = shift + offset
    return mean, (shift - mean) + offset


def mean_offset(
    sums: ChannelSums, count: int | jax.Array, x: jax.Array, shift: jax.Array,
    site: Site = Site.MEAN,
) -> jax.Array:
    """``mean(x - shift)`` per channel, one read of ``x`` at reduction site ``site``: small
    numbers in the float32 accumulator whatever the offset of the data, for a shift near it."""
    dtype = shift.dtype
    inv_count = 1.0 / count if isinstance(count, int) and count else 1.0 / jnp.asarray(count, dtype)
    # A multiply: XLA:CPU fuses it into the consumer, where a divide would get its own kernel.
    return sums.sum(lambda x, s: x.astype(dtype) - s, (x,), (shift,), site=site) * inv_count


def deviations_m2(
    sums: ChannelSums, count: int | jax.Array, x: jax.Array, mean: jax.Array, mean_lo: jax.Array
) -> jax.Array:
    """``m2``: the squared deviations from the float ``mean`` (one read of ``x``, site ``M2``),
    corrected by ``mean_lo``, the rest of the exact mean (a second-order term)."""
    dtype = mean.dtype
    m2 = sums.sum(lambda x, m: jnp.square(x.astype(dtype) - m), (x,), (mean,), site=Site.M2)
    return jnp.maximum(m2 - count * jnp.square(mean_lo), 0)  # never negative by rounding


def two_pass(
    sums: ChannelSums, count: int | jax.Array, x: jax.Array, shift: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``(mean - shift, m2)`` in two reads of ``x``: the shifted sum, then the squared
    deviations from the (rounded) mean, corrected by the mean's rounding residual."""
    offset = mean_offset(sums, count, x, shift)
    mean, mean_lo = shifted_mean(shift, offset)
    return offset, deviations_m2(sums, count, x, mean, mean_lo)


@partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def one_read(
    interpret: bool, sums: ChannelSums, count: int | jax.Array, x: jax.Array, shift: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """:func:`two_pass`'s ``(mean - shift, m2)`` from one read of ``x`` (the
    :mod:`~jaxbn.functional.gpu_moments` kernel; ``interpret`` runs it in Pallas' interpreter, on
    any backend), merged across programs and devices with Chan's formula. Differentiates as
    :func:`two_pass` (the kernel has no derivative of its own)."""
    lay = sums.layout
    rows = math.prod(lay.shape[:-1])
    partial_sums, m2s, per_program = gpu_moments.partial_moments(
        x.reshape(rows, lay.num_features), shift, interpret=interpret
    )
    offset = jnp.sum(partial_sums, axis=0) / rows
    deviations = partial_sums / per_program - offset
    m2 = jnp.sum(m2s, axis=0) + per_program * jnp.sum(jnp.square(deviations), axis=0)
    if lay.axis_name is not None:  # every device holds `rows` rows: merge (rows, offset, m2)
        local = offset
        offset = psum(rows * local, lay.axis_name, lay.axis_index_groups) / count
        m2 = psum(m2 + rows * jnp.square(local - offset), lay.axis_name, lay.axis_index_groups)
    return offset, m2


@one_read.defjvp
def _one_read_jvp(interpret: bool, sums: ChannelSums, count: int | jax.Array, primals: tuple,
                  tangents: tuple) -> tuple:
    return one_read(interpret, sums, count, *primals), jax.jvp(
        partial(two_pass, sums, count), primals, tangents
    )[1]


def psum(value: Any, axis_name: Any, axis_index_groups: Any = None) -> Any:
    """``jax.lax.psum`` over ``axis_name`` (``value`` unchanged when ``axis_name`` is None).

    Says why ``axis_index_groups`` fails outside ``pmap``: JAX implements index groups for
    ``pmap`` only; ``shard_map`` raises a bare ``NotImplementedError`` and ``vmap`` a terse one.
    """
    if axis_name is None:
        return value
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
    strategy: Strategy | None = None,
) -> Moments:
    """Per-channel moments of the (global, unmasked part of the) batch.

    Args:
      x: floating input of any rank >= 2.
      feature_axis: the non-negative channel axis; every other axis is reduced.
      mask: optional bool ``(N,)`` over axis 0; False rows are excluded.
      axis_name: optional named axis (or tuple of names) to merge statistics across devices:
        the result equals the moments of the concatenated batch of every device.
      axis_index_groups: optional device groups for the merge (as in ``jax.lax.psum``).
      strategy: how to compute them (:class:`~jaxbn.functional.strategy.Strategy`; ``None``:
        the default for JAX's default backend). Only the one-read kernel applies here.

    Returns:
      ``Moments`` in ``stats_dtype(x.dtype)``; ``count`` is a Python int when neither a mask nor
      an axis name makes it data-dependent. An empty batch gives a NaN mean.
    """
    layout = Layout.of(x, feature_axis, axis_name, axis_index_groups)
    return moments(x, ChannelSums(layout, mask), resolve_strategy(strategy))
