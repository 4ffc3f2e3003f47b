"""What the Flax adapters share: module attributes + call-time overrides -> :class:`BatchNormFlags`.

``jaxbn.linen.BatchNorm`` and ``jaxbn.nnx.BatchNorm`` hold torch's attribute names
(``track_running_stats``, ``momentum``, ``eps``) plus ``axis``. A call may override any of them
for that call only; because ``momentum=None`` is a meaningful value (torch's cumulative average),
"not overridden" is spelled :data:`UNSET`. Translation lives here once; the adapters add only
their framework's variable handling.
"""

from __future__ import annotations

from typing import Any, Protocol

from .core import BatchNormFlags


class _Unset:
    """Marker for a call-time override that was not given (``None`` is a valid momentum)."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()
"""Default of the call-time overrides: use the module's attribute."""


class ModuleAttributes(Protocol):
    """The attributes both adapters carry, under torch's names."""

    track_running_stats: bool
    momentum: float | None
    eps: float
    axis: int


def resolve_mode(call_value: bool | None, attribute_value: bool | None, name: str) -> bool:
    """The call's mode argument if given, else the module's attribute; one of them must be set.

    ``name`` is the mode's name in the adapter (``"train"`` for linen, ``"use_running_average"``
    for NNX), used in the error.
    """
    value = attribute_value if call_value is None else call_value
    if value is None:
        raise ValueError(
            f"BatchNorm needs to know whether it is training: pass {name}=True/False to the "
            f"constructor or to the call (torch's module.train() / module.eval())"
        )
    return bool(value)


def call_flags(
    module: ModuleAttributes,
    training: bool,
    *,
    track_running_stats: Any = UNSET,
    momentum: Any = UNSET,
    eps: Any = UNSET,
) -> BatchNormFlags:
    """The flags for one call: the module's attributes, each replaced by its override if given.

    PyTorch equivalent: setting ``bn.track_running_stats``, ``bn.momentum``, ``bn.eps`` and
    ``bn.train(training)`` just before ``bn(x)``.
    """

    def pick(override: Any, attribute: Any) -> Any:
        return attribute if override is UNSET else override

    return BatchNormFlags(
        training=training,
        track_running_stats=pick(track_running_stats, module.track_running_stats),
        momentum=pick(momentum, module.momentum),
        eps=pick(eps, module.eps),
        axis=module.axis,
    )
