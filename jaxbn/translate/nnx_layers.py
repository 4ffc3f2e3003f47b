"""torch's ``nn`` layers as Flax NNX modules, in torch's layout: what ``from_torch(..., api="nnx")``
builds and ``python -m jaxbn port --nnx`` writes.

Each class here is its linen twin of :mod:`.layers` (the one implementation: same math, same
torch initialization, same variable names) held the NNX way: the constructor arguments are
attributes (assign them like torch's: ``model.drop.p = 0.0``), the parameters are
:class:`flax.nnx.Param` attributes built eagerly from ``rngs``, and layers with a mode
(dropout, stochastic depth) hold NNX's ``deterministic`` (``not module.training``), set by
``model.train()`` / ``model.eval()``. The norms are :mod:`jaxbn.nnx`'s. Containers mirror
torch's tree: :class:`Sequential` (callable, indexable), :class:`ModuleList` and
:class:`Container` (a torch module whose forward is not called, only its children).

A torch parameter with ``requires_grad=False`` is a :class:`FrozenParam`, which ``nnx.grad`` and
``nnx.Optimizer(..., wrt=nnx.Param)`` leave alone, as torch computes no gradient for it.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterator
from typing import Any, ClassVar

import flax.linen as nn
import jax
from flax import nnx

from . import layers

__all__ = ["Container", "FrozenParam", "ModuleList", "Sequential", "TorchLayer", "nnx_layer_class",
           *(name for name in layers.__all__ if name not in ("build_layer", "layer_class", "declare_params"))]


class FrozenParam(nnx.Variable):
    """A torch parameter with ``requires_grad=False``: trained by neither ``nnx.grad`` (which
    differentiates ``nnx.Param``) nor ``nnx.Optimizer(model, tx, wrt=nnx.Param)``; ported to and
    from torch like a parameter."""


class TorchLayer(nnx.Module):
    """A :mod:`.layers` linen layer held as an NNX module (subclasses set ``linen``).

    ``__init__`` takes the linen layer's fields (torch's constructor arguments), plus ``rngs``
    (for the initial parameters and a dropout stream) and, for a layer with a mode,
    ``deterministic`` (``not training``; default ``False``, as torch modules start training).
    """

    linen: ClassVar[type[nn.Module]]
    fields: ClassVar[tuple[str, ...]]  # the linen layer's (torch's constructor arguments)
    takes_train: ClassVar[bool]  # a layer with a mode (its linen call takes ``train``)

    def __init__(self, *args: Any, rngs: nnx.Rngs | None = None, deterministic: bool = False,
                 **kwargs: Any) -> None:
        layer = self.linen(*args, **kwargs)
        for name in self.fields:
            if name in _TOGGLES:  # torch's way: the parameter, or None (set below)
                setattr(self, name, nnx.data(None))
            else:
                setattr(self, name, getattr(layer, name))
        specs = _param_specs(layer)
        if specs and rngs is None:
            raise TypeError(f"{type(self).__name__} has parameters: pass rngs=nnx.Rngs(...) for their "
                            "initial values")
        for name, (shape, init) in specs.items():
            setattr(self, name, nnx.Param(init(rngs.params(), shape, layer.param_dtype)))
        if self.takes_train:
            self.deterministic = deterministic
            self.rngs = rngs["dropout"].fork() if rngs is not None else nnx.data(None)

    def __call__(self, *args: Any, **kwargs: Any) -> jax.Array:
        """The layer's forward (torch's), with the attributes' current values."""
        layer = self.linen(**{name: getattr(self, name) is not None if name in _TOGGLES else getattr(self, name)
                              for name in self.fields})
        variables = {"params": {name: getattr(self, name)[...] for name in _param_specs(layer)}}
        rngs = None
        if self.takes_train:
            kwargs["train"] = not self.deterministic
            if kwargs["train"] and self.p != 0:
                if self.rngs is None:
                    raise ValueError(f"{type(self).__name__} in training with p={self.p} draws random "
                                     "numbers: build it with rngs=nnx.Rngs(dropout=...)")
                rngs = {"dropout": self.rngs()}
        return layer.apply(variables, *args, rngs=rngs, **kwargs)

    def set_view(self, deterministic: bool | None = None) -> None:
        """Used by ``nnx.view(model, deterministic=...)``."""
        if deterministic is not None and self.takes_train:
            self.deterministic = deterministic


_TOGGLES = ("bias",)
"""Constructor flags named like the parameter they create (``bias=True``): as in torch, the
attribute is the parameter, or ``None`` without one."""


def _param_specs(layer: nn.Module) -> dict[str, tuple[tuple[int, ...], Any]]:
    """``layer.param_specs()``; ``{}`` for a layer without parameters."""
    return layer.param_specs() if hasattr(layer, "param_specs") else {}


def nnx_layer_class(linen: type[nn.Module]) -> type[TorchLayer]:
    """The NNX class of a :mod:`.layers` linen class (same name, same docstring)."""
    return globals()[linen.__name__]


def _define(linen: type[nn.Module]) -> type[TorchLayer]:
    fields = tuple(f.name for f in dataclasses.fields(linen) if f.name not in ("parent", "name"))
    takes_train = "train" in inspect.signature(linen.__call__).parameters
    return type(linen.__name__, (TorchLayer,), {"linen": linen, "fields": fields, "takes_train": takes_train,
                                                "__doc__": linen.__doc__, "__module__": __name__,
                                                "__qualname__": linen.__name__})


for _name in __all__:
    _linen = getattr(layers, _name, None)
    if isinstance(_linen, type) and issubclass(_linen, nn.Module):
        globals()[_name] = _define(_linen)
del _name, _linen


class Container(nnx.Module):
    """A torch module whose own ``forward`` the model never calls, only its children: they are
    its attributes under torch's names (``model.encoder.conv1``); ``m[k]`` is the child ``k``."""

    def __init__(self, **children: nnx.Module) -> None:
        for name, child in children.items():
            setattr(self, name, child)

    def __getitem__(self, key: int | str) -> nnx.Module:
        if isinstance(key, int):
            names = self._child_names()
            key = names[key] if -len(names) <= key < len(names) and not isinstance(key, bool) else str(key)
        if not hasattr(self, str(key)):
            raise IndexError(f"{type(self).__name__} has no child {key!r}")
        return getattr(self, str(key))

    def __len__(self) -> int:
        return len(self._child_names())

    def __iter__(self) -> Iterator[nnx.Module]:
        return (getattr(self, name) for name in self._child_names())

    def _child_names(self) -> list[str]:
        return [name for name, value in vars(self).items() if isinstance(value, nnx.Module)]


class ModuleList(Container):
    """``torch.nn.ModuleList``: children ``0, 1, ...``; ``m[i]``, ``len(m)``, iteration."""

    def __init__(self, *modules: nnx.Module, **named: nnx.Module) -> None:
        super().__init__(**{str(i): m for i, m in enumerate(modules)}, **named)


class Sequential(ModuleList):
    """``torch.nn.Sequential``: ``m(x)`` runs the children in order; ``m[i]`` is one."""

    def __call__(self, x: Any) -> Any:
        for child in self:
            x = child(x)
        return x
