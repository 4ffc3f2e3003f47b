"""An equivalence harness: prove a torch model and its Flax port behave the same, step by step.

::

    from jaxbn.testing import CHANNELS_LAST, SGD, assert_equivalent

    assert_equivalent(torch_model, FlaxModel(), variables, batches, steps=5,
                      layout=CHANNELS_LAST,   # NCHW torch batches -> NHWC Flax inputs
                      sgd=SGD(loss="cross_entropy", targets=labels, learning_rate=0.1), atol=1e-9)

Both models run in eval mode and then in train mode for ``steps`` steps (torch's norm layers
in their own per-module modes -- a frozen ``bn.eval()`` stays frozen -- in the model's own mode,
else as ``model.train(mode)`` sets them; the report says so when they are mixed), feeding state forward
(running statistics, and with ``sgd`` the parameters after one plain SGD step on its loss).
After every step the outputs *and* the whole state are compared. On a mismatch the report
names the first diverging layer (torch forward hooks vs Flax ``capture_intermediates``, in
torch's execution order) and the first diverging variable (in ``state_dict`` order), each with
its max abs diff. Layer and variable names are matched with :mod:`jaxbn.porting`'s convention
(``layer1.0.bn1`` <-> ``layer1_0/bn1``). Layer outputs are compared in the Flax model's layout,
which :class:`Layout` states (never guessed from shapes: a 16-channel map at 16x16 has the same
shape either way). Needs torch (and optax for ``loss="cross_entropy"``: the ``testing`` extra).
The torch module passed in is copied, never modified.
"""

from __future__ import annotations

import copy
import dataclasses
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .. import porting
from ..porting.paths import path_name
from ..porting.tensors import numpy_to_tensor, tensor_to_numpy
from . import audit
from .modes import in_mode, mode_note

__all__ = ["CHANNELS_LAST", "SGD", "EquivalenceReport", "Layout", "StepComparison", "assert_equivalent",
           "check_equivalence", "to_channels_first", "to_channels_last"]

Loss = str | tuple[Callable, Callable]


def _identity(x: Any) -> Any:
    return x


def to_channels_last(x: Any) -> np.ndarray:
    """torch's ``(N, C, *spatial)`` -> ``(N, *spatial, C)`` (``x.movedim(1, -1)``); rank < 3 unchanged."""
    x = np.asarray(x)
    return np.moveaxis(x, 1, -1) if x.ndim >= 3 else x


def to_channels_first(x: Any) -> np.ndarray:
    """``(N, *spatial, C)`` -> torch's ``(N, C, *spatial)`` (``x.movedim(-1, 1)``); rank < 3 unchanged."""
    x = np.asarray(x)
    return np.moveaxis(x, -1, 1) if x.ndim >= 3 else x


@dataclasses.dataclass(frozen=True)
class Layout:
    """How torch's tensors map onto the Flax model's.

    Attributes:
      to_flax_input: a torch-layout NumPy batch -> the Flax model's input.
      from_flax_output: the Flax model's output -> torch's layout, to compare the final outputs.
      channels_last: whether the Flax model's layer outputs put channels last. Every torch layer
        output of rank >= 3 has its channels on axis 1 and is moved to the end before it is
        compared with the Flax layer's output when this is true. ``None`` (default): what
        ``to_flax_input`` implies -- it is applied to a batch shaped like the first input whose
        entries are all distinct: unchanged means channels-first, channels moved from axis 1 to
        the end means channels-last, anything else (a conversion that also rescales, say) is an
        error asking for ``channels_last`` explicitly. Inputs of rank < 3 imply channels-first.
        Only the layers need it; an apply function (no layers) never runs the probe.
    """

    to_flax_input: Callable[[np.ndarray], Any] = _identity
    from_flax_output: Callable[[np.ndarray], np.ndarray] = _identity
    channels_last: bool | None = None

    def resolved_channels_last(self, example: np.ndarray) -> bool:
        """``channels_last``, or what ``to_flax_input`` does to ``example``'s axes."""
        if self.channels_last is not None:
            return self.channels_last
        shape = np.shape(example)
        if len(shape) < 3:
            return False
        probe = np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape)  # distinct entries
        converted = np.asarray(self.to_flax_input(probe))
        for channels_last, expected in ((False, probe), (True, to_channels_last(probe))):
            expected = expected.astype(converted.dtype)  # a conversion may also cast (float32)
            if converted.shape == expected.shape and np.array_equal(converted, expected):
                return channels_last
        raise ValueError(
            "Layout: cannot tell the Flax layer layout from to_flax_input (it neither keeps torch's "
            "(N, C, ...) nor only moves the channels to the end); state it with "
            "Layout(..., channels_last=True) or channels_last=False")


# Images and other (N, C, *spatial) data in torch, channels-last in Flax (nn.Conv's layout).
CHANNELS_LAST = Layout(to_flax_input=to_channels_last, from_flax_output=to_channels_first, channels_last=True)


@dataclasses.dataclass(frozen=True)
class SGD:
    """One plain SGD step (``p -= learning_rate * grad``) per train step, in both frameworks.

    Attributes:
      loss: ``"cross_entropy"`` (``F.cross_entropy`` vs optax's integer-label softmax cross
        entropy, needs optax), ``"mse"``, or a ``(torch_fn, jax_fn)`` pair, each
        ``(output, target) -> scalar``.
      targets: one target per step (cycled if fewer than ``steps``).
      learning_rate: the step size.
    """

    loss: Loss
    targets: Sequence[Any]
    learning_rate: float


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
    settings: list[str] = dataclasses.field(default_factory=list)  # norm settings/mode/axis mismatches
    torch_modes: list[str] = dataclasses.field(default_factory=list)  # a run's mixed torch norm modes

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
        torch_modes = [f"torch modes: {m}" for m in self.torch_modes]
        settings = [f"norm settings differ: {m}" for m in self.settings]
        return "\n".join([head, *torch_modes, *settings, *(str(s) for s in self.steps)])


def _max_diff(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def _tolerance(reference: np.ndarray, atol: float) -> float:
    """``atol`` for values of magnitude <= 1, relative above (activations, running variances)."""
    ref = np.asarray(reference, np.float64)
    return atol * max(1.0, float(np.max(np.abs(ref))) if ref.size else 1.0)


def _layout_diff(torch_out: np.ndarray, flax_out: np.ndarray, channels_last: bool) -> float | None:
    """Diff of one layer's outputs, torch's moved to the Flax layout; None if the shapes then
    differ (a layer whose output is not comparable, e.g. one that flattens differently)."""
    torch_out = to_channels_last(torch_out) if channels_last else torch_out
    return _max_diff(torch_out, flax_out) if torch_out.shape == flax_out.shape else None


def _optax() -> Any:
    try:
        import optax
    except ImportError as e:
        raise ImportError(
            'loss="cross_entropy" needs optax: pip install "jaxbn[testing]" (or pass a '
            "(torch_fn, jax_fn) loss pair)") from e
    return optax


def _losses(loss: Loss) -> tuple[Callable, Callable]:
    if not isinstance(loss, str):
        return loss
    import torch.nn.functional as F

    if loss == "cross_entropy":
        optax = _optax()
        return (lambda y, t: F.cross_entropy(y, t),
                lambda y, t: optax.softmax_cross_entropy_with_integer_labels(y, t).mean())
    if loss == "mse":
        return (lambda y, t: F.mse_loss(y, t), lambda y, t: jnp.mean((y - t) ** 2))
    raise ValueError(f"unknown loss {loss!r}: use 'cross_entropy', 'mse' or a (torch_fn, jax_fn) pair")


class _TorchRun:
    """A private copy of the torch model in one mode (:func:`jaxbn.testing.modes.in_mode`: its
    own per-module modes in its own mode, else ``model.train(training)``) with forward hooks
    recording each layer's output."""

    def __init__(self, module: Any, training: bool):
        import torch

        self.torch = torch
        module, own = in_mode(module, training)
        self.module = copy.deepcopy(module) if own else module
        self.outputs: dict[str, np.ndarray] = {}
        for name, sub in self.module.named_modules():
            if name:
                sub.register_forward_hook(self._hook(name))

    def _hook(self, name: str) -> Callable:
        def record(_module, _inputs, output):
            if isinstance(output, self.torch.Tensor):
                self.outputs[name] = tensor_to_numpy(output)

        return record

    def step(self, x: np.ndarray, training: bool, loss: Callable | None, target: Any, lr: float | None):
        torch = self.torch
        self.outputs = {}
        xt = numpy_to_tensor(x)
        if training and lr is not None:
            self.module.zero_grad(set_to_none=True)
            y = self.module(xt)
            loss(y, numpy_to_tensor(target)).backward()
            with torch.no_grad():
                for p in self.module.parameters():
                    if p.grad is not None:
                        p.sub_(lr * p.grad)
        else:
            with torch.no_grad():
                y = self.module(xt)
        return tensor_to_numpy(y)


def _forward(module: Any, training: bool, kwargs: Mapping[str, Any]) -> Callable:
    """``(variables, x) -> (y, updated collections, intermediates)`` for a linen module or an
    apply function ``(variables, x, training) -> (y, updated collections)``."""
    if not isinstance(module, nn.Module):
        def forward(variables, x):
            y, updates = module(variables, x, training)
            return y, dict(updates or {}), {}

        return forward

    def forward(variables, x):
        # Mutable in every mode: whether a call writes the buffers is torch's rule (instance norm
        # writes them in eval too), and a collection that does not change comes back unchanged.
        mutable = ["intermediates"] + (["batch_stats"] if "batch_stats" in variables else [])
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
            out[porting.canonical_name(path[:-1])] = (path_name(path[:-1]), np.asarray(value))
    return out


def _first_layer(torch_outputs, flax_outputs, atol, channels_last: bool) -> Divergence | None:
    for name, t_out in torch_outputs.items():  # execution order
        match = flax_outputs.get(porting.canonical_name(name))
        if match is None:
            continue
        diff = _layout_diff(t_out, match[1], channels_last)
        if diff is not None and diff > _tolerance(t_out, atol):
            return Divergence(name, match[0], diff, _tolerance(t_out, atol))
    return None


def _state_diffs(torch_module, variables, rules, atol) -> list[Divergence]:
    """Per-variable diffs in ``state_dict`` order (torch state ported to the Flax layout)."""
    sd = torch_module.state_dict()
    ported, report = porting.torch_to_flax(sd, variables, rules=rules)
    flat_ported = porting.flatten_tree(ported)
    flat_mine = porting.flatten_tree(variables)
    return [Divergence(e.torch_key, path_name(e.flax_path),
                       _max_diff(flat_ported[e.flax_path], flat_mine[e.flax_path]),
                       _tolerance(flat_ported[e.flax_path], atol))
            for e in report.matched]


_TRAIN_KWARGS = types.MappingProxyType({"train": True})
_EVAL_KWARGS = types.MappingProxyType({"train": False})
_LAYOUT_FIELDS = tuple(f.name for f in dataclasses.fields(Layout))
_SGD_FIELDS = tuple(f.name for f in dataclasses.fields(SGD))


def _with_shorthands(layout: Layout, sgd: SGD | None, shorthands: Mapping[str, Any]) -> tuple[Layout, SGD | None]:
    """``layout`` and ``sgd`` with their fields given directly as keywords folded in (the form
    ``to_flax_input=..., loss=..., targets=..., learning_rate=...``); ``None`` counts as not given."""
    unknown = [k for k in shorthands if k not in _LAYOUT_FIELDS + _SGD_FIELDS]
    if unknown:
        raise TypeError(f"check_equivalence() got an unexpected keyword argument {unknown[0]!r}")
    given = {k: v for k, v in shorthands.items() if v is not None}
    layout_kw = {k: v for k, v in given.items() if k in _LAYOUT_FIELDS}
    sgd_kw = {k: v for k, v in given.items() if k in _SGD_FIELDS}
    layout = dataclasses.replace(layout, **layout_kw)
    if sgd is not None:
        return layout, dataclasses.replace(sgd, **sgd_kw)
    if sgd_kw and len(sgd_kw) < len(_SGD_FIELDS):
        missing = ", ".join(k for k in _SGD_FIELDS if k not in sgd_kw)
        raise TypeError(f"an SGD step needs loss, targets and learning_rate together (missing: {missing}); "
                        "or pass sgd=SGD(loss=..., targets=..., learning_rate=...)")
    return layout, SGD(**sgd_kw) if sgd_kw else None


def check_equivalence(
    torch_module: Any,
    flax_module: Any,
    variables: Any | None,
    inputs: Sequence[np.ndarray],
    *,
    steps: int = 3,
    modes: Sequence[str] = ("eval", "train"),
    layout: Layout = Layout(),
    sgd: SGD | None = None,
    train_kwargs: Mapping[str, Any] = _TRAIN_KWARGS,
    eval_kwargs: Mapping[str, Any] = _EVAL_KWARGS,
    rules: porting.Rules = None,
    atol: float = 1e-9,
    **shorthands: Any,
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
        (batch statistics, running statistics updated and fed forward). The torch model runs
        in its own per-module modes in the mode it is in (``model.train(); bn.eval()``: ``bn``
        stays frozen in the train run), and as ``model.train(mode)`` sets them (on a copy) in
        the other; ``EquivalenceReport.torch_modes`` names the layers when a run's are mixed.
        The twin's norm layers are audited (:func:`jaxbn.testing.audit.norm_mismatches`) in
        each run's mode, against those modes.
      layout: the Flax model's layout (:class:`Layout`; default: torch's layout unchanged;
        :data:`CHANNELS_LAST` for NCHW -> NHWC images).
      sgd: with an :class:`SGD`, each train step also takes one plain SGD step
        (``p -= lr * grad``) on its loss against ``targets[step]``, in both frameworks.
      train_kwargs, eval_kwargs: keyword arguments selecting the Flax module's mode
        (default ``train=True`` / ``train=False``).
      rules: name rules for :func:`jaxbn.porting.torch_to_flax` if names differ.
      atol: max abs diff allowed for the outputs; for each layer output and state variable
        it is scaled by ``max(1, max |torch value|)`` (activations and running variances can
        be large).
      **shorthands: the fields of :class:`Layout` (``to_flax_input``, ``from_flax_output``,
        ``channels_last``) and of :class:`SGD` (``loss``, ``targets``, ``learning_rate``, all
        three) may be given directly as keywords; they replace those fields of ``layout`` /
        ``sgd``.
    """
    layout, sgd = _with_shorthands(layout, sgd, shorthands)
    torch_loss, jax_loss = _losses(sgd.loss) if sgd is not None else (None, None)
    lr = sgd.learning_rate if sgd is not None else None
    if variables is None:
        if not isinstance(flax_module, nn.Module):
            raise TypeError("variables=None ports the torch weights into a linen module; with an "
                            "apply function pass the variables (see jaxbn.porting.torch_to_flax)")
        example = layout.to_flax_input(inputs[0])
        target = porting.target_from_module(flax_module, example, **eval_kwargs)
        variables, _ = porting.torch_to_flax(torch_module.state_dict(), target, rules=rules)
    variables = porting.plain_tree(variables)
    # only a linen module has layers to locate: an apply function never needs the layout probed
    channels_last = isinstance(flax_module, nn.Module) and layout.resolved_channels_last(inputs[0])
    settings: dict[str, None] = {}  # ordered, each line once (a setting differs in both modes)
    torch_modes = []
    results = []
    for mode in modes:
        training = mode == "train"
        kwargs = train_kwargs if training else eval_kwargs
        if isinstance(flax_module, nn.Module):
            settings.update(dict.fromkeys(audit.norm_mismatches(
                torch_module, flax_module, variables, layout.to_flax_input(inputs[0]),
                torch_training=training, channels_last=channels_last, **kwargs)))
        note = mode_note(torch_module, training)
        torch_modes += [note] if note else []
        run, state = _TorchRun(torch_module, training), variables
        flax_step = _flax_stepper(flax_module, training, dict(kwargs), jax_loss, lr)
        for step in range(steps):
            x = inputs[step % len(inputs)]
            target = None if sgd is None else sgd.targets[step % len(sgd.targets)]
            y_t = run.step(x, training, torch_loss, target, lr)
            y_f, state, intermediates = flax_step(
                state, layout.to_flax_input(x), None if target is None else jnp.asarray(target))
            y_f = layout.from_flax_output(np.asarray(y_f))
            diffs = _state_diffs(run.module, state, rules, atol)
            results.append(StepComparison(
                mode=mode, step=step + 1, output_diff=_max_diff(y_t, y_f),
                state_diff=max((d.max_abs_diff for d in diffs), default=0.0),
                first_layer=_first_layer(run.outputs, _flax_layer_outputs(intermediates), atol, channels_last),
                first_variable=next((d for d in diffs if d.diverges), None),
                atol=atol))
    return EquivalenceReport(results, atol, list(settings), torch_modes)


def assert_equivalent(*args: Any, **kwargs: Any) -> EquivalenceReport:
    """:func:`check_equivalence`, raising ``AssertionError`` with the full report on mismatch."""
    report = check_equivalence(*args, **kwargs)
    if not report.ok:
        raise AssertionError(str(report))
    return report
