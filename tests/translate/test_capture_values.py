"""What the translator sees since capture runs the example input beside the graph (``translate/
concrete.py``) and reads the module's own tensors: shape-dependent Python specialized and guarded,
data-dependent Python refused, list inputs between blocks, parameters and buffers used directly in
a ``forward``, BatchNorm subclasses with their own ``forward`` (timm's ``BatchNormAct2d``) and
torch-layer subclasses that only change construction. Each case is checked against torch itself
(float64): eval, two SGD steps (within 10x torch's own sensitivity), counters, and the strict
round trip back to torch.
"""

from __future__ import annotations

import copy
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import jaxbn
from helpers import (assert_round_trip_exact, import_torchvision, jax_sgd_steps, perturbed, rel_diff,
                     torch_sgd_steps, warmed)
from jaxbn import porting
from jaxbn.porting import UnsupportedError
from jaxbn.translate import emit_source

F64 = torch.float64


def batches(shape, n=2, seed=3, classes=5):
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(shape, generator=g, dtype=F64) for _ in range(n)],
            [torch.randint(0, classes, (shape[0],), generator=g) for _ in range(n)])


def eval_output(ported, x):
    return np.asarray(jax.jit(lambda v, x: ported.module.apply(v, x, train=False))(
        ported.variables, jnp.asarray(x.numpy())))


def torch_eval(model, x):
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        return model(x).numpy()


def check_exact(model, shape, *, lr=0.1, train=True):
    """eval <= 1e-12, two SGD steps within 10x torch's sensitivity, counters equal, round trip
    strict and bit-exact; returns the port."""
    xs, ys = batches(shape)
    ported = jaxbn.from_torch(model, xs[0])
    assert np.max(np.abs(eval_output(ported, xs[0]) - torch_eval(model, xs[0]))) <= 1e-12
    t_out, t_state = torch_sgd_steps(model, xs, ys, lr, train=train)
    p_out, p_state = torch_sgd_steps(perturbed(model), xs, ys, lr, train=train)
    j_out, j_vars = jax_sgd_steps(ported.module, ported.variables, xs, ys, lr)
    j_state, _ = porting.flax_to_torch(j_vars, model)
    sensitivity = max(max(rel_diff(p, t) for p, t in zip(p_out, t_out)),
                      max(rel_diff(p_state[k], t_state[k]) for k in t_state), 1e-16)
    assert max(rel_diff(j, t) for j, t in zip(j_out, t_out)) <= 10 * sensitivity
    worst = max(t_state, key=lambda k: rel_diff(j_state[k], t_state[k]))
    assert rel_diff(j_state[worst], t_state[worst]) <= 10 * sensitivity, worst
    for k in t_state:
        if k.endswith("num_batches_tracked"):
            assert np.array_equal(j_state[k], t_state[k]), k
    assert_round_trip_exact(model, ported.variables)
    return ported


def emitted_model(ported):
    namespace: dict = {}
    exec(compile(emit_source(ported.module.block), "<port>", "exec"), namespace)
    return namespace["Model"]()


# ---------------------------------------------------------------- shapes in Python


class ShapeBranch(torch.nn.Module):
    """timm's ConvMlp / Conv2dSame pattern: Python on shapes (a branch, math.ceil, unpacking)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, 5)

    def forward(self, x):
        _, _, h, w = x.shape
        pad = math.ceil(h / 4) * 4 - h  # "same"-style padding from the size
        x = F.pad(x, (0, pad, 0, pad))
        if x.shape[-1] < 10:
            x = F.interpolate(x, size=(10, 10))
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(x.mean((2, 3)))


def test_shape_dependent_python_is_specialized_and_exact():
    check_exact(warmed(ShapeBranch(), (4, 3, 6, 6)), (4, 3, 6, 6))


def test_a_specialized_model_refuses_other_shapes_instead_of_computing_something_else():
    model = warmed(ShapeBranch(), (4, 3, 6, 6))
    ported = jaxbn.from_torch(model, torch.randn(4, 3, 6, 6, dtype=F64))
    other = jnp.ones((4, 3, 12, 12))  # the branch torch takes differs: no interpolate
    with pytest.raises(ValueError, match="specialized"):
        ported.module.apply(ported.variables, other)
    # a batch size the Python never looked at is free
    y = ported.module.apply(ported.variables, jnp.ones((2, 3, 6, 6)))
    assert y.shape == (2, 5)


def test_emitted_source_keeps_the_guards():
    model = warmed(ShapeBranch(), (4, 3, 6, 6))
    x = torch.randn(4, 3, 6, 6, dtype=F64)
    ported = jaxbn.from_torch(model, x)
    emitted = emitted_model(ported)
    np.testing.assert_allclose(emitted.apply(ported.variables, jnp.asarray(x.numpy())), eval_output(ported, x),
                               rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="specialized"):
        emitted.apply(ported.variables, jnp.ones((4, 3, 12, 12)))


class DataBranch(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(3)

    def forward(self, x):
        if x.sum() > 0:
            return self.bn(x)
        return x


class ItemRead(torch.nn.Module):
    def forward(self, x):
        return x * float(x.max())


@pytest.mark.parametrize("model", [DataBranch(), ItemRead()], ids=["branch", "float"])
def test_data_dependent_python_is_refused(model):
    with pytest.raises(UnsupportedError, match="data-dependent"):
        jaxbn.from_torch(model.double(), torch.randn(4, 3, dtype=F64))


# ---------------------------------------------------------------- lists between blocks


class Branches(torch.nn.Module):
    """hrnet's pattern: a list in, entries replaced in place, a list out."""

    def __init__(self):
        super().__init__()
        self.branches = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.BatchNorm2d(4)) for _ in range(2))

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        for i in range(len(xs)):
            xs[i] = self.branches[i](xs[i])
        return [torch.relu(x) for x in xs]


class Fuse(torch.nn.Module):
    def forward(self, features, size):
        h, w = size
        return sum(F.interpolate(f, size=(h, w)) for f in features)


class MultiScale(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.down = torch.nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.body = Branches()
        self.fuse = Fuse()
        self.head = torch.nn.Linear(4, 5)

    def forward(self, x):
        x = self.stem(x)
        features = self.body([x, self.down(x)])
        y = self.fuse(features, x.shape[-2:])
        return self.head(y.mean((2, 3)))


def test_list_inputs_and_outputs_between_blocks():
    ported = check_exact(warmed(MultiScale(), (4, 3, 8, 8)), (4, 3, 8, 8))
    body = dict(ported.module.block.children)["body"]
    assert len(body.inputs) == 2  # the list's two tensors


# ---------------------------------------------------------------- tensors used directly


class LayerScale(torch.nn.Module):
    """ConvNeXt's layer scale and timm's Linear: parameters read in forward, a buffer, a frozen one."""

    def __init__(self, frozen=False):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.gamma = torch.nn.Parameter(torch.full((4, 1, 1), 0.5))
        self.frozen = torch.nn.Parameter(torch.ones(4, 1, 1), requires_grad=not frozen)
        self.register_buffer("shift", torch.linspace(-1, 1, 4).reshape(4, 1, 1))
        self.weight = torch.nn.Parameter(torch.randn(5, 4) * 0.3)

    def forward(self, x):
        x = self.bn(self.conv(x)) * self.gamma * self.frozen + self.shift
        return F.linear(x.mean((2, 3)), self.weight)


def test_parameters_and_buffers_read_in_forward_train_like_torch():
    ported = check_exact(warmed(LayerScale(), (4, 3, 6, 6)), (4, 3, 6, 6))
    assert ported.variables["params"]["gamma"].shape == (4, 1, 1)
    assert ported.variables["batch_stats"]["shift"].shape == (4, 1, 1)
    assert ported.frozen_params == ()


def test_a_frozen_parameter_read_in_forward_is_reported():
    ported = jaxbn.from_torch(LayerScale(frozen=True).double(), torch.randn(2, 3, 6, 6, dtype=F64))
    assert ported.frozen_params == ("params/frozen",)


class WritesBuffer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x):
        self.count += 1
        return x * self.count


def test_an_in_place_write_to_a_buffer_is_refused():
    with pytest.raises(UnsupportedError, match="parameter or buffer"):
        jaxbn.from_torch(WritesBuffer().double(), torch.randn(2, 3, dtype=F64))


def test_a_tensor_constant_is_refused_with_the_fix():
    class Constant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.ones(3)  # not registered

        def forward(self, x):
            return x * self.table

    with pytest.raises(UnsupportedError, match="register it as a buffer"):
        jaxbn.from_torch(Constant(), torch.randn(2, 3))


# ---------------------------------------------------------------- BatchNorm subclasses


class BatchNormAct(torch.nn.BatchNorm2d):
    """timm's BatchNormAct2d, shortened: torch's own statistics bookkeeping, F.batch_norm on its
    tensors, then drop and act."""

    def __init__(self, num_features, **kwargs):
        super().__init__(num_features, **kwargs)
        self.drop = torch.nn.Identity()
        self.act = torch.nn.SiLU()

    def forward(self, x):
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(x, self.running_mean if not self.training or self.track_running_stats else None,
                         self.running_var if not self.training or self.track_running_stats else None,
                         self.weight, self.bias, bn_training, factor, self.eps)
        return self.act(self.drop(x))


class OffByMomentum(BatchNormAct):
    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            self.training, 0.5, self.eps)


class ReadsMean(BatchNormAct):
    def forward(self, x):
        return super().forward(x) + self.running_mean.reshape(1, -1, 1, 1)


def norm_net(norm, **kwargs):
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), norm(4, **kwargs), torch.nn.Flatten(),
                               torch.nn.Linear(64, 5))


@pytest.mark.parametrize("kwargs", [{}, dict(momentum=None), dict(affine=False, eps=1e-3),
                                    dict(track_running_stats=False)], ids=str)
def test_batch_norm_subclass_with_its_own_forward_is_the_norm(kwargs):
    ported = check_exact(warmed(norm_net(BatchNormAct, **kwargs), (4, 3, 6, 6)), (4, 3, 6, 6))
    # the norm's variables sit at the subclass's own path, under torch's names
    assert set(ported.variables["params"].get("1", {})) == ({"weight", "bias"} if kwargs.get("affine", True) else set())


def test_a_frozen_batch_norm_subclass_stays_frozen():
    model = warmed(norm_net(BatchNormAct), (4, 3, 6, 6))
    model.train()
    model[1].eval()
    check_exact(model, (4, 3, 6, 6), train=False)


@pytest.mark.parametrize("norm", [OffByMomentum, ReadsMean])
def test_a_batch_norm_subclass_that_is_not_torch_s_norm_is_refused(norm):
    model = norm_net(norm)
    with pytest.raises(UnsupportedError, match="BatchNorm"):
        jaxbn.from_torch(model.double(), torch.randn(2, 3, 6, 6, dtype=F64))


def test_emitted_source_of_a_batch_norm_subclass_trains_the_same():
    model = warmed(norm_net(BatchNormAct, momentum=None), (4, 3, 6, 6))
    xs, ys = batches((4, 3, 6, 6))
    ported = jaxbn.from_torch(model, xs[0])
    emitted = emitted_model(ported)
    a = jax_sgd_steps(ported.module, ported.variables, xs, ys, 0.1)
    b = jax_sgd_steps(emitted, ported.variables, xs, ys, 0.1)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


# ---------------------------------------------------------------- torch-layer subclasses


class InitOnlyConv(torch.nn.Conv2d):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        torch.nn.init.zeros_(self.bias)


def test_a_torch_layer_subclass_without_its_own_forward_is_that_layer():
    model = torch.nn.Sequential(InitOnlyConv(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(64, 5))
    ported = check_exact(warmed(model, (4, 3, 6, 6)), (4, 3, 6, 6))
    assert dict(ported.module.block.children)["0"].cls == "Conv"  # kernel in Flax layout
    assert "kernel" in ported.variables["params"]["0"]


def test_torchvision_frozen_batch_norm_is_exact():
    FrozenBatchNorm2d = import_torchvision().ops.misc.FrozenBatchNorm2d

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(64, 5)).double()
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for name in ("weight", "bias", "running_mean"):
            getattr(model[1], name).copy_(torch.randn(4, generator=g, dtype=F64))
        model[1].running_var.copy_(torch.rand(4, generator=g, dtype=F64) + 0.5)
    ported = check_exact(model, (4, 3, 6, 6))
    assert set(ported.variables["batch_stats"]["1"]) == {"weight", "bias", "running_mean", "running_var"}


class Heads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.main = torch.nn.Conv2d(4, 2, 1)
        self.aux = torch.nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return {"out": self.main(x), "aux": self.aux(x)}


class DictNet(torch.nn.Module):
    """torchvision's segmentation models: a submodule and the model return dicts."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4))
        self.heads = Heads()

    def forward(self, x):
        heads = self.heads(torch.relu(self.body(x)))
        return {"out": heads["out"] * 2, "aux": heads["aux"]}


def test_dict_outputs_of_submodules_and_model():
    model = warmed(DictNet().train(), (4, 3, 6, 6))
    x = torch.randn(4, 3, 6, 6, dtype=F64)
    expected = {k: v.detach().numpy() for k, v in copy.deepcopy(model).eval()(x).items()}
    ported = jaxbn.from_torch(model, x)
    emitted = emitted_model(ported)
    for module, layout in ((ported.module, None), (emitted, None),
                           (jaxbn.from_torch(model, x, channels_last=True).module, "nhwc")):
        inputs = jnp.asarray(x.numpy())
        y = module.apply(ported.variables, inputs if layout is None else inputs.transpose(0, 2, 3, 1))
        assert set(y) == {"out", "aux"}
        for k in y:
            got = np.asarray(y[k]) if layout is None else np.asarray(y[k]).transpose(0, 3, 1, 2)
            np.testing.assert_allclose(got, expected[k], rtol=0, atol=1e-13)
