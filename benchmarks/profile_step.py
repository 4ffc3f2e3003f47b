"""Where the whole training step's time goes, kernel by kernel: a profiler trace of step.py's steps.

Run from the repository root::

    python benchmarks/profile_step.py --gpu                 # CUDA: batch 128, 128x128, both dtypes
    python benchmarks/profile_step.py --gpu --events ev.csv.gz  # also keep every device event

``step.py`` says how long each step takes; this says why. Each contender's compiled step (the
same ResNet-18 and data as ``step.py``) runs ``--steps`` times back to back inside
``jax.profiler.trace``, without waiting between steps, so the device's timeline is one stretch.
From the trace's device events (on a GPU: the kernels and copies on its streams) it reports per
step:

* ``kernels``: events on the device;
* ``busy``: the time at least one of them runs (the union of their intervals);
* ``span``: first start to last end, divided by the steps, so ``idle = span - busy`` is the time
  the device waits between kernels (launches, dependencies, host work);
* how many kernels, and how much busy time, fall in each duration bin (under 5 µs, 5-20 µs,
  20-100 µs, 100 µs and over);

and, for every normed contender, the same differences to ``no norm`` divided by the network's
norm count: what one norm adds. That answers what the H200's step left open: whether
jaxbn's extra kernels per norm cost launch gaps (``idle``) or kernel time (``busy``).

On the CPU the events are XLA:CPU's thunks as its executor records them (two threads run them
at once, and an asynchronous reduction's event may end before its work does); the script runs
there so that it can be tested, and the numbers that matter are the GPU's. The profiler adds a
little to every kernel, so compare contenders within one run only.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gzip
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import run as bench  # noqa: E402
import step  # noqa: E402

BINS_US = (5.0, 20.0, 100.0)  # kernel duration bins: < 5, 5-20, 20-100, >= 100 µs
BIN_NAMES = ("< 5 µs", "5–20 µs", "20–100 µs", "≥ 100 µs")
# A GPU's kernels and copies are on its stream lines ("Stream #13(...)"); without such lines,
# every line but those the profiler derives from the kernels (they would count them twice).
STREAM_LINE = re.compile(r"^Stream\b")
DERIVED_LINES = re.compile(r"XLA Ops|XLA Modules|Steps|Framework|TensorFlow|Launch Stats|Source"
                           r"|Host Offload|_counters_|Sparse Core")


class Event(NamedTuple):
    """One kernel (or copy) on the device: where it ran, what it was, when (µs)."""

    line: str
    name: str
    op: str
    start: float
    duration: float


class Summary(NamedTuple):
    """A trace's device events per step (times in ms)."""

    kernels: float
    busy: float
    span: float
    bin_kernels: tuple[float, ...]
    bin_busy: tuple[float, ...]

    @property
    def idle(self) -> float:
        return self.span - self.busy


def device_events(trace: dict) -> list[Event]:
    """The device's events in a trace's JSON (the ``*.trace.json.gz`` of ``jax.profiler.trace``).

    A GPU's are those on the stream lines of the ``/device:GPU:*`` processes. Without a GPU
    process, the host's XLA thunks (events naming an ``hlo_op``) stand in."""
    processes, lines = {}, {}
    for e in trace["traceEvents"]:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            processes[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            lines[e["pid"], e.get("tid")] = e["args"]["name"]
    gpus = {pid for pid, name in processes.items() if name.startswith("/device:GPU")}
    gpu_lines = {name for (pid, _), name in lines.items() if pid in gpus}
    if any(STREAM_LINE.search(name) for name in gpu_lines):
        kept = {name for name in gpu_lines if STREAM_LINE.search(name)}
    else:
        kept = {name for name in gpu_lines if not DERIVED_LINES.search(name)}
    events = []
    for e in trace["traceEvents"]:
        if e.get("ph") != "X":
            continue
        line = lines.get((e["pid"], e.get("tid")), str(e.get("tid")))
        args = e.get("args", {})
        if gpus:
            if e["pid"] not in gpus or line not in kept:
                continue
        elif "hlo_op" not in args or e["name"].startswith("end: "):
            continue
        events.append(Event(line, e["name"], str(args.get("hlo_op", "")), float(e["ts"]),
                            float(e.get("dur", 0.0))))
    return sorted(events, key=lambda e: e.start)


def busy_time(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of ``(start, duration)`` intervals."""
    total, end = 0.0, -np.inf
    for start, duration in sorted(intervals):
        stop = start + duration
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def summarize(events: Sequence[Event], steps: int) -> Summary:
    """Per-step counts and times (ms) of ``events``, traced over ``steps`` steps."""
    if not events:
        raise ValueError("the trace holds no device events: was the profiler able to see the "
                         "device (on a GPU it needs CUPTI)?")
    bins = np.searchsorted(BINS_US, [e.duration for e in events], side="right")
    per_bin = [[e for e, b in zip(events, bins) if b == i] for i in range(len(BINS_US) + 1)]
    span = max(e.start + e.duration for e in events) - min(e.start for e in events)
    ms = 1e-3 / steps
    return Summary(
        kernels=len(events) / steps,
        busy=busy_time((e.start, e.duration) for e in events) * ms,
        span=span * ms,
        bin_kernels=tuple(len(b) / steps for b in per_bin),
        bin_busy=tuple(busy_time((e.start, e.duration) for e in b) * ms for b in per_bin),
    )


def trace_steps(run: Callable[[], Any], steps: int, directory: Path) -> dict:
    """The trace (its ``*.trace.json.gz``) of ``steps`` calls of ``run`` back to back (one wait,
    at the end)."""
    import jax

    with jax.profiler.trace(str(directory)):
        out = None
        for _ in range(steps):
            out = run()
        jax.block_until_ready(out)
    (path,) = directory.rglob("*.trace.json.gz")
    with gzip.open(path) as f:
        return json.load(f)


def norm_count() -> int:
    """How many norms step.py's ResNet-18 has (its batch-statistics collections)."""
    import jax
    import jax.numpy as jnp

    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    shapes = jax.eval_shape(lambda x: step.resnet18("flax", jnp.float32).init(
        jax.random.key(0), x, train=False), x)
    return len(jax.tree.leaves(shapes["batch_stats"])) // 2  # a mean and a var each


def render(rows: Sequence[tuple[str, str, Summary]], norms: int, steps: int, device: str) -> str:
    """The per-step table, then what one norm adds to ``no norm``."""
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"Measured {date} on {bench.machine_description(device)}.",
        f"{steps} steps of each contender back to back in `jax.profiler.trace`; device events per "
        f"step (ms unless stated); idle = span - busy. Reproduce: "
        f"`python benchmarks/profile_step.py{' --gpu' if device == 'cuda' else ''}`.",
        "",
        "| dtype | contender | kernels | busy | span | idle | "
        + " | ".join(f"kernels {b} (busy)" for b in BIN_NAMES) + " |",
        "|---|---|" + "---:|" * (4 + len(BIN_NAMES)),
    ]
    for dtype, name, s in rows:
        lines.append(
            f"| {dtype} | {name} | {s.kernels:.0f} | {s.busy:.2f} | {s.span:.2f} | {s.idle:.2f} | "
            + " | ".join(f"{k:.0f} ({b:.2f})" for k, b in zip(s.bin_kernels, s.bin_busy)) + " |")
    lines += [
        "",
        f"What one norm adds: (contender - no norm) / {norms} norms; kernels, and µs per step.",
        "",
        "| dtype | contender | kernels | busy µs | idle µs | "
        + " | ".join(f"kernels {b}" for b in BIN_NAMES) + " |",
        "|---|---|" + "---:|" * (3 + len(BIN_NAMES)),
    ]
    bare = {dtype: s for dtype, name, s in rows if name == "no norm"}
    for dtype, name, s in rows:
        if name == "no norm" or dtype not in bare:
            continue
        b = bare[dtype]
        lines.append(
            f"| {dtype} | {name} | {(s.kernels - b.kernels) / norms:.1f} | "
            f"{(s.busy - b.busy) * 1e3 / norms:.1f} | {(s.idle - b.idle) * 1e3 / norms:.1f} | "
            + " | ".join(f"{(k - kb) / norms:.1f}" for k, kb in zip(s.bin_kernels, b.bin_kernels))
            + " |")
    return "\n".join(lines) + "\n"


def write_events(path: Path, traced: Sequence[tuple[str, str, Sequence[Event]]]) -> None:
    """Every device event as gzipped CSV (dtype, contender, and :class:`Event`'s fields)."""
    with gzip.open(path, "wt", newline="") as f:
        out = csv.writer(f)
        out.writerow(("dtype", "contender", *Event._fields))
        for dtype, name, events in traced:
            out.writerows((dtype, name, *e) for e in events)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="profile on the GPU")
    parser.add_argument("--steps", type=int, default=10, help="steps traced per contender")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--image", type=int, default=None, help="image height and width")
    parser.add_argument("--dtype", action="append", choices=("float32", "bfloat16"),
                        help="activation dtype (repeatable; default: float32 on CPU, both on GPU)")
    parser.add_argument("--contender", action="append", choices=step.GPU_NORMS,
                        help="repeatable; default: step.py's (no norm is always included)")
    parser.add_argument("--out", type=Path, default=None, help="also write the tables here")
    parser.add_argument("--events", type=Path, default=None,
                        help="also write every device event here (gzipped CSV)")
    args = parser.parse_args(argv)
    if args.gpu:
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")
    import jax
    import jax.numpy as jnp

    device = "cuda" if args.gpu else "cpu"
    batch, image, dtypes = step.run_size(args.gpu, args.batch, args.image, args.dtype)
    contenders = args.contender or list(step.GPU_NORMS if args.gpu else step.NORMS)
    contenders = ["no norm"] + [c for c in contenders if c != "no norm"]
    print(f"devices: {jax.devices()}", flush=True)
    images, labels = step.batch_data(batch, image)
    rows, traced = [], []
    for dtype in dtypes:
        for name in contenders:
            run = step.jax_step(name, jnp.dtype(dtype), images, labels)[0]
            for _ in range(3):  # warm up: the first calls allocate
                jax.block_until_ready(run())
            with tempfile.TemporaryDirectory() as d:
                events = device_events(trace_steps(run, args.steps, Path(d)))
            summary = summarize(events, args.steps)
            print(f"{dtype} {name}: {summary.kernels:.0f} kernels, busy {summary.busy:.2f} ms, "
                  f"span {summary.span:.2f} ms per step; lines "
                  f"{sorted({e.line for e in events})}", flush=True)
            rows.append((dtype, name, summary))
            traced.append((dtype, name, events))
    table = render(rows, norm_count(), args.steps, device)
    print(table)
    if args.out:
        args.out.write_text(table)
        print(f"wrote {args.out}")
    if args.events:
        write_events(args.events, traced)
        print(f"wrote {args.events}")


if __name__ == "__main__":
    main()
