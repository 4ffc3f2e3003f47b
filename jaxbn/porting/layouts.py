"""Where torch and Flax put a kernel's axes: the transposes between the two layouts, once.

A torch conv weight is ``(O, I, *k)`` and a Flax ``nn.Conv`` kernel ``(*k, I, O)`` (1d/2d/3d); a
torch linear weight is ``(out, in)`` and a Flax ``nn.Dense`` kernel ``(in, out)``. Every other
tensor keeps its layout (``"identity"``). A layout change is named by its *transform*:
``"identity"``, ``"linear"``, ``"conv1d"``, ``"conv2d"`` or ``"conv3d"``.
"""

from __future__ import annotations

import numpy as np


def kernel_transform(ndim: int) -> str:
    """The transform of a kernel of rank ``ndim`` (torch's or Flax's: the same)."""
    return "linear" if ndim == 2 else f"conv{ndim - 2}d" if ndim > 2 else "identity"


def to_flax(transform: str, w: np.ndarray) -> np.ndarray:
    """A torch weight in Flax layout: conv ``(O, I, *k)`` -> ``(*k, I, O)``, linear transposed."""
    if transform == "linear":
        return np.ascontiguousarray(w.T)
    if transform.startswith("conv"):
        return np.ascontiguousarray(np.transpose(w, (*range(2, w.ndim), 1, 0)))
    return w


def to_torch(transform: str, w: np.ndarray) -> np.ndarray:
    """A Flax kernel in torch layout: the inverse of :func:`to_flax`."""
    if transform == "linear":
        return np.ascontiguousarray(w.T)
    if transform.startswith("conv"):
        n = w.ndim
        return np.ascontiguousarray(np.transpose(w, (n - 1, n - 2, *range(n - 2))))
    return w


def flax_shape(transform: str, torch_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape :func:`to_flax` gives a tensor of ``torch_shape``."""
    return tuple(to_flax(transform, np.empty(torch_shape, np.int8)).shape)


def torch_shape(transform: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape :func:`to_torch` gives a tensor of ``flax_shape``."""
    return tuple(to_torch(transform, np.empty(flax_shape, np.int8)).shape)
