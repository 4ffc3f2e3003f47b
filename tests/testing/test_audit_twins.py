"""jaxbn.testing.audit / check_equivalence catch every hand-written twin that *trains* differently
from its torch model: flax.linen.BatchNorm's biased running variance, a wrong momentum
conversion / eps / affine, the wrong mode (a twin that ignores ``train``, frozen layers) and the
wrong feature axis (also when the shapes happen to allow it). torch (float64) is the oracle for
every claim a mismatch line makes about training."""

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxbn.linen as jl
from jaxbn import translate
from jaxbn.testing import CHANNELS_LAST, audit, check_equivalence

F64 = jnp.float64
BIASED = ("running_var update: torch the unbiased batch variance, Flax the biased one "
          "(flax.linen.BatchNorm cannot match torch in training: use jaxbn.linen.BatchNorm)")


class Net(torch.nn.Module):
    """conv -> BN -> relu -> conv -> BN, NCHW."""

    def __init__(self, eps: float = 1e-5, momentum: float | None = 0.1):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(4, eps=eps, momentum=momentum)
        self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = torch.nn.BatchNorm2d(4, eps=eps, momentum=momentum)

    def forward(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


Norm = Callable[[str, jax.Array, bool], jax.Array]  # (name, x, train) -> y


def jaxbn_norm(**kw) -> Norm:
    """A ``jaxbn.linen.BatchNorm`` on NCHW (``axis=1`` unless ``kw`` says otherwise)."""
    def norm(name, x, train):
        call = {"train": train} if "train" not in kw else {}
        return jl.BatchNorm(name=name, param_dtype=F64, **{"axis": 1, **kw})(x, **call)
    return norm


def flax_norm(**kw) -> Norm:
    """A ``flax.linen.BatchNorm`` on NCHW (``axis=1``, Flax momentum 0.9 unless ``kw`` says otherwise)."""
    def norm(name, x, train):
        call = {"use_running_average": not train} if "use_running_average" not in kw else {}
        return nn.BatchNorm(name=name, param_dtype=F64, **{"axis": 1, "momentum": 0.9, **kw})(x, **call)
    return norm


class Twin(nn.Module):
    """``Net`` in Flax, NCHW (torch-layout convs), with the given norm per BN layer."""

    bn1: Norm = jaxbn_norm()
    bn2: Norm = jaxbn_norm()

    @nn.compact
    def __call__(self, x, train=False):
        conv = lambda name, c_in: translate.layers.Conv(c_in, 4, (3, 3), padding=1, name=name, param_dtype=F64)  # noqa: E731
        x = nn.relu(self.bn1("bn1", conv("conv1", 3)(x), train))
        return self.bn2("bn2", conv("conv2", 4)(x), train)


def _net(**kw) -> Net:
    torch.manual_seed(0)
    return Net(**kw).double()


def _x(size: int = 6, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(batch, 3, size, size))


def _audit(net, twin, x, **kw):
    variables = twin.init(jax.random.PRNGKey(0), x)
    return audit.norm_mismatches(net, twin, variables, x, **kw)


# ---- 1. flax.linen.BatchNorm as the twin

def test_flax_batchnorm_with_the_right_conversion_is_reported_in_training_only():
    net, x = _net(), _x()
    twin = Twin(bn1=flax_norm(), bn2=flax_norm())
    assert _audit(net, twin, x, train=False) == []
    assert _audit(net, twin, x, train=True) == [f"bn1: {BIASED}", f"bn2: {BIASED}"]
    net.bn2.track_running_stats = False  # torch no longer updates bn2's running_var
    assert _audit(net, twin, x, train=True) == [
        f"bn1: {BIASED}", "bn2: track_running_stats: torch False, Flax True (flax.linen.BatchNorm)"]


def test_the_biased_running_var_claim_holds_against_torch():
    """One training step of torch's BatchNorm2d vs flax.linen.BatchNorm(momentum=0.9), float64:
    the running mean agrees, the running variance does not (measured 6.0e-3 apart)."""
    x = np.random.default_rng(1).normal(size=(2, 4, 3, 3))
    bn = torch.nn.BatchNorm2d(4).double().train()
    bn(torch.from_numpy(x))
    flax_bn = nn.BatchNorm(momentum=0.9, axis=1, param_dtype=F64)
    variables = flax_bn.init(jax.random.PRNGKey(0), x, use_running_average=True)
    _, updated = flax_bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    stats = updated["batch_stats"]
    assert np.max(np.abs(np.asarray(stats["mean"]) - bn.running_mean.numpy())) < 1e-12
    assert np.max(np.abs(np.asarray(stats["var"]) - bn.running_var.numpy())) > 1e-3


def test_flax_batchnorm_wrong_momentum_eps_and_affine_are_named():
    net, x = _net(eps=1e-3), _x()
    twin = Twin(bn1=flax_norm(momentum=0.1, epsilon=1e-3),      # torch's momentum, not Flax's
                bn2=flax_norm(epsilon=1e-5, use_bias=False))
    assert _audit(net, twin, x, train=False) == [
        "bn1: momentum: torch 0.1, Flax 0.9 (flax.linen.BatchNorm)",
        "bn2: eps: torch 0.001, Flax 1e-05 (flax.linen.BatchNorm)",
        "bn2: affine: torch True, Flax use_scale=True, use_bias=False (flax.linen.BatchNorm)",
    ]


# ---- 2. the mode of each norm in the audited call

def test_a_twin_that_ignores_train_is_reported_in_both_directions():
    net, x = _net(), _x()
    always_eval = Twin(bn1=jaxbn_norm(train=False), bn2=flax_norm(use_running_average=True))
    assert _audit(net, always_eval, x, train=False) == []
    assert _audit(net, always_eval, x, train=True) == [
        "bn1: mode: torch train, Flax eval (train=False)",
        "bn2: mode: torch train, Flax eval (use_running_average=True, flax.linen.BatchNorm)",
    ]
    always_train = Twin(bn1=jaxbn_norm(train=True), bn2=jaxbn_norm(train=True))
    assert _audit(net, always_train, x, train=True) == []
    assert _audit(net, always_train, x, train=False) == [
        "bn1: mode: torch eval, Flax train (train=True)",
        "bn2: mode: torch eval, Flax train (train=True)",
    ]
    # without a mode keyword the torch model's own mode is the reference
    net.eval()
    assert _audit(net, always_train, x, torch_training=None) == [
        "bn1: mode: torch eval, Flax train (train=True)",
        "bn2: mode: torch eval, Flax train (train=True)",
    ]
    assert _audit(net, always_train, x, torch_training=True) == []


def test_frozen_torch_layers_are_compared_with_the_twin_per_layer():
    net, x = _net(), _x()
    net.train()
    net.bn1.eval()  # frozen BN: running statistics, no update, while the model trains
    unfrozen = Twin()
    assert _audit(net, unfrozen, x, train=True) == [
        "bn1: mode: torch eval (frozen: bn1.eval() in a training model), Flax train (train=True)"]
    assert _audit(net, Twin(bn1=jaxbn_norm(train=False)), x, train=True) == []
    assert _audit(net, Twin(bn1=flax_norm(use_running_average=True)), x, train=True) == []
    wrong_layer = Twin(bn2=jaxbn_norm(train=False))
    assert _audit(net, wrong_layer, x, train=True) == [
        "bn1: mode: torch eval (frozen: bn1.eval() in a training model), Flax train (train=True)",
        "bn2: mode: torch train, Flax eval (train=False)",
    ]
    assert _audit(net, unfrozen, x, train=False) == []  # eval: torch's model.eval() freezes all
    assert net.training and not net.bn1.training and net.bn2.training  # the model is untouched


# ---- 3. the feature axis

def test_a_norm_on_the_wrong_axis_is_named():
    net, x = _net(), _x()  # BN inputs (2, 4, 6, 6): C = 4 is not the last dim
    twin = Twin(bn1=jaxbn_norm(axis=-1), bn2=flax_norm(axis=2))
    assert _audit(net, twin, x, train=False) == [
        "bn1: axis: torch normalizes its 4 channels (axis 1 of this (2, 4, 6, 6) input), Flax axis 3",
        "bn2: axis: torch normalizes its 4 channels (axis 1 of this (2, 4, 6, 6) input), "
        "Flax axis 2 (flax.linen.BatchNorm)",
    ]


def test_a_wrong_axis_is_named_when_the_shapes_allow_it():
    net, x = _net(), _x(size=4)  # BN inputs (2, 4, 4, 4): axis 1 and axis 3 both have size 4
    twin = Twin(bn2=jaxbn_norm(axis=-1))
    line = ("bn2: axis: torch normalizes its 4 channels (axis 1 of this (2, 4, 4, 4) input, "
            "channels-first), Flax axis 3")
    assert _audit(net, twin, x, train=False, channels_last=False) == [line]
    report = check_equivalence(net, twin, None, [x], steps=1)  # default Layout: channels-first
    assert line in report.settings and not report.ok


def test_a_wrong_axis_on_a_square_map_is_named_from_the_other_norms_layout():
    class Wider(Net):  # bn1 sees (2, 8, 4, 4): channels-first for sure; bn2 (2, 4, 4, 4) not
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
            self.conv2 = torch.nn.Conv2d(8, 4, 3, padding=1)

    class WiderTwin(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            x = translate.layers.Conv(3, 8, (3, 3), padding=1, name="conv1", param_dtype=F64)(x)
            x = nn.relu(jl.BatchNorm(axis=1, name="bn1", param_dtype=F64)(x, train=train))
            x = translate.layers.Conv(8, 4, (3, 3), padding=1, name="conv2", param_dtype=F64)(x)
            return jl.BatchNorm(name="bn2", param_dtype=F64)(x, train=train)  # axis=-1: wrong

    assert _audit(Wider().double(), WiderTwin(), _x(size=4), train=False) == [
        "bn2: axis: torch normalizes its 4 channels (axis 1 of this (2, 4, 4, 4) input, "
        "channels-first), Flax axis 3"]


def test_a_channels_last_twin_on_square_maps_is_not_blamed():
    class NHWCTwin(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            x = nn.Conv(4, (3, 3), padding=1, name="conv1", param_dtype=F64)(x)
            x = nn.relu(jl.BatchNorm(name="bn1", param_dtype=F64)(x, train=train))
            x = nn.Conv(4, (3, 3), padding=1, name="conv2", param_dtype=F64)(x)
            return jl.BatchNorm(name="bn2", param_dtype=F64)(x, train=train)

    net, x = _net(), _x(size=4)
    assert _audit(net, NHWCTwin(), x.transpose(0, 2, 3, 1), train=True, channels_last=True) == []
    report = check_equivalence(net, NHWCTwin(), None, [x], steps=2, layout=CHANNELS_LAST, atol=1e-10)
    assert report.ok, str(report)


# ---- 4. check_equivalence keeps the torch model's per-module modes

def test_check_equivalence_respects_a_frozen_torch_layer():
    net, x = _net(), [_x(), _x() + 1]
    with torch.no_grad():
        net(torch.from_numpy(x[1]))  # non-trivial running statistics
    net.train()
    net.bn1.eval()
    frozen = check_equivalence(net, Twin(bn1=jaxbn_norm(train=False)), None, x, steps=2, atol=1e-10)
    assert frozen.ok, str(frozen)
    assert frozen.torch_modes == ["train run: the torch model's own modes (bn1 eval: frozen)"]
    assert str(frozen).splitlines()[1] == "torch modes: train run: the torch model's own modes (bn1 eval: frozen)"
    unfrozen = check_equivalence(net, Twin(), None, x, steps=2, atol=1e-10)
    assert not unfrozen.ok
    assert unfrozen.settings == [
        "bn1: mode: torch eval (frozen: bn1.eval() in a training model), Flax train (train=True)"]
    train_steps = [s for s in unfrozen.steps if s.mode == "train"]
    assert not train_steps[0].ok and train_steps[0].first_variable.torch_name.startswith("bn1.")
    assert net.training and not net.bn1.training and net.bn2.training  # the caller's modes kept


def test_check_equivalence_keeps_the_modes_of_a_model_in_eval():
    net, x = _net(), [_x()]
    net.eval()
    net.bn2.train()  # the model is in eval, one layer trains
    report = check_equivalence(net, Twin(bn2=jaxbn_norm(train=True)), None, x, steps=1, modes=("eval",))
    assert report.torch_modes == ["eval run: the torch model's own modes (bn2 train)"]
    assert report.ok, str(report)
    report = check_equivalence(net, Twin(), None, x, steps=1, modes=("train",))  # model.train(): all train
    assert report.torch_modes == [] and report.ok, str(report)
    assert not net.training and net.bn2.training and not net.bn1.training


class NormEvalNet(Net):
    """mmdet's ``norm_eval=True``: ``train()`` keeps bn1 frozen."""

    def train(self, mode: bool = True):
        super().train(mode)
        self.bn1.eval()
        return self


def test_check_equivalence_runs_a_custom_train_method():
    net, x = NormEvalNet().double().eval(), [_x()]
    report = check_equivalence(net, Twin(bn1=jaxbn_norm(train=False)), None, x, steps=1, modes=("train",))
    assert report.torch_modes == ["train run: model.train() on a copy (bn1 eval: frozen)"]
    assert report.ok, str(report)
    assert _audit(net, Twin(), _x(), train=True) == [
        "bn1: mode: torch eval (frozen: bn1.eval() in a training model), Flax train (train=True)"]


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_a_uniform_model_gets_no_mode_note(mode):
    net, x = _net(), [_x()]
    report = check_equivalence(net, Twin(), None, x, steps=1, modes=(mode,), atol=1e-10)
    assert report.ok and report.torch_modes == [], str(report)
