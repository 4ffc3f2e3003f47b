"""torch tensor <-> NumPy array, bit-exact: the one conversion every jaxbn module uses.

bfloat16 becomes ``ml_dtypes.bfloat16`` (the type JAX uses) and back, bit for bit. Tensors NumPy
cannot hold exactly (float8, quantized, sparse, ...) are refused with
:class:`UnsupportedTensorError` naming the dtype or layout, never converted approximately.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


class UnsupportedTensorError(TypeError):
    """A tensor whose dtype or layout has no exact NumPy counterpart."""


def is_torch_tensor(value: Any) -> bool:
    """Whether ``value`` is a ``torch.Tensor`` (checked without importing torch)."""
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def tensor_to_numpy(t: Any) -> np.ndarray:
    """A NumPy copy of a torch tensor, bit-exact; bfloat16 becomes ``ml_dtypes.bfloat16``.

    PyTorch equivalent: ``t.detach().cpu().numpy().copy()``, which rejects bfloat16.

    Raises:
      UnsupportedTensorError: sparse or quantized tensors, dtypes NumPy has no exact type for
        (float8, complex32, ...).
    """
    import torch

    t = t.detach()
    if t.layout != torch.strided:
        raise UnsupportedTensorError(f"a {t.layout} tensor (dtype {t.dtype}) is not supported: "
                                     "convert it with .to_dense() first")
    if t.is_quantized:
        raise UnsupportedTensorError(f"a quantized tensor (dtype {t.dtype}) is not supported: "
                                     "convert it with .dequantize() first")
    t = t.cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(BFLOAT16).copy()
    try:
        return t.numpy().copy()
    except (TypeError, RuntimeError) as e:
        raise UnsupportedTensorError(f"dtype {t.dtype} has no exact NumPy type ({e})") from e


def numpy_to_tensor(a: Any) -> Any:
    """A torch tensor owning a copy of ``a`` (NumPy/JAX array), bit-exact, bfloat16 included.

    PyTorch equivalent: ``torch.from_numpy(np.array(a))``, which rejects ``ml_dtypes.bfloat16``.
    """
    import torch

    a = np.array(a, copy=True)
    if a.dtype == BFLOAT16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def as_numpy(value: Any) -> np.ndarray:
    """A torch tensor (copied, :func:`tensor_to_numpy`) or any array-like as a NumPy array."""
    return tensor_to_numpy(value) if is_torch_tensor(value) else np.asarray(value)
