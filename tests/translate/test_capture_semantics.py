"""from_torch sees what torch runs: per-module modes, in-place aliasing, softmax's implicit dim,
per-call constants and frozen parameters (issue 23's silently-wrong cases), torch as the oracle.

Float64 (conftest). Training comparisons: within 100x torch's own sensitivity (the same steps with
every weight perturbed by 1e-15 relative).
"""

from __future__ import annotations

import copy
import re
import warnings

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import jaxbn
from jaxbn import porting
from jaxbn.porting import UnsupportedError
from helpers import Chain, import_torchvision, warmed, jax_sgd_steps, perturbed, rel_diff, torch_sgd_steps

F64 = torch.float64


def apply_eval(model, x):
    module, variables = jaxbn.from_torch(model, x)
    return np.asarray(module.apply(variables, jnp.asarray(x.numpy()), train=False))


def torch_eval(model, x):
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        return model(x.clone()).numpy()


def assert_eval_matches(model, x, atol=1e-12):
    np.testing.assert_allclose(apply_eval(model, x), torch_eval(model, x), rtol=0, atol=atol)


# ---------------------------------------------------------------- training with the modes kept


def batches(n, shape, classes, seed=3):
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(shape, generator=g, dtype=F64) for _ in range(n)],
            [torch.randint(0, classes, (shape[0],), generator=g) for _ in range(n)])


def resnet18_with_frozen_norms(k):
    """torchvision resnet18 (random init, BN affine perturbed, 2 train forwards), then the
    fine-tuning recipe: ``model.train()`` and the first ``k`` BatchNorms back in eval."""
    models = import_torchvision().models
    torch.manual_seed(0)
    model = warmed(models.resnet18(num_classes=10), (8, 3, 32, 32))
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    model.train()
    for m in bns[:k]:
        m.eval()
    return model


def test_resnet18_with_frozen_batchnorms_trains_like_torch():
    model = resnet18_with_frozen_norms(k=6)
    frozen = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and not m.training]
    assert len(frozen) == 6 and model.training
    xs, ys = batches(2, (8, 3, 32, 32), 10)
    module, variables = jaxbn.from_torch(model, xs[0])
    assert model.training and not model.bn1.training  # from_torch leaves the modes alone
    t_out, t_state = torch_sgd_steps(model, xs, ys, lr=0.1, train=False)
    p_out, p_state = torch_sgd_steps(perturbed(model), xs, ys, lr=0.1, train=False)
    j_out, j_vars = jax_sgd_steps(module, variables, xs, ys, lr=0.1)
    j_state, _ = porting.flax_to_torch(j_vars, model)
    sens_logits = max(rel_diff(p, t) for p, t in zip(p_out, t_out))
    sens_state = max(rel_diff(p_state[k], t_state[k]) for k in t_state)
    assert max(rel_diff(j, t) for j, t in zip(j_out, t_out)) <= 100 * sens_logits
    worst = max(t_state, key=lambda k: rel_diff(j_state[k], t_state[k]))
    assert rel_diff(j_state[worst], t_state[worst]) <= 100 * sens_state, worst
    before = model.state_dict()
    for path in frozen:  # frozen: buffers and counters untouched, in both frameworks
        for leaf in ("running_mean", "running_var", "num_batches_tracked"):
            key = f"{path}.{leaf}"
            np.testing.assert_array_equal(t_state[key], before[key].numpy())
            np.testing.assert_array_equal(j_state[key], before[key].numpy())
    for key in t_state:
        if key.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(j_state[key], t_state[key], err_msg=key)
    # train=False is model.eval() for every module
    y = module.apply(variables, jnp.asarray(xs[0].numpy()), train=False)
    np.testing.assert_allclose(np.asarray(y), torch_eval(model, xs[0]), rtol=0, atol=1e-9)


class NormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.bn = nn.BatchNorm1d(6, momentum=0.3)
        self.drop = nn.Dropout(0.5)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(self.drop(self.bn(self.fc(x))))


def _norm_net(seed=0):
    torch.manual_seed(seed)
    net = NormNet().double()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
    return net


def test_frozen_dropout_stays_off_under_train_true():
    net = _norm_net()
    net.train()
    net.drop.eval()
    x = torch.randn(7, 5, dtype=F64)
    module, variables = jaxbn.from_torch(net, x)
    y, updates = module.apply(variables, jnp.asarray(x.numpy()), train=True, mutable=["batch_stats"])  # no rng
    expected_net = copy.deepcopy(net)
    with torch.no_grad():
        expected = expected_net(x).numpy()
    np.testing.assert_allclose(np.asarray(y), expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(updates["batch_stats"]["bn"]["running_mean"]),
                               expected_net.bn.running_mean.numpy(), rtol=0, atol=1e-14)


def test_a_norm_in_train_inside_an_eval_model_keeps_training():
    """The reverse recipe: ``model.eval(); model.bn.train()``. ``train=False`` is the model as it
    stands (the BN uses batch statistics and updates its buffers); ``train=True`` is
    ``model.train()``."""
    net = _norm_net()
    net.eval()
    net.bn.train()
    x = torch.randn(7, 5, dtype=F64)
    module, variables = jaxbn.from_torch(net, x)
    y, updates = module.apply(variables, jnp.asarray(x.numpy()), train=False, mutable=["batch_stats"])
    expected_net = copy.deepcopy(net)
    with torch.no_grad():
        expected = expected_net(x).numpy()
    np.testing.assert_allclose(np.asarray(y), expected, rtol=0, atol=1e-12)
    for leaf in ("running_mean", "running_var", "num_batches_tracked"):
        np.testing.assert_allclose(np.asarray(updates["batch_stats"]["bn"][leaf]),
                                   getattr(expected_net.bn, leaf).numpy(), rtol=0, atol=1e-14)


class TrainingBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x):
        return self.bn(self.fc(x)) * 2 if self.training else self.bn(self.fc(x))


def test_a_frozen_block_branching_on_training_runs_its_frozen_branch():
    """Its mode is fixed under either ``train=`` (the rule), so is the branch torch takes."""
    torch.manual_seed(0)
    net = Chain(first=nn.Linear(3, 3), head=TrainingBranch()).double()
    net.train()
    net.head.eval()
    x = torch.randn(6, 3, dtype=F64)
    module, variables = jaxbn.from_torch(net, x)
    with torch.no_grad():
        expected = copy.deepcopy(net)(x).numpy()
    y, _ = module.apply(variables, jnp.asarray(x.numpy()), train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(y), expected, rtol=0, atol=1e-12)
    y = module.apply(variables, jnp.asarray(x.numpy()), train=False)
    np.testing.assert_allclose(np.asarray(y), torch_eval(net, x), rtol=0, atol=1e-12)
    net.head.train()  # follows the root again: the branch is Python's, refused as before
    with pytest.raises(UnsupportedError, match=r"^head \(.*TrainingBranch\): its forward runs different"):
        jaxbn.from_torch(net, x)


# ---------------------------------------------------------------- in-place operations


class Affine(nn.Module):
    """``self.fc`` then ``body(self, y)``."""

    def __init__(self, body, **children):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        for name, child in children.items():
            self.add_module(name, child)
        self.body = body

    def forward(self, x):
        return self.body(self, self.fc(x))


def _inplace_relu_module(self, y):
    z = self.relu(y)  # y is z
    return y + z


def _iadd_alias(self, out):
    identity = out
    out += 1
    return out + identity


def _discarded_functional(self, y):
    F.relu(y, inplace=True)
    return y


def _method_add_(self, y):
    y.add_(1)
    return y * 2 + self.fc(y)


def _torch_relu_(self, y):
    torch.relu_(y)
    return y - 1


def _chain(self, y):
    a = y
    y.mul_(2)
    y += 1
    F.relu(y, inplace=True)
    y.relu_()
    return a + torch.sigmoid(y)


def _view_then_mutate_view_only(self, y):
    v = y.view(-1)
    v.add_(1)
    return v * 2


def _ints_rebind_by_value(self, y):
    n = y.size(1) - 2
    m = n
    n += 1
    return y[:, :m] * n


IN_PLACE_CASES = {
    "relu_module_then_input": (_inplace_relu_module, dict(relu=nn.ReLU(inplace=True))),
    "iadd_with_alias": (_iadd_alias, {}),
    "functional_result_discarded": (_discarded_functional, {}),
    "tensor_method_add_": (_method_add_, {}),
    "torch_relu_": (_torch_relu_, {}),
    "chain": (_chain, {}),
    "view_mutated_base_unused": (_view_then_mutate_view_only, {}),
    "python_ints": (_ints_rebind_by_value, {}),
}


@pytest.mark.parametrize("case", IN_PLACE_CASES)
def test_in_place_aliasing_is_reproduced(case):
    body, children = IN_PLACE_CASES[case]
    torch.manual_seed(0)
    net = Affine(body, **children).double()
    x = torch.randn(3, 4, dtype=F64)
    assert_eval_matches(net, x)


def _view_mutated_base_used(self, y):
    v = y.view(-1)
    v.add_(1)
    return y


def _base_mutated_view_used(self, y):
    a = y.transpose(0, 1)
    y.relu_()
    return a


def _chunk_mutated(self, y):
    a, b = y.chunk(2, 1)
    a.mul_(2)
    return torch.cat([a, b], 1)


def _identity_alias(self, y):
    h = self.ident(y)
    h.add_(1)
    return y


REFUSED_IN_PLACE = {
    "view_mutated_base_used": (_view_mutated_base_used, {}),
    "base_mutated_view_used": (_base_mutated_view_used, {}),
    "chunk_mutated": (_chunk_mutated, {}),
    "identity_alias": (_identity_alias, dict(ident=nn.Identity())),
}


@pytest.mark.parametrize("case", REFUSED_IN_PLACE)
def test_in_place_on_shared_memory_is_refused(case):
    body, children = REFUSED_IN_PLACE[case]
    net = Affine(body, **children).double()
    with pytest.raises(UnsupportedError, match=r"^the model \(.*Affine\): .*in place.*shares memory"):
        jaxbn.from_torch(net, torch.zeros(3, 4, dtype=F64))


def test_setitem_is_refused():
    def body(self, y):
        y[:, :2] += 1
        return y

    with pytest.raises(UnsupportedError, match=r"^the model \(.*Affine\)"):
        jaxbn.from_torch(Affine(body).double(), torch.zeros(3, 4, dtype=F64))


class ActOnInput(nn.Module):
    """ReLU(inplace=True) applied to its own input: mutates the caller's tensor."""

    def __init__(self):
        super().__init__()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(x) * 2


class PassOn(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = ActOnInput()

    def forward(self, x):
        return self.inner(x) + 1


def _uses_input_after(self, y):
    z = self.child(y)
    return y + z


def _does_not_use_it_after(self, y):
    return self.child(y) - 1


def test_a_block_mutating_its_input_is_refused_where_the_caller_uses_it_after():
    for child, where in ((ActOnInput(), "child.act"), (PassOn(), "child.inner.act")):
        net = Affine(_uses_input_after, child=child).double()
        with pytest.raises(UnsupportedError, match=rf"^the model \(.*Affine\): child \(.*\) modifies its "
                                                   rf"input .* in place \({re.escape(where)} "):
            jaxbn.from_torch(net, torch.zeros(3, 4, dtype=F64))
        torch.manual_seed(0)
        assert_eval_matches(Affine(_does_not_use_it_after, child=child).double(), torch.randn(3, 4, dtype=F64))


def test_the_models_own_input_mutated_in_place_translates():
    class Net(nn.Module):
        def forward(self, x):
            y = x.relu_()
            return y + x

    assert_eval_matches(Net(), torch.randn(3, 4, dtype=F64))


def test_inplace_dropout_in_training_aliases_its_input():
    """``d = Dropout(inplace=True)(h); h + d``: torch's h *is* d, so every output is 0 or 4 h."""
    def body(self, h):
        d = self.drop(h)
        return h + d

    torch.manual_seed(0)
    net = Affine(body, drop=nn.Dropout(0.5, inplace=True)).double()
    x = torch.randn(64, 4, dtype=F64)
    module, variables = jaxbn.from_torch(net, x)
    h = np.asarray(module.apply(variables, jnp.asarray(x.numpy()), train=False)) / 2
    y = np.asarray(module.apply(variables, jnp.asarray(x.numpy()), train=True,
                                rngs={"dropout": jax.random.PRNGKey(0)}))
    kept = y != 0
    assert 0.3 < kept.mean() < 0.7
    np.testing.assert_allclose(y[kept], 4 * h[kept], rtol=1e-12)


# ---------------------------------------------------------------- softmax


@pytest.mark.parametrize("shape", [(5,), (2, 5), (2, 3, 5), (2, 3, 4, 5)])
def test_softmax_module_without_dim_uses_torchs_implicit_dim(shape):
    x = torch.randn(shape, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: implicit dim is deprecated
        assert_eval_matches(Chain(softmax=nn.Softmax()), x, atol=1e-15)


def test_softmax_accepts_torchs_signatures():
    class Net(nn.Module):
        def forward(self, x):
            return (F.softmax(x, 1) + F.softmax(x, dim=-1, _stacklevel=5) + F.softmax(x, 2, dtype=torch.float64)
                    + torch.softmax(x, 1, torch.float64) + x.softmax(dim=0) + x.softmax(2, torch.float64))

    assert_eval_matches(Net(), torch.randn(2, 3, 4, dtype=F64), atol=1e-15)


# ---------------------------------------------------------------- constants per call


class Flagged(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x, flag=False, scale=1.0, unused=None):
        y = self.fc(x) * scale
        if flag:
            y = y + 1
        return y


class TwoCalls(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.sub = Flagged()
        self.body = body

    def forward(self, x):
        return self.body(self, x)


@pytest.mark.parametrize("body", [
    lambda self, x: self.sub(x, True) + self.sub(x, False),
    lambda self, x: self.sub(x, flag=True) + self.sub(x),
    lambda self, x: self.sub(x) * self.sub(x, True),
    lambda self, x: self.sub(x, scale=x.sum()) + self.sub(x, scale=2.0),
], ids=["positional", "keyword-then-default", "default-then-positional", "tensor-then-constant"])
def test_a_child_called_with_different_constants_is_refused(body):
    with pytest.raises(UnsupportedError, match=r"^sub \(.*Flagged\): called with different constant arguments"):
        jaxbn.from_torch(TwoCalls(body).double(), torch.zeros(2, 3, dtype=F64))


@pytest.mark.parametrize("body", [
    lambda self, x: self.sub(x, True) + self.sub(x, flag=True),
    lambda self, x: self.sub(x, flag=True, unused=1) * self.sub(x, True, 1.0, 2),
    lambda self, x: self.sub(x, scale=x.sum()) * self.sub(x, scale=x.mean()),
    lambda self, x: self.sub(x, flag=True) - self.sub(x, flag=True),
], ids=["same-constants", "irrelevant-constant-differs", "tensors", "keyword"])
def test_a_child_called_with_the_same_constants_translates(body):
    torch.manual_seed(0)
    assert_eval_matches(TwoCalls(body).double(), torch.randn(2, 3, dtype=F64))


# ---------------------------------------------------------------- requires_grad=False


class Frozen(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 4, 5))

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))))


def test_frozen_parameters_are_reported_and_an_optax_mask_trains_like_torch():
    torch.manual_seed(0)
    net = Frozen().double().train()
    net.conv.weight.requires_grad_(False)
    net.bn.requires_grad_(False)
    xs, ys = batches(2, (6, 3, 6, 6), 5)
    ported = jaxbn.from_torch(net, xs[0])
    assert sorted(ported.frozen_params) == ["params/bn/bias", "params/bn/weight", "params/conv/kernel"]
    module, variables = ported  # still unpacks as (module, variables)

    labels = flax.traverse_util.path_aware_map(
        lambda path, _: "frozen" if "/".join(("params", *path)) in ported.frozen_params else "train",
        variables["params"])
    tx = optax.multi_transform({"train": optax.sgd(0.1), "frozen": optax.set_to_zero()}, labels)
    opt_state = tx.init(variables["params"])
    for x, y in zip(xs, ys):
        def loss(params):
            out, updates = module.apply({**variables, "params": params}, jnp.asarray(x.numpy()), train=True,
                                        mutable=["batch_stats"])
            logp = jax.nn.log_softmax(out)
            return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(y.numpy())[:, None], 1)), updates

        grads, updates = jax.grad(loss, has_aux=True)(variables["params"])
        steps, opt_state = tx.update(grads, opt_state)
        variables = {**variables, **updates, "params": optax.apply_updates(variables["params"], steps)}

    _, t_state = torch_sgd_steps(net, xs, ys, lr=0.1, train=False)
    j_state, _ = porting.flax_to_torch(variables, net)
    np.testing.assert_array_equal(j_state["conv.weight"], net.conv.weight.detach().numpy())
    for key in t_state:
        np.testing.assert_allclose(j_state[key], t_state[key], rtol=0, atol=1e-12, err_msg=key)


# ---------------------------------------------------------------- the emitted file


class FrozenInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.frozen_bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.sub = Flagged()

    def forward(self, x):
        out = self.relu(self.bn(self.conv(x)))
        identity = out
        out += 1
        F.relu(out, inplace=True)
        out = self.frozen_bn(out + identity).mean((2, 3))
        return self.sub(out[:, :3], flag=True)


def test_the_emitted_file_keeps_modes_and_in_place_semantics(monkeypatch):
    import sys
    import types

    from jaxbn.translate import emit_source

    torch.manual_seed(0)
    net = FrozenInPlace().double().train()
    net.frozen_bn.eval()
    x = torch.randn(4, 3, 5, 5, dtype=F64)
    module, variables = jaxbn.from_torch(net, x)
    emitted = types.ModuleType("emitted_frozen_in_place")  # a module, as the file would be
    monkeypatch.setitem(sys.modules, emitted.__name__, emitted)
    exec(compile(emit_source(module.block), emitted.__name__, "exec"), emitted.__dict__)  # noqa: S102
    y, updates = emitted.Model().apply(variables, jnp.asarray(x.numpy()), train=True, mutable=["batch_stats"])
    expected_net = copy.deepcopy(net)
    with torch.no_grad():
        expected = expected_net(x).numpy()
    np.testing.assert_allclose(np.asarray(y), expected, rtol=0, atol=1e-12)
    for name in ("bn", "frozen_bn"):  # the frozen one left as it was
        for leaf in ("running_var", "num_batches_tracked"):
            np.testing.assert_allclose(np.asarray(updates["batch_stats"][name][leaf]),
                                       getattr(getattr(expected_net, name), leaf).numpy(), rtol=0, atol=1e-14)
