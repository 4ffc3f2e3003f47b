"""How a torch key and a Flax variable path name the same tensor: the name convention, once.

A torch key ``layer1.0.bn1.running_mean`` is *module path* ``layer1.0.bn1`` + *leaf*
``running_mean``. A Flax variable ``variables['batch_stats']['layer1_0']['bn1']['running_mean']``
is collection + module path ``('layer1_0', 'bn1')`` + leaf. The two match when their module paths
agree after *canonicalization* (:func:`canonical_name`): joined with ``.``, every lowercase
``name_<int>`` becomes ``name.<int>``, while Flax's automatic names of compact submodules, a
capitalized class name and an index (``Conv_0``, ``BatchNorm_1``), stay one name (and a torch
``Conv.0`` is read as ``Conv_0``). So Flax submodules named like the torch attributes match by
default, including the names Flax gives list attributes (``self.layer1 = [Block(), ...]`` in
``setup`` is ``layer1_0``, ...) and NNX's nested integer keys (``('layer1', 0, 'bn1')``).

Leaves map as: ``weight`` -> ``weight`` (jaxbn's BatchNorm: 1:1), or ``kernel`` (``nn.Conv`` /
``nn.Dense``, in Flax layout: :mod:`.layouts`), or ``scale`` (LayerNorm/GroupNorm), or
``embedding`` (``nn.Embed``); every other leaf (``bias``, ``running_mean``, ``running_var``,
``num_batches_tracked``) keeps its name. The collection (``params`` / ``batch_stats``) is wherever
the target holds that leaf.

When the names differ, ``rules`` rewrite each torch key before matching: a callable
``key -> new key`` (``None`` drops the key on purpose) or a list of ``(regex, replacement)``
applied in order with :func:`re.sub`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .errors import CheckpointError
from .paths import SEP

Rules = Callable[[str], "str | None"] | Sequence[tuple[str, str]] | None

COLLECTIONS = ("params", "batch_stats")
BUFFER_LEAVES = ("running_mean", "running_var", "num_batches_tracked")
COUNTER = "num_batches_tracked"
WEIGHT_ALIASES = ("weight", "kernel", "scale", "embedding")
_INDEXED = re.compile(r"(.+)_(\d+)")
_AUTO_NAMED = re.compile(r"[A-Z][A-Za-z0-9]*(_\d+)+")  # Flax's compact names: Conv_0, BatchNorm_1


def canonical_name(path: str | Sequence[Any]) -> str:
    """``'layer1_0.bn1'``, ``('layer1', 0, 'bn1')`` and ``'layer1.0.bn1'`` -> ``'layer1.0.bn1'``.

    A lowercase ``name_<int>`` (a list attribute) splits into ``name.<int>``; a capitalized
    ``Name_<int>`` (Flax's automatic name of a compact submodule, ``Conv_0``) stays one name, and
    an index following a capitalized name joins it (torch ``Conv.0`` -> ``Conv_0``).
    """
    parts = path.split(".") if isinstance(path, str) else [str(p) for p in path]
    out: list[str] = []
    for part in parts:
        if part.isdigit() and out and out[-1][:1].isupper():
            out[-1] = f"{out[-1]}_{part}"
            continue
        indices = []
        while _AUTO_NAMED.fullmatch(part) is None and (m := _INDEXED.fullmatch(part)) is not None:
            part, index = m.group(1), m.group(2)
            indices.append(index)
        out += [part, *reversed(indices)]
    return ".".join(p for p in out if p != "")


def apply_rules(key: str, rules: Rules) -> str | None:
    """``key`` rewritten by ``rules`` (see the module docstring); ``None``: dropped on purpose."""
    if rules is None:
        return key
    if callable(rules):
        return rules(key)
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def split_key(key: str) -> tuple[str, str]:
    """``'layer1.0.bn1.weight'`` -> ``('layer1.0.bn1', 'weight')``: a torch key's module and leaf."""
    module, _, leaf = key.rpartition(".")
    return module, leaf


def is_linen(flat: Mapping[tuple, Any]) -> bool:
    """Whether flattened variables are linen's (every path starts with a collection) or NNX's."""
    return bool(flat) and all(len(p) > 1 and p[0] in COLLECTIONS for p in flat)


def module_path(path: tuple, linen: bool) -> tuple:
    """The module part of a Flax variable path: without the collection (linen) and the leaf."""
    return path[1:-1] if linen else path[:-1]


def flax_module_path(module: str) -> tuple[str, ...]:
    """A torch module path as the Flax one ``setup`` would give: ``'layer1.0.bn1'`` ->
    ``('layer1_0', 'bn1')`` (an index joins its parent with ``_``, as for list attributes)."""
    parts: list[str] = []
    for part in module.split(".") if module else []:
        if part.isdigit() and parts:
            parts[-1] = f"{parts[-1]}_{part}"
        else:
            parts.append(part)
    return tuple(parts)


def checked_torch_key(key: str) -> str:
    """``key``, if it names a torch tensor without inventing anything; else CheckpointError."""
    if not key or SEP in key or "" in key.split("."):
        problem = ("is empty" if not key else "contains '/', the separator of Flax names" if SEP in key
                   else "has an empty segment (a leading, trailing or doubled '.')")
        raise CheckpointError(f"torch key {key!r} {problem}: rename it (rules=..., or in torch) "
                              "before converting")
    return key
