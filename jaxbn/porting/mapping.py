"""torch ``state_dict`` <-> Flax variables, with torch's strictness.

Name convention (the default mapping)
-------------------------------------
A torch key ``layer1.0.bn1.running_mean`` is *module path* ``layer1.0.bn1`` + *leaf*
``running_mean``. A Flax variable ``variables['batch_stats']['layer1_0']['bn1']['running_mean']``
is collection + module path ``('layer1_0', 'bn1')`` + leaf. The two match when their module paths
agree after *canonicalization* (:func:`canonical_name`): joined with ``.``, every lowercase
``name_<int>`` becomes ``name.<int>``, while Flax's automatic names of compact submodules, a
capitalized class name and an index (``Conv_0``, ``BatchNorm_1``), stay one name (and a torch
``Conv.0`` is read as ``Conv_0``). So Flax submodules named like the torch attributes match by
default, including the names Flax gives list attributes (``self.layer1 = [Block(), ...]`` in
``setup`` is ``layer1_0``, ...) and NNX's nested integer keys (``('layer1', 0, 'bn1')``).

Leaves map as: ``weight`` -> ``weight`` (jaxbn's BatchNorm: 1:1), or ``kernel`` (``nn.Conv`` /
``nn.Dense``: conv ``(O, I, *k)`` -> ``(*k, I, O)`` for 1d/2d/3d, linear ``(out, in)`` ->
``(in, out)``), or ``scale`` (LayerNorm/GroupNorm), or ``embedding`` (``nn.Embed``); every other
leaf (``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``) keeps its name. The
collection (``params`` / ``batch_stats``) is wherever the target holds that leaf.

When the names differ, ``rules`` rewrite each torch key before matching: a callable
``key -> new key`` (``None`` drops the key on purpose) or a list of ``(regex, replacement)``
applied in order with :func:`re.sub`.

Strictness
----------
Like ``torch.nn.Module.load_state_dict(strict=True)``, one :class:`PortingError` lists every
missing key, unexpected key, shape mismatch and dtype mismatch together. With ``strict=False``
the :class:`PortReport` is returned instead and unmatched target leaves keep their value.
A checkpoint without ``num_batches_tracked`` (torch's version-1 BatchNorm) loads it from the
target (0 for a fresh one), as torch does. Floating dtypes must agree unless ``cast=True``
(torch casts silently; a float64 checkpoint quietly becoming float32 is how ports stop being
exact). Integer counters convert to the target's integer type (int32 when ``jax_enable_x64``
is off) and are refused if the value does not fit.
"""

from __future__ import annotations

import collections
from copy import deepcopy
import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from . import formats as checkpoint_io
from .errors import CheckpointError
from .paths import SEP, flatten_tree, path_name, plain_tree, unflatten_tree  # noqa: F401 (plain_tree: re-exported)
from .tensors import as_numpy, numpy_to_tensor
from ..functional.types import counter_dtype

__all__ = [
    "PortReport",
    "PortingError",
    "canonical_name",
    "flatten_tree",
    "flax_to_torch",
    "load_variables",
    "save_variables",
    "structural_flax_target",
    "structural_torch_target",
    "target_from_module",
    "torch_to_flax",
    "unflatten_tree",
]

Rules = Callable[[str], "str | None"] | Sequence[tuple[str, str]] | None
FlaxPath = tuple[str, ...]

COLLECTIONS = ("params", "batch_stats")
BUFFER_LEAVES = ("running_mean", "running_var", "num_batches_tracked")
COUNTER = "num_batches_tracked"
WEIGHT_ALIASES = ("weight", "kernel", "scale", "embedding")
_INDEXED = re.compile(r"(.+)_(\d+)")
_AUTO_NAMED = re.compile(r"[A-Z][A-Za-z0-9]*(_\d+)+")  # Flax's compact names: Conv_0, BatchNorm_1


class PortingError(ValueError):
    """The checkpoint does not fit the target; ``.report`` holds every problem."""

    def __init__(self, report: "PortReport", what: str):
        self.report = report
        super().__init__(f"Error(s) in loading {what}:\n{report.errors_text()}")


@dataclasses.dataclass
class Entry:
    """One matched pair: a torch key and a Flax path, with the layout change between them."""

    torch_key: str
    flax_path: FlaxPath
    transform: str  # "identity" | "linear" | "conv1d" | "conv2d" | "conv3d"
    torch_shape: tuple[int, ...]
    flax_shape: tuple[int, ...]


@dataclasses.dataclass
class PortReport:
    """What a conversion did and what did not fit (torch's ``_IncompatibleKeys`` and more)."""

    matched: list[Entry] = dataclasses.field(default_factory=list)
    missing_keys: list[str] = dataclasses.field(default_factory=list)
    unexpected_keys: list[str] = dataclasses.field(default_factory=list)
    shape_mismatches: list[str] = dataclasses.field(default_factory=list)
    dtype_mismatches: list[str] = dataclasses.field(default_factory=list)
    filled: list[str] = dataclasses.field(default_factory=list)
    ignored: list[str] = dataclasses.field(default_factory=list)
    hints: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No missing/unexpected keys and no shape/dtype mismatches."""
        return not (self.missing_keys or self.unexpected_keys or self.shape_mismatches
                    or self.dtype_mismatches)

    def errors_text(self) -> str:
        """torch-style listing of every problem, one category per line."""
        lines = []
        if self.missing_keys:
            lines.append("\tMissing key(s): " + ", ".join(f'"{k}"' for k in self.missing_keys) + ".")
        if self.unexpected_keys:
            lines.append("\tUnexpected key(s): " + ", ".join(f'"{k}"' for k in self.unexpected_keys) + ".")
        lines += [f"\tsize mismatch for {m}" for m in self.shape_mismatches]
        lines += [f"\tdtype mismatch for {m}" for m in self.dtype_mismatches]
        lines += [f"\thint: {h}" for h in self.hints]
        return "\n".join(lines)

    def __str__(self) -> str:
        rows = [f"{e.torch_key:40s} -> {_show(e.flax_path):45s} {e.transform:8s} "
                f"{e.torch_shape} -> {e.flax_shape}" for e in self.matched]
        rows += [f"{k:40s} -> (from target) num_batches_tracked absent: version-1 checkpoint"
                 for k in self.filled]
        rows += [f"{k:40s} -> (dropped by rules)" for k in self.ignored]
        status = "OK" if self.ok else "PROBLEMS:\n" + self.errors_text()
        return "\n".join(rows + [f"{len(self.matched)} tensors mapped; {status}"])


def canonical_name(path: str | Sequence[Any]) -> str:
    """``'layer1_0.bn1'``, ``('layer1', 0, 'bn1')`` and ``'layer1.0.bn1'`` -> ``'layer1.0.bn1'``.

    A lowercase ``name_<int>`` (a list attribute) splits into ``name.<int>``; a capitalized
    ``Name_<int>`` (Flax's automatic name of a compact submodule, ``Conv_0``) stays one name, and
    an index following a capitalized name joins it (torch ``Conv.0`` -> ``Conv_0``).
    """
    parts = path.split(".") if isinstance(path, str) else [str(p) for p in path]
    out: list[str] = []
    for part in parts:
        if part.isdigit() and out and out[-1][:1].isupper():
            out[-1] = f"{out[-1]}_{part}"
            continue
        indices = []
        while _AUTO_NAMED.fullmatch(part) is None and (m := _INDEXED.fullmatch(part)) is not None:
            part, index = m.group(1), m.group(2)
            indices.append(index)
        out += [part, *reversed(indices)]
    return ".".join(p for p in out if p != "")


def _split_key(key: str) -> tuple[str, str]:
    module, _, leaf = key.rpartition(".")
    return module, leaf


# ---------------------------------------------------------------- layouts

def _to_flax(transform: str, w: np.ndarray) -> np.ndarray:
    if transform == "linear":
        return np.ascontiguousarray(w.T)
    if transform.startswith("conv"):
        return np.ascontiguousarray(np.transpose(w, (*range(2, w.ndim), 1, 0)))
    return w


def _to_torch(transform: str, w: np.ndarray) -> np.ndarray:
    if transform == "linear":
        return np.ascontiguousarray(w.T)
    if transform.startswith("conv"):
        n = w.ndim
        return np.ascontiguousarray(np.transpose(w, (n - 1, n - 2, *range(n - 2))))
    return w


def _kernel_transform(torch_ndim: int) -> str:
    return "linear" if torch_ndim == 2 else f"conv{torch_ndim - 2}d" if torch_ndim > 2 else "identity"


def _flax_shape(transform: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(_to_flax(transform, np.empty(shape, np.int8)).shape)


# ---------------------------------------------------------------- trees

def _is_linen(flat: Mapping[tuple, Any]) -> bool:
    return bool(flat) and all(len(p) > 1 and p[0] in COLLECTIONS for p in flat)


def _module_path(path: tuple, linen: bool) -> tuple:
    return path[1:-1] if linen else path[:-1]


def _show(path: tuple) -> str:
    """A path as its flat name for messages (never refused: it only reports)."""
    try:
        return path_name(path)
    except CheckpointError:
        return repr(path)


# ---------------------------------------------------------------- matching

def _apply_rules(key: str, rules: Rules) -> str | None:
    if rules is None:
        return key
    if callable(rules):
        return rules(key)
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


@dataclasses.dataclass
class _Plan:
    """How torch keys pair with Flax leaves, before any value is looked at."""

    entries: list[Entry]
    unmatched: list[str]  # torch keys with no Flax leaf
    missing: list[str]  # Flax leaves (shown) with no torch key
    filled: list[tuple]  # Flax counters a version-1 checkpoint lacks
    ignored: list[str]  # torch keys dropped by the rules


def _plan(
    torch_shapes: Mapping[str, tuple[int, ...]],
    flax_flat: Mapping[tuple, Any],
    rules: Rules,
) -> _Plan:
    """Match torch keys to Flax leaves by canonical module name and leaf."""
    linen = _is_linen(flax_flat)
    index: dict[tuple[str, str], tuple] = {}
    for path in flax_flat:
        index[(canonical_name(_module_path(path, linen)), str(path[-1]))] = path
    entries, unmatched, ignored, used = [], [], [], set()
    for key, shape in torch_shapes.items():
        renamed = _apply_rules(key, rules)
        if renamed is None:
            ignored.append(key)
            continue
        module, leaf = _split_key(renamed)
        module = canonical_name(module)
        candidates = WEIGHT_ALIASES if leaf == "weight" else (leaf,)
        path = next((index[(module, c)] for c in candidates if (module, c) in index), None)
        if path is None or path in used:
            unmatched.append(key)
            continue
        used.add(path)
        transform = _kernel_transform(len(shape)) if path[-1] == "kernel" and leaf == "weight" else "identity"
        flax_shape = tuple(np.shape(flax_flat[path]))
        entries.append(Entry(key, path, transform, tuple(shape), flax_shape))
    missing = [p for p in flax_flat if p not in used]
    # torch's BatchNorm._load_from_state_dict: a checkpoint without num_batches_tracked
    # (version 1) keeps the module's current counter.
    filled = [p for p in missing if str(p[-1]) == COUNTER]
    missing_shown = [_show(p) for p in missing if p not in filled]
    return _Plan(entries, unmatched, missing_shown, filled, ignored)


def _bn_hints(unexpected: Sequence[str], flax_flat: Mapping[tuple, Any]) -> list[str]:
    linen = _is_linen(flax_flat)
    has_stats = {canonical_name(_module_path(p, linen)) for p in flax_flat if str(p[-1]) in BUFFER_LEAVES}
    modules = {canonical_name(_module_path(p, linen)) for p in flax_flat}
    hints = []
    for key in unexpected:
        module, leaf = _split_key(key)
        if leaf in BUFFER_LEAVES and canonical_name(module) in modules and canonical_name(module) not in has_stats:
            hints.append(f"{module} has no running statistics in the target: was its BatchNorm "
                         f"built with track_running_stats=False while the checkpoint's was not?")
    return sorted(set(hints))


@dataclasses.dataclass(frozen=True)
class _Copy:
    """One matched value on its way into the output, with what it must fit."""

    entry: Entry
    key: Any  # where it goes in the output
    name: str  # how a dtype problem names it
    value: np.ndarray  # already in the target's layout
    target: Any  # a leaf with the wanted shape and dtype
    size_mismatch: str  # the report line if the shapes differ


def _copy_checked(copies: Iterable[_Copy], cast: bool, report: PortReport) -> dict:
    """The one strict loop of every direction: check the shape, coerce the dtype, record.

    Returns ``{key: value in the target's dtype}`` for the copies that fit; every one that
    does not adds a line to ``report``.
    """
    out = {}
    for c in copies:
        if c.value.shape != tuple(np.shape(c.target)):
            report.shape_mismatches.append(c.size_mismatch)
            continue
        value = _coerce(c.name, c.value, c.target, cast, report)
        if value is not None:
            out[c.key] = value
            report.matched.append(c.entry)
    return out


def _coerce(name: str, value: np.ndarray, target: Any, cast: bool, report: PortReport) -> np.ndarray | None:
    """``value`` in the target's dtype, or None (and a report line) if it cannot be."""
    want = np.dtype(target.dtype)
    have = value.dtype
    if have == want:
        return value
    if np.issubdtype(have, np.integer) and np.issubdtype(want, np.integer):
        info = np.iinfo(want)
        if value.size and (value.min() < info.min or value.max() > info.max):
            report.dtype_mismatches.append(
                f"{name}: value {value.max()} of {have} does not fit the target's {want}"
                + (" (enable jax_enable_x64 for int64 counters)" if want == np.int32 else ""))
            return None
        return value.astype(want)
    if cast and _is_float(have) and _is_float(want):
        return value.astype(want)
    report.dtype_mismatches.append(
        f"{name}: copying a param with dtype {have} from checkpoint, the dtype in the current "
        f"model is {want}" + (" (pass cast=True to convert)" if _is_float(have) and _is_float(want) else ""))
    return None


def _is_float(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16"


def torch_to_flax(
    state_dict: Mapping[str, Any],
    target: Any,
    *,
    rules: Rules = None,
    strict: bool = True,
    cast: bool = False,
    as_jax: bool = True,
) -> tuple[dict, PortReport]:
    """Fill Flax variables from a torch ``state_dict``.

    PyTorch equivalent: ``model.load_state_dict(state_dict, strict=strict)``, with the target
    being the Flax model's variables.

    Args:
      state_dict: ``{torch key: tensor or array}`` (``model.state_dict()`` or
        :func:`jaxbn.checkpoint_io.read_checkpoint`).
      target: initialized variables ``{'params': ..., 'batch_stats': ...}`` (or an NNX
        ``nnx.State`` / pure dict), whose leaves may be abstract (``jax.ShapeDtypeStruct``, see
        :func:`target_from_module`). Gives the structure, shapes and dtypes to produce.
      rules: name rewriting, see the module docstring.
      strict: raise :class:`PortingError` on any problem (else return it in the report).
      cast: allow converting between floating dtypes.
      as_jax: return ``jax.Array`` leaves (else NumPy arrays, e.g. to write a file).

    Returns:
      ``(variables, report)``: plain nested dicts of arrays shaped like ``target``.
    """
    arrays = {k: as_numpy(v) for k, v in state_dict.items()}
    flax_flat = flatten_tree(target)
    plan = _plan({k: a.shape for k, a in arrays.items()}, flax_flat, rules)
    report = PortReport(missing_keys=plan.missing, unexpected_keys=plan.unmatched, ignored=plan.ignored,
                        filled=[_show(p) for p in plan.filled])
    report.hints = _bn_hints(plan.unmatched, flax_flat)

    def copy(e: Entry) -> _Copy:
        value = _to_flax(e.transform, arrays[e.torch_key])
        target_leaf = flax_flat[e.flax_path]
        return _Copy(e, e.flax_path, e.torch_key, value, target_leaf,
                     f"{e.torch_key}: copying a param with shape {e.torch_shape} from checkpoint "
                     f"({e.transform} layout {value.shape}), the shape in the current model is "
                     f"{tuple(np.shape(target_leaf))} at {_show(e.flax_path)}")

    out = dict(flax_flat)
    out.update(_copy_checked(map(copy, plan.entries), cast, report))
    for p in plan.filled:
        leaf = flax_flat[p]
        out[p] = np.zeros((), leaf.dtype) if isinstance(leaf, jax.ShapeDtypeStruct) else leaf
    if strict and not report.ok:
        raise PortingError(report, "torch state_dict into Flax variables")
    return _variables(out, as_jax), report


def _variables(flat: Mapping[tuple, Any], as_jax: bool) -> dict:
    """Nested variables from ``{path: value}``, as ``jax.Array`` (checked) or NumPy."""
    if as_jax:
        return unflatten_tree({p: _as_jax(v, _show(p)) for p, v in flat.items()})
    return unflatten_tree({p: v if isinstance(v, jax.ShapeDtypeStruct) else np.asarray(v)
                           for p, v in flat.items()})


def _as_jax(value: Any, name: str) -> Any:
    """``jnp.asarray``, refusing the silent float64 -> float32 JAX does when x64 is off."""
    if isinstance(value, jax.ShapeDtypeStruct):
        return value
    import jax.numpy as jnp

    value = np.asarray(value)
    if jax.dtypes.canonicalize_dtype(value.dtype) != value.dtype:
        raise TypeError(
            f"{name} is {value.dtype}, which JAX would silently turn into "
            f"{jax.dtypes.canonicalize_dtype(value.dtype)} because jax_enable_x64 is off: call "
            f"jax.config.update('jax_enable_x64', True) first, or give a target in the smaller "
            f"dtype (torch_to_flax(..., cast=True))")
    return jnp.asarray(value)


def flax_to_torch(
    variables: Any,
    torch_target: Any,
    *,
    rules: Rules = None,
    strict: bool = True,
    cast: bool = False,
    as_torch: bool = False,
) -> tuple[dict, PortReport]:
    """A torch ``state_dict`` from Flax variables, for ``torch_model.load_state_dict(strict=True)``.

    PyTorch equivalent: ``torch_model.state_dict()`` after training the Flax model instead.

    Args:
      variables: Flax variables (linen dict or NNX state / pure dict).
      torch_target: what to produce: a ``torch.nn.Module``, its ``state_dict()``, or any
        ``{key: array}`` with the keys, shapes and dtypes wanted (see
        :func:`structural_torch_target`). Same name rules as :func:`torch_to_flax`, applied to
        these torch keys.
      strict: raise :class:`PortingError` on any problem.
      cast: allow converting between floating dtypes (else a dtype mismatch is an error).
      as_torch: return torch tensors (else NumPy arrays), bit-exact either way.
    """
    if hasattr(torch_target, "state_dict") and callable(torch_target.state_dict):
        torch_target = torch_target.state_dict()
    # torch's per-module version metadata travels with a state_dict: without it BatchNorm's
    # _load_from_state_dict treats the dict as version 1 and adds num_batches_tracked to a layer
    # built without buffers whose track_running_stats was set later (strict loading then fails).
    metadata = getattr(torch_target, "_metadata", None)
    targets = {k: as_numpy(v) for k, v in torch_target.items()}
    flax_flat = {p: np.asarray(v) for p, v in flatten_tree(variables).items()}
    plan = _plan({k: a.shape for k, a in targets.items()}, flax_flat, rules)
    report = PortReport(missing_keys=plan.unmatched,
                        unexpected_keys=plan.missing + [_show(p) for p in plan.filled],
                        ignored=plan.ignored)

    def copy(e: Entry) -> _Copy:
        value = _to_torch(e.transform, flax_flat[e.flax_path])
        want = targets[e.torch_key]
        return _Copy(e, e.torch_key, _show(e.flax_path), value, want,
                     f"{e.torch_key}: {_show(e.flax_path)} has shape {e.flax_shape} ({e.transform} "
                     f"layout {value.shape}), the torch model expects {want.shape}")

    out = _copy_checked(map(copy, plan.entries), cast, report)
    if strict and not report.ok:
        raise PortingError(report, "Flax variables into a torch state_dict")
    if as_torch:
        out = {k: numpy_to_tensor(v) for k, v in out.items()}
    if metadata is not None:
        out = collections.OrderedDict(out)
        out._metadata = deepcopy(metadata)
    return out, report


# ---------------------------------------------------------------- targets

def target_from_module(module: Any, *example_args: Any, **example_kwargs: Any) -> Any:
    """Abstract variables of a linen ``module`` (shapes and dtypes, no computation).

    ``jax.eval_shape(module.init, PRNGKey(0), *example_args, **example_kwargs)``.
    """
    return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *example_args, **example_kwargs))


def structural_flax_target(state_dict: Mapping[str, Any]) -> dict:
    """The Flax variables a torch ``state_dict`` maps to when no model is given (the CLI).

    Keys split into module path and leaf; an integer path segment joins the previous one with
    ``_`` (``layer1.0.bn1`` -> ``layer1_0/bn1``, as Flax names list attributes). ``weight`` of
    rank >= 2 is a conv/linear kernel (-> ``kernel`` in Flax layout); ``running_mean``,
    ``running_var``, ``num_batches_tracked`` go to ``batch_stats``; everything else to ``params``
    under its torch name (so BatchNorm ``weight``/``bias`` suit :class:`jaxbn.linen.BatchNorm`).
    A BatchNorm with ``running_mean`` but no ``num_batches_tracked`` (torch's version 1) gets a
    counter of 0. Counters get JAX's integer type (int64 with ``jax_enable_x64``, else int32,
    range-checked); float64 tensors need ``jax_enable_x64``.

    Raises:
      CheckpointError: a key that is empty, contains ``/`` or an empty segment (``a..b``), or
        two keys that would become the same Flax name or a leaf and its parent.
    """
    arrays = {k: as_numpy(v) for k, v in state_dict.items()}
    flat: dict[tuple, Any] = {}
    source: dict[tuple, str] = {}
    for key, a in arrays.items():
        module, leaf = _split_key(_checked_torch_key(key))
        path = _flax_module_path(module)
        if leaf == "weight" and a.ndim >= 2:
            t = _kernel_transform(a.ndim)
            flax_path, leaf_value = ("params", *path, "kernel"), jax.ShapeDtypeStruct(_flax_shape(t, a.shape), a.dtype)
        else:
            collection = "batch_stats" if leaf in BUFFER_LEAVES else "params"
            flax_path, leaf_value = (collection, *path, leaf), jax.ShapeDtypeStruct(a.shape, a.dtype)
        if flax_path in source:
            _refuse_collision(source[flax_path], key, f"both map to {_show(flax_path)!r}")
        flat[flax_path], source[flax_path] = leaf_value, key
        if leaf == "running_mean" and f"{module + '.' if module else ''}{COUNTER}" not in arrays:
            flat[("batch_stats", *path, COUNTER)] = jax.ShapeDtypeStruct((), np.int64)
            source[("batch_stats", *path, COUNTER)] = key
    for flax_path, key in source.items():
        for depth in range(1, len(flax_path)):
            if flax_path[:depth] in source:
                _refuse_collision(source[flax_path[:depth]], key,
                                  f"{_show(flax_path[:depth])!r} would be a tensor and the parent of "
                                  f"{_show(flax_path)!r}")
    counter = counter_dtype()  # int32 without x64: counters are range-checked on conversion
    flat = {p: jax.ShapeDtypeStruct(v.shape, counter) if str(p[-1]) == COUNTER else v
            for p, v in flat.items()}
    return unflatten_tree(flat)


def _checked_torch_key(key: str) -> str:
    """``key``, if it names a torch tensor without inventing anything; else CheckpointError."""
    if not key or SEP in key or "" in key.split("."):
        problem = ("is empty" if not key else "contains '/', the separator of Flax names" if SEP in key
                   else "has an empty segment (a leading, trailing or doubled '.')")
        raise CheckpointError(f"torch key {key!r} {problem}: rename it (rules=..., or in torch) "
                              "before converting")
    return key


def _refuse_collision(first: str, second: str, how: str) -> None:
    raise CheckpointError(f"keys {first!r} and {second!r} collide: {how}; rename one of them")


def _flax_module_path(module: str) -> tuple[str, ...]:
    parts: list[str] = []
    for part in module.split(".") if module else []:
        if part.isdigit() and parts:
            parts[-1] = f"{parts[-1]}_{part}"
        else:
            parts.append(part)
    return tuple(parts)


def structural_torch_target(variables: Any) -> dict[str, np.ndarray]:
    """The torch ``state_dict`` keys/shapes/dtypes Flax variables map to without a torch model.

    The inverse of :func:`structural_flax_target`: module paths are joined with ``.`` after
    :func:`canonical_name` (a lowercase ``layer1_0`` -> ``layer1.0``; Flax's automatic names
    ``Conv_0``, ``BatchNorm_1`` stay as they are, so ``Conv_0/kernel`` -> ``Conv_0.weight``),
    ``kernel`` -> ``weight`` in torch layout, ``scale``/``embedding`` -> ``weight``. (A torch
    attribute really named ``conv_1`` would come out as ``conv.1``: give the torch model or a
    reference checkpoint instead, CLI ``--like``.)

    Raises:
      CheckpointError: a Flax key containing ``.`` (the torch separator), or two variables that
        would get the same torch key.
    """
    flat = flatten_tree(variables)
    linen = _is_linen(flat)
    out: dict[str, np.ndarray] = {}
    source: dict[str, tuple] = {}
    for path, leaf in flat.items():
        dotted = [str(p) for p in path if "." in str(p)]
        if dotted:
            raise CheckpointError(f"Flax variable {_show(path)!r}: key {dotted[0]!r} contains '.', "
                                  "the separator of torch keys; rename it or give a torch target (--like)")
        module = canonical_name(_module_path(path, linen))
        name = str(path[-1])
        shape = tuple(np.shape(leaf))
        if name == "kernel":
            shape = tuple(_to_torch(_kernel_transform(len(shape)), np.empty(shape, np.int8)).shape)
        torch_leaf = "weight" if name in WEIGHT_ALIASES else name
        key = f"{module}.{torch_leaf}" if module else torch_leaf
        if key in source:
            _refuse_collision(_show(source[key]), _show(path), f"both map to the torch key {key!r}")
        out[key], source[key] = np.empty(shape, np.asarray(leaf).dtype), path
    return out


# ---------------------------------------------------------------- JAX-side files

def save_variables(variables: Any, path: str) -> None:
    """Write Flax variables as Flax msgpack (``.msgpack``, ``flax.serialization``) or
    ``.safetensors`` / ``.npz`` (names ``params/layer1_0/bn1/weight``), atomically."""
    flat = {path_name(p): np.asarray(v) for p, v in flatten_tree(variables).items()}
    checkpoint_io.write_checkpoint(flat, path)


def load_variables(path: str, target: Any, *, cast: bool = False, strict: bool = True) -> tuple[dict, PortReport]:
    """Read variables written by :func:`save_variables` (or the CLI), checked against ``target``.

    Names match exactly, or else by collection, :func:`canonical_name` of the module path and
    leaf, as :func:`torch_to_flax` matches (``params/layer1_0/downsample_0/kernel`` in the file
    fills ``params/layer1_0/downsample/0/kernel`` of an NNX-style target). Unlike
    ``flax.serialization.from_state_dict``, unexpected keys are an error (not dropped) and
    shapes and dtypes are checked; all problems are reported together.
    """
    loaded = checkpoint_io.read_checkpoint(path)
    flax_flat = flatten_tree(target)
    matches, unexpected = _match_names(loaded, flax_flat)
    used = set(matches.values())
    report = PortReport(missing_keys=[_show(p) for p in flax_flat if p not in used],
                        unexpected_keys=unexpected)

    def copy(name: str) -> _Copy:
        p, value = matches[name], loaded[name]
        return _Copy(Entry(name, p, "identity", value.shape, value.shape), p, name, value, flax_flat[p],
                     f"{name}: the file has shape {value.shape}, the target {tuple(np.shape(flax_flat[p]))}")

    out = dict(flax_flat)
    out.update(_copy_checked(map(copy, matches), cast, report))
    if strict and not report.ok:
        raise PortingError(report, f"{path!r} into the target variables")
    return _variables(out, as_jax=True), report


def _match_names(loaded: Mapping[str, Any], flax_flat: Mapping[tuple, Any]) -> tuple[dict[str, tuple], list[str]]:
    """``({file name: target path}, unmatched file names)``: exact names first, then canonical."""
    linen = _is_linen(flax_flat)
    exact = {_show(p): p for p in flax_flat}

    def canonical(path: tuple) -> tuple:
        return (path[:1] if linen else ()) + (canonical_name(_module_path(path, linen)), str(path[-1]))

    by_canonical = {canonical(p): p for p in flax_flat}
    matches = {name: exact[name] for name in loaded if name in exact}
    taken = set(matches.values())
    for name in loaded:
        parts = tuple(name.split(SEP))
        p = by_canonical.get(canonical(parts)) if name not in matches and all(parts) else None
        if p is not None and p not in taken:
            matches[name] = p
            taken.add(p)
    unexpected = [name for name in loaded if name not in matches]
    return matches, unexpected
