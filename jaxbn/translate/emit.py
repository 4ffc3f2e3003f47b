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

With ``api="nnx"`` the file defines ``Model``, an ``nnx.Module`` built as ``Model(rngs=nnx.Rngs(0))``
with ``__call__(self, x)``: the module tree :func:`.nnx_module.build_nnx` builds (torch's attribute
paths, containers included: ``self.layer1[0]``; the layers of :mod:`.nnx_layers` and
:mod:`jaxbn.nnx`, each starting in its torch module's mode), the same classes, names and constants
as above. A class takes its children as constructor arguments (a BatchNorm subclass derives from
:class:`jaxbn.nnx.BatchNorm` and passes its norm's on to ``super().__init__``); a name Python
cannot spell is a renamed parameter set with ``setattr``. Every layer is kept: NNX attributes
are assignable (``model.drop.p = 0.1``), and a container's indices are torch's.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import numpy as np

from ..porting.errors import UnsupportedError
from .ir import NO_DEFAULT, Block, Dict, Layer, Op, Ref, Slice, Variable, call_kwargs
from .layers import layer_class
from .names import Names, is_attribute, is_field
from .ops import OPS, arguments_source

__all__ = ["constant_source", "emit_source"]

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
    """Writes the classes of one file; :class:`_Linen` and :class:`.emit_nnx.NnxEmitter` say what differs between
    the two APIs (a class's base, its constructor, how a child is reached and called, the file's
    header). Module-level names (imports, ``Model``, classes) and each method's local names come
    from one :class:`~.names.Names`: locals never shadow an import or a builtin the code uses, nor
    each other."""

    imports: dict[str, str]  # alias: import line (every alias reserved; ``jnp`` written where used)
    module_names: tuple[str, ...] = ()  # further names the file defines or imports
    local_reserved: tuple[str, ...] = ("self",)

    def __init__(self, root: Block) -> None:
        self.names = Names()
        layer_names = {self.layer_class(layer).__name__ for layer in _all_layers(root) if not _is_flax(layer)}
        for name in dict.fromkeys([*self.imports, *sorted(layer_names), *self.module_names, "Model"]):
            self.names.take(name)
        # locals may reuse class names: methods never refer to a class
        self.local_names = self.names.child()
        for name in self.local_reserved:
            self.local_names.take(name)
        self.classes: dict[tuple[str, str], str] = {}  # (torch type, body) -> class name
        self.sources: list[str] = []
        self.layer_imports: set[tuple[str, str]] = set()  # (module, class) of the layers written
        self.uses_jnp = False
        self._class_of: dict[int, str] = {}

    # ---- what differs between the APIs

    def layer_class(self, layer: Layer) -> type:
        """The class a layer is written as."""
        raise NotImplementedError

    def _kept(self, block: Block) -> list[tuple[str, Layer | Block]]:
        """The children written."""
        raise NotImplementedError

    def _init(self, block: Block, root: bool) -> list[str]:
        """The class body's lines before ``__call__``: fields, ``setup`` / ``__init__``."""
        raise NotImplementedError

    def constructor(self, child: Layer | Block, indent: str) -> str:
        """The expression building ``child``."""
        raise NotImplementedError

    def _base(self, block: Block) -> str:
        """The class a block's class derives from."""
        raise NotImplementedError

    def _call_params(self, block: Block, root: bool) -> list[str]:
        """``__call__``'s parameters after the block's inputs."""
        return []

    def _variable_read(self, name: str) -> str:
        """The value of the block's own parameter or buffer ``name``."""
        raise NotImplementedError

    def _callee(self, block: Block, name: str) -> str:
        """The expression a call of the child ``name`` calls."""
        raise NotImplementedError

    def _call_extras(self, child: Layer | Block) -> tuple[tuple[str, Any], ...]:
        """Arguments every call of ``child`` adds."""
        return ()

    # ---- shared

    def input_names(self, block: Block) -> tuple[Names, dict[str, str]]:
        """A fresh scope for ``block``'s ``__call__`` and its inputs' Python names in it."""
        scope = self.local_names.child()
        return scope, {name: scope.fresh(name) for name, _ in block.inputs}

    def constant(self, value: Any, names: dict[str, str] | None = None) -> str:
        if isinstance(value, _Code):
            return str(value)
        self.uses_jnp |= any(isinstance(v, np.dtype) for v in _leaves(value))
        return constant_source(value, names.__getitem__ if names is not None else None)

    def layer_arguments(self, layer: Layer) -> list[str]:
        """A layer's constructor arguments as written (:func:`_written_kwargs`), its class imported."""
        cls = self.layer_class(layer)
        if not _is_flax(layer):
            self.layer_imports.add((cls.__module__, cls.__name__))
        return [f"{k}={self.constant(v)}" for k, v in _written_kwargs(layer)]

    def variable_init(self, variable: Variable) -> tuple[str, str]:
        """A variable's zeros (torch's values are ported in): ``(shape, dtype)`` as source."""
        self.uses_jnp = True
        return self.constant(variable.shape), _dtype_source(np.dtype(variable.dtype))

    def model(self, block: Block) -> None:
        """``Model``: the root, its children built in its constructor."""
        self.sources.append(self._class_source("Model", block, self._body(block, root=True)))

    def class_for(self, block: Block) -> str:
        """The class name for a non-root ``block``, its class (and its children's) written once."""
        if id(block) not in self._class_of:
            self._class_of[id(block)] = self._new_class(block)
        return self._class_of[id(block)]

    def _new_class(self, block: Block) -> str:
        for _, child in self._kept(block):
            if isinstance(child, Block):
                self.class_for(child)
        body = self._body(block, root=False)
        key = (block.torch_type, body)
        if key not in self.classes:
            name = self.names.fresh(block.torch_type.rsplit(".", 1)[-1], numbered=True)
            self.classes[key] = name
            self.sources.append(self._class_source(name, block, body))
        return self.classes[key]

    def _class_source(self, name: str, block: Block, body: str) -> str:
        where = f" (e.g. {block.torch_path})" if block.torch_path else ""
        return f'class {name}({self._base(block)}):\n    """torch: {_doc(block.torch_type + where)}."""\n\n{body}\n'

    def _body(self, block: Block, root: bool) -> str:
        """The constructor part and ``__call__``."""
        try:
            return "\n".join(self._init(block, root) + self._call(block, root))
        except UnsupportedError as error:
            raise UnsupportedError(f"{block.torch_path or 'the model'} ({block.torch_type}): {error}") from None

    def _call(self, block: Block, root: bool) -> list[str]:
        """``def __call__(...)`` and its statements."""
        scope, names = self.input_names(block)
        params = [names[n] if d is NO_DEFAULT else f"{names[n]}={self.constant(d)}" for n, d in block.inputs]
        params += self._call_params(block, root)
        lines = [f"    def __call__(self, {', '.join(params)}):"]
        children = dict(block.children)
        kept = dict(self._kept(block))
        for op in block.ops:
            alias = self._alias(op, kept)
            if alias is not None:
                names[op.out] = self.constant(alias, names)
                continue
            if op.kind == "variable":
                names[op.out] = self._variable_read(op.target)
                continue
            expression = self._expression(block, op, children, names)
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

    def _expression(self, block: Block, op: Op, children: dict, names: dict[str, str]) -> str:
        """A child module's call, or the op table's way of writing the function."""
        source = lambda value: self.constant(value, names)  # noqa: E731
        if op.kind != "module":
            return OPS[op.target].write(op.args, op.kwargs, source)
        child = children[op.target]
        kwargs = op.kwargs
        if isinstance(child, Block):  # its inputs may have been renamed
            renamed = self.input_names(child)[1]
            kwargs = tuple((renamed.get(k, k), v) for k, v in kwargs)
        kwargs += self._call_extras(child)
        return f"{self._callee(block, op.target)}({arguments_source(op.args, kwargs, source)})"

    docstring: str  # the file's, ``{torch_type}`` filled in
    appendix: tuple[str, ...] = ()  # what follows the classes

    def file(self, block: Block) -> str:
        """The whole file: the docstring, the imports, the classes."""
        header = [
            f'"""{self.docstring.format(torch_type=_doc(block.torch_type))}"""',
            "",
            *(line for alias, line in self.imports.items() if alias != "F" and (alias != "jnp" or self.uses_jnp)),
            "",
            *_import_lines(self.layer_imports, self.imports["F"]),
        ]
        return "\n".join(header) + "\n\n\n" + "\n\n".join([*self.sources, *self.appendix])


class _Linen(_Emitter):
    """``flax.linen`` source: children are dataclass fields (``conv1: nn.Module``) or built in
    ``setup``, ``train`` goes down to every child that uses it, no-op layers are left out."""

    imports = {
        "nn": "import flax.linen as nn",
        "jax": "import jax",
        "jnp": "import jax.numpy as jnp",
        "F": "from jaxbn.translate import torch_ops as F",
    }
    local_reserved = ("self", "train")
    docstring = """Flax port of {torch_type}, written by `python -m jaxbn port`.

Model.apply(variables, x, train=False) is the torch model in eval; with train=True and
mutable=['batch_stats'] it trains like torch (dropout needs a 'dropout' rng). Variables use
torch's names (jaxbn.porting.flax_to_torch turns them back into a state_dict).
"""

    def __init__(self, root: Block) -> None:
        super().__init__(root)
        self._needs_train: dict[int, bool] = {}

    def layer_class(self, layer: Layer) -> type:
        return layer_class(layer)

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

    def _kept(self, block: Block) -> list[tuple[str, Layer | Block]]:
        """All but no-op layers (every call of which is one argument)."""
        dropped = {name for name, child in block.children
                   if isinstance(child, Layer) and _is_no_op(child)
                   and all(len(op.args) == 1 and not op.kwargs for op in block.ops
                           if op.kind == "module" and op.target == name)}
        return [(n, c) for n, c in block.children if n not in dropped]

    def _base(self, block: Block) -> str:
        return "nn.Module"

    def _init(self, block: Block, root: bool) -> list[str]:
        """Fields (children a non-root class is given) and ``setup`` (children built here)."""
        kept = self._kept(block)
        fields = [] if root else [(n, c) for n, c in kept if is_field(n)]
        built = [(n, c) for n, c in kept if root or not is_field(n)]
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
        return lines

    def variable(self, variable: Variable) -> str:
        """A parameter (zeros until torch's values are ported) or a read-only buffer."""
        shape, dtype = self.variable_init(variable)
        if variable.collection == "params":
            return f"self.param({variable.name!r}, nn.initializers.zeros_init(), {shape}, {dtype})"
        return f"self.variable({variable.collection!r}, {variable.name!r}, jnp.zeros, {shape}, {dtype}).value"

    def constructor(self, child: Layer | Block, indent: str) -> str:
        """``Conv(in_channels=3, ...)`` or ``BasicBlock(conv1=Conv(...), ...)``."""
        if isinstance(child, Layer):  # Flax's own layers (channels-last) as nn.Conv, nn.Dense
            name = child.cls if _is_flax(child) else layer_class(child).__name__
            return f"{name}({', '.join(self.layer_arguments(child))})"
        name = self.class_for(child)
        fields = [f"{n}={self.constructor(c, indent + '    ')}" for n, c in self._kept(child) if is_field(n)]
        return _arguments_block(name, fields, indent)

    def _call_params(self, block: Block, root: bool) -> list[str]:
        return ["train: bool = False"] if root or self.needs_train(block) else []

    def _variable_read(self, name: str) -> str:
        return _attribute(name)

    def _callee(self, block: Block, name: str) -> str:
        return _attribute(name)

    def _call_extras(self, child: Layer | Block) -> tuple[tuple[str, Any], ...]:
        """The caller's ``train``, only if used, and a layer's fixed call arguments."""
        return tuple(kv for kv in call_kwargs(child, _TRAIN)
                     if kv != ("train", _TRAIN) or self.needs_train(child))



def _arguments_block(callee: str, items: list[str], indent: str, brackets: str = "()") -> str:
    """``callee(item, item, ...)`` one item a line (at ``indent`` + 4), or ``callee()``."""
    lines = "".join(f"\n{indent}    {item}," for item in items)
    return f"{callee}{brackets[0]}{lines}\n{indent}{brackets[1]}" if items else f"{callee}{brackets}"


def emit_source(block: Block, api: Literal["linen", "nnx"] = "linen", *, training: bool = True,
                containers: Mapping[str, str] | None = None) -> str:
    """Python source defining ``Model`` for a captured torch module: a ``flax.linen.Module`` (in
    torch's layout, or NHWC for a block :func:`.layout.channels_last` rewrote), or with
    ``api="nnx"`` an ``nnx.Module`` whose ``Model(rngs=nnx.Rngs(0))`` is the module tree
    :func:`.nnx_module.build_nnx` builds from the same ``training`` (the torch model's mode when
    captured) and ``containers`` (``{torch path: torch type name}`` of its modules).

    Raises:
      UnsupportedError: a constant that cannot be written exactly (see :func:`constant_source`);
        for NNX, a channels-last block or a name ``flax.nnx.Module`` reserves.
    """
    if api not in ("linen", "nnx"):
        raise ValueError(f"api must be 'linen' or 'nnx', got {api!r}")
    if api == "linen":
        emitter = _Linen(block)
    else:  # its own module: NNX (and so optax, which flax.nnx imports) only when asked for
        from .emit_nnx import NnxEmitter

        emitter = NnxEmitter(block, training, containers or {})
    emitter.model(block)
    return emitter.file(block)


def _import_lines(layers: set[tuple[str, str]], functions: str) -> list[str]:
    """``from jaxbn.linen import BatchNorm`` ...: each layer from its module, and the functions
    (``functions``, the ``F`` import line)."""
    modules = sorted({module for module, _ in layers})
    lines = [f"from {m} import {', '.join(sorted(c for n, c in layers if n == m))}" for m in modules]
    return sorted(lines + [functions])
