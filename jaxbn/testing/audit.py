"""Audit a hand-written Flax twin's norm layers against the torch model, before any numbers.

A ``state_dict`` does not carry a norm layer's ``eps``, ``momentum``, ``affine``, buffers or
current ``track_running_stats``; a twin with torch's defaults where the model has MobileNetV3's
``eps=0.001, momentum=0.01`` agrees in eval to ~1e-6 (inside float32 tolerances) and drifts in
training. Nor does it carry each layer's *mode* (a frozen ``bn.eval()`` inside a training model)
or its feature axis. :func:`norm_mismatches` compares, layer by layer (names matched with
:func:`jaxbn.porting.canonical_name`), every torch BatchNorm/InstanceNorm with the Flax norm
layer at the same path, as the twin calls it in one audited call (observed with
``flax.linen.intercept_methods``, traced abstractly) -- ``jaxbn.linen`` layers (attributes and
call-time overrides) and ``flax.linen.BatchNorm`` (Flax's momentum convention, ``1 -`` torch's;
its biased running-variance update, which no setting makes torch's) -- and lists every
difference by name. :func:`jaxbn.testing.check_equivalence` reports them first.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax

from .. import porting
from ..adapter_flags import pick
from ..functional.torch_rules import BATCH_NORM, Family
from ..functional.types import BatchNormFlags
from ..porting.settings import NormSettings, norm_settings
from . import modes

__all__ = ["FlaxNormCall", "flax_norm_calls", "flax_norm_settings", "norm_mismatches"]

_COMPARED = ("family", "eps", "momentum", "affine", "has_buffers", "track_running_stats")
FLAX_BATCH_NORM = "flax.linen.BatchNorm"
_BIASED = ("running_var update: torch the unbiased batch variance, Flax the biased one "
           f"({FLAX_BATCH_NORM} cannot match torch in training: use jaxbn.linen.BatchNorm)")


@dataclasses.dataclass(frozen=True)
class FlaxNormCall:
    """What one Flax norm layer does in the audited call, in torch's terms.

    Attributes:
      settings: its torch-equivalent core parameters (:class:`jaxbn.porting.NormSettings`).
      training: whether it trains in this call (torch's ``module.training``).
      mode_words: how the twin set that (``"train=True"``, ``"use_running_average=True"``).
      axes: its feature axes, non-negative, for ``input_shape``.
      input_shape: the shape of its input in this call.
      biased_running_var: it updates the running variance with the *biased* batch variance
        (``flax.linen.BatchNorm``; torch's running_var takes the unbiased one).
      affine_words: how the twin spells ``affine`` when that is not one bool
        (``"use_scale=True, use_bias=False"``), else ``None``.
    """

    settings: NormSettings
    training: bool
    mode_words: str
    axes: tuple[int, ...]
    input_shape: tuple[int, ...]
    biased_running_var: bool = False
    affine_words: str | None = None

    @property
    def note(self) -> str:
        """`` (flax.linen.BatchNorm)`` for a Flax class, appended to its lines; else empty."""
        return f" ({self.settings.torch_type})" if self.settings.torch_type.startswith("flax") else ""


def _call_arg(args: tuple, kwargs: dict[str, Any], name: str) -> Any:
    """The call's second positional argument or its keyword ``name`` (the mode of both
    ``jaxbn.linen`` norms and ``flax.linen.BatchNorm``), ``None`` when not given."""
    return args[1] if len(args) > 1 else kwargs.get(name)


def _axes(axis: int | tuple[int, ...], ndim: int) -> tuple[int, ...]:
    return tuple(a % ndim for a in (axis if isinstance(axis, tuple) else (axis,)))


def _from_module(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> FlaxNormCall | None:
    """What one Flax norm call does, or ``None`` if ``module`` is not a norm layer."""
    from .. import linen

    shape = tuple((args[0] if args else kwargs["x"]).shape)
    if isinstance(module, (linen.BatchNorm, linen.InstanceNorm)):
        train = _call_arg(args, kwargs, "train")
        train = module.train if train is None else train
        settings = NormSettings(
            family=module.family, torch_type=type(module).__name__,
            num_features=module.num_features,
            eps=pick(kwargs.get("eps", linen.UNSET), module.eps),
            momentum=pick(kwargs.get("momentum", linen.UNSET), module.momentum),
            affine=module.affine, has_buffers=module.track_running_stats,
            track_running_stats=pick(kwargs.get("track_running_stats", linen.UNSET),
                                     module.track_running_stats))
        return FlaxNormCall(  # an unset mode is torch's default, training (adapter_flags.call_flags)
            settings, training=True if train is None else bool(train),
            mode_words="train not set" if train is None else f"train={bool(train)}",
            axes=_axes(module.axis, len(shape)), input_shape=shape)
    if isinstance(module, nn.BatchNorm):
        frozen = nn.merge_param("use_running_average", module.use_running_average,
                                _call_arg(args, kwargs, "use_running_average"))
        settings = NormSettings(
            family=BATCH_NORM, torch_type=FLAX_BATCH_NORM, num_features=None,
            eps=module.epsilon, momentum=1.0 - module.momentum,
            affine=module.use_scale and module.use_bias, has_buffers=True, track_running_stats=True)
        mixed = module.use_scale != module.use_bias
        return FlaxNormCall(
            settings, training=not frozen, mode_words=f"use_running_average={bool(frozen)}",
            axes=_axes(module.axis, len(shape)), input_shape=shape, biased_running_var=True,
            affine_words=f"use_scale={module.use_scale}, use_bias={module.use_bias}" if mixed else None)
    return None


def flax_norm_calls(flax_module: nn.Module, variables: Any, *inputs: Any, **apply_kwargs: Any) -> dict[str, FlaxNormCall]:
    """``{canonical path: FlaxNormCall}`` of every norm call in ``flax_module.apply(variables,
    *inputs, **apply_kwargs)`` (traced abstractly, nothing computed; a layer called twice is
    described by its first call)."""
    found: dict[str, FlaxNormCall] = {}

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and (args or "x" in kwargs):
            call = _from_module(context.module, args, kwargs)
            if call is not None:
                found.setdefault(porting.canonical_name(context.module.scope.path), call)
        return next_fun(*args, **kwargs)

    def run(variables, *inputs):
        with nn.intercept_methods(record):
            return flax_module.apply(variables, *inputs, mutable=True, **apply_kwargs)

    jax.eval_shape(run, variables, *inputs)
    return found


def flax_norm_settings(flax_module: nn.Module, variables: Any, *inputs: Any, **apply_kwargs: Any) -> dict[str, NormSettings]:
    """``{canonical path: NormSettings}`` of every norm call in ``flax_module.apply(variables,
    *inputs, **apply_kwargs)`` (traced abstractly, nothing computed)."""
    return {k: c.settings for k, c in flax_norm_calls(flax_module, variables, *inputs, **apply_kwargs).items()}


def _shown(value: Any) -> str:
    """A compared value as the report prints it: a family by its torch name."""
    return repr(value.name if isinstance(value, Family) else value)


def _differs(field: str, torch_value: Any, flax_value: Any) -> bool:
    if isinstance(torch_value, float) and isinstance(flax_value, float):
        return not math.isclose(torch_value, flax_value, rel_tol=1e-9, abs_tol=0.0)
    return torch_value != flax_value


def _field_lines(path: str, t: NormSettings, f: FlaxNormCall) -> list[str]:
    """``"bn: eps: torch 0.001, Flax 1e-05"`` for every core parameter that differs."""
    lines = []
    for field in _COMPARED:
        torch_value, flax_value = getattr(t, field), getattr(f.settings, field)
        if field == "affine" and f.affine_words is not None:  # only one of scale / bias: never torch
            lines.append(f"{path}: affine: torch {_shown(torch_value)}, Flax {f.affine_words}{f.note}")
        elif _differs(field, torch_value, flax_value):
            lines.append(f"{path}: {field}: torch {_shown(torch_value)}, Flax {_shown(flax_value)}{f.note}")
    return lines


def _torch_flags(t: NormSettings, training: bool) -> BatchNormFlags:
    return BatchNormFlags(training=training, track_running_stats=t.track_running_stats,
                          momentum=t.momentum, eps=t.eps)


def _mode_lines(path: str, t: NormSettings, training: bool, model_training: bool, f: FlaxNormCall) -> list[str]:
    """The mode line (where the mode changes what torch's layer does) and, for a twin that
    updates its running variance with the biased batch variance, that line where torch updates."""
    flags = _torch_flags(t, training)
    lines = []
    if f.training != training and t.family.mode_matters(flags, t.has_buffers):
        flax_mode = "train" if f.training else "eval"
        lines.append(f"{path}: mode: torch {modes.deviation_words(path, training, model_training)}, "
                     f"Flax {flax_mode} ({f.mode_words}{', ' + f.settings.torch_type if f.note else ''})")
    if f.biased_running_var and f.training and t.family.plan(flags, t.has_buffers).writes_buffers:
        lines.append(f"{path}: {_BIASED}")
    return lines


def _shape_layout(shape: tuple[int, ...], channels: int | None) -> bool | None:
    """Whether an input of this shape is channels-last, when only one of axis 1 and the last
    axis has the torch layer's ``channels`` (else ``None``: the shape cannot tell)."""
    if channels is None or len(shape) < 3 or (shape[1] == channels) == (shape[-1] == channels):
        return None
    return shape[-1] == channels


def _layout_of_twin(pairs: list[tuple[NormSettings, FlaxNormCall]]) -> bool | None:
    """Channels-last or not, as every norm input whose shape tells agrees; ``None`` otherwise."""
    told = {_shape_layout(f.input_shape, t.num_features) for t, f in pairs} - {None}
    return told.pop() if len(told) == 1 else None


def _axis_lines(path: str, t: NormSettings, f: FlaxNormCall, layout: bool | None) -> list[str]:
    """A line when the twin normalizes another axis than torch's channels.

    Torch's channels are axis 1 of its input; in the twin they are axis 1 or the last axis.
    Which one: this input's shape where only one has torch's C, else ``layout``
    (channels-last or not)."""
    shape, channels = f.input_shape, t.num_features
    ndim, last = len(shape), len(shape) - 1
    what = f"its {channels} channels" if channels is not None else "its channels"
    if len(f.axes) != 1:
        return [f"{path}: axis: torch normalizes {what} (one axis), Flax axes {f.axes}{f.note}"]
    axis, own = f.axes[0], _shape_layout(shape, channels)
    chosen = own if own is not None else layout
    if ndim <= 2:
        expected = (ndim - 1,)
    elif chosen is not None:
        expected = (last if chosen else 1,)
    else:
        expected = tuple(a for a in (1, last) if channels is None or shape[a] == channels)
    if axis in expected or (not expected and shape[axis] == channels):
        return []
    if not expected:
        return [f"{path}: axis: torch normalizes {what}, Flax axis {axis} of its {shape} input "
                f"(size {shape[axis]}){f.note}"]
    how = f", {'channels-last' if chosen else 'channels-first'}" if own is None and chosen is not None and ndim > 2 else ""
    where = " or ".join(str(a) for a in expected)
    return [f"{path}: axis: torch normalizes {what} (axis {where} of this {shape} input{how}), "
            f"Flax axis {axis}{f.note}"]


def norm_mismatches(torch_module: Any, flax_module: nn.Module, variables: Any, *inputs: Any,
                    torch_training: bool | None = None, channels_last: bool | None = None,
                    **apply_kwargs: Any) -> list[str]:
    """Every difference between the torch model's norm layers and the Flax module's, by name.

    PyTorch equivalent: reading ``bn.eps``, ``bn.momentum``, ``bn.affine``,
    ``bn.running_mean is not None``, ``bn.track_running_stats`` and ``bn.training`` of every
    norm layer and checking the twin's by hand.

    Args:
      torch_module: the torch model (never modified).
      flax_module, variables: the twin and its variables (or an abstract target).
      inputs, apply_kwargs: one example call of the twin (e.g. ``x, train=False``).
      torch_training: the torch mode this call is the twin of. ``None``: the call's ``train`` /
        ``training`` keyword (``not use_running_average``) if it is a bool, else the torch
        model's ``training``. In the torch model's own mode every norm layer's own mode is the
        reference (``model.train(); bn.eval()``: ``bn`` must not train); in the other mode,
        what ``model.train(torch_training)`` makes of them (on a copy).
      channels_last: where the twin's norm inputs carry torch's channels when their shape cannot
        tell (``(N, 4, 4, 4)`` for 4 channels): last (``True``) or axis 1 (``False``);
        ``None``: as the other norm inputs of the twin show.

    Returns:
      One line per problem, in the torch model's order: a field that differs
      (``"layer1.0.bn1: eps: torch 0.001, Flax 1e-05"``), a mode that differs
      (``"bn1: mode: torch eval (frozen: bn1.eval() in a training model), Flax train
      (train=True)"``), a training-time update torch does differently (``flax.linen.BatchNorm``'s
      biased running variance, reported when the call trains), a feature axis that is not
      torch's channels, a torch norm with no Flax norm at its path, a Flax norm with no torch
      norm. Empty when everything agrees.
    """
    training = modes.audited_mode(torch_module, torch_training, apply_kwargs)
    reference, _ = modes.in_mode(torch_module, training)
    torch_modes = modes.norm_modes(reference)
    torch_norms = {porting.canonical_name(p): (p, s) for p, s in norm_settings(reference).items()}
    flax_norms = flax_norm_calls(flax_module, variables, *inputs, **apply_kwargs)
    pairs = {key: (path, t, flax_norms[key]) for key, (path, t) in torch_norms.items() if key in flax_norms}
    layout = channels_last if channels_last is not None else _layout_of_twin([(t, f) for _, t, f in pairs.values()])
    lines = []
    for key, (path, t) in torch_norms.items():
        if key not in pairs:
            lines.append(f"{path} ({t.torch_type}): no norm layer at this path in the Flax module")
            continue
        f = pairs[key][2]
        lines += _field_lines(path, t, f)
        lines += _mode_lines(path, t, torch_modes[path], bool(reference.training), f)
        lines += _axis_lines(path, t, f, layout)
    lines += [f"{key} ({f.settings.torch_type}): a Flax norm layer with no torch norm at this path"
              for key, f in flax_norms.items() if key not in torch_norms]
    return lines
