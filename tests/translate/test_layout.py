"""``from_torch(..., channels_last=True)`` (``jaxbn/translate/layout.py``): the port computes NHWC
inside with Flax's own layers, is still torch's model (eval, two SGD steps within 10x torch's
own sensitivity, counters), keeps torch's variables (round trip bit-exact), and falls back to a
transpose -- never to a different computation -- where an op has no NHWC form."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

import jaxbn
from helpers import (assert_round_trip_exact, import_torchvision, jax_sgd_steps, perturbed, rel_diff,
                     torch_sgd_steps, warmed)
from jaxbn import porting
from jaxbn.translate import emit_source
from jaxbn.translate.ir import Block

F64 = torch.float64


def nhwc(x: torch.Tensor) -> jnp.ndarray:
    return jnp.asarray(x.numpy()).transpose(0, *range(2, x.ndim), 1)


def conversions(block: Block) -> list[str]:
    """The layout changes the rewrite inserted, as ``torch path: value``, in every block."""
    found = [f"{block.torch_path}: {op.out}" for op in block.ops
             if op.kind == "function" and op.target in ("to_channels_first", "to_channels_last")]
    for _, child in block.children:
        if isinstance(child, Block):
            found += conversions(child)
    return found


def layers(block: Block) -> list[str]:
    out = []
    for _, child in block.children:
        out += layers(child) if isinstance(child, Block) else [child.cls]
    return out


def check_nhwc_training(model, shape, lr=0.1):
    """eval <= 1e-12 and two SGD steps like torch (inputs and outputs NHWC), round trip exact."""
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(shape, generator=g, dtype=F64) for _ in range(2)]
    ys = [torch.randint(0, 5, (shape[0],), generator=g) for _ in range(2)]
    ported = jaxbn.from_torch(model, xs[0], channels_last=True)
    with torch.no_grad():
        expected = copy.deepcopy(model).eval()(xs[0]).numpy()
    y = jax.jit(lambda v, x: ported.module.apply(v, x))(ported.variables, nhwc(xs[0]))
    assert np.max(np.abs(np.asarray(y) - expected)) <= 1e-12
    t_out, t_state = torch_sgd_steps(model, xs, ys, lr)
    p_out, p_state = torch_sgd_steps(perturbed(model), xs, ys, lr)
    j_out, j_vars = jax_sgd_steps(ported.module, ported.variables, [x.movedim(1, -1).contiguous() for x in xs], ys, lr)
    j_state, _ = porting.flax_to_torch(j_vars, model)
    sensitivity = max(max(rel_diff(p, t) for p, t in zip(p_out, t_out)),
                      max(rel_diff(p_state[k], t_state[k]) for k in t_state), 1e-16)
    assert max(rel_diff(j, t) for j, t in zip(j_out, t_out)) <= 10 * sensitivity
    assert max(rel_diff(j_state[k], t_state[k]) for k in t_state) <= 10 * sensitivity
    for k in t_state:
        if k.endswith("num_batches_tracked"):
            assert np.array_equal(j_state[k], t_state[k]), k
    assert_round_trip_exact(model, ported.variables)
    return ported


def test_resnet18_computes_nhwc_with_flax_layers_and_trains_like_torch():
    model = warmed(import_torchvision().models.resnet18(num_classes=5).train(), (4, 3, 32, 32))
    ported = check_nhwc_training(model, (4, 3, 32, 32))
    block = ported.module.block
    kinds = set(layers(block))
    assert {"nn.Conv", "nn.Dense", "BatchNorm"} <= kinds and not kinds & {"Conv", "Linear", "MaxPool"}
    assert all(dict(layer.kwargs)["axis"] == -1 for layer in _norms(block))
    # the one transpose: the pooled (N, 512, 1, 1) map before torch's flatten
    assert conversions(block) == [": avgpool_nchw"]
    # and the emitted file is the same model
    namespace: dict = {}
    exec(compile(emit_source(block), "<port>", "exec"), namespace)
    x = nhwc(torch.randn(2, 3, 32, 32, dtype=F64))
    np.testing.assert_allclose(namespace["Model"]().apply(ported.variables, x),
                               ported.module.apply(ported.variables, x), rtol=0, atol=1e-13)


def _norms(block):
    for _, child in block.children:
        if isinstance(child, Block):
            yield from _norms(child)
        elif child.is_norm:
            yield child


class Mixed(torch.nn.Module):
    """NHWC-friendly ops (cat on channels, mean with keepdim, elementwise with a (N, C, 1, 1)
    gate, a strided avg pool) beside ones that need torch's layout (a view, a reflect-padded
    conv, a parameter of shape (C, 1, 1), a sum over channels)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.b = torch.nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
        self.bn = torch.nn.BatchNorm2d(8)
        self.pool = torch.nn.AvgPool2d(3, 2, 1, count_include_pad=False)
        self.gamma = torch.nn.Parameter(torch.linspace(0.5, 1.5, 8).reshape(8, 1, 1))
        self.head = torch.nn.Linear(8 + 5, 5)

    def forward(self, x):
        y = self.bn(torch.cat([self.a(x), self.b(x)], dim=1))
        y = y * torch.sigmoid(y.mean((2, 3), keepdim=True))
        y = self.pool(F.relu(y)) * self.gamma
        n, c, h, w = y.shape
        side = y.view(n, c, h * w).sum(1)[:, :5]
        return self.head(torch.cat([y.mean((2, 3)), side], 1))


def test_ops_without_an_nhwc_form_read_torch_s_layout_and_stay_exact():
    ported = check_nhwc_training(warmed(Mixed().train(), (4, 3, 10, 10)), (4, 3, 10, 10))
    assert conversions(ported.module.block)  # the fallbacks are transposes, and the model is exact
