"""The one table of operations: for each, the torch callables it replaces, how it runs in JAX
and how it is written as source.

An :class:`~.ir.Op` of kind ``'function'`` names an entry of :data:`OPS`. Capture
(:mod:`.tracing`) finds the entry from the torch callable or ``Tensor`` method, the linen module
(:mod:`.module`) calls its ``run`` and the emitter (:mod:`.emit`) its ``write`` -- so an
operation is added in one place. Most entries are a :mod:`.torch_ops` function, written
``F.<name>(...)``; Python operators are written infix.
"""

from __future__ import annotations

import builtins
import dataclasses
import functools
import importlib
import operator
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as flax_linen
import numpy as np

from . import torch_ops
from .ir import Slice

__all__ = ["OPS", "OpRule", "Source", "arguments_source", "index_source", "tensor_methods", "torch_callables"]

Source = Callable[[Any], str]
"""An IR argument (constant or :class:`~.ir.Ref`) -> its source text (the emitter's)."""

Writer = Callable[[tuple, tuple, Source], str]
"""``(args, kwargs, source) -> expression``: an operation as source."""


@dataclasses.dataclass(frozen=True)
class OpRule:
    """One operation.

    Attributes:
      name: the name :class:`~.ir.Op` uses (``relu``, ``operator.add``, ``getattr``).
      run: the JAX version, called with the op's arguments.
      write: the op as a source expression.
      torch: what it replaces: ``module.function`` paths (``torch.add``, ``operator.iadd``,
        ``torch.nn.functional.relu``) and ``Tensor.<method>``.
      view: in torch, the result may share memory with a tensor argument (a view of it, or the
        argument itself: ``view``, ``transpose``, indexing, ``contiguous``, ``to`` its own dtype);
        False where it is always a new tensor.
    """

    name: str
    run: Callable[..., Any]
    write: Writer
    torch: tuple[str, ...] = ()
    view: bool = False


def arguments_source(args: tuple, kwargs: tuple, source: Source) -> str:
    """A call's arguments as source: ``x, 1, dim=2``."""
    return ", ".join([source(a) for a in args] + [f"{k}={source(v)}" for k, v in kwargs])


def _call(name: str) -> Writer:
    """``F.<name>(args, key=value)``: a :mod:`.torch_ops` function in the emitted file."""
    return lambda args, kwargs, source: f"F.{name}({arguments_source(args, kwargs, source)})"


def _flax_call(name: str) -> Writer:
    """``nn.<name>(args, key=value)``: a ``flax.linen`` function in the emitted file."""
    return lambda args, kwargs, source: f"nn.{name}({arguments_source(args, kwargs, source)})"


def _infix(symbol: str) -> Writer:
    def write(args: tuple, kwargs: tuple, source: Source) -> str:
        left = source(args[0])
        if symbol == "**" and left.startswith("-"):  # -2 ** x is -(2 ** x)
            left = f"({left})"
        return f"{left} {symbol} {source(args[1])}"

    return write


def index_source(value: Any, source: Source) -> str:
    """An index as source: ``x[:, 0]`` (slices as ``a:b:c``, ``...``)."""
    if isinstance(value, Slice):
        parts = ["" if v is None else source(v) for v in (value.start, value.stop, value.step)]
        return ":".join(parts[:2]) + (f":{parts[2]}" if parts[2] else "")
    if value is Ellipsis:
        return "..."
    if isinstance(value, tuple):
        return ", ".join(index_source(v, source) for v in value) if value else "()"
    return source(value)


_OPERATORS = {"add": "+", "sub": "-", "mul": "*", "truediv": "/", "floordiv": "//", "mod": "%",
              "pow": "**", "matmul": "@", "eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">",
              "ge": ">="}
_IN_PLACE = {n: (f"operator.i{n}",) for n in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow")}
"""``x += y`` runs as ``x + y``: capture (:mod:`.tracing`) rebinds later reads of ``x`` to the
result, as for every in-place variant below (``relu_``, ``add_``, ...)."""

_FUNCTIONS: dict[str, tuple[str, ...]] = {
    # torch_ops function: what it replaces ("torch." / "F." / "Tensor." spelled out)
    "relu": ("torch.relu", "torch.nn.functional.relu", "Tensor.relu", "torch.relu_", "Tensor.relu_"),
    "relu6": ("torch.nn.functional.relu6",),
    "hardswish": ("torch.nn.functional.hardswish",),
    "hardsigmoid": ("torch.nn.functional.hardsigmoid",),
    "silu": ("torch.nn.functional.silu",),
    "sigmoid": ("torch.sigmoid", "torch.nn.functional.sigmoid", "Tensor.sigmoid", "torch.sigmoid_",
                "Tensor.sigmoid_"),
    "tanh": ("torch.tanh", "torch.nn.functional.tanh", "Tensor.tanh", "torch.tanh_", "Tensor.tanh_"),
    "gelu": ("torch.nn.functional.gelu",),
    "hardtanh": ("torch.nn.functional.hardtanh", "torch.nn.functional.hardtanh_"),
    "elu": ("torch.nn.functional.elu", "torch.nn.functional.elu_"),
    "softplus": ("torch.nn.functional.softplus",),
    "mish": ("torch.nn.functional.mish",),
    "leaky_relu": ("torch.nn.functional.leaky_relu", "torch.nn.functional.leaky_relu_"),
    "prelu": ("torch.nn.functional.prelu", "torch.prelu"),
    "softmax": ("torch.softmax", "torch.nn.functional.softmax", "Tensor.softmax"),
    "add": ("torch.add", "Tensor.add", "Tensor.add_"),
    "sub": ("torch.sub", "torch.subtract", "Tensor.sub", "Tensor.sub_", "Tensor.subtract"),
    "mul": ("torch.mul", "Tensor.mul", "Tensor.mul_"),
    "div": ("torch.div", "torch.divide", "Tensor.div", "Tensor.div_", "Tensor.divide"),
    "pow": ("torch.pow", "Tensor.pow", "Tensor.pow_"),
    **{name: (f"torch.{name}", f"Tensor.{name}", f"torch.{name}_", f"Tensor.{name}_")
       for name in ("neg", "abs", "sqrt", "rsqrt", "exp", "log")},
    "clamp": ("torch.clamp", "torch.clip", "Tensor.clamp", "Tensor.clip", "torch.clamp_", "torch.clip_",
              "Tensor.clamp_", "Tensor.clip_"),
    "to": ("Tensor.to",),
    "type_as": ("Tensor.type_as",),
    "cat": ("torch.cat", "torch.concat"),
    "stack": ("torch.stack",),
    "matmul": ("torch.matmul", "Tensor.matmul"),
    "bmm": ("torch.bmm", "Tensor.bmm"),
    "einsum": ("torch.einsum",),
    "scaled_dot_product_attention": ("torch.nn.functional.scaled_dot_product_attention",),
    "flatten": ("torch.flatten", "Tensor.flatten"),
    "mean": ("torch.mean", "Tensor.mean"),
    "sum": ("torch.sum", "Tensor.sum"),
    "amax": ("torch.amax", "Tensor.amax"),
    "amin": ("torch.amin", "Tensor.amin"),
    "var": ("torch.var", "Tensor.var"),
    "std": ("torch.std", "Tensor.std"),
    "transpose": ("torch.transpose", "Tensor.transpose"),
    "permute": ("torch.permute", "Tensor.permute"),
    "reshape": ("torch.reshape", "Tensor.reshape"),
    "view": ("Tensor.view",),
    "reshape_as": ("Tensor.reshape_as", "Tensor.view_as"),
    "repeat": ("Tensor.repeat",),
    "chunk": ("torch.chunk", "Tensor.chunk"),
    "split": ("torch.split", "Tensor.split"),
    "unbind": ("torch.unbind", "Tensor.unbind"),
    "expand": ("Tensor.expand",),
    "expand_as": ("Tensor.expand_as",),
    "squeeze": ("torch.squeeze", "Tensor.squeeze"),
    "unsqueeze": ("torch.unsqueeze", "Tensor.unsqueeze"),
    "size": ("Tensor.size",),
    "dim": ("Tensor.dim",),
    "contiguous": ("Tensor.contiguous",),
    "interpolate": ("torch.nn.functional.interpolate",),
    "pad": ("torch.nn.functional.pad",),
    "layer_norm": ("torch.nn.functional.layer_norm", "torch.layer_norm"),
    "group_norm": ("torch.nn.functional.group_norm", "torch.group_norm"),
    "batch_norm": ("torch.nn.functional.batch_norm",),
    "normalize": ("torch.nn.functional.normalize",),
    # torch's weight layout (out, in / groups, *kernel) / (out, in); torch.conv2d is F.conv2d
    **{f"conv{n}d": (f"torch.nn.functional.conv{n}d", f"torch.conv{n}d") for n in (1, 2, 3)},
    "linear_torch_layout": ("torch.nn.functional.linear",),
    **{f"{stem}{n}d": (f"torch.nn.functional.{stem}{n}d",)
       for stem in ("max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool") for n in (1, 2, 3)},
}

_VIEWS = frozenset({
    "transpose", "permute", "reshape", "view", "reshape_as", "flatten", "chunk", "split", "unbind",
    "expand", "expand_as", "squeeze", "unsqueeze", "contiguous", "size", "dim", "einsum", "to", "type_as"})
""":data:`_FUNCTIONS` whose result may share memory with an argument (``einsum``: a permutation
is a view; ``to``: its own dtype is the tensor itself)."""

_CONVERSIONS = {"float": "float32", "double": "float64", "half": "float16"}
"""``Tensor.float()`` and the like: :func:`.torch_ops.to` with the dtype written in."""


def _conversion(name: str, dtype: str) -> OpRule:
    """``Tensor.<name>()`` as ``F.to(x, dtype=jnp.<dtype>)``; the tensor itself when it has that
    dtype already (a view)."""
    fixed = (("dtype", np.dtype(dtype)),)
    return OpRule(name, functools.partial(torch_ops.to, dtype=fixed[0][1]),
                  lambda a, k, source: f"F.to({arguments_source(a, fixed + tuple(k), source)})",
                  (f"Tensor.{name}",), view=True)


def _table() -> dict[str, OpRule]:
    rules = [OpRule(f"operator.{n}", getattr(operator, n), _infix(symbol),
                    (f"operator.{n}",) + _IN_PLACE.get(n, ()))
             for n, symbol in _OPERATORS.items()]
    rules += [
        OpRule("operator.neg", operator.neg, lambda a, k, source: f"-{source(a[0])}", ("operator.neg",)),
        OpRule("operator.getitem", operator.getitem,
               lambda a, k, source: f"{source(a[0])}[{index_source(a[1], source)}]", ("operator.getitem",),
               view=True),
        # only .shape and .ndim (capture refuses other attributes): written as the attribute
        OpRule("getattr", builtins.getattr, lambda a, k, source: f"{source(a[0])}.{a[1]}", ("builtins.getattr",),
               view=True),
        # functional dropout with p=0 and the like: the argument itself
        OpRule("identity", torch_ops.identity, lambda a, k, source: source(a[0]), view=True),
        # a specialization on the example's shapes (.concrete): checked, no value
        OpRule("guard", torch_ops.guard, _call("guard"), ("jaxbn.translate.concrete.guard",)),
        # the channels-last rewrite (.layout): layout changes and Flax's own pools on NHWC
        OpRule("to_channels_first", torch_ops.to_channels_first, _call("to_channels_first"), view=True),
        OpRule("to_channels_last", torch_ops.to_channels_last, _call("to_channels_last"), view=True),
        OpRule("nn.max_pool", flax_linen.max_pool, _flax_call("max_pool")),
        OpRule("nn.avg_pool", flax_linen.avg_pool, _flax_call("avg_pool")),
    ]
    rules += [OpRule(f"math.{n}", getattr(torch_ops, f"math_{n}"), _call(f"math_{n}"), (f"math.{n}",))
              for n in torch_ops.MATH_FUNCTIONS]
    rules += [OpRule(name, getattr(torch_ops, name), _call(name), torch, view=name in _VIEWS)
              for name, torch in _FUNCTIONS.items()]
    rules += [_conversion(name, dtype) for name, dtype in _CONVERSIONS.items()]
    return {rule.name: rule for rule in rules}


OPS: Mapping[str, OpRule] = _table()
"""Every operation the translator runs and writes, by name."""


def torch_callables() -> dict[Any, str]:
    """torch callables (functions, ``operator.*``, ``getattr``) -> the name of their op
    (imports torch)."""
    table = {}
    for rule in OPS.values():
        for path in rule.torch:
            module, _, attribute = path.rpartition(".")
            if module != "Tensor":
                table[getattr(importlib.import_module(module), attribute)] = rule.name
    return table


def tensor_methods() -> dict[str, str]:
    """``Tensor`` method names -> the name of their op (which takes the tensor first)."""
    return {path.removeprefix("Tensor."): rule.name for rule in OPS.values()
            for path in rule.torch if path.startswith("Tensor.")}

