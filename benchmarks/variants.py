"""Formulation experiment behind docs/performance.md: how should the statistics be reduced?

Times jaxbn's jitted train step (see run.py) with the batch statistics computed several ways, by
swapping ``jaxbn.functional.kernel.moments`` (the library keeps only the first; every variant
takes its arguments ``(x, sums, strategy, shift_hint)``), and measures each one's float32
accuracy against float64 on hard data (``--accuracy``):

* ``two-pass, views``   -- the library: shifted sum, then squared deviations from the mean, each
  reduction reading ``x`` through its own view (distinct broadcasts for XLA:CPU);
* ``two-pass, natural`` -- the same math on the input's own shape (broadcasts shared);
* ``one-pass shifted``  -- ``sum(x - s)`` and ``sum((x - s)**2)`` as sibling reductions (one read
  if the compiler fuses siblings, as XLA:GPU does), ``m2 = S2 - S1**2 / n``, ``s`` the first
  element of each channel;
* ``one-pass, views, row shift`` -- the same with views and ``s`` the mean of the first row;
* ``one-pass, per-row shifts`` -- sibling sums per (row, channel) about that row's first element,
  merged exactly over the rows (Chan): one read where siblings fuse, robust to a far shift in
  one row only;
* ``one-read kernel`` -- the library's opt-in CUDA kernel (:mod:`jaxbn.functional.gpu_moments`,
  ``Strategy(one_read="cuda")``): a Pallas kernel, two-pass inside register tiles merged with
  Chan's formula. Off a GPU this column runs the same kernel in Pallas' interpreter (for
  ``--accuracy``; its speed means nothing there).

``two-pass, views`` is the library as it runs by default (the backend's default strategy).

``--statistics`` times the forward statistics alone (GPU shapes of benchmarks/step.py's ResNet-18,
float32 and bfloat16): the XLA two-pass, the one-read kernel under a few tilings, flax's one-pass
sibling sums and one plain read of ``x`` -- each a chain of K calls in one program (the shift of
call k+1 depends on call k), so a GPU runs them back to back without Python in between.

Run: ``python benchmarks/variants.py [--gpu] [--accuracy | --statistics]``.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import run as bench  # noqa: E402


def natural_two_pass(x, sums, strategy=None, shift_hint=None):
    return two_pass(x, sums, sites=(None, None))


def library_two_pass(x, sums, strategy, shift_hint=None):
    """The library as the call's strategy says, with its GPU kernel off (the default)."""
    from jaxbn.functional import reductions

    return reductions.moments(x, sums, strategy.replace(one_read="off"), shift_hint)


def one_read_kernel(x, sums, strategy, shift_hint=None):
    """The library with its GPU kernel on; interpreted where the backend is not a GPU."""
    import jax

    from jaxbn.functional import reductions

    mode = "cuda" if jax.default_backend() == "gpu" else "interpreted"
    return reductions.moments(x, sums, strategy.replace(one_read=mode), shift_hint)


def two_pass(x, sums, sites):
    import jax.numpy as jnp

    from jaxbn.functional.reductions import Moments, shifted_mean, stats_dtype

    dtype = stats_dtype(x.dtype)
    count, shift = sums.count(dtype), sums.shift(x, dtype)
    offset = sums.sum(lambda x, s: x.astype(dtype) - s, (x,), (shift,), site=sites[0]) / count
    mean, mean_lo = shifted_mean(shift, offset)
    m2 = sums.sum(lambda x, m: jnp.square(x.astype(dtype) - m), (x,), (mean,), site=sites[1])
    return Moments(count, mean, m2 - count * jnp.square(mean_lo), mean_lo)


def row_shift(x, sums, dtype):
    """The mean of the first row (everything but the channels of ``x[0]``): no mask, no axis_name."""
    import jax.numpy as jnp

    lay = sums.layout
    axes = tuple(a for a in range(x.ndim - 1) if a != lay.feature_axis - 1)
    return jnp.mean(x[0].astype(dtype), axis=axes)


def one_pass_views(x, sums, strategy=None, shift_hint=None):
    """Sibling shifted sums, each through its own view, shift = mean of the first row."""
    import jax.numpy as jnp

    from jaxbn.functional.reductions import Moments, Site, shifted_mean, stats_dtype

    dtype = stats_dtype(x.dtype)
    count, shift = sums.count(dtype), row_shift(x, sums, dtype)
    s1 = sums.sum(lambda x, s: x.astype(dtype) - s, (x,), (shift,), site=Site.MEAN)
    s2 = sums.sum(lambda x, s: jnp.square(x.astype(dtype) - s), (x,), (shift,), site=Site.M2)
    offset = s1 / count
    mean, mean_lo = shifted_mean(shift, offset)
    return Moments(count, mean, jnp.maximum(s2 - s1 * offset, 0), mean_lo)


def one_pass_row_shifts(x, sums, strategy=None, shift_hint=None):
    """One read with a shift per (row, channel): the first element of each row's channel.

    Sibling sums ``S1[n, c] = sum(x - s[n, c])``, ``S2[n, c] = sum((x - s[n, c])**2)`` over the
    axes between and after (the blocks' M and P), then an exact Chan merge of the rows' moments:
    ``m2 = sum_n (S2 - S1**2 / k) + k * sum_n (t_n - offset)**2`` with ``t_n`` each row's mean
    relative to row 0's shift. No mask, no axis_name (an experiment).
    """
    import jax.numpy as jnp

    from jaxbn.functional.reductions import Moments, stats_dtype

    dtype = stats_dtype(x.dtype)
    lay = sums.layout
    blocks = lay.blocks
    xb = x.reshape(blocks).astype(dtype)
    first = (slice(None), 0, slice(None)) + ((0,) if len(blocks) == 4 else ())
    shift = xb[first]  # (N, C): plain data elements
    s_b = shift[:, None, :, None] if len(blocks) == 4 else shift[:, None, :]
    axes = (1, 3) if len(blocks) == 4 else (1,)
    d = xb - s_b
    s1 = jnp.sum(d, axis=axes)
    s2 = jnp.sum(d * d, axis=axes)
    k = x.size // (blocks[0] * blocks[2])
    count = blocks[0] * k
    ds = shift - shift[0]
    t = ds + s1 / k  # each row's mean minus row 0's shift
    offset = jnp.sum(s1 + k * ds, axis=0) / count
    mean = shift[0] + offset
    m2 = jnp.sum(s2 - s1 * (s1 / k), axis=0) + k * jnp.sum(jnp.square(t - offset), axis=0)
    return Moments(count, mean, jnp.maximum(m2, 0), (shift[0] - mean) + offset)


def one_pass_shifted(x, sums, strategy=None, shift_hint=None):
    import jax.numpy as jnp

    from jaxbn.functional.reductions import Moments, shifted_mean, stats_dtype

    dtype = stats_dtype(x.dtype)
    count, shift = sums.count(dtype), sums.shift(x, dtype)
    s1 = sums.sum(lambda x, s: x.astype(dtype) - s, (x,), (shift,))
    s2 = sums.sum(lambda x, s: jnp.square(x.astype(dtype) - s), (x,), (shift,))
    offset = s1 / count
    mean, mean_lo = shifted_mean(shift, offset)
    return Moments(count, mean, s2 - s1 * offset, mean_lo)


def accuracy_cases(rng):
    """(name, float32 input, feature axis): large means, and shifts far from the data."""
    normal = rng.standard_normal
    yield "mean 1e4, NHWC", 1e4 + normal((32, 28, 28, 64)), -1
    yield "mean 1e5, NHWC", 1e5 + normal((32, 28, 28, 64)), -1
    yield "mean 1e4, NCHW", 1e4 + normal((32, 64, 28, 28)), 1
    yield "mean 1e4, 256×1024", 1e4 + normal((256, 1024)), 1
    a = 1e4 + normal((32, 28, 28, 64))
    a[:, 0, 0, :] += 30
    yield "mean 1e4, each image's first pixel +30σ, NHWC", a, -1
    a = 1e4 + normal((32, 28, 28, 64))
    a[:16] += 100
    yield "mean 1e4, half the images +100σ, NHWC", a, -1
    a = normal((32, 28, 28, 64))
    a[0] += 1e3
    yield "first image +1e3σ, NHWC", a, -1
    a = 1e4 + normal((256, 1024))
    a[0] += 30
    yield "mean 1e4, first row +30σ, 256×1024", a, 1


def accuracy(variants: dict) -> None:
    """Max |y - y_float64| and max relative error of the unbiased variance, per variant."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxbn
    import jaxbn.functional.kernel

    library = jaxbn.functional.kernel.moments
    print("max abs error of y | max relative error of the variance (float32 vs float64)")
    print("| data | " + " | ".join(variants) + " |")
    print("|---|" + "---:|" * len(variants))
    for name, x64, axis in accuracy_cases(np.random.default_rng(0)):
        x = x64.astype(np.float32)
        x64 = x.astype(np.float64)
        axes = tuple(a for a in range(x.ndim) if a != axis % x.ndim)
        mean, var = x64.mean(axes, keepdims=True), x64.var(axes, keepdims=True)
        y_ref = (x64 - mean) / np.sqrt(var + 1e-5)
        cells = []
        for impl in variants.values():
            jaxbn.functional.kernel.moments = impl
            flags = jaxbn.BatchNormFlags(axis=axis, momentum=1.0)
            layer = jax.jit(lambda x, f=flags: jaxbn.batch_norm(x, jaxbn.init_state(x.shape[axis]), None, f))
            y, state = layer(jnp.asarray(x))
            y_err = np.abs(np.asarray(y, np.float64) - y_ref).max()
            v_err = np.abs(np.asarray(state.running_var, np.float64) / x64.var(axes, ddof=1) - 1).max()
            cells.append(f"{y_err:.1e} / {v_err:.1e}")
        jaxbn.functional.kernel.moments = library
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


STEP_SHAPES = [  # benchmarks/step.py's batch norms on the GPU: batch 128, 128x128 images
    (128, 64, 64, 64), (128, 32, 32, 64), (128, 16, 16, 128), (128, 8, 8, 256), (128, 4, 4, 512),
    (256, 1024),
]
KERNEL_TILINGS = {  # settings of jaxbn.functional.gpu_moments (the library's: none changed)
    "kernel": {},
    "kernel 2048/4": {"_TILE_ELEMENTS": 2048},
    "kernel 8192/8": {"_TILE_ELEMENTS": 8192, "_NUM_WARPS": 8},
    "kernel 4096/4, 256 programs": {"_TARGET_PROGRAMS": 256},
    "kernel 4096/8, 4096 programs": {"_NUM_WARPS": 8, "_TARGET_PROGRAMS": 4096},
}


def statistics_table(rounds: int) -> None:
    """Time the statistics alone (see the module docstring); print a markdown table (µs)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxbn.functional import gpu_moments, reductions

    def chain(stat, shape):
        def run(xs):
            lay = reductions.Layout(shape, len(shape) - 1)
            sums = reductions.ChannelSums(lay)
            count = sums.count(jnp.float32)
            carry = jnp.zeros((shape[-1],), jnp.float32)
            for x in xs:
                shift = x[(0,) * (len(shape) - 1)].astype(jnp.float32) + 0 * carry
                a, b = stat(sums, count, x, shift)
                carry = a + b
            return carry
        return run

    def one_pass(sums, count, x, shift):  # flax's fused E[x], E[x^2] (shifted)
        d = x.astype(jnp.float32) - shift
        axes = tuple(range(x.ndim - 1))
        return jnp.sum(d, axes), jnp.sum(d * d, axes)

    def read(sums, count, x, shift):
        return jnp.sum(x.astype(jnp.float32) - shift, tuple(range(x.ndim - 1))), 0.0

    defaults = {k: getattr(gpu_moments, k) for tiling in KERNEL_TILINGS.values() for k in tiling}
    names = ["two-pass (XLA)", *KERNEL_TILINGS, "one-pass siblings (flax)", "one read (floor)"]
    print("statistics alone, µs per call (chains of K calls)")
    print("| dtype | shape | MB | K | " + " | ".join(names) + " |")
    print("|---|---|---:|---:|" + "---:|" * len(names))
    rng = np.random.default_rng(0)
    for dtype in (jnp.float32, jnp.bfloat16):
        for shape in STEP_SHAPES:
            size = int(np.prod(shape)) * jnp.dtype(dtype).itemsize
            k = int(max(4, min(16, 2**30 // size)))
            xs = tuple(jnp.asarray(rng.standard_normal(shape, np.float32) + 3, dtype)
                       for _ in range(k))
            fns = {}
            for name in names:
                if name == "two-pass (XLA)":
                    stat = reductions.two_pass
                elif name.startswith("kernel"):
                    for key, value in {**defaults, **KERNEL_TILINGS[name]}.items():
                        setattr(gpu_moments, key, value)
                    applies = gpu_moments.applies(shape, len(shape) - 1, dtype, False, False)
                    if jax.default_backend() != "gpu" or not applies:
                        continue  # (off a GPU the kernel only runs interpreted)
                    stat = functools.partial(reductions.one_read, False)
                else:
                    stat = one_pass if name.startswith("one-pass") else read
                compiled = jax.jit(chain(stat, shape)).lower(xs).compile()
                fns[name] = lambda c=compiled: c(xs)
            for key, value in defaults.items():
                setattr(gpu_moments, key, value)
            t = bench.time_interleaved(fns, {n: bench.jax_sync for n in fns}, rounds)
            cells = [f"{t[n] * 1e3 / k:.1f}" if n in t else "—" for n in names]
            print(f"| {jnp.dtype(dtype).name} | {'×'.join(map(str, shape))} | {size / 1e6:.1f} | "
                  f"{k} | " + " | ".join(cells) + " |", flush=True)
        del xs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--accuracy", action="store_true", help="the accuracy table instead")
    parser.add_argument("--statistics", action="store_true",
                        help="time the statistics alone instead (meant for a GPU)")
    args = parser.parse_args()
    if not args.gpu:
        bench.prepare_cpu_process()
    import jax

    import jaxbn.functional.kernel

    library = jaxbn.functional.kernel.moments
    variants = {
        "two-pass, views": library_two_pass,
        "one-read kernel": one_read_kernel,
        "two-pass, natural": natural_two_pass,
        "one-pass shifted": one_pass_shifted,
        "one-pass, views, row shift": one_pass_views,
        "one-pass, per-row shifts": one_pass_row_shifts,
    }
    if args.accuracy:
        return accuracy(variants)
    if args.statistics:
        return statistics_table(args.rounds)
    cases = [bench.FULL[0], bench.FULL[1], bench.FULL[5]] + (bench.GPU_EXTRA if args.gpu else [])
    device = "cuda" if args.gpu else "cpu"
    print(f"devices: {jax.devices()}")
    print("| shape | layout | " + " | ".join(variants) + " | floor |")
    print("|---|---|" + "---:|" * (len(variants) + 1))
    for case in cases:
        cont = bench.Contenders(case, device)
        fns = {}
        for name, impl in variants.items():
            jaxbn.functional.kernel.moments = impl
            fn, a = cont.jaxbn_train_fn()
            compiled = jax.jit(fn).lower(*a).compile()
            fns[name] = lambda c=compiled, a=a: c(*a)
        jaxbn.functional.kernel.moments = library
        floor, fa = cont.floor_train_fn()
        floor = jax.jit(floor)
        fns["floor"] = lambda: floor(*fa)
        t = bench.time_interleaved(fns, {k: bench.jax_sync for k in fns}, args.rounds)
        print(f"| {'×'.join(map(str, case.shape))} | {case.layout} | "
              + " | ".join(f"{t[k]:.3f}" for k in fns) + " |", flush=True)


if __name__ == "__main__":
    main()
