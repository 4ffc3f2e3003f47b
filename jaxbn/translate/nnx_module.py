"""A captured torch module (:class:`~.ir.Block`) as a Flax NNX module tree mirroring torch's.

:func:`build_nnx` makes one NNX module per torch module, under torch's attribute names and
indexing (``model.layer1[0].bn1``; ``Sequential`` / ``ModuleList`` containers included, from
the torch paths the IR records), each layer from :mod:`.nnx_layers` or :mod:`jaxbn.nnx` (the
norms), each block a :class:`TracedBlock`, which runs the block's operations the way
:class:`~.module.TracedModule` does (one op table, :data:`.ops.OPS`). So ``nnx.state(model)``
holds torch's module paths, and :mod:`jaxbn.porting` maps it to and from a ``state_dict``
directly.

Modes are the modules' own, as in torch: each layer starts in its torch module's mode when
translated (``model.train(); bn.eval()`` included) and ``model.train()`` / ``model.eval()`` set
them all, as torch's do. A BatchNorm subclass with its own ``forward`` (timm's
``BatchNormAct2d``) is a :class:`TracedBlock` that *is* a :class:`jaxbn.nnx.BatchNorm`, as the
torch module is a ``BatchNorm2d``: its attributes (``momentum``, ``eps``, ...) and variables
are its own. No torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from flax import nnx

from .. import nnx as jaxbn_nnx
from ..porting.errors import UnsupportedError
from .ir import Block, Layer, Op, Variable, join_path
from .module import bind_inputs, resolve
from .nnx_layers import Container, ModuleList, Sequential, nnx_layer_class
from .ops import OPS

__all__ = ["RESERVED", "Program", "TracedBlock", "build_nnx", "child_paths", "child_tree", "container_kind",
           "flipped_tracking", "has_mode", "initial_mode", "module_types"]

RESERVED = frozenset(dir(nnx.Module)) | {"program"}
"""Names a torch child cannot have here: ``nnx.Module``'s own (and :class:`TracedBlock`'s)."""


@dataclasses.dataclass(frozen=True)
class Program:
    """What a :class:`TracedBlock` runs: a block without its children (a small static value).

    ``paths`` gives each child's attribute path from the block (``layer1_0`` ->
    ``('layer1', '0')``); ``norm`` is the child that is the block itself (a BatchNorm
    subclass's own norm), if any.
    """

    torch_type: str
    inputs: tuple[tuple[str, Any], ...]
    ops: tuple[Op, ...]
    output: Any
    paths: tuple[tuple[str, tuple[str, ...]], ...]
    norm: str | None = None


class TracedBlock(Container):
    """One captured torch module as an NNX module: its children are attributes under torch's
    names (``m[k]`` is the child ``k``: a torch ``Sequential`` model indexes as torch's), its
    own parameters and buffers (:class:`~.ir.Variable`) ``nnx.Param`` / ``nnx.BatchStat``
    attributes; ``__call__(*inputs)`` is torch's ``forward``."""

    def __init__(self, program: Program, children: Mapping[str, nnx.Module] = (),
                 variables: Mapping[str, nnx.Variable] = ()) -> None:
        self.program = program
        super().__init__(**dict(children))
        for name, variable in dict(variables).items():
            setattr(self, name, variable)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        program = self.program
        env = bind_inputs(program.torch_type, program.inputs, args, kwargs)
        paths = dict(program.paths)
        for op in program.ops:
            env[op.out] = self._run(op, env, paths)
        return resolve(program.output, env)

    def _run(self, op: Op, env: Mapping[str, Any], paths: Mapping[str, tuple[str, ...]]) -> Any:
        args = resolve(op.args, env)
        kwargs = {k: resolve(v, env) for k, v in op.kwargs}
        if op.kind == "variable":
            return getattr(self, op.target)[...]
        if op.kind == "function":
            return OPS[op.target].run(*args, **kwargs)
        if op.target == self.program.norm:  # this module's own norm (it is a jaxbn.nnx norm)
            return _NORM_CLASS[type(self)].__call__(self, *args, **kwargs)
        child: Any = self
        for part in paths[op.target]:
            child = getattr(child, part)
        return child(*args, **kwargs)


def _norm_block_class(norm: type) -> type:
    """``TracedBlock`` that is also ``norm`` (a :mod:`jaxbn.nnx` class), built from the norm's
    constructor arguments ``norm_kwargs`` and the block's."""

    def __init__(self, program: Program, children: Mapping[str, nnx.Module] = (),
                 variables: Mapping[str, nnx.Variable] = (), *, norm_kwargs: Mapping[str, Any]) -> None:
        norm.__init__(self, **norm_kwargs)
        TracedBlock.__init__(self, program, children, variables)

    cls = type(f"Traced{norm.__name__}", (TracedBlock, norm), {"__module__": __name__, "__init__": __init__})
    cls.__doc__ = f"A :class:`TracedBlock` that is a :class:`jaxbn.nnx.{norm.__name__}` (a torch subclass's own norm)."
    return cls


_NORM_BLOCKS = {name: _norm_block_class(getattr(jaxbn_nnx, name)) for name in ("BatchNorm", "InstanceNorm")}
_NORM_CLASS = {cls: getattr(jaxbn_nnx, name) for name, cls in _NORM_BLOCKS.items()}


def child_paths(block: Block) -> dict[str, tuple[str, ...]]:
    """Each child's attribute path from ``block``, from the torch paths: ``layer1_0`` (torch
    ``layer1.0``) -> ``('layer1', '0')``; a child at the block's own path (a BatchNorm
    subclass's norm) -> ``()``."""
    prefix = f"{block.torch_path}." if block.torch_path else ""
    paths = {}
    for name, child in block.children:
        path = child.torch_path
        if path == block.torch_path:
            paths[name] = ()
        elif path.startswith(prefix):
            paths[name] = tuple(path[len(prefix):].split("."))
        else:
            raise UnsupportedError(f"{path} is called by {block.torch_path or 'the model'} but is not "
                                   "one of its submodules")
    return paths


def build_nnx(block: Block, training: bool, rngs: nnx.Rngs,
              containers: Mapping[str, str] | None = None) -> TracedBlock:
    """The NNX module tree of a captured block, its layers in their torch modes (``training``
    for those that follow the model's), parameters initialized from ``rngs``.

    ``containers`` gives the torch type of each intermediate module (``{'layer1':
    'torch.nn.Sequential'}``) that only holds children: a ``Sequential`` whose every child is
    translated is a callable :class:`~.nnx_layers.Sequential`, a ``ModuleList`` a
    :class:`~.nnx_layers.ModuleList`, anything else a :class:`~.nnx_layers.Container`.
    """
    containers = containers or {}
    children = dict(block.children)
    tree, norm = child_tree(block)

    def built(node: Any, path: str) -> nnx.Module:
        if not isinstance(node, dict):  # a child's IR name
            child = children[node]
            return build_nnx(child, training, rngs, containers) if isinstance(child, Block) \
                else build_layer(child, training, rngs)
        inner = {part: built(value, join_path(path, part)) for part, value in node.items()}
        kind = container_kind(inner, containers.get(path, ""))
        if kind in _CONTAINERS:
            return _CONTAINERS[kind](*(inner[str(i)] for i in range(len(inner))))
        return Container(**inner)

    modules = {name: built(value, join_path(block.torch_path, name)) for name, value in tree.items()}
    variables = {v.name: _variable(v) for v in block.variables}
    program = Program(block.torch_type, block.inputs, block.ops, block.output,
                      tuple(child_paths(block).items()), norm)
    if norm is None:
        return TracedBlock(program, modules, variables)
    module = _NORM_BLOCKS[children[norm].cls](program, modules, variables,
                                              norm_kwargs=_norm_kwargs(children[norm], training))
    _flip(module, children[norm])
    return module


def child_tree(block: Block) -> tuple[dict, str | None]:
    """``block``'s children by attribute path, ``{'layer1': {'0': 'layer1_0'}, 'fc': 'fc'}``
    (leaves: the children's IR names), and the IR name of the child that is the block's own
    norm (a BatchNorm subclass's), if any.

    Raises:
      UnsupportedError: a name on a child's path that ``nnx.Module`` reserves (:data:`RESERVED`).
    """
    paths = child_paths(block)
    tree: dict = {}
    norm = None
    for name, _ in block.children:
        if any(part in RESERVED for part in paths[name]):
            raise UnsupportedError(f"{join_path(block.torch_path, name)}: a name on its path is reserved "
                                   "by flax.nnx.Module")
        if not paths[name]:
            norm = name
            continue
        node = tree
        for part in paths[name][:-1]:
            node = node.setdefault(part, {})
        node[paths[name][-1]] = name
    return tree, norm


def container_kind(names: Any, torch_type: str) -> str:
    """The :mod:`.nnx_layers` class holding the translated children ``names`` of a torch module
    of type ``torch_type`` that is only a container: ``Sequential`` (callable) for a torch
    ``Sequential`` whose every child ``0..n-1`` is there, ``ModuleList`` for such a
    ``ModuleList``, else ``Container`` (a partly used ``Sequential`` too)."""
    names = list(names)
    complete = all(n.isdigit() for n in names) and sorted(names, key=int) == [str(i) for i in range(len(names))]
    if complete and torch_type == "torch.nn.Sequential":
        return "Sequential"
    return "ModuleList" if complete and torch_type == "torch.nn.ModuleList" else "Container"


def module_types(torch_module: Any) -> dict[str, str]:
    """``{torch path: torch type name}`` of every module (what chooses the containers)."""
    from .tracing import torch_type_name

    return {path: torch_type_name(m) for path, m in torch_module.named_modules()}


_CONTAINERS = {"Sequential": Sequential, "ModuleList": ModuleList}


def _variable(variable: Variable) -> nnx.Variable:
    import jax.numpy as jnp

    value = jnp.zeros(variable.shape, variable.dtype)  # torch's values are ported in
    return nnx.Param(value) if variable.collection == "params" else nnx.BatchStat(value)


def has_mode(layer: Layer) -> bool:
    """The layer behaves by mode (a norm, dropout, stochastic depth): it follows the model's or
    has its own, fixed when translated."""
    return layer.takes_train or "train" in dict(layer.call_kwargs)


def initial_mode(layer: Layer, training: bool) -> bool:
    """The layer's mode when translated: fixed (its ``train`` call argument) or the model's."""
    return dict(layer.call_kwargs).get("train", training)


def flipped_tracking(layer: Layer) -> bool | None:
    """A norm's ``track_running_stats`` set after construction (torch's attribute flip), if any."""
    return dict(layer.call_kwargs).get("track_running_stats")


def _norm_kwargs(layer: Layer, training: bool) -> dict[str, Any]:
    return {**dict(layer.kwargs), "use_running_average": not initial_mode(layer, training)}


def _flip(module: Any, layer: Layer) -> None:
    """Assign :func:`flipped_tracking`, if any."""
    flipped = flipped_tracking(layer)
    if flipped is not None:
        module.track_running_stats = flipped


def build_layer(layer: Layer, training: bool, rngs: nnx.Rngs) -> nnx.Module:
    """The NNX module a :class:`~.ir.Layer` describes, in its torch mode."""
    if layer.cls.startswith("nn."):
        raise UnsupportedError("api='nnx' computes in torch's layout: channels_last=True is for the "
                               "linen module only")
    if layer.is_norm:
        module = getattr(jaxbn_nnx, layer.cls)(**_norm_kwargs(layer, training))
        _flip(module, layer)
        return module
    from .layers import layer_class

    cls = nnx_layer_class(layer_class(layer))
    mode = {"deterministic": not initial_mode(layer, training)} if has_mode(layer) else {}
    return cls(**dict(layer.kwargs), rngs=rngs, **mode)
