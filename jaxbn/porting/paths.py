"""Flax variable paths and their ``/``-joined names (``params/layer1_0/bn1/weight``).

A Flax variable lives at a *path*: a tuple of keys through nested dictionaries
(``('params', 'layer1_0', 'bn1', 'weight')``). Flat files (``.safetensors``, ``.npz``, the
flattened ``.msgpack``) name it by joining the keys with ``/``. Every module that needs the
convention uses this one, and it never invents names: a key that contains ``/`` or is empty,
an empty segment in a name, or two names where one is a leaf and a directory of another
(``params/x`` and ``params/x/y``) raise :class:`CheckpointError` naming them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .errors import CheckpointError

SEP = "/"


def path_name(path: Iterable[Any]) -> str:
    """``('params', 'layer1_0', 'weight')`` -> ``'params/layer1_0/weight'`` (keys may be ints)."""
    parts = [str(p) for p in path]
    for part in parts:
        if part == "" or SEP in part:
            raise CheckpointError(
                f"cannot name the Flax variable {tuple(parts)}: its key {part!r} "
                f"{'is empty' if part == '' else 'contains ' + repr(SEP)}, the separator of flat names")
    return SEP.join(parts)


def display_name(path: Iterable[Any]) -> str:
    """A path as its flat name for messages, or its ``repr`` where :func:`path_name` would refuse
    it (a message only reports, it never refuses)."""
    try:
        return path_name(path)
    except CheckpointError:
        return repr(path)


def path_from_name(name: str) -> tuple[str, ...]:
    """``'params/layer1_0/weight'`` -> ``('params', 'layer1_0', 'weight')``; empty segments refused."""
    parts = tuple(name.split(SEP))
    if "" in parts:
        raise CheckpointError(f"the Flax variable name {name!r} has an empty segment (a leading, "
                              f"trailing or doubled {SEP!r})")
    return parts


def plain_tree(tree: Any) -> Any:
    """Plain nested dicts from FrozenDict / nnx.State / dict. An NNX state's random-number
    streams (``nnx.RngState``: a dropout layer's key and counter) are left out: they are no
    torch tensor."""
    if hasattr(tree, "to_pure_dict"):
        from flax import nnx

        tree = nnx.to_pure_dict(nnx.filter_state(tree, nnx.Not(nnx.RngState)))
    if isinstance(tree, Mapping):
        return {k: plain_tree(v) for k, v in tree.items()}
    return tree


def flatten_tree(tree: Any) -> dict[tuple, Any]:
    """``{path tuple: leaf}`` of nested mappings (variables dicts, FrozenDict, NNX state)."""
    flat = {}

    def visit(prefix: tuple, node: Any) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                visit(prefix + (k,), v)
        else:
            flat[prefix] = node

    visit((), plain_tree(tree))
    return flat


def unflatten_tree(flat: Mapping[tuple, Any]) -> dict:
    """Nested plain dicts from ``{path tuple: leaf}`` (the inverse of :func:`flatten_tree`).

    Raises:
      CheckpointError: a path is both a leaf and the parent of another path (one would be lost).
    """
    tree: dict = {}
    owner: dict[tuple, tuple] = {}  # a prefix -> the first full path that made it a directory
    for path, value in flat.items():
        node = tree
        for depth, k in enumerate(path[:-1]):
            prefix = path[: depth + 1]
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                _collision(prefix, path)
            owner.setdefault(prefix, path)
            node = child
        if path[-1] in node:
            _collision(path, owner.get(path, path))
        node[path[-1]] = value
    return tree


def _collision(leaf: tuple, other: tuple) -> None:
    raise CheckpointError(
        f"names collide: {_shown(leaf)!r} is a tensor and {_shown(other)!r} needs it to be a "
        f"directory (or both are the same name); rename one of them")


def _shown(path: tuple) -> str:
    return SEP.join(str(p) for p in path)


def names_from_tree(tree: Any) -> dict[str, Any]:
    """``{'params/conv/kernel': leaf}``: a variables tree as flat names."""
    return {path_name(p): v for p, v in flatten_tree(tree).items()}


def tree_from_names(flat: Mapping[str, Any]) -> dict:
    """Nested plain dicts from ``{'params/conv/kernel': leaf}`` (collisions refused)."""
    return unflatten_tree({path_from_name(k): v for k, v in flat.items()})
