"""A small CNN with jaxbn BatchNorm on scikit-learn's digits: data, models, one jitted train step.

Shared by ``train_digits_linen.py`` and ``train_digits_nnx.py`` (and by the test that checks this
model against PyTorch step for step). The network, in PyTorch terms::

    conv1 = Conv2d(1, 8, 3, padding=1, bias=False);             bn1 = BatchNorm2d(8)
    conv2 = Conv2d(8, 16, 3, stride=2, padding=1, bias=False);  bn2 = BatchNorm2d(16)
    fc1   = Linear(4 * 4 * 16, 32, bias=False);                 bn3 = BatchNorm1d(32)
    fc2   = Linear(32, 10)
    relu after each batch norm; flatten in NHWC order.

Both adapters are driven through the same functional interface, a *forward function*
``forward(params, batch_stats, x) -> (logits, new_batch_stats)`` for one mode (train or eval),
so one ``jax.jit``-compiled train step serves both. Needs optax and scikit-learn (the ``test``
extra).
"""

from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import nnx

import jaxbn.linen
import jaxbn.nnx

Forward = Callable[[Any, Any, jax.Array], tuple[jax.Array, Any]]
BN_LAYERS = ("bn1", "bn2", "bn3")
WIDTHS = (8, 16, 32)
NUM_CLASSES = 10
FLAT = 4 * 4 * WIDTHS[1]  # 8x8 input, one stride-2 conv


class Data(NamedTuple):
    x_train: np.ndarray  # (N, 8, 8, 1), scaled to [0, 1]
    y_train: np.ndarray  # (N,) int labels
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits(test_fraction: float = 0.2, seed: int = 0, dtype: Any = np.float32) -> Data:
    """scikit-learn's 8x8 digits (1797 images, shipped with the package), NHWC, shuffled split."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    x = (digits.images / 16.0).astype(dtype)[..., None]
    y = digits.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return Data(x[train], y[train], x[test], y[test])


def batches(n: int, batch_size: int, rng: np.random.Generator):
    """Index arrays of one shuffled epoch, full batches only (static shapes: one compilation)."""
    order = rng.permutation(n)
    for start in range(0, n - batch_size + 1, batch_size):
        yield order[start : start + batch_size]


def bn_kwargs(
    layer: str, momentum: float | None, untracked: tuple[str, ...], param_dtype: Any
) -> dict:
    """Construction arguments of batch-norm layer ``layer`` (same for both adapters)."""
    return dict(
        momentum=momentum, track_running_stats=layer not in untracked, param_dtype=param_dtype
    )


class LinenCNN(nn.Module):
    """The network with ``jaxbn.linen.BatchNorm``; submodules carry the torch names."""

    momentum: float | None = 0.1
    untracked: tuple[str, ...] = ()  # batch-norm layers built with track_running_stats=False
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        bn = lambda name: jaxbn.linen.BatchNorm(  # noqa: E731
            name=name, **bn_kwargs(name, self.momentum, self.untracked, self.param_dtype)
        )
        dense = dict(use_bias=False, param_dtype=self.param_dtype)
        pad = ((1, 1), (1, 1))
        x = nn.Conv(WIDTHS[0], (3, 3), padding=pad, name="conv1", **dense)(x)
        x = nn.relu(bn("bn1")(x, train))
        x = nn.Conv(WIDTHS[1], (3, 3), strides=2, padding=pad, name="conv2", **dense)(x)
        x = nn.relu(bn("bn2")(x, train))
        x = nn.Dense(WIDTHS[2], name="fc1", **dense)(x.reshape(x.shape[0], -1))
        x = nn.relu(bn("bn3")(x, train))
        return nn.Dense(NUM_CLASSES, name="fc2", param_dtype=self.param_dtype)(x)


class NnxCNN(nnx.Module):
    """The same network with ``jaxbn.nnx.BatchNorm``; mode follows ``model.train()/.eval()``."""

    def __init__(
        self,
        momentum: float | None = 0.1,
        untracked: tuple[str, ...] = (),
        param_dtype: Any = jnp.float32,
        *,
        rngs: nnx.Rngs,
    ):
        dense = dict(use_bias=False, param_dtype=param_dtype, rngs=rngs)
        pad = ((1, 1), (1, 1))
        self.conv1 = nnx.Conv(1, WIDTHS[0], (3, 3), padding=pad, **dense)
        self.conv2 = nnx.Conv(WIDTHS[0], WIDTHS[1], (3, 3), strides=2, padding=pad, **dense)
        self.fc1 = nnx.Linear(FLAT, WIDTHS[2], **dense)
        self.fc2 = nnx.Linear(WIDTHS[2], NUM_CLASSES, param_dtype=param_dtype, rngs=rngs)
        for name, width in zip(BN_LAYERS, WIDTHS):
            kwargs = bn_kwargs(name, momentum, untracked, param_dtype)
            setattr(self, name, jaxbn.nnx.BatchNorm(width, **kwargs))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.relu(self.bn2(self.conv2(x)))
        x = nnx.relu(self.bn3(self.fc1(x.reshape(x.shape[0], -1))))
        return self.fc2(x)


def linen_forward(model: nn.Module, train: bool) -> Forward:
    """Forward function of a linen model. Training needs ``mutable=['batch_stats']``: the
    running statistics come back as the second output of ``apply``; eval reads them only."""

    def forward(params, batch_stats, x):
        variables = {"params": params, "batch_stats": batch_stats}
        if not train:
            return model.apply(variables, x, train=False), batch_stats
        logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
        return logits, updates["batch_stats"]

    return forward


def nnx_forward(graphdef: nnx.GraphDef) -> Forward:
    """Forward function of an NNX model whose mode is baked into ``graphdef`` (split it after
    ``model.train()`` or ``model.eval()``); updated ``BatchStat``s are read back after the call.

    ``copy=True`` gives the merged model fresh Variables owned by the current trace: NNX refuses
    in-place updates of a Variable created at another trace level (here: outside ``jax.grad``).
    """

    def forward(params, batch_stats, x):
        model = nnx.merge(graphdef, params, batch_stats, copy=True)
        logits = model(x)
        return logits, nnx.state(model, nnx.BatchStat)

    return forward


def linen_setup(
    model: LinenCNN, x: jax.Array, seed: int = 0
) -> tuple[dict[bool, Forward], Any, Any]:
    """``({train: forward}, params, batch_stats)`` of a linen model; ``init`` leaves stats fresh."""
    variables = model.init(jax.random.key(seed), x, train=False)
    forwards = {train: linen_forward(model, train) for train in (True, False)}
    return forwards, variables["params"], variables.get("batch_stats", {})


def nnx_graphdefs(model: nnx.Module) -> dict[bool, nnx.GraphDef]:
    """The model's graph definition in train and in eval mode (NNX's ``train()`` / ``eval()``)."""
    graphdefs = {}
    for train in (True, False):
        model.train() if train else model.eval()
        graphdefs[train] = nnx.graphdef(model)
    model.train()
    return graphdefs


def nnx_setup(model: nnx.Module) -> tuple[dict[bool, Forward], Any, Any]:
    """``({train: forward}, params, batch_stats)`` for an NNX model."""
    _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    forwards = {train: nnx_forward(gd) for train, gd in nnx_graphdefs(model).items()}
    return forwards, params, batch_stats


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy (``torch.nn.functional.cross_entropy``)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_train_step(forward: Forward, optimizer: optax.GradientTransformation):
    """One jit-compiled optimization step:
    ``step(params, batch_stats, opt_state, x, y) -> (params, batch_stats, opt_state, loss)``."""

    @jax.jit
    def step(params, batch_stats, opt_state, x, y):
        def loss_fn(params):
            logits, new_stats = forward(params, batch_stats, x)
            return cross_entropy(logits, y), new_stats

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, loss

    return step


def accuracy(forward: Forward, params, batch_stats, x: np.ndarray, y: np.ndarray) -> float:
    """Fraction of correct predictions, with ``forward`` in eval mode (running statistics)."""
    logits, _ = jax.jit(forward)(params, batch_stats, jnp.asarray(x))
    return float(np.mean(np.asarray(jnp.argmax(logits, -1)) == y))


def train(
    forwards: dict[bool, Forward],
    params,
    batch_stats,
    data: Data,
    epochs: int = 15,
    batch_size: int = 64,
    learning_rate: float = 0.05,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> tuple[Any, Any, float]:
    """Train with SGD + momentum; return ``(params, batch_stats, test accuracy)``."""
    optimizer = optax.sgd(learning_rate, momentum=0.9)
    opt_state = optimizer.init(params)
    step = make_train_step(forwards[True], optimizer)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for epoch in range(epochs):
        losses = []
        for idx in batches(len(data.y_train), batch_size, rng):
            params, batch_stats, opt_state, loss = step(
                params, batch_stats, opt_state, data.x_train[idx], data.y_train[idx]
            )
            losses.append(loss)
        acc = accuracy(forwards[False], params, batch_stats, data.x_test, data.y_test)
        log(
            f"epoch {epoch + 1:2d}  train loss {float(np.mean(losses)):.4f}  "
            f"eval accuracy {acc:.4f}  ({time.perf_counter() - start:.1f}s)"
        )
    return params, batch_stats, acc
