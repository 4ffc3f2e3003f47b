"""Port a trained PyTorch ResNet-18-style model to Flax (jaxbn) and prove it behaves the same.

    python examples/port_resnet.py            # float64 and float32
    python examples/port_resnet.py --dtype float64 --outdir /tmp/port

1. A ResNet-18-style model (BasicBlocks [2, 2, 2, 2], 7x7/2 stem + 3x3/2 max-pool, narrow widths,
   32x32 images) in torch, without torchvision, and the same model in Flax with
   ``jaxbn.linen.BatchNorm``, submodules named like the torch attributes (``layer1 = [...]`` in
   ``setup`` is Flax's ``layer1_0``, ``layer1_1``, which the porting convention maps to torch's
   ``layer1.0``, ``layer1.1``).
2. The torch model trains a few SGD steps, so the running statistics and ``num_batches_tracked``
   are non-trivial; its ``state_dict`` is saved as ``.pt`` and ``.safetensors``.
3. Both files are read back (safely) and ported; the two ports must be identical.
4. ``jaxbn.testing`` runs both models side by side: eval steps, then 5 training steps (forward
   in train mode, cross-entropy, plain SGD) in both frameworks, comparing logits and every
   parameter and running statistic after each step.

Needs torch, optax and safetensors: ``pip install -e ".[testing,safetensors]" torch==2.13.0``
(or the ``test`` extra).

Padding: torch's ``padding=k//2`` pads symmetrically; Flax's ``'SAME'`` pads asymmetrically for
strided convs (more at the end), so every conv here has explicit ``((p, p), (p, p))`` padding.
The max-pool pads with -inf like torch's.

Exit status 0 when float64 is within 1e-9 (eval and training) and float32 within
``FLOAT32_EVAL_ATOL`` / ``FLOAT32_TRAIN_ATOL``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import jax

jax.config.update("jax_enable_x64", True)  # float64 exactness, int64 num_batches_tracked

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import jaxbn.linen as jl  # noqa: E402
from jaxbn import checkpoint_io, porting  # noqa: E402
from jaxbn.testing import CHANNELS_LAST, SGD, check_equivalence  # noqa: E402

WIDTHS = (8, 16, 32, 64)
NUM_CLASSES = 10
IMAGE = 32
BATCH = 8
LR = 0.1
FLOAT64_ATOL = 1e-9
# float32: torch and XLA sum convolutions in different orders (~1e-6 on O(1) logits); each SGD
# step feeds those differences back through the gradients, so they grow ~2-4x per step.
FLOAT32_EVAL_ATOL = 1e-5
FLOAT32_TRAIN_ATOL = 1e-3


# ----------------------------------------------------------------------------- torch

class TorchBasicBlock(torch.nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(cout)
        self.conv2 = torch.nn.Conv2d(cout, cout, 3, 1, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = torch.nn.Sequential(
                torch.nn.Conv2d(cin, cout, 1, stride, bias=False), torch.nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + identity)


class TorchResNet18(torch.nn.Module):
    def __init__(self, widths=WIDTHS, num_classes=NUM_CLASSES):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, widths[0], 7, 2, padding=3, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(widths[0])
        self.maxpool = torch.nn.MaxPool2d(3, 2, padding=1)
        cin = widths[0]
        for i, (w, stride) in enumerate(zip(widths, (1, 2, 2, 2)), start=1):
            setattr(self, f"layer{i}", torch.nn.Sequential(TorchBasicBlock(cin, w, stride), TorchBasicBlock(w, w, 1)))
            cin = w
        self.fc = torch.nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


# ----------------------------------------------------------------------------- Flax

def _conv(features: int, k: int, stride: int, dtype) -> nn.Conv:
    p = k // 2  # torch's symmetric padding, explicitly (not 'SAME')
    return nn.Conv(features, (k, k), strides=stride, padding=((p, p), (p, p)), use_bias=False, param_dtype=dtype)


class FlaxBasicBlock(nn.Module):
    cin: int
    cout: int
    stride: int
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.conv1 = _conv(self.cout, 3, self.stride, self.dtype)
        self.bn1 = jl.BatchNorm(param_dtype=self.dtype)
        self.conv2 = _conv(self.cout, 3, 1, self.dtype)
        self.bn2 = jl.BatchNorm(param_dtype=self.dtype)
        if self.stride != 1 or self.cin != self.cout:
            self.downsample = [_conv(self.cout, 1, self.stride, self.dtype), jl.BatchNorm(param_dtype=self.dtype)]

    def __call__(self, x, train: bool):
        out = nn.relu(self.bn1(self.conv1(x), train=train))
        out = self.bn2(self.conv2(out), train=train)
        identity = x
        if self.stride != 1 or self.cin != self.cout:
            identity = self.downsample[1](self.downsample[0](x), train=train)
        return nn.relu(out + identity)


class FlaxResNet18(nn.Module):
    widths: tuple[int, ...] = WIDTHS
    num_classes: int = NUM_CLASSES
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        w0 = self.widths[0]
        self.conv1 = nn.Conv(w0, (7, 7), strides=2, padding=((3, 3), (3, 3)), use_bias=False, param_dtype=self.dtype)
        self.bn1 = jl.BatchNorm(param_dtype=self.dtype)
        cin, layers = w0, []
        for w, stride in zip(self.widths, (1, 2, 2, 2)):
            layers.append([FlaxBasicBlock(cin, w, stride, self.dtype), FlaxBasicBlock(w, w, 1, self.dtype)])
            cin = w
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Dense(self.num_classes, param_dtype=self.dtype)

    def __call__(self, x, train: bool = False):
        x = nn.relu(self.bn1(self.conv1(x), train=train))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                x = block(x, train=train)
        return self.fc(x.mean(axis=(1, 2)))


# ----------------------------------------------------------------------------- the port

def train_torch(model: torch.nn.Module, steps: int, rng: np.random.Generator) -> None:
    """A few SGD steps so the BatchNorm buffers are far from their initial values."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    model.train()
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        x = torch.from_numpy(rng.normal(1.0, 2.0, size=(BATCH, 3, IMAGE, IMAGE))).to(dtype)
        y = torch.from_numpy(rng.integers(0, NUM_CLASSES, size=BATCH))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def port(dtype_name: str, outdir: str, train_steps: int = 3, check_steps: int = 5, seed: int = 0):
    """Train, save (.pt, .safetensors), port both files, compare with the harness."""
    torch_dtype, jax_dtype = {"float64": (torch.float64, jnp.float64), "float32": (torch.float32, jnp.float32)}[dtype_name]
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = TorchResNet18().to(torch_dtype)
    train_torch(model, train_steps, rng)

    pt_path = os.path.join(outdir, f"resnet_{dtype_name}.pt")
    st_path = os.path.join(outdir, f"resnet_{dtype_name}.safetensors")
    torch.save(model.state_dict(), pt_path)
    from safetensors.torch import save_file

    save_file(model.state_dict(), st_path)

    flax_model = FlaxResNet18(dtype=jax_dtype)
    example = jnp.zeros((BATCH, IMAGE, IMAGE, 3), jax_dtype)
    target = porting.target_from_module(flax_model, example)
    ports = []
    for path in (pt_path, st_path):
        variables, report = porting.torch_to_flax(checkpoint_io.read_checkpoint(path), target)
        ports.append(variables)
    same = jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), *ports))
    if not same:
        raise AssertionError(".pt and .safetensors ports differ")

    inputs = [rng.normal(1.0, 2.0, size=(BATCH, 3, IMAGE, IMAGE)).astype(dtype_name) for _ in range(check_steps)]
    targets = [rng.integers(0, NUM_CLASSES, size=BATCH) for _ in range(check_steps)]
    tolerances = {"eval": FLOAT64_ATOL, "train": FLOAT64_ATOL} if dtype_name == "float64" else {
        "eval": FLOAT32_EVAL_ATOL, "train": FLOAT32_TRAIN_ATOL}
    equivalence = {
        mode: check_equivalence(
            model, flax_model, ports[0], inputs, steps=check_steps, modes=(mode,), layout=CHANNELS_LAST,
            sgd=SGD(loss="cross_entropy", targets=targets, learning_rate=LR), atol=atol)
        for mode, atol in tolerances.items()
    }
    return report, equivalence


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["float64", "float32", "both"], default="both")
    parser.add_argument("--outdir", help="where to write the checkpoints (default: a temporary directory)")
    parser.add_argument("--report", action="store_true", help="print the full name mapping")
    args = parser.parse_args(argv)
    dtypes = ["float64", "float32"] if args.dtype == "both" else [args.dtype]
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        outdir = args.outdir or tmp
        os.makedirs(outdir, exist_ok=True)
        for name in dtypes:
            report, eq = port(name, outdir)
            if args.report:
                print(report)
            print(f"\n== {name}: {len(report.matched)} tensors ported from .pt and .safetensors (identical ports)")
            print(eq["eval"], eq["train"], sep="\n")
            passed = eq["eval"].ok and eq["train"].ok
            print(f"{name}: eval logits max abs diff {eq['eval'].max_output_diff('eval'):.3e} "
                  f"(tolerance {eq['eval'].atol:g}); 5 SGD training steps: logits "
                  f"{eq['train'].max_output_diff('train'):.3e}, params+running stats "
                  f"{eq['train'].max_state_diff('train'):.3e} (tolerance {eq['train'].atol:g}): "
                  f"{'PASS' if passed else 'FAIL'}")
            ok &= passed
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
