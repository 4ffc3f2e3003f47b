"""Each torch norm family's pure function, and what a call's result says about the buffers.

A :class:`~jaxbn.functional.torch_rules.Family` is torch's rules; the pure functions are built on
those rules (:mod:`.batch`, :mod:`.instance`), so the pairing of the two lives here, above both.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Callable, Mapping, NamedTuple

import jax

from . import validation
from .batch import batch_norm
from .instance import instance_norm
from .torch_rules import BATCH_NORM, INSTANCE_NORM, Family
from .types import BatchNormFlags, BatchNormParams, BatchNormState

PureFunction = Callable[..., tuple[jax.Array, BatchNormState | None]]

PURE_FUNCTIONS: Mapping[Family, PureFunction] = MappingProxyType({
    BATCH_NORM: batch_norm,
    INSTANCE_NORM: instance_norm,
})
"""``{family: its pure function}``, ``(x, state, params, flags, **keywords) -> (y, new_state)``."""

FAMILIES: tuple[Family, ...] = tuple(PURE_FUNCTIONS)
"""Every torch norm family jaxbn reproduces."""


def pure_function(family: Family) -> PureFunction:
    """The pure function of ``family`` (:func:`jaxbn.batch_norm`, :func:`jaxbn.instance_norm`).

    PyTorch equivalent: ``torch.nn.<family.name>{1,2,3}d.forward``.
    """
    return PURE_FUNCTIONS[family]


class Result(NamedTuple):
    """One call of a family's pure function: its results and whether it wrote the buffers."""

    y: jax.Array
    new_state: BatchNormState | None
    wrote_buffers: bool


def call(
    family: Family,
    x: jax.Array,
    state: BatchNormState | None,
    params: BatchNormParams | None,
    flags: BatchNormFlags,
    **keywords: Any,
) -> Result:
    """``family``'s pure function on these arguments, and whether torch's rules had it write the
    buffers (``Plan.writes_buffers``), read from its result instead of decided again.

    PyTorch equivalent: ``y = module(x)``, and whether it modified ``running_mean`` /
    ``running_var`` / ``num_batches_tracked`` in place.

    The pure functions hand back the state's own JAX arrays when torch leaves its buffers alone,
    and new ones when it writes them (even with unchanged values); the state is passed as JAX
    arrays so that this holds for NumPy buffers too.
    """
    if isinstance(state, BatchNormState):  # anything else is the pure function's to refuse
        state = BatchNormState(*(validation.as_jax(a) for a in state))
    y, new_state = pure_function(family)(x, state, params, flags, **keywords)
    wrote = state is not None and any(new is not old for new, old in zip(new_state, state))
    return Result(y, new_state, wrote)
