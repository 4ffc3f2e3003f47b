"""One read of the input for the forward statistics on GPU: a Pallas (Triton) kernel.

:func:`jaxbn.functional.reductions.moments` reads ``x`` twice (the shifted sum, then the squared
deviations from the mean) because that is what keeps float32 statistics accurate and XLA cannot
fuse a reduction into one that depends on it. On a GPU the second read is the one pass batch norm
takes beyond flax's fused ``E[x], E[x^2]``. This kernel reads ``x`` once and stays two-pass
accurate: each program walks its rows in register tiles, takes each tile's mean *and* the squared
deviations from it while the tile is in registers (an exact two-pass inside the tile), and merges
the tiles with Chan's formula; XLA then merges the programs' partial moments (small ``(P, C)``
arrays) the same way.

Everything is in ``shift``-relative units (``x - shift``, the same data element per channel the
XLA path subtracts), so the mean keeps its rounding residual ``mean_lo`` exactly as
:func:`~jaxbn.functional.reductions.moments` defines it.

**Opt-in** (:attr:`jaxbn.functional.strategy.Strategy.one_read`). It saves a read of every
norm's input on a GPU, and costs what a Pallas Triton kernel costs: ``jax.export`` refuses to
serialize its custom call (no compatibility guarantee) and cannot lower it for several platforms
at once; each distinct shape adds a Triton compile; and JAX 0.11 deprecates Pallas' Triton
backend (Mosaic GPU replaces it) and warns each time such a kernel is lowered -- jaxbn filters
that one message once it uses the kernel (:func:`_filter_triton_deprecation`). When JAX drops
the backend, :func:`triton_usable` turns the kernel off.

Where the strategy turns it on, it is used only where it applies (:func:`applies`): channels
last (``(rows, C)`` after a free reshape: NHWC, NDHWC, ``(N, C)``), no ``mask``, no explicit
sharding, 16- or 32-bit floats, and row and channel counts the tiles divide, on a JAX whose
Pallas has its Triton backend and CUDA GPUs of compute capability 8.0 or later
(:func:`triton_usable`). Everything else, and every non-CUDA backend
(``lax.platform_dependent``), keeps the XLA path.
"""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
from jax import lax

try:
    from jax.experimental import pallas as pl
except ImportError:  # a JAX without Pallas: the XLA path everywhere
    pl = None

_TILE_ELEMENTS = 4096  # elements of one register tile (rows x channel block)
_TARGET_PROGRAMS = 1024  # enough programs to fill every SM of an H100/H200 a few times
_NUM_WARPS = 4


def channel_block(num_features: int) -> int:
    """Channels per program: the largest of 64, 32, 16, 8 dividing ``num_features`` (0: none)."""
    return next((b for b in (64, 32, 16, 8) if num_features % b == 0), 0)


def tiling(rows: int, num_features: int) -> tuple[int, int, int] | None:
    """``(tile_rows, tiles_per_program, channel_block)`` for a ``(rows, C)`` input, or None when
    no tiling with power-of-two tiles of at least 16 rows divides it."""
    block = channel_block(num_features)
    if not block or rows <= 0:
        return None
    tile_rows = _TILE_ELEMENTS // block
    while tile_rows >= 16 and rows % tile_rows:
        tile_rows //= 2
    if tile_rows < 16:
        return None
    tiles = rows // tile_rows
    column_programs = num_features // block
    per_program = 1
    while (
        tiles % (2 * per_program) == 0
        and (tiles // (2 * per_program)) * column_programs >= _TARGET_PROGRAMS
    ):
        per_program *= 2
    return tile_rows, per_program, block


#: What JAX 0.11 says when it lowers any Pallas Triton kernel (the backend is deprecated in
#: favour of Mosaic GPU, which needs Hopper-only instructions).
TRITON_DEPRECATION = (r"The Pallas Triton backend is deprecated and will be removed in"
                      r" a future JAX version")


@functools.cache
def triton_usable() -> bool:
    """Whether this JAX can build the kernel and every CUDA GPU in the process can run it:
    Pallas' Triton backend is importable, and no GPU has compute capability below 8.0 (Triton's
    floor). With no GPU in the process, the kernel is only ever lowered (for ``cuda``)."""
    if pl is None:
        return False
    try:
        from jax.experimental.pallas import triton as plgpu

        plgpu.CompilerParams  # noqa: B018
    except (ImportError, AttributeError):
        return False
    try:
        gpus = jax.devices("cuda")
    except RuntimeError:  # no CUDA backend in this process
        return True
    for device in gpus:
        try:
            if float(device.compute_capability) < 8.0:
                return False
        except (AttributeError, TypeError, ValueError):
            return False
    return True


@functools.cache
def _filter_triton_deprecation() -> None:
    """Ignore :data:`TRITON_DEPRECATION` -- only that message, only as a DeprecationWarning --
    once the kernel is first traced. JAX warns when it *lowers* the kernel, when the jit around
    the whole step compiles, with no jaxbn frame on the stack, so a filter around the call
    cannot see it; this one lasts for the process (a process that never traces the kernel never
    installs it). Under ``pytest -W error`` pytest's own filters come first: add this message
    to ``filterwarnings`` there."""
    warnings.filterwarnings("ignore", message=TRITON_DEPRECATION, category=DeprecationWarning)


def applies(shape: tuple[int, ...], feature_axis: int, dtype: jnp.dtype, masked: bool,
            sharded: bool, interpret: bool = False) -> bool:
    """Whether the kernel can compute these statistics (see the module docstring); ``interpret``:
    in Pallas' interpreter, which needs no Triton."""
    if masked or sharded or feature_axis != len(shape) - 1:
        return False
    if not interpret and not triton_usable():
        return False
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16),
                                jnp.dtype(jnp.float16)):
        return False
    return tiling(math.prod(shape[:-1]), shape[-1]) is not None


def _kernel(x_ref, shift_ref, sum_ref, m2_ref, *, tile_rows: int, tiles: int):
    """One program: rows ``tiles * tile_rows`` of one channel block -> their ``(sum, m2)``."""
    shift = shift_ref[...]  # (1, block)

    def tile_moments(k):
        t = x_ref[pl.ds(k * tile_rows, tile_rows), :].astype(jnp.float32) - shift
        total = jnp.sum(t, axis=0, keepdims=True)
        return total, jnp.sum(jnp.square(t - total / tile_rows), axis=0, keepdims=True)

    def merge(k, carry):  # Chan et al.: tile k joins the k tiles before it
        sum_a, lost_a, m2_a = carry
        sum_b, m2_b = tile_moments(k)
        rows_a = (k * tile_rows).astype(jnp.float32)
        delta = sum_b / tile_rows - sum_a / rows_a
        m2 = m2_a + m2_b + jnp.square(delta) * (rows_a * tile_rows / (rows_a + tile_rows))
        # Kahan: keep what adding sum_b to the running sum rounds away, so the sum's error stays
        # that of one addition however many tiles a program merges.
        addend = sum_b - lost_a
        total = sum_a + addend
        return total, (total - sum_a) - addend, m2

    first_sum, first_m2 = tile_moments(0)
    total, lost, m2 = lax.fori_loop(1, tiles, merge, (first_sum, jnp.zeros_like(first_sum),
                                                      first_m2))
    total = total - lost
    sum_ref[...] = total
    m2_ref[...] = m2


def partial_moments(
    x2d: jax.Array, shift: jax.Array, *, interpret: bool = False
) -> tuple[jax.Array, jax.Array, int]:
    """Per-program moments of ``x2d - shift`` (``(rows, C)``, ``shift`` ``(C,)`` float32).

    Returns ``(sums, m2s, rows_per_program)``: ``(P, C)`` float32 arrays, each row the sum and
    the sum of squared deviations from their mean of ``rows_per_program`` consecutive rows.
    ``interpret`` runs the kernel in Pallas' interpreter (any backend; the tests on CPU).
    """
    rows, num_features = x2d.shape
    tile_rows, tiles, block = tiling(rows, num_features)
    per_program = tile_rows * tiles
    grid = (rows // per_program, num_features // block)
    out = jax.ShapeDtypeStruct((grid[0], num_features), jnp.float32)
    compiler_params = None
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        _filter_triton_deprecation()
        compiler_params = plgpu.CompilerParams(num_warps=_NUM_WARPS, num_stages=2)
    sums, m2s = pl.pallas_call(
        functools.partial(_kernel, tile_rows=tile_rows, tiles=tiles),
        grid=grid,
        in_specs=[
            pl.BlockSpec((per_program, block), lambda i, j: (i, j)),
            pl.BlockSpec((1, block), lambda i, j: (0, j)),
        ],
        out_specs=[pl.BlockSpec((1, block), lambda i, j: (i, j))] * 2,
        out_shape=[out, out],
        compiler_params=compiler_params,
        interpret=interpret,
        name="jaxbn_channel_moments",
    )(x2d, shift.reshape(1, num_features))
    return sums, m2s, per_program
