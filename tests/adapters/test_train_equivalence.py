"""A whole training run in Flax + jaxbn matches the same run in PyTorch, step for step.

The network is the digits example's CNN (conv -> BatchNorm2d -> relu -> strided conv ->
BatchNorm2d -> relu -> linear -> BatchNorm1d -> relu -> linear), built in torch and with each Flax
adapter, started from torch's initial weights, fed identical batches and optimized with plain SGD
(``torch.optim.SGD`` vs ``optax.sgd``) in float64. The schedule trains, switches to eval (SGD
steps through the running statistics) and back. After every step the loss, every parameter, every
running statistic and every ``num_batches_tracked`` must agree to 1e-9.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from flax.traverse_util import flatten_dict

from helpers import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "examples"))
import digits_cnn  # noqa: E402

from jaxbn import BatchNormState  # noqa: E402

LEARNING_RATE = 0.1
BATCH_SIZE = 32
SCHEDULE = [True] * 8 + [False] * 6 + [True] * 8  # train, eval, train again: 22 SGD steps
TOLERANCE = 1e-9


class TorchCNN(torch.nn.Module):
    """``digits_cnn``'s network in PyTorch (NCHW; flattened in NHWC order like Flax)."""

    def __init__(self, momentum: float | None, untracked: tuple[str, ...]):
        super().__init__()
        w1, w2, w3 = digits_cnn.WIDTHS
        self.conv1 = torch.nn.Conv2d(1, w1, 3, padding=1, bias=False)
        self.conv2 = torch.nn.Conv2d(w1, w2, 3, stride=2, padding=1, bias=False)
        self.fc1 = torch.nn.Linear(digits_cnn.FLAT, w3, bias=False)
        self.fc2 = torch.nn.Linear(w3, digits_cnn.NUM_CLASSES)
        kinds = (torch.nn.BatchNorm2d, torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)
        for name, width, kind in zip(digits_cnn.BN_LAYERS, digits_cnn.WIDTHS, kinds):
            bn = kind(width, momentum=momentum, track_running_stats=name not in untracked)
            setattr(self, name, bn)

    def forward(self, x_nhwc: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x_nhwc.permute(0, 3, 1, 2))))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.fc1(x.permute(0, 2, 3, 1).flatten(1))))
        return self.fc2(x)


def torch_to_flax(model: torch.nn.Module) -> dict[str, dict]:
    """``{'params': ..., 'batch_stats': ...}`` nested by layer, in Flax's layouts.

    BatchNorm entries keep their torch names (that is jaxbn's contract); conv weights go
    OIHW -> HWIO and linear weights (out, in) -> (in, out) as ``kernel``.
    """
    tree: dict[str, dict] = {"params": {}, "batch_stats": {}}
    for key, tensor in model.state_dict().items():
        layer, field = key.split(".")
        value = tensor.detach().numpy().copy()
        if field == "weight" and layer.startswith("conv"):
            field, value = "kernel", value.transpose(2, 3, 1, 0)
        elif field == "weight" and layer.startswith("fc"):
            field, value = "kernel", value.T
        collection = "batch_stats" if field in BatchNormState._fields else "params"
        tree[collection].setdefault(layer, {})[field] = value
    return tree


class Adapter(NamedTuple):
    """How the test drives one Flax adapter through ``digits_cnn``'s functional interface."""

    setup: Callable[[float | None, tuple[str, ...]], tuple[dict, Any, Any]]
    load: Callable[[Any, dict], Any]  # a pure nested dict of arrays into the adapter's tree
    pure: Callable[[Any], dict]  # the adapter's tree as a pure nested dict


def linen_setup(momentum, untracked):
    model = digits_cnn.LinenCNN(momentum, untracked, jnp.float64)
    return digits_cnn.linen_setup(model, jnp.zeros((2, 8, 8, 1), jnp.float64))


def nnx_setup(momentum, untracked):
    model = digits_cnn.NnxCNN(momentum, untracked, jnp.float64, rngs=nnx.Rngs(0))
    return digits_cnn.nnx_setup(model)


def nnx_load(state: nnx.State, pure: dict) -> nnx.State:
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))  # in place
    return state


ADAPTERS = {
    "linen": Adapter(linen_setup, lambda _, d: jax.tree.map(jnp.asarray, d), lambda t: t),
    "nnx": Adapter(nnx_setup, nnx_load, nnx.to_pure_dict),
}


def max_diff(actual: dict, expected: dict) -> float:
    """Largest absolute difference over matching leaves; the trees must have the same keys."""
    actual, expected = flatten_dict(actual, sep="."), flatten_dict(expected, sep=".")
    assert sorted(actual) == sorted(expected)
    return max(float(np.max(np.abs(np.asarray(actual[k]) - expected[k]))) for k in expected)


def run_trajectories(adapter: Adapter, momentum, untracked) -> float:
    """Train both models on the same batches; return the max difference seen over all steps."""
    torch.manual_seed(0)
    torch_model = TorchCNN(momentum, untracked).double()
    torch_opt = torch.optim.SGD(torch_model.parameters(), lr=LEARNING_RATE)

    forwards, params, batch_stats = adapter.setup(momentum, untracked)
    initial = torch_to_flax(torch_model)
    params = adapter.load(params, initial["params"])
    batch_stats = adapter.load(batch_stats, initial["batch_stats"])
    optimizer = optax.sgd(LEARNING_RATE)
    opt_state = optimizer.init(params)
    steps = {train: digits_cnn.make_train_step(f, optimizer) for train, f in forwards.items()}

    data = digits_cnn.load_digits(dtype=np.float64)
    rng = np.random.default_rng(0)
    worst = 0.0
    for train in SCHEDULE:
        idx = rng.choice(len(data.y_train), BATCH_SIZE, replace=False)
        x, y = data.x_train[idx], data.y_train[idx]

        torch_model.train(train)
        torch_opt.zero_grad()
        torch_loss = torch.nn.functional.cross_entropy(
            torch_model(torch.from_numpy(x.copy())), torch.from_numpy(y.astype(np.int64))
        )
        torch_loss.backward()
        torch_opt.step()

        params, batch_stats, opt_state, loss = steps[train](params, batch_stats, opt_state, x, y)

        expected = torch_to_flax(torch_model)
        diffs = (
            abs(float(loss) - torch_loss.item()),
            max_diff(adapter.pure(params), expected["params"]),
            max_diff(adapter.pure(batch_stats), expected["batch_stats"]),
        )
        assert max(diffs) <= TOLERANCE, f"train={train}: loss/params/stats differ by {diffs}"
        worst = max(worst, *diffs)

    counters = {k: int(v) for k, v in flatten_dict(expected["batch_stats"], sep=".").items()
                if k.endswith("num_batches_tracked")}
    assert set(counters.values()) == {SCHEDULE.count(True)}, counters  # the run really trained
    return worst


@pytest.mark.parametrize("untracked", [(), ("bn2",)], ids=["all-tracked", "bn2-untracked"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "momentumNone"])
@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_training_run_matches_torch_step_for_step(adapter, momentum, untracked):
    worst = run_trajectories(ADAPTERS[adapter], momentum, untracked)
    print(f"\n{adapter} momentum={momentum} untracked={untracked}: max diff {worst:.3e}")
