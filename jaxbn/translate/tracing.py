"""A torch module -> the translator's IR (:class:`~.ir.Block`), with ``torch.fx``: :func:`capture`.

Every torch module that owns named children (and the root) is traced with ``torch.fx`` on its
own, with its children as leaves. Its children become :class:`~.ir.Layer` values (a supported
torch layer with its constructor arguments read off the module, BatchNorm/InstanceNorm core
parameters included) or further blocks. Containers with integer-named children
(``nn.Sequential``, ``ModuleList``) are traced *through*: their children join the enclosing block
as ``features_0``, ``layer1_0``, ... -- the names :func:`jaxbn.porting.canonical_name` maps back to
``features.0`` / ``layer1.0``. Functions and ``Tensor`` methods are looked up in the op table
(:data:`.ops.OPS`). Anything not translated raises :class:`UnsupportedError` naming the module
path and type, or the operation -- never a silent wrong model.

torch is imported inside the functions: importing this module does not import torch.
"""

from __future__ import annotations

import builtins
import copy
import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..porting.errors import UnsupportedError
from ..porting.settings import settings_of
from . import ops
from .ir import NO_DEFAULT, Block, Layer, Op, Ref, Slice, join_path, refs

__all__ = ["capture", "capture_mode_independent", "check_materialized", "flax_name", "torch_type_name"]


def torch_type_name(module: Any) -> str:
    """``torch.nn.LSTM`` for torch's own modules, else ``package.module.Class``."""
    cls = type(module)
    if cls.__module__.startswith("torch.nn.modules"):
        return f"torch.nn.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _dtype(tensor: Any) -> np.dtype:
    return np.dtype(str(tensor.dtype).removeprefix("torch."))


def _first_dtype(*tensors: Any) -> np.dtype:
    return next((_dtype(t) for t in tensors if t is not None), np.dtype("float32"))


def _layer(module: Any, path: str) -> Layer:
    """The :class:`Layer` replacing one torch layer, or :class:`UnsupportedError`."""
    import torch.nn as tnn
    from torch.nn.modules.conv import _ConvNd

    where = dict(torch_path=path, torch_type=torch_type_name(module))
    norm = settings_of(module)
    if norm is not None:
        if norm.num_features is None:
            raise UnsupportedError(f"{path or 'the model'} ({where['torch_type']}) has not been "
                                   "materialized: run the torch model once on an input first")
        dtype = _first_dtype(module.weight, module.running_mean)
        kwargs = {**norm.linen_kwargs(), "axis": 1, "param_dtype": dtype}
        return Layer(norm.family.name, tuple(kwargs.items()), tuple(norm.call_kwargs().items()),
                     takes_train=True, is_norm=True, **where)
    simple = _SIMPLE_LAYERS.get(type(module).__name__) if type(module).__module__.startswith(
        "torch.nn.modules") else None
    if simple is not None:
        cls, attributes = simple
        return Layer(cls, tuple((a, _plain(getattr(module, a))) for a in attributes), **where)
    if isinstance(module, _ConvNd) and not module.transposed:
        kwargs = dict(in_channels=module.in_channels, out_channels=module.out_channels,
                      kernel_size=module.kernel_size, stride=module.stride,
                      padding=module.padding, dilation=module.dilation, groups=module.groups,
                      bias=module.bias is not None, padding_mode=module.padding_mode,
                      param_dtype=_dtype(module.weight))
        return Layer("Conv", tuple((k, _plain(v)) for k, v in kwargs.items()), **where)
    if isinstance(module, tnn.Linear) and not isinstance(module, tnn.modules.lazy.LazyModuleMixin):
        kwargs = dict(in_features=module.in_features, out_features=module.out_features,
                      bias=module.bias is not None, param_dtype=_dtype(module.weight))
        return Layer("Linear", tuple(kwargs.items()), **where)
    pool = _pool_layer(module)
    if pool is not None:
        return dataclasses.replace(pool, **where)
    if type(module) is tnn.Dropout:
        return Layer("Dropout", (("p", float(module.p)),), takes_train=True, **where)
    if type(module).__name__ == "StochasticDepth" and type(module).__module__.startswith("torchvision"):
        return Layer("StochasticDepth", (("p", float(module.p)), ("mode", module.mode)),
                     takes_train=True, **where)
    raise UnsupportedError(f"{path or 'the model'} ({where['torch_type']}) is not supported")


_SIMPLE_LAYERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "ReLU": ("ReLU", ()), "ReLU6": ("ReLU6", ()), "Hardswish": ("Hardswish", ()),
    "Hardsigmoid": ("Hardsigmoid", ()), "SiLU": ("SiLU", ()), "Sigmoid": ("Sigmoid", ()),
    "Tanh": ("Tanh", ()), "Identity": ("Identity", ()), "GELU": ("GELU", ("approximate",)),
    "LeakyReLU": ("LeakyReLU", ("negative_slope",)), "Softmax": ("Softmax", ("dim",)),
    "Flatten": ("Flatten", ("start_dim", "end_dim")),
}
"""torch.nn layers without parameters whose linen twin takes the same attributes."""


def _pool_layer(module: Any) -> Layer | None:
    name = type(module).__name__
    if not type(module).__module__.startswith("torch.nn.modules") or name[-2:] not in ("1d", "2d", "3d"):
        return None
    stem, spatial = name[:-2], int(name[-2])
    if getattr(module, "return_indices", False):
        raise UnsupportedError("return_indices=True")
    fields = {
        "MaxPool": ("kernel_size", "stride", "padding", "dilation", "ceil_mode"),
        "AvgPool": ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
        "AdaptiveAvgPool": ("output_size",),
        "AdaptiveMaxPool": ("output_size",),
    }.get(stem)
    if fields is None:
        return None
    kwargs = [("spatial", spatial)] + [(f, _plain(getattr(module, f, None))) for f in fields]
    if stem == "AvgPool" and spatial == 1:  # AvgPool1d has no divisor_override
        kwargs = [(k, v) for k, v in kwargs if k != "divisor_override"]
    return Layer(stem, tuple(kwargs))


def _plain(value: Any) -> Any:
    """Hashable plain Python: lists -> tuples."""
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return value


def _is_torch_layer(module: Any) -> bool:
    """A torch (or torchvision.ops) layer: translated as a whole, never traced into."""
    import torch.nn as tnn

    if isinstance(module, (tnn.Sequential, tnn.ModuleList, tnn.ModuleDict)):
        return False
    cls = type(module)
    return cls.__module__.startswith("torch.nn") or (
        cls.__module__.startswith("torchvision.ops") and cls.__name__ == "StochasticDepth")


def _is_block(module: Any) -> bool:
    """A module translated as its own block: its children are named attributes (not
    ``Sequential``'s ``0, 1, ...``, which are traced through into the enclosing block)."""
    return not _is_torch_layer(module) and not any(name.isdigit() for name, _ in module.named_children())


def flax_name(relative_path: str) -> str:
    """A submodule's Flax name in its block: integer segments join the previous one with
    ``_`` (``downsample.0`` -> ``downsample_0``), the inverse of
    :func:`jaxbn.porting.canonical_name`."""
    parts: list[str] = []
    for part in relative_path.split("."):
        if part.isdigit() and parts:
            parts[-1] = f"{parts[-1]}_{part}"
        else:
            parts.append(part)
    return ".".join(parts)


_ASSERTS = ("_assert_is_none", "_assert")  # fx's guards for specialized (concrete) arguments


def _convert_arg(value: Any, where: str) -> Any:
    """fx argument -> IR argument (hashable)."""
    import torch
    import torch.fx as fx

    if isinstance(value, fx.Node):
        return Ref(value.name)
    if isinstance(value, (list, tuple)):
        return tuple(_convert_arg(v, where) for v in value)
    if isinstance(value, slice):
        return Slice(*(_convert_arg(v, where) for v in (value.start, value.stop, value.step)))
    if isinstance(value, Mapping):
        raise UnsupportedError(f"{where}: dict arguments are not supported")
    if isinstance(value, (torch.Tensor, torch.dtype, torch.device)):
        raise UnsupportedError(f"{where}: a constant {type(value).__name__} argument is not supported")
    return value


def _function_op(node: Any, table: Mapping[Any, str], where: str) -> Op | None:
    """A ``call_function`` node as an :class:`Op` (``None`` for fx's own guards)."""
    target = node.target
    name = getattr(target, "__name__", str(target))
    if name in _ASSERTS:
        return None
    if name in ("dropout", "stochastic_depth"):  # training flag baked in at trace time
        p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
        if p != 0:
            raise UnsupportedError(
                f"{where}: functional {name} with p={p} (its training flag is fixed when traced) "
                "is not supported: use the module (torch.nn.Dropout / torchvision StochasticDepth)")
        return Op(node.name, "function", "identity", (_convert_arg(node.args[0], where),))
    if target not in table:
        raise UnsupportedError(f"{where}: the operation {getattr(target, '__module__', '') or ''}"
                               f".{name} is not supported".replace(" .", " "))
    if table[target] == "getattr" and node.args[1] not in ("shape", "ndim"):
        raise UnsupportedError(f"{where}: attribute .{node.args[1]} of a tensor is not supported")
    return _op(node, "function", table[target], where)


def _op(node: Any, kind: str, target: str, where: str) -> Op:
    """An fx node as an :class:`Op` of ``kind`` calling ``target`` with the node's arguments."""
    return Op(node.name, kind, target, _convert_arg(node.args, where),
              tuple((k, _convert_arg(v, where)) for k, v in node.kwargs.items()))


class _Tracer:
    """``torch.fx`` tracing of one block, its children as leaves."""

    def __init__(self, root: Any):
        import torch.fx as fx

        class Tracer(fx.Tracer):
            def is_leaf_module(self, m: Any, qualname: str) -> bool:
                return m is not root and (_is_torch_layer(m) or _is_block(m))

        self.tracer = Tracer()

    def trace(self, root: Any, concrete_args: dict[str, Any] | None) -> Any:
        return self.tracer.trace(root, concrete_args=concrete_args)


def _concrete_args(module: Any, node: Any) -> dict[str, Any]:
    """A child block's arguments fixed at its call site: constants passed and defaults left."""
    import torch.fx as fx

    signature = inspect.signature(module.forward)
    bound = signature.bind_partial(*node.args, **node.kwargs).arguments
    fixed = {}
    for name, parameter in signature.parameters.items():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if name in bound:
            leaves = fx.node.map_aggregate(bound[name], lambda v: v)
            if not _contains_node(leaves):
                fixed[name] = bound[name]
        elif parameter.default is not NO_DEFAULT:
            fixed[name] = parameter.default
    return fixed


def _contains_node(value: Any) -> bool:
    import torch.fx as fx

    if isinstance(value, fx.Node):
        return True
    if isinstance(value, (list, tuple)):
        return builtins.any(_contains_node(v) for v in value)
    if isinstance(value, Mapping):
        return builtins.any(_contains_node(v) for v in value.values())
    return False


def capture(module: Any, path: str = "", concrete_args: dict[str, Any] | None = None) -> Block:
    """Trace ``module`` (a torch module) into a :class:`Block`, its children recursively.

    Raises:
      UnsupportedError: a module or operation that is not translated, named by path and type.
    """
    try:
        graph = _Tracer(module).trace(module, concrete_args)
    except UnsupportedError:
        raise
    except Exception as error:  # data-dependent control flow and the like
        raise UnsupportedError(
            f"{path or 'the model'} ({torch_type_name(module)}) cannot be traced with torch.fx: "
            f"{type(error).__name__}: {error}") from error
    table, methods = ops.torch_callables(), ops.tensor_methods()
    inputs, body, output = [], [], None
    children: dict[str, Layer | Block] = {}
    for node in graph.nodes:
        where = f"{path or 'the model'} ({torch_type_name(module)})"
        if node.op == "placeholder":
            default = node.args[0] if node.args else NO_DEFAULT
            inputs.append((node.name, _convert_arg(default, where) if default is not NO_DEFAULT else default))
        elif node.op == "get_attr":
            raise UnsupportedError(
                f"{join_path(path, node.target)}: a parameter or buffer used directly in "
                f"{torch_type_name(module)}.forward is not supported (only inside layers)")
        elif node.op == "call_module":
            name = flax_name(node.target)
            sub = module.get_submodule(node.target)
            if "." in name:
                raise UnsupportedError(
                    f"{join_path(path, node.target)} ({torch_type_name(sub)}) is reached through a "
                    "container that is never called (ModuleDict by key): not supported")
            if name not in children:
                full = join_path(path, node.target)
                children[name] = (capture(sub, full, _concrete_args(sub, node))
                                  if _is_block(sub) else _layer_or_raise(sub, full))
            body.append(_op(node, "module", name, where))
        elif node.op == "call_function":
            op = _function_op(node, table, where)
            if op is not None:
                body.append(op)
        elif node.op == "call_method":
            if node.target not in methods:
                raise UnsupportedError(f"{where}: the tensor method .{node.target}() is not supported")
            body.append(_op(node, "function", methods[node.target], where))
        elif node.op == "output":
            output = _convert_arg(node.args[0], where)
    return Block(torch_type_name(module), path, tuple(inputs), _live(tuple(body), output), output,
                 tuple(children.items()))


def _layer_or_raise(module: Any, path: str) -> Layer:
    try:
        return _layer(module, path)
    except UnsupportedError as error:
        if str(error) == "return_indices=True":
            raise UnsupportedError(f"{path} ({torch_type_name(module)}) with return_indices=True "
                                   "is not supported") from None
        raise


def _live(ops: tuple[Op, ...], output: Any) -> tuple[Op, ...]:
    """Drop function results nobody uses (fx's guard comparisons); module calls always stay
    (they own variables)."""
    needed = refs(output)
    kept = []
    for op in reversed(ops):
        if op.kind == "module" or op.out in needed:
            kept.append(op)
            needed |= refs(op.args) | refs(tuple(v for _, v in op.kwargs))
    return tuple(reversed(kept))


def check_materialized(torch_module: Any) -> None:
    """Refuse a lazy module that has not run yet (its shapes are unknown)."""
    from torch.nn.modules.lazy import LazyModuleMixin

    for name, sub in torch_module.named_modules():
        if isinstance(sub, LazyModuleMixin) and sub.has_uninitialized_params():
            raise UnsupportedError(f"{name or 'the model'} ({torch_type_name(sub)}) has not been "
                                   "materialized: run the torch model once on an input first")


def capture_mode_independent(torch_module: Any) -> Block:
    """:func:`capture` of the module in train mode and in eval mode (on copies), refusing a
    forward whose Python code branches on ``self.training``: ``torch.fx`` would fix the branch
    taken when traced, while the Flax module's mode is ``train`` at call time."""
    trained = capture(copy.deepcopy(torch_module).train())
    evaluated = capture(copy.deepcopy(torch_module).eval())
    if trained != evaluated:
        path, torch_type = _first_difference(trained, evaluated)
        raise UnsupportedError(
            f"{path or 'the model'} ({torch_type}): its forward runs different operations in "
            "train and eval mode (Python code reading self.training, fixed when torch.fx traces "
            "it): not supported")
    return trained


def _first_difference(a: Block, b: Block) -> tuple[str, str]:
    """The innermost block whose own operations differ between two captures."""
    if a.ops == b.ops and a.output == b.output and [n for n, _ in a.children] == [n for n, _ in b.children]:
        for (_, x), (_, y) in zip(a.children, b.children):
            if x != y and isinstance(x, Block) and isinstance(y, Block):
                return _first_difference(x, y)
    return a.torch_path, a.torch_type
