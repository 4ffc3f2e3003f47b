"""A captured torch module (:class:`~.ir.Block`) as readable Flax source code: :func:`emit_source`.

The file defines ``Model``, a ``flax.linen.Module`` with ``__call__(self, x, train=False)``,
that imports no torch: one Flax class per distinct torch module class (``BasicBlock``,
``Bottleneck``, ...; a second captured structure of the same class is ``BasicBlock2``), its
submodules as fields under torch's attribute names, its forward spelled out with
:mod:`jaxbn.translate.torch_ops` (``F``) -- each function call written by its entry of the op
table (:data:`.ops.OPS`), the one :class:`~.module.TracedModule` runs -- and every BatchNorm's core
parameters written in its constructor (other arguments only away from their defaults). ``Model``
builds the same variables as ``from_torch``'s module.

No name a torch model chooses breaks the file: children, inputs and classes named ``jnp``, ``F``,
``x``, ``self``, ``lambda``, ``a-b`` or ``Conv`` get Python names from one allocator
(:mod:`.names`); a child name ``self.<name>`` cannot spell is set and read with ``setattr`` /
``getattr`` in the class's ``setup`` (that class then holds its own constructor arguments).
Constants are written exactly (:func:`constant_source`). No-op layers (``Identity``, dropout and
stochastic depth with ``p=0``: no variables, no randomness) are left out, and so is ``train``
where nothing below a class uses it (``Model`` always takes it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ..porting.errors import UnsupportedError
from .ir import NO_DEFAULT, Block, Dict, Layer, Op, Ref, Slice, Variable, call_kwargs
from .layers import layer_class
from .names import Names, is_attribute, is_field
from .ops import OPS, arguments_source

__all__ = ["constant_source", "emit_source"]

_IMPORTS = {  # alias: import line (``jnp`` only written where used)
    "nn": "import flax.linen as nn",
    "jax": "import jax",
    "jnp": "import jax.numpy as jnp",
    "F": "from jaxbn.translate import torch_ops as F",
}

_NORM_CORE = ("num_features", "eps", "momentum", "affine", "track_running_stats")
"""A norm's core parameters (:meth:`jaxbn.porting.NormSettings.linen_kwargs`): always written."""


class _Code(str):
    """Source text used as is (``train``)."""


_TRAIN = _Code("train")


# ---------------------------------------------------------------- constants


def constant_source(value: Any, ref: Callable[[str], str] | None = None) -> str:
    """A constant as a Python expression that evaluates to an equal value of the same type.

    Floats round-trip bit-exactly (``repr``; ``float('inf')``, ``-float('inf')``,
    ``float('nan')`` for the non-finite), and so do ints, bools, ``None``, strings, bytes,
    ``Ellipsis``, complex numbers, tuples and :class:`~.ir.Slice` (as ``slice(...)``) of them; a
    dtype is ``jnp.<name>``. A :class:`~.ir.Ref` is the name ``ref`` gives it.

    Raises:
      UnsupportedError: any other value (a NumPy scalar, a list, an object): never written as
        a guess.
    """
    kind = type(value)
    if kind is Ref and ref is not None:
        return ref(value.name)
    if value is None or value is Ellipsis or kind in (bool, int, str, bytes):
        return repr(value)
    if kind is float:
        return _float_source(value)
    if kind is complex:
        return f"complex({_float_source(value.real)}, {_float_source(value.imag)})"
    if kind is tuple:
        inner = ", ".join(constant_source(v, ref) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if kind is Slice:
        return f"slice({', '.join(constant_source(v, ref) for v in (value.start, value.stop, value.step))})"
    if kind is Dict:
        return "{" + ", ".join(f"{constant_source(k)}: {constant_source(v, ref)}" for k, v in value.items) + "}"
    if isinstance(value, np.dtype):
        return _dtype_source(value)
    raise UnsupportedError(f"the constant {value!r} ({kind.__module__}.{kind.__qualname__}) "
                           "cannot be written as source")


def _float_source(value: float) -> str:
    if math.isfinite(value):
        return repr(value)  # the shortest string that reads back as the same float
    text = "float('nan')" if math.isnan(value) else "float('inf')"
    return f"-{text}" if math.copysign(1.0, value) < 0 else text


def _dtype_source(dtype: np.dtype) -> str:
    import jax.numpy as jnp

    scalar = getattr(jnp, dtype.name, None)
    if isinstance(scalar, type) and np.dtype(scalar) == dtype:
        return f"jnp.{dtype.name}"
    return f"jnp.dtype({dtype.name!r})"


def _leaves(value: Any) -> Iterator[Any]:
    """The constants inside an argument (tuples and slices opened)."""
    if isinstance(value, tuple):
        for v in value:
            yield from _leaves(v)
    elif isinstance(value, Slice):
        yield from _leaves((value.start, value.stop, value.step))
    elif isinstance(value, Dict):
        yield from _leaves(tuple(v for _, v in value.items))
    else:
        yield value


# ---------------------------------------------------------------- layers


def _is_no_op(layer: Layer) -> bool:
    """The layer returns its input, has no variables and draws no randomness: ``Identity``,
    dropout and stochastic depth with ``p=0``."""
    p = dict(layer.kwargs).get("p")
    return layer.cls == "Identity" or (layer.cls in ("Dropout", "StochasticDepth") and p == 0)


def _same(default: Any, value: Any) -> bool:
    """``value`` equals the layer field's default (so need not be written)."""
    if isinstance(value, np.dtype):
        return default is not None and default is not dataclasses.MISSING and np.dtype(default) == value
    if isinstance(value, tuple) and not isinstance(default, tuple):
        return all(_same(default, v) for v in value)
    return type(default) is type(value) and default == value


def _written_kwargs(layer: Layer) -> list[tuple[str, Any]]:
    """A layer's constructor arguments as written: those away from their default, and a norm's
    core parameters always."""
    defaults = {f.name: f.default for f in dataclasses.fields(layer_class(layer))}
    return [(k, v) for k, v in layer.kwargs
            if (layer.is_norm and k in _NORM_CORE) or not _same(defaults.get(k, dataclasses.MISSING), v)]


def _is_flax(layer: Layer) -> bool:
    """One of Flax's own layers (``nn.Conv``), written with the ``nn`` import."""
    return layer.cls.startswith("nn.")


def _all_layers(block: Block) -> Iterator[Layer]:
    for _, child in block.children:
        if isinstance(child, Block):
            yield from _all_layers(child)
        else:
            yield child


# ---------------------------------------------------------------- the file


def _doc(text: str) -> str:
    """``text`` safe inside a ``\"\"\"`` docstring (quotes, backslashes, control characters escaped)."""
    return "".join("\\" + c if c in '\\"' else c if c.isprintable() else c.encode("unicode_escape").decode()
                   for c in text)


def _attribute(name: str) -> str:
    """``self.<name>`` or, where Python cannot spell it, ``getattr(self, '<name>')``."""
    return f"self.{name}" if is_attribute(name) else f"getattr(self, {name!r})"


def _assignment(name: str, expression: str) -> str:
    return f"self.{name} = {expression}" if is_attribute(name) else f"setattr(self, {name!r}, {expression})"


class _Emitter:
    """Writes the classes of one file. Module-level names (imports, ``Model``, classes) and each
    method's local names come from one :class:`~.names.Names`: locals never shadow an import or a
    builtin the code uses, nor each other."""

    def __init__(self, root: Block) -> None:
        self.names = Names()
        layer_names = {layer_class(layer).__name__ for layer in _all_layers(root) if not _is_flax(layer)}
        for name in [*_IMPORTS, *sorted(layer_names), "Model"]:
            self.names.take(name)
        # locals may reuse class names: methods never refer to a class
        self.local_names = self.names.child()
        for name in ("self", "train"):
            self.local_names.take(name)
        self.classes: dict[tuple[str, str], str] = {}  # (torch type, body) -> class name
        self.sources: list[str] = []
        self.layer_imports: set[tuple[str, str]] = set()  # (module, class) of the layers written
        self.uses_jnp = False
        self._needs_train: dict[int, bool] = {}
        self._class_of: dict[int, str] = {}

    # ---- what each block needs

    def needs_train(self, child: Layer | Block) -> bool:
        """Some layer at or below ``child`` takes the caller's ``train`` (a layer with a fixed
        mode has it in its call arguments instead)."""
        if isinstance(child, Layer):
            return child.takes_train and not _is_no_op(child)
        if id(child) not in self._needs_train:
            children = dict(child.children)
            self._needs_train[id(child)] = any(
                op.kind == "module" and self.needs_train(children[op.target]) for op in child.ops)
        return self._needs_train[id(child)]

    def input_names(self, block: Block) -> tuple[Names, dict[str, str]]:
        """A fresh scope for ``block``'s ``__call__`` and its inputs' Python names in it."""
        scope = self.local_names.child()
        return scope, {name: scope.fresh(name) for name, _ in block.inputs}

    def constant(self, value: Any, names: dict[str, str] | None = None) -> str:
        if isinstance(value, _Code):
            return str(value)
        self.uses_jnp |= any(isinstance(v, np.dtype) for v in _leaves(value))
        return constant_source(value, names.__getitem__ if names is not None else None)

    # ---- classes

    def model(self, block: Block) -> None:
        """``Model``: the root, its children built in ``setup``."""
        body = self._body(block, fields=[], built=self._kept(block), root=True)
        self.sources.append(self._class_source("Model", block, body))

    def class_for(self, block: Block) -> str:
        """The class name for a non-root ``block``, its class (and its children's) written once."""
        if id(block) not in self._class_of:
            self._class_of[id(block)] = self._new_class(block)
        return self._class_of[id(block)]

    def _new_class(self, block: Block) -> str:
        kept = self._kept(block)
        for _, child in kept:
            if isinstance(child, Block):
                self.class_for(child)
        fields = [(n, c) for n, c in kept if is_field(n)]
        built = [(n, c) for n, c in kept if not is_field(n)]
        body = self._body(block, fields, built, root=False)
        key = (block.torch_type, body)
        if key not in self.classes:
            name = self.names.fresh(block.torch_type.rsplit(".", 1)[-1], numbered=True)
            self.classes[key] = name
            self.sources.append(self._class_source(name, block, body))
        return self.classes[key]

    def _kept(self, block: Block) -> list[tuple[str, Layer | Block]]:
        """The children written: all but no-op layers (every call of which is one argument)."""
        dropped = {name for name, child in block.children
                   if isinstance(child, Layer) and _is_no_op(child)
                   and all(len(op.args) == 1 and not op.kwargs for op in block.ops
                           if op.kind == "module" and op.target == name)}
        return [(n, c) for n, c in block.children if n not in dropped]

    def _class_source(self, name: str, block: Block, body: str) -> str:
        where = f" (e.g. {block.torch_path})" if block.torch_path else ""
        return f'class {name}(nn.Module):\n    """torch: {_doc(block.torch_type + where)}."""\n\n{body}\n'

    def _body(self, block: Block, fields: list, built: list, root: bool) -> str:
        """Fields, ``setup`` (children built here) and ``__call__``."""
        try:
            lines = [f"    {name}: nn.Module" for name, _ in fields]
            if fields:
                lines.append("")
            shared = [n for n, c in [*fields, *built] if isinstance(c, Layer) and c.shares_scope]
            if built or shared or block.variables:
                lines.append("    def setup(self):")
                lines += [f"        {_assignment(n, self.constructor(c, '        '))}" for n, c in built]
                lines += [f"        nn.share_scope(self, {_attribute(n)})  # its variables are this module's"
                          for n in shared]
                lines += [f"        {_assignment(v.name, self.variable(v))}" for v in block.variables]
                lines.append("")
            return "\n".join(lines + self._call(block, root))
        except UnsupportedError as error:
            raise UnsupportedError(f"{block.torch_path or 'the model'} ({block.torch_type}): {error}") from None

    def variable(self, variable: Variable) -> str:
        """A parameter (zeros until torch's values are ported) or a read-only buffer."""
        self.uses_jnp = True
        shape, dtype = self.constant(variable.shape), _dtype_source(np.dtype(variable.dtype))
        if variable.collection == "params":
            return f"self.param({variable.name!r}, nn.initializers.zeros_init(), {shape}, {dtype})"
        return f"self.variable({variable.collection!r}, {variable.name!r}, jnp.zeros, {shape}, {dtype}).value"

    def constructor(self, child: Layer | Block, indent: str) -> str:
        """``Conv(in_channels=3, ...)`` or ``BasicBlock(conv1=Conv(...), ...)``."""
        if isinstance(child, Layer):
            cls = layer_class(child)
            args = ", ".join(f"{k}={self.constant(v)}" for k, v in _written_kwargs(child))
            if _is_flax(child):  # Flax's own layer (channels-last): nn.Conv, nn.Dense
                return f"{child.cls}({args})"
            self.layer_imports.add((cls.__module__, cls.__name__))
            return f"{cls.__name__}({args})"
        name = self.class_for(child)
        inner = indent + "    "
        fields = "".join(f"\n{inner}{n}={self.constructor(c, inner)},"
                         for n, c in self._kept(child) if is_field(n))
        return f"{name}({fields}\n{indent})" if fields else f"{name}()"

    def _call(self, block: Block, root: bool) -> list[str]:
        """``def __call__(...)`` and its statements."""
        scope, names = self.input_names(block)
        params = [names[n] if d is NO_DEFAULT else f"{names[n]}={self.constant(d)}" for n, d in block.inputs]
        if root or self.needs_train(block):
            params.append("train: bool = False")
        lines = [f"    def __call__(self, {', '.join(params)}):"]
        children = dict(block.children)
        kept = dict(self._kept(block))
        for op in block.ops:
            alias = self._alias(op, kept)
            if alias is not None:
                names[op.out] = self.constant(alias, names)
                continue
            if op.kind == "variable":
                names[op.out] = _attribute(op.target)
                continue
            expression = self._expression(op, children, names)
            if op.kind == "function" and op.target == "guard":  # a check, no value
                lines.append(f"        {expression}")
                continue
            names[op.out] = scope.fresh(op.out)
            lines.append(f"        {names[op.out]} = {expression}")
        lines.append(f"        return {self.constant(block.output, names)}")
        return lines

    @staticmethod
    def _alias(op: Op, kept: dict) -> Any:
        """The argument an op returns unchanged (a left-out no-op layer, ``identity``), else None."""
        if op.kind == "module" and op.target not in kept:
            return op.args[0]
        if op.kind == "function" and op.target == "identity" and len(op.args) == 1 and not op.kwargs:
            return op.args[0]
        return None

    def _expression(self, op: Op, children: dict, names: dict[str, str]) -> str:
        """A child module's call, or the op table's way of writing the function."""
        source = lambda value: self.constant(value, names)  # noqa: E731
        if op.kind != "module":
            return OPS[op.target].write(op.args, op.kwargs, source)
        child = children[op.target]
        kwargs = op.kwargs
        if isinstance(child, Block):  # its inputs may have been renamed
            renamed = self.input_names(child)[1]
            kwargs = tuple((renamed.get(k, k), v) for k, v in kwargs)
        # what every call adds (the caller's ``train``, a fixed mode, ...), ``train`` only if used
        kwargs += tuple(kv for kv in call_kwargs(child, _TRAIN)
                        if kv != ("train", _TRAIN) or self.needs_train(child))
        return f"{_attribute(op.target)}({arguments_source(op.args, kwargs, source)})"


def emit_source(block: Block) -> str:
    """Python source defining ``Model`` (a ``flax.linen.Module``) for a captured torch module (in
    torch's layout, or NHWC for a block :func:`.layout.channels_last` rewrote).

    Raises:
      UnsupportedError: a constant that cannot be written exactly (see :func:`constant_source`).
    """
    emitter = _Emitter(block)
    emitter.model(block)
    header = [
        f'"""Flax port of {_doc(block.torch_type)}, written by `python -m jaxbn port`.',
        "",
        "Model.apply(variables, x, train=False) is the torch model in eval; with train=True and",
        "mutable=['batch_stats'] it trains like torch (dropout needs a 'dropout' rng). Variables use",
        "torch's names (jaxbn.porting.flax_to_torch turns them back into a state_dict).",
        '"""',
        "",
        *(line for alias, line in _IMPORTS.items() if alias != "F" and (alias != "jnp" or emitter.uses_jnp)),
        "",
        *_import_lines(emitter.layer_imports),
    ]
    return "\n".join(header) + "\n\n\n" + "\n\n".join(emitter.sources)


def _import_lines(layers: set[tuple[str, str]]) -> list[str]:
    """``from jaxbn.linen import BatchNorm`` ...: each layer from its module, and the functions as
    ``F``."""
    modules = sorted({module for module, _ in layers})
    lines = [f"from {m} import {', '.join(sorted(c for n, c in layers if n == m))}" for m in modules]
    return sorted(lines + [_IMPORTS["F"]])
