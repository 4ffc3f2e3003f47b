"""The translator's intermediate representation: a captured torch module as hashable data.

A :class:`Block` is one traced torch module: its inputs, its operations (:class:`Op`) and its
children, each a :class:`Layer` (a torch layer and the linen layer replacing it) or a further
block. Capture (:mod:`.tracing`, needs torch) builds it; :mod:`.module` runs it and :mod:`.emit`
writes it as source. Pure Python: no torch, no JAX.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any

__all__ = ["NO_DEFAULT", "Block", "Dict", "Layer", "Op", "Ref", "Slice", "Variable", "call_kwargs", "fresh_name",
           "join_path", "refs"]

NO_DEFAULT = inspect.Parameter.empty
"""An input without a default value."""


@dataclasses.dataclass(frozen=True)
class Ref:
    """An operation's argument that is the result of an earlier operation (or an input)."""

    name: str


@dataclasses.dataclass(frozen=True)
class Slice:
    """A ``slice`` in an index (``slice`` itself is unhashable before Python 3.12)."""

    start: Any
    stop: Any
    step: Any


@dataclasses.dataclass(frozen=True)
class Dict:
    """A ``dict`` value (a forward returning ``{'out': x}``): ``items`` as ``(key, value)`` pairs,
    keys constants, values IR arguments (``dict`` itself is unhashable)."""

    items: tuple[tuple[Any, Any], ...]


@dataclasses.dataclass(frozen=True)
class Op:
    """One operation of a block's forward (a ``torch.fx`` node).

    Attributes:
      out: the name of its result.
      kind: ``'module'`` (call the child named ``target``), ``'function'`` (``target`` names an
        entry of :data:`jaxbn.translate.ops.OPS`) or ``'variable'`` (the block's own parameter or
        buffer named ``target``: a :class:`Variable`).
      args, kwargs: arguments; :class:`Ref` for earlier results, else constants.
    """

    out: str
    kind: str
    target: str
    args: tuple
    kwargs: tuple[tuple[str, Any], ...] = ()


@dataclasses.dataclass(frozen=True)
class Layer:
    """A torch layer as the linen module that replaces it.

    Attributes:
      cls: class name in :mod:`.layers`, or for a norm its family's name (the :mod:`jaxbn.linen`
        class, ``BatchNorm`` / ``InstanceNorm``).
      kwargs: constructor arguments (torch's values, read off the module).
      call_kwargs: arguments of every call (a norm's flipped ``track_running_stats``; ``train``
        for a layer whose mode is fixed, e.g. a BatchNorm in eval inside a training model).
      takes_train: the call takes the caller's ``train=`` (norms, dropout, stochastic depth whose
        mode follows the model's).
      is_norm: a BatchNorm / InstanceNorm layer (a :mod:`jaxbn.linen` class, core parameters
        always spelled out).
      shares_scope: its variables are its parent's (the norm of a BatchNorm subclass whose own
        ``forward`` calls ``F.batch_norm`` and more: the block is the norm, its variables sit
        under the block's torch path).
      torch_path, torch_type: where it came from (for messages and audits).
    """

    cls: str
    kwargs: tuple[tuple[str, Any], ...]
    call_kwargs: tuple[tuple[str, Any], ...] = ()
    takes_train: bool = False
    is_norm: bool = False
    shares_scope: bool = False
    torch_path: str = ""
    torch_type: str = ""


@dataclasses.dataclass(frozen=True)
class Variable:
    """A parameter or buffer a block's own ``forward`` reads (``self.weight``, not inside a layer).

    Attributes:
      name: the torch attribute (also the Flax variable's name).
      collection: ``'params'`` for a torch parameter, ``'batch_stats'`` for a buffer (never
        changed: capture refuses in-place writes to it).
      shape, dtype: its shape and NumPy dtype.
    """

    name: str
    collection: str
    shape: tuple[int, ...]
    dtype: Any


@dataclasses.dataclass(frozen=True)
class Block:
    """A traced torch module: ``inputs`` (name, default), ``ops``, ``output``, ``children`` and
    the ``variables`` its own forward reads."""

    torch_type: str
    torch_path: str
    inputs: tuple[tuple[str, Any], ...]
    ops: tuple[Op, ...]
    output: Any
    children: tuple[tuple[str, Layer | Block], ...]
    variables: tuple[Variable, ...] = ()

    takes_train = True  # a block passes ``train`` on to its children


def call_kwargs(child: Layer | Block, train: Any) -> tuple[tuple[str, Any], ...]:
    """What every call of ``child`` adds to its call site's arguments: ``train`` (the value, or
    its source text) where it takes one, then a layer's fixed call arguments."""
    extra = (("train", train),) if child.takes_train else ()
    return extra + (child.call_kwargs if isinstance(child, Layer) else ())


def refs(value: Any) -> set[str]:
    """The names of the results an argument (possibly nested) uses."""
    if isinstance(value, Ref):
        return {value.name}
    if isinstance(value, Dict):
        return refs(tuple(v for _, v in value.items))
    if isinstance(value, (tuple, Slice)):
        items = value if isinstance(value, tuple) else (value.start, value.stop, value.step)
        return set().union(*(refs(v) for v in items)) if items else set()
    return set()


def fresh_name(taken: set[str], base: str) -> str:
    """``base`` or ``base_1``, ``base_2``, ...: the first not in ``taken`` (then added to it), for
    a value a pass adds to a block."""
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


def join_path(path: str, name: str) -> str:
    """A child's torch path: ``layer1`` + ``0`` -> ``layer1.0`` (the root's path is ``''``)."""
    return f"{path}.{name}" if path else name


@dataclasses.dataclass(frozen=True)
class _Canonical:
    """An IR value in :func:`same_capture`'s comparable form (a private type: no constant is one)."""

    kind: Any
    fields: tuple


def _comparable(value: Any) -> Any:
    """``value`` with IR dataclasses spelled out and every NaN float replaced by a marker of its
    sign: a forward with a NaN constant is one forward, though ``nan != nan``."""
    if isinstance(value, float) and value != value:
        return _Canonical(float, ("nan", math.copysign(1.0, value) < 0))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _Canonical(type(value), tuple(_comparable(getattr(value, f.name))
                                             for f in dataclasses.fields(value)))
    if isinstance(value, tuple):
        return _Canonical(tuple, tuple(_comparable(v) for v in value))
    return value


def same_capture(a: Any, b: Any) -> bool:
    """Whether two captures (blocks, layers or any IR value) describe the same computation:
    ``==``, except that equal NaN constants are equal."""
    return _comparable(a) == _comparable(b)
