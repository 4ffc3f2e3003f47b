"""Reading and writing checkpoint files safely: flat ``{name: numpy array}`` in, out.

Formats, detected from the file's first bytes (the extension is only a tie-breaker):

* PyTorch ``.pt`` / ``.pth`` (zip or legacy) -- read *only* through
  ``torch.load(path, weights_only=True, map_location="cpu")``: never plain unpickling, so a
  crafted pickle cannot run code; it is refused with :class:`CheckpointError`. Needs torch.
* ``.safetensors`` -- read through ``safetensors.numpy`` (no torch).
* ``.npz`` -- ``numpy.load(allow_pickle=False)`` (no torch).
* ``.msgpack`` -- Flax's ``flax.serialization`` msgpack (no pickle, no torch); nested
  dictionaries are flattened with ``/``.

bfloat16 tensors come back as ``ml_dtypes.bfloat16`` arrays (the type JAX uses), bit-exact.
Writes go to a temporary file in the target directory that replaces the destination only once
complete, so a failed write never leaves a partial file or clobbers an existing one.
"""

from __future__ import annotations

import os
import struct
import tempfile
import zipfile
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

__all__ = [
    "CheckpointError",
    "FORMATS",
    "detect_format",
    "read_checkpoint",
    "write_checkpoint",
    "tensor_to_numpy",
    "numpy_to_tensor",
]

BFLOAT16 = np.dtype(jnp.bfloat16)  # ml_dtypes.bfloat16, as JAX uses it
FORMATS = ("torch", "safetensors", "npz", "msgpack")
_EXTENSIONS = {
    ".pt": "torch",
    ".pth": "torch",
    ".bin": "torch",
    ".safetensors": "safetensors",
    ".npz": "npz",
    ".msgpack": "msgpack",
}
_SAFETENSORS_MAX_HEADER = 100_000_000


class CheckpointError(ValueError):
    """A checkpoint file cannot be read (unreadable, corrupt, unsafe, or of an unknown format)."""


def _is_torch_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def tensor_to_numpy(t: Any) -> np.ndarray:
    """A NumPy copy of a torch tensor, bit-exact; bfloat16 becomes ``ml_dtypes.bfloat16``."""
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(BFLOAT16).copy()
    return t.numpy().copy()


def numpy_to_tensor(a: Any) -> Any:
    """A torch tensor owning a copy of ``a`` (NumPy/JAX array), bit-exact, bfloat16 included."""
    import torch

    a = np.array(a, copy=True)
    if a.dtype == BFLOAT16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def detect_format(path: str | os.PathLike) -> str:
    """One of :data:`FORMATS`, from the file's content (extension only to break ties).

    Raises:
      CheckpointError: the file cannot be opened or its content is none of the formats.
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path!r}: {e.strerror or e}") from e
    ext = _EXTENSIONS.get(os.path.splitext(path)[1].lower())
    if head[:4] == b"PK\x03\x04":
        return _zip_format(path)
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "torch"  # legacy (non-zip) torch.save: a pickle stream, protocol 2..5
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and header_len < min(size - 7, _SAFETENSORS_MAX_HEADER):
            return "safetensors"
    if head[:1] and (0x80 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF)):
        return "msgpack"
    hint = f"; the extension says {ext} but the content does not match" if ext else ""
    raise CheckpointError(
        f"{path!r} is not a checkpoint this reader knows (torch .pt/.pth, .safetensors, .npz, "
        f"Flax .msgpack){hint}: it is empty, truncated or corrupt, or of another format"
    )


def _zip_format(path: str) -> str:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path!r} is a truncated or corrupt zip archive: {e}") from e
    if any(n.endswith("data.pkl") for n in names):
        return "torch"
    if names and all(n.endswith(".npy") for n in names):
        return "npz"
    raise CheckpointError(f"{path!r} is a zip archive but neither a torch checkpoint nor an .npz")


def read_checkpoint(
    path: str | os.PathLike, format: str | None = None, *, key: str | None = None
) -> dict[str, np.ndarray]:
    """Read a checkpoint file into a flat ``{name: numpy array}``.

    PyTorch equivalent: ``torch.load(path, weights_only=True, map_location="cpu")`` (a
    ``state_dict``), for every format in :data:`FORMATS`; torch is needed only for torch files.

    Args:
      path: the file.
      format: one of :data:`FORMATS`; ``None`` detects it from the content.
      key: take this entry of the loaded dictionary (e.g. ``"state_dict"`` or ``"model"`` of a
        training checkpoint that also stores the epoch); nested dictionaries are flattened with
        ``.`` (torch) or ``/`` (msgpack).

    Raises:
      CheckpointError: unreadable, truncated/corrupt, unsafe (a pickle that would run code or
        build arbitrary objects), or containing entries that are not arrays.
    """
    path = os.fspath(path)
    format = detect_format(path) if format is None else format
    if format not in FORMATS:
        raise CheckpointError(f"unknown checkpoint format {format!r}; expected one of {FORMATS}")
    reader = {"torch": _read_torch, "safetensors": _read_safetensors, "npz": _read_npz,
              "msgpack": _read_msgpack}[format]
    tree = reader(path)
    if key is not None:
        if not isinstance(tree, Mapping) or key not in tree:
            keys = list(tree)[:10] if isinstance(tree, Mapping) else []
            raise CheckpointError(f"{path!r} has no entry {key!r} (top-level keys: {keys})")
        tree = tree[key]
    return _flatten(tree, path, "/" if format == "msgpack" else ".")


def _read_torch(path: str) -> Any:
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


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except Exception as e:
        raise CheckpointError(f"{path!r} is a truncated or corrupt safetensors file: {e}") from e


def _read_npz(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {name: np.array(z[name]) for name in z.files}
    except ValueError as e:
        raise CheckpointError(f"refusing to load {path!r}: {e} (object arrays need pickle)") from e
    except Exception as e:
        raise CheckpointError(f"{path!r} is a truncated or corrupt .npz file: {e}") from e


def _read_msgpack(path: str) -> Any:
    from flax import serialization

    try:
        with open(path, "rb") as f:
            return serialization.msgpack_restore(f.read())
    except Exception as e:
        raise CheckpointError(f"{path!r} is a truncated or corrupt msgpack file: {e}") from e


def _flatten(tree: Any, path: str, sep: str) -> dict[str, np.ndarray]:
    """Nested mappings -> ``{joined name: numpy array}``; anything but arrays is refused."""
    flat: dict[str, np.ndarray] = {}
    bad: list[str] = []

    def visit(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                visit(f"{prefix}{sep}{k}" if prefix else str(k), v)
        elif _is_torch_tensor(node):
            flat[prefix] = tensor_to_numpy(node)
        elif isinstance(node, (np.ndarray, np.generic)):
            flat[prefix] = np.array(node, copy=True)
        else:
            bad.append(f"{prefix or '<root>'} ({type(node).__name__})")

    visit("", tree)
    if bad:
        raise CheckpointError(
            f"{path!r} holds entries that are not tensors: {', '.join(bad[:10])}"
            f"{' ...' if len(bad) > 10 else ''}; pick the state_dict with key=... "
            f"(CLI: --key), e.g. key='state_dict'"
        )
    return flat


def format_for_path(path: str | os.PathLike) -> str:
    """The format a file will be written in, from its extension."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext not in _EXTENSIONS:
        raise CheckpointError(
            f"cannot tell the format of {os.fspath(path)!r} from its extension; use one of "
            f"{sorted(_EXTENSIONS)}"
        )
    return _EXTENSIONS[ext]


def write_checkpoint(
    flat: Mapping[str, Any], path: str | os.PathLike, format: str | None = None
) -> None:
    """Write a flat ``{name: array}`` atomically (temporary file, then rename).

    ``format`` defaults to the extension's. For ``msgpack`` names are split on ``/`` into the
    nested dictionaries Flax uses; ``torch`` writes ``torch.save`` of CPU tensors.
    """
    path = os.fspath(path)
    format = format_for_path(path) if format is None else format
    arrays = {k: tensor_to_numpy(v) if _is_torch_tensor(v) else np.asarray(v) for k, v in flat.items()}
    if format == "npz" and any(a.dtype == BFLOAT16 for a in arrays.values()):
        raise CheckpointError(".npz cannot store bfloat16 readably; write .safetensors instead")
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".jaxbn-", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        _write(arrays, tmp, format)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write(arrays: dict[str, np.ndarray], path: str, format: str) -> None:
    if format == "safetensors":
        from safetensors.numpy import save_file

        save_file({k: np.array(v, order="C") for k, v in arrays.items()}, path)  # ascontiguousarray makes 0-d 1-d
    elif format == "npz":
        with open(path, "wb") as f:
            np.savez(f, **arrays)
    elif format == "msgpack":
        from flax import serialization
        from flax.traverse_util import unflatten_dict

        with open(path, "wb") as f:
            f.write(serialization.msgpack_serialize(unflatten_dict(arrays, sep="/")))
    elif format == "torch":
        import torch

        torch.save({k: numpy_to_tensor(v) for k, v in arrays.items()}, path)
    else:
        raise CheckpointError(f"unknown checkpoint format {format!r}; expected one of {FORMATS}")
