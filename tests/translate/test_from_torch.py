"""jaxbn.from_torch / `python -m jaxbn port` against real torch (float64 via conftest).

Tolerances of the training comparisons are derived from torch's own sensitivity: the same three
SGD steps in torch with every weight perturbed by 1e-15 (relative) move the results by S; JAX
must stay within 10 * S (a wrong momentum or eps is off by >= 1e-6).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxbn
from helpers import Chain, REPO_ROOT, import_torchvision, warmed, jax_sgd_steps, perturbed, rel_diff, torch_sgd_steps
from jaxbn import porting, translate
from jaxbn.porting import UnsupportedError

ROOT = str(REPO_ROOT)
F64 = torch.float64


# ---------------------------------------------------------------- torch and JAX training runs


def compare_training(model, xs, ys, lr, ported=None):
    """Port ``model`` (unless given), train both three steps; the diffs and torch's sensitivity."""
    module, variables = ported or jaxbn.from_torch(model, xs[0])
    t_out, t_state = torch_sgd_steps(model, xs, ys, lr)
    p_out, p_state = torch_sgd_steps(perturbed(model), xs, ys, lr)
    j_out, j_vars = jax_sgd_steps(module, variables, xs, ys, lr)
    j_state, _ = porting.flax_to_torch(j_vars, model)
    return dict(
        logits=max(rel_diff(j, t) for j, t in zip(j_out, t_out)),
        state={k: rel_diff(j_state[k], t_state[k]) for k in t_state},
        sens_logits=max(rel_diff(p, t) for p, t in zip(p_out, t_out)),
        sens_state=max(rel_diff(p_state[k], t_state[k]) for k in t_state),
        counters_equal=all(np.array_equal(j_state[k], t_state[k]) for k in t_state
                           if k.endswith("num_batches_tracked")),
    )


def assert_training_matches(result):
    assert result["counters_equal"]
    assert result["logits"] <= 10 * result["sens_logits"], result
    worst = max(result["state"], key=result["state"].get)
    assert result["state"][worst] <= 10 * result["sens_state"], (worst, result["state"][worst], result["sens_state"])


def eval_diff(model, x, ported=None) -> float:
    module, variables = ported or jaxbn.from_torch(model, x)
    y = jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, jnp.asarray(x.numpy()))
    training = model.training
    model.eval()
    with torch.no_grad():
        expected = model(x).numpy()
    model.train(training)
    return float(np.max(np.abs(np.asarray(y) - expected)))


# ---------------------------------------------------------------- the six torchvision models

class ExactHardsigmoid(torch.nn.Module):
    """``hardsigmoid`` whose backward uses 1/6 in float64: torch's CPU kernel uses the float32
    constant (~3e-8 relative), a torch quirk the JAX port does not reproduce."""

    def forward(self, x):
        return torch.nn.functional.relu6(x + 3.0) / 6.0


MODEL_KWARGS = {
    "resnet18": {}, "resnet50": {}, "densenet121": {},
    "mobilenet_v2": dict(dropout=0.0), "mobilenet_v3_small": dict(dropout=0.0),
    "efficientnet_b0": dict(dropout=0.0, stochastic_depth_prob=0.0),
}


def torchvision_model(name):
    """Random init, float64, 1-D params perturbed (BN affine non-trivial), two train batches."""
    models = import_torchvision().models
    torch.manual_seed(0)
    model = getattr(models, name)(num_classes=10, **MODEL_KWARGS[name])
    return warmed(model.train(), (8, 3, 32, 32))


def batches(n=3, shape=(8, 3, 32, 32), classes=10, seed=3):
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(shape, generator=g, dtype=F64) for _ in range(n)],
            [torch.randint(0, classes, (shape[0],), generator=g) for _ in range(n)])


@pytest.mark.parametrize("name", [
    "resnet18",
    pytest.param("resnet50", marks=pytest.mark.slow),
    pytest.param("mobilenet_v2", marks=pytest.mark.slow),
    pytest.param("mobilenet_v3_small", marks=pytest.mark.slow),
    pytest.param("efficientnet_b0", marks=pytest.mark.slow),
    pytest.param("densenet121", marks=pytest.mark.slow),
])
def test_torchvision_model_eval_and_three_sgd_steps(name):
    model = torchvision_model(name)
    xs, ys = batches()
    ported = jaxbn.from_torch(model, xs[0])
    assert eval_diff(model, xs[0], ported) <= 1e-9
    if name == "mobilenet_v3_small":
        for parent in model.modules():
            for child_name, child in parent.named_children():
                if isinstance(child, torch.nn.Hardsigmoid):
                    setattr(parent, child_name, ExactHardsigmoid())
        ported = None  # re-port: the exact hardsigmoid is traced as relu6(x + 3) / 6
    assert_training_matches(compare_training(model, xs, ys, lr=0.1, ported=ported))


# ---------------------------------------------------------------- every core parameter

NET_SOURCE = '''
import torch


class CoreNet(torch.nn.Module):
    """Every BatchNorm core parameter a state_dict does not carry, plus the usual ops."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn_cumulative = torch.nn.BatchNorm2d(8, momentum=None)
        self.bn_no_stats = torch.nn.BatchNorm2d(8, track_running_stats=False)
        self.grouped = torch.nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4)
        self.bn_no_affine = torch.nn.BatchNorm2d(8, affine=False, momentum=0.3)
        self.bn_eps = torch.nn.BatchNorm2d(8)
        self.bn_eps.eps = 1e-2                      # assigned after construction
        self.bn_flipped = torch.nn.BatchNorm2d(8, momentum=0.01)
        self.bn_flipped.track_running_stats = False  # buffers exist, no longer used in training
        self.bn_unflipped = torch.nn.BatchNorm2d(8, track_running_stats=False)
        self.bn_unflipped.track_running_stats = True  # no buffers: batch statistics always
        self.sync = torch.nn.SyncBatchNorm(8, eps=1e-3, momentum=0.2)
        self.inorm = torch.nn.InstanceNorm2d(8, affine=True, track_running_stats=True)
        self.pool = torch.nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.se = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Conv2d(8, 4, 1),
                                      torch.nn.SiLU(), torch.nn.Conv2d(4, 8, 1), torch.nn.Hardswish())
        self.head = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.BatchNorm1d(6, eps=1e-3, momentum=0.05))
        self.out = torch.nn.Linear(6, 5)

    def forward(self, x):
        x = self.bn_cumulative(self.conv(x))
        x = torch.relu(self.bn_no_stats(x))
        x = self.bn_no_affine(self.grouped(x))
        x = self.bn_unflipped(self.bn_flipped(self.bn_eps(x)))
        x = torch.nn.functional.hardswish(self.inorm(self.sync(x)))
        b, c, h, w = x.size()                       # channel shuffle
        x = torch.transpose(x.view(b, 2, c // 2, h, w), 1, 2).contiguous().view(b, -1, h, w)
        a, z = x.chunk(2, dim=1)
        x = torch.cat([z, a], 1) * self.se(x)
        x = self.pool(x).mean((2, 3))
        return self.out(torch.flatten(self.head(x), 1))


def build():
    torch.manual_seed(0)
    net = CoreNet().double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim == 1:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        net.train()
        for _ in range(2):
            net(torch.randn(8, 3, 12, 12, generator=g, dtype=torch.float64))
    return net
'''


@pytest.fixture(scope="module")
def core_net(tmp_path_factory):
    directory = tmp_path_factory.mktemp("corenet")
    (directory / "corenet.py").write_text(NET_SOURCE)
    sys.path.insert(0, str(directory))
    try:
        import corenet
    finally:
        sys.path.remove(str(directory))
    return directory, corenet.build()


def test_core_parameters_are_carried_layer_by_layer(core_net):
    _, net = core_net
    module, variables = jaxbn.from_torch(net, torch.zeros(2, 3, 12, 12, dtype=F64))
    layers = {layer.torch_path: layer for _, layer in _layers(module.block)}
    for path, s in porting.norm_settings(net).items():
        kwargs = dict(layers[path].kwargs)
        assert (kwargs["eps"], kwargs["momentum"], kwargs["affine"], kwargs["track_running_stats"]) == (
            s.eps, s.momentum, s.affine, s.has_buffers), path
        assert dict(layers[path].call_kwargs).get("track_running_stats", s.has_buffers) == s.track_running_stats
    settings = porting.norm_settings(net)
    assert settings["bn_cumulative"].momentum is None and settings["bn_eps"].eps == 1e-2
    assert settings["bn_flipped"].has_buffers and not settings["bn_flipped"].track_running_stats
    assert not settings["bn_unflipped"].has_buffers and settings["bn_unflipped"].track_running_stats
    assert settings["sync"].torch_type == "SyncBatchNorm" and settings["inorm"].family.name == "InstanceNorm"


def _layers(block, prefix=()):
    for name, child in block.children:
        if isinstance(child, translate.Block):
            yield from _layers(child, prefix + (name,))
        else:
            yield prefix + (name,), child


def test_core_net_eval_and_training_match_torch(core_net):
    _, net = core_net
    xs, ys = batches(shape=(8, 3, 12, 12), classes=5)
    assert eval_diff(net, xs[0]) <= 1e-12
    assert_training_matches(compare_training(net, xs, ys, lr=0.2))


def test_round_trip_to_torch_is_bit_exact(core_net):
    _, net = core_net
    _, variables = jaxbn.from_torch(net, torch.zeros(2, 3, 12, 12, dtype=F64))
    # flax_to_torch keeps the model's version metadata: without it torch's BatchNorm adds
    # num_batches_tracked to a layer built without buffers that tracks now (bn_unflipped).
    state, _ = porting.flax_to_torch(variables, net, as_torch=True)
    fresh = copy.deepcopy(net)
    for p in fresh.state_dict().values():
        p.zero_()
    fresh.load_state_dict(state, strict=True)
    for key, value in net.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_channels_last_takes_nhwc(core_net):
    _, net = core_net
    x = torch.randn(4, 3, 12, 12, dtype=F64)
    module, variables = jaxbn.from_torch(net, x)
    nhwc, nhwc_variables = jaxbn.from_torch(net, x, channels_last=True)
    x = jnp.asarray(x.numpy())
    y, _ = module.apply(variables, x, train=True, mutable=["batch_stats"])
    y_last, _ = nhwc.apply(nhwc_variables, jnp.moveaxis(x, 1, -1), train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(y_last), np.asarray(y), rtol=0, atol=1e-12)


def test_port_cli_emits_a_torch_free_model_with_the_same_outputs(core_net, tmp_path):
    directory, net = core_net
    torch.save(net.state_dict(), tmp_path / "model.pt")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, str(directory)]))
    run = subprocess.run(
        [sys.executable, "-m", "jaxbn", "port", "corenet:build", "--input-shape", "2,3,12,12",
         "--checkpoint", str(tmp_path / "model.pt"), "--emit", "model_flax.py", "--out", "variables.msgpack"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    source = (tmp_path / "model_flax.py").read_text()
    assert "class Model(nn.Module)" in source
    assert not any(line.startswith(("import torch", "from torch ", "from torch.")) for line in source.splitlines())
    assert "BatchNorm(num_features=8, eps=0.01, momentum=0.1," in source  # eps assigned after construction
    assert "momentum=None" in source and "track_running_stats=False)" in source

    x = np.random.default_rng(0).normal(size=(4, 3, 12, 12))
    np.save(tmp_path / "x.npy", x)
    script = textwrap.dedent("""
        import sys
        sys.modules["torch"] = None           # the emitted model must not need torch
        import jax, numpy as np
        jax.config.update("jax_enable_x64", True)
        from jaxbn import porting
        from model_flax import Model
        x = np.load("x.npy")
        target = porting.target_from_module(Model(), x, train=False)
        variables, _ = porting.load_variables("variables.msgpack", target)
        y_eval = Model().apply(variables, x, train=False)
        y_train, updates = Model().apply(variables, x, train=True, mutable=["batch_stats"])
        np.savez("out.npz", eval=y_eval, train=y_train,
                 mean=updates["batch_stats"]["head_1"]["running_mean"])
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=ROOT),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    emitted = np.load(tmp_path / "out.npz")

    module, variables = jaxbn.from_torch(net, torch.zeros(2, 3, 12, 12, dtype=F64))
    y_eval = module.apply(variables, jnp.asarray(x), train=False)
    y_train, updates = module.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
    np.testing.assert_array_equal(emitted["eval"], np.asarray(y_eval))
    np.testing.assert_array_equal(emitted["train"], np.asarray(y_train))
    np.testing.assert_array_equal(emitted["mean"], np.asarray(updates["batch_stats"]["head_1"]["running_mean"]))
    net.eval()
    with torch.no_grad():
        np.testing.assert_allclose(emitted["eval"], net(torch.from_numpy(x)).numpy(), rtol=0, atol=1e-12)
    net.train()


# ---------------------------------------------------------------- layers against torch


class Pools(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.reflect = torch.nn.Conv2d(3, 6, 3, padding=1, padding_mode="reflect")
        self.same = torch.nn.Conv2d(6, 6, 4, padding="same", dilation=2, groups=3)
        self.max_ceil = torch.nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.avg = torch.nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)
        self.avg_incl = torch.nn.AvgPool2d(2, stride=2, padding=1, ceil_mode=True)
        self.avg_div = torch.nn.AvgPool2d(2, divisor_override=3)
        self.adaptive = torch.nn.AdaptiveAvgPool2d((3, None))
        self.adaptive_max = torch.nn.AdaptiveMaxPool2d(2)
        self.drop = torch.nn.Dropout(0.3)
        self.conv1d = torch.nn.Conv1d(6, 4, 3, stride=2)
        self.bn1d = torch.nn.BatchNorm1d(4)
        self.pool1d = torch.nn.AvgPool1d(2)

    def forward(self, x):
        x = self.drop(self.same(self.reflect(x)))
        a = self.max_ceil(x) + self.avg(x)
        b = self.avg_incl(x)[:, :, :3, :4] + self.avg_div(x)[..., :3, :4]
        c = torch.nn.functional.max_pool2d(x, 2, ceil_mode=True)
        d = torch.nn.functional.adaptive_avg_pool2d(x, (3, 7))
        e = self.adaptive_max(x)
        f = self.pool1d(self.bn1d(self.conv1d(x.mean(3))))
        parts = [a, b, c, d, e, f, self.adaptive(x)]
        return torch.cat([p.flatten(1) for p in parts], 1)


@pytest.mark.parametrize("size", [7, 9])
def test_convs_and_pools_match_torch_exactly(size):
    torch.manual_seed(size)
    net = Pools().double().eval()
    x = torch.randn(2, 3, size, size + 2, dtype=F64)
    module, variables = jaxbn.from_torch(net, x)
    y = module.apply(variables, jnp.asarray(x.numpy()), train=False)
    with torch.no_grad():
        np.testing.assert_allclose(np.asarray(y), net(x).numpy(), rtol=0, atol=1e-13)


def test_dropout_draws_from_the_dropout_rng_in_training():
    net = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.Dropout(0.5)).double()
    module, variables = jaxbn.from_torch(net, torch.zeros(3, 4, dtype=F64))
    x = jnp.ones((3, 4))
    np.testing.assert_array_equal(module.apply(variables, x, train=False), module.apply(variables, x))
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['trian'\]"):
        module.apply(variables, x, trian=True)
    with pytest.raises(Exception, match="dropout"):
        module.apply(variables, x, train=True)
    y = module.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(0)})
    zeros = float(jnp.mean(y == 0))
    assert 0.3 < zeros < 0.7
    kept = np.asarray(y != 0)
    np.testing.assert_allclose(np.asarray(y)[kept], 2 * np.asarray(module.apply(variables, x))[kept])


# ---------------------------------------------------------------- refusals


def test_unsupported_module_is_named_with_its_type():
    class WithRNN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv1d(3, 4, 1)
            self.rnn = torch.nn.LSTM(4, 4)

        def forward(self, x):
            return self.rnn(self.conv(x).transpose(1, 2))[0]

    with pytest.raises(UnsupportedError, match=r"^rnn \(torch\.nn\.LSTM\) is not supported$"):
        jaxbn.from_torch(WithRNN(), torch.zeros(1, 3, 5))


def test_unsupported_operation_is_named():
    class Cumsum(torch.nn.Module):
        def forward(self, x):
            return torch.cumsum(x, 1)

    with pytest.raises(UnsupportedError, match=r"the model \(.*Cumsum\): the operation torch\.cumsum is not supported"):
        jaxbn.from_torch(Cumsum(), torch.zeros(1, 3))


def test_forward_branching_on_training_is_refused():
    class Aux(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x) * 2 if self.training else self.fc(x)

    with pytest.raises(UnsupportedError, match=r"^head \(.*Aux\): its forward runs different operations in train and eval"):
        jaxbn.from_torch(Chain(head=Aux()), torch.zeros(1, 3))


def test_import_jaxbn_does_not_import_torch():
    code = "import sys, jaxbn; jaxbn.from_torch; import jaxbn.porting; assert 'torch' not in sys.modules"
    run = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=ROOT),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


class NormVariants(torch.nn.Module):
    """BatchNorm1d/3d, a materialized lazy BatchNorm, InstanceNorm1d/3d, functional dropout p=0."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(2, 4, 3, padding=1)
        self.bn3d = torch.nn.BatchNorm3d(4, momentum=0.2)
        self.lazy = torch.nn.LazyBatchNorm3d(eps=1e-4, momentum=None)
        self.in3d = torch.nn.InstanceNorm3d(4, affine=True)
        self.in1d = torch.nn.InstanceNorm1d(4, track_running_stats=True, momentum=0.3)
        self.bn1d = torch.nn.BatchNorm1d(4, affine=False)
        self.out = torch.nn.Linear(4, 3)

    def forward(self, x):
        x = self.in3d(self.lazy(self.bn3d(self.conv(x))))
        x = self.bn1d(self.in1d(x.flatten(2)))
        return self.out(torch.nn.functional.dropout(x.mean(2), p=0.0, training=self.training))


def test_norm_variants_and_lazy_modules():
    torch.manual_seed(0)
    net = NormVariants().double()
    with pytest.raises(UnsupportedError, match=r"^lazy \(torch\.nn\.LazyBatchNorm3d\) has not been materialized"):
        jaxbn.from_torch(net, torch.zeros(2, 2, 3, 3, 3, dtype=F64))
    with torch.no_grad():
        net(torch.randn(8, 2, 3, 3, 3, dtype=F64))  # materializes the lazy layer, moves the statistics
    assert type(net.lazy) is torch.nn.BatchNorm3d and porting.norm_settings(net)["lazy"].momentum is None
    xs, ys = batches(shape=(8, 2, 3, 3, 3), classes=3)
    assert eval_diff(net, xs[0]) <= 1e-12
    assert_training_matches(compare_training(net, xs, ys, lr=0.2))


def test_stochastic_depth_draws_whole_rows():
    ops = import_torchvision().ops
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), ops.StochasticDepth(0.5, "row")).double()
    module, variables = jaxbn.from_torch(net, torch.zeros(64, 4, dtype=F64))
    x = jnp.ones((64, 4))
    plain = module.apply(variables, x, train=False)
    net.eval()
    with torch.no_grad():
        np.testing.assert_allclose(np.asarray(plain), net(torch.ones(64, 4, dtype=F64)).numpy(), rtol=0, atol=1e-14)
    y = np.asarray(module.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)}))
    dropped = np.all(y == 0, axis=1)
    assert 10 < dropped.sum() < 54
    np.testing.assert_allclose(y[~dropped], 2 * np.asarray(plain)[~dropped])
