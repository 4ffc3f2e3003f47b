"""A captured torch module (:class:`~.ir.Block`) as readable Flax source code: :func:`emit_source`.

The file defines ``Model``, a ``flax.linen.Module`` with ``__call__(self, x, train=False)``,
that imports no torch: one Flax class per distinct torch module class (``BasicBlock``,
``Bottleneck``, ...), its submodules as fields under torch's attribute names, its forward
spelled out with :mod:`jaxbn.translate.torch_ops` (``F``) -- each function call written by its
entry of the op table (:data:`.ops.OPS`), the one :class:`~.module.TracedModule` runs -- and
every BatchNorm's core parameters written in its constructor. ``Model`` builds the same
variables as ``from_torch``'s module.
"""

from __future__ import annotations

import dataclasses
import keyword
from typing import Any

import numpy as np

from .ir import NO_DEFAULT, Block, Layer, Op, Ref, Slice, call_kwargs
from .layers import layer_class
from .ops import OPS, arguments_source

__all__ = ["emit_source"]

_NAMES_IN_USE = {"self", "train", "F", "nn", "jnp", "jax"}


class _Code(str):
    """Source text used as is (``train``)."""


def _value(value: Any) -> str:
    """A constant as source."""
    if isinstance(value, _Code):
        return str(value)
    if isinstance(value, np.dtype):
        return f"jnp.{value.name}"
    if isinstance(value, tuple):
        inner = ", ".join(_value(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, Slice):
        return f"slice({_value(value.start)}, {_value(value.stop)}, {_value(value.step)})"
    if isinstance(value, Ref):
        return _var(value.name)
    return repr(value)


def _var(name: str) -> str:
    return f"{name}_" if name in _NAMES_IN_USE or keyword.iskeyword(name) else name


def _attribute(name: str) -> str:
    return f"self.{name}" if name.isidentifier() and not keyword.iskeyword(name) else f"getattr(self, {name!r})"


def _statement(op: Op, children: dict[str, Any]) -> str:
    """``out = ...``: a child module's call, or the op table's way of writing the function."""
    if op.kind == "module":
        kwargs = op.kwargs + call_kwargs(children[op.target], _Code("train"))
        return f"{_var(op.out)} = {_attribute(op.target)}({arguments_source(op.args, kwargs, _value)})"
    return f"{_var(op.out)} = {OPS[op.target].write(op.args, op.kwargs, _value)}"


def _layer_expression(layer: Layer) -> str:
    """``Conv(in_channels=3, ...)``: arguments at their default are left out, except a norm's
    core parameters (always spelled out)."""
    defaults = {f.name: f.default for f in dataclasses.fields(layer_class(layer))}
    args = ", ".join(f"{k}={_value(v)}" for k, v in layer.kwargs
                     if layer.is_norm or not _same(defaults.get(k, dataclasses.MISSING), v))
    return f"{layer.cls}({args})"


def _same(default: Any, value: Any) -> bool:
    if isinstance(value, tuple) and not isinstance(default, tuple):
        return all(_same(default, v) for v in value)
    return type(default) is type(value) and default == value


class _Emitter:
    def __init__(self) -> None:
        self.classes: dict[tuple[str, str], str] = {}  # (torch type, body) -> class name
        self.order: list[tuple[str, str]] = []  # (name, source)
        self.imports: set[tuple[str, str]] = set()  # (module, class) of the layers

    def class_for(self, block: Block, root: bool) -> str:
        """The name of the class for ``block`` (emitting it if new)."""
        for _, child in block.children:
            if isinstance(child, Block):
                self.class_for(child, root=False)
            else:
                cls = layer_class(child)
                self.imports.add((cls.__module__, cls.__name__))
        body = self._body(block, root)
        if root:
            self.order.append(("Model", self._source("Model", block, body)))
            return "Model"
        key = (block.torch_type, body)
        if key not in self.classes:
            stem = block.torch_type.rsplit(".", 1)[-1]
            taken = {n for n, _ in self.order}
            name, k = stem, 2
            while name in taken or name == "Model":
                name, k = f"{stem}{k}", k + 1
            self.classes[key] = name
            self.order.append((name, self._source(name, block, body)))
        return self.classes[key]

    def _body(self, block: Block, root: bool) -> str:
        children = dict(block.children)
        lines = []
        if not root:
            for name, _ in block.children:
                if not name.isidentifier() or keyword.iskeyword(name):
                    raise ValueError(f"{block.torch_path}.{name}: not a Python identifier")
                lines.append(f"    {name}: nn.Module")
            lines.append("")
        params = []
        for name, default in block.inputs:
            params.append(_var(name) if default is NO_DEFAULT else f"{_var(name)}={_value(default)}")
        lines.append(f"    def __call__(self, {', '.join(params + ['train: bool = False'])}):")
        if root:
            for name, _ in block.inputs:
                lines.append(f"        if self.channels_last:  # NHWC -> torch's NCHW")
                lines.append(f"            {_var(name)} = F.to_channels_first({_var(name)})")
        lines += [f"        {_statement(op, children)}" for op in block.ops]
        result = _value(block.output)
        if root:
            lines.append("        if self.channels_last:")
            lines.append(f"            return jax.tree_util.tree_map(F.to_channels_last, {result})")
        lines.append(f"        return {result}")
        return "\n".join(lines)

    def _constructor(self, child: Any, indent: str) -> str:
        if isinstance(child, Layer):
            return _layer_expression(child)
        name = self.class_for(child, root=False)
        inner = indent + "    "
        fields = "".join(f"\n{inner}{n}={self._constructor(c, inner)}," for n, c in child.children)
        return f"{name}({fields}\n{indent})"

    def _source(self, name: str, block: Block, body: str) -> str:
        doc = f'    """torch: {block.torch_type}{f" (e.g. {block.torch_path})" if block.torch_path else ""}."""'
        if name != "Model":
            return f"class {name}(nn.Module):\n{doc}\n\n{body}\n"
        setup = ["    channels_last: bool = False", "", "    def setup(self):"]
        for child_name, child in block.children:
            expression = self._constructor(child, "        ")
            if child_name.isidentifier() and not keyword.iskeyword(child_name):
                setup.append(f"        self.{child_name} = {expression}")
            else:
                setup.append(f"        setattr(self, {child_name!r}, {expression})")
        if not block.children:
            setup.append("        pass")
        return f"class {name}(nn.Module):\n{doc}\n\n" + "\n".join(setup) + f"\n\n{body}\n"


def emit_source(block: Block, *, channels_last: bool = False) -> str:
    """Python source defining ``Model`` (a ``flax.linen.Module``) for a captured torch module.

    ``Model(channels_last=...)`` takes NHWC when true; the default is ``channels_last``.
    """
    emitter = _Emitter()
    emitter.class_for(block, root=True)
    header = [
        f'"""Flax port of {block.torch_type}, written by `python -m jaxbn port`.',
        "",
        "Model.apply(variables, x, train=False) is the torch model in eval; with train=True and",
        "mutable=['batch_stats'] it trains like torch (dropout needs a 'dropout' rng). Variables use",
        "torch's names (jaxbn.porting.flax_to_torch turns them back into a state_dict).",
        '"""',
        "",
        "import flax.linen as nn",
        "import jax",
        "import jax.numpy as jnp",
        "",
        *_import_lines(emitter.imports),
    ]
    sources = [src for _, src in emitter.order]
    model = sources.pop()  # the root is emitted last
    if channels_last:
        model = model.replace("    channels_last: bool = False", "    channels_last: bool = True", 1)
    return "\n".join(header) + "\n\n\n" + "\n\n".join(sources + [model])


def _import_lines(layers: set[tuple[str, str]]) -> list[str]:
    """``from jaxbn.linen import BatchNorm`` ...: each layer from its module, and the functions as
    ``F``."""
    modules = sorted({module for module, _ in layers})
    lines = [f"from {m} import {', '.join(sorted(c for n, c in layers if n == m))}" for m in modules]
    return sorted(lines + ["from jaxbn.translate import torch_ops as F"])
