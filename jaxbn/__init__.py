"""jaxbn: PyTorch's BatchNorm, exactly, as a pure JAX function.

The public API:

* :func:`batch_norm` -- ``(x, state, params, flags) -> (y, new_state)``, torch's
  ``BatchNorm{1,2,3}d.forward`` with every call-time attribute.
* :class:`BatchNormFlags`, :class:`BatchNormState`, :class:`BatchNormParams`,
  :func:`init_state`, :func:`init_params`.
* ``jaxbn.linen.BatchNorm`` / ``jaxbn.nnx.BatchNorm`` -- ``torch.nn.BatchNorm*d`` as Flax
  modules (submodules, imported on first access).
"""

from .core import (
    BatchNormFlags,
    BatchNormParams,
    BatchNormState,
    batch_norm,
    init_params,
    init_state,
)
from .stats import Moments, batch_moments

__all__ = [
    "BatchNormFlags",
    "BatchNormParams",
    "BatchNormState",
    "Moments",
    "batch_moments",
    "batch_norm",
    "init_params",
    "init_state",
]

__version__ = "0.1.0"

_SUBMODULES = ("linen", "nnx")


def __getattr__(name: str):
    """Import the Flax adapters lazily: ``jaxbn.linen`` and ``jaxbn.nnx``."""
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
