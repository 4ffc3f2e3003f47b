"""``jaxbn.translate.emit_source`` / ``python -m jaxbn port --emit``: source no user-chosen name breaks.

Each model is captured with ``jaxbn.from_torch``, its emitted source executed in a fresh namespace,
and the emitted ``Model`` must (1) build exactly the variables ``from_torch`` returns (same tree,
and porting the torch ``state_dict`` into it gives the same values), (2) compute what the
in-memory ``TracedModule`` computes, and (3) match torch in float64: eval and one SGD step in
train mode, within 100x torch's own sensitivity to a 1e-15 relative weight perturbation.
"""

from __future__ import annotations

import copy
import math
import struct
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxbn
from jaxbn import porting
from jaxbn.porting import UnsupportedError
from jaxbn.translate import emit_source
from jaxbn.translate.ir import NO_DEFAULT, Block, Layer, Op, Ref, Slice
from jaxbn.translate.module import TracedModule
from helpers import perturbed, rel_diff

F64 = torch.float64


# ---------------------------------------------------------------- helpers


def emitted(block, **kwargs):
    """(source, Model class) of the source written for ``block``, executed in a fresh namespace."""
    source = emit_source(block, **kwargs)
    module = types.ModuleType(f"emitted_model_{len(_EMITTED)}")  # a module, as the file would be
    _EMITTED.append(module)
    sys.modules[module.__name__] = module
    exec(compile(source, module.__name__, "exec"), module.__dict__)  # noqa: S102 - the emitted file
    return source, module.Model


_EMITTED: list = []


def in_mode(model, training):
    """A copy of ``model`` in ``model.train(training)``, modules whose mode differed from the
    root's keeping theirs (as the port does: ``model.train(); bn.eval()``)."""
    fixed = {name: m.training for name, m in model.named_modules() if m.training != model.training}
    model = copy.deepcopy(model).train(training)
    for name, m in model.named_modules():
        m.train(fixed.get(name, training))
    return model


def torch_step(model, x, w, lr):
    """One SGD step of ``sum(model(x) * w)`` in train mode on a copy: output, new state_dict."""
    model = in_mode(model, True)
    out = model(x)
    (out * w).sum().backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= lr * p.grad
    return out.detach().numpy(), {k: v.numpy() for k, v in model.state_dict().items()}


def jax_step(module, variables, x, w, lr):
    """The same step on a linen module: output, new variables."""

    @jax.jit
    def step(variables, x, w):
        def loss(params):
            out, updates = module.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
            return jnp.sum(out * w), (out, updates)

        (_, (out, updates)), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
        params = jax.tree.map(lambda p, g: p - lr * g, variables["params"], grads)
        return out, {**variables, **updates, "params": params}

    out, new = step(variables, x, w)
    return np.asarray(out), new


def assert_trees_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        a, e = np.asarray(a), np.asarray(e)
        assert a.dtype == e.dtype and a.shape == e.shape
        np.testing.assert_array_equal(a, e)


def check_emitted(model, x, *, lr=0.1, torch_check=True, torch_training=True):
    """The emitted Model of ``model`` against ``from_torch``'s module and against torch (eval, and
    one training step unless ``torch_training`` is false); its source."""
    ported = jaxbn.from_torch(model, x)
    source, Model = emitted(ported.module.block)
    xj = jnp.asarray(x.numpy())
    # the same variables: tree, shapes and dtypes of a fresh init, and the ported values
    init = Model().init(jax.random.PRNGKey(0), xj, train=False)
    assert jax.tree.structure(init) == jax.tree.structure(ported.variables), source
    assert jax.tree.map(lambda a: (a.shape, a.dtype), init) == jax.tree.map(
        lambda a: (a.shape, a.dtype), ported.variables)
    target = porting.target_from_module(Model(), xj, train=False)
    variables, _ = porting.torch_to_flax(model.state_dict(), target)
    assert_trees_equal(variables, ported.variables)
    # the same computation as the in-memory module
    y = Model().apply(variables, xj, train=False)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(ported.module.apply(variables, xj, train=False)))
    w = jnp.asarray(np.random.default_rng(5).normal(size=y.shape))
    out, new = jax_step(Model(), variables, xj, w, lr)
    ref_out, ref_new = jax_step(ported.module, variables, xj, w, lr)
    np.testing.assert_allclose(out, ref_out, rtol=0, atol=1e-13)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-13), new, ref_new)
    if torch_check:
        with torch.no_grad():
            expected = in_mode(model, False)(x).numpy()
        np.testing.assert_allclose(np.asarray(y), expected, rtol=0, atol=1e-9)
    if torch_check and torch_training:
        wt = torch.from_numpy(np.array(w))
        t_out, t_state = torch_step(model, x, wt, lr)
        p_out, p_state = torch_step(perturbed(model), x, wt, lr)
        j_state, _ = porting.flax_to_torch(new, model)
        sens_out, sens_state = rel_diff(p_out, t_out), max(rel_diff(p_state[k], t_state[k]) for k in t_state)
        assert 0 < sens_out and 0 < sens_state
        assert rel_diff(out, t_out) <= 100 * sens_out, (rel_diff(out, t_out), sens_out)
        for key in t_state:
            assert rel_diff(j_state[key], t_state[key]) <= 100 * sens_state, (key, sens_state)
    return source


def randomized(model, seed=0):
    """float64, non-trivial norm affine parameters and running statistics (two train passes)."""
    torch.manual_seed(seed)
    model = model.double()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                noise = 0.2 * torch.randn(p.shape, generator=g, dtype=F64)
                p.copy_((1.0 if name.endswith("weight") else 0.0) + noise)
    return model


# ---------------------------------------------------------------- 1. names the user chose


class TwoChildren(torch.nn.Module):
    """Children ``jnp`` and ``jnp_``: the model subtracts one from the other."""

    def __init__(self):
        super().__init__()
        self.jnp = torch.nn.Linear(4, 3)
        self.jnp_ = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.jnp(x) - self.jnp_(x)


def test_children_jnp_and_jnp_underscore_stay_two_values():
    model = randomized(TwoChildren())
    source = check_emitted(model, torch.randn(5, 4, dtype=F64))
    assert "import jax.numpy as jnp" in source


CHILD_NAMES = ["jnp", "jnp_", "jax", "F", "nn", "x", "self", "slice", "getattr", "setattr",
               "lambda", "class", "__priv", "a-b", "a_b", "1x", "\ufb01", "fi", "Model", "Conv", "bn"]


class Inner(torch.nn.Module):
    """A child for every awkward name (called through ``_modules``: some shadow Module methods),
    and an input named ``jnp`` that the parent passes by keyword."""

    def __init__(self):
        super().__init__()
        for name in CHILD_NAMES:
            if name == "bn":
                self.add_module(name, torch.nn.BatchNorm1d(4))
            else:
                self.add_module(name, torch.nn.Linear(4, 4))

    def forward(self, x, jnp):
        y = self._modules["bn"](x) + jnp
        for name in CHILD_NAMES[:-1]:
            y = y + self._modules[name](x)
        return y


class Outer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Inner()
        self.add_module("class", Inner())
        self.add_module("train_", torch.nn.Linear(4, 4))

    def forward(self, jnp):
        y = self.inner(jnp, jnp=jnp * 2.0)
        return self._modules["class"](y, jnp=self._modules["train_"](jnp)) + y


def test_any_child_and_input_name():
    model = randomized(Outer())
    source = check_emitted(model, torch.randn(6, 4, dtype=F64))
    assert "self.inner(" in source and "self.bn(" in source  # plain names stay readable


def _layer(name, cls="Linear", **kwargs):
    kwargs = {"in_features": 3, "out_features": 3, "param_dtype": np.dtype("float64"), **kwargs}
    return name, Layer(cls, tuple(kwargs.items()), torch_path=name, torch_type=f"torch.nn.{cls}")


def test_local_names_that_collide_after_sanitising_and_reserved_inputs():
    """Hand-made IR: results named ``a-b``, ``a_b``, ``a.b``, ``self``, ``F``, ``float``, inputs
    ``self``, ``train`` and ``lambda``: the emitted code equals the TracedModule."""
    ops = (
        Op("a-b", "module", "lin", (Ref("self"),)),
        Op("a_b", "function", "operator.mul", (Ref("a-b"), 2.0)),
        Op("a.b", "function", "operator.sub", (Ref("a-b"), Ref("a_b"))),
        Op("self_", "function", "operator.add", (Ref("a.b"), Ref("train"))),
        Op("F", "function", "relu", (Ref("self_"),)),
        Op("float", "function", "operator.mul", (Ref("F"), Ref("lambda"))),
        Op("nan", "function", "operator.eq", (Ref("float"), math.nan)),
        Op("inf", "function", "operator.add", (Ref("nan"), Ref("float"))),
    )
    block = Block("user.Weird", "", (("self", NO_DEFAULT), ("train", NO_DEFAULT), ("lambda", 0.5)), ops,
                  (Ref("inf"), Ref("a_b"), (-math.inf, None)), (_layer("lin"),))
    _, Model = emitted(block)
    args = [jnp.asarray(np.random.default_rng(i).normal(size=(2, 3))) for i in range(2)]
    variables = TracedModule(block).init(jax.random.PRNGKey(0), *args)
    assert_trees_equal(Model().init(jax.random.PRNGKey(0), *args), variables)
    expected = TracedModule(block).apply(variables, *args)
    actual = Model().apply(variables, *args)
    jax.tree.map(np.testing.assert_array_equal, actual, expected)


# ---------------------------------------------------------------- 2. class names the user chose


class ConvBlock(torch.nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = torch.nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(c_out, momentum=0.3)
        self.relu = torch.nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


CLASS_NAMES = ["Conv", "BatchNorm", "ReLU", "F", "jnp", "nn", "jax", "float", "slice", "getattr",
               "Model", "lambda", "BasicBlock2", "__Mangled"]


class UserClasses(torch.nn.Module):
    """A torch class per awkward name (``Conv``, ``BatchNorm``: jaxbn's layers' names)."""

    def __init__(self):
        super().__init__()
        for i, name in enumerate(CLASS_NAMES):
            cls = type(name, (ConvBlock,), {"__module__": "user.models"})
            self.add_module(f"b{i}", cls(3 if i == 0 else 4, 4))
        self.basic = type("BasicBlock", (ConvBlock,), {"__module__": "user.models"})(4, 4)

    def forward(self, x):
        for i in range(len(CLASS_NAMES)):
            x = self._modules[f"b{i}"](x)
        return self.basic(x).mean((2, 3))


def test_user_class_names_never_shadow_imports_or_builtins():
    model = randomized(UserClasses())
    source = check_emitted(model, torch.randn(2, 3, 5, 5, dtype=F64))
    assert source.count("(nn.Module):") == len(CLASS_NAMES) + 2  # one per torch class, and Model


# ---------------------------------------------------------------- 3. constants


class Constants(torch.nn.Module):
    """inf, -inf, nan, inexact floats, strings, tuples, bools, slices and an input default."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 6)
        self.act = torch.nn.LeakyReLU(1 / 3)
        self.inner = Scaled()

    def forward(self, x):
        x = self.inner(self.act(self.lin(x)))
        padded = torch.cat([x, x + float("-inf")], 1).softmax(1)[:, ::2]  # exp(-inf) = 0
        flags = (x == float("inf")) + (x == -float("inf"))  # (nan: the IR test below)
        y = torch.nn.functional.gelu(x, approximate="tanh") * (0.1 + 0.2) + padded + flags
        return y - y.mean((1,), keepdim=True) + torch.nn.functional.leaky_relu(x, 1e-300)


class Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 6)

    def forward(self, x, limit=float("inf"), scale=5e-324 / 5e-324 * 1.7976931348623157e308 / 1e308):
        return self.lin(x) * scale + (x == limit)


def test_constants_round_trip_in_a_model():
    model = randomized(Constants())
    source = check_emitted(model, torch.randn(4, 6, dtype=F64))
    assert "float('-inf')" in source or "-float('inf')" in source


@pytest.mark.parametrize("value", [
    0.1, 0.1 + 0.2, 1 / 3, -0.0, 0.0, 5e-324, 1.7976931348623157e308, -2.5e-308, math.inf, -math.inf,
    math.nan, -math.nan, 7, -7, 10 ** 30, True, False, None, Ellipsis, "a'b\"c\n\\", "",
    (), (1,), (1, (2.5, None, -math.inf)), Slice(1, None, -1), Slice(None, -math.inf, 2),
    complex(1.5, -math.inf), np.dtype("float64"), np.dtype(jnp.bfloat16), np.dtype("bool"),
])
def test_constant_source_round_trips_exactly(value):
    from jaxbn.translate.emit import constant_source

    source = constant_source(value)
    result = eval(source, {"jnp": jnp})  # noqa: S307 - the emitted expression
    assert _fingerprint(result) == _fingerprint(value), (value, source)


def _fingerprint(value):
    """Type and exact bits (nan sign included) of a constant, recursively."""
    if isinstance(value, Slice):
        value = slice(value.start, value.stop, value.step)
    if isinstance(value, slice):
        return "slice", tuple(_fingerprint(v) for v in (value.start, value.stop, value.step))
    if isinstance(value, tuple):
        return "tuple", tuple(_fingerprint(v) for v in value)
    if type(value) is float:
        return "float", struct.pack("<d", value)
    if type(value) is complex:
        return "complex", _fingerprint(value.real), _fingerprint(value.imag)
    if isinstance(value, (np.dtype, type)):  # np.dtype written as a jnp scalar type
        return "dtype", np.dtype(value)
    return type(value), value


def test_unwritable_constant_is_refused_by_name():
    from jaxbn.translate.emit import constant_source

    for value in (np.float64(1.0), object(), [1, 2]):
        with pytest.raises(UnsupportedError, match="cannot be written"):
            constant_source(value)


# ---------------------------------------------------------------- 4. one class per torch class, no noise


class Unit(torch.nn.Module):
    """Conv-BN-ReLU with no-op children (Identity, Dropout(p=0)) around it."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = torch.nn.Conv2d(c_in, c_out, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(c_out)
        self.skip = torch.nn.Identity()
        self.drop = torch.nn.Dropout(0.0)

    def forward(self, x):
        return self.drop(torch.relu(self.bn(self.conv(self.skip(x)))))


class Head(torch.nn.Module):
    """Needs no ``train``: no norm, dropout only at p=0."""

    def __init__(self, c):
        super().__init__()
        self.fc = torch.nn.Linear(c, 5)
        self.drop = torch.nn.Dropout(p=0.0)
        self.id = torch.nn.Identity()

    def forward(self, x):
        return self.id(self.fc(self.drop(x.mean((2, 3)))))


class Units(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = Unit(3, 8)
        self.b = Unit(8, 16)
        self.c = Unit(16, 16)
        self.head = Head(16)
        self.out = torch.nn.Identity()

    def forward(self, x):
        return self.out(self.head(self.c(self.b(self.a(x)))))


def test_one_class_per_torch_class_and_no_no_op_layers():
    source = check_emitted(randomized(Units()), torch.randn(3, 3, 6, 6, dtype=F64))
    assert source.count("class Unit(") == 1 and "class Unit2" not in source
    assert "Identity" not in source and "Dropout" not in source, source
    head = source[source.index("class Head("):source.index("class Model(")]
    assert "train" not in head.split('"""')[-1], head
    assert "self.head(c)" in source and "return head" in source, source


def test_float32_model_writes_no_default_arguments():
    torch.manual_seed(0)
    model = Units().eval()
    ported = jaxbn.from_torch(model, torch.zeros(2, 3, 6, 6))
    source, Model = emitted(ported.module.block)
    assert "param_dtype" not in source and "jnp" not in source, source
    norm = "BatchNorm(num_features=8, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True, axis=1)"
    assert norm in source
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 6, 6)), jnp.float32)
    shapes = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)  # noqa: E731
    assert shapes(Model().init(jax.random.PRNGKey(0), x)) == shapes(ported.variables)
    np.testing.assert_array_equal(np.asarray(Model().apply(ported.variables, x)),
                                  np.asarray(ported.module.apply(ported.variables, x)))


@pytest.mark.parametrize("name", ["resnet18"])  # mobilenet_v3_small, efficientnet_b0: 2.5-3 min each
def test_torchvision_models(name):
    """Emitted torchvision models: the same variables and results; Dropout(p=0) and stochastic
    depth with p=0 left out; one class per captured structure (run by hand with more names; the
    suite keeps one for CI's time)."""
    from test_from_torch import torchvision_model  # its torchvision import and model setup

    model = torchvision_model(name)
    # mobilenet_v3's hardsigmoid: torch's float32 backward constant (see test_from_torch.py)
    source = check_emitted(model, torch.randn(4, 3, 32, 32, dtype=F64),
                           torch_training=name != "mobilenet_v3_small")
    assert "Dropout" not in source and "StochasticDepth" not in source and "Identity" not in source
    classes = [line for line in source.splitlines() if line.startswith("class ")]
    assert len(classes) == len(set(classes))
    if name == "resnet18":
        assert classes == [f"class {c}(nn.Module):" for c in ("BasicBlock", "BasicBlock2", "Model")]


class ConvNorm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1)
        self.bn = torch.nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x))


class FrozenAndLive(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = ConvNorm()
        self.live = ConvNorm()

    def forward(self, x):
        return self.live(self.frozen(x))


def test_layer_with_a_fixed_mode_is_called_with_it_and_its_block_takes_no_train():
    """``model.train(); frozen.bn.eval()``: ``self.bn(conv, train=False)`` in a class of its own,
    whose ``__call__`` takes no ``train``."""
    model = randomized(FrozenAndLive()).train()
    model.frozen.bn.eval()
    source = check_emitted(model, torch.randn(4, 3, 5, 5, dtype=F64))
    frozen = source[source.index("class ConvNorm("):source.index("class ConvNorm2(")]
    assert "def __call__(self, x):" in frozen and "self.bn(conv, train=False)" in frozen, source
    assert "self.frozen(x)" in source and "self.live(frozen, train=train)" in source, source
