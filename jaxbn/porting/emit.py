"""A captured torch module (:class:`~.translate.Block`) as readable Flax source code.

The file defines ``Model``, a ``flax.linen.Module`` with ``__call__(self, x, train=False)``,
that imports no torch: one Flax class per distinct torch module class (``BasicBlock``,
``Bottleneck``, ...), its submodules as fields under torch's attribute names, its forward
spelled out with :mod:`jaxbn.porting.torch_ops` (``F``) and every BatchNorm's core parameters
written in its constructor. ``Model`` builds the same variables as ``from_torch``'s module.
"""

from __future__ import annotations

import keyword
from typing import Any

import numpy as np

from .translate import NO_DEFAULT, Block, Layer, Op, Ref, Slice, build_layer

__all__ = ["emit_source"]

_INFIX = {"operator.add": "{} + {}", "operator.sub": "{} - {}", "operator.mul": "{} * {}",
          "operator.truediv": "{} / {}", "operator.floordiv": "{} // {}", "operator.eq": "{} == {}"}
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


def _index(value: Any) -> str:
    """An index as source: ``x[:, 0]``."""
    if isinstance(value, Slice):
        parts = ["" if v is None else _value(v) for v in (value.start, value.stop, value.step)]
        return ":".join(parts[:2]) + (f":{parts[2]}" if parts[2] else "")
    if value is Ellipsis:
        return "..."
    if isinstance(value, tuple):
        return ", ".join(_index(v) for v in value) if value else "()"
    return _value(value)


def _call_args(op: Op, extra: tuple[tuple[str, Any], ...] = ()) -> str:
    parts = [_value(a) for a in op.args] + [f"{k}={_value(v)}" for k, v in op.kwargs + extra]
    return ", ".join(parts)


def _attribute(name: str) -> str:
    return f"self.{name}" if name.isidentifier() and not keyword.iskeyword(name) else f"getattr(self, {name!r})"


def _statement(op: Op, children: dict[str, Any]) -> str:
    out = _var(op.out)
    if op.kind == "module":
        child = children[op.target]
        extra: tuple = ()
        if isinstance(child, Block) or child.takes_train:
            extra = (("train", _Code("train")),)
        if isinstance(child, Layer):
            extra += child.call_kwargs
        return f"{out} = {_attribute(op.target)}({_call_args(op, extra)})"
    if op.target in _INFIX:
        return f"{out} = " + _INFIX[op.target].format(*(_value(a) for a in op.args))
    if op.target == "operator.neg":
        return f"{out} = -{_value(op.args[0])}"
    if op.target == "operator.getitem":
        return f"{out} = {_value(op.args[0])}[{_index(op.args[1])}]"
    if op.target == "getattr":
        return f"{out} = {_value(op.args[0])}.{op.args[1]}"
    if op.target == "identity":
        return f"{out} = {_value(op.args[0])}"
    return f"{out} = F.{op.target}({_call_args(op)})"


def _layer_expression(layer: Layer) -> str:
    """``Conv(in_channels=3, ...)``: arguments at their default are left out, except a norm's
    core parameters (always spelled out)."""
    import dataclasses

    defaults = {f.name: f.default for f in dataclasses.fields(build_layer(layer))}
    norm = layer.cls in ("BatchNorm", "InstanceNorm")
    args = ", ".join(f"{k}={_value(v)}" for k, v in layer.kwargs
                     if norm or not _same(defaults.get(k, dataclasses.MISSING), v))
    return f"{layer.cls}({args})"


def _same(default: Any, value: Any) -> bool:
    if isinstance(value, tuple) and not isinstance(default, tuple):
        return all(_same(default, v) for v in value)
    return type(default) is type(value) and default == value


class _Emitter:
    def __init__(self) -> None:
        self.classes: dict[tuple[str, str], str] = {}  # (torch type, body) -> class name
        self.order: list[tuple[str, str]] = []  # (name, source)
        self.layer_classes: set[str] = set()

    def class_for(self, block: Block, root: bool) -> str:
        """The name of the class for ``block`` (emitting it if new)."""
        for _, child in block.children:
            if isinstance(child, Block):
                self.class_for(child, root=False)
            else:
                self.layer_classes.add(child.cls)
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
    norms = sorted(emitter.layer_classes & {"BatchNorm", "InstanceNorm"})
    layers = sorted(emitter.layer_classes - {"BatchNorm", "InstanceNorm"})
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
    ]
    if norms:
        header.append(f"from jaxbn.linen import {', '.join(norms)}")
    header.append("from jaxbn.porting import torch_ops as F")
    if layers:
        header.append(f"from jaxbn.porting.torch_nn import {', '.join(layers)}")
    sources = [src for _, src in emitter.order]
    model = sources.pop()  # the root is emitted last
    if channels_last:
        model = model.replace("    channels_last: bool = False", "    channels_last: bool = True", 1)
    return "\n".join(header) + "\n\n\n" + "\n\n".join(sources + [model])
