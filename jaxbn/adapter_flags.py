"""What the Flax adapters share: module attributes + call-time overrides -> :class:`BatchNormFlags`.

``jaxbn.linen`` and ``jaxbn.nnx`` each offer ``BatchNorm`` and ``InstanceNorm``. They hold torch's
attribute names (``track_running_stats``, ``momentum``, ``eps``) plus ``axis`` and, for
``BatchNorm`` (torch's ``SyncBatchNorm``), ``axis_name`` / ``axis_index_groups``. A call may
override any of them for that call only; because ``momentum=None`` is a meaningful value (torch's
cumulative average), "not overridden" is spelled :data:`UNSET`. What differs between the two
torch families (which pure function runs, when buffers are written, whether the mode matters) is
one :class:`NormFamily` value; translation lives here once, and the adapters add only their
framework's variable handling.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

from .core import BatchNormFlags, batch_norm
from .core import updates_buffers as batch_norm_updates_buffers
from .instance_norm import instance_norm
from .instance_norm import updates_buffers as instance_norm_updates_buffers


class _Unset:
    """Marker for a call-time override that was not given (``None`` is a valid momentum)."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()
"""Default of the call-time overrides: use the module's attribute."""


@dataclasses.dataclass(frozen=True)
class NormFamily:
    """A torch module family as the adapters see it.

    Attributes:
      name: torch's class-name stem, ``"BatchNorm"`` or ``"InstanceNorm"`` (used in messages).
      apply: the pure function, ``(x, state, params, flags, **extra) -> (y, new_state)``.
      updates_buffers: ``(flags, has_buffers) -> bool``: whether this call writes the buffers.
      when_updated: that rule in words, for the error about an immutable collection.
      mode_matters: ``(track_running_stats) -> bool``: whether the call's outcome depends on
        training vs eval (if not, a linen module need not be told its mode).
      synchronizes: the modules have ``axis_name`` / ``axis_index_groups`` (torch's
        ``SyncBatchNorm``).
    """

    name: str
    apply: Callable[..., Any]
    updates_buffers: Callable[[BatchNormFlags, bool], bool]
    when_updated: str
    mode_matters: Callable[[bool], bool]
    synchronizes: bool


BATCH_NORM = NormFamily(
    name="BatchNorm",
    apply=batch_norm,
    updates_buffers=batch_norm_updates_buffers,
    when_updated="it is training with track_running_stats=True",
    # Always asked for, as flax.linen.BatchNorm asks for use_running_average.
    mode_matters=lambda tracking: True,
    synchronizes=True,
)

INSTANCE_NORM = NormFamily(
    name="InstanceNorm",
    apply=instance_norm,
    updates_buffers=instance_norm_updates_buffers,
    when_updated=(
        "it uses input statistics (training, or track_running_stats=False, even in eval) "
        "and has running statistics"
    ),
    # Without tracking, torch's instance norm uses input statistics in both modes.
    mode_matters=lambda tracking: tracking,
    synchronizes=False,
)


class ModuleAttributes(Protocol):
    """The attributes every adapter carries, under torch's names.

    ``BatchNorm`` adapters also carry ``axis_name`` and ``axis_index_groups``.
    """

    track_running_stats: bool
    momentum: float | None
    eps: float
    axis: int


def pick(override: Any, attribute: Any) -> Any:
    """The call-time override if one was given, else the module's attribute."""
    return attribute if override is UNSET else override


def call_flags(
    module: ModuleAttributes,
    family: NormFamily,
    training: bool | None,
    mode_name: str,
    *,
    track_running_stats: Any = UNSET,
    momentum: Any = UNSET,
    eps: Any = UNSET,
    synchronize: bool = True,
) -> BatchNormFlags:
    """The flags for one call: the module's attributes, each replaced by its override if given.

    PyTorch equivalent: setting ``bn.track_running_stats``, ``bn.momentum``, ``bn.eps`` and
    ``bn.train(training)`` just before ``bn(x)``.

    ``training=None`` means neither the call nor the module set the mode (``mode_name`` is its
    name in the adapter, ``"train"`` or ``"use_running_average"``): allowed only where the
    family's result does not depend on it (``family.mode_matters``), else a ``ValueError``.
    ``axis_name`` is kept only for a family that synchronizes and with ``synchronize=True``
    (``False`` is Flax's rule for ``init``, which runs outside the mapped axis).
    """
    tracking = pick(track_running_stats, module.track_running_stats)
    if training is None:
        if family.mode_matters(tracking):
            raise ValueError(
                f"{family.name} needs to know whether it is training: pass {mode_name}=True/False "
                f"to the constructor or to the call (torch's module.train() / module.eval())"
            )
        training = True  # either mode gives the same result; torch modules start training
    synchronize = synchronize and family.synchronizes
    return BatchNormFlags(
        training=bool(training),
        track_running_stats=tracking,
        momentum=pick(momentum, module.momentum),
        eps=pick(eps, module.eps),
        axis=module.axis,
        axis_name=module.axis_name if synchronize else None,
        axis_index_groups=module.axis_index_groups if synchronize else None,
    )
