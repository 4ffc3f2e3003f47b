"""A translated torch model against the same network written by hand: the train step's speed,
and what translating costs.

Run from the repository root::

    python benchmarks/translated.py                # CPU: float32, batch 16, 96x96
    python benchmarks/translated.py --rounds 30

Prints, measured side by side in one run (rounds interleaved, medians; run.py's Timer):

* ``translated`` -- torchvision's ResNet-18 through ``jaxbn.from_torch(..., channels_last=True)``
  (NHWC inside, Flax's ``nn.Conv`` / ``nn.Dense``, ``jaxbn.linen`` norms on ``axis=-1``);
* ``by hand``    -- benchmarks/step.py's ResNet-18 with ``jaxbn.linen.BatchNorm`` (the same
  architecture written directly in Flax);

both with step.py's train step (softmax cross-entropy, optax SGD with momentum, donated buffers)
on the same batch, and their ratio. Then the same ResNet-18 in torch's layout (NCHW) through
``from_torch(..., api="nnx")`` -- an NNX module tree, stepped the NNX way (``nnx.jit``,
``nnx.value_and_grad``, ``nnx.Optimizer``) -- against the linen one (``api="linen"``, step.py's
step), side by side. Then ResNet-50's eval forward (float32, channels-last, the
same batch) with every BatchNorm folded into its convolution (``jaxbn.fold_batch_norm``) against
the unfolded one, side by side; and, in float64, the seconds ``from_torch`` takes and the seconds
its first training step takes to compile. Writes no file.

torchvision's wheel is built against CUDA torch; on the CPU torch its two C-op schemas are
defined first (docs/porting.md), as the tests do.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import run as bench  # noqa: E402
import step  # noqa: E402


@functools.cache
def torchvision():
    """torchvision beside the CPU torch (docs/porting.md), its schemas defined once."""
    import torch

    library = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARIES.append(library)  # keep the definitions alive
    import torchvision as tv

    return tv


_LIBRARIES: list = []


def translated_step(images, labels):
    """:func:`step.train_step` of the translated torchvision ResNet-18 (channels-last)."""
    import torch

    import jaxbn

    torch.manual_seed(0)
    model = torchvision().models.resnet18(num_classes=step.NUM_CLASSES)
    example = torch.from_numpy(images[:2].transpose(0, 3, 1, 2).copy())
    ported = jaxbn.from_torch(model, example, channels_last=True)
    return step.train_step(ported.module, ported.variables, images, labels)


def nnx_against_linen(images, labels):
    """``{name: run}`` of torchvision's ResNet-18 (NCHW) train step, through NNX and linen."""
    import jax.numpy as jnp
    import optax
    import torch
    from flax import nnx

    import jaxbn

    torch.manual_seed(0)
    model = torchvision().models.resnet18(num_classes=step.NUM_CLASSES)
    nchw = images.transpose(0, 3, 1, 2).copy()
    example = torch.from_numpy(nchw[:2])
    ported = jaxbn.from_torch(model, example)
    runs = {"linen": step.train_step(ported.module, ported.variables, nchw, labels)[0]}
    nnx_model = jaxbn.from_torch(model, example, api="nnx")
    optimizer = nnx.Optimizer(nnx_model, optax.sgd(step.LR, momentum=step.MOMENTUM), wrt=nnx.Param)
    x, y = jnp.asarray(nchw), jnp.asarray(labels)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    train_step(nnx_model, optimizer, x, y)
    runs["nnx"] = lambda: train_step(nnx_model, optimizer, x, y)
    return runs


def folded_eval(images):
    """Eval forwards of the channels-last ResNet-50, unfolded and folded: ``{name: run}``."""
    import jax
    import jax.numpy as jnp
    import torch

    import jaxbn

    torch.manual_seed(0)
    model = torchvision().models.resnet50(num_classes=step.NUM_CLASSES).eval()
    example = torch.from_numpy(images[:2].transpose(0, 3, 1, 2).copy())
    ported = jaxbn.from_torch(model, example, channels_last=True)
    folded, report = jaxbn.fold_batch_norm(ported)
    x = jnp.asarray(images)
    runs = {}
    for name, p in (("unfolded", ported), ("folded", folded)):
        forward = jax.jit(lambda v, x, module=p.module: module.apply(v, x))
        forward(p.variables, x).block_until_ready()
        runs[name] = lambda forward=forward, v=p.variables: forward(v, x)
    return runs, report


def translation_cost() -> tuple[float, float]:
    """ResNet-50, float64: ``from_torch`` seconds, first train step's compile seconds."""
    import jax
    import numpy as np
    import torch

    import jaxbn

    jax.config.update("jax_enable_x64", True)
    torch.manual_seed(0)
    model = torchvision().models.resnet50(num_classes=10).double()
    x = torch.randn(8, 3, 64, 64, dtype=torch.float64)
    t0 = time.perf_counter()
    ported = jaxbn.from_torch(model, x)
    translate = time.perf_counter() - t0
    images = np.asarray(x.numpy())
    labels = np.zeros(8, dtype=np.int32)
    _, compile_seconds, _, _ = step.train_step(ported.module, ported.variables, images, labels)
    return translate, compile_seconds


def side_by_side(title: str, fns: dict, ratio: tuple[str, str], rounds: int,
                 notes: dict[str, str] | None = None) -> None:
    """Time ``fns`` interleaved and print each median and the ratio ``ratio[0] / ratio[1]``."""
    medians = bench.time_interleaved(fns, {k: bench.jax_sync for k in fns}, rounds)
    print(f"\n{title}, {rounds} interleaved rounds (medians):")
    for name in fns:
        print(f"  {name:<11} {medians[name]:8.1f} ms{(notes or {}).get(name, '')}")
    print(f"  {ratio[0]} / {ratio[1]}: {medians[ratio[0]] / medians[ratio[1]]:.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--image", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep the system allocator (run.py's CPU settings otherwise)")
    args = parser.parse_args(argv)
    bench.prepare_cpu_process(args.default_malloc)

    import jax.numpy as jnp

    print(f"machine: {bench.machine_description('cpu')}", flush=True)
    images, labels = step.batch_data(args.batch, args.image)
    fns, compile_seconds = {}, {}
    fns["by hand"], compile_seconds["by hand"], _, _ = step.jax_step("jaxbn", jnp.float32, images, labels)
    fns["translated"], compile_seconds["translated"], _, _ = translated_step(images, labels)
    compiled = {name: f"   (compile {seconds:.1f} s)" for name, seconds in compile_seconds.items()}
    side_by_side(f"ResNet-18 train step, float32, batch {args.batch}, {args.image}x{args.image}",
                 fns, ("translated", "by hand"), args.rounds, compiled)
    side_by_side(f"ResNet-18 train step, NCHW, float32, batch {args.batch}, {args.image}x{args.image}",
                 nnx_against_linen(images, labels), ("nnx", "linen"), args.rounds)
    runs, report = folded_eval(images)
    side_by_side(f"ResNet-50 eval forward, float32, channels-last, batch {args.batch}, "
                 f"{args.image}x{args.image} ({len(report.folded)} norms folded, {len(report.kept)} kept)",
                 runs, ("folded", "unfolded"), args.rounds)
    translate, first_compile = translation_cost()
    print(f"\nResNet-50, float64: from_torch {translate:.1f} s, first train step compiles in "
          f"{first_compile:.1f} s")


if __name__ == "__main__":
    main()
