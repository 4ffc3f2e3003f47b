"""Whole training step: ResNet-18 with jaxbn.linen.BatchNorm vs flax.linen.BatchNorm.

Run from the repository root::

    python benchmarks/step.py                 # CPU: float32, batch 16, 96x96 (a few minutes)
    python benchmarks/step.py --gpu           # CUDA: batch 128, 128x128, bfloat16 and float32
    python benchmarks/step.py --doc           # also rewrite the step table in docs/performance.md
    python benchmarks/step.py --control       # also time a second copy of the jaxbn step

What users feel is the train step of a network, not one layer: there a batch norm's output feeds
the next convolution, so nothing fuses across it the way a one-layer ``jax.vjp`` lets XLA fuse
(benchmarks/run.py). One ResNet-18 definition (torchvision's architecture, NHWC, 1000 classes)
is built with each norm:

* ``jaxbn``        -- ``jaxbn.linen.BatchNorm`` (torch's semantics, two-pass float32 statistics);
* ``jaxbn one-read`` -- on a GPU only: the same with the opt-in one-read statistics kernel on
  (``jaxbn.Strategy(one_read="cuda")``, :func:`strategy_of`);
* ``flax``         -- ``flax.linen.BatchNorm`` (its default fast variance ``E[x²] - E[x]²``);
* ``flax accurate``-- ``flax.linen.BatchNorm(use_fast_variance=False)``;
* ``no norm``      -- the same network without its norms: the rest of the step, so BN's share shows;
* ``torch CL``     -- the same ResNet-18 in torch, channels_last memory format (``torch.autocast``
  for bfloat16), the same optimizer, as a reference;
* ``jaxbn again``  -- with ``--control`` only: a second, separately compiled copy of the ``jaxbn``
  step. Its ratio to ``jaxbn`` is the run's noise floor: on the shared 2-core CPU the two copies
  have differed by up to 3 % (docs/performance.md), so smaller differences between
  contenders are not resolved.

The step is one ``jax.jit``: forward in training mode, softmax cross-entropy, gradients, optax
SGD with momentum 0.9, the new parameters, optimizer state and running statistics -- with the
parameter, optimizer and statistics buffers donated. Every contender trains on the same batch;
rounds interleave the contenders in random order (run.py's :class:`Timer`), medians are reported.
On CPU the script re-executes itself with run.py's allocator settings (``--default-malloc`` to
opt out). It prints the table; it writes a file only when asked (``--out``, ``--doc``).

Why 96x96 on CPU and not 64x64: at 64x64 the last stage's maps are 2x2, and XLA:CPU runs a padded
3x3 convolution on a 2x2 map pathologically slowly (16x2x2x512 -> 512: ~600 ms for 0.3 GFLOP,
against 20 ms on 3x3 maps), so that step is ~5 s of which batch norm is a rounding error. At
96x96 the last stage is 3x3 and every convolution runs at its normal speed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import run as bench  # noqa: E402

NUM_CLASSES = 1000
STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))  # (width, stride of the first block)
NORMS = ("jaxbn", "flax", "flax accurate", "no norm")
GPU_NORMS = ("jaxbn", "jaxbn one-read", "flax", "flax accurate", "no norm")
VARIANTS = ("jaxbn one-read",)  # GPU-only settings of the jaxbn step (strategy_of)
CONTROL = "jaxbn again"  # --control: the jaxbn step compiled a second time
LR, MOMENTUM = 0.1, 0.9


# --------------------------------------------------------------------------------------------
# the model: one ResNet-18, parameterized by its norm
# --------------------------------------------------------------------------------------------


def make_norm(kind: str, dtype: Any) -> Callable[[Any, bool], Any]:
    """A fresh norm layer as ``norm(x, train)``: torch's BatchNorm2d defaults in each library."""
    import flax.linen as nn

    import jaxbn.linen

    if kind in ("jaxbn", CONTROL, *VARIANTS):
        layer = jaxbn.linen.BatchNorm(dtype=dtype, strategy=strategy_of(kind))
        return lambda x, train: layer(x, train=train)
    if kind in ("flax", "flax accurate"):
        layer = nn.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=dtype,
                             use_fast_variance=kind == "flax")
        return lambda x, train: layer(x, use_running_average=not train)
    if kind == "no norm":
        return lambda x, train: x
    raise ValueError(f"unknown norm {kind!r}; choose one of {GPU_NORMS}")


def strategy_of(kind: str) -> Any:
    """The :class:`jaxbn.Strategy` of a jaxbn contender: None (the backend's default) but for
    :data:`VARIANTS`."""
    import jaxbn

    return {"jaxbn one-read": jaxbn.Strategy(one_read="cuda")}.get(kind)


def resnet18(norm: str, dtype: Any):
    """torchvision's ResNet-18 (BasicBlocks [2, 2, 2, 2], 7x7/2 stem, 3x3/2 max-pool), NHWC,
    activations in ``dtype``, parameters in float32, every norm built by :func:`make_norm`."""
    import flax.linen as nn
    import jax.numpy as jnp

    def conv(features: int, k: int, stride: int) -> nn.Conv:
        p = k // 2
        return nn.Conv(features, (k, k), strides=stride, padding=((p, p), (p, p)),
                       use_bias=False, dtype=dtype)

    class Block(nn.Module):
        width: int
        stride: int

        @nn.compact
        def __call__(self, x, train: bool):
            out = nn.relu(make_norm(norm, dtype)(conv(self.width, 3, self.stride)(x), train))
            out = make_norm(norm, dtype)(conv(self.width, 3, 1)(out), train)
            if self.stride != 1 or x.shape[-1] != self.width:
                x = make_norm(norm, dtype)(conv(self.width, 1, self.stride)(x), train)
            return nn.relu(out + x)

    class ResNet18(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = nn.relu(make_norm(norm, dtype)(conv(64, 7, 2)(x.astype(dtype)), train))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
            for width, stride in STAGES:
                x = Block(width, stride)(x, train)
                x = Block(width, 1)(x, train)
            x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
            return nn.Dense(NUM_CLASSES)(x)

    return ResNet18()


# --------------------------------------------------------------------------------------------
# the train steps
# --------------------------------------------------------------------------------------------


def jax_step(norm: str, dtype: Any, images: np.ndarray, labels: np.ndarray):
    """:func:`train_step` of :func:`resnet18` with ``norm``, freshly initialized."""
    import jax
    import jax.numpy as jnp

    model = resnet18(norm, dtype)
    variables = model.init(jax.random.key(0), jnp.asarray(images), train=False)
    return train_step(model, variables, images, labels)


def train_step(model: Any, variables: dict, images: np.ndarray, labels: np.ndarray):
    """``(run, compile_seconds, compiled, recompile)`` of the step of any linen ``model`` taking
    ``train=``: ``run()`` steps a buffer-donating compiled ``state = step(state)`` on fixed data;
    compiling it took ``compile_seconds`` (trace, lower, compile) and gave ``compiled`` (its
    optimized HLO, its memory analysis); ``recompile()`` times a fresh compile of the step."""
    import jax
    import jax.numpy as jnp
    import optax

    x, y = jnp.asarray(images), jnp.asarray(labels)
    params, stats = variables["params"], variables.get("batch_stats", {})
    tx = optax.sgd(LR, momentum=MOMENTUM)

    def step(params, stats, opt_state, x, y):
        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, updates.get("batch_stats", {})

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    state = [params, stats, tx.init(params)]

    def compile_fresh():
        """Trace + lower + compile of a fresh function (jit caches by function identity)."""
        fresh = jax.jit(lambda *a: step(*a), donate_argnums=(0, 1, 2))
        t0 = time.perf_counter()
        compiled = fresh.lower(*state, x, y).compile()
        return compiled, time.perf_counter() - t0

    compiled, seconds = compile_fresh()

    def run():
        state[:] = compiled(*state, x, y)[:3]  # the donated buffers are replaced
        return state

    return run, seconds, compiled, lambda: compile_fresh()[1]


def torch_resnet18():
    """The same ResNet-18 in torch (torchvision's architecture; defined here because the
    installed torchvision build may not load against the installed torch)."""
    import torch
    from torch import nn

    def conv_bn(cin: int, cout: int, k: int, stride: int) -> list:
        return [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.body = nn.Sequential(*conv_bn(cin, cout, 3, stride), nn.ReLU(inplace=True),
                                      *conv_bn(cout, cout, 3, 1))
            self.down = (nn.Sequential(*conv_bn(cin, cout, 1, stride))
                         if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x):
            return torch.relu(self.body(x) + self.down(x))

    layers, cin = [*conv_bn(3, 64, 7, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)], 64
    for width, stride in STAGES:
        layers += [Block(cin, width, stride), Block(width, width, 1)]
        cin = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, NUM_CLASSES))


def torch_step(dtype_name: str, device: str, images: np.ndarray, labels: np.ndarray):
    """:func:`torch_resnet18` in channels_last, SGD with momentum; autocast for bfloat16."""
    import torch

    dev = torch.device(device)
    model = torch_resnet18().to(dev).to(memory_format=torch.channels_last).train()
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(dev)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.from_numpy(labels.astype(np.int64)).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    autocast = dtype_name == "bfloat16"

    def run():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return run


# --------------------------------------------------------------------------------------------
# running and reporting
# --------------------------------------------------------------------------------------------


def run_size(gpu: bool, batch: int | None, image: int | None,
             dtypes: list[str] | None) -> tuple[int, int, list[str]]:
    """``(batch, image, dtypes)``: the given ones, else the defaults of the device (CPU: batch 16
    at 96x96, float32; GPU: batch 128 at 128x128, bfloat16 and float32)."""
    return (batch or (128 if gpu else 16), image or (128 if gpu else 96),
            dtypes or (["bfloat16", "float32"] if gpu else ["float32"]))


def batch_data(batch: int, image: int) -> tuple[np.ndarray, np.ndarray]:
    """The fixed training batch every contender steps on: NHWC images and integer labels."""
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch, image, image, 3), dtype=np.float32)
    return images, rng.integers(0, NUM_CLASSES, batch).astype(np.int32)


def measure(dtype_name: str, batch: int, image: int, device: str, rounds: int, torch_ok: bool,
            compiles: int = 2, hlo_dir: Path | None = None, control: bool = False):
    """Median ms per step of every contender, and the jax steps' compile seconds (jaxbn and flax:
    the fastest of ``compiles``); each jax step's optimized HLO is written to ``hlo_dir`` if
    given. ``control`` adds :data:`CONTROL`, a second copy of the jaxbn step."""
    import jax.numpy as jnp

    images, labels = batch_data(batch, image)
    dtype = jnp.dtype(dtype_name)
    fns, syncs, recompile = {}, {}, {}
    seconds: dict[str, list[float]] = {}
    norms = (GPU_NORMS if device == "cuda" else NORMS) + ((CONTROL,) if control else ())
    if hlo_dir is not None:
        hlo_dir.mkdir(parents=True, exist_ok=True)
    for norm in sorted(norms, key=lambda n: n != "no norm"):  # its compile warms the process up
        fns[norm], took, compiled, recompile[norm] = jax_step(norm, dtype, images, labels)
        syncs[norm], seconds[norm] = bench.jax_sync, [took]
        memory = compiled.memory_analysis()  # e.g. whether a variant keeps more alive
        if memory is not None:
            print(f"{dtype_name} {norm}: temporary memory "
                  f"{memory.temp_size_in_bytes / 2**20:.1f} MiB", flush=True)
        if hlo_dir is not None:
            (hlo_dir / f"step_{dtype_name}_{norm.replace(' ', '_')}.hlo.txt").write_text(
                compiled.as_text())
    # Compile time: the fastest of `compiles` (alternating for jaxbn and flax after the first).
    for _ in range(compiles - 1):
        for norm in ("jaxbn", "flax"):
            seconds[norm].append(recompile[norm]())
    if torch_ok:
        fns["torch CL"] = torch_step(dtype_name, device, images, labels)
        syncs["torch CL"] = bench.torch_sync(device)
    fns = {norm: fns[norm] for norm in norms} | {k: v for k, v in fns.items() if k not in norms}
    return bench.time_interleaved(fns, syncs, rounds), {k: min(v) for k, v in seconds.items()}


def render(results: list[tuple[str, int, int, dict, dict]], device: str, rounds: int,
           compiles: int = 2) -> str:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    variants = [v for v in VARIANTS if any(v in t for *_, t, _ in results)]
    control = any(CONTROL in t for *_, t, _ in results)
    lines = [
        f"Measured {date} on {bench.machine_description(device)}.",
        f"ResNet-18 train step (forward, cross-entropy, backward, optax SGD momentum, donated "
        f"buffers); median of {rounds} interleaved rounds; ms per step. BN share = "
        f"(flax - no norm) / flax. Reproduce: `python benchmarks/step.py"
        f"{' --gpu' if device == 'cuda' else ''}`.",
        "",
        "| dtype | batch × image | jaxbn | "
        + "".join(f"{v} | " for v in variants)
        + "flax | flax accurate | no norm | torch CL | "
        "jaxbn/flax | " + "".join(f"{v}/flax | " for v in variants)
        + "jaxbn/flax accurate | BN share of flax | jaxbn BN / flax BN | "
        f"compile jaxbn / flax (s, fastest of {compiles}) |"
        + (f" {CONTROL} / jaxbn |" if control else ""),
        "|---|---|---:|" + "---:|" * (2 * len(variants) + 9) + ("---:|" if control else ""),
    ]
    for dtype_name, batch, image, t, c in results:
        bn_jaxbn, bn_flax = t["jaxbn"] - t["no norm"], t["flax"] - t["no norm"]
        lines.append(
            f"| {dtype_name} | {batch} × {image}² | {bench.fmt(t['jaxbn'], 1)} | "
            + "".join(f"{bench.fmt(t.get(v), 1)} | " for v in variants)
            + f"{bench.fmt(t['flax'], 1)} | {bench.fmt(t['flax accurate'], 1)} | "
            f"{bench.fmt(t['no norm'], 1)} | {bench.fmt(t.get('torch CL'), 1)} | "
            f"{bench.ratio(t['jaxbn'], t['flax'])} | "
            + "".join(f"{bench.ratio(t.get(v), t['flax'])} | " for v in variants)
            + f"{bench.ratio(t['jaxbn'], t['flax accurate'])} | "
            f"{bn_flax / t['flax']:.0%} | {bench.ratio(bn_jaxbn, bn_flax)} | "
            f"{c['jaxbn']:.1f} / {c['flax']:.1f} |"
            + (f" {bench.ratio(t[CONTROL], t['jaxbn'])} |" if control else "")
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="run jax and torch on the GPU")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds per contender")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--image", type=int, default=None, help="image height and width")
    parser.add_argument("--dtype", action="append", choices=("float32", "bfloat16"),
                        help="activation dtype (repeatable; default: float32 on CPU, both on GPU)")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch reference")
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's default allocation policy")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    parser.add_argument("--doc", action="store_true",
                        help="also replace the step table in docs/performance.md")
    parser.add_argument("--compiles", type=int, default=2,
                        help="fresh compiles of the jaxbn and flax steps timed (the fastest counts)")
    parser.add_argument("--control", action="store_true",
                        help=f"also time {CONTROL!r}, a second copy of the jaxbn step (noise floor)")
    parser.add_argument("--hlo-dir", type=Path, default=None,
                        help="write the jaxbn and flax steps' optimized HLO here")
    args = parser.parse_args(argv)
    if args.gpu:
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")  # leave room for torch
    else:
        bench.prepare_cpu_process(args.default_malloc)
    import jax

    device = "cuda" if args.gpu else "cpu"
    batch, image, dtypes = run_size(args.gpu, args.batch, args.image, args.dtype)
    rounds = args.rounds or (30 if args.gpu else 15)
    torch_ok = bench.prepare_torch(device, wanted=not args.no_torch)
    print(f"devices: {jax.devices()}", flush=True)
    results = []
    for dtype_name in dtypes:
        t, c = measure(dtype_name, batch, image, device, rounds, torch_ok, args.compiles,
                       args.hlo_dir, args.control)
        print(f"{dtype_name}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in t.items())
              + "; compile " + ", ".join(f"{k} {v:.1f} s" for k, v in c.items()), flush=True)
        results.append((dtype_name, batch, image, t, c))
    table = render(results, device, rounds, args.compiles)
    print(table)
    if args.out:
        args.out.write_text(table)
        print(f"wrote {args.out}")
    if args.doc:
        bench.embed_in_doc(table, f"step-{'gpu' if args.gpu else 'cpu'}")


if __name__ == "__main__":
    main()
