"""What the Flax adapters share: module attributes + call-time overrides -> :class:`BatchNormFlags`.

``jaxbn.linen`` and ``jaxbn.nnx`` each offer ``BatchNorm`` and ``InstanceNorm``. They hold torch's
attribute names (``track_running_stats``, ``momentum``, ``eps``) plus ``axis`` and, for
``BatchNorm`` (torch's ``SyncBatchNorm``), ``axis_name`` / ``axis_index_groups``. A call may
override any of them for that call only; because ``momentum=None`` is a meaningful value (torch's
cumulative average), "not overridden" is spelled :data:`UNSET`. ``momentum`` and ``eps``
overrides go to the pure function as they are, so an array there is a traced value (one compile
for a whole schedule).

The adapters decide nothing: what differs between the torch families (the decision rule,
constructor defaults, what a family refuses) is one :class:`jaxbn.functional.torch_rules.Family`
value and its pure function (:func:`jaxbn.functional.families.pure_function`); translation lives
here once, and the adapters add only their framework's variable handling.
"""

from __future__ import annotations

from typing import Any, Protocol

from .functional.strategy import Strategy
from .functional.torch_rules import Family
from .functional.types import UNSET, BatchNormFlags


class ModuleAttributes(Protocol):
    """The attributes every adapter carries, under torch's names."""

    track_running_stats: bool
    momentum: float | None
    eps: float
    axis: int
    axis_name: Any
    axis_index_groups: Any
    strategy: Strategy | None


def pick(override: Any, attribute: Any) -> Any:
    """The call-time override if one was given, else the module's attribute."""
    return attribute if override is UNSET else override


def call_flags(
    module: ModuleAttributes,
    family: Family,
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
    family's result does not depend on it (:meth:`Family.mode_matters`), else a
    ``ValueError``. ``axis_name`` is kept only for a family that synchronizes and with
    ``synchronize=True`` (``False`` is Flax's rule for ``init``, which runs outside the mapped
    axis).
    """
    synchronize = synchronize and family.synchronizes
    flags = BatchNormFlags(
        training=True if training is None else bool(training),  # torch modules start training
        track_running_stats=pick(track_running_stats, module.track_running_stats),
        momentum=module.momentum,
        eps=module.eps,
        axis=module.axis,
        axis_name=module.axis_name if synchronize else None,
        axis_index_groups=module.axis_index_groups if synchronize else None,
        strategy=module.strategy,
    )
    if training is None and family.mode_matters(flags, has_buffers):
        raise ValueError(
            f"{family.name} needs to know whether it is training: pass {mode_name}=True/False "
            f"to the constructor or to the call (torch's module.train() / module.eval())"
        )
    return flags
