"""jaxbn.testing: passes a faithful port, and names the layer/variable of an injected mismatch."""

import subprocess
import sys


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxbn.linen as jl
from jaxbn import porting
from jaxbn.testing import CHANNELS_LAST, SGD, Layout, assert_equivalent, check_equivalence

F64 = jnp.float64


class TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(4)
        self.conv2 = torch.nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.head = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3, momentum=None))

    def forward(self, x):
        x = self.conv2(torch.relu(self.bn(self.conv(x)))).mean((2, 3))
        return self.head(x)


class FlaxNet(nn.Module):
    bn_eps: float = 1e-5
    head_momentum: float | None = None

    def setup(self):
        self.conv = nn.Conv(4, (3, 3), padding=1, use_bias=False, param_dtype=F64)
        self.bn = jl.BatchNorm(eps=self.bn_eps, param_dtype=F64)
        self.conv2 = nn.Conv(4, (3, 3), strides=2, padding=((1, 1), (1, 1)), param_dtype=F64)
        self.head = [nn.Dense(3, param_dtype=F64), jl.BatchNorm(momentum=self.head_momentum, param_dtype=F64)]

    def __call__(self, x, train=False):
        x = self.conv2(nn.relu(self.bn(self.conv(x), train=train))).mean((1, 2))
        return self.head[1](self.head[0](x), train=train)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    net = TorchNet().double()
    net.train()
    with torch.no_grad():
        for _ in range(3):  # non-trivial running statistics
            net(torch.randn(8, 3, 6, 6, dtype=torch.float64) * 2 + 1)
    rng = np.random.default_rng(0)
    inputs = [rng.normal(size=(8, 3, 6, 6)) for _ in range(3)]
    targets = [rng.integers(0, 3, size=8) for _ in range(3)]
    return net, inputs, targets


def _run(net, module, inputs, targets, variables=None, **kw):
    return check_equivalence(net, module, variables, inputs, steps=3, layout=CHANNELS_LAST,
                             sgd=SGD(loss="cross_entropy", targets=targets, learning_rate=0.5), **kw)


def test_faithful_port_matches_in_eval_and_train_with_sgd(setup):
    net, inputs, targets = setup
    before = {k: v.clone() for k, v in net.state_dict().items()}
    report = _run(net, FlaxNet(), inputs, targets, atol=1e-10)
    assert report.ok, str(report)
    assert [(s.mode, s.step) for s in report.steps] == [("eval", 1), ("eval", 2), ("eval", 3),
                                                       ("train", 1), ("train", 2), ("train", 3)]
    assert report.max_output_diff("train") < 1e-10 and report.max_state_diff("train") < 1e-10
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # caller's model untouched


def test_wrong_eps_is_located_at_that_layer(setup):
    net, inputs, targets = setup
    report = _run(net, FlaxNet(bn_eps=1e-1), inputs, targets)
    failure = report.first_failure
    assert failure.mode == "eval" and failure.step == 1
    assert failure.first_layer.torch_name == "bn" and failure.first_layer.flax_name == "bn"
    assert failure.first_layer.max_abs_diff > 1e-3
    assert failure.first_variable is None  # eval: no state diverges
    with pytest.raises(AssertionError, match=r"first diverging layer:\s+bn \(flax bn\)"):
        assert_equivalent(net, FlaxNet(bn_eps=1e-1), None, inputs, steps=1, modes=("eval",),
                          to_flax_input=lambda x: x.transpose(0, 2, 3, 1))


def test_wrong_momentum_is_located_at_that_variable(setup):
    net, inputs, targets = setup
    report = _run(net, FlaxNet(head_momentum=0.1), inputs, targets, modes=("train",))
    first = report.steps[0]
    assert first.output_diff < 1e-10  # train mode uses batch statistics: outputs agree at step 1
    assert not first.ok and first.first_variable.torch_name == "head.1.running_mean"
    assert first.first_variable.flax_name == "batch_stats/head_1/running_mean"
    assert first.first_layer is None


def test_plain_apply_function_is_accepted_and_variables_still_located(setup):
    net, inputs, targets = setup

    def apply_fn(module):
        def apply(variables, x, training):
            if training:
                return module.apply(variables, x, train=True, mutable=["batch_stats"])
            return module.apply(variables, x, train=False), {}
        return apply

    target = porting.target_from_module(FlaxNet(), jnp.zeros((1, 6, 6, 3), F64))
    variables, _ = porting.torch_to_flax(net.state_dict(), target)
    good = _run(net, apply_fn(FlaxNet()), inputs, targets, variables, atol=1e-10)
    assert good.ok, str(good)
    bad = _run(net, apply_fn(FlaxNet(head_momentum=0.1)), inputs, targets, variables, modes=("train",))
    assert bad.steps[0].first_variable.torch_name == "head.1.running_mean"
    assert bad.steps[0].first_layer is None


# ---- layer outputs with C == H == W: the layout comes from the conversion, never from shapes

class TorchSquare(torch.nn.Module):
    """An 8-channel conv at 8x8: its NCHW and NHWC outputs have the same shape (2, 8, 8, 8)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


class FlaxSquare(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)), param_dtype=F64, name="conv")(x)
        x = jl.BatchNorm(param_dtype=F64, name="bn")(x, train=train)
        return nn.Dense(2, param_dtype=F64, name="head")(nn.relu(x).mean((1, 2)))


@pytest.fixture(scope="module")
def square():
    torch.manual_seed(1)
    net = TorchSquare().double()
    with torch.no_grad():
        net(torch.randn(4, 3, 8, 8, dtype=torch.float64))  # non-trivial running statistics
    rng = np.random.default_rng(1)
    inputs = [rng.normal(size=(2, 3, 8, 8)) for _ in range(2)]
    target = porting.target_from_module(FlaxSquare(), jnp.zeros((2, 8, 8, 3), F64))
    variables, _ = porting.torch_to_flax(net.state_dict(), target)
    return net, inputs, variables


@pytest.mark.parametrize("layout", [
    {"to_flax_input": lambda x: x.transpose(0, 2, 3, 1)},  # channels-last implied by the conversion
    {"layout": CHANNELS_LAST},
    {"layout": Layout(to_flax_input=lambda x: jnp.asarray(x).transpose(0, 2, 3, 1), channels_last=True)},
], ids=["implied", "CHANNELS_LAST", "stated"])
def test_exact_port_with_square_feature_maps_blames_no_layer(square, layout):
    net, inputs, variables = square
    report = check_equivalence(net, FlaxSquare(), variables, inputs, steps=2, atol=1e-12, **layout)
    assert report.ok, str(report)
    assert [s.first_layer for s in report.steps] == [None] * 4, str(report)


def test_broken_head_bias_is_blamed_on_the_head_not_the_square_conv(square):
    net, inputs, variables = square
    broken = jax.tree.map(lambda v: v, variables)
    broken["params"]["head"]["bias"] = variables["params"]["head"]["bias"] + 0.25
    report = check_equivalence(net, FlaxSquare(), broken, inputs, steps=1, modes=("eval",),
                               to_flax_input=lambda x: x.transpose(0, 2, 3, 1))
    failure = report.first_failure
    assert failure.first_layer.torch_name == "head", str(report)
    assert abs(failure.first_layer.max_abs_diff - 0.25) < 1e-12
    assert failure.first_variable.torch_name == "head.bias"


class TorchScaledSquare(TorchSquare):
    def forward(self, x):
        return super().forward(x / 4)


def test_a_conversion_that_also_rescales_needs_the_layout_stated(square):
    net, inputs, variables = square
    scaled = TorchScaledSquare().double()
    scaled.load_state_dict(net.state_dict())
    convert = lambda x: x.transpose(0, 2, 3, 1) / 4  # noqa: E731
    with pytest.raises(ValueError, match="channels_last=True"):
        check_equivalence(scaled, FlaxSquare(), variables, inputs, steps=1, to_flax_input=convert)
    report = check_equivalence(scaled, FlaxSquare(), variables, inputs, steps=2,
                               layout=Layout(to_flax_input=convert, channels_last=True), atol=1e-12)
    assert report.ok and [s.first_layer for s in report.steps] == [None] * 4, str(report)


# ---- the signature: grouped SGD / layout, and the keyword shorthands for their fields

def test_keyword_shorthands_give_the_same_report_as_the_dataclasses(setup):
    net, inputs, targets = setup
    grouped = _run(net, FlaxNet(bn_eps=1e-3), inputs, targets, modes=("train",))
    flat = check_equivalence(net, FlaxNet(bn_eps=1e-3), None, inputs, steps=3, modes=("train",),
                             to_flax_input=lambda x: x.transpose(0, 2, 3, 1),
                             loss="cross_entropy", targets=targets, learning_rate=0.5)
    assert not grouped.ok and str(flat) == str(grouped)


def test_partial_sgd_keywords_and_unknown_keywords_are_type_errors(setup):
    net, inputs, targets = setup
    with pytest.raises(TypeError, match="missing: learning_rate"):
        check_equivalence(net, FlaxNet(), None, inputs, loss="mse", targets=targets)
    with pytest.raises(TypeError, match="unexpected keyword argument 'learning_rte'"):
        check_equivalence(net, FlaxNet(), None, inputs, learning_rte=0.1)


# ---- optax is the `testing` extra, needed only for loss="cross_entropy"

def _without_optax(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter in which ``import optax`` fails."""
    return subprocess.run([sys.executable, "-c", "import sys; sys.modules['optax'] = None\n" + code],
                          capture_output=True, text=True, timeout=300)


def test_jaxbn_and_its_main_job_run_without_optax():
    # not jaxbn.nnx: flax.nnx itself imports optax (a dependency of flax, not of jaxbn)
    out = _without_optax(
        "import jaxbn, runpy\n"
        "for sub in ('linen', 'porting', 'checkpoint_io', 'testing'):\n"
        "    getattr(jaxbn, sub)\n"
        "runpy.run_module('jaxbn', run_name='__main__', alter_sys=True)\n")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "16 of 16 rows agree" in out.stdout


def test_cross_entropy_without_optax_names_the_extra():
    out = _without_optax(
        "from jaxbn.testing.harness import _losses\n"
        "_losses('mse')\n"
        "_losses('cross_entropy')\n")
    assert out.returncode != 0 and 'pip install "jaxbn[testing]"' in out.stderr, out.stderr
