"""Side-by-side benchmark: jaxbn vs flax.linen.BatchNorm vs torch, against bare-XLA floors.

Run from the repository root::

    python benchmarks/run.py                  # full run, prints the tables
    python benchmarks/run.py --quick          # three shapes, fewer rounds (about a minute)
    python benchmarks/run.py --write          # also writes benchmarks/results_cpu.md
    python benchmarks/run.py --write out.md   # ... or the file given
    python benchmarks/run.py --gpu --write    # on a CUDA machine: benchmarks/results_gpu.md

Nothing is written unless asked (``--write``): the results files are tracked.

What is timed (medians of rounds in which all contenders run interleaved in random order, in one
process, on the same arrays; the rounds come in blocks that sweep over all shapes, so transient
load on a shared machine does not skew one shape):

* **train**: one jitted forward + backward in training mode -- ``jax.vjp`` of the layer w.r.t.
  ``(x, weight, bias)`` applied to a fixed upstream gradient ``dy`` (what ``value_and_grad``
  does inside, minus a loss reduction that would let XLA skip writing ``y``), returning ``y``,
  the new running statistics, ``dx``, ``dweight``, ``dbias``. torch: ``y = bn(x)`` then
  ``torch.autograd.grad(y, (x, weight, bias), dy)`` (running stats updated in place).
* **eval**: one jitted forward with running statistics.
* **floor**: bare XLA programs on the same arrays doing the least memory traffic a batch norm
  needs. Train: one reduction over ``x`` + one fused read/write pass forward, one two-input
  reduction over ``(dy, x)`` + one fused two-input read/write pass backward, in one program with
  the same data dependencies. Eval: one fused ``x * a + b`` pass.

Ratios below 1 mean jaxbn is faster. Targets (issue 6): train <= 0.7x flax, <= 1.0x torch
channels_last, <= 1.3x floor; eval <= 1.3x the ``x * a + b`` pass.

Allocator: with glibc's default policy a freed 25 MB buffer goes back to the OS, so every step
page-faults its fresh outputs (about 2-3 ms per 25.7 MB output here, for every contender alike):
that measures ``malloc``, not the kernels, and makes timings bimodal. Unless ``--default-malloc``
is given, the script re-executes itself with glibc tunables that keep freed memory for reuse
(``MALLOC_ARENA_MAX``, ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``): the steady
state of a training loop. torch's OpenMP threads are set to wait passively
(``OMP_WAIT_POLICY=PASSIVE``) so their busy-waiting does not slow whichever contender runs next.

Also reported: bytes of the residuals the backward pass keeps beyond the inputs themselves
(leaves of the ``jax.vjp`` closure that are not inputs), and compile time (trace + lower +
compile) of the jitted train step.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark shape: ``shape`` is the JAX layout, ``axis`` its feature axis."""

    name: str
    shape: tuple[int, ...]
    axis: int

    @property
    def layout(self) -> str:
        letters = {2: "NC", 3: "NCL", 4: "NCHW", 5: "NCDHW"}[len(self.shape)]
        if self.axis % len(self.shape) == 1:
            return letters
        return letters[0] + letters[2:] + "C"

    @property
    def torch_shape(self) -> tuple[int, ...]:
        s = list(self.shape)
        c = s.pop(self.axis % len(s))
        return (s[0], c, *s[1:])

    @property
    def megabytes(self) -> float:
        return float(np.prod(self.shape)) * 4 / 1e6


FULL = [
    Case("BatchNorm1d", (256, 1024), 1),
    Case("BatchNorm2d ResNet stage 1", (32, 56, 56, 64), -1),
    Case("BatchNorm2d ResNet stage 2", (32, 28, 28, 128), -1),
    Case("BatchNorm2d ResNet stage 3", (32, 14, 14, 256), -1),
    Case("BatchNorm2d ResNet stage 4", (32, 7, 7, 512), -1),
    Case("BatchNorm2d ResNet stage 1", (32, 64, 56, 56), 1),
    Case("BatchNorm2d ResNet stage 3", (32, 256, 14, 14), 1),
    Case("BatchNorm3d", (8, 16, 28, 28, 32), -1),
    Case("BatchNorm3d", (8, 32, 16, 28, 28), 1),
]
QUICK = [FULL[0], FULL[1], FULL[5]]
GPU_EXTRA = [  # a GPU finishes the shapes above in microseconds: add ImageNet-size batches
    Case("BatchNorm2d ResNet stage 1, batch 256", (256, 56, 56, 64), -1),
    Case("BatchNorm2d ResNet stage 1, batch 256", (256, 64, 56, 56), 1),
]

# glibc: one arena (XLA's worker threads otherwise get per-thread arenas whose heaps are unmapped
# when emptied), allocations up to 32 MiB from the heap, freed memory never handed back -- so a
# step reuses the pages of the last step's outputs instead of faulting in fresh ones (measured:
# 14,000 -> 800 minor page faults per train step at 25.7 MB).
MALLOC_TUNABLES = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 34),
}
# torch's OpenMP threads otherwise busy-wait after each op and steal the two cores from whatever
# runs next (XLA's threads): passive waiting keeps the interleaved contenders independent.
OMP_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def prepare_torch(device: str, wanted: bool = True) -> bool:
    """Whether torch runs as a reference contender on ``device`` ("cpu" or "cuda"), set up for it:
    all cores on the CPU, cuDNN autotuning on the GPU (which needs a CUDA build of torch)."""
    if not wanted:
        return False
    try:
        import torch
    except ImportError:
        return False
    if device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
        return True
    torch.backends.cudnn.benchmark = True
    return torch.cuda.is_available()


def prepare_cpu_process(default_malloc: bool = False) -> None:
    """Set up this process for CPU timing: JAX on the CPU, torch's OpenMP waiting passively, and
    (unless ``default_malloc``) re-execute the script with :data:`MALLOC_TUNABLES` in force --
    glibc reads them only at start-up."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    for key, value in OMP_ENV.items():
        os.environ.setdefault(key, value)
    if not default_malloc and os.environ.get("JAXBN_BENCH_MALLOC") != "1":
        env = dict(os.environ, JAXBN_BENCH_MALLOC="1", **MALLOC_TUNABLES)
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------


class Timer:
    """Interleaved timing of zero-argument functions; samples accumulate over calls to
    :meth:`sample`, so blocks of rounds can be spread over the whole run.

    ``syncs[name](out)`` waits for ``fns[name]``'s result. Each function is warmed up, then
    every function is called the same ``inner`` times per sample (enough to make a sample of the
    fastest last about 5 ms, so timer resolution and Python overhead stay small). One count for
    all: JAX dispatches asynchronously, so a sample of ``n`` calls and one wait costs a
    program of a few hundred microseconds measurably less per call as ``n`` grows; a count
    set per function from a single timed call (1 for one, 11 for another in one measured case)
    skewed sub-millisecond comparisons by up to 1.7x (docs/performance.md, how to reproduce).
    """

    def __init__(
        self,
        fns: dict[str, Callable[[], object]],
        syncs: dict[str, Callable[[object], None]],
    ):
        self.fns, self.syncs = fns, syncs
        call_seconds = []
        for name, fn in fns.items():
            for _ in range(3):
                syncs[name](fn())
            calls = []
            for _ in range(5):
                t0 = time.perf_counter()
                syncs[name](fn())
                calls.append(time.perf_counter() - t0)
            call_seconds.append(statistics.median(calls))
        inner = max(1, min(50, int(5e-3 / max(min(call_seconds, default=1.0), 1e-7))))
        self.inner: dict[str, int] = {name: inner for name in fns}
        self.samples: dict[str, list[float]] = {name: [] for name in fns}
        self.shuffle = np.random.default_rng(0).shuffle

    def sample(self, rounds: int) -> None:
        order = list(self.fns)
        for _ in range(rounds):
            self.shuffle(order)  # no contender always runs right after the same other one
            for name in order:
                fn, n = self.fns[name], self.inner[name]
                t0 = time.perf_counter()
                out = None
                for _ in range(n):
                    out = fn()
                self.syncs[name](out)
                self.samples[name].append((time.perf_counter() - t0) / n * 1e3)

    def medians(self) -> dict[str, float]:
        """Median milliseconds per call of each function."""
        return {name: statistics.median(v) for name, v in self.samples.items()}


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    syncs: dict[str, Callable[[object], None]],
    rounds: int,
) -> dict[str, float]:
    """Median milliseconds per call of each function, ``rounds`` interleaved rounds."""
    timer = Timer(fns, syncs)
    timer.sample(rounds)
    return timer.medians()


# --------------------------------------------------------------------------------------------
# contenders
# --------------------------------------------------------------------------------------------


class Contenders:
    """Builds the zero-argument step functions of every contender for one case."""

    def __init__(self, case: Case, device: str, seed: int = 0):
        import jax
        import jax.numpy as jnp

        self.case = case
        self.device = device
        rng = np.random.default_rng(seed)
        c = case.shape[case.axis]
        self.np_x = rng.standard_normal(case.shape, dtype=np.float32) * 2 + 0.5
        self.np_dy = rng.standard_normal(case.shape, dtype=np.float32)
        self.np_w = rng.uniform(0.5, 1.5, c).astype(np.float32)
        self.np_b = rng.standard_normal(c).astype(np.float32)
        self.np_rm = rng.standard_normal(c).astype(np.float32) * 0.1
        self.np_rv = rng.uniform(0.5, 1.5, c).astype(np.float32)
        self.x = jnp.asarray(self.np_x)
        self.dy = jnp.asarray(self.np_dy)
        self.w = jnp.asarray(self.np_w)
        self.b = jnp.asarray(self.np_b)
        self.rm = jnp.asarray(self.np_rm)
        self.rv = jnp.asarray(self.np_rv)
        self.axes = tuple(a for a in range(len(case.shape)) if a != case.axis % len(case.shape))
        jax.block_until_ready((self.x, self.dy))

    # ---- jaxbn -------------------------------------------------------------------------------
    def jaxbn_state(self):
        """The buffers of a layer in training: it has seen a batch (``num_batches_tracked`` 1),
        and its running statistics are near the data's. A fresh layer's first batch takes a
        slower path on the CPU (a third read for the exact mean); every later one this."""
        import jax.numpy as jnp

        import jaxbn

        return jaxbn.BatchNormState(self.rm, self.rv, jnp.ones((), jnp.int32))

    def jaxbn_train_fn(self):
        import jax

        import jaxbn

        flags = jaxbn.BatchNormFlags(training=True, momentum=0.1, eps=1e-5, axis=self.case.axis)

        def step(x, w, b, state, dy):
            def layer(x, w, b):
                return jaxbn.batch_norm(x, state, jaxbn.BatchNormParams(w, b), flags)

            y, vjp, new_state = jax.vjp(layer, x, w, b, has_aux=True)
            return (y, new_state, *vjp(dy))

        return step, (self.x, self.w, self.b, self.jaxbn_state(), self.dy)

    def jaxbn_layer(self):
        import jaxbn

        flags = jaxbn.BatchNormFlags(training=True, axis=self.case.axis)
        state = self.jaxbn_state()
        return lambda x, w, b: jaxbn.batch_norm(x, state, jaxbn.BatchNormParams(w, b), flags)[0]

    def jaxbn_eval_fn(self):
        import jaxbn

        flags = jaxbn.BatchNormFlags(training=False, axis=self.case.axis)

        def step(x, w, b, state):
            return jaxbn.batch_norm(x, state, jaxbn.BatchNormParams(w, b), flags)[0]

        return step, (self.x, self.w, self.b, self.jaxbn_state())

    # ---- flax --------------------------------------------------------------------------------
    def flax_module(self, use_running_average: bool):
        import flax.linen as nn

        return nn.BatchNorm(
            use_running_average=use_running_average,
            axis=self.case.axis,
            momentum=0.9,  # flax's momentum is 1 - torch's
            epsilon=1e-5,
        )

    def flax_variables(self):
        return {"scale": self.w, "bias": self.b}, {"mean": self.rm, "var": self.rv}

    def flax_train_fn(self):
        import jax

        module = self.flax_module(False)

        def step(x, params, stats, dy):
            def layer(x, params):
                y, updates = module.apply(
                    {"params": params, "batch_stats": stats}, x, mutable=["batch_stats"]
                )
                return y, updates["batch_stats"]

            y, vjp, new_stats = jax.vjp(layer, x, params, has_aux=True)
            return (y, new_stats, *vjp(dy))

        params, stats = self.flax_variables()
        return step, (self.x, params, stats, self.dy)

    def flax_layer(self):
        module = self.flax_module(False)
        _, stats = self.flax_variables()

        def layer(x, w, b):
            y, _ = module.apply(
                {"params": {"scale": w, "bias": b}, "batch_stats": stats}, x, mutable=["batch_stats"]
            )
            return y

        return layer

    def flax_eval_fn(self):
        module = self.flax_module(True)

        def step(x, params, stats):
            return module.apply({"params": params, "batch_stats": stats}, x)

        params, stats = self.flax_variables()
        return step, (self.x, params, stats)

    # ---- floors ------------------------------------------------------------------------------
    def channel(self, v):
        shape = [1] * len(self.case.shape)
        shape[self.case.axis] = v.shape[0]
        return v.reshape(shape)

    def floor_train_fn(self):
        import jax.numpy as jnp
        from jax import lax

        axes, ch = self.axes, self.channel

        def floor(x, dy):
            t = jnp.sum(x, axes)  # one statistics read of x
            a = lax.rsqrt(t * t + 1.0)  # per-channel work between the passes, as in a real BN
            y = x * ch(a) + ch(t)  # one fused read/write pass
            g = jnp.sum(dy * x, axes)  # one two-input reduction
            c = lax.rsqrt(g * g + 1.0)
            dx = dy * ch(c) + x * ch(a)  # one fused two-input read/write pass
            return y, dx

        return floor, (self.x, self.dy)

    def floor_eval_fn(self):
        ch = self.channel

        def floor(x, a, b):
            return x * ch(a) + ch(b)

        return floor, (self.x, self.w, self.b)

    # ---- torch -------------------------------------------------------------------------------
    def torch_fns(self, channels_last: bool):
        """(train, eval) zero-argument callables for torch in NCHW or channels_last memory."""
        import torch

        case = self.case
        ndim = len(case.shape)
        cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
               5: torch.nn.BatchNorm3d}[ndim]
        dev = torch.device(self.device)
        c = case.shape[case.axis]

        def to_torch(a):
            t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, case.axis, 1))).to(dev)
            if channels_last:
                fmt = torch.channels_last if ndim == 4 else torch.channels_last_3d
                t = t.contiguous(memory_format=fmt)
            return t

        bn = cls(c, eps=1e-5, momentum=0.1).to(dev)
        with torch.no_grad():
            bn.weight.copy_(torch.from_numpy(self.np_w))
            bn.bias.copy_(torch.from_numpy(self.np_b))
            bn.running_mean.copy_(torch.from_numpy(self.np_rm))
            bn.running_var.copy_(torch.from_numpy(self.np_rv))
        x = to_torch(self.np_x).requires_grad_(True)
        dy = to_torch(self.np_dy)
        x_eval = x.detach()
        params = (x, bn.weight, bn.bias)

        def train():
            bn.train()
            y = bn(x)
            return torch.autograd.grad(y, params, dy)

        def evaluate():
            bn.eval()
            with torch.inference_mode():
                return bn(x_eval)

        return train, evaluate


def jax_sync(out):
    import jax

    jax.block_until_ready(out)


def torch_sync(device: str):
    import torch

    if device == "cuda":
        return lambda out: torch.cuda.synchronize()
    return lambda out: None


# --------------------------------------------------------------------------------------------
# memory and compile time
# --------------------------------------------------------------------------------------------


def residual_bytes(layer: Callable, args: tuple) -> tuple[int, int]:
    """(bytes, count) of arrays kept by ``jax.vjp`` for the backward pass, inputs excluded.

    The vjp closure is a pytree whose leaves are exactly the saved residuals; leaves that are
    the very input buffers are not extra memory.
    """
    import jax

    _, vjp = jax.vjp(layer, *args)
    inputs = {id(a) for a in args}
    input_ptrs = {a.unsafe_buffer_pointer() for a in args}
    extra = [
        leaf
        for leaf in jax.tree_util.tree_leaves(vjp)
        if id(leaf) not in inputs and leaf.unsafe_buffer_pointer() not in input_ptrs
    ]
    return sum(leaf.nbytes for leaf in extra), sum(leaf.size == args[0].size for leaf in extra)


def compile_seconds(make: Callable[[], tuple[Callable, tuple]], repeats: int = 3) -> float:
    """Median wall time of trace + lower + compile of a freshly built jitted function."""
    import jax

    times = []
    for _ in range(repeats):
        fn, args = make()
        fresh = jax.jit(lambda *a, fn=fn: fn(*a))
        t0 = time.perf_counter()
        fresh.lower(*args).compile()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --------------------------------------------------------------------------------------------
# running and reporting
# --------------------------------------------------------------------------------------------


def case_timers(case: Case, device: str, torch_ok: bool) -> tuple[Timer, Timer, dict]:
    """Train and eval :class:`Timer` of every contender for ``case``, and its residual bytes."""
    import jax

    cont = Contenders(case, device)

    def jitted(make):
        fn, args = make()
        compiled = jax.jit(fn)
        return lambda: compiled(*args)

    train = {
        "jaxbn": jitted(cont.jaxbn_train_fn),
        "flax": jitted(cont.flax_train_fn),
        "floor": jitted(cont.floor_train_fn),
    }
    evals = {
        "jaxbn": jitted(cont.jaxbn_eval_fn),
        "flax": jitted(cont.flax_eval_fn),
        "floor": jitted(cont.floor_eval_fn),
    }
    syncs = {k: jax_sync for k in train}
    if torch_ok:
        t_sync = torch_sync(device)
        tr, ev = cont.torch_fns(channels_last=False)
        train["torch"], evals["torch"] = tr, ev
        syncs["torch"] = t_sync
        if len(case.shape) >= 4:
            tr, ev = cont.torch_fns(channels_last=True)
            train["torch_cl"], evals["torch_cl"] = tr, ev
            syncs["torch_cl"] = t_sync
    w, b = cont.w, cont.b
    residuals = {
        "res_jaxbn": residual_bytes(cont.jaxbn_layer(), (cont.x, w, b)),
        "res_flax": residual_bytes(cont.flax_layer(), (cont.x, w, b)),
    }
    return Timer(train, syncs), Timer(evals, syncs), residuals


def compile_row(case: Case, device: str) -> dict:
    cont = Contenders(case, device)
    return {
        "jaxbn": compile_seconds(cont.jaxbn_train_fn),
        "flax": compile_seconds(cont.flax_train_fn),
    }


def machine_description(device: str) -> str:
    import jax
    import flax

    try:
        import torch

        torch_v = torch.__version__
    except ImportError:  # pragma: no cover
        torch_v = "not installed"
    if device == "cuda":
        import torch

        hw = f"{torch.cuda.get_device_name(0)} (jax devices: {jax.devices()})"
    else:
        model = platform.processor() or "unknown CPU"
        try:
            out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
            for line in out.splitlines():
                if line.startswith("Model name:"):
                    model = line.split(":", 1)[1].strip()
        except OSError:
            pass
        hw = f"{model}, {os.cpu_count()} cores"
    return (
        f"{hw}; {platform.platform()}; Python {platform.python_version()}; "
        f"jax {jax.__version__}, flax {flax.__version__}, torch {torch_v}"
    )


def fmt(v: float | None, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return "—"
    return f"{a / b:.2f}"


def render(rows: list[dict], compiles: list[tuple[Case, dict]], device: str, rounds: int) -> str:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"Measured {date} on {machine_description(device)}.",
        f"float32; median of {rounds} rounds per contender (contenders interleaved in random order, "
        f"rounds in blocks spread over the whole run); times in ms; "
        + ("glibc malloc keeps freed memory (see run.py)." if os.environ.get("JAXBN_BENCH_MALLOC")
           == "1" else "default glibc malloc."),
        "torch CL = torch channels_last memory format (n/a for BatchNorm1d).",
        "",
        "**Train** (forward + backward w.r.t. x, weight, bias with running-stat update)",
        "",
        "| shape | layout | MB | jaxbn | flax | torch | torch CL | floor | jaxbn/flax | "
        "jaxbn/torch CL | jaxbn/floor |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        c, t = r["case"], r["train"]
        cl = t.get("torch_cl", t.get("torch"))
        lines.append(
            f"| {c.name} {'×'.join(map(str, c.shape))} | {c.layout} | {c.megabytes:.1f} | "
            f"{fmt(t['jaxbn'])} | {fmt(t['flax'])} | {fmt(t.get('torch'))} | "
            f"{fmt(t.get('torch_cl'))} | {fmt(t['floor'])} | {ratio(t['jaxbn'], t['flax'])} | "
            f"{ratio(t['jaxbn'], cl)} | {ratio(t['jaxbn'], t['floor'])} |"
        )
    lines += [
        "",
        "**Eval** (forward with running statistics; pass = one fused `x * a + b`)",
        "",
        "| shape | layout | jaxbn | flax | torch | torch CL | pass | jaxbn/flax | "
        "jaxbn/torch CL | jaxbn/pass |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        c, e = r["case"], r["eval"]
        cl = e.get("torch_cl", e.get("torch"))
        lines.append(
            f"| {c.name} {'×'.join(map(str, c.shape))} | {c.layout} | {fmt(e['jaxbn'])} | "
            f"{fmt(e['flax'])} | {fmt(e.get('torch'))} | {fmt(e.get('torch_cl'))} | "
            f"{fmt(e['floor'])} | {ratio(e['jaxbn'], e['flax'])} | {ratio(e['jaxbn'], cl)} | "
            f"{ratio(e['jaxbn'], e['floor'])} |"
        )
    lines += [
        "",
        "**Residuals** kept for the backward pass beyond the inputs (training mode)",
        "",
        "| shape | layout | input MB | jaxbn bytes (full-size arrays) | flax bytes (full-size arrays) |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        c = r["case"]
        (jb, jn), (fb, fn) = r["res_jaxbn"], r["res_flax"]
        lines.append(
            f"| {c.name} {'×'.join(map(str, c.shape))} | {c.layout} | {c.megabytes:.1f} | "
            f"{jb:,} ({jn}) | {fb:,} ({fn}) |"
        )
    if compiles:
        lines += [
            "",
            "**Compile time** of the jitted train step (trace + lower + compile, median of 3, s)",
            "",
            "| shape | layout | jaxbn | flax | jaxbn/flax |",
            "|---|---|---:|---:|---:|",
        ]
        for c, t in compiles:
            lines.append(
                f"| {c.name} {'×'.join(map(str, c.shape))} | {c.layout} | {t['jaxbn']:.3f} | "
                f"{t['flax']:.3f} | {ratio(t['jaxbn'], t['flax'])} |"
            )
    return "\n".join(lines) + "\n"


def results_path(write: str | None, gpu: bool) -> Path | None:
    """Where ``--write [PATH]`` puts the tables: nowhere unless asked (the results files are
    tracked), ``benchmarks/results_{cpu,gpu}.md`` without a PATH."""
    if write is None:
        return None
    return Path(write) if write else ROOT / "benchmarks" / f"results_{'gpu' if gpu else 'cpu'}.md"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="three shapes, fewer rounds")
    parser.add_argument("--gpu", action="store_true", help="run jax and torch on the GPU")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds per contender")
    parser.add_argument(
        "--write", "--out", nargs="?", const="", default=None, metavar="PATH",
        help="also write the tables to PATH (no PATH: benchmarks/results_cpu.md, results_gpu.md "
        "with --gpu); default: print only",
    )
    parser.add_argument("--no-torch", action="store_true", help="skip the torch contenders")
    parser.add_argument(
        "--default-malloc", action="store_true", help="keep glibc's default allocation policy"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.gpu:
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")  # leave room for torch
    else:
        prepare_cpu_process(args.default_malloc)

    device = "cuda" if args.gpu else "cpu"
    import jax

    cases = QUICK if args.quick else FULL + (GPU_EXTRA if args.gpu else [])
    rounds = args.rounds or (15 if args.quick else 40)
    torch_ok = prepare_torch(device, wanted=not args.no_torch)
    print(f"devices: {jax.devices()}", flush=True)

    # Every case's contenders are built first; then blocks of rounds sweep over all cases, so
    # a transient load on this shared machine spreads over every case instead of skewing one.
    timers = []
    for case in cases:
        timers.append((case, *case_timers(case, device, torch_ok)))
    blocks = 1 if args.quick else 4
    for block in range(blocks):
        t0 = time.perf_counter()
        for case, train, evals, _ in timers:
            train.sample(max(1, rounds // blocks))
            evals.sample(max(1, rounds // blocks))
        print(f"block {block + 1}/{blocks}: {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    for case, train, evals, residuals in timers:
        rows.append({"case": case, "train": train.medians(), "eval": evals.medians(), **residuals})
        t, e = rows[-1]["train"], rows[-1]["eval"]
        print(
            f"{case.name} {case.shape} {case.layout}: train "
            + ", ".join(f"{k} {v:.3f}" for k, v in t.items())
            + " | eval "
            + ", ".join(f"{k} {v:.3f}" for k, v in e.items())
            + " ms",
            flush=True,
        )
    compiles = [(c, compile_row(c, device)) for c in (cases[:2] if args.quick else [FULL[0], FULL[1], FULL[5]])]
    table = render(rows, compiles, device, rounds)
    print(table)
    out = results_path(args.write, args.gpu)
    if out is not None:
        out.write_text(table)
        print(f"wrote {out}")


def embed_in_doc(table: str, kind: str) -> None:
    """Replace the text between ``<!-- benchmark-{kind}:start -->`` and ``...:end -->`` in
    docs/performance.md, where the step tables live."""
    doc = ROOT / "docs" / "performance.md"
    start, end = f"<!-- benchmark-{kind}:start -->", f"<!-- benchmark-{kind}:end -->"
    text = doc.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{doc} has no {start} ... {end} markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(f"{head}{start}\n{table}{end}{tail}")
    print(f"updated {doc}")


if __name__ == "__main__":
    main()
