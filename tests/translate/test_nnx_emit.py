"""``emit_source(block, api="nnx")`` / ``python -m jaxbn port --nnx``: readable NNX source.

The emitted file, executed in a fresh module, must build what ``jaxbn.from_torch(...,
api="nnx")`` builds -- the same module tree (paths, layer classes, attributes and modes), the
same state paths and variable types, for ``build_nnx`` from the same ``nnx.Rngs(0)`` even the
same initial values -- and, with the ported values loaded through the file's own ``load``, match
torch in float64: eval outputs within 1e-9, and a training forward's output and updated buffers
(each module in the mode it had when translated).
"""

from __future__ import annotations

import copy
import sys
import types

import jax
import numpy as np
import pytest
import torch
from flax import nnx

import jaxbn
import jaxbn.nnx
from jaxbn import __main__ as cli
from jaxbn import checkpoint_io, porting
from jaxbn.porting.paths import names_from_tree
from jaxbn.translate import capture_mode_independent, emit_source
from jaxbn.translate.nnx_layers import FrozenParam
from jaxbn.translate.nnx_module import TracedBlock, build_nnx
from jaxbn.translate.tracing import torch_type_name
from helpers import import_torchvision
from test_capture_values import BatchNormAct  # timm's BatchNormAct2d, shortened

F64 = torch.float64


# ---------------------------------------------------------------- models


class Unit(torch.nn.Module):
    """A block reading its own parameter in forward."""

    def __init__(self, c):
        super().__init__()
        self.conv = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(c)
        self.gamma = torch.nn.Parameter(torch.full((c, 1, 1), 0.5))

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x))) * self.gamma + x


class Mixed(torch.nn.Module):
    """A BatchNorm subclass and an Identity in a Sequential, a ModuleList indexed in forward, a
    frozen norm, a flipped ``track_running_stats``, Dropout(0.5) in eval, a root parameter
    torch does not train and a root buffer."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), BatchNormAct(4, momentum=None),
                                        torch.nn.Identity())
        self.blocks = torch.nn.ModuleList([Unit(4), Unit(4)])
        self.frozen = torch.nn.BatchNorm2d(4)
        self.untracked = torch.nn.BatchNorm2d(4)
        self.untracked.track_running_stats = False
        self.drop = torch.nn.Dropout(0.5)
        self.head = torch.nn.Linear(4, 3)
        self.scale = torch.nn.Parameter(torch.full((4, 1, 1), 2.0), requires_grad=False)
        self.register_buffer("shift", torch.linspace(-1, 1, 3))

    def forward(self, x):
        x = self.stem(x)
        x = self.blocks[1](self.blocks[0](x))
        x = self.untracked(self.frozen(x)) * self.scale
        return self.head(self.drop(x.mean((2, 3)))) + self.shift


def randomized(model, seed=0):
    """float64, norm affine parameters and running statistics away from their initial values."""
    torch.manual_seed(seed)
    model = model.double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, dtype=F64))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.3 * torch.randn(b.shape, dtype=F64))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, dtype=F64))
            elif name.endswith("num_batches_tracked"):
                b.fill_(3)
    return model


def build_mixed(training=True):
    """``Mixed`` as translated: training, ``frozen`` and ``drop`` in eval (or all in eval)."""
    torch.manual_seed(0)
    model = randomized(Mixed()).train(training)
    model.frozen.eval()
    model.drop.eval()
    return model


# ---------------------------------------------------------------- helpers


_EMITTED: list = []


def emitted(source):
    """The emitted file executed as a fresh module."""
    module = types.ModuleType(f"emitted_nnx_{len(_EMITTED)}")
    _EMITTED.append(module)
    sys.modules[module.__name__] = module
    exec(compile(source, module.__name__, "exec"), module.__dict__)  # noqa: S102 - the emitted file
    return module


def containers(model):
    return {path: torch_type_name(m) for path, m in model.named_modules()}


def nnx_source(model, x):
    return emit_source(capture_mode_independent(model, x), "nnx", training=model.training,
                       containers=containers(model))


def described(model):
    """Each module's path -> (class, attributes): a translated block is ``'block'`` (or
    ``'block BatchNorm'``: a BatchNorm subclass), its attributes without ``program``."""
    modules = {}
    for path, m in nnx.iter_modules(model):
        blocky = isinstance(m, TracedBlock) or type(m).__module__.startswith("emitted_nnx_")
        kind = ("block BatchNorm" if isinstance(m, jaxbn.nnx.BatchNorm) else "block") if blocky else type(m)
        attributes = {k: v for k, v in vars(m).items()
                      if not k.startswith("_") and k != "program" and not isinstance(v, (nnx.Pytree, nnx.Variable))}
        modules[path] = kind, attributes, sorted(k for k in vars(m) if not k.startswith("_") and k != "program")
    return modules


def flat_state(model):
    """``{path: (variable type, value)}`` of the whole state (rng keys as their data)."""
    def value(v):
        return np.asarray(jax.random.key_data(v[...]) if isinstance(v, nnx.RngKey) else v[...])

    return {path: (type(v), value(v)) for path, v in nnx.to_flat_state(nnx.state(model))}


def assert_same_tree(actual, expected, values=False):
    assert described(actual) == described(expected)
    a, e = flat_state(actual), flat_state(expected)
    unfrozen = lambda kind: nnx.Param if kind is FrozenParam else kind  # noqa: E731 - a Param in the source
    assert {p: v[0] for p, v in a.items()} == {p: unfrozen(v[0]) for p, v in e.items()}
    for path in a if values else ():
        np.testing.assert_array_equal(a[path][1], e[path][1], err_msg=str(path))


def ported_variables(model, x):
    """What ``port --nnx --out`` writes: ``from_torch(api='nnx')``'s state, flat NNX names."""
    ported = jaxbn.from_torch(model, x, api="nnx")
    return ported, names_from_tree(nnx.state(ported, (nnx.Param, nnx.BatchStat, FrozenParam)))


def assert_matches_torch(model, x, emitted_model):
    """Training forward (each module in its translated mode) and eval against torch, float64."""
    xj = jax.numpy.asarray(x.numpy())
    forward = nnx.jit(lambda m, x: m(x))  # the buffer updates included
    reference = copy.deepcopy(model)
    with torch.no_grad():
        expected = reference(x).numpy()
    actual = forward(emitted_model, xj)
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=1e-9, atol=1e-9)
    state, _ = porting.flax_to_torch(nnx.state(emitted_model, (nnx.Param, nnx.BatchStat)), reference)
    for key, value in reference.state_dict().items():
        np.testing.assert_allclose(np.asarray(state[key]), value.numpy(), rtol=1e-12, atol=1e-12, err_msg=key)
    reference.eval()
    emitted_model.eval()
    with torch.no_grad():
        expected = reference(x).numpy()
    np.testing.assert_allclose(np.asarray(forward(emitted_model, xj)), expected, rtol=0, atol=1e-9)


def check(model, x):
    """Emitted source against ``from_torch(api='nnx')``, ``build_nnx`` and torch; the source."""
    source = nnx_source(model, x)
    module = emitted(source)
    fresh = module.Model(rngs=nnx.Rngs(0))
    built = build_nnx(capture_mode_independent(model, x), model.training, nnx.Rngs(0), containers(model))
    assert_same_tree(fresh, built, values=True)  # the same tree, modes and initial values
    ported, variables = ported_variables(model, x)
    assert_same_tree(fresh, ported)
    module.load(fresh, variables)
    assert_matches_torch(model, x, fresh)
    return source


# ---------------------------------------------------------------- tests


@pytest.mark.slow  # ~15 s: resnet18's first eager initialization compiles each parameter shape
def test_resnet18_source_is_from_torch_s_tree_and_computes_like_torch():
    tv = import_torchvision()
    torch.manual_seed(0)
    model = randomized(tv.models.resnet18(num_classes=10))
    source = check(model, torch.randn(2, 3, 32, 32, dtype=F64))
    classes = [line for line in source.splitlines() if line.startswith("class ")]
    assert classes == ["class BasicBlock(nnx.Module):", "class BasicBlock2(nnx.Module):", "class Model(nnx.Module):"]
    assert "def __init__(self, conv1, bn1, relu, conv2, bn2, downsample):" in source
    assert "layer1_0 = self.layer1[0](maxpool)" in source
    assert "downsample_1 = self.downsample[1](downsample_0)" in source
    assert "self.layer1 = Sequential(\n            BasicBlock(\n" in source
    assert "train" not in source.split('"""')[-1].replace("model.train()", ""), source
    assert "use_running_average" not in source  # all training, as torch's model


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_modes_containers_flips_and_a_batch_norm_subclass(training):
    model = build_mixed(training)
    source = check(model, torch.randn(4, 3, 6, 6, dtype=F64))
    assert "class BatchNormAct(BatchNorm):" in source and "super().__init__(**norm)" in source
    assert "batch_norm = super().__call__(x)" in source and "drop = self.drop(batch_norm)" in source
    assert "BatchNormAct(\n                num_features=4, eps=1e-05, momentum=None," in source
    assert "self.stem = Sequential(" in source and "self.blocks = ModuleList(" in source
    assert "blocks_1 = self.blocks[1](blocks_0)" in source and "stem_2 = self.stem[2](stem_1)" in source
    assert "self.untracked.track_running_stats = False\n" in source
    assert "mul = relu * self.gamma[...]" in source and "self.scale = nnx.Param(" in source
    assert "self.shift = nnx.BatchStat(" in source
    frozen = "self.frozen = BatchNorm(num_features=4, eps=1e-05, momentum=0.1, affine=True, " \
             "track_running_stats=True, axis=1, param_dtype=jnp.float64, use_running_average=True)"
    assert frozen in source and "self.drop = Dropout(rngs=rngs, deterministic=True)" in source
    assert source.count("use_running_average=True") == (1 if training else 5)


def test_names_python_cannot_spell_and_reserved_parameter_names():
    """A BatchNorm subclass's children ``a-b``, ``jnp``, ``nnx``, ``rngs`` (each a constructor
    parameter beside the norm's arguments); a container that is a plain torch module."""

    class Odd(BatchNormAct):
        def __init__(self, c):
            super().__init__(c)
            for name in ("a-b", "jnp", "nnx", "rngs"):
                self.add_module(name, torch.nn.Conv2d(c, c, 1))

        def forward(self, x):
            y = super().forward(x)
            for name in ("a-b", "jnp", "nnx", "rngs"):
                y = y + self._modules[name](y)
            return y

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.parts = torch.nn.Module()  # a container never called itself
            self.parts.add_module("0", Odd(3))
            self.parts.add_module("1", torch.nn.Conv2d(3, 3, 1))

        def forward(self, x):
            return getattr(self.parts, "1")(getattr(self.parts, "0")(x))

    model = randomized(Holder())
    source = check(model, torch.randn(2, 3, 4, 4, dtype=F64))
    assert "setattr(self, 'a-b', a_b)" in source and "self.jnp = jnp_" in source and "self.rngs = rngs_" in source
    assert "parts_0 = self.parts['0'](x)" in source and "parts_1 = self.parts['1'](parts_0)" in source
    assert "self.parts = Container(**{\n            '0': Odd(" in source


# ---------------------------------------------------------------- the command


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def port(capsys, *args):
    code = cli.main(["port", f"{__name__}:build_mixed", "--input-shape=4,3,6,6", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("suffix", [".msgpack", ".safetensors", ""])  # "": an Orbax directory
def test_port_nnx_writes_a_model_and_variables_that_match_torch(project, capsys, suffix):
    code, out, err = port(capsys, "--nnx", "--emit", "mixed_nnx.py", "--out", f"vars{suffix}")
    assert code == 0, err
    module = emitted((project / "mixed_nnx.py").read_text())
    variables = checkpoint_io.read_checkpoint(f"vars{suffix}")
    assert "blocks/1/gamma" in variables and "stem/1/running_mean" in variables and "scale" in variables
    model = module.Model(rngs=nnx.Rngs(0))
    module.load(model, variables)
    x = torch.randn(4, 3, 6, 6, dtype=F64)
    assert_matches_torch(build_mixed(), x, model)


def test_a_sequential_model_indexes_as_torch_s():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).double()
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    module = emitted(check(model, x))
    fresh = module.Model(rngs=nnx.Rngs(0))
    assert len(fresh) == 3 and isinstance(fresh[1], jaxbn.nnx.BatchNorm) and fresh[-1] is fresh[2]
    ported = jaxbn.from_torch(model, x, api="nnx")
    assert len(ported) == 3 and isinstance(ported[1], jaxbn.nnx.BatchNorm)


@pytest.mark.parametrize("flag", ["--channels-last", "--fold-bn"])
def test_port_nnx_refuses_linen_only_flags(project, capsys, flag):
    code, _, err = port(capsys, "--nnx", flag, "--emit", "m.py", "--out", "v.msgpack")
    assert code == 2 and err.count("\n") == 1 and "linen-only" in err and flag in err, err
    assert not any(project.iterdir())
