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
import inspect
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..porting.errors import UnsupportedError
from ..porting.settings import settings_of
from . import ops
from .aliasing import Aliasing
from .concrete import (COUNTER_FACTOR, IN_PLACE_OPERATORS, NORM_FUNCTIONS, VALUE, Unknown,
                       ValueTracer, guard, holds_tensor, nodes_in, value_of)
from .ir import (NO_DEFAULT, Block, Dict, Layer, Op, Ref, Slice, Variable, fresh_name, join_path, refs,
                 same_capture)

__all__ = ["capture", "capture_mode_independent", "check_fixed_blocks_follow_modes", "check_materialized",
           "fixed_modes", "flax_name", "torch_type_name"]


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
    cls = torch_class(module)
    norm = settings_of(module)
    if norm is not None:
        if norm.num_features is None:
            raise UnsupportedError(f"{path or 'the model'} ({where['torch_type']}) has not been "
                                   "materialized: run the torch model once on an input first")
        dtype = _first_dtype(module.weight, module.running_mean)
        kwargs = {**norm.linen_kwargs(), "axis": 1, "param_dtype": dtype}
        return Layer(norm.family.name, tuple(kwargs.items()), tuple(norm.call_kwargs().items()),
                     takes_train=True, is_norm=True, **where)
    simple = _SIMPLE_LAYERS.get(cls.__name__) if cls.__module__.startswith("torch.nn.modules") else None
    if simple is not None:
        name, attributes = simple
        return Layer(name, tuple((a, _plain(getattr(module, a))) for a in attributes), **where)
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
    pool = _pool_layer(module, cls)
    if pool is not None:
        return dataclasses.replace(pool, **where)
    if cls is tnn.Dropout:
        return Layer("Dropout", (("p", float(module.p)),), takes_train=True, **where)
    if cls in (tnn.Dropout1d, tnn.Dropout2d, tnn.Dropout3d):
        return Layer("FeatureDropout", (("p", float(module.p)), ("spatial", int(cls.__name__[-2]))),
                     takes_train=True, **where)
    if cls is tnn.LayerNorm:
        kwargs = dict(normalized_shape=tuple(module.normalized_shape), eps=float(module.eps),
                      elementwise_affine=module.elementwise_affine, bias=module.bias is not None,
                      param_dtype=_first_dtype(module.weight, module.bias))
        return Layer("LayerNorm", tuple(kwargs.items()), **where)
    if cls is tnn.GroupNorm:
        kwargs = dict(num_groups=module.num_groups, num_channels=module.num_channels,
                      eps=float(module.eps), affine=module.affine,
                      param_dtype=_first_dtype(module.weight, module.bias))
        return Layer("GroupNorm", tuple(kwargs.items()), **where)
    pad_mode = _PAD_LAYERS.get(cls.__name__[:-2]) if cls.__module__.startswith("torch.nn.modules") else None
    if pad_mode is not None:
        return Layer("Pad", (("padding", _plain(module.padding)), ("mode", pad_mode),
                             ("value", float(getattr(module, "value", 0.0)))), **where)
    if cls is tnn.PReLU:
        return Layer("PReLU", (("num_parameters", module.num_parameters), ("init", float(module.init)),
                               ("param_dtype", _dtype(module.weight))), **where)
    if cls.__name__ == "StochasticDepth" and cls.__module__.startswith("torchvision"):
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


def _pool_layer(module: Any, cls: type) -> Layer | None:
    name = cls.__name__
    if not cls.__module__.startswith("torch.nn.modules") or name[-2:] not in ("1d", "2d", "3d"):
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


_FORWARDS = ("forward", "_conv_forward")
"""The methods whose code a torch layer's subclass must inherit to run as that layer."""


def torch_class(module: Any) -> type | None:
    """The torch layer class whose ``forward`` ``module`` runs: its own class for torch's layers
    (and torchvision's ``StochasticDepth``), the torch base for a subclass that only changes its
    construction (``class MyConv(nn.Conv2d)`` with its own ``__init__``); ``None`` for a class
    with its own ``forward`` (timm's ``BatchNormAct2d``, ``Conv2dSame``: traced as blocks)."""
    for cls in type(module).__mro__:
        if cls.__module__.startswith("torch.nn.modules") or (
                cls.__module__.startswith("torchvision.ops") and cls.__name__ == "StochasticDepth"):
            same = all(getattr(type(module), m, None) is getattr(cls, m, None) for m in _FORWARDS)
            return cls if same else None
    return None


def _is_torch_layer(module: Any) -> bool:
    """A torch (or torchvision.ops) layer: translated as a whole, never traced into."""
    import torch.nn as tnn

    if isinstance(module, (tnn.Sequential, tnn.ModuleList, tnn.ModuleDict)):
        return False
    return torch_class(module) is not None


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
        if not all(isinstance(k, (str, int)) for k in value):
            raise UnsupportedError(f"{where}: a dict with keys other than strings and ints is not supported")
        return Dict(tuple((k, _convert_arg(v, where)) for k, v in value.items()))
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
    if isinstance(value, Dict):
        return Dict(tuple((k, _rebound(v, resolve)) for k, v in value.items))
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
      structured: forward parameter -> the key paths of the tensors inside it, for a parameter
        given a list, tuple or dict (the block takes those tensors as separate inputs).
    """

    block: Block
    mutated_inputs: Mapping[str, str]
    returned_inputs: frozenset[str]
    structured: Mapping[str, tuple[tuple[Any, ...], ...]] = dataclasses.field(default_factory=dict)


def fixed_modes(torch_module: Any) -> dict[str, bool]:
    """The modules whose mode differs from the root's, ``{torch path: training}``: they keep it
    whatever ``train=`` the Flax module is called with (``model.train(); bn.eval()``)."""
    root = torch_module.training
    return {path: sub.training for path, sub in torch_module.named_modules(remove_duplicate=False)
            if sub.training != root}


def capture(module: Any, example_input: Any = None, path: str = "",
            concrete_args: dict[str, Any] | None = None, *,
            modes: Mapping[str, bool] | None = None) -> Block:
    """Trace ``module`` (a torch module) into a :class:`Block`, its children recursively.

    Args:
      module: the torch module (not modified: a copy runs the example).
      example_input: a tensor or a tuple of them, as ``module`` takes: Python that needs a value
        (shapes, lengths) gets the example's, guarded (:mod:`.concrete`); ``None``: no values,
        such Python is refused.
      path: its torch path (``''`` for the model).
      concrete_args: arguments fixed at its call site (``torch.fx``'s ``concrete_args``).
      modes: ``{torch path: training}`` of the modules whose mode is fixed (their norm, dropout
        and stochastic-depth layers are called with that mode); default :func:`fixed_modes`.

    Raises:
      UnsupportedError: a module or operation that is not translated, named by path and type.
    """
    modes = fixed_modes(module) if modes is None else modes
    values = None
    if example_input is not None:
        module = copy.deepcopy(module)
        examples = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
        values = _bind_values(module, tuple(_cloned(e) for e in examples), {})
    return _BlockCapture(module, path, concrete_args, modes, values).run().block


def _cloned(value: Any) -> Any:
    import torch

    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def _bind_values(module: Any, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any] | None:
    """``forward``'s parameters -> the values of a call (``None`` where it cannot bind)."""
    try:
        return dict(inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments)
    except TypeError:
        return None


_NORM_TENSORS = frozenset({"weight", "bias", "running_mean", "running_var", "num_batches_tracked"})
"""A BatchNorm's own tensors: in a subclass's ``forward`` only its norm call reads them."""


def _overrides_norm(module: Any) -> bool:
    """A BatchNorm / InstanceNorm subclass with its own ``forward`` (timm's ``BatchNormAct2d``):
    traced, its ``F.batch_norm`` call on its own tensors becomes the norm layer."""
    return settings_of(module) is not None and torch_class(module) is None


class _BlockCapture:
    """One block's capture: its ``torch.fx`` nodes, in order, into :class:`Op` values.

    In-place operations are rebound (:mod:`.aliasing`): later reads of the changed value read
    the operation's result, and changes to memory another value shares are refused.
    """

    def __init__(self, module: Any, path: str, concrete_args: Mapping[str, Any] | None,
                 modes: Mapping[str, bool], values: Mapping[str, Any] | None):
        self.module, self.path, self.modes = module, path, modes
        self.concrete = dict(concrete_args or {})
        self.values = values
        self.where = f"{path or 'the model'} ({torch_type_name(module)})"
        signature = inspect.signature(module.forward)
        self.var_parameters = _has_var_parameters(signature)
        self.parameters = [n for n in signature.parameters if n not in self.concrete]
        self.table, self.methods = ops.torch_callables(), ops.tensor_methods()
        self.inputs: list[tuple[str, Any]] = []
        self.body: list[Op] = []
        self.children: dict[str, Layer | Block] = {}
        self.variables: dict[str, Variable] = {}
        self.variable_nodes: set[str] = set()
        self.calls: dict[str, tuple[dict[str, Any], _Captured]] = {}
        self.scalars: set[str] = set()
        self.aliasing = Aliasing({})
        self.names: set[str] = set()
        self.is_norm = _overrides_norm(module)
        self.norm_reads: dict[str, str] = {}  # get_attr node -> the norm tensor it reads
        self.norm_called = False  # its norm call was found (:meth:`_norm_call`)
        self.placeholder_values, self.input_targets, self.structured, self.pytree_args = self._plan_inputs()

    def _plan_inputs(self) -> tuple[dict[str, Any], set[str], dict[str, tuple], dict[str, Any]]:
        """Placeholder target -> example value, the targets that are inputs (the others are
        constants fixed at the call site), the structured parameters' key paths and fx's
        ``concrete_args`` marking their tensors (``torch.fx.PH``)."""
        import torch
        import torch.fx as fx
        import torch.utils._pytree as pytree

        values = self.values if self.values is not None else {}
        placeholder_values, targets, structured, pytree_args = {}, set(), {}, {}
        for name in self.parameters:
            value = values.get(name, Unknown(f"no example value for {name!r}"))
            if self.var_parameters or not isinstance(value, (list, tuple, dict)) or isinstance(value, torch.Size):
                placeholder_values[name] = value
                targets.add(name)
                continue
            leaves = pytree.tree_flatten_with_path(value)[0]
            paths = []
            for k, (key_path, leaf) in enumerate(leaves, 1):
                if isinstance(leaf, torch.Tensor):
                    placeholder_values[f"{name}_{k}"] = leaf
                    targets.add(f"{name}_{k}")
                    paths.append(tuple(_key(key, self.where) for key in key_path))
            structured[name] = tuple(paths)
            spec = pytree.tree_structure(value)
            pytree_args[name] = pytree.tree_unflatten(
                [fx.PH if isinstance(leaf, torch.Tensor) else leaf for _, leaf in leaves], spec)
        return placeholder_values, targets, structured, pytree_args

    def run(self) -> _Captured:
        graph = self._trace()
        nodes = list(graph.nodes)
        self.names = {n.name for n in nodes}
        position = {node: i for i, node in enumerate(nodes)}
        self.aliasing = Aliasing({n.name: max(position[u] for u in n.users) for n in nodes if n.users})
        output = None
        for i, node in enumerate(nodes):
            if node.op == "output":
                self._refuse_norm_read(node)
                output = self._arg(_unflattened_output(graph, node.args[0]))
            else:
                getattr(self, f"_{node.op}")(node, i)
        if self.is_norm and not self.norm_called:
            raise UnsupportedError(
                f"{self.where}: a BatchNorm subclass whose forward does not call F.batch_norm on "
                "its own tensors as torch's BatchNorm does: not supported")
        block = Block(torch_type_name(self.module), self.path, tuple(self.inputs),
                      _live(tuple(self.body), output), output, tuple(self.children.items()),
                      tuple(self.variables.values()))
        return _Captured(block, dict(self.aliasing.mutated_inputs),
                         frozenset(self.aliasing.inputs_shared_by(refs(output))), self.structured)

    def _trace(self) -> Any:
        concrete = {**self.concrete, **self.pytree_args}
        free = frozenset({"num_batches_tracked"}) if self.is_norm else frozenset()
        tracer = ValueTracer(self.module, lambda m: _is_torch_layer(m) or _is_block(m),
                             self.placeholder_values, self.where, free)
        try:
            return tracer.trace(concrete or None)
        except UnsupportedError:
            raise
        except Exception as error:  # a Python construct fx cannot follow
            raise UnsupportedError(f"{self.where} cannot be traced with torch.fx: "
                                   f"{type(error).__name__}: {error}") from error

    def _arg(self, value: Any) -> Any:
        """An fx argument as an IR argument reading the current values (after in-place ops)."""
        return _rebound(_convert_arg(value, self.where), self.aliasing.resolve)

    def _kwargs(self, kwargs: Mapping[str, Any], drop: tuple[str, ...] = ()) -> tuple:
        return tuple((k, self._arg(v)) for k, v in kwargs.items() if k not in drop)

    def _fresh(self, base: str) -> str:
        return fresh_name(self.names, base)

    # ---------------------------------------------------------------- node kinds

    def _placeholder(self, node: Any, i: int) -> None:
        if node.target not in self.input_targets and not self.var_parameters:
            return  # a constant fixed at the call site (fx's guards on it are dropped)
        default = node.args[0] if node.args else NO_DEFAULT
        if default is not NO_DEFAULT:
            default = _convert_arg(default, self.where)
        self.inputs.append((node.name, default))
        value = node.meta.get(VALUE)
        if value is not None and not isinstance(value, Unknown) and not holds_tensor(value):
            self.scalars.add(node.name)
        else:
            self.aliasing.new(node.name, i, is_input=True)

    def _get_attr(self, node: Any, i: int) -> None:
        """A parameter or buffer the forward reads itself: a :class:`Variable` of the block
        (a norm subclass's own norm tensors: only for its norm call)."""
        import torch

        target = node.target
        if self.is_norm and target in _NORM_TENSORS:
            self.norm_reads[node.name] = target
            return
        full = join_path(self.path, target)
        if "." in target:
            raise UnsupportedError(
                f"{full}: a parameter or buffer of a submodule read directly in "
                f"{torch_type_name(self.module)}.forward is not supported (only its own)")
        tensor = node.meta.get(VALUE)  # as read (the forward may assign the attribute later)
        if target not in self.module._parameters and target not in self.module._buffers:
            raise UnsupportedError(
                f"{full}: a tensor constant in {torch_type_name(self.module)}.forward (neither a "
                "parameter nor a buffer) is not supported: register it as a buffer")
        if not isinstance(tensor, torch.Tensor):
            raise UnsupportedError(f"{full}: read in {torch_type_name(self.module)}.forward while "
                                   "it is not a tensor: not supported")
        collection = "params" if target in self.module._parameters else "batch_stats"
        self.variables[target] = Variable(target, collection, tuple(tensor.shape),
                                          _numpy_dtype(tensor.dtype, full))
        self.body.append(Op(node.name, "variable", target, ()))
        self.aliasing.new(node.name, i)
        self.variable_nodes.add(node.name)

    def _call_module(self, node: Any, i: int) -> None:
        self._refuse_norm_read(node)
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

    def _layer(self, sub: Any, full: str, **changes: Any) -> Layer:
        """The child layer; a fixed mode (:func:`fixed_modes`) becomes a constant ``train``."""
        layer = dataclasses.replace(_layer_or_raise(sub, full), **changes)
        mode = self.modes.get(full)
        if mode is None or not layer.takes_train:
            return layer
        return dataclasses.replace(layer, takes_train=False,
                                   call_kwargs=layer.call_kwargs + (("train", mode),))

    def _block_call(self, node: Any, i: int, sub: Any, name: str, full: str) -> None:
        """A call of a child block: captured with this call's constants and example values (the
        same forward at every call, else refused), its in-place changes to its inputs checked
        here; a list, tuple or dict argument is passed as the tensors inside it."""
        concrete = _concrete_args(sub, node)
        call = _call_arguments(sub, node, concrete)
        values = None if self.values is None else _bind_values(sub, value_of(node.args), value_of(node.kwargs))
        captured = _BlockCapture(sub, full, concrete, self.modes, values).run()
        previous = self.calls.get(name)
        if previous is None:
            self.calls[name] = (concrete, captured)
            self.children[name] = captured.block
        elif not same_capture(captured.block, previous[1].block):
            raise UnsupportedError(
                f"{full} ({torch_type_name(sub)}): called with different constant arguments or "
                f"input shapes ({_show(previous[0])}; then {_show(concrete)}), which change what "
                "its forward runs: not supported")
        if call is None:
            op = Op(node.name, "module", name, self._arg(node.args), self._kwargs(node.kwargs))
            by_input: dict[str, Any] = {}
        else:
            args = []
            for parameter, argument in call.items():
                paths = captured.structured.get(parameter)
                if paths is None:
                    args.append(self._arg(argument))
                else:
                    args += [self._leaf(argument, path, i) for path in paths]
            op = Op(node.name, "module", name, tuple(args))
            by_input = dict(zip([n for n, _ in captured.block.inputs], op.args))
        self.body.append(op)
        for input_name, culprit in captured.mutated_inputs.items():
            for target in sorted(refs(by_input.get(input_name, op.args))):
                if target in self.variable_nodes or self.aliasing.changed_by_call(target, i, culprit) is not None:
                    raise UnsupportedError(
                        f"{self.where}: {full} ({torch_type_name(sub)}) modifies its input "
                        f"{input_name!r} in place ({culprit}) and {self.path or 'the model'} reads "
                        "that tensor afterwards: not supported")
        shared = set().union(*(refs(by_input.get(n, op.args)) for n in captured.returned_inputs))
        self.aliasing.new(node.name, i, shared)

    def _leaf(self, argument: Any, path: tuple, i: int) -> Any:
        """The tensor at ``path`` (indices / keys) inside a structured call argument: taken from
        the Python structure, then from a value (a child's returned list) with ``getitem``."""
        import torch.fx as fx

        while path and not isinstance(argument, fx.Node):
            argument, path = argument[path[0]], path[1:]
        result = self._arg(argument)
        for key in path:
            out = self._fresh(f"{result.name}_item")
            self.body.append(Op(out, "function", "operator.getitem", (result, key)))
            self.aliasing.new(out, i, {result.name})
            result = Ref(out)
        return result

    def _call_function(self, node: Any, i: int) -> None:
        import torch.fx as fx

        target = node.target
        name = getattr(target, "__name__", str(target))
        if name in _ASSERTS:
            return
        if target is guard:
            self.body.append(Op(node.name, "function", "guard", self._arg(node.args)))
            return
        if name in _FUNCTIONAL_DROPOUTS:  # the training flag is fixed when traced
            p, training = _functional_dropout(node, name)
            if p != 0 and training is not False:
                raise UnsupportedError(
                    f"{self.where}: functional {name} with p={p} (its training flag is fixed when "
                    "traced) is not supported: use the module (torch.nn.Dropout / torchvision "
                    "StochasticDepth)")
            op = Op(node.name, "function", "identity", (self._arg(node.args[0]),))
            self._add(i, op, _inplace_flag(target, node.args, node.kwargs), _callable_name(target))
            return
        if self.is_norm and name in NORM_FUNCTIONS and self._is_own_norm_call(node):
            self._norm_call(node, i)
            return
        self._refuse_norm_read(node)
        if target not in self.table:
            raise UnsupportedError(f"{self.where}: the operation {_callable_name(target)} is not supported")
        if self.table[target] == "getattr" and node.args[1] not in ("shape", "ndim"):
            raise UnsupportedError(f"{self.where}: attribute .{node.args[1]} of a tensor is not supported")
        if target in IN_PLACE_OPERATORS:  # on a tensor; a Python number is a new value
            in_place = isinstance(node.args[0], fx.Node) and node.args[0].name not in self.scalars
        else:
            in_place = _in_place_name(name) or _inplace_flag(target, node.args, node.kwargs)
        op = Op(node.name, "function", self.table[target], self._arg(node.args),
                self._kwargs(node.kwargs, drop=("inplace",) if in_place else ()))
        self._add(i, op, in_place, _callable_name(target))

    def _call_method(self, node: Any, i: int) -> None:
        if self.is_norm and node.target == "add_" and self.norm_reads.get(
                getattr(node.args[0], "name", None)) == "num_batches_tracked":
            return  # torch's count of batches: the norm layer keeps it
        self._refuse_norm_read(node)
        if node.target not in self.methods:
            raise UnsupportedError(f"{self.where}: the tensor method .{node.target}() is not supported")
        op = Op(node.name, "function", self.methods[node.target], self._arg(node.args),
                self._kwargs(node.kwargs))
        self._add(i, op, _in_place_name(node.target), f"Tensor.{node.target}")

    # ---------------------------------------------------------------- a norm subclass

    def _is_own_norm_call(self, node: Any) -> bool:
        """``F.batch_norm`` on this module's own tensors with exactly the arguments torch's own
        ``forward`` passes in this mode (its ``training``, ``momentum``, ``eps``)."""
        return _norm_signature(node, self.norm_reads) == _reference_norm_signature(
            self.module, value_of(node.args[0]))

    def _norm_call(self, node: Any, i: int) -> None:
        """The module's norm: a :mod:`jaxbn.linen` layer sharing this block's variables."""
        name = next(n for n in ("norm", "norm_", "norm__", "batch_norm") if n not in self.module._modules)
        self.children[name] = self._layer(self.module, self.path, shares_scope=True)
        self.body.append(Op(node.name, "module", name, (self._arg(node.args[0]),)))
        self.aliasing.new(node.name, i)
        self.norm_called = True

    def _refuse_norm_read(self, node: Any) -> None:
        """A norm subclass's own norm tensors are read only by its norm call and torch's count
        (both handled before this check): any other node reading one is refused."""
        for arg in nodes_in((node.args, node.kwargs)):
            if arg.name in self.norm_reads:
                raise UnsupportedError(
                    f"{self.where}: its forward reads its BatchNorm tensor "
                    f"{self.norm_reads[arg.name]!r} outside torch's own norm call "
                    f"({_callable_name(node.target) if node.op == 'call_function' else node.target}): "
                    "not supported")

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
            self.aliasing.new(op.out, i, arguments - self.scalars if ops.OPS[op.target].view else ())

    def _in_place(self, op: Op, i: int, what: str, culprit: str) -> None:
        """``op`` (``what``) changes its first argument in place: later reads read its result;
        ``culprit`` names it for a caller whose tensor it changes."""
        target = op.args[0].name
        variable = next((v for v in self.aliasing.sharing(target) if v in self.variable_nodes), None)
        if variable is not None:
            raise UnsupportedError(
                f"{self.where}: {what} changes a parameter or buffer of "
                f"{self.path or 'the model'} in place: not supported")
        conflict = self.aliasing.in_place(target, op.out, i, culprit)
        if conflict is not None:
            raise UnsupportedError(
                f"{self.where}: {what} changes a tensor in place that shares "
                f"memory with {conflict!r} (a view of it, or a module returning its input), which "
                "is read afterwards: not supported")


def _unflattened_output(graph: Any, output: Any) -> Any:
    """The forward's output: fx flattens it (a list of nodes) when inputs were given as
    structures (``torch.fx.PH`` leaves); its recorded spec puts the structure back."""
    import torch.utils._pytree as pytree

    info = getattr(graph._codegen, "pytree_info", None)
    if info is None or info.out_spec is None:
        return output
    return pytree.tree_unflatten(list(output), info.out_spec)


_FUNCTIONAL_DROPOUTS = {"dropout": True, "dropout1d": True, "dropout2d": True, "dropout3d": True,
                        "alpha_dropout": False, "feature_alpha_dropout": False,
                        "stochastic_depth": True}
"""Functional dropouts (their ``training`` default): identities when ``p=0`` or not training."""


def _key(key: Any, where: str) -> Any:
    """A pytree key path entry -> the index or dict key it reads."""
    for attribute in ("idx", "key"):
        if hasattr(key, attribute):
            return getattr(key, attribute)
    raise UnsupportedError(f"{where}: an input structure with {type(key).__name__} entries is not supported")


_CUMULATIVE = "cumulative average"
"""A norm call's ``momentum`` that is torch's ``1 / num_batches_tracked`` (``momentum=None``)."""


def _norm_signature(node: Any, reads: Mapping[str, str]) -> tuple:
    """A norm function call's arguments but the input: the module's tensors by name, the
    cumulative-average factor as :data:`_CUMULATIVE`, other values as they are."""
    import torch.fx as fx

    signature = inspect.signature(node.target)
    bound = signature.bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    factor = node.meta.get(COUNTER_FACTOR)
    out = [node.target.__name__]
    for name, value in list(bound.arguments.items())[1:]:
        if isinstance(value, fx.Node):
            value = ("tensor", reads.get(value.name, value.name))
        elif name == "momentum" and factor is not None and value == factor:
            value = _CUMULATIVE
        out.append((name, value))
    return tuple(out)


def _reference_norm_signature(module: Any, example: Any) -> tuple | None:
    """What torch's own norm class (the first torch class in ``module``'s MRO) passes to its norm
    function in ``module``'s current state and mode: the spec a subclass's call must match."""
    import torch

    if not isinstance(example, torch.Tensor):
        return None
    base = next(c for c in type(module).__mro__ if c.__module__.startswith("torch.nn.modules"))
    shadow = copy.copy(module)  # shares the tensors
    shadow.__class__ = base
    shadow.num_batches_tracked = (None if module.num_batches_tracked is None
                                  else module.num_batches_tracked.clone())  # its count stays
    tracer = ValueTracer(shadow, lambda m: True, {"input": example},
                         f"{torch_type_name(module)}'s torch base {base.__name__}",
                         frozenset({"num_batches_tracked"}))
    graph = tracer.trace(None)
    reads = {n.name: n.target for n in graph.nodes if n.op == "get_attr"}
    calls = [n for n in graph.nodes if n.op == "call_function"
             and getattr(n.target, "__name__", None) in NORM_FUNCTIONS]
    return _norm_signature(calls[0], reads) if len(calls) == 1 else None


def _layer_or_raise(module: Any, path: str) -> Layer:
    try:
        return _layer(module, path)
    except UnsupportedError as error:
        if str(error) == "return_indices=True":
            raise UnsupportedError(f"{path} ({torch_type_name(module)}) with return_indices=True "
                                   "is not supported") from None
        raise


def _live(ops: tuple[Op, ...], output: Any) -> tuple[Op, ...]:
    """Drop function results nobody uses (fx's asserts on constants); module calls (they own
    variables) and guards always stay."""
    needed = refs(output)
    kept = []
    for op in reversed(ops):
        if op.kind == "module" or op.target == "guard" or op.out in needed:
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


def capture_mode_independent(torch_module: Any, example_input: Any = None) -> Block:
    """:func:`capture` of the module in train mode and in eval mode (on copies), refusing a
    forward whose Python code branches on ``self.training``: ``torch.fx`` would fix the branch
    taken when traced, while the Flax module's mode is ``train`` at call time.

    The modules whose mode differs from the root's (:func:`fixed_modes`) keep it in both copies,
    as they keep it in the Flax module: ``model.train(train)`` for the root, then every such
    module set back to its own mode (the fine-tuning recipe ``model.train(); bn.eval()``).
    """
    modes = fixed_modes(torch_module)
    trained = capture(_in_mode(torch_module, True, modes), example_input, modes=modes)
    evaluated = capture(_in_mode(torch_module, False, modes), example_input, modes=modes)
    if not same_capture(trained, evaluated):
        path, torch_type = _first_difference(trained, evaluated)
        raise UnsupportedError(
            f"{path or 'the model'} ({torch_type}): its forward runs different operations in "
            "train and eval mode (Python code reading self.training, fixed when torch.fx traces "
            "it): not supported")
    return trained


def check_fixed_blocks_follow_modes(torch_module: Any, example_input: Any, captured: Block) -> None:
    """Refuse a module with its own ``forward`` (not a norm) whose mode differed from the model's
    when translated and whose ``forward`` reads ``self.training``: :func:`capture_mode_independent`
    kept its mode fixed, which a model whose modules hold their modes (NNX: ``model.train()``
    sets every module) cannot follow. Each such block's own flag is flipped (its children keep
    theirs) and the model captured again: the same capture, or :class:`UnsupportedError`."""
    paths = [path for path in fixed_modes(torch_module)
             if _is_block(sub := torch_module.get_submodule(path)) and settings_of(sub) is None]
    if not paths:
        return
    flipped = copy.deepcopy(torch_module)
    for path in paths:
        sub = flipped.get_submodule(path)
        sub.training = not sub.training
    try:  # in the model's mode now: a forward reading self.training is refused there
        same = same_capture(capture_mode_independent(flipped, example_input), captured)
    except UnsupportedError:
        same = False
    if not same:
        raise UnsupportedError(
            f"{', '.join(paths)}: in another mode than the model when translated, and a forward there "
            "reads self.training, which stays as traced while model.train() / model.eval() change "
            "every NNX module's mode; translate with those modules in the model's mode, or use "
            "api='linen' (modes fixed when translated stay fixed)")


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
