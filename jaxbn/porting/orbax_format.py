"""Orbax checkpoint directories: the ``orbax`` entry of :data:`jaxbn.porting.formats.REGISTRY`.

An Orbax checkpoint is a *directory* (``_CHECKPOINT_METADATA``, ``_METADATA`` -- the tree --,
``manifest.ocdbt`` and ``d/`` holding the arrays) written by
``orbax.checkpoint.StandardCheckpointer().save(path, variables)`` (what Flax's documentation
does) or ``PyTreeCheckpointer``. It holds Flax variables: nested dictionaries whose flat names
join the keys with ``/`` (:mod:`.paths`).

Reading restores every array as NumPy (``RestoreArgs(restore_type=np.ndarray)``), never through
JAX, so float64 and int64 stay what they are whatever ``jax_enable_x64`` says; bfloat16 comes
back as ``ml_dtypes.bfloat16``. The arrays' total size is read from the metadata and checked
against ``max_bytes`` before any array is read. A directory that is not a finished checkpoint
(Orbax's ``*.orbax-checkpoint-tmp*``, a missing ``_METADATA``/``manifest.ocdbt``, deleted or
truncated array data, an empty or unrelated directory) is refused with :class:`CheckpointError`.

Writing fills an empty directory (the temporary one of
:func:`jaxbn.porting.formats.atomic_write`) with what ``StandardCheckpointer().save`` writes;
plain ``StandardCheckpointer().restore(path)`` gives the variables back as nested dictionaries of
NumPy arrays.

Orbax is optional: it is imported only here, only when a checkpoint is read or written
(``pip install 'jaxbn[orbax]'``). Its log messages are silenced during these calls.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from . import paths
from .errors import CheckpointError

TREE_FILE = "_METADATA"
MARKERS = (TREE_FILE, "_CHECKPOINT_METADATA", "manifest.ocdbt")  # any of them: Orbax's
ORBAX_TEMP = ".orbax-checkpoint-tmp"  # Orbax's unfinished save: <name>.orbax-checkpoint-tmp[-<n>]
_SAVED_INTO = ".jaxbn-save"  # where Orbax saves inside the temporary directory


def _orbax(path: str) -> Any:
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:
        raise CheckpointError(f"{path!r} is an Orbax checkpoint directory: reading or writing it needs "
                              "orbax-checkpoint (pip install 'jaxbn[orbax]')") from e
    return ocp


def sniff(path: str) -> bool:
    """Whether the directory ``path`` holds one of Orbax's own files."""
    try:
        return not set(os.listdir(path)).isdisjoint(MARKERS)
    except OSError:
        return False


def describe_directory(path: str) -> str:
    """Why the directory ``path`` is no checkpoint at all, for :func:`~.formats.detect_format`."""
    try:
        entries = sorted(os.listdir(path))
    except OSError as e:
        return f"cannot read the directory {path!r}: {e.strerror or e}"
    if not entries:
        return f"{path!r} is an empty directory, not a checkpoint"
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    return (f"{path!r} is a directory but not an Orbax checkpoint (it has none of "
            f"{', '.join(MARKERS)}; it holds {shown})")


# ---------------------------------------------------------------- reading


def read(path: str, max_bytes: int) -> dict:
    """The nested variables stored in the Orbax checkpoint directory ``path``, as NumPy arrays."""
    _check_finished(path)
    ocp = _orbax(path)
    from etils import epath

    where = os.path.abspath(path)  # Orbax wants absolute paths
    with quiet():
        try:
            metadata = ocp.PyTreeCheckpointHandler().metadata(epath.Path(where))
            metadata = getattr(metadata, "tree", metadata)  # newer Orbax: a TreeMetadata
        except Exception as e:
            raise CheckpointError(f"{path!r} is a truncated or corrupt Orbax checkpoint: {_first_line(e)}") from e
        total = sum(_nbytes(m) for m in _leaves(metadata))
        if total > max_bytes:
            raise CheckpointError(f"refusing to load {path!r}: its arrays hold {total} bytes, more than "
                                  f"max_bytes={max_bytes} (CLI: --max-bytes)")
        restore_args = _map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
        try:
            return ocp.PyTreeCheckpointer().restore(where, args=ocp.args.PyTreeRestore(restore_args=restore_args))
        except Exception as e:
            raise CheckpointError(f"{path!r} is a truncated or corrupt Orbax checkpoint: {_first_line(e)}") from e


def _check_finished(path: str) -> None:
    """Refuse what is visibly not a complete checkpoint, before Orbax is asked."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path!r} is not a directory: an Orbax checkpoint is one")
    from .formats import TEMP_SUFFIX  # (formats imports this module)

    name = os.path.basename(os.path.normpath(path))
    if ORBAX_TEMP in name or re.fullmatch(r"\..+" + TEMP_SUFFIX, name):
        raise CheckpointError(f"{path!r} is an unfinished checkpoint (the temporary directory of a save "
                              "that did not complete); use the finished one")
    try:
        entries = set(os.listdir(path))
    except OSError as e:
        raise CheckpointError(f"cannot read the Orbax checkpoint {path!r}: {e.strerror or e}") from e
    if TREE_FILE not in entries:
        items = sorted(e for e in entries if os.path.isfile(os.path.join(path, e, TREE_FILE)))
        if items:
            raise CheckpointError(
                f"{path!r} holds Orbax checkpoint items ({', '.join(items)}), e.g. a CheckpointManager "
                f"step: pass the directory of the one holding the variables, e.g. "
                f"{os.path.join(path, items[0])!r}")
        raise CheckpointError(f"{path!r} is an incomplete or corrupt Orbax checkpoint: its {TREE_FILE} "
                              "file (the tree of arrays) is missing")
    try:
        with open(os.path.join(path, TREE_FILE), "rb") as f:
            tree_file = json.loads(f.read())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path!r} is a truncated or corrupt Orbax checkpoint: its {TREE_FILE} "
                              f"file is not readable JSON ({e})") from e
    if isinstance(tree_file, Mapping) and tree_file.get("use_ocdbt") and "manifest.ocdbt" not in entries:
        raise CheckpointError(f"{path!r} is an incomplete or corrupt Orbax checkpoint: its "
                              "manifest.ocdbt file (the index of the array data) is missing")


def _leaves(tree: Any) -> Iterator[Any]:
    if isinstance(tree, Mapping):
        for v in tree.values():
            yield from _leaves(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _leaves(v)
    else:
        yield tree


def _map(fn: Any, tree: Any) -> Any:
    """``fn`` over the leaves of nested dicts/lists/tuples (Orbax's metadata tree), structure kept."""
    if isinstance(tree, Mapping):
        return {k: _map(fn, v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map(fn, v) for v in tree)
    return None if tree is None else fn(tree)


def _nbytes(leaf: Any) -> int:
    shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
    if shape is None or dtype is None:
        return 0
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def _first_line(error: BaseException) -> str:
    """Orbax's/tensorstore's message without the multi-kilobyte tensorstore spec."""
    text = str(error).split(" [tensorstore_spec=", 1)[0].strip()
    lines = text.splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


# ---------------------------------------------------------------- writing


def check(arrays: dict[str, np.ndarray]) -> dict:
    """The nested tree Orbax is given; refuse what it cannot hold faithfully, before any write.

    Orbax names each array by its keys joined with ``.``: two arrays whose joined names coincide
    (``a.b`` and ``a/b``) would silently share one stored array, so they are refused.
    """
    if not arrays:
        raise CheckpointError("an Orbax checkpoint cannot hold no arrays; there is nothing to write")
    tree = paths.tree_from_names(arrays)
    stored: dict[str, str] = {}
    for name in arrays:
        key = ".".join(paths.path_from_name(name))
        if key in stored:
            raise CheckpointError(f"Orbax would store {stored[key]!r} and {name!r} as one array "
                                  f"({key!r}); rename one of them")
        stored[key] = name
    return tree


def write(arrays: dict[str, np.ndarray], directory: str) -> None:
    """Fill the empty ``directory`` with an Orbax checkpoint of ``arrays`` (flat, ``/`` names)."""
    tree = check(arrays)
    ocp = _orbax(directory)
    inner = os.path.join(directory, _SAVED_INTO)
    with quiet():
        ocp.Checkpointer(ocp.StandardCheckpointHandler()).save(inner, args=ocp.args.StandardSave(tree))
    for entry in os.listdir(inner):
        os.rename(os.path.join(inner, entry), os.path.join(directory, entry))
    os.rmdir(inner)


# ---------------------------------------------------------------- quiet


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Orbax's absl log messages silenced (its failures are raised, and reported by us)."""
    _install_unraisable_filter()
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _install_unraisable_filter() -> None:
    """Drop the ``RuntimeError: Event loop is closed`` that tensorstore's callbacks raise, after
    Orbax's event loop has ended, when a read failed (printed as a traceback otherwise, possibly
    after the failure was reported); every other unraisable exception goes to the previous hook."""
    previous = sys.unraisablehook
    if getattr(previous, "_jaxbn_filter", False):
        return

    def hook(unraisable: Any) -> None:
        e = unraisable.exc_value
        if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
            previous(unraisable)

    hook._jaxbn_filter = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook
