"""Every decision torch's norm layers make, written once.

torch's ``_BatchNorm.forward`` and ``_InstanceNorm.forward`` share ``_NormBase`` (the same
attributes and buffers) but decide differently *which statistics normalize the input*, *whether
the buffers are written* and *with what weight*. Each family's decision is one function here,
``(flags, has_buffers) -> Plan``, and each family one :class:`Family` value (its plan, defaults,
torch classes) that the pure functions, the Flax adapters, the porting tools and the torch
oracle all take; none of them repeats a rule.

BatchNorm (``torch.nn.BatchNorm{1,2,3}d``, ``SyncBatchNorm``)
  * input (batch) statistics when ``training``, or in eval when the layer has no buffers
    (torch's ``bn_training``); else ``running_mean`` / ``running_var``;
  * buffers written only when ``training and track_running_stats`` and they exist; the counter
    ``num_batches_tracked`` then counts every such call (also an empty batch);
  * weight of the new batch: ``momentum``, or ``1 / num_batches_tracked`` after the increment
    when ``momentum is None`` (cumulative average).

InstanceNorm (``torch.nn.InstanceNorm{1,2,3}d``)
  * input (instance) statistics when ``training or not track_running_stats`` (torch's
    ``use_input_stats``) -- so an *eval* call with ``track_running_stats=False`` uses them even
    when buffers exist;
  * buffers written whenever input statistics are used and they exist -- even in eval;
  * weight of the new statistics: ``momentum``, and ``0`` (no update) when ``momentum is None``;
  * the counter exists (with the buffers) but never moves;
  * eval with ``track_running_stats=True`` and no buffers is an error (it would need them).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from .types import BatchNormFlags

CUMULATIVE = None
"""``Plan.momentum`` for torch's cumulative average: weight ``1 / num_batches_tracked``."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one call of a torch norm layer does, decided from its flags before any computation.

    Attributes:
      uses_input_stats: normalize with the statistics of this input (else the running ones).
      writes_buffers: this call returns updated buffers (running statistics and/or counter).
      counts: ``num_batches_tracked`` is incremented (only when ``writes_buffers``).
      momentum: weight of the new statistics in the update, or :data:`CUMULATIVE`.
    """

    uses_input_stats: bool
    writes_buffers: bool
    counts: bool
    momentum: float | None


@dataclasses.dataclass(frozen=True, repr=False)
class Family:
    """A torch norm family, the one value every layer of jaxbn passes around for it: its
    decision rule, that rule in words (for error messages), torch's defaults and classes, and
    what its pure function refuses. The pure function itself is
    :func:`jaxbn.functional.families.pure_function` (it is built on these rules).

    Attributes:
      name: torch's class-name stem, ``"BatchNorm"`` or ``"InstanceNorm"``: torch's modules are
        ``torch.nn.<name>{1,2,3}d``, jaxbn's ``jaxbn.linen.<name>`` and ``jaxbn.nnx.<name>``.
      torch_base: the dotted path of the torch class every module of the family derives from.
      plan: ``(flags, has_buffers) -> Plan``.
      writes_when: when the buffers are written, in words.
      always_needs_mode: adapters must be told training vs eval even where the result does not
        depend on it (``flax.linen.BatchNorm`` always asks for ``use_running_average``).
      affine, track_running_stats: torch's constructor defaults for the family.
      synchronizes: torch has a synchronized variant (``SyncBatchNorm``): ``axis_name`` applies.
      accepts_mask: jaxbn's row ``mask`` applies (statistics over rows of a batch).
    """

    name: str
    torch_base: str
    plan: Callable[[BatchNormFlags, bool], Plan]
    writes_when: str
    always_needs_mode: bool
    affine: bool
    track_running_stats: bool
    synchronizes: bool
    accepts_mask: bool

    def __repr__(self) -> str:
        return f"Family({self.name!r})"

    def mode_matters(self, flags: BatchNormFlags, has_buffers: bool) -> bool:
        """Whether the call's outcome depends on ``flags.training`` (else either mode will do)."""
        if self.always_needs_mode:
            return True
        return (self.plan(flags.replace(training=True), has_buffers)
                != self.plan(flags.replace(training=False), has_buffers))

    def mask_argument(self, mask: Any) -> dict[str, Any]:
        """The pure function's ``mask`` keyword (empty when ``None``); a ``TypeError`` for a
        family whose statistics are not over rows of a batch."""
        if mask is None:
            return {}
        if not self.accepts_mask:
            raise TypeError(
                f"{self.name} computes its statistics per instance and takes no row mask: "
                "call it without mask="
            )
        return {"mask": mask}

    def check_sync(self, axis_name: Any, axis_index_groups: Any) -> None:
        """Refuse ``axis_name`` / ``axis_index_groups`` for a family that has nothing to sync."""
        if not self.synchronizes and (axis_name is not None or axis_index_groups is not None):
            raise TypeError(
                f"{self.name} has no axis_name / axis_index_groups: its statistics are per "
                "instance (torch has no synchronized variant); leave them unset"
            )


def batch_norm_plan(flags: BatchNormFlags, has_buffers: bool) -> Plan:
    """torch's ``_BatchNorm.forward``: ``bn_training`` and the buffers it passes for updating."""
    writes = flags.training and flags.track_running_stats and has_buffers
    return Plan(
        uses_input_stats=flags.training or not has_buffers,
        writes_buffers=writes,
        counts=writes,
        momentum=CUMULATIVE if flags.momentum is None else flags.momentum,
    )


def instance_norm_plan(flags: BatchNormFlags, has_buffers: bool) -> Plan:
    """torch's ``_InstanceNorm.forward``: ``use_input_stats`` and its buffer update.

    A plan that normalizes with running statistics the layer does not have is torch's error
    (:func:`jaxbn.functional.validation.check_running_stats_exist`).
    """
    input_stats = flags.training or not flags.track_running_stats
    return Plan(
        uses_input_stats=input_stats,
        writes_buffers=input_stats and has_buffers,
        counts=False,
        momentum=0.0 if flags.momentum is None else flags.momentum,
    )


BATCH_NORM = Family(
    name="BatchNorm",
    torch_base="torch.nn.modules.batchnorm._BatchNorm",
    plan=batch_norm_plan,
    writes_when="it is training with track_running_stats=True",
    always_needs_mode=True,
    affine=True,
    track_running_stats=True,
    synchronizes=True,
    accepts_mask=True,
)

INSTANCE_NORM = Family(
    name="InstanceNorm",
    torch_base="torch.nn.modules.instancenorm._InstanceNorm",
    plan=instance_norm_plan,
    writes_when=(
        "it uses input statistics (training, or track_running_stats=False, even in eval) "
        "and has running statistics"
    ),
    always_needs_mode=False,
    affine=False,
    track_running_stats=False,
    synchronizes=False,  # statistics are per instance; torch has no SyncInstanceNorm
    accepts_mask=False,
)


def update_factor(momentum: float | None, count: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Weight of the new batch: ``momentum``, or ``1 / num_batches_tracked`` (after the
    increment) for :data:`CUMULATIVE`."""
    if momentum is CUMULATIVE:
        return (1.0 / count.astype(dtype)).astype(dtype)
    return jnp.asarray(momentum, dtype)
