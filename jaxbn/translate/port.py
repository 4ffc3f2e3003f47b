"""The one call: a torch module -> a trainable ``flax.linen`` module and its variables.

:func:`from_torch` captures the module (:mod:`.tracing`), wraps the IR in a
:class:`~.module.TracedModule` and ports the torch ``state_dict`` into its variables with
:mod:`jaxbn.porting`. The model keeps torch's layout (channels on axis 1, norms with ``axis=1``);
with ``channels_last=True`` its inputs and outputs of rank >= 3 are NHWC and it computes NHWC
inside (:mod:`.layout`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any, Literal

import jax

from ..porting import target_from_module, torch_to_flax
from ..porting.paths import display_name
from ..porting.report import PortReport
from ..porting.tensors import tensor_to_numpy
from . import torch_ops
from .layout import channels_last as to_channels_last
from .module import TracedModule, value_ranks
from .ir import Block
from .tracing import capture_mode_independent, check_fixed_blocks_follow_modes, check_materialized

__all__ = ["Ported", "captured", "example_arrays", "from_torch", "frozen_params", "nnx_model"]


@dataclasses.dataclass(frozen=True, eq=False)
class Ported:
    """:func:`from_torch`'s result: ``module, variables = ported`` (the captured IR is
    ``ported.module.block``).

    Attributes:
      module: the linen module.
      variables: its variables, ``{'params': ..., 'batch_stats': ...}``.
      frozen_params: the Flax names (``'params/conv/kernel'``) of the torch parameters with
        ``requires_grad=False``: what an optimizer must leave alone to train like torch (which
        computes no gradient for them), e.g. with ``optax.multi_transform`` and
        ``optax.set_to_zero()`` (docs/porting.md).
    """

    module: TracedModule
    variables: dict
    frozen_params: tuple[str, ...] = ()

    def __iter__(self) -> Iterator[Any]:
        """``module, variables = ported``."""
        return iter((self.module, self.variables))


def example_arrays(example_input: Any, channels_last: bool = False) -> tuple:
    """torch tensor(s) -> JAX arrays in the translated model's layout."""
    inputs = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
    arrays = tuple(jax.numpy.asarray(tensor_to_numpy(t)) for t in inputs)
    return tuple(torch_ops.to_channels_last(a) for a in arrays) if channels_last else arrays


def from_torch(torch_module: Any, example_input: Any, *, api: Literal["linen", "nnx"] = "linen",
               channels_last: bool = False, rngs: Any = None) -> Any:
    """Translate a torch module into a trainable Flax module: an NNX module tree mirroring torch's
    (``api="nnx"``), or a ``flax.linen`` module and its variables (``api="linen"``, the default).

    With ``api="nnx"`` the result is an ``nnx.Module`` holding its state, as the torch module
    does (:mod:`.nnx_module`): ``model.layer1[0].bn1`` is a :class:`jaxbn.nnx.BatchNorm`, each
    module starts in its torch module's mode, ``model.train()`` / ``model.eval()`` and assigned
    attributes (``bn.momentum = None``, ``bn.track_running_stats = False``) act as torch's do,
    ``model(x)`` is ``torch_module(x)`` with its buffer updates, and ``nnx.state(model)`` carries
    torch's module paths (``flax_to_torch(nnx.state(model), torch_module, as_torch=True)``
    loads with ``load_state_dict(strict=True)``). Parameters with ``requires_grad=False`` are
    :class:`~.nnx_layers.FrozenParam`, which ``nnx.grad`` and ``nnx.Optimizer(..., wrt=nnx.Param)``
    leave alone. Dropout draws from ``rngs`` (default ``nnx.Rngs(0)``).

    The rest of this docstring describes ``api="linen"``.

    PyTorch equivalent: the module itself -- ``module.apply(variables, x, train=False)`` is
    ``torch_module.eval()(x)`` and ``module.apply(variables, x, train=True,
    mutable=['batch_stats'])`` is ``torch_module.train()(x)`` with its buffer updates (dropout
    needs a ``'dropout'`` rng); a module whose mode differs from the model's when translated
    keeps it under either ``train`` (``model.train(); bn.eval()``: ``bn`` uses its running
    statistics under ``train=True`` too), as it does in torch after ``torch_module.train(train)``
    and re-freezing. In-place operations are reproduced (later reads see the change) or refused.
    Every BatchNorm / InstanceNorm becomes a :mod:`jaxbn.linen` layer
    with the torch layer's *current* ``eps``, ``momentum`` (``None`` too), ``affine``, buffers and
    ``track_running_stats``; variables follow :mod:`jaxbn.porting`'s names, so
    ``flax_to_torch(variables, torch_module, as_torch=True)`` loads back with
    ``load_state_dict(strict=True)``.

    Args:
      torch_module: the model (not modified; lazy modules must have run once).
      example_input: a torch tensor, or a tuple of them, as the model takes (NCHW): gives the
        shapes and dtypes for the variables.
      channels_last: the Flax module takes and returns NHWC (rank >= 3) instead and computes
        NHWC inside, with Flax's own ``nn.Conv`` / ``nn.Dense`` / pools and norms on ``axis=-1``
        (:mod:`.layout`); the variables are the same.

    Returns:
      :class:`Ported` ``(module, variables)``, with ``frozen_params`` (the parameters torch does
      not train, ``requires_grad=False``).

    Raises:
      UnsupportedError: a module or operation that is not translated, named by path and type.
    """
    if api not in ("linen", "nnx"):
        raise ValueError(f"api must be 'linen' or 'nnx', got {api!r}")
    if api == "nnx" and channels_last:
        raise ValueError("channels_last=True is for api='linen': the NNX module computes in torch's "
                         "layout (NCHW), as the torch module does")
    block = captured(torch_module, example_input, api)
    if api == "nnx":
        return nnx_model(torch_module, block, rngs)
    if channels_last:
        block = to_channels_last(block, value_ranks(block, *example_arrays(example_input)))
    module = TracedModule(block)
    arrays = example_arrays(example_input, channels_last)
    target = target_from_module(module, *arrays, train=False)
    variables, report = torch_to_flax(torch_module.state_dict(), target)
    return Ported(module, variables, frozen_params(torch_module, report))


def captured(torch_module: Any, example_input: Any, api: Literal["linen", "nnx"] = "linen") -> Block:
    """The IR of ``torch_module`` for ``api``: materialized, captured in both modes
    (:func:`~.tracing.capture_mode_independent`); for NNX, whose modules hold their modes, no
    fixed-mode block that reads ``self.training``."""
    check_materialized(torch_module)
    block = capture_mode_independent(torch_module, example_input)
    if api == "nnx":
        check_fixed_blocks_follow_modes(torch_module, example_input, block)
    return block


def nnx_model(torch_module: Any, block: Block, rngs: Any = None) -> Any:
    """The NNX tree of ``torch_module``'s IR ``block`` (:func:`captured`) with its values,
    frozen parameters frozen: ``from_torch(..., api="nnx")``."""
    from flax import nnx

    from .nnx_layers import FrozenParam
    from .nnx_module import build_nnx, module_types

    containers = module_types(torch_module)
    # built abstractly (no random initial values: torch's replace them), then filled from torch
    model = nnx.eval_shape(lambda: build_nnx(block, torch_module.training, nnx.Rngs(0), containers))
    state = nnx.state(model, (nnx.Param, nnx.BatchStat))
    values, report = torch_to_flax(torch_module.state_dict(), state)
    nnx.replace_by_pure_dict(state, values)
    nnx.update(model, state)
    rngs = nnx.Rngs(0) if rngs is None else rngs
    for _, module in nnx.iter_modules(model):
        if isinstance(getattr(module, "rngs", None), nnx.RngStream):  # a dropout layer's stream
            module.rngs = rngs["dropout"].fork()
    for path in _frozen_paths(torch_module, report):
        *parents, leaf = path
        owner = model
        for part in parents:
            owner = getattr(owner, str(part))
        setattr(owner, leaf, FrozenParam(getattr(owner, leaf)[...]))
    return model


def frozen_params(torch_module: Any, report: PortReport) -> tuple[str, ...]:
    """The Flax names of ``torch_module``'s parameters with ``requires_grad=False`` (every path
    of a shared one), from the port's matched pairs."""
    return tuple(display_name(path) for path in _frozen_paths(torch_module, report))


def _frozen_paths(torch_module: Any, report: PortReport) -> list[tuple]:
    """The Flax paths the port filled from parameters with ``requires_grad=False``."""
    frozen = {name for name, p in torch_module.named_parameters(remove_duplicate=False)
              if not p.requires_grad}
    return [e.flax_path for e in report.matched if e.torch_key in frozen]
