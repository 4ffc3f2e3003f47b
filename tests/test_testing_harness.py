"""jaxbn.testing: passes a faithful port, and names the layer/variable of an injected mismatch."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxbn.linen as jl
from jaxbn import porting
from jaxbn.testing import assert_equivalent, check_equivalence

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
    return check_equivalence(net, module, variables, inputs, steps=3, to_flax_input=lambda x: x.transpose(0, 2, 3, 1),
                             loss="cross_entropy", targets=targets, learning_rate=0.5, **kw)


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
