"""Which torch key or file name fills which Flax variable: pairing by name, before any value is read.

Pairs are found with the convention of :mod:`.names` (canonical module path and leaf, ``rules``
applied first); a matched ``weight`` that lands on a Flax ``kernel`` gets the layout change of
:mod:`.layouts`. What is left over on either side is returned, never guessed at.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .layouts import kernel_transform
from .names import (
    BUFFER_LEAVES,
    COUNTER,
    WEIGHT_ALIASES,
    Rules,
    apply_rules,
    canonical_name,
    is_linen,
    module_path,
    split_key,
)
from .paths import SEP, display_name

FlaxPath = tuple[str, ...]


@dataclasses.dataclass
class Entry:
    """One matched pair: a torch key and a Flax path, with the layout change between them."""

    torch_key: str
    flax_path: FlaxPath
    transform: str  # "identity" | "linear" | "conv1d" | "conv2d" | "conv3d"
    torch_shape: tuple[int, ...]
    flax_shape: tuple[int, ...]


@dataclasses.dataclass
class KeyMatch:
    """How torch keys pair with Flax leaves (the result of :func:`match_keys`)."""

    entries: list[Entry]
    unmatched: list[str]  # torch keys with no Flax leaf
    missing: list[str]  # Flax leaves (shown) with no torch key
    filled: list[tuple]  # Flax counters a version-1 checkpoint lacks
    ignored: list[str]  # torch keys dropped by the rules


def match_keys(
    torch_shapes: Mapping[str, tuple[int, ...]],
    flax_flat: Mapping[tuple, Any],
    rules: Rules,
) -> KeyMatch:
    """Match torch keys to Flax leaves by canonical module name and leaf (each leaf used once)."""
    linen = is_linen(flax_flat)
    index: dict[tuple[str, str], tuple] = {}
    for path in flax_flat:
        index[(canonical_name(module_path(path, linen)), str(path[-1]))] = path
    entries, unmatched, ignored, used = [], [], [], set()
    for key, shape in torch_shapes.items():
        renamed = apply_rules(key, rules)
        if renamed is None:
            ignored.append(key)
            continue
        module, leaf = split_key(renamed)
        module = canonical_name(module)
        candidates = WEIGHT_ALIASES if leaf == "weight" else (leaf,)
        path = next((index[(module, c)] for c in candidates if (module, c) in index), None)
        if path is None or path in used:
            unmatched.append(key)
            continue
        used.add(path)
        transform = kernel_transform(len(shape)) if path[-1] == "kernel" and leaf == "weight" else "identity"
        flax_shape = tuple(np.shape(flax_flat[path]))
        entries.append(Entry(key, path, transform, tuple(shape), flax_shape))
    missing = [p for p in flax_flat if p not in used]
    # torch's BatchNorm._load_from_state_dict: a checkpoint without num_batches_tracked
    # (version 1) keeps the module's current counter.
    filled = [p for p in missing if str(p[-1]) == COUNTER]
    missing_shown = [display_name(p) for p in missing if p not in filled]
    return KeyMatch(entries, unmatched, missing_shown, filled, ignored)


def missing_stats_hints(unexpected: Sequence[str], flax_flat: Mapping[tuple, Any]) -> list[str]:
    """A hint per layer whose unexpected keys are running statistics the target's layer lacks."""
    linen = is_linen(flax_flat)
    has_stats = {canonical_name(module_path(p, linen)) for p in flax_flat if str(p[-1]) in BUFFER_LEAVES}
    modules = {canonical_name(module_path(p, linen)) for p in flax_flat}
    hints = []
    for key in unexpected:
        module, leaf = split_key(key)
        if leaf in BUFFER_LEAVES and canonical_name(module) in modules and canonical_name(module) not in has_stats:
            hints.append(f"{module} has no running statistics in the target: was its BatchNorm "
                         f"built with track_running_stats=False while the checkpoint's was not?")
    return sorted(set(hints))


def match_flat_names(names: Sequence[str], flax_flat: Mapping[tuple, Any]) -> tuple[dict[str, tuple], list[str]]:
    """``({'/'-joined name: target path}, unmatched names)``: exact names first, then by
    collection, :func:`canonical_name` of the module path and leaf (as :func:`match_keys`)."""
    linen = is_linen(flax_flat)
    exact = {display_name(p): p for p in flax_flat}

    def canonical(path: tuple) -> tuple:
        return (path[:1] if linen else ()) + (canonical_name(module_path(path, linen)), str(path[-1]))

    by_canonical = {canonical(p): p for p in flax_flat}
    matches = {name: exact[name] for name in names if name in exact}
    taken = set(matches.values())
    for name in names:
        parts = tuple(name.split(SEP))
        p = by_canonical.get(canonical(parts)) if name not in matches and all(parts) else None
        if p is not None and p not in taken:
            matches[name] = p
            taken.add(p)
    unexpected = [name for name in names if name not in matches]
    return matches, unexpected
