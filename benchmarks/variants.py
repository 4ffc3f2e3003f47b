"""Formulation experiment behind benchmarks/NOTES.md: how should the statistics be reduced?

Times jaxbn's jitted train step (see run.py) with the batch statistics computed three ways, by
swapping ``jaxbn.functional.kernel.moments`` (the library keeps only the first):

* ``two-pass, views``   -- the library: shifted sum, then squared deviations from the mean, each
  reduction reading ``x`` through its own view (distinct broadcasts for XLA:CPU);
* ``two-pass, natural`` -- the same math on the input's own shape (broadcasts shared);
* ``one-pass shifted``  -- ``sum(x - s)`` and ``sum((x - s)**2)`` as sibling reductions (one read
  if the compiler fuses siblings, as XLA:GPU does), ``m2 = S2 - S1**2 / n``.

Run: ``python benchmarks/variants.py [--gpu]``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import run as bench  # noqa: E402


def natural_two_pass(x, sums):
    return two_pass(x, sums, sites=(None, None))


def two_pass(x, sums, sites):
    import jax.numpy as jnp

    from jaxbn.functional.reductions import Moments, stats_dtype

    dtype = stats_dtype(x.dtype)
    count, shift = sums.count(dtype), sums.shift(x, dtype)
    offset = sums.sum(lambda x, s: x.astype(dtype) - s, (x,), (shift,), site=sites[0]) / count
    mean = shift + offset
    mean_lo = (shift - mean) + offset
    m2 = sums.sum(lambda x, m: jnp.square(x.astype(dtype) - m), (x,), (mean,), site=sites[1])
    return Moments(count, mean, m2 - count * jnp.square(mean_lo), mean_lo)


def one_pass_shifted(x, sums):
    import jax.numpy as jnp

    from jaxbn.functional.reductions import Moments, stats_dtype

    dtype = stats_dtype(x.dtype)
    count, shift = sums.count(dtype), sums.shift(x, dtype)
    s1 = sums.sum(lambda x, s: x.astype(dtype) - s, (x,), (shift,))
    s2 = sums.sum(lambda x, s: jnp.square(x.astype(dtype) - s), (x,), (shift,))
    offset = s1 / count
    mean = shift + offset
    return Moments(count, mean, s2 - s1 * offset, (shift - mean) + offset)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    if not args.gpu and os.environ.get("JAXBN_BENCH_MALLOC") != "1":
        env = dict(os.environ, JAXBN_BENCH_MALLOC="1", JAX_PLATFORMS="cpu", **bench.MALLOC_TUNABLES)
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    import jax

    import jaxbn.functional.kernel

    library = jaxbn.functional.kernel.moments
    variants = {
        "two-pass, views": library,
        "two-pass, natural": natural_two_pass,
        "one-pass shifted": one_pass_shifted,
    }
    cases = [bench.FULL[1], bench.FULL[5]] + (bench.GPU_EXTRA if args.gpu else [])
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
