"""The core parameters of every norm layer in a torch module, as data.

A ``state_dict`` carries a norm layer's tensors but not what decides its behaviour: ``eps``,
``momentum`` (``None`` included), ``affine``, whether running-statistics buffers exist, and the
*current* ``track_running_stats`` (torch users flip it after construction). MobileNetV3 builds
every BatchNorm with ``eps=0.001, momentum=0.01``; a twin written with torch's defaults agrees in
eval to ~1e-6 and then drifts in training. :func:`norm_settings` reads them off the module so a
port (:func:`jaxbn.from_torch`) or a hand-written twin (``BatchNorm(**s.linen_kwargs())``) can use
them, and :mod:`jaxbn.testing.audit` can compare them.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from ..functional.families import FAMILIES
from ..functional.torch_rules import Family

__all__ = ["NormSettings", "family_of", "norm_settings", "settings_of"]


@dataclasses.dataclass(frozen=True)
class NormSettings:
    """One torch norm layer's core parameters (PyTorch: the module's attributes and buffers).

    Attributes:
      family: the torch family (:class:`jaxbn.functional.torch_rules.Family`): ``BATCH_NORM``
        (``BatchNorm{1,2,3}d``, ``SyncBatchNorm``, lazy ones) or ``INSTANCE_NORM``;
        ``family.name`` is the ``jaxbn.linen`` / ``jaxbn.nnx`` class.
      torch_type: the torch class name (``"BatchNorm2d"``).
      num_features: C (``None`` for a lazy module not yet run).
      eps, momentum: the current values (``momentum=None``: cumulative average).
      affine: ``weight`` and ``bias`` exist.
      has_buffers: ``running_mean`` / ``running_var`` exist (constructed with
        ``track_running_stats=True``).
      track_running_stats: the *current* attribute (may differ from ``has_buffers``).
    """

    family: Family
    torch_type: str
    num_features: int | None
    eps: float
    momentum: float | None
    affine: bool
    has_buffers: bool
    track_running_stats: bool

    def linen_kwargs(self) -> dict[str, Any]:
        """Constructor arguments for ``jaxbn.linen.BatchNorm`` / ``InstanceNorm`` (add ``axis``)."""
        return dict(num_features=self.num_features, eps=self.eps, momentum=self.momentum,
                    affine=self.affine, track_running_stats=self.has_buffers)

    def call_kwargs(self) -> dict[str, Any]:
        """Call-time overrides the adapter needs: ``track_running_stats`` when the current
        attribute differs from what the buffers say (flipped after construction)."""
        if self.track_running_stats != self.has_buffers:
            return {"track_running_stats": self.track_running_stats}
        return {}


def torch_base_class(family: Family) -> type:
    """The torch class every module of ``family`` derives from (``_BatchNorm``, ...)."""
    module_name, _, class_name = family.torch_base.rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)


def family_of(module: Any) -> Family | None:
    """The norm family of one torch module, or ``None`` if it is not a norm layer jaxbn
    reproduces (PyTorch: ``isinstance(module, _BatchNorm)`` / ``_InstanceNorm``)."""
    return next((f for f in FAMILIES if isinstance(module, torch_base_class(f))), None)


def settings_of(module: Any) -> NormSettings | None:
    """The :class:`NormSettings` of one torch module, or ``None`` if it is not a BatchNorm /
    InstanceNorm layer."""
    family = family_of(module)
    if family is None:
        return None
    num_features = module.num_features
    if not isinstance(num_features, int) or num_features == 0:
        num_features = None  # a lazy module that has not seen an input
    return NormSettings(
        family=family,
        torch_type=type(module).__name__,
        num_features=num_features,
        eps=float(module.eps),
        momentum=None if module.momentum is None else float(module.momentum),
        affine=bool(module.affine),
        has_buffers=module.running_mean is not None,
        track_running_stats=bool(module.track_running_stats),
    )


def norm_settings(module: Any) -> dict[str, NormSettings]:
    """``{torch module path: NormSettings}`` for every norm layer in ``module`` (torch's
    ``named_modules`` order; the root itself is ``''``)."""
    found = {}
    for name, sub in module.named_modules():
        s = settings_of(sub)
        if s is not None:
            found[name] = s
    return found
