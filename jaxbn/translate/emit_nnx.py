"""The NNX flavour of :mod:`.emit`: a captured block as Flax NNX source (``emit_source(block,
"nnx")``), the module tree :func:`.nnx_module.build_nnx` builds. Its own module so that writing
linen source never imports ``flax.nnx``."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Mapping

from .. import nnx as jaxbn_nnx
from ..porting.errors import UnsupportedError
from .emit import _all_layers, _arguments_block, _assignment, _attribute, _Emitter, _is_flax
from .ir import Block, Layer, Variable, join_path
from .layers import layer_class
from .names import is_attribute, is_field
from .nnx_layers import Container, nnx_layer_class
from .nnx_module import child_paths, child_tree, container_kind, flipped_tracking, has_mode, initial_mode

__all__ = ["NnxEmitter"]

_NORM_ARGUMENTS = tuple(inspect.signature(jaxbn_nnx.BatchNorm.__init__).parameters)[1:]
"""What a :mod:`jaxbn.nnx` norm's constructor takes: never a child's parameter name in a
BatchNorm subclass's ``__init__`` (which passes them on)."""

_LOAD = '''def load(model, variables):
    """Put the ported variables into ``model``: ``{'layer1/0/bn1/weight': array, ...}`` as
    ``port --nnx --out`` wrote them (``jaxbn.checkpoint_io.read_checkpoint``), or nested dicts."""
    restored = {}
    for name, value in variables.items():
        *parents, leaf = name.split("/")
        node = restored
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    state = nnx.state(model, (nnx.Param, nnx.BatchStat))
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)
'''


class NnxEmitter(_Emitter):
    """Flax NNX source: the module tree ``build_nnx`` builds, under torch's attribute paths
    (containers included: ``self.layer1[0]``), every layer in its torch mode when translated
    (``use_running_average=True`` / ``deterministic=True`` where not training) and no ``train``
    argument. A non-root class takes its children as constructor arguments (a BatchNorm
    subclass also its norm's, passed on to ``super().__init__``); ``Model`` builds them from
    ``rngs``. Every layer is written: NNX attributes can be changed (``model.drop.p = 0.1``), so
    a layer that does nothing now is still called."""

    imports = {
        "jnp": "import jax.numpy as jnp",
        "nnx": "from flax import nnx",
        "F": "from jaxbn.translate import torch_ops as F",
    }
    module_names = ("Container", "ModuleList", "Sequential", "load")
    local_reserved = ("self", "rngs")
    docstring = """Flax NNX port of {torch_type}, written by `python -m jaxbn port --nnx`.

model = Model(rngs=nnx.Rngs(0)) holds torch's module tree under torch's names
(model.layer1[0].bn1), each module starting in its torch module's mode when ported;
model.train() / model.eval() switch them, and model(x) is the torch model's forward (running
statistics updated in place). The variables `port --nnx --out` wrote are NNX state names
('layer1/0/bn1/running_mean'): load(model, jaxbn.checkpoint_io.read_checkpoint(path)) puts
them in, which is

    state = nnx.state(model, (nnx.Param, nnx.BatchStat))
    nnx.replace_by_pure_dict(state, restored)  # restored: those names as nested dicts
    nnx.update(model, state)

Parameters torch does not train (requires_grad=False) are nnx.Param here;
jaxbn.from_torch(..., api='nnx') makes them FrozenParam.
"""
    appendix = (_LOAD,)

    def __init__(self, root: Block, training: bool, containers: Mapping[str, str]) -> None:
        for layer in _all_layers(root):
            if _is_flax(layer):
                raise UnsupportedError("the NNX source computes in torch's layout: channels-last is for "
                                       "the linen module only")
        super().__init__(root)
        self.training = training
        self.containers = containers
        self._trees: dict[int, tuple[dict, str | None]] = {}
        self._parameters: dict[int, tuple[dict[str, str], str]] = {}

    def layer_class(self, layer: Layer) -> type:
        return getattr(jaxbn_nnx, layer.cls) if layer.is_norm else nnx_layer_class(layer_class(layer))

    def _kept(self, block: Block) -> list[tuple[str, Layer | Block]]:
        return list(block.children)

    # ---- the tree under torch's attribute paths

    def tree(self, block: Block) -> tuple[dict, str | None]:
        """``block``'s children by attribute path (``{'layer1': {'0': 'layer1_0'}, 'fc': 'fc'}``,
        leaves the children's IR names) and the name of its own norm (a BatchNorm subclass's)."""
        if id(block) not in self._trees:
            self._trees[id(block)] = child_tree(block)
        return self._trees[id(block)]

    def container(self, path: str, node: dict) -> str:
        """The :mod:`.nnx_layers` class of the container at torch ``path``: as ``build_nnx``
        chooses it, a ``Sequential`` / ``ModuleList`` only with every index ``0..n-1``."""
        return container_kind(node, self.containers.get(path, ""))

    def references(self, block: Block) -> dict[str, str]:
        """Each child's expression from ``self``: ``self.layer1[0]``, ``self.encoder.conv``,
        ``self.blocks['a-b']``, ``getattr(self, 'a-b')``."""
        tree, norm = self.tree(block)
        found = {}

        def visit(node: dict, path: str, kind: str | None, expression: str) -> None:
            for part, value in node.items():
                if kind is None:  # an attribute of the block itself
                    reference = _attribute(part)
                elif kind != "Container":
                    reference = f"{expression}[{int(part)}]"
                else:
                    reference = f"{expression}.{part}" if is_attribute(part) else f"{expression}[{part!r}]"
                if isinstance(value, dict):
                    inner = join_path(path, part)
                    visit(value, inner, self.container(inner, value), reference)
                else:
                    found[value] = reference

        visit(tree, block.torch_path, None, "self")
        return found

    # ---- classes

    def _base(self, block: Block) -> str:
        """A BatchNorm subclass's norm class; ``Container`` for a torch ``Sequential`` /
        ``ModuleList`` traced as the model (``model[0]`` indexes, as torch's); else ``nnx.Module``."""
        _, norm = self.tree(block)
        if norm:
            return self.layer_class(dict(block.children)[norm]).__name__
        if block.torch_type in ("torch.nn.Sequential", "torch.nn.ModuleList"):
            self.layer_imports.add((Container.__module__, "Container"))
            return "Container"
        return "nnx.Module"

    def parameters(self, block: Block) -> tuple[dict[str, str], str]:
        """A non-root class's ``__init__`` parameters: each attribute's, and the name of the
        norm's arguments (``**norm``, a BatchNorm subclass)."""
        if id(block) not in self._parameters:
            tree, norm = self.tree(block)
            scope = self.local_names.child()
            for name in _NORM_ARGUMENTS if norm else ():  # passed on to the norm
                with contextlib.suppress(ValueError):  # (already reserved)
                    scope.take(name)
            params = {attribute: scope.fresh(attribute) for attribute in tree}
            self._parameters[id(block)] = params, scope.fresh("norm")
        return self._parameters[id(block)]

    def _init(self, block: Block, root: bool) -> list[str]:
        """``__init__``: the norm (a BatchNorm subclass), the children under their attribute
        names, torch's attribute flips, the block's own variables."""
        tree, norm = self.tree(block)
        children = dict(block.children)
        references = self.references(block)
        params, rest = self.parameters(block)
        lines = []
        if norm:
            arguments = ", ".join(self.norm_arguments(children[norm])) if root else f"**{rest}"
            lines.append(f"super().__init__({arguments})")
            lines += self.flips("self", children[norm])
        paths = child_paths(block)
        for attribute, value in tree.items():
            path = join_path(block.torch_path, attribute)
            lines.append(_assignment(attribute, self.node(value, path, children, "        ") if root
                                     else params[attribute]))
            for name, child in block.children:  # the flipped norms under it
                if name != norm and isinstance(child, Layer) and paths[name][0] == attribute:
                    lines += self.flips(references[name], child)
        lines += [_assignment(v.name, self.variable(v)) for v in block.variables]
        if not root and not lines:
            return []
        signature = ["self", "*", "rngs: nnx.Rngs"] if root else \
            ["self", *params.values(), *([f"**{rest}"] if norm else [])]
        return [f"    def __init__({', '.join(signature)}):", *(f"        {line}" for line in lines or ["pass"]), ""]

    def flips(self, reference: str, layer: Layer) -> list[str]:
        """A norm's ``track_running_stats`` set after construction (torch's attribute flip)."""
        flipped = flipped_tracking(layer)
        return [] if flipped is None else [f"{reference}.track_running_stats = {self.constant(flipped)}"]

    def variable(self, variable: Variable) -> str:
        """A parameter (zeros until torch's values are ported) or a buffer."""
        shape, dtype = self.variable_init(variable)
        kind = "Param" if variable.collection == "params" else "BatchStat"
        return f"nnx.{kind}(jnp.zeros({shape}, {dtype}))"

    def node(self, value: str | dict, path: str, children: dict, indent: str) -> str:
        """A child (``value`` its IR name) or a container of children, built."""
        if not isinstance(value, dict):
            return self.constructor(children[value], indent)
        kind = self.container(path, value)
        self.layer_imports.add((Container.__module__, kind))
        inner = indent + "    "
        built = {part: self.node(v, join_path(path, part), children, inner) for part, v in value.items()}
        if kind != "Container":
            items = [built[str(i)] for i in range(len(built))]
        elif all(is_field(part) for part in built):
            items = [f"{part}={v}" for part, v in built.items()]
        else:  # one dict, in torch's order (a Container's order is its indexing)
            return _arguments_block(f"{kind}(**", [f"{part!r}: {v}" for part, v in built.items()], indent, "{}") + ")"
        return _arguments_block(kind, items, indent)

    def norm_arguments(self, layer: Layer) -> list[str]:
        """A norm's constructor arguments, ``use_running_average=True`` if it starts in eval."""
        training = initial_mode(layer, self.training)
        return self.layer_arguments(layer) + ([] if training else ["use_running_average=True"])

    def constructor(self, child: Layer | Block, indent: str) -> str:
        """``Conv(in_channels=3, ..., rngs=rngs)`` or ``BasicBlock(conv1=Conv(...), ...)``."""
        if isinstance(child, Layer):
            cls = self.layer_class(child)
            if child.is_norm:
                return f"{cls.__name__}({', '.join(self.norm_arguments(child))})"
            modal = has_mode(child)  # dropout, stochastic depth
            extra = ["rngs=rngs"] if modal or hasattr(cls.linen, "param_specs") else []
            extra += ["deterministic=True"] if modal and not initial_mode(child, self.training) else []
            return f"{cls.__name__}({', '.join(self.layer_arguments(child) + extra)})"
        name = self.class_for(child)
        tree, norm = self.tree(child)
        params, _ = self.parameters(child)
        children = dict(child.children)
        inner = indent + "    "
        items = [", ".join(self.norm_arguments(children[norm]))] if norm else []
        items += [f"{params[attribute]}={self.node(value, join_path(child.torch_path, attribute), children, inner)}"
                  for attribute, value in tree.items()]
        return _arguments_block(name, items, indent)

    def _variable_read(self, name: str) -> str:
        return f"{_attribute(name)}[...]"

    def _callee(self, block: Block, name: str) -> str:
        return "super().__call__" if name == self.tree(block)[1] else self.references(block)[name]
