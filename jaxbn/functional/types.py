"""The data of a torch norm layer: its call-time attributes (flags), buffers (state) and
affine parameters (params), under torch's names, and their initial values.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .strategy import Strategy


class _Unset:
    """Marker for an optional override that was not given (``None`` is a valid momentum)."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()
"""Default of the call-time overrides (``momentum=``, ``eps=``, ...): use the flags' or module's value."""

_NAN = float("nan")
"""The one NaN object static flags hold, so equal flags compare equal (``nan != nan``, but tuples
compare identical objects as equal) and ``jax.jit`` finds its cache entry."""


def _static_float(value: float) -> float:
    value = float(value)
    return _NAN if math.isnan(value) else value


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class BatchNormFlags:
    """The call-time attributes of a torch BatchNorm module.

    A hashable pytree without array leaves, so ``jax.jit(batch_norm)(x, state, params, flags)``
    treats it as static: changing a flag retraces, new data does not.

    Attributes:
      training: ``module.training`` (``.train()`` / ``.eval()``).
      track_running_stats: the *current* value of ``module.track_running_stats``. Whether buffers
        exist (its value at construction) is whether ``state`` is None.
      momentum: torch's momentum, the weight of the *new* batch (Flax's momentum is ``1 -`` this),
        or ``None`` for a cumulative average driven by ``num_batches_tracked``. Static: each value
        compiles once; for a schedule pass a traced value to the call instead
        (``batch_norm(..., momentum=jnp.asarray(m))``).
      eps: added to the variance inside the square root (static, likewise ``eps=`` for traced).
      axis: the feature axis. ``1`` is PyTorch's layout (N, C, ...); ``-1`` is channels-last.
      axis_name: a named mapped axis (or tuple of names) of ``shard_map``/``pmap``/``vmap`` over
        which batch statistics are merged exactly, as ``torch.nn.SyncBatchNorm`` does. ``None``
        (default): statistics of the local batch.
      axis_index_groups: optional groups of device indices along ``axis_name`` that are
        synchronized separately (torch's ``process_group``). JAX supports this under ``pmap``
        only; under ``shard_map`` use a mesh axis per group instead (see docs/scaling.md).
      skip_nonfinite_updates: opt-in guard (not in torch). When True and a training batch yields
        a non-finite batch mean or variance in any channel, the running statistics *and*
        ``num_batches_tracked`` stay as they were (torch poisons them with NaN for good); the
        output is still computed from the batch statistics. Default False: torch parity.
      strategy: how to compute -- speed choices that change the program, not the values beyond
        rounding (:class:`~jaxbn.functional.strategy.Strategy`). ``None`` (default): the
        default for JAX's default backend at trace time (:func:`~jaxbn.default_strategy`).
    """

    training: bool = True
    track_running_stats: bool = True
    momentum: float | None = 0.1
    eps: float = 1e-5
    axis: int = 1
    axis_name: Hashable | tuple[Hashable, ...] | None = None
    axis_index_groups: tuple[tuple[int, ...], ...] | None = None
    skip_nonfinite_updates: bool = False
    strategy: Strategy | None = None

    def __post_init__(self) -> None:
        for name in ("training", "track_running_stats", "skip_nonfinite_updates"):
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):
                raise TypeError(
                    f"BatchNormFlags.{name} must be a Python bool (flags are static), "
                    f"got {type(value).__name__}"
                )
            object.__setattr__(self, name, bool(value))
        if self.momentum is not None:
            if not isinstance(self.momentum, numbers.Real) or isinstance(self.momentum, bool):
                raise TypeError(
                    "BatchNormFlags.momentum must be a Python float or None, "
                    f"got {type(self.momentum).__name__}"
                )
            object.__setattr__(self, "momentum", _static_float(self.momentum))
        if not isinstance(self.eps, numbers.Real) or isinstance(self.eps, bool):
            raise TypeError(f"BatchNormFlags.eps must be a Python float, got {type(self.eps).__name__}")
        object.__setattr__(self, "eps", _static_float(self.eps))
        if not isinstance(self.axis, (int, np.integer)) or isinstance(self.axis, bool):
            raise TypeError(f"BatchNormFlags.axis must be an int, got {type(self.axis).__name__}")
        object.__setattr__(self, "axis", int(self.axis))
        if isinstance(self.axis_name, list):
            object.__setattr__(self, "axis_name", tuple(self.axis_name))
        if self.axis_index_groups is not None:
            groups = tuple(tuple(int(i) for i in group) for group in self.axis_index_groups)
            object.__setattr__(self, "axis_index_groups", groups)
        if self.strategy is not None and not isinstance(self.strategy, Strategy):
            raise TypeError("BatchNormFlags.strategy must be a jaxbn.Strategy or None, "
                            f"got {type(self.strategy).__name__}")

    def replace(self, **changes) -> "BatchNormFlags":
        """A copy with some attributes changed, like assigning to the torch module's attributes."""
        return dataclasses.replace(self, **changes)


class BatchNormState(NamedTuple):
    """torch's buffers, under torch's names. ``None`` in their place means no buffers."""

    running_mean: jax.Array
    running_var: jax.Array
    num_batches_tracked: jax.Array


class BatchNormParams(NamedTuple):
    """torch's affine parameters (``weight`` is gamma, ``bias`` is beta)."""

    weight: jax.Array
    bias: jax.Array


def counter_dtype() -> jnp.dtype:
    """int64 (torch's dtype) when ``jax_enable_x64`` is on, else JAX's default int32."""
    return jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.int64))


def init_state(num_features: int, dtype: jnp.dtype = jnp.float32) -> BatchNormState:
    """Fresh buffers as ``torch.nn.BatchNorm*d(num_features)`` registers them.

    ``running_mean = 0``, ``running_var = 1``, ``num_batches_tracked = 0``.
    """
    return BatchNormState(
        running_mean=jnp.zeros((num_features,), dtype),
        running_var=jnp.ones((num_features,), dtype),
        num_batches_tracked=jnp.zeros((), counter_dtype()),
    )


def init_params(num_features: int, dtype: jnp.dtype = jnp.float32) -> BatchNormParams:
    """Affine parameters as torch's ``reset_parameters`` sets them: ``weight = 1``, ``bias = 0``."""
    return BatchNormParams(
        weight=jnp.ones((num_features,), dtype), bias=jnp.zeros((num_features,), dtype)
    )


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class InstanceNormFlags(BatchNormFlags):
    """:class:`BatchNormFlags` with torch's InstanceNorm default ``track_running_stats=False``.

    ``torch.nn.InstanceNorm*d(C)`` is built with ``affine=False, track_running_stats=False`` (so
    pass ``params=None, state=None``), ``momentum=0.1``, ``eps=1e-5``. ``axis_name`` and
    ``axis_index_groups`` do not apply (statistics are per instance).
    """

    track_running_stats: bool = False
