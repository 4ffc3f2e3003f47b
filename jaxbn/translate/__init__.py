"""torch model -> Flax: :func:`from_torch` (a trainable NNX module tree mirroring torch's, or a
linen module and its variables) and ``python -m jaxbn port`` (readable Flax source).

Translation happens once, in two steps, through a small hashable IR (:mod:`.ir`):

1. **Capture** (:mod:`.tracing`, needs torch): ``torch.fx`` traces each torch module that owns
   named children into a :class:`Block` of operations and children (:class:`Layer` values, or
   further blocks).
2. **Realization** (no torch): :class:`TracedModule` (:mod:`.module`) runs a block as a linen
   module, :func:`build_nnx` (:mod:`.nnx_module`, layers from :mod:`.nnx_layers`) builds it as
   an NNX module tree under torch's module paths, and :func:`emit_source` (:mod:`.emit`) writes
   either as Python source. Both take each
   function from one op table (:mod:`.ops`: how it runs, how it is written) and each layer from
   :mod:`.layers` (torch's ``nn`` layers in linen) or :mod:`jaxbn.linen` (the norms); the
   functions themselves are :mod:`.torch_ops`. Both build the same variables.

:mod:`.port` is the one call; :mod:`.layout` rewrites a block to compute channels-last;
:mod:`.fold` folds eval-mode BatchNorm into the layer before it; :mod:`.cli` is the ``port``
command. Anything not translated raises
:class:`UnsupportedError` (also ``jaxbn.porting.UnsupportedError``) at capture time. Depends on
:mod:`jaxbn.porting` (variable names, checkpoint files), never the other way round.
"""

from ..porting.errors import UnsupportedError
from .tracing import capture, capture_mode_independent
from .emit import emit_source
from .fold import FoldReport, fold_batch_norm
from .ir import Block, Layer, Op, Ref, Slice
from .module import TracedModule
from .port import Ported, from_torch


def __getattr__(name: str):
    """The NNX realization on first use (``flax.nnx`` imports optax, which jaxbn does not need)."""
    if name in ("TracedBlock", "build_nnx"):
        from . import nnx_module

        return getattr(nnx_module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["Block", "FoldReport", "Layer", "Op", "Ported", "Ref", "Slice", "TracedBlock", "TracedModule",
           "UnsupportedError", "build_nnx", "capture", "capture_mode_independent", "emit_source",
           "fold_batch_norm", "from_torch"]
