"""Audit a hand-written Flax twin's norm layers against the torch model, before any numbers.

A ``state_dict`` does not carry a norm layer's ``eps``, ``momentum``, ``affine``, buffers or
current ``track_running_stats``; a twin with torch's defaults where the model has MobileNetV3's
``eps=0.001, momentum=0.01`` agrees in eval to ~1e-6 (inside float32 tolerances) and drifts in
training. :func:`norm_mismatches` compares, layer by layer (names matched with
:func:`jaxbn.porting.canonical_name`), every torch BatchNorm/InstanceNorm with the Flax norm
layer at the same path -- ``jaxbn.linen`` layers (attributes and call-time overrides) and
``flax.linen.BatchNorm`` (Flax's momentum convention, ``1 -`` torch's) -- and lists every
difference by name. :func:`jaxbn.testing.check_equivalence` reports them first.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax

from .. import porting
from ..adapter_flags import pick
from ..functional.torch_rules import BATCH_NORM, Family
from ..porting.settings import NormSettings, norm_settings

__all__ = ["flax_norm_settings", "norm_mismatches"]

_COMPARED = ("family", "eps", "momentum", "affine", "has_buffers", "track_running_stats")


def _from_module(module: nn.Module, call_kwargs: dict[str, Any]) -> NormSettings | None:
    """The torch-equivalent settings of one Flax norm call, or ``None`` if not a norm."""
    from .. import linen

    if isinstance(module, (linen.BatchNorm, linen.InstanceNorm)):
        return NormSettings(
            family=module.family, torch_type=type(module).__name__,
            num_features=module.num_features,
            eps=pick(call_kwargs.get("eps", linen.UNSET), module.eps),
            momentum=pick(call_kwargs.get("momentum", linen.UNSET), module.momentum),
            affine=module.affine, has_buffers=module.track_running_stats,
            track_running_stats=pick(call_kwargs.get("track_running_stats", linen.UNSET),
                                     module.track_running_stats))
    if isinstance(module, nn.BatchNorm):
        return NormSettings(
            family=BATCH_NORM, torch_type="flax.linen.BatchNorm", num_features=None,
            eps=module.epsilon, momentum=1.0 - module.momentum,
            affine=module.use_scale and module.use_bias, has_buffers=True, track_running_stats=True)
    return None


def flax_norm_settings(flax_module: nn.Module, variables: Any, *inputs: Any, **apply_kwargs: Any) -> dict[str, NormSettings]:
    """``{canonical path: NormSettings}`` of every norm call in ``flax_module.apply(variables,
    *inputs, **apply_kwargs)`` (traced abstractly, nothing computed)."""
    found: dict[str, NormSettings] = {}

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__":
            settings = _from_module(context.module, kwargs)
            if settings is not None:
                found.setdefault(porting.canonical_name(context.module.scope.path), settings)
        return next_fun(*args, **kwargs)

    def run(variables, *inputs):
        with nn.intercept_methods(record):
            return flax_module.apply(variables, *inputs, mutable=True, **apply_kwargs)

    jax.eval_shape(run, variables, *inputs)
    return found


def _shown(value: Any) -> str:
    """A compared value as the report prints it: a family by its torch name."""
    return repr(value.name if isinstance(value, Family) else value)


def _differs(field: str, torch_value: Any, flax_value: Any) -> bool:
    if isinstance(torch_value, float) and isinstance(flax_value, float):
        return not math.isclose(torch_value, flax_value, rel_tol=1e-9, abs_tol=0.0)
    return torch_value != flax_value


def norm_mismatches(torch_module: Any, flax_module: nn.Module, variables: Any, *inputs: Any,
                    **apply_kwargs: Any) -> list[str]:
    """Every difference between the torch model's norm layers and the Flax module's, by name.

    PyTorch equivalent: reading ``bn.eps``, ``bn.momentum``, ``bn.affine``,
    ``bn.running_mean is not None`` and ``bn.track_running_stats`` of every norm layer and
    checking the twin's by hand.

    Args:
      torch_module: the torch model.
      flax_module, variables: the twin and its variables (or an abstract target).
      inputs, apply_kwargs: one example call of the twin (e.g. ``x, train=False``).

    Returns:
      One line per problem, in the torch model's order: a field that differs
      (``"layer1.0.bn1: eps: torch 0.001, Flax 1e-05"``), a torch norm with no Flax norm at its
      path, a Flax norm with no torch norm. Empty when everything agrees.
    """
    torch_norms = {porting.canonical_name(p): (p, s) for p, s in norm_settings(torch_module).items()}
    flax_norms = flax_norm_settings(flax_module, variables, *inputs, **apply_kwargs)
    lines = []
    for key, (path, t) in torch_norms.items():
        f = flax_norms.get(key)
        if f is None:
            lines.append(f"{path} ({t.torch_type}): no norm layer at this path in the Flax module")
            continue
        note = f" ({f.torch_type})" if f.torch_type.startswith("flax") else ""
        lines += [f"{path}: {field}: torch {_shown(getattr(t, field))}, "
                  f"Flax {_shown(getattr(f, field))}{note}"
                  for field in _COMPARED if _differs(field, getattr(t, field), getattr(f, field))]
    lines += [f"{key} ({f.torch_type}): a Flax norm layer with no torch norm at this path"
              for key, f in flax_norms.items() if key not in torch_norms]
    return lines
