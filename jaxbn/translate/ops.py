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
import importlib
import operator
from collections.abc import Callable, Mapping
from typing import Any

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
    """

    name: str
    run: Callable[..., Any]
    write: Writer
    torch: tuple[str, ...] = ()


def arguments_source(args: tuple, kwargs: tuple, source: Source) -> str:
    """A call's arguments as source: ``x, 1, dim=2``."""
    return ", ".join([source(a) for a in args] + [f"{k}={source(v)}" for k, v in kwargs])


def _call(name: str) -> Writer:
    """``F.<name>(args, key=value)``: a :mod:`.torch_ops` function in the emitted file."""
    return lambda args, kwargs, source: f"F.{name}({arguments_source(args, kwargs, source)})"


def _infix(symbol: str) -> Writer:
    return lambda args, kwargs, source: f"{source(args[0])} {symbol} {source(args[1])}"


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


_OPERATORS = {"add": "+", "sub": "-", "mul": "*", "truediv": "/", "floordiv": "//", "eq": "==",
              "matmul": "@"}
_IN_PLACE = {"add": ("operator.iadd",), "sub": ("operator.isub",), "mul": ("operator.imul",),
             "truediv": ("operator.itruediv",), "floordiv": ("operator.ifloordiv",)}
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
    "leaky_relu": ("torch.nn.functional.leaky_relu", "torch.nn.functional.leaky_relu_"),
    "prelu": ("torch.nn.functional.prelu", "torch.prelu"),
    "softmax": ("torch.softmax", "torch.nn.functional.softmax", "Tensor.softmax"),
    "add": ("torch.add", "Tensor.add", "Tensor.add_"),
    "mul": ("torch.mul", "Tensor.mul", "Tensor.mul_"),
    "cat": ("torch.cat", "torch.concat"),
    "matmul": ("torch.matmul", "Tensor.matmul"),
    "bmm": ("torch.bmm", "Tensor.bmm"),
    "einsum": ("torch.einsum",),
    "flatten": ("torch.flatten", "Tensor.flatten"),
    "mean": ("torch.mean", "Tensor.mean"),
    "sum": ("torch.sum", "Tensor.sum"),
    "transpose": ("torch.transpose", "Tensor.transpose"),
    "permute": ("torch.permute", "Tensor.permute"),
    "reshape": ("torch.reshape", "Tensor.reshape"),
    "view": ("Tensor.view",),
    "chunk": ("torch.chunk", "Tensor.chunk"),
    "split": ("torch.split", "Tensor.split"),
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
    **{f"{stem}{n}d": (f"torch.nn.functional.{stem}{n}d",)
       for stem in ("max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool") for n in (1, 2, 3)},
}


def _table() -> dict[str, OpRule]:
    rules = [OpRule(f"operator.{n}", getattr(operator, n), _infix(symbol),
                    (f"operator.{n}",) + _IN_PLACE.get(n, ()))
             for n, symbol in _OPERATORS.items()]
    rules += [
        OpRule("operator.neg", operator.neg, lambda a, k, source: f"-{source(a[0])}", ("operator.neg",)),
        OpRule("operator.getitem", operator.getitem,
               lambda a, k, source: f"{source(a[0])}[{index_source(a[1], source)}]", ("operator.getitem",)),
        # only .shape and .ndim (capture refuses other attributes): written as the attribute
        OpRule("getattr", builtins.getattr, lambda a, k, source: f"{source(a[0])}.{a[1]}", ("builtins.getattr",)),
        # functional dropout with p=0 and the like: the argument itself
        OpRule("identity", torch_ops.identity, lambda a, k, source: source(a[0])),
    ]
    rules += [OpRule(name, getattr(torch_ops, name), _call(name), torch) for name, torch in _FUNCTIONS.items()]
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

