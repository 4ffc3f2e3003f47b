"""``jaxbn.from_torch(model, x, api="nnx")``: the NNX module tree mirroring torch's, against torch
itself (float64).

Whole models (torchvision's ResNet-18 and MobileNetV3-Small, timm's RegNetX-200MF with its
``BatchNormAct2d``): eval within 1e-9, two SGD steps with ``nnx.Optimizer`` within 100x torch's
own sensitivity (the same steps with every weight perturbed by 1e-15 relative), counters equal and
the strict round trip through ``nnx.state`` bit-exact. Then what NNX adds over linen, each checked
against the torch module doing the same: attribute assignment after translation (``momentum =
None``, ``track_running_stats = False``, dropout's ``p``), per-module modes and the frozen-BatchNorm
fine-tuning recipe, ``requires_grad=False`` parameters, torch's tree and indexing.
"""

from __future__ import annotations

import copy

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jaxbn
from helpers import (assert_round_trip_exact, import_torchvision, jax_cross_entropy, nnx_sgd_steps, perturbed,
                     rel_diff, torch_sgd_steps, warmed)
from jaxbn import porting
from jaxbn.translate.nnx_layers import FrozenParam

F64 = torch.float64


def square(out, y):
    return (out ** 2).mean()


def jax_square(out, y):
    return jnp.mean(out ** 2)


def whole_model(name: str) -> torch.nn.Module:
    tv = import_torchvision()
    torch.manual_seed(0)
    if name == "timm_regnetx_002":
        import timm

        model = timm.create_model("regnetx_002", pretrained=False, num_classes=10)
    else:
        model = getattr(tv.models, name)(num_classes=10)
    for module in model.modules():  # random masks cannot be compared step by step
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return warmed(model.train(), (4, 3, 64, 64), scale=0.1)


def nnx_state_as_torch(model: nnx.Module, like: torch.nn.Module) -> dict:
    state, _ = porting.flax_to_torch(nnx.state(model), like)
    return state


def batches(shape, n=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=F64) for _ in range(n)]


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small",
                                  pytest.param("timm_regnetx_002", marks=pytest.mark.slow)])
def test_nnx_model_matches_torch(name):
    model = whole_model(name)
    xs = batches((4, 3, 64, 64))
    ported = jaxbn.from_torch(model, xs[0], api="nnx")
    assert isinstance(ported, nnx.Module)
    assert_round_trip_exact(model, nnx.state(ported))

    evaluated = copy.deepcopy(ported)
    evaluated.eval()
    with torch.no_grad():
        expected = copy.deepcopy(model).eval()(xs[0]).numpy()
    actual = nnx.jit(lambda m, x: m(x))(evaluated, jnp.asarray(xs[0].numpy()))
    assert np.max(np.abs(np.asarray(actual) - expected)) <= 1e-9

    lr, ys = 0.05, [None, None]
    t_out, t_state = torch_sgd_steps(model, xs, ys, lr, loss=square)
    p_out, p_state = torch_sgd_steps(perturbed(model), xs, ys, lr, loss=square)
    j_out, trained = nnx_sgd_steps(ported, xs, ys, lr, loss=jax_square)
    j_state = nnx_state_as_torch(trained, model)
    sensitivity = max(max(rel_diff(p, t) for p, t in zip(p_out, t_out)),
                      max(rel_diff(p_state[k], t_state[k]) for k in t_state))
    assert max(rel_diff(j, t) for j, t in zip(j_out, t_out)) <= 100 * sensitivity
    worst = max(t_state, key=lambda k: rel_diff(j_state[k], t_state[k]))
    assert rel_diff(j_state[worst], t_state[worst]) <= 100 * sensitivity, (worst, sensitivity)
    counters = [k for k in t_state if k.endswith("num_batches_tracked")]
    assert counters and all(np.array_equal(j_state[k], t_state[k]) for k in counters)


# ---------------------------------------------------------------- a small model, attribute by attribute


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.BatchNorm2d(6),
                                        torch.nn.ReLU())
        self.blocks = torch.nn.ModuleList([torch.nn.Conv2d(6, 6, 3, padding=1, bias=False),
                                           torch.nn.BatchNorm2d(6)])
        self.drop = torch.nn.Dropout(0.5)
        self.head = torch.nn.Linear(6, 5)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(self.blocks[1](self.blocks[0](x))) + x
        return self.head(self.drop(x.mean((2, 3))))


def small(seed=0):
    torch.manual_seed(seed)
    return warmed(Small().train(), (4, 3, 8, 8))


def run_both(torch_model, nnx_model, xs):
    """Each input through both (in the modes they are in): the largest output difference."""
    worst = 0.0
    for x in xs:
        expected = torch_model(x).detach().numpy()
        worst = max(worst, float(np.max(np.abs(np.asarray(nnx_model(jnp.asarray(x.numpy()))) - expected))))
    return worst


def state_difference(torch_model, nnx_model):
    expected = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    actual = nnx_state_as_torch(nnx_model, torch_model)
    assert actual.keys() == expected.keys()
    return max(float(np.max(np.abs(actual[k] - expected[k]), initial=0.0)) for k in expected)


def test_nnx_tree_mirrors_torch_names_and_indexing():
    model = small()
    ported = jaxbn.from_torch(model, batches((4, 3, 8, 8))[0], api="nnx")
    assert isinstance(ported.stem[1], jaxbn.nnx.BatchNorm) and ported.stem[1].axis == 1
    assert len(ported.stem) == 3 and len(ported.blocks) == 2
    assert isinstance(ported.blocks[-1], jaxbn.nnx.BatchNorm)
    torch_names = {k.rsplit(".", 1)[0] for k in model.state_dict()}
    variables = nnx.state(ported, nnx.Not(nnx.RngState))  # not the dropout layer's random stream
    nnx_names = {".".join(map(str, path[:-1])) for path, _ in nnx.to_flat_state(variables)}
    assert nnx_names == torch_names
    # a torch Sequential is callable here too
    x = batches((4, 3, 8, 8))[0]
    model.eval(), ported.eval()
    with torch.no_grad():
        expected = model.stem(x).numpy()
    assert np.max(np.abs(np.asarray(ported.stem(jnp.asarray(x.numpy()))) - expected)) <= 1e-12


def assign(model, change):
    bn = model.stem[1]
    if change == "momentum_none":
        bn.momentum = None
    elif change.startswith("no_running_stats"):
        bn.track_running_stats = False
    else:
        bn.eps = 0.5
    if change == "no_running_stats_in_eval":
        model.eval()


@pytest.mark.parametrize("change, matters", [("momentum_none", True), ("no_running_stats_in_train", True),
                                             ("eps", True), ("no_running_stats_in_eval", False)])
def test_attribute_assignment_changes_behaviour_as_in_torch(change, matters):
    """Each assignment acts as in torch; ``track_running_stats = False`` on a layer built with
    buffers changes nothing in eval (torch still normalizes with its running statistics:
    docs/semantics.md), and here neither."""
    model = small()
    model.drop.p = 0.0
    xs = batches((4, 3, 8, 8), n=3)
    ported = jaxbn.from_torch(model, xs[0], api="nnx")
    before = copy.deepcopy(model)
    assign(model, change)
    assign(ported, change)
    with torch.no_grad():
        assert run_both(model, ported, xs) <= 1e-12
    assert state_difference(model, ported) <= 1e-12
    # whether torch without the assignment computes otherwise
    if change == "no_running_stats_in_eval":
        before.eval()
    with torch.no_grad():
        outputs = max(float(np.max(np.abs(before(x).numpy() - model(x).numpy()))) for x in xs)
    buffers = max(float(np.max(np.abs(v.numpy() - model.state_dict()[k].numpy()), initial=0.0))
                  for k, v in before.state_dict().items())
    assert (max(outputs, buffers) > 1e-6) is matters


def test_frozen_batch_norm_fine_tuning_as_in_torch():
    """``model.train(); bn.eval(); bn.weight.requires_grad_(False)``: the NNX model starts in the
    same per-module modes, its frozen parameters are FrozenParam (the optimizer leaves them), and
    two SGD steps match torch's; then ``model.train()`` unfreezes both and re-freezing works the
    same way."""
    model = small()
    model.drop.p = 0.0
    model.stem[1].eval()
    for p in model.stem[1].parameters():
        p.requires_grad_(False)
    xs = batches((4, 3, 8, 8))
    ys = [torch.tensor([0, 1, 2, 3]), torch.tensor([4, 3, 2, 1])]
    ported = jaxbn.from_torch(model, xs[0], api="nnx")
    assert ported.stem[1].use_running_average is True and ported.blocks[1].use_running_average is False
    assert isinstance(ported.stem[1].weight, FrozenParam) and isinstance(ported.stem[1].bias, FrozenParam)
    frozen = {path for path, _ in nnx.to_flat_state(nnx.state(ported, FrozenParam))}
    assert frozen == {("stem", "1", "weight"), ("stem", "1", "bias")}

    lr = 0.1
    t_out, t_state = torch_sgd_steps(model, xs, ys, lr, train=False)
    j_out, trained = nnx_sgd_steps(copy.deepcopy(ported), xs, ys, lr, loss=jax_cross_entropy)
    assert max(rel_diff(j, t) for j, t in zip(j_out, t_out)) <= 1e-12
    j_state = nnx_state_as_torch(trained, model)
    assert all(rel_diff(j_state[k], t_state[k]) <= 1e-12 for k in t_state)
    assert np.array_equal(j_state["stem.1.running_mean"], model.stem[1].running_mean.numpy())  # frozen
    assert np.array_equal(j_state["stem.1.weight"], model.stem[1].weight.detach().numpy())

    # torch's model.train() unfreezes every module; re-freezing is the user's, in both
    for m in (model, ported):
        m.train()
    assert ported.stem[1].use_running_average is False
    with torch.no_grad():
        assert run_both(copy.deepcopy(model), copy.deepcopy(ported), xs[:1]) <= 1e-12
    model.stem[1].eval(), ported.stem[1].eval()
    model.drop.eval(), ported.drop.eval()
    with torch.no_grad():
        assert run_both(model, ported, xs) <= 1e-12
        assert state_difference(model, ported) <= 1e-12


def test_dropout_modes_and_rngs():
    model = small().eval()
    x = batches((4, 3, 8, 8))[0]
    ported = jaxbn.from_torch(model, x, api="nnx", rngs=nnx.Rngs(0, dropout=7))
    assert ported.drop.deterministic is True and ported.stem[1].use_running_average is True
    with torch.no_grad():
        assert run_both(model, ported, [x]) <= 1e-12
    training = copy.deepcopy(ported)
    training.train()
    a, b = training(jnp.asarray(x.numpy())), training(jnp.asarray(x.numpy()))
    assert not np.allclose(np.asarray(a), np.asarray(b))  # a new mask per call: the stream advances
    ported.drop.p = 0.0
    ported.drop.train()
    with torch.no_grad():
        assert run_both(model, ported, [x]) <= 1e-12  # p = 0 trains as the identity


def test_nnx_refusals():
    model = small()
    x = batches((4, 3, 8, 8))[0]
    with pytest.raises(ValueError, match="channels_last"):
        jaxbn.from_torch(model, x, api="nnx", channels_last=True)
    with pytest.raises(ValueError, match="api must be"):
        jaxbn.from_torch(model, x, api="haiku")


class ConvBN(torch.nn.Module):
    """A block with its own forward; ``scaled``: it reads ``self.training`` (not a norm, not
    dropout)."""

    def __init__(self, scaled):
        super().__init__()
        self.scaled = scaled
        self.conv = torch.nn.Conv2d(3, 3, 1)
        self.bn = torch.nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y * (2.0 if self.training else 1.0) if self.scaled else y


def test_a_frozen_block_reading_self_training_is_refused_but_other_frozen_blocks_are_not():
    """The linen module keeps a mode fixed at translation; the NNX one follows model.train() as
    torch does, which a traced branch on self.training cannot: refused, never silently fixed."""
    x = batches((2, 3, 4, 4))[0]
    for scaled in (True, False):
        model = torch.nn.Sequential(ConvBN(scaled), torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
        model = model.double().train()
        model[0].eval()
        jaxbn.from_torch(model, x)  # linen: the mode stays fixed, as documented
        if scaled:
            with pytest.raises(porting.UnsupportedError, match="0: .*reads self.training"):
                jaxbn.from_torch(model, x, api="nnx")
            continue
        ported = jaxbn.from_torch(model, x, api="nnx")
        assert ported[0].bn.use_running_average is True and ported[2].use_running_average is False
        with torch.no_grad():
            assert run_both(model, ported, [x]) <= 1e-12
            assert state_difference(model, ported) <= 1e-12
