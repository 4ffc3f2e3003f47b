"""Shared test helpers: random inputs/state/params, a jaxbn layer stepped beside a torch module.

Torch is the oracle everywhere (via :mod:`jaxbn.testing.oracle`); nothing here computes an expected
value itself. Arrays move between the frameworks as copies.
"""

from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch

import jaxbn
from jaxbn import BatchNormFlags, BatchNormParams, BatchNormState
from jaxbn.testing import oracle as torch_oracle

# The oracle runs on tiny tensors: torch's intra-op thread pool only adds latency there, and on
# a shared 2-core machine its spinning threads made single calls take 5-20 ms instead of 20 us.
torch.set_num_threads(1)

F64_TOL = 1e-10
"""Max abs difference allowed against torch in float64."""

MOMENTA = (0.1, None, 0.0)

MOMENTUM_SCHEDULE = (0.1, 0.05, 0.3, 0.01, 0.9, 0.5)
"""``bn.momentum`` changed every step, as torch users' decay schedules do."""

REPO_ROOT = Path(__file__).resolve().parent.parent
"""The repository (README.md, docs/, examples/, benchmarks/, jaxbn/), wherever a test file sits."""


def feature_axes(rank: int) -> tuple[int, ...]:
    """PyTorch layout, channels-last, and one more axis (the batch axis up to rank 3, else 2)."""
    return (1, -1, 0 if rank <= 3 else 2)


def input_shape(rank: int, num_features: int, axis: int, batch: int = 3, spatial: int = 2) -> tuple[int, ...]:
    """A rank-``rank`` shape with ``num_features`` on ``axis``, ``batch`` and ``spatial`` elsewhere.

    The first non-feature axis gets ``batch``; later ones ``spatial, spatial + 1, ...`` so that no
    two axes are confusable.
    """
    axis = axis % rank
    others = [a for a in range(rank) if a != axis]
    shape = [num_features] * rank
    for k, a in enumerate(others):
        shape[a] = batch if k == 0 else spatial + k - 1
    return tuple(shape)


def random_input(rng: np.random.Generator, shape: tuple[int, ...], dtype: Any = np.float64,
                 loc: float = 0.0, scale: float = 1.0) -> np.ndarray:
    """Normal data with a random per-element offset so channels have distinct statistics."""
    return (loc + scale * rng.standard_normal(shape) + rng.uniform(-1, 1, shape)).astype(dtype)


def random_state(rng: np.random.Generator, num_features: int, dtype: Any = jnp.float64,
                 count: int | None = None) -> BatchNormState:
    """Buffers that differ from a fresh layer's: random mean, positive var, a nonzero counter."""
    count = int(rng.integers(1, 6)) if count is None else count
    template = jaxbn.init_state(num_features, dtype)
    return BatchNormState(
        running_mean=jnp.asarray(rng.standard_normal(num_features), dtype),
        running_var=jnp.asarray(rng.uniform(0.5, 2.0, num_features), dtype),
        num_batches_tracked=jnp.asarray(count, template.num_batches_tracked.dtype),
    )


def random_params(rng: np.random.Generator, num_features: int, dtype: Any = jnp.float64) -> BatchNormParams:
    """Weight and bias that differ from torch's init (weight away from zero)."""
    return BatchNormParams(
        weight=jnp.asarray(rng.uniform(0.5, 1.5, num_features) * rng.choice([-1, 1], num_features), dtype),
        bias=jnp.asarray(rng.standard_normal(num_features), dtype),
    )


def max_abs_diff(a: Any, b: Any) -> float:
    """Max abs difference in float64 (0 for empty arrays); shapes must match."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    assert a.shape == b.shape, f"shape {a.shape} != {b.shape}"
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def assert_close(actual: Any, expected: Any, tol: float, what: str = "") -> float:
    """Assert max abs diff <= tol (NaNs must coincide); return the diff."""
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    np.testing.assert_array_equal(np.isnan(a), np.isnan(e), err_msg=f"{what}: NaN pattern")
    diff = max_abs_diff(np.nan_to_num(a), np.nan_to_num(e))
    assert diff <= tol, f"{what}: max abs diff {diff:.3e} > {tol:.1e}"
    return diff


def same_with_nan(actual, expected, tol=0.0):
    """Equal where finite (to ``tol``), and non-finite in the same places with the same value."""
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert a.shape == e.shape
    assert np.array_equal(np.isnan(a), np.isnan(e)), (a, e)
    assert np.array_equal(np.isposinf(a), np.isposinf(e)) and np.array_equal(np.isneginf(a), np.isneginf(e)), (a, e)
    finite = np.isfinite(e)
    assert np.all(np.abs(a[finite] - e[finite]) <= tol), (a, e)


def assert_state_matches(actual: BatchNormState | None, expected: BatchNormState | None,
                         tol: float, what: str = "") -> float:
    """Running stats within ``tol``, counter exactly equal, ``None`` iff ``None``."""
    assert (actual is None) == (expected is None), f"{what}: state {actual!r} vs torch {expected!r}"
    if actual is None:
        return 0.0
    assert int(actual.num_batches_tracked) == int(expected.num_batches_tracked), (
        f"{what}: num_batches_tracked {int(actual.num_batches_tracked)} "
        f"!= torch {int(expected.num_batches_tracked)}"
    )
    return max(
        assert_close(actual.running_mean, expected.running_mean, tol, f"{what} running_mean"),
        assert_close(actual.running_var, expected.running_var, tol, f"{what} running_var"),
    )


def torch_dtype(dtype: Any) -> torch.dtype:
    """The torch dtype of a NumPy/JAX dtype (bfloat16 included)."""
    name = jnp.dtype(dtype).name
    return getattr(torch, name)


@dataclasses.dataclass
class LayerPair:
    """A jaxbn layer (state, params) and the torch module a user would build for it.

    Both are stepped with the same input and flags; the torch module persists across steps and is
    mutated with :func:`jaxbn.torch_oracle.apply_flags`, exactly as a torch user would mutate it.
    """

    module: torch.nn.Module
    state: BatchNormState | None
    params: BatchNormParams | None

    @classmethod
    def build(cls, num_features: int, rank: int, state: BatchNormState | None,
              params: BatchNormParams | None, flags: BatchNormFlags,
              dtype: torch.dtype | None = torch.float64) -> "LayerPair":
        module = torch_oracle.build_module(num_features, rank, state, params, flags, dtype)
        return cls(module=module, state=state, params=params)

    def step(self, x: Any, flags: BatchNormFlags,
             fn: Callable = jaxbn.batch_norm) -> tuple[Any, np.ndarray]:
        """One call of both; returns ``(jaxbn y, torch y)`` and carries jaxbn's state forward."""
        torch_oracle.apply_flags(self.module, flags)
        with torch.no_grad():
            y_torch = torch_oracle.forward(self.module, torch_oracle.to_torch(x), flags.axis)
        y, self.state = fn(jnp.asarray(x), self.state, self.params, flags)
        return y, torch_oracle.to_numpy(y_torch)

    def torch_state(self) -> BatchNormState | None:
        return torch_oracle.module_state(self.module)

    def step_and_compare(self, x: Any, flags: BatchNormFlags, tol: float = F64_TOL,
                         what: str = "", fn: Callable = jaxbn.batch_norm,
                         state_tol: float | None = None) -> float:
        """Step both and assert output, dtype and buffers agree; return the max diff seen.

        ``tol`` bounds the output, ``state_tol`` (default ``tol``) the running stats.
        """
        y, y_torch = self.step(x, flags, fn)
        assert y.dtype == jnp.asarray(x).dtype, f"{what}: output dtype {y.dtype} != input {jnp.asarray(x).dtype}"
        diff = assert_close(y, y_torch, tol, f"{what} output")
        state_tol = tol if state_tol is None else state_tol
        return max(diff, assert_state_matches(self.state, self.torch_state(), state_tol, what))


class TraceCounter:
    """``fn`` counting its Python-level calls, which under jit means its traces."""

    def __init__(self, fn):
        self.traces = 0
        self.fn = fn

    def __call__(self, *args, **kwargs):
        self.traces += 1
        return self.fn(*args, **kwargs)


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``model`` with every floating tensor of its state_dict uniform in [0.5, 1.5) and every
    integer one 17 (values no initializer gives), in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) + 0.5)
            else:
                t.fill_(17)
    return model


def seed_of(*parts: Any) -> int:
    """A stable seed from test parameters (Python's ``hash`` of strings is salted per process)."""
    return zlib.crc32(repr(parts).encode())


def torch_grads(module: torch.nn.Module, x: Any, dy: Any, axis: int) -> tuple[np.ndarray, ...]:
    """torch autograd of ``sum(module(x) * dy)``: ``(dx, dweight, dbias)`` (None without affine)."""
    xt = torch_oracle.to_torch(x).requires_grad_(True)
    y = torch_oracle.forward(module, xt, axis)
    (y * torch_oracle.to_torch(dy)).sum().backward()
    grads = [xt.grad]
    if module.weight is not None:
        grads += [module.weight.grad, module.bias.grad]
        module.zero_grad()
    else:
        grads += [None, None]
    return tuple(torch_oracle.to_numpy(g) for g in grads)


def jaxbn_grads(x: Any, params: BatchNormParams | None, state: BatchNormState | None, dy: Any,
                flags: BatchNormFlags, fn: Callable = jaxbn.batch_norm) -> tuple:
    """jax.grad of ``sum(fn(x, state, params, flags)[0] * dy)``: ``(dx, dparams)``; jit-able."""

    def loss(x, params):
        y, _ = fn(x, state, params, flags)
        return jnp.sum(y * dy)

    return jax.grad(loss, argnums=(0, 1))(x, params)


def assert_grads_match(jax_grads: tuple, torch_grads_: tuple, tol: float, what: str = "") -> float:
    """Compare jaxbn's ``(dx, dparams)`` with torch's ``(dx, dweight, dbias)``."""
    dx, dparams = jax_grads
    tdx, tdw, tdb = torch_grads_
    diff = assert_close(dx, tdx, tol, f"{what} dx")
    assert (dparams is None) == (tdw is None), f"{what}: params grad {dparams!r} vs torch {tdw!r}"
    if dparams is not None:
        diff = max(diff, assert_close(dparams.weight, tdw, tol, f"{what} dweight"),
                   assert_close(dparams.bias, tdb, tol, f"{what} dbias"))
    return diff


# ---------------------------------------------------------------- a torch model trained beside its port


def perturbed(model: torch.nn.Module, relative: float = 1e-15) -> torch.nn.Module:
    """A copy of ``model`` with every parameter scaled by ``1 + relative * N(0, 1)``: rerunning
    torch on it measures torch's own sensitivity, the scale a tolerance must be judged against."""
    import copy

    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + relative * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def rel_diff(a: Any, b: Any) -> float:
    """max |a - b| / max(1, max |b|)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b), initial=0.0) / max(1.0, float(np.max(np.abs(b), initial=0.0))))


def cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(out, y)


def jax_cross_entropy(out: jax.Array, y: jax.Array) -> jax.Array:
    """:func:`cross_entropy` in JAX."""
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(out), y[:, None], 1))


def torch_sgd_steps(model: torch.nn.Module, xs: list, ys: list, lr: float, *,
                    train: bool = True, loss: Callable = cross_entropy
                    ) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """SGD steps on ``loss(out, y)`` on a copy of ``model``: per-step outputs, final
    ``state_dict``. ``train=True`` calls ``.train()`` on the copy first; ``False`` keeps the modes
    it is in (frozen layers stay frozen). ``ys`` may hold ``None`` for a loss without labels."""
    import copy

    model = copy.deepcopy(model)
    if train:
        model.train()
    outs = []
    for x, y in zip(xs, ys):
        model.zero_grad()
        out = model(x)
        loss(out, y).backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= lr * p.grad
        outs.append({k: v.detach().numpy() for k, v in out.items()} if isinstance(out, dict)
                    else out.detach().numpy())  # a dict output (segmentation models) by key
    return outs, {k: v.numpy() for k, v in model.state_dict().items()}


def jax_sgd_steps(module: Any, variables: dict, xs: list, ys: list, lr: float, *,
                  loss: Callable = jax_cross_entropy) -> tuple[list[np.ndarray], dict]:
    """The same steps on a translated linen module (``train=True``, ``loss`` in JAX): per-step
    outputs, final variables."""

    @jax.jit
    def step(v, x, y):
        def objective(params):
            out, updates = module.apply({**v, "params": params}, x, train=True, mutable=["batch_stats"])
            return loss(out, y), (out, updates)

        (_, (out, updates)), grads = jax.value_and_grad(objective, has_aux=True)(v["params"])
        params = jax.tree_util.tree_map(lambda p, g: p - lr * g, v["params"], grads)
        return out, {**v, **updates, "params": params}

    outs = []
    for x, y in zip(xs, ys):
        out, variables = step(variables, jnp.asarray(x.numpy()), None if y is None else jnp.asarray(y.numpy()))
        outs.append(jax.tree_util.tree_map(np.asarray, out))
    return outs, variables


def nnx_sgd_steps(model: Any, xs: list, ys: list, lr: float, *,
                  loss: Callable = jax_cross_entropy) -> tuple[list[np.ndarray], Any]:
    """The same steps on a translated NNX model, in the modes it is in, with
    ``nnx.Optimizer(model, optax.sgd(lr), wrt=nnx.Param)`` (``p - lr * g``, as torch's loop):
    per-step outputs, the model (updated in place)."""
    import optax
    from flax import nnx

    optimizer = nnx.Optimizer(model, optax.sgd(lr), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        def objective(model):
            out = model(x)
            return loss(out, y), out

        (_, out), grads = nnx.value_and_grad(objective, has_aux=True)(model)
        optimizer.update(model, grads)
        return out

    outs = []
    for x, y in zip(xs, ys):
        out = step(model, optimizer, jnp.asarray(x.numpy()), None if y is None else jnp.asarray(y.numpy()))
        outs.append(jax.tree_util.tree_map(np.asarray, out))
    return outs, model


class Chain(torch.nn.Module):
    """A torch model of the given named children, applied in order."""

    def __init__(self, **children: torch.nn.Module):
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)

    def forward(self, x):
        for child in self.children():
            x = child(x)
        return x


_TORCHVISION_LIBRARY: list = []


def import_torchvision():
    """torchvision beside the CPU torch: PyPI's wheel is built against CUDA torch and its C ops do
    not register, so ``import torchvision`` (and timm, segmentation_models_pytorch, which import
    it) raises ``operator torchvision::nms does not exist``; the models are pure Python once the
    two schemas exist (docs/porting.md). Defined once per process."""
    # torchvision and its pillow are test dependencies (the `test` extra): missing is a failure.
    if not _TORCHVISION_LIBRARY:
        library = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _TORCHVISION_LIBRARY.append(library)  # keep the definitions alive
    import torchvision

    return torchvision


def warmed(model: torch.nn.Module, input_shape: tuple[int, ...], scale: float = 0.2, seed: int = 1
           ) -> torch.nn.Module:
    """``model`` in float64 as the translator tests take it: every 1-d parameter drawn around
    torch's init (weights near 1, biases near 0, ``scale`` apart: BatchNorm affine non-trivial),
    then two train-mode forwards on random inputs of ``input_shape`` (non-trivial buffers); its
    modes are left as they were."""
    model = model.double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_((1.0 if name.endswith("weight") else 0.0)
                        + scale * torch.randn(p.shape, generator=g, dtype=torch.float64))
        modes = {m: m.training for m in model.modules()}
        model.train()
        for _ in range(2):
            model(torch.randn(input_shape, generator=g, dtype=torch.float64))
        for m, training in modes.items():
            m.training = training
    return model


def assert_round_trip_exact(model: torch.nn.Module, variables: dict) -> None:
    """``flax_to_torch(variables, model)`` loads into a copy with ``strict=True`` and equals
    ``model``'s ``state_dict`` bit for bit."""
    import copy

    back = copy.deepcopy(model)
    state, _ = jaxbn.porting.flax_to_torch(variables, back, as_torch=True)
    back.load_state_dict(state, strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
