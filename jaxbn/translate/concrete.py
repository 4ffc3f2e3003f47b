"""``torch.fx`` tracing with the example input's values beside the graph: :class:`ValueTracer`.

Every node the tracer records is also run, on the values of its arguments (the example input,
the module's own tensors), so Python that needs a value gets it -- as ``torch.export`` does:

- A value computed from shapes and constants only (*static*: ``x.shape[2] > 7``,
  ``math.ceil(h / 2)``, ``len(features)``) is specialized: Python receives the example's value and
  the graph records a ``guard`` node, so the translated model checks it when called (JAX shapes
  are static, so the check costs nothing at run time) and refuses other shapes instead of
  computing something else.
- A value read from tensor data (``if x.sum() > 0``, ``float(t)``) is *data-dependent* control
  flow: refused with :class:`~jaxbn.porting.errors.UnsupportedError`.
- A list or tuple is iterated and measured by its structure (``for f in features``).

``x += y`` is recorded as ``operator.iadd`` (fx's own ``Proxy`` has no ``__iadd__``, so Python
would run ``x = x + y`` and the change torch makes to ``x`` in place would be lost).

torch is imported inside the functions: importing this module does not import torch.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from ..porting.errors import UnsupportedError

__all__ = ["CONVERSIONS", "IN_PLACE_OPERATORS", "NORM_FUNCTIONS", "Unknown", "ValueTracer", "guard",
           "holds_tensor", "nodes_in", "value_of"]

VALUE = "jaxbn_value"
STATIC = "jaxbn_static"
COUNTER_FACTOR = "jaxbn_counter_factor"

CONVERSIONS: Mapping[str, Callable[[Any], Any]] = {
    "bool": bool, "int": int, "float": float, "index": operator.index, "len": len}
"""How Python turned a traced value into a plain one (the guard's ``conversion``)."""

IN_PLACE_OPERATORS = frozenset(getattr(operator, f"i{n}") for n in (
    "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor",
    "lshift", "rshift"))
"""``x += y`` and the like: in place on a tensor, a new value for a Python number."""

NORM_FUNCTIONS = ("batch_norm", "instance_norm")
"""``torch.nn.functional`` functions that normalize with a module's buffers."""

_SHAPE_METHODS = frozenset({"size", "dim", "numel", "nelement"})
_SHAPE_ATTRIBUTES = frozenset({"shape", "ndim"})


@dataclasses.dataclass(frozen=True)
class Unknown:
    """A value the tracer could not compute (no example value, or running it failed): why."""

    reason: str


def guard(value: Any, conversion: str, expected: Any) -> None:
    """The graph's record of a specialization (torch side: nothing to check, the value was the
    example's). The translated model runs :func:`jaxbn.translate.torch_ops.guard` instead."""


def holds_tensor(value: Any) -> bool:
    """A tensor, or a list / tuple / dict with one inside."""
    import torch

    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (list, tuple)):
        return any(holds_tensor(v) for v in value)
    if isinstance(value, Mapping):
        return any(holds_tensor(v) for v in value.values())
    return False


def value_of(argument: Any) -> Any:
    """An fx argument with every node replaced by its value (an :class:`Unknown` if any is)."""
    import torch.fx as fx

    unknown: list[Unknown] = []

    def one(node: Any) -> Any:
        value = node.meta.get(VALUE, Unknown(f"{node.name} has no value"))
        if isinstance(value, Unknown):
            unknown.append(value)
        return value

    result = _mutable(fx.node.map_arg(argument, one))
    return unknown[0] if unknown else result


def _mutable(value: Any) -> Any:
    """fx's immutable lists and dicts (node arguments) as the plain ones the forward received."""
    if isinstance(value, list):
        return [_mutable(v) for v in value]
    if isinstance(value, dict):
        return {k: _mutable(v) for k, v in value.items()}
    if type(value) is tuple:
        return tuple(_mutable(v) for v in value)
    return value


def nodes_in(argument: Any) -> list[Any]:
    """The fx nodes inside an argument (possibly nested)."""
    import torch.fx as fx

    found: list[Any] = []
    fx.node.map_arg(argument, found.append)
    return found


class ValueTracer:
    """A ``torch.fx.Tracer`` for one module (the root) whose nodes carry their example values.

    Args:
      root: the module traced.
      is_leaf: which submodules are called, not traced into.
      inputs: placeholder target -> its value (missing ones are :class:`Unknown`).
      where: the module, for messages.
      free_reads: ``get_attr`` targets whose ``float()`` / ``int()`` is read without a guard
        (a BatchNorm's ``num_batches_tracked`` in torch's cumulative average: the translated
        norm keeps its own count).
    """

    def __init__(self, root: Any, is_leaf: Callable[[Any], bool], inputs: Mapping[str, Any],
                 where: str, free_reads: frozenset[str] = frozenset()):
        import torch.fx as fx

        outer = self
        self.root, self.inputs, self.where, self.free_reads = root, inputs, where, free_reads
        self.evaluating = False
        proxy_class = _value_proxy_class()

        class Tracer(fx.Tracer):
            proxy_buffer_attributes = True  # a buffer read is a node (fx's default runs it eagerly)

            def is_leaf_module(self, m: Any, qualname: str) -> bool:
                return m is not root and is_leaf(m)

            def proxy(self, node: Any) -> Any:
                return proxy_class(node, self)

            def create_node(self, *args: Any, **kwargs: Any) -> Any:
                node = super().create_node(*args, **kwargs)
                outer._evaluate(node)
                return node

            def to_bool(self, obj: Any) -> bool:
                return outer.concretize(obj, "bool")

            def iter(self, obj: Any) -> Iterator:
                return outer.iterate(obj)

            def outer_concretize(self, obj: Any, conversion: str) -> Any:
                return outer.concretize(obj, conversion)

            # while a node runs on values, fx's patched module calls and attributes run plainly
            def call_module(self, m: Any, forward: Any, args: Any, kwargs: Any) -> Any:
                if outer.evaluating:
                    return forward(*args, **kwargs)
                return super().call_module(m, forward, args, kwargs)

            def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: Any) -> Any:
                if outer.evaluating:
                    return attr_val
                return super().getattr(attr, attr_val, parameter_proxy_cache)

        self.tracer = Tracer()

    def trace(self, concrete_args: dict[str, Any] | None) -> Any:
        return self.tracer.trace(self.root, concrete_args=concrete_args)

    # ---------------------------------------------------------------- values

    def _evaluate(self, node: Any) -> None:
        import torch

        if node.op == "output":
            return
        if node.op == "placeholder":
            value = self.inputs.get(node.target, Unknown(f"no example value for {node.target!r}"))
            node.meta[VALUE] = value
            node.meta[STATIC] = not isinstance(value, Unknown) and not holds_tensor(value)
            return
        if node.op == "get_attr":
            self.evaluating = True
            try:
                node.meta[VALUE] = operator.attrgetter(node.target)(self.root)
            finally:
                self.evaluating = False
            node.meta[STATIC] = False
            return
        args, kwargs = value_of(node.args), value_of(node.kwargs)
        unknown = next((v for v in (args, kwargs) if isinstance(v, Unknown)), None)
        if unknown is not None:
            node.meta[VALUE], node.meta[STATIC] = unknown, False
            return
        self.evaluating = True
        try:
            with torch.no_grad():
                if node.op == "call_module":
                    value = self.root.get_submodule(node.target)(*args, **kwargs)
                elif node.op == "call_method":
                    value = getattr(args[0], node.target)(*args[1:], **kwargs)
                else:
                    value = node.target(*args, **kwargs)
        except Exception as error:  # e.g. BatchNorm in train mode on one sample: needed later?
            value = Unknown(f"{type(error).__name__}: {error}")
        finally:
            self.evaluating = False
        node.meta[VALUE] = value
        node.meta[STATIC] = not isinstance(value, Unknown) and self._static(node, value)
        if getattr(node.target, "__name__", None) in NORM_FUNCTIONS:
            counter = self.root._buffers.get("num_batches_tracked")  # fx patches getattr
            if isinstance(counter, torch.Tensor) and float(counter) > 0:
                node.meta[COUNTER_FACTOR] = 1.0 / float(counter)

    @staticmethod
    def _static(node: Any, value: Any) -> bool:
        """The value follows from shapes and constants alone (never from tensor data)."""
        if holds_tensor(value):
            return False
        if node.op == "call_method" and node.target in _SHAPE_METHODS:
            return True
        if node.op == "call_function" and node.target is getattr and node.args[1] in _SHAPE_ATTRIBUTES:
            return True
        arguments = nodes_in((node.args, node.kwargs))
        return node.op == "call_function" and all(n.meta.get(STATIC, False) for n in arguments)

    # ---------------------------------------------------------------- Python asks for a value

    def concretize(self, proxy: Any, conversion: str) -> Any:
        """``bool(proxy)``, ``int``, ``float``, ``operator.index`` or ``len``: the example's value,
        guarded; refused for a value read from tensor data."""
        import torch

        node = proxy.node
        value = node.meta.get(VALUE, Unknown("not computed"))
        convert = CONVERSIONS[conversion]
        if isinstance(value, Unknown):
            raise UnsupportedError(
                f"{self.where}: its forward needs the value of {node.name!r} in Python "
                f"({conversion}), which could not be computed on the example input "
                f"({value.reason})")
        if conversion == "len" and isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
            return len(value)  # a structure: as fixed in the translated model as here
        if node.op == "get_attr" and node.target in self.free_reads and conversion in ("int", "float"):
            return convert(value)
        measured = conversion == "len" and isinstance(value, torch.Tensor)  # its first dimension
        if not node.meta.get(STATIC, False) and not measured:
            raise UnsupportedError(
                f"{self.where}: its forward reads tensor data in Python ({conversion} of "
                f"{node.name!r}): data-dependent control flow is not supported")
        result = convert(value)
        self.tracer.create_proxy("call_function", guard, (proxy, conversion, result), {})
        return result

    def iterate(self, proxy: Any) -> Iterator:
        """``for item in proxy``: a list or tuple by its structure, a tensor by its guarded first
        dimension."""
        import torch

        value = proxy.node.meta.get(VALUE)
        if isinstance(value, (list, tuple)):
            count = len(value) if not isinstance(value, torch.Size) else self.concretize(proxy, "len")
        elif isinstance(value, torch.Tensor):
            count = self.concretize(proxy, "len")
        else:
            raise UnsupportedError(
                f"{self.where}: its forward iterates over {proxy.node.name!r}, whose value is "
                f"{'unknown' if value is None else type(value).__name__}: not supported")
        return iter([proxy[i] for i in range(count)])


@functools.cache
def _value_proxy_class() -> type:
    """``torch.fx.Proxy`` recording in-place operators (``__iadd__``, ...) as such and asking
    :meth:`ValueTracer.concretize` for ``len``, ``int``, ``float`` and ``index``; attributes
    (``x.shape``) are proxies of the same kind."""
    import torch.fx as fx

    def recorder(function: Any) -> Any:
        def method(self: Any, other: Any) -> Any:
            return self.tracer.create_proxy("call_function", function, (self, other), {})

        method.__name__ = f"__{function.__name__}__"
        return method

    def asker(conversion: str) -> Any:
        def method(self: Any) -> Any:
            return self.tracer.outer_concretize(self, conversion)

        method.__name__ = f"__{conversion}__"
        return method

    methods: dict[str, Any] = {f"__{f.__name__}__": recorder(f) for f in IN_PLACE_OPERATORS}
    methods.update({f"__{c}__": asker(c) for c in ("len", "int", "float", "index")})
    methods["__getattr__"] = lambda self, k: attribute(self, k)
    proxy = type("ValueProxy", (fx.Proxy,), methods)
    attribute = type("ValueAttribute", (fx.proxy.Attribute, proxy), {})
    return proxy

