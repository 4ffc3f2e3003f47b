"""The strict copy of matched values into the target, the one loop every direction shares.

Like ``torch.nn.Module.load_state_dict(strict=True)``, every problem is collected: a shape that
differs, a dtype that differs. Floating dtypes must agree unless ``cast=True`` (torch casts
silently; a float64 checkpoint quietly becoming float32 is how ports stop being exact). Integer
counters convert to the target's integer type (int32 when ``jax_enable_x64`` is off) and are
refused if the value does not fit. The copied values become variables as NumPy or ``jax.Array``
leaves, never silently narrowed by JAX.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np

from .matching import Entry
from .paths import display_name, unflatten_tree
from .report import PortReport


@dataclasses.dataclass(frozen=True)
class Copy:
    """One matched value on its way into the output, with what it must fit."""

    entry: Entry
    key: Any  # where it goes in the output
    name: str  # how a dtype problem names it
    value: np.ndarray  # already in the target's layout
    target: Any  # a leaf with the wanted shape and dtype
    size_mismatch: str  # the report line if the shapes differ


def copy_checked(copies: Iterable[Copy], cast: bool, report: PortReport) -> dict:
    """Check each copy's shape, coerce its dtype, record it.

    Returns ``{key: value in the target's dtype}`` for the copies that fit; every one that
    does not adds a line to ``report``.
    """
    out = {}
    for c in copies:
        if c.value.shape != tuple(np.shape(c.target)):
            report.shape_mismatches.append(c.size_mismatch)
            continue
        value = _coerce(c.name, c.value, c.target, cast, report)
        if value is not None:
            out[c.key] = value
            report.matched.append(c.entry)
    return out


def _coerce(name: str, value: np.ndarray, target: Any, cast: bool, report: PortReport) -> np.ndarray | None:
    """``value`` in the target's dtype, or None (and a report line) if it cannot be."""
    want = np.dtype(target.dtype)
    have = value.dtype
    if have == want:
        return value
    if np.issubdtype(have, np.integer) and np.issubdtype(want, np.integer):
        info = np.iinfo(want)
        if value.size and (value.min() < info.min or value.max() > info.max):
            report.dtype_mismatches.append(
                f"{name}: value {value.max()} of {have} does not fit the target's {want}"
                + (" (enable jax_enable_x64 for int64 counters)" if want == np.int32 else ""))
            return None
        return value.astype(want)
    if cast and _is_float(have) and _is_float(want):
        return value.astype(want)
    report.dtype_mismatches.append(
        f"{name}: copying a param with dtype {have} from checkpoint, the dtype in the current "
        f"model is {want}" + (" (pass cast=True to convert)" if _is_float(have) and _is_float(want) else ""))
    return None


def _is_float(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16"


def as_variables(flat: Mapping[tuple, Any], as_jax: bool) -> dict:
    """Nested variables from ``{path: value}``, as ``jax.Array`` (checked) or NumPy."""
    if as_jax:
        return unflatten_tree({p: _as_jax(v, display_name(p)) for p, v in flat.items()})
    return unflatten_tree({p: v if isinstance(v, jax.ShapeDtypeStruct) else np.asarray(v)
                           for p, v in flat.items()})


def _as_jax(value: Any, name: str) -> Any:
    """``jnp.asarray``, refusing the silent float64 -> float32 JAX does when x64 is off."""
    if isinstance(value, jax.ShapeDtypeStruct):
        return value
    import jax.numpy as jnp

    value = np.asarray(value)
    if jax.dtypes.canonicalize_dtype(value.dtype) != value.dtype:
        raise TypeError(
            f"{name} is {value.dtype}, which JAX would silently turn into "
            f"{jax.dtypes.canonicalize_dtype(value.dtype)} because jax_enable_x64 is off: call "
            f"jax.config.update('jax_enable_x64', True) first, or give a target in the smaller "
            f"dtype (torch_to_flax(..., cast=True))")
    return jnp.asarray(value)
