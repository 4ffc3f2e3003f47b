"""jaxbn: PyTorch's BatchNorm, exactly, as a pure JAX function.

The public API:

* :func:`batch_norm` -- ``(x, state, params, flags) -> (y, new_state)``, torch's
  ``BatchNorm{1,2,3}d.forward`` with every call-time attribute.
* :class:`BatchNormFlags`, :class:`BatchNormState`, :class:`BatchNormParams`,
  :func:`init_state`, :func:`init_params`.
* ``jaxbn.linen.BatchNorm`` / ``jaxbn.nnx.BatchNorm`` and ``jaxbn.linen.InstanceNorm`` /
  ``jaxbn.nnx.InstanceNorm`` -- ``torch.nn.BatchNorm*d`` / ``InstanceNorm*d`` as Flax modules
  (submodules, imported on first access).
* :func:`instance_norm` with :class:`InstanceNormFlags` -- torch's ``InstanceNorm{1,2,3}d``,
  sharing batch norm's state, params and core.
* :func:`from_torch` -- a torch model as a trainable Flax model in one call (an NNX module tree
  mirroring torch's with ``api="nnx"``, else a linen module and its variables),
  and :func:`fold_batch_norm` -- that model for inference, BatchNorm folded into the layer before
  it (``jaxbn.translate``).
* ``jaxbn.porting`` (torch ``state_dict`` <-> Flax variables, like ``load_state_dict``),
  ``jaxbn.checkpoint_io`` (safe ``.pt``/``.safetensors``/``.npz``/``.msgpack``/Orbax reading
  and writing) and ``jaxbn.testing`` (the torch <-> Flax equivalence harness), imported on first
  access.
"""

from .functional import *  # noqa: F403 -- the pure functions and their types are the top-level API
from .functional import __all__

__version__ = "0.1.0"

_SUBMODULES = ("linen", "nnx", "porting", "checkpoint_io", "testing")


def __getattr__(name: str):
    """Import the optional submodules lazily (Flax adapters, porting, checkpoint I/O, testing)."""
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    if name in ("from_torch", "fold_batch_norm"):  # the translator (imports torch only when called)
        from . import translate

        return getattr(translate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
