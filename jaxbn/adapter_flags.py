"""What the Flax adapters share: module attributes + call-time overrides -> :class:`BatchNormFlags`.

``jaxbn.linen`` and ``jaxbn.nnx`` each offer ``BatchNorm`` and ``InstanceNorm``. They hold torch's
attribute names (``track_running_stats``, ``momentum``, ``eps``) plus ``axis`` and, for
``BatchNorm`` (torch's ``SyncBatchNorm``), ``axis_name`` / ``axis_index_groups``. A call may
override any of them for that call only; because ``momentum=None`` is a meaningful value (torch's
cumulative average), "not overridden" is spelled :data:`UNSET`. ``momentum`` and ``eps``
overrides go to the pure function as they are, so an array there is a traced value (one compile
for a whole schedule).

The adapters decide nothing: what differs between the torch families (which pure function runs,
the decision rule, constructor defaults) is one :class:`NormFamily` value, whose rules are
:mod:`jaxbn.functional.torch_rules`'; translation lives here once, and the adapters add only
their framework's variable handling.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

from .functional import batch_norm, instance_norm
from .functional import torch_rules
from .functional.torch_rules import Plan
from .functional.types import UNSET, BatchNormFlags


@dataclasses.dataclass(frozen=True)
class NormFamily:
    """A torch module family as the adapters see it: its rules and its pure function.

    Attributes:
      rules: torch's decisions and constructor defaults (:class:`torch_rules.Family`).
      apply: the pure function, ``(x, state, params, flags, **extra) -> (y, new_state)``.
    """

    rules: torch_rules.Family
    apply: Callable[..., Any]

    @property
    def name(self) -> str:
        return self.rules.name

    def plan(self, flags: BatchNormFlags, has_buffers: bool) -> Plan:
        """What this call does (torch's decision)."""
        return self.rules.plan(flags, has_buffers)

    def extra_arguments(self, mask: Any) -> dict[str, Any]:
        """The pure function's keyword arguments beyond flags; refuses what the family lacks."""
        if mask is None:
            return {}
        if not self.rules.accepts_mask:
            raise TypeError(
                f"{self.name} computes its statistics per instance and takes no row mask: "
                "call it without mask="
            )
        return {"mask": mask}

    def check_sync(self, axis_name: Any, axis_index_groups: Any) -> None:
        """Refuse ``axis_name`` / ``axis_index_groups`` for a family that has nothing to sync."""
        if not self.rules.synchronizes and (axis_name is not None or axis_index_groups is not None):
            raise TypeError(
                f"{self.name} has no axis_name / axis_index_groups: its statistics are per "
                "instance (torch has no synchronized variant); leave them unset"
            )


BATCH_NORM = NormFamily(torch_rules.BATCH_NORM, batch_norm)
INSTANCE_NORM = NormFamily(torch_rules.INSTANCE_NORM, instance_norm)


class ModuleAttributes(Protocol):
    """The attributes every adapter carries, under torch's names."""

    track_running_stats: bool
    momentum: float | None
    eps: float
    axis: int
    axis_name: Any
    axis_index_groups: Any


def pick(override: Any, attribute: Any) -> Any:
    """The call-time override if one was given, else the module's attribute."""
    return attribute if override is UNSET else override


def call_flags(
    module: ModuleAttributes,
    family: NormFamily,
    training: bool | None,
    mode_name: str,
    has_buffers: bool,
    *,
    track_running_stats: Any = UNSET,
    synchronize: bool = True,
) -> BatchNormFlags:
    """The flags for one call: the module's attributes, ``track_running_stats`` replaced by its
    override if given (the ``momentum`` / ``eps`` overrides go to the pure function, which folds
    a Python value into the flags and keeps an array traced).

    PyTorch equivalent: setting ``bn.track_running_stats``, ``bn.momentum``, ``bn.eps`` and
    ``bn.train(training)`` just before ``bn(x)``.

    ``training=None`` means neither the call nor the module set the mode (``mode_name`` is its
    name in the adapter, ``"train"`` or ``"use_running_average"``): allowed only where the
    family's result does not depend on it (:meth:`torch_rules.Family.mode_matters`), else a
    ``ValueError``. ``axis_name`` is kept only for a family that synchronizes and with
    ``synchronize=True`` (``False`` is Flax's rule for ``init``, which runs outside the mapped
    axis).
    """
    synchronize = synchronize and family.rules.synchronizes
    flags = BatchNormFlags(
        training=True if training is None else bool(training),  # torch modules start training
        track_running_stats=pick(track_running_stats, module.track_running_stats),
        momentum=module.momentum,
        eps=module.eps,
        axis=module.axis,
        axis_name=module.axis_name if synchronize else None,
        axis_index_groups=module.axis_index_groups if synchronize else None,
    )
    if training is None and family.rules.mode_matters(flags, has_buffers):
        raise ValueError(
            f"{family.name} needs to know whether it is training: pass {mode_name}=True/False "
            f"to the constructor or to the call (torch's module.train() / module.eval())"
        )
    return flags
