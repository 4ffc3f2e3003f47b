"""An equivalence harness: prove a torch model and its Flax port behave the same, step by step.

::

    from jaxbn.testing import assert_equivalent

    assert_equivalent(torch_model, FlaxModel(), variables, batches, steps=5,
                      to_flax_input=lambda x: x.transpose(0, 2, 3, 1),   # NCHW -> NHWC
                      loss="cross_entropy", targets=labels, learning_rate=0.1, atol=1e-9)

Both models run in eval mode and then in train mode for ``steps`` steps, feeding state forward
(running statistics, and with ``learning_rate`` the parameters after one plain SGD step on
``loss``). After every step the outputs *and* the whole state are compared. On a mismatch the
report names the first diverging layer (torch forward hooks vs Flax ``capture_intermediates``,
in torch's execution order) and the first diverging variable (in ``state_dict`` order), each
with its max abs diff. Layer and variable names are matched with :mod:`jaxbn.porting`'s
convention (``layer1.0.bn1`` <-> ``layer1_0/bn1``). Needs torch. The torch module passed in is
copied, never modified.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .. import porting
from ..porting import formats as checkpoint_io
from . import audit

__all__ = ["EquivalenceReport", "StepComparison", "assert_equivalent", "check_equivalence"]

Loss = str | tuple[Callable, Callable]


@dataclasses.dataclass
class Divergence:
    """Where two runs first differ: the torch name, the Flax name and the max abs diff."""

    torch_name: str
    flax_name: str
    max_abs_diff: float
    tolerance: float = 0.0

    @property
    def diverges(self) -> bool:
        return self.max_abs_diff > self.tolerance

    def __str__(self) -> str:
        return f"{self.torch_name} (flax {self.flax_name}): max abs diff {self.max_abs_diff:.3e}"


@dataclasses.dataclass
class StepComparison:
    """One compared step."""

    mode: str  # "eval" or "train"
    step: int
    output_diff: float
    state_diff: float
    first_layer: Divergence | None
    first_variable: Divergence | None
    atol: float

    @property
    def ok(self) -> bool:
        return self.output_diff <= self.atol and self.first_variable is None

    def __str__(self) -> str:
        s = (f"{self.mode:5s} step {self.step}: output max abs diff {self.output_diff:.3e}, "
             f"state max abs diff {self.state_diff:.3e}  {'ok' if self.ok else 'MISMATCH'}")
        if not self.ok:
            s += f"\n    first diverging layer:    {self.first_layer or '(none above tolerance)'}"
            s += f"\n    first diverging variable: {self.first_variable or '(none above tolerance)'}"
        return s


@dataclasses.dataclass
class EquivalenceReport:
    """Every step's comparison; ``ok`` when all are within ``atol``."""

    steps: list[StepComparison]
    atol: float
    settings: list[str] = dataclasses.field(default_factory=list)  # norm core-parameter mismatches

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.steps) and not self.settings

    def max_output_diff(self, mode: str) -> float:
        return max((s.output_diff for s in self.steps if s.mode == mode), default=0.0)

    def max_state_diff(self, mode: str) -> float:
        return max((s.state_diff for s in self.steps if s.mode == mode), default=0.0)

    @property
    def first_failure(self) -> StepComparison | None:
        return next((s for s in self.steps if not s.ok), None)

    def __str__(self) -> str:
        head = f"torch vs Flax equivalence (atol {self.atol:g}): {'OK' if self.ok else 'MISMATCH'}"
        settings = [f"norm settings differ: {m}" for m in self.settings]
        return "\n".join([head, *settings, *(str(s) for s in self.steps)])


def _max_diff(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def _tolerance(reference: np.ndarray, atol: float) -> float:
    """``atol`` for values of magnitude <= 1, relative above (activations, running variances)."""
    ref = np.asarray(reference, np.float64)
    return atol * max(1.0, float(np.max(np.abs(ref))) if ref.size else 1.0)


def _layout_diff(torch_out: np.ndarray, flax_out: np.ndarray) -> float | None:
    """Diff of one layer's outputs, allowing channels-first vs channels-last; None if unrelated."""
    if torch_out.shape == flax_out.shape:
        return _max_diff(torch_out, flax_out)
    if torch_out.ndim >= 3 and np.moveaxis(torch_out, 1, -1).shape == flax_out.shape:
        return _max_diff(np.moveaxis(torch_out, 1, -1), flax_out)
    return None


def _losses(loss: Loss) -> tuple[Callable, Callable]:
    if not isinstance(loss, str):
        return loss
    import optax
    import torch.nn.functional as F

    if loss == "cross_entropy":
        return (lambda y, t: F.cross_entropy(y, t),
                lambda y, t: optax.softmax_cross_entropy_with_integer_labels(y, t).mean())
    if loss == "mse":
        return (lambda y, t: F.mse_loss(y, t), lambda y, t: jnp.mean((y - t) ** 2))
    raise ValueError(f"unknown loss {loss!r}: use 'cross_entropy', 'mse' or a (torch_fn, jax_fn) pair")


class _TorchRun:
    """A private copy of the torch model with forward hooks recording each layer's output."""

    def __init__(self, module: Any):
        import torch

        self.torch = torch
        self.module = copy.deepcopy(module)
        self.outputs: dict[str, np.ndarray] = {}
        for name, sub in self.module.named_modules():
            if name:
                sub.register_forward_hook(self._hook(name))

    def _hook(self, name: str) -> Callable:
        def record(_module, _inputs, output):
            if isinstance(output, self.torch.Tensor):
                self.outputs[name] = checkpoint_io.tensor_to_numpy(output)

        return record

    def step(self, x: np.ndarray, training: bool, loss: Callable | None, target: Any, lr: float | None):
        torch = self.torch
        self.outputs = {}
        self.module.train(training)
        xt = checkpoint_io.numpy_to_tensor(x)
        if training and lr is not None:
            self.module.zero_grad(set_to_none=True)
            y = self.module(xt)
            loss(y, checkpoint_io.numpy_to_tensor(target)).backward()
            with torch.no_grad():
                for p in self.module.parameters():
                    if p.grad is not None:
                        p.sub_(lr * p.grad)
        else:
            with torch.no_grad():
                y = self.module(xt)
        return checkpoint_io.tensor_to_numpy(y)


def _forward(module: Any, training: bool, kwargs: Mapping[str, Any]) -> Callable:
    """``(variables, x) -> (y, updated collections, intermediates)`` for a linen module or an
    apply function ``(variables, x, training) -> (y, updated collections)``."""
    if not isinstance(module, nn.Module):
        def forward(variables, x):
            y, updates = module(variables, x, training)
            return y, dict(updates or {}), {}

        return forward

    def forward(variables, x):
        mutable = ["intermediates"] + (["batch_stats"] if training and "batch_stats" in variables else [])
        y, updates = module.apply(variables, x, capture_intermediates=True, mutable=mutable, **kwargs)
        updates = dict(updates)
        return y, updates, updates.pop("intermediates", {})

    return forward


def _flax_stepper(module, training, kwargs, loss, lr) -> Callable:
    """A jitted step ``(variables, x, target) -> (output, new variables, intermediates)``."""
    forward = _forward(module, training, kwargs)
    sgd = training and lr is not None

    def step(variables, x, target):
        rest = {k: v for k, v in variables.items() if k != "params"}

        def run(params):
            y, updates, intermediates = forward({"params": params, **rest}, x)
            return (loss(y, target) if sgd else jnp.zeros(())), (y, updates, intermediates)

        params = variables.get("params", {})
        if sgd:
            grads, (y, updates, intermediates) = jax.grad(run, has_aux=True)(params)
            params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
        else:
            _, (y, updates, intermediates) = run(params)
        new = dict(variables, **updates)
        if "params" in variables:
            new["params"] = params
        return y, new, intermediates

    return jax.jit(step)


def _flax_layer_outputs(intermediates: Mapping) -> dict[str, tuple[str, np.ndarray]]:
    """``{canonical module name: (flax name, output)}`` from ``capture_intermediates``."""
    out = {}
    for path, value in porting.flatten_tree(intermediates).items():
        if path[-1] != "__call__" or len(path) < 2:
            continue
        value = value[0] if isinstance(value, tuple) else value
        if isinstance(value, (jax.Array, np.ndarray)):
            out[porting.canonical_name(path[:-1])] = ("/".join(map(str, path[:-1])), np.asarray(value))
    return out


def _first_layer(torch_outputs, flax_outputs, atol) -> Divergence | None:
    for name, t_out in torch_outputs.items():  # execution order
        match = flax_outputs.get(porting.canonical_name(name))
        if match is None:
            continue
        diff = _layout_diff(t_out, match[1])
        if diff is not None and diff > _tolerance(t_out, atol):
            return Divergence(name, match[0], diff, _tolerance(t_out, atol))
    return None


def _state_diffs(torch_module, variables, rules, atol) -> list[Divergence]:
    """Per-variable diffs in ``state_dict`` order (torch state ported to the Flax layout)."""
    sd = torch_module.state_dict()
    ported, report = porting.torch_to_flax(sd, variables, rules=rules)
    flat_ported = porting.flatten_tree(ported)
    flat_mine = porting.flatten_tree(variables)
    return [Divergence(e.torch_key, "/".join(map(str, e.flax_path)),
                       _max_diff(flat_ported[e.flax_path], flat_mine[e.flax_path]),
                       _tolerance(flat_ported[e.flax_path], atol))
            for e in report.matched]


def check_equivalence(
    torch_module: Any,
    flax_module: Any,
    variables: Any | None,
    inputs: Sequence[np.ndarray],
    *,
    steps: int = 3,
    modes: Sequence[str] = ("eval", "train"),
    to_flax_input: Callable[[np.ndarray], Any] = lambda x: x,
    from_flax_output: Callable[[np.ndarray], np.ndarray] = lambda y: y,
    train_kwargs: Mapping[str, Any] = {"train": True},
    eval_kwargs: Mapping[str, Any] = {"train": False},
    loss: Loss | None = None,
    targets: Sequence[Any] | None = None,
    learning_rate: float | None = None,
    rules: porting.Rules = None,
    atol: float = 1e-9,
) -> EquivalenceReport:
    """Run a torch module and its Flax port side by side; compare after every step.

    PyTorch equivalent: running ``torch_module`` and its port in lock-step in your own test.

    Args:
      torch_module: the reference ``torch.nn.Module`` (copied; not modified).
      flax_module: the linen module (``apply(variables, x, **kwargs)``) using
        :class:`jaxbn.linen.BatchNorm`; or a JAX apply function
        ``(variables, x, training) -> (y, updated collections e.g. {'batch_stats': ...})``
        (then layers cannot be located, only variables).
      variables: its variables; ``None`` ports ``torch_module.state_dict()`` into it.
      inputs: one torch-layout NumPy batch per step (cycled if fewer than ``steps``).
      steps: steps per mode.
      modes: ``"eval"`` (running statistics; state must not change) and/or ``"train"``
        (batch statistics, running statistics updated and fed forward).
      to_flax_input, from_flax_output: layout conversions (e.g. NCHW -> NHWC for images).
      train_kwargs, eval_kwargs: keyword arguments selecting the Flax module's mode.
      loss, targets, learning_rate: with all three, each train step also takes one plain SGD
        step (``p -= lr * grad``) on ``loss`` (``"cross_entropy"``, ``"mse"`` or a
        ``(torch_fn, jax_fn)`` pair) against ``targets[step]``, in both frameworks.
      rules: name rules for :func:`jaxbn.porting.torch_to_flax` if names differ.
      atol: max abs diff allowed for the outputs; for each layer output and state variable
        it is scaled by ``max(1, max |torch value|)`` (activations and running variances can
        be large).
    """
    torch_loss, jax_loss = _losses(loss) if loss is not None else (None, None)
    lr = learning_rate if loss is not None else None
    if variables is None:
        if not isinstance(flax_module, nn.Module):
            raise TypeError("variables=None ports the torch weights into a linen module; with an "
                            "apply function pass the variables (see jaxbn.porting.torch_to_flax)")
        example = to_flax_input(inputs[0])
        target = porting.target_from_module(flax_module, example, **eval_kwargs)
        variables, _ = porting.torch_to_flax(torch_module.state_dict(), target, rules=rules)
    variables = porting.plain_tree(variables)
    settings = (audit.norm_mismatches(torch_module, flax_module, variables, to_flax_input(inputs[0]),
                                      **eval_kwargs) if isinstance(flax_module, nn.Module) else [])
    results = []
    for mode in modes:
        training = mode == "train"
        kwargs = train_kwargs if training else eval_kwargs
        run, state = _TorchRun(torch_module), variables
        flax_step = _flax_stepper(flax_module, training, dict(kwargs), jax_loss, lr)
        for step in range(steps):
            x = inputs[step % len(inputs)]
            target = None if targets is None else targets[step % len(targets)]
            y_t = run.step(x, training, torch_loss, target, lr)
            y_f, state, intermediates = flax_step(
                state, to_flax_input(x), None if target is None else jnp.asarray(target))
            y_f = from_flax_output(np.asarray(y_f))
            diffs = _state_diffs(run.module, state, rules, atol)
            results.append(StepComparison(
                mode=mode, step=step + 1, output_diff=_max_diff(y_t, y_f),
                state_diff=max((d.max_abs_diff for d in diffs), default=0.0),
                first_layer=_first_layer(run.outputs, _flax_layer_outputs(intermediates), atol),
                first_variable=next((d for d in diffs if d.diverges), None),
                atol=atol))
    return EquivalenceReport(results, atol, settings)


def assert_equivalent(*args: Any, **kwargs: Any) -> EquivalenceReport:
    """:func:`check_equivalence`, raising ``AssertionError`` with the full report on mismatch."""
    report = check_equivalence(*args, **kwargs)
    if not report.ok:
        raise AssertionError(str(report))
    return report
