"""Reading and writing checkpoint files safely: flat ``{name: numpy array}`` in, out.

Formats, detected from the file's first bytes (the extension is only a tie-breaker), or from a
directory's files:

* PyTorch ``.pt`` / ``.pth`` / ``.bin`` (zip or legacy) -- read *only* through
  ``torch.load(path, weights_only=True, map_location="cpu")``: never plain unpickling, so a
  crafted pickle cannot run code; it is refused with :class:`CheckpointError`. Needs torch.
* ``.safetensors`` -- read through ``safetensors.numpy`` (no torch).
* ``.npz`` -- ``numpy.load(allow_pickle=False)`` (no torch); the arrays' total size, read from
  each member's header before anything is decompressed, must not exceed ``max_bytes``
  (default :data:`DEFAULT_MAX_BYTES`, 16 GiB), so a small file of compressed zeros cannot
  exhaust memory.
* ``.msgpack`` -- Flax's ``flax.serialization`` msgpack (no pickle, no torch); nested
  dictionaries are flattened with ``/`` (:mod:`.paths`).
* Orbax -- a checkpoint *directory* as ``orbax.checkpoint.StandardCheckpointer().save`` writes
  it (Flax's documented way), holding Flax variables like msgpack; restored as NumPy (float64 and
  int64 kept whatever ``jax_enable_x64`` says), bounded by ``max_bytes`` from its metadata. Needs
  ``orbax-checkpoint`` (``pip install 'jaxbn[orbax]'``), imported only then (:mod:`.orbax_format`).

Writing picks the format from the output path (:func:`format_for_path`): a recognised extension
gives its format; a path ending in a separator, naming an existing directory, or without an
extension gives Orbax; ``format=`` (CLI ``--format``) overrides both.

Each format is one :class:`Format` record in :data:`REGISTRY` (name, extensions, whose names it
holds, content sniff, reader, writer, file or directory). bfloat16 tensors come back as
``ml_dtypes.bfloat16`` arrays (the type JAX uses), bit-exact; float8, quantized and sparse tensors are refused with :class:`CheckpointError` naming
the tensor and its dtype.

Writes go to a temporary file (a directory for Orbax) ``.<target name>.jaxbn-<pid>-<random>.tmp``
beside the target that replaces it only once complete, so a failed write never leaves a partial
file or clobbers an existing one. The new file gets the mode of the file it replaces, else
``0o666`` minus the umask (like ``open(path, "w")``; a directory: ``0o777`` minus the umask). An
output that is a symbolic link is written *through*: the file it points to is replaced and the
link stays. An existing Orbax checkpoint is replaced by renaming it aside
(``.<name>.jaxbn-<pid>-<random>.old``), renaming the new one in and only then deleting the old;
a directory that is not an Orbax checkpoint (and not empty) is never replaced. SIGTERM during a
write removes the temporary file or directory, then terminates as SIGTERM would; one left by a
killed process (SIGKILL) is removed by the next write to the same target once that process no
longer exists (an ``.old`` one only if the target exists: otherwise it is the last checkpoint).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import secrets
import shutil
import signal
import struct
import threading
import zipfile
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import numpy as np

from . import orbax_format, paths
from .errors import CheckpointError
from .tensors import (
    BFLOAT16,
    UnsupportedTensorError,
    as_numpy,
    is_torch_tensor,
    numpy_to_tensor,
    tensor_to_numpy,
)

__all__ = [
    "CheckpointError",
    "DEFAULT_MAX_BYTES",
    "FORMATS",
    "REGISTRY",
    "Destination",
    "Format",
    "check_writable",
    "destination",
    "detect_format",
    "format_for_path",
    "read_checkpoint",
    "write_checkpoint",
    "tensor_to_numpy",
    "numpy_to_tensor",
]

DEFAULT_MAX_BYTES = 16 * 2**30
_SAFETENSORS_MAX_HEADER = 100_000_000
NameKind = Literal["torch", "flax", "either"]
TEMP_SUFFIX = r"\.jaxbn-(\d+)-[0-9a-f]+\.(tmp|old)"  # after ".<target name>": see _temp_name
_SAFETENSORS_DTYPES = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U64", "U32",
                       "U16", "U8", "BOOL"}


@dataclasses.dataclass(frozen=True)
class Head:
    """What format sniffing sees: the path, its size and its first 16 bytes (a directory: 0, b"")."""

    path: str
    size: int
    data: bytes


@dataclasses.dataclass(frozen=True)
class Format:
    """One checkpoint format: everything needed to recognise, read and write it.

    ``names`` says whose names it holds: ``"torch"`` (a ``state_dict``), ``"flax"`` (nested
    variables) or ``"either"`` (flat names of any kind). ``read(path, max_bytes)`` returns the
    (possibly nested) mapping stored; ``write(arrays, path)`` writes a flat ``{name: numpy array}``
    to ``path``; ``check(arrays)`` raises :class:`CheckpointError` for what the format cannot hold,
    before anything is written; ``sep`` joins nested names when reading. A ``directory`` format
    is a directory of files (Orbax): ``sniff`` sees its path, ``write`` fills an empty directory.
    """

    name: str
    extensions: tuple[str, ...]
    names: NameKind
    sniff: Callable[[Head], bool]
    read: Callable[[str, int], Any]
    write: Callable[[dict[str, np.ndarray], str], None]
    check: Callable[[dict[str, np.ndarray]], Any] = lambda arrays: None
    sep: str = "."
    directory: bool = False

    def holds(self, framework: Literal["torch", "flax"]) -> bool:
        """Whether this format holds ``framework``'s names (a torch ``state_dict`` or Flax variables)."""
        return self.names in (framework, "either")


# ---------------------------------------------------------------- torch

def _zip_names(path: str) -> list[str]:
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path!r} is a truncated or corrupt zip archive: {e}") from e


def _is_zip(head: Head) -> bool:
    return head.data[:4] == b"PK\x03\x04"


def _sniff_torch(head: Head) -> bool:
    if _is_zip(head):
        return any(n.endswith("data.pkl") for n in _zip_names(head.path))
    d = head.data
    return len(d) >= 2 and d[0] == 0x80 and 2 <= d[1] <= 5  # legacy torch.save: pickle protocol 2..5


def _read_torch(path: str, max_bytes: int) -> Any:
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(
            f"reading the PyTorch checkpoint {path!r} needs torch (pip install 'jaxbn[torch]'); "
            "or save it as .safetensors"
        ) from e
    import pickle

    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(
            f"refusing to load {path!r}: it contains objects that torch.load(weights_only=True) "
            f"will not unpickle (a pickle that could run code); nothing was executed. "
            f"torch says: {first[0] if first else e}"
        ) from e
    except Exception as e:  # torch raises RuntimeError/EOFError/... for truncated archives
        raise CheckpointError(f"{path!r} is a truncated or corrupt PyTorch checkpoint: {e}") from e


def _write_torch(arrays: dict[str, np.ndarray], path: str) -> None:
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(f"writing the PyTorch checkpoint {path!r} needs torch "
                              "(pip install 'jaxbn[torch]'); or write .safetensors") from e
    torch.save({k: numpy_to_tensor(v) for k, v in arrays.items()}, path)


# ---------------------------------------------------------------- safetensors

def _safetensors_header_length(data: bytes) -> int | None:
    if len(data) < 9 or data[8:9] != b"{":
        return None
    return struct.unpack("<Q", data[:8])[0]


def _sniff_safetensors(head: Head) -> bool:
    n = _safetensors_header_length(head.data)
    return n is not None and n < _SAFETENSORS_MAX_HEADER


def _read_safetensors(path: str, max_bytes: int) -> dict[str, np.ndarray]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = _safetensors_header_length(f.read(9)) or 0
        if n + 8 > size:
            raise CheckpointError(f"{path!r} is not a valid safetensors file: its header length "
                                  f"{n} exceeds the file size {size} (truncated or corrupt)")
        f.seek(8)
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"{path!r} is a corrupt safetensors file: its header is not JSON ({e})") from e
    for name, info in header.items() if isinstance(header, dict) else ():
        dtype = info.get("dtype") if isinstance(info, dict) and name != "__metadata__" else None
        if dtype is not None and dtype not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path!r}: tensor {name!r} has dtype {dtype}, which has no exact "
                                  f"NumPy type (supported: {sorted(_SAFETENSORS_DTYPES)})")
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except Exception as e:
        raise CheckpointError(f"{path!r} is a truncated or corrupt safetensors file: {e}") from e


def _write_safetensors(arrays: dict[str, np.ndarray], path: str) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.array(v, order="C") for k, v in arrays.items()}, path)  # ascontiguousarray makes 0-d 1-d


# ---------------------------------------------------------------- npz

def _sniff_npz(head: Head) -> bool:
    if not _is_zip(head):
        return False
    names = _zip_names(head.path)
    return bool(names) and all(n.endswith(".npy") for n in names)


def _npz_sizes(z: np.lib.npyio.NpzFile, path: str) -> int:
    """Total bytes of the arrays in an open ``.npz``, from the members' headers only."""
    total = 0
    for member_name in z.zip.namelist():
        name = member_name.removesuffix(".npy")
        with z.zip.open(member_name) as member:
            version = np.lib.format.read_magic(member)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(member)
        if dtype.hasobject:
            raise CheckpointError(f"refusing to load {path!r}: array {name!r} holds Python objects "
                                  "(object arrays need pickle)")
        total += int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    return total


def _read_npz(path: str, max_bytes: int) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            total = _npz_sizes(z, path)
            if total > max_bytes:
                raise CheckpointError(
                    f"refusing to load {path!r}: its arrays hold {total} bytes once decompressed, "
                    f"more than max_bytes={max_bytes} (CLI: --max-bytes)")
            return {name: z[name] for name in z.files}  # each read is already a fresh array
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(f"refusing to load {path!r}: {e} (object arrays need pickle)") from e
    except Exception as e:
        raise CheckpointError(f"{path!r} is a truncated or corrupt .npz file: {e}") from e


def _check_npz(arrays: dict[str, np.ndarray]) -> None:
    if any(a.dtype == BFLOAT16 for a in arrays.values()):
        raise CheckpointError(".npz cannot store bfloat16 readably; write .safetensors instead")


def _write_npz(arrays: dict[str, np.ndarray], path: str) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


# ---------------------------------------------------------------- msgpack

def _sniff_msgpack(head: Head) -> bool:
    d = head.data
    return bool(d) and (0x80 <= d[0] <= 0x8F or d[0] in (0xDE, 0xDF))


def _read_msgpack(path: str, max_bytes: int) -> Any:
    import msgpack
    from flax import serialization

    try:
        with open(path, "rb") as f:
            return serialization.msgpack_restore(f.read())
    except (msgpack.exceptions.StackError, RecursionError) as e:
        raise CheckpointError(f"{path!r} is not a usable msgpack file: its dictionaries are nested "
                              "too deep for a checkpoint") from e
    except Exception as e:
        raise CheckpointError(f"{path!r} is a truncated or corrupt msgpack file: {e}") from e


def _write_msgpack(arrays: dict[str, np.ndarray], path: str) -> None:
    from flax import serialization

    with open(path, "wb") as f:
        f.write(serialization.msgpack_serialize(paths.tree_from_names(arrays)))


# ---------------------------------------------------------------- registry

REGISTRY: tuple[Format, ...] = (  # sniffed in this order
    Format("torch", (".pt", ".pth", ".bin"), "torch", _sniff_torch, _read_torch, _write_torch),
    Format("safetensors", (".safetensors",), "either", _sniff_safetensors, _read_safetensors,
           _write_safetensors),
    Format("npz", (".npz",), "either", _sniff_npz, _read_npz, _write_npz, check=_check_npz),
    Format("msgpack", (".msgpack",), "flax", _sniff_msgpack, _read_msgpack, _write_msgpack,
           check=paths.tree_from_names, sep=paths.SEP),  # colliding names are refused
    Format("orbax", (), "flax", lambda head: orbax_format.sniff(head.path), orbax_format.read,
           orbax_format.write, check=orbax_format.check, sep=paths.SEP, directory=True),
)
FORMATS = tuple(f.name for f in REGISTRY)
_EXTENSIONS = {ext: f.name for f in REGISTRY for ext in f.extensions}


def _format(name: str) -> Format:
    for fmt in REGISTRY:
        if fmt.name == name:
            return fmt
    raise CheckpointError(f"unknown checkpoint format {name!r}; expected one of {FORMATS}")


def detect_format(path: str | os.PathLike) -> str:
    """One of :data:`FORMATS`, from the file's content (extension only to break ties), or from
    the files of a directory (Orbax).

    Raises:
      CheckpointError: the file cannot be opened or its content is none of the formats.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        head = Head(path, 0, b"")
        matches = [f.name for f in REGISTRY if f.directory and f.sniff(head)]
        if not matches:
            raise CheckpointError(orbax_format.describe_directory(path))
        return matches[0]
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = Head(path, size, f.read(16))
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path!r}: {e.strerror or e}") from e
    ext = _EXTENSIONS.get(os.path.splitext(path)[1].lower())
    matches = [f.name for f in REGISTRY if not f.directory and f.sniff(head)]
    if matches:
        return ext if ext in matches else matches[0]
    if _is_zip(head):
        raise CheckpointError(f"{path!r} is a zip archive but neither a torch checkpoint nor an .npz")
    hint = f"; the extension says {ext} but the content does not match" if ext else ""
    raise CheckpointError(
        f"{path!r} is not a checkpoint this reader knows (torch .pt/.pth, .safetensors, .npz, "
        f"Flax .msgpack, an Orbax directory){hint}: it is empty, truncated or corrupt, or of "
        f"another format"
    )


def format_for_path(path: str | os.PathLike) -> str:
    """The format a checkpoint will be written in, from its path.

    A recognised extension gives its format (``.msgpack`` ...); a path that ends in a separator,
    names an existing directory or has no extension gives the (only) directory format, Orbax.
    """
    path = os.fspath(path)
    directory = next(f.name for f in REGISTRY if f.directory)
    if path.endswith(os.sep) or (os.altsep and path.endswith(os.altsep)):
        return directory
    ext = os.path.splitext(path)[1].lower()
    if ext in _EXTENSIONS:
        return _EXTENSIONS[ext]
    if os.path.isdir(path) or not ext:
        return directory
    raise CheckpointError(
        f"cannot tell the format of {path!r} from its extension; use one of "
        f"{sorted(_EXTENSIONS)}, a directory path (no extension, or ending in {os.sep!r}) for an "
        f"Orbax checkpoint, or give the format (CLI: --format)"
    )


# ---------------------------------------------------------------- reading

def read_checkpoint(
    path: str | os.PathLike,
    format: str | None = None,
    *,
    key: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> dict[str, np.ndarray]:
    """Read a checkpoint file into a flat ``{name: numpy array}``.

    PyTorch equivalent: ``torch.load(path, weights_only=True, map_location="cpu")`` (a
    ``state_dict``), for every format in :data:`FORMATS`; torch is needed only for torch files.

    Args:
      path: the file (an Orbax checkpoint: the directory).
      format: one of :data:`FORMATS`; ``None`` detects it from the content.
      key: take this entry of the loaded dictionary (e.g. ``"state_dict"`` or ``"model"`` of a
        training checkpoint that also stores the epoch); nested dictionaries are flattened with
        ``.`` (torch) or ``/`` (msgpack, Orbax).
      max_bytes: refuse an ``.npz`` or Orbax checkpoint whose arrays would take more than this
        many bytes (decompressed; checked from the headers or metadata, before reading).

    Raises:
      CheckpointError: unreadable, truncated/corrupt, unsafe (a pickle that would run code or
        build arbitrary objects), too large, containing entries that are not arrays, tensors
        without an exact NumPy type (float8, quantized, sparse) or colliding names.
    """
    path = os.fspath(path)
    fmt = _format(detect_format(path) if format is None else format)
    tree = fmt.read(path, max_bytes)
    if key is not None:
        if not isinstance(tree, Mapping) or key not in tree:
            keys = list(tree)[:10] if isinstance(tree, Mapping) else []
            raise CheckpointError(f"{path!r} has no entry {key!r} (top-level keys: {keys})")
        tree = tree[key]
    return _flatten(tree, path, fmt.sep)


def _flatten(tree: Any, path: str, sep: str) -> dict[str, np.ndarray]:
    """Nested mappings -> ``{joined name: numpy array}``; anything but arrays is refused."""
    flat: dict[str, np.ndarray] = {}
    bad: list[str] = []

    def visit(prefix: tuple, node: Any) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                visit(prefix + (str(k),), v)
            return
        name = _join(prefix, sep, path)
        if name in flat:
            raise CheckpointError(f"{path!r}: two entries are both named {name!r}")
        if is_torch_tensor(node):
            try:
                flat[name] = tensor_to_numpy(node)
            except UnsupportedTensorError as e:
                raise CheckpointError(f"{path!r}: tensor {name!r}: {e}") from e
        elif isinstance(node, (np.ndarray, np.generic)):
            a = np.asarray(node)
            flat[name] = a if a.flags.writeable else a.copy()  # a reader's own fresh array is kept
        else:
            bad.append(f"{name or '<root>'} ({type(node).__name__})")

    visit((), tree)
    if bad:
        raise CheckpointError(
            f"{path!r} holds entries that are not tensors: {', '.join(bad[:10])}"
            f"{' ...' if len(bad) > 10 else ''}; pick the state_dict with key=... "
            f"(CLI: --key), e.g. key='state_dict'"
        )
    return flat


def _join(prefix: tuple, sep: str, path: str) -> str:
    if sep == paths.SEP:
        try:
            return paths.path_name(prefix) if prefix else ""
        except CheckpointError as e:
            raise CheckpointError(f"{path!r}: {e}") from e
    return sep.join(prefix)


# ---------------------------------------------------------------- writing

def write_checkpoint(
    flat: Mapping[str, Any], path: str | os.PathLike, format: str | None = None
) -> None:
    """Write a flat ``{name: array}`` atomically (temporary file, then rename).

    ``format`` defaults to the path's (:func:`format_for_path`). For ``msgpack`` and ``orbax``
    names are split on ``/`` into the nested dictionaries Flax uses (names that collide are
    refused); ``torch`` writes ``torch.save`` of CPU tensors; ``orbax`` writes a directory. See
    the module docstring for file modes, symbolic links and interrupted writes.

    Raises:
      CheckpointError: unknown format, an output directory that does not exist, an output that
        is a directory (for Orbax: a file, or a non-empty directory that is not an Orbax
        checkpoint), data the format cannot hold, or a write that fails.
    """
    destination(path, format).write(flat)


@dataclasses.dataclass(frozen=True)
class Destination:
    """A checked place to write a checkpoint: the file it replaces and the format it gets."""

    target: str  # the file (Orbax: directory) replaced (a symbolic link resolved: written through)
    format: Format

    def write(self, flat: Mapping[str, Any]) -> None:
        """Write a flat ``{name: array}`` here, atomically (see :func:`write_checkpoint`)."""
        arrays = {}
        for k, v in flat.items():
            try:
                arrays[k] = as_numpy(v)
            except UnsupportedTensorError as e:
                raise CheckpointError(f"cannot write tensor {k!r}: {e}") from e
        self.format.check(arrays)
        atomic_write(self.target, lambda tmp: self.format.write(arrays, tmp), directory=self.format.directory)


def destination(path: str | os.PathLike, format: str | None = None) -> Destination:
    """Where and how :func:`write_checkpoint` writes ``path``, checked before any work is done.

    ``format`` defaults to the path's (:func:`format_for_path`).

    Raises:
      CheckpointError: unknown format, an output directory that does not exist, or an output
        that is a directory (for Orbax: a file, or a non-empty directory that is not an Orbax
        checkpoint).
    """
    path = os.fspath(path)
    fmt = _format(format_for_path(path) if format is None else format)
    return Destination(check_writable(path, fmt), fmt)


def check_writable(path: str | os.PathLike, format: Format | None = None) -> str:
    """The file a write to ``path`` replaces (a symbolic link resolved: it is written through).

    For a directory ``format`` (Orbax) the directory replaced: absent, empty or a checkpoint of
    that format; anything else there is refused, never deleted.

    Raises:
      CheckpointError: ``path`` is a directory (for a directory format: a file, or a non-empty
        directory the format does not recognise) or its directory does not exist.
    """
    path = os.fspath(path)
    target = os.path.realpath(path)
    if format is not None and format.directory:
        if os.path.exists(target) and not os.path.isdir(target):
            raise CheckpointError(f"cannot write {path!r}: it is a file, and an {format.name} checkpoint "
                                  "is a directory")
        try:
            entries = os.listdir(target) if os.path.isdir(target) else []
        except OSError as e:
            raise CheckpointError(f"cannot write {path!r}: {e.strerror or e}") from e
        if entries and not format.sniff(Head(target, 0, b"")):
            raise CheckpointError(f"cannot write {path!r}: it is a directory that is not an {format.name} "
                                  "checkpoint; refusing to replace it (choose a new or empty directory)")
    elif os.path.isdir(target):
        raise CheckpointError(f"cannot write {path!r}: it is a directory")
    directory = os.path.dirname(target)
    if not os.path.isdir(directory):
        raise CheckpointError(f"cannot write {path!r}: the directory {directory!r} does not exist")
    return target


def _temp_name(target: str, kind: str = "tmp") -> str:
    """The temporary file (or directory) a write to ``target`` uses: ``.<name>.jaxbn-<pid>-<random>.tmp``;
    ``kind="old"``: where an existing directory is renamed aside while it is replaced."""
    directory, name = os.path.split(target)
    return os.path.join(directory, f".{name}.jaxbn-{os.getpid()}-{secrets.token_hex(4)}.{kind}")


def _remove_stale_temps(target: str) -> None:
    """Remove temporary files and directories of earlier writes to ``target`` whose process is
    gone; a directory renamed aside (``.old``) only once ``target`` exists again."""
    directory, name = os.path.split(target)
    pattern = re.compile(re.escape(f".{name}") + TEMP_SUFFIX)
    try:
        entries = os.listdir(directory)
    except OSError:
        return
    for entry in entries:
        m = pattern.fullmatch(entry)
        if m and not _process_alive(int(m.group(1))) and (m.group(2) == "tmp" or os.path.exists(target)):
            _remove(os.path.join(directory, entry))


def _remove(path: str) -> None:
    """Remove the file or directory tree ``path`` if it is there (errors ignored)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except OSError:
            pass


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def atomic_write(target: str, write: Callable[[str], None], *, directory: bool = False) -> None:
    """Replace the file ``target`` by what ``write(temporary path)`` writes, atomically.

    The temporary file beside ``target`` is renamed over it only once ``write`` returned; if
    ``write`` raises (or SIGTERM arrives), it is removed and ``target`` is left as it was. Mode,
    stale temporary files and interruption as in the module docstring; ``target`` should come from
    :func:`check_writable`. With ``directory``, the temporary path is an empty directory that
    ``write`` fills, and an existing ``target`` directory is renamed aside, replaced, then deleted
    (put back if the new one cannot be renamed in).

    Raises:
      CheckpointError: the temporary file cannot be created, written or renamed (an ``OSError``).
    """
    _remove_stale_temps(target)
    tmp = _temp_name(target)
    try:
        if directory:
            os.mkdir(tmp, 0o777)  # the umask applies
        else:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as e:
        raise CheckpointError(f"cannot write {target!r}: {e.strerror or e}") from e
    guard = _removed_on_sigterm(tmp)
    try:
        # the replaced file's mode, else what open() would give (0o666 minus the umask); set after
        # writing, since a writer may recreate the file (safetensors does, with mode 0o600)
        replaced = os.path.isdir(target) if directory else os.path.isfile(target)
        mode = os.stat(target if replaced else tmp).st_mode & 0o7777
        with guard:
            write(tmp)
            os.chmod(tmp, mode)
            if directory and replaced:
                _replace_directory(tmp, target, guard)
            else:
                os.replace(tmp, target)
    except BaseException as e:
        _remove(tmp)
        if isinstance(e, OSError):
            raise CheckpointError(f"cannot write {target!r}: {e.strerror or e}") from e
        raise


def _replace_directory(new: str, target: str, guard: _removed_on_sigterm) -> None:
    """Rename ``target`` aside, ``new`` into its place, then delete the old one; SIGTERM waits
    for both renames (it then removes the old one), and a failed second rename puts it back."""
    old = _temp_name(target, "old")
    guard.paths.append(old)
    with guard.deferred():
        os.rename(target, old)
        try:
            os.rename(new, target)
        except BaseException:
            os.rename(old, target)
            raise
    _remove(old)


class _removed_on_sigterm:
    """While active (main thread only): SIGTERM removes ``paths`` (``tmp`` and any added), then
    acts as it would have; inside :meth:`deferred` it waits for the block to end."""

    def __init__(self, tmp: str):
        self.paths = [tmp]
        self.installed = False
        self.previous: Any = signal.SIG_DFL
        self.deferring = False
        self.pending: int | None = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.deferring:
            self.pending = signum
            return
        for path in self.paths:
            _remove(path)
        signal.signal(signum, self.previous)
        self.installed = False
        os.kill(os.getpid(), signum)  # the previous behaviour: by default, terminate by SIGTERM

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A block SIGTERM does not interrupt (it is handled once the block has ended)."""
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
            if self.pending is not None and self.installed:
                self._handler(self.pending, None)

    def __enter__(self) -> None:
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN):
            previous = signal.signal(signal.SIGTERM, self._handler)
            self.previous = signal.SIG_DFL if previous is None else previous
            self.installed = True

    def __exit__(self, *exc: Any) -> None:
        if self.installed:
            signal.signal(signal.SIGTERM, self.previous)
            self.installed = False
