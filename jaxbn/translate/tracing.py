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

What torch runs, not only what it computes: a module whose mode differs from the model's keeps it
(:func:`fixed_modes`); an in-place operation is rebound, so later reads see its result, or
refused where memory it changes is shared (:mod:`.aliasing`); a child block is traced with the
constants of its call, and refused when another call's constants change its forward.

torch is imported inside the functions: importing this module does not import torch.
"""

from __future__ import annotations

import builtins
import copy
import dataclasses
import functools
import inspect
import operator
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..porting.errors import UnsupportedError
from ..porting.settings import settings_of
from . import ops
from .aliasing import Aliasing
from .ir import NO_DEFAULT, Block, Layer, Op, Ref, Slice, join_path, refs, same_capture

__all__ = ["capture", "capture_mode_independent", "check_materialized", "fixed_modes", "flax_name",
           "torch_type_name"]


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
    if isinstance(module, _ConvNd) and module.transposed and not isinstance(
            module, tnn.modules.lazy.LazyModuleMixin):
        kwargs = dict(in_channels=module.in_channels, out_channels=module.out_channels,
                      kernel_size=module.kernel_size, stride=module.stride, padding=module.padding,
                      output_padding=module.output_padding, groups=module.groups,
                      bias=module.bias is not None, dilation=module.dilation,
                      param_dtype=_dtype(module.weight))
        return Layer("ConvTranspose", tuple((k, _plain(v)) for k, v in kwargs.items()), **where)
    if isinstance(module, tnn.Linear) and not isinstance(module, tnn.modules.lazy.LazyModuleMixin):
        kwargs = dict(in_features=module.in_features, out_features=module.out_features,
                      bias=module.bias is not None, param_dtype=_dtype(module.weight))
        return Layer("Linear", tuple(kwargs.items()), **where)
    pool = _pool_layer(module)
    if pool is not None:
        return dataclasses.replace(pool, **where)
    if type(module) is tnn.Dropout:
        return Layer("Dropout", (("p", float(module.p)),), takes_train=True, **where)
    if type(module) in (tnn.Dropout1d, tnn.Dropout2d, tnn.Dropout3d):
        return Layer("FeatureDropout", (("p", float(module.p)), ("spatial", int(type(module).__name__[-2]))),
                     takes_train=True, **where)
    if type(module) is tnn.LayerNorm:
        kwargs = dict(normalized_shape=tuple(module.normalized_shape), eps=float(module.eps),
                      elementwise_affine=module.elementwise_affine, bias=module.bias is not None,
                      param_dtype=_first_dtype(module.weight, module.bias))
        return Layer("LayerNorm", tuple(kwargs.items()), **where)
    if type(module) is tnn.GroupNorm:
        kwargs = dict(num_groups=module.num_groups, num_channels=module.num_channels,
                      eps=float(module.eps), affine=module.affine,
                      param_dtype=_first_dtype(module.weight, module.bias))
        return Layer("GroupNorm", tuple(kwargs.items()), **where)
    pad_mode = _PAD_LAYERS.get(type(module).__name__[:-2]) if type(module).__module__.startswith(
        "torch.nn.modules") else None
    if pad_mode is not None:
        return Layer("Pad", (("padding", _plain(module.padding)), ("mode", pad_mode),
                             ("value", float(getattr(module, "value", 0.0)))), **where)
    if type(module) is tnn.PReLU:
        return Layer("PReLU", (("num_parameters", module.num_parameters), ("init", float(module.init)),
                               ("param_dtype", _dtype(module.weight))), **where)
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
    **{name: ("Upsample", ("size", "scale_factor", "mode", "align_corners", "recompute_scale_factor"))
       for name in ("Upsample", "UpsamplingNearest2d", "UpsamplingBilinear2d")},
}
"""torch.nn layers without parameters whose linen twin takes the same attributes."""


_PAD_LAYERS = {"ZeroPad": "constant", "ConstantPad": "constant", "ReflectionPad": "reflect",
               "ReplicationPad": "replicate", "CircularPad": "circular"}
"""torch.nn padding layers (``ZeroPad2d``, ...) by name without ``{1,2,3}d``: their ``F.pad`` mode."""


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

_IN_PLACE_OPERATORS = frozenset(getattr(operator, f"i{n}") for n in (
    "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor",
    "lshift", "rshift"))
"""``x += y`` and the like: in place on a tensor, a new value for a Python number."""

_FRESH_OPS = frozenset({
    "operator.add", "operator.sub", "operator.mul", "operator.truediv", "operator.floordiv",
    "operator.eq", "operator.neg", "relu", "relu6", "hardswish", "hardsigmoid", "silu", "sigmoid",
    "tanh", "gelu", "leaky_relu", "softmax", "add", "mul", "cat", "mean", "sum",
    *(f"{stem}{n}d" for stem in ("max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool")
      for n in (1, 2, 3)),
})
"""Ops of :data:`.ops.OPS` whose result is always a new tensor; any other op's result may share
memory with its tensor arguments (a view: ``view``, ``transpose``, indexing, ``chunk``, ...)."""

_FRESH_LAYERS = frozenset({
    "Conv", "Linear", "MaxPool", "AvgPool", "AdaptiveAvgPool", "AdaptiveMaxPool", "ReLU", "ReLU6",
    "Hardswish", "Hardsigmoid", "SiLU", "Sigmoid", "Tanh", "GELU", "LeakyReLU", "Softmax"})
"""Layers whose output is always a new tensor (norms too); others may return their input itself
or a view of it (``Identity``, ``Dropout`` in eval, ``Flatten``)."""

_SCALAR_OPS = frozenset({"size", "dim", "getattr"})
"""Ops whose result is a Python number or shape (never changed in place)."""


def _numpy_dtype(dtype: Any, where: str) -> np.dtype:
    """``torch.float32`` -> ``np.dtype('float32')`` (``bfloat16`` from ml_dtypes, as JAX's)."""
    name = str(dtype).removeprefix("torch.")
    try:
        return np.dtype(name)
    except TypeError:
        import ml_dtypes

        if not hasattr(ml_dtypes, name):
            raise UnsupportedError(f"{where}: the dtype {dtype} is not supported") from None
        return np.dtype(getattr(ml_dtypes, name))


def _convert_arg(value: Any, where: str) -> Any:
    """fx argument -> IR argument (hashable); a ``torch.dtype`` becomes a NumPy dtype."""
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
    if isinstance(value, torch.dtype):
        return _numpy_dtype(value, where)
    if isinstance(value, (torch.Tensor, torch.device)):
        raise UnsupportedError(f"{where}: a constant {type(value).__name__} argument is not supported")
    return value


def _rebound(value: Any, resolve: Any) -> Any:
    """An IR argument with every :class:`Ref` replaced by ``resolve(name)``'s."""
    if isinstance(value, Ref):
        return Ref(resolve(value.name))
    if isinstance(value, tuple):
        return tuple(_rebound(v, resolve) for v in value)
    if isinstance(value, Slice):
        return Slice(*(_rebound(v, resolve) for v in (value.start, value.stop, value.step)))
    return value


def _callable_name(target: Any) -> str:
    """``torch.nn.functional.relu``, ``operator.iadd``, ``torch.relu_``: for messages."""
    module = getattr(target, "__module__", None) or ""
    module = {"_operator": "operator", "torch._C._nn": "torch.nn.functional"}.get(module, module)
    return f"{module}.{getattr(target, '__name__', target)}".lstrip(".")


def _in_place_name(name: str) -> bool:
    """torch's naming of in-place variants: ``add_``, ``relu_`` (not ``__add__``)."""
    return name.endswith("_") and not name.startswith("_")


def _inplace_flag(target: Any, args: tuple, kwargs: Mapping[str, Any]) -> bool:
    """The ``inplace=`` argument of a functional call (``F.relu(x, inplace=True)``)."""
    if "inplace" in kwargs:
        return bool(kwargs["inplace"])
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # a builtin: torch's C functions have no inplace argument
        return False
    if "inplace" not in signature.parameters:
        return False
    try:
        return bool(signature.bind_partial(*args, **kwargs).arguments.get("inplace", False))
    except TypeError:
        return False


def _functional_dropout(node: Any, name: str) -> tuple[Any, Any]:
    """``p`` and ``training`` of ``F.dropout(input, p=0.5, training=True, inplace=False)`` /
    ``stochastic_depth(input, p, mode, training=True)``."""
    training_position = 2 if name == "dropout" else 3
    p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
    training = node.kwargs.get("training", node.args[training_position]
                               if len(node.args) > training_position else True)
    return p, training


class _Tracer:
    """``torch.fx`` tracing of one block, its children as leaves; ``x += y`` is recorded as
    ``operator.iadd`` (fx's own ``Proxy`` has no ``__iadd__``, so Python runs ``x = x + y`` and
    the change torch makes to ``x`` in place would be lost)."""

    def __init__(self, root: Any):
        import torch.fx as fx

        proxy_class = _in_place_proxy_class()

        class Tracer(fx.Tracer):
            def is_leaf_module(self, m: Any, qualname: str) -> bool:
                return m is not root and (_is_torch_layer(m) or _is_block(m))

            def proxy(self, node: Any) -> Any:
                return proxy_class(node, self)

        self.tracer = Tracer()

    def trace(self, root: Any, concrete_args: dict[str, Any] | None) -> Any:
        return self.tracer.trace(root, concrete_args=concrete_args)


@functools.cache
def _in_place_proxy_class() -> type:
    """``torch.fx.Proxy`` with the in-place operators (``__iadd__``, ...) recorded as such."""
    import torch.fx as fx

    def recorder(function: Any) -> Any:
        def method(self: Any, other: Any) -> Any:
            return self.tracer.create_proxy("call_function", function, (self, other), {})

        method.__name__ = f"__{function.__name__}__"
        return method

    methods = {f"__{f.__name__}__": recorder(f) for f in _IN_PLACE_OPERATORS}
    return type("InPlaceProxy", (fx.Proxy,), methods)


def _has_var_parameters(signature: inspect.Signature) -> bool:
    return any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in signature.parameters.values())


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


def _call_arguments(module: Any, node: Any, concrete: Mapping[str, Any]) -> dict[str, Any] | None:
    """A child block's call as the arguments its captured forward takes: the ones not fixed at
    the call site, by name in ``forward``'s order (``None``: ``*args`` / ``**kwargs``, passed as
    written)."""
    signature = inspect.signature(module.forward)
    if _has_var_parameters(signature):
        return None
    bound = signature.bind_partial(*node.args, **node.kwargs).arguments
    return {name: bound[name] for name in signature.parameters if name not in concrete}


def _same_constants(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Two call sites' constants are the same values of the same types."""
    return a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)


def _same_value(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # values without a plain truth value: treated as different
        return False


def _show(constants: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in constants.items()) or "none"


def _contains_node(value: Any) -> bool:
    import torch.fx as fx

    if isinstance(value, fx.Node):
        return True
    if isinstance(value, (list, tuple)):
        return builtins.any(_contains_node(v) for v in value)
    if isinstance(value, Mapping):
        return builtins.any(_contains_node(v) for v in value.values())
    return False


@dataclasses.dataclass(frozen=True)
class _Captured:
    """A captured block and what its forward does to its caller's tensors.

    Attributes:
      block: the IR.
      mutated_inputs: input name -> what changes it (or memory it shares) in place.
      returned_inputs: the inputs whose memory the output may share (returned as is or a view).
    """

    block: Block
    mutated_inputs: Mapping[str, str]
    returned_inputs: frozenset[str]


def fixed_modes(torch_module: Any) -> dict[str, bool]:
    """The modules whose mode differs from the root's, ``{torch path: training}``: they keep it
    whatever ``train=`` the Flax module is called with (``model.train(); bn.eval()``)."""
    root = torch_module.training
    return {path: sub.training for path, sub in torch_module.named_modules(remove_duplicate=False)
            if sub.training != root}


def capture(module: Any, path: str = "", concrete_args: dict[str, Any] | None = None, *,
            modes: Mapping[str, bool] | None = None) -> Block:
    """Trace ``module`` (a torch module) into a :class:`Block`, its children recursively.

    Args:
      module: the torch module.
      path: its torch path (``''`` for the model).
      concrete_args: arguments fixed at its call site (``torch.fx``'s ``concrete_args``).
      modes: ``{torch path: training}`` of the modules whose mode is fixed (their norm, dropout
        and stochastic-depth layers are called with that mode); default :func:`fixed_modes`.

    Raises:
      UnsupportedError: a module or operation that is not translated, named by path and type.
    """
    modes = fixed_modes(module) if modes is None else modes
    return _BlockCapture(module, path, concrete_args, modes, frozenset()).run().block


class _BlockCapture:
    """One block's capture: its ``torch.fx`` nodes, in order, into :class:`Op` values.

    In-place operations are rebound (:mod:`.aliasing`): later reads of the changed value read
    the operation's result, and changes to memory another value shares are refused.
    """

    def __init__(self, module: Any, path: str, concrete_args: Mapping[str, Any] | None,
                 modes: Mapping[str, bool], scalar_inputs: frozenset[str]):
        self.module, self.path, self.modes = module, path, modes
        self.concrete = dict(concrete_args or {})
        self.scalar_inputs = scalar_inputs
        self.where = f"{path or 'the model'} ({torch_type_name(module)})"
        signature = inspect.signature(module.forward)
        # fx names a constant's placeholders {name}_1, ...; the others keep the parameter's name
        self.drops_constants = bool(self.concrete) and not _has_var_parameters(signature)
        self.parameters = [n for n in signature.parameters if n not in self.concrete]
        self.table, self.methods = ops.torch_callables(), ops.tensor_methods()
        self.inputs: list[tuple[str, Any]] = []
        self.body: list[Op] = []
        self.children: dict[str, Layer | Block] = {}
        self.calls: dict[str, tuple[dict[str, Any], _Captured]] = {}
        self.scalars: set[str] = set()
        self.aliasing = Aliasing({})

    def run(self) -> _Captured:
        graph = self._trace()
        nodes = list(graph.nodes)
        position = {node: i for i, node in enumerate(nodes)}
        self.aliasing = Aliasing({n.name: max(position[u] for u in n.users) for n in nodes if n.users})
        output = None
        for i, node in enumerate(nodes):
            if node.op == "output":
                output = self._arg(node.args[0])
            elif node.op == "get_attr":
                raise UnsupportedError(
                    f"{join_path(self.path, node.target)}: a parameter or buffer used directly in "
                    f"{torch_type_name(self.module)}.forward is not supported (only inside layers)")
            else:
                getattr(self, f"_{node.op}")(node, i)
        block = Block(torch_type_name(self.module), self.path, tuple(self.inputs),
                      _live(tuple(self.body), output), output, tuple(self.children.items()))
        return _Captured(block, dict(self.aliasing.mutated_inputs),
                         frozenset(self.aliasing.inputs_shared_by(refs(output))))

    def _trace(self) -> Any:
        try:
            return _Tracer(self.module).trace(self.module, self.concrete or None)
        except UnsupportedError:
            raise
        except Exception as error:  # data-dependent control flow and the like
            raise UnsupportedError(f"{self.where} cannot be traced with torch.fx: "
                                   f"{type(error).__name__}: {error}") from error

    def _arg(self, value: Any) -> Any:
        """An fx argument as an IR argument reading the current values (after in-place ops)."""
        return _rebound(_convert_arg(value, self.where), self.aliasing.resolve)

    def _kwargs(self, kwargs: Mapping[str, Any], drop: tuple[str, ...] = ()) -> tuple:
        return tuple((k, self._arg(v)) for k, v in kwargs.items() if k not in drop)

    # ---------------------------------------------------------------- node kinds

    def _placeholder(self, node: Any, i: int) -> None:
        if self.drops_constants and node.target not in self.parameters:
            return  # a constant fixed at the call site (fx's guards on it are dropped)
        default = node.args[0] if node.args else NO_DEFAULT
        if default is not NO_DEFAULT:
            default = _convert_arg(default, self.where)
        self.inputs.append((node.name, default))
        if node.target in self.scalar_inputs:
            self.scalars.add(node.name)
        else:
            self.aliasing.new(node.name, i, is_input=True)

    def _call_module(self, node: Any, i: int) -> None:
        name = flax_name(node.target)
        sub = self.module.get_submodule(node.target)
        full = join_path(self.path, node.target)
        if "." in name:
            raise UnsupportedError(
                f"{full} ({torch_type_name(sub)}) is reached through a container that is never "
                "called (ModuleDict by key): not supported")
        if _is_block(sub):
            self._block_call(node, i, sub, name, full)
            return
        if name not in self.children:
            self.children[name] = self._layer(sub, full)
        op = Op(node.name, "module", name, self._arg(node.args), self._kwargs(node.kwargs))
        self.body.append(op)
        if getattr(sub, "inplace", False) is True and op.args and isinstance(op.args[0], Ref):
            what = f"{full} ({torch_type_name(sub)}, inplace=True)"
            self._in_place(op, i, what, what)
        else:
            layer = self.children[name]
            fresh = layer.is_norm or layer.cls in _FRESH_LAYERS
            self.aliasing.new(node.name, i, () if fresh else refs(op.args))

    def _layer(self, sub: Any, full: str) -> Layer:
        """The child layer; a fixed mode (:func:`fixed_modes`) becomes a constant ``train``."""
        layer = _layer_or_raise(sub, full)
        mode = self.modes.get(full)
        if mode is None or not layer.takes_train:
            return layer
        return dataclasses.replace(layer, takes_train=False,
                                   call_kwargs=layer.call_kwargs + (("train", mode),))

    def _block_call(self, node: Any, i: int, sub: Any, name: str, full: str) -> None:
        """A call of a child block: captured with this call's constants (the same forward at
        every call, else refused), its in-place changes to its inputs checked here."""
        import torch.fx as fx

        concrete = _concrete_args(sub, node)
        call = _call_arguments(sub, node, concrete)
        previous = self.calls.get(name)
        if previous is not None and _same_constants(previous[0], concrete):
            captured = previous[1]
        else:
            scalar = frozenset(n for n, v in (call or {}).items()
                               if isinstance(v, fx.Node) and v.name in self.scalars)
            captured = _BlockCapture(sub, full, concrete, self.modes, scalar).run()
            if previous is None:
                self.calls[name] = (concrete, captured)
                self.children[name] = captured.block
            elif not same_capture(captured.block, previous[1].block):
                raise UnsupportedError(
                    f"{full} ({torch_type_name(sub)}): called with different constant arguments "
                    f"({_show(previous[0])}; then {_show(concrete)}), which change what its forward "
                    "runs: not supported")
        if call is None:
            op = Op(node.name, "module", name, self._arg(node.args), self._kwargs(node.kwargs))
        else:
            op = Op(node.name, "module", name, self._arg(tuple(call.values())))
        self.body.append(op)
        by_input = (dict(zip([n for n, _ in captured.block.inputs], op.args)) if call is not None
                    else {})
        for input_name, culprit in captured.mutated_inputs.items():
            for target in sorted(refs(by_input.get(input_name, op.args))):
                if self.aliasing.changed_by_call(target, i, culprit) is not None:
                    raise UnsupportedError(
                        f"{self.where}: {full} ({torch_type_name(sub)}) modifies its input "
                        f"{input_name!r} in place ({culprit}) and {self.path or 'the model'} reads "
                        "that tensor afterwards: not supported")
        shared = set().union(*(refs(by_input.get(n, op.args)) for n in captured.returned_inputs))
        self.aliasing.new(node.name, i, shared)

    def _call_function(self, node: Any, i: int) -> None:
        import torch.fx as fx

        target = node.target
        name = getattr(target, "__name__", str(target))
        if name in _ASSERTS:
            return
        if name in ("dropout", "stochastic_depth"):  # the training flag is fixed when traced
            p, training = _functional_dropout(node, name)
            if p != 0 and training is not False:
                raise UnsupportedError(
                    f"{self.where}: functional {name} with p={p} (its training flag is fixed when "
                    "traced) is not supported: use the module (torch.nn.Dropout / torchvision "
                    "StochasticDepth)")
            op = Op(node.name, "function", "identity", (self._arg(node.args[0]),))
            self._add(i, op, _inplace_flag(target, node.args, node.kwargs), _callable_name(target))
            return
        if target not in self.table:
            raise UnsupportedError(f"{self.where}: the operation {_callable_name(target)} is not supported")
        if self.table[target] == "getattr" and node.args[1] not in ("shape", "ndim"):
            raise UnsupportedError(f"{self.where}: attribute .{node.args[1]} of a tensor is not supported")
        if target in _IN_PLACE_OPERATORS:  # on a tensor; a Python number is a new value
            in_place = isinstance(node.args[0], fx.Node) and node.args[0].name not in self.scalars
        else:
            in_place = _in_place_name(name) or _inplace_flag(target, node.args, node.kwargs)
        op = Op(node.name, "function", self.table[target], self._arg(node.args),
                self._kwargs(node.kwargs, drop=("inplace",) if in_place else ()))
        self._add(i, op, in_place, _callable_name(target))

    def _call_method(self, node: Any, i: int) -> None:
        if node.target not in self.methods:
            raise UnsupportedError(f"{self.where}: the tensor method .{node.target}() is not supported")
        op = Op(node.name, "function", self.methods[node.target], self._arg(node.args),
                self._kwargs(node.kwargs))
        self._add(i, op, _in_place_name(node.target), f"Tensor.{node.target}")

    # ---------------------------------------------------------------- values

    def _add(self, i: int, op: Op, in_place: bool, what: str) -> None:
        """Append a function op (``what``: the torch callable) and track its result: a Python
        number, a tensor (new, or sharing its arguments' memory), or its first argument changed
        in place."""
        self.body.append(op)
        if in_place and op.args and isinstance(op.args[0], Ref):
            self._in_place(op, i, what, f"{self.path or 'the model'}: {what}")
        elif op.target in _SCALAR_OPS or (
                op.target.startswith("operator.") and refs(op.args) <= self.scalars):
            self.scalars.add(op.out)
        else:
            arguments = refs(op.args) | refs(tuple(v for _, v in op.kwargs))
            self.aliasing.new(op.out, i, () if op.target in _FRESH_OPS else arguments - self.scalars)

    def _in_place(self, op: Op, i: int, what: str, culprit: str) -> None:
        """``op`` (``what``) changes its first argument in place: later reads read its result;
        ``culprit`` names it for a caller whose tensor it changes."""
        conflict = self.aliasing.in_place(op.args[0].name, op.out, i, culprit)
        if conflict is not None:
            raise UnsupportedError(
                f"{self.where}: {what} changes a tensor in place that shares "
                f"memory with {conflict!r} (a view of it, or a module returning its input), which "
                "is read afterwards: not supported")


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
    taken when traced, while the Flax module's mode is ``train`` at call time.

    The modules whose mode differs from the root's (:func:`fixed_modes`) keep it in both copies,
    as they keep it in the Flax module: ``model.train(train)`` for the root, then every such
    module set back to its own mode (the fine-tuning recipe ``model.train(); bn.eval()``).
    """
    modes = fixed_modes(torch_module)
    trained = capture(_in_mode(torch_module, True, modes), modes=modes)
    evaluated = capture(_in_mode(torch_module, False, modes), modes=modes)
    if not same_capture(trained, evaluated):
        path, torch_type = _first_difference(trained, evaluated)
        raise UnsupportedError(
            f"{path or 'the model'} ({torch_type}): its forward runs different operations in "
            "train and eval mode (Python code reading self.training, fixed when torch.fx traces "
            "it): not supported")
    return trained


def _in_mode(torch_module: Any, training: bool, modes: Mapping[str, bool]) -> Any:
    """A copy in ``training`` mode, except the modules in ``modes``, which keep theirs."""
    model = copy.deepcopy(torch_module).train(training)
    for path, mode in modes.items():
        model.get_submodule(path).training = mode
    return model


def _first_difference(a: Block, b: Block) -> tuple[str, str]:
    """The innermost block whose own operations differ between two captures."""
    if (same_capture((a.ops, a.output), (b.ops, b.output))
            and [n for n, _ in a.children] == [n for n, _ in b.children]):
        for (_, x), (_, y) in zip(a.children, b.children):
            if not same_capture(x, y) and isinstance(x, Block) and isinstance(y, Block):
                return _first_difference(x, y)
    return a.torch_path, a.torch_type
