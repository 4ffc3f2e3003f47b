"""torch ``state_dict`` <-> Flax variables, with torch's strictness.

Name convention (the default mapping)
-------------------------------------
A torch key ``layer1.0.bn1.running_mean`` is *module path* ``layer1.0.bn1`` + *leaf*
``running_mean``. A Flax variable ``variables['batch_stats']['layer1_0']['bn1']['running_mean']``
is collection + module path ``('layer1_0', 'bn1')`` + leaf. The two match when their module paths
agree after *canonicalization*: joined with ``.``, every ``name_<int>`` becomes ``name.<int>``.
So Flax submodules named like the torch attributes match by default, including the names Flax
gives list attributes (``self.layer1 = [Block(), ...]`` in ``setup`` is ``layer1_0``, ...) and
NNX's nested integer keys (``('layer1', 0, 'bn1')``).

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

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from . import formats as checkpoint_io
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
        rows = [f"{e.torch_key:40s} -> {'/'.join(e.flax_path):45s} {e.transform:8s} "
                f"{e.torch_shape} -> {e.flax_shape}" for e in self.matched]
        rows += [f"{k:40s} -> (from target) num_batches_tracked absent: version-1 checkpoint"
                 for k in self.filled]
        rows += [f"{k:40s} -> (dropped by rules)" for k in self.ignored]
        status = "OK" if self.ok else "PROBLEMS:\n" + self.errors_text()
        return "\n".join(rows + [f"{len(self.matched)} tensors mapped; {status}"])


def canonical_name(path: str | Sequence[Any]) -> str:
    """``'layer1_0.bn1'``, ``('layer1', 0, 'bn1')`` and ``'layer1.0.bn1'`` -> ``'layer1.0.bn1'``."""
    parts = path.split(".") if isinstance(path, str) else [str(p) for p in path]
    out: list[str] = []
    for part in parts:
        indices = []
        while (m := _INDEXED.fullmatch(part)) is not None:
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

def plain_tree(tree: Any) -> Any:
    """Plain nested dicts from FrozenDict / nnx.State / dict."""
    if hasattr(tree, "to_pure_dict"):
        from flax import nnx

        tree = nnx.to_pure_dict(tree)
    if isinstance(tree, Mapping):
        return {k: plain_tree(v) for k, v in tree.items()}
    return tree


def flatten_tree(tree: Any) -> dict[tuple, Any]:
    """``{path tuple: leaf}`` of nested mappings (variables dicts, FrozenDict, NNX state)."""
    flat = {}

    def visit(prefix: tuple, node: Any) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                visit(prefix + (k,), v)
        else:
            flat[prefix] = node

    visit((), plain_tree(tree))
    return flat


def unflatten_tree(flat: Mapping[tuple, Any]) -> dict:
    """Nested plain dicts from ``{path tuple: leaf}`` (the inverse of :func:`flatten_tree`)."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return tree


def _is_linen(flat: Mapping[tuple, Any]) -> bool:
    return bool(flat) and all(len(p) > 1 and p[0] in COLLECTIONS for p in flat)


def _module_path(path: tuple, linen: bool) -> tuple:
    return path[1:-1] if linen else path[:-1]


def _show(path: tuple) -> str:
    return "/".join(str(p) for p in path)


# ---------------------------------------------------------------- matching

def _apply_rules(key: str, rules: Rules) -> str | None:
    if rules is None:
        return key
    if callable(rules):
        return rules(key)
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def _plan(
    torch_shapes: Mapping[str, tuple[int, ...]],
    flax_flat: Mapping[tuple, Any],
    rules: Rules,
) -> tuple[list[Entry], list[str], list[str], list[str], list[str]]:
    """Match torch keys to Flax leaves: (entries, unmatched torch keys, unmatched Flax paths
    (shown), filled counters (torch keys), torch keys dropped by rules)."""
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
    return entries, unmatched, missing_shown, filled, ignored


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


def _numpy(value: Any) -> np.ndarray:
    if checkpoint_io._is_torch_tensor(value):
        return checkpoint_io.tensor_to_numpy(value)
    return np.asarray(value)


def torch_to_flax(
    state_dict: Mapping[str, Any],
    target: Any,
    *,
    rules: Rules = None,
    strict: bool = True,
    cast: bool = False,
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

    Returns:
      ``(variables, report)``: plain nested dicts of ``jax.Array`` shaped like ``target``.
    """
    arrays = {k: _numpy(v) for k, v in state_dict.items()}
    flax_flat = flatten_tree(target)
    entries, unmatched, missing, filled, ignored = _plan(
        {k: a.shape for k, a in arrays.items()}, flax_flat, rules)
    report = PortReport(matched=[], missing_keys=missing, unexpected_keys=unmatched, ignored=ignored,
                        filled=[_show(p) for p in filled])
    report.hints = _bn_hints(unmatched, flax_flat)
    out = dict(flax_flat)
    for e in entries:
        target_leaf = flax_flat[e.flax_path]
        value = _to_flax(e.transform, arrays[e.torch_key])
        if value.shape != tuple(np.shape(target_leaf)):
            report.shape_mismatches.append(
                f"{e.torch_key}: copying a param with shape {e.torch_shape} from checkpoint "
                f"({e.transform} layout {value.shape}), the shape in the current model is "
                f"{tuple(np.shape(target_leaf))} at {_show(e.flax_path)}")
            continue
        value = _coerce(e.torch_key, value, target_leaf, cast, report)
        if value is not None:
            out[e.flax_path] = value
            report.matched.append(e)
    for p in filled:
        leaf = flax_flat[p]
        out[p] = np.zeros((), leaf.dtype) if isinstance(leaf, jax.ShapeDtypeStruct) else leaf
    if strict and not report.ok:
        raise PortingError(report, "torch state_dict into Flax variables")
    return unflatten_tree({p: _as_jax(v, _show(p)) for p, v in out.items()}), report


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
    targets = {k: _numpy(v) for k, v in torch_target.items()}
    flax_flat = {p: np.asarray(v) for p, v in flatten_tree(variables).items()}
    entries, unmatched, unused, filled, ignored = _plan(
        {k: a.shape for k, a in targets.items()}, flax_flat, rules)
    report = PortReport(missing_keys=unmatched, unexpected_keys=unused + [_show(p) for p in filled],
                        ignored=ignored)
    out: dict[str, Any] = {}
    for e in entries:
        value = _to_torch(e.transform, flax_flat[e.flax_path])
        want = targets[e.torch_key]
        if value.shape != want.shape:
            report.shape_mismatches.append(
                f"{e.torch_key}: {_show(e.flax_path)} has shape {e.flax_shape} ({e.transform} "
                f"layout {value.shape}), the torch model expects {want.shape}")
            continue
        value = _coerce(_show(e.flax_path), value, want, cast, report)
        if value is not None:
            out[e.torch_key] = value
            report.matched.append(e)
    if strict and not report.ok:
        raise PortingError(report, "Flax variables into a torch state_dict")
    if as_torch:
        out = {k: checkpoint_io.numpy_to_tensor(v) for k, v in out.items()}
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
    """
    arrays = {k: _numpy(v) for k, v in state_dict.items()}
    flat: dict[tuple, Any] = {}
    for key, a in arrays.items():
        module, leaf = _split_key(key)
        path = _flax_module_path(module)
        if leaf == "weight" and a.ndim >= 2:
            t = _kernel_transform(a.ndim)
            flat[("params", *path, "kernel")] = jax.ShapeDtypeStruct(_flax_shape(t, a.shape), a.dtype)
        else:
            collection = "batch_stats" if leaf in BUFFER_LEAVES else "params"
            flat[(collection, *path, leaf)] = jax.ShapeDtypeStruct(a.shape, a.dtype)
        if leaf == "running_mean" and f"{module + '.' if module else ''}{COUNTER}" not in arrays:
            flat[("batch_stats", *path, COUNTER)] = jax.ShapeDtypeStruct((), np.int64)
    counter = counter_dtype()  # int32 without x64: counters are range-checked on conversion
    flat = {p: jax.ShapeDtypeStruct(v.shape, counter) if str(p[-1]) == COUNTER else v
            for p, v in flat.items()}
    return unflatten_tree(flat)


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

    The inverse of :func:`structural_flax_target`: ``name_<int>`` -> ``name.<int>``, ``kernel``
    -> ``weight`` in torch layout, ``scale``/``embedding`` -> ``weight``. (A torch attribute
    really named ``conv_1`` would come out as ``conv.1``: give the torch model or a reference
    checkpoint instead, CLI ``--like``.)
    """
    flat = flatten_tree(variables)
    linen = _is_linen(flat)
    out: dict[str, np.ndarray] = {}
    for path, leaf in flat.items():
        module = canonical_name(_module_path(path, linen))
        name = str(path[-1])
        shape = tuple(np.shape(leaf))
        if name == "kernel":
            shape = tuple(_to_torch(_kernel_transform(len(shape)), np.empty(shape, np.int8)).shape)
        torch_leaf = "weight" if name in WEIGHT_ALIASES else name
        out[f"{module}.{torch_leaf}" if module else torch_leaf] = np.empty(shape, np.asarray(leaf).dtype)
    return out


# ---------------------------------------------------------------- JAX-side files

def save_variables(variables: Any, path: str) -> None:
    """Write Flax variables as Flax msgpack (``.msgpack``, ``flax.serialization``) or
    ``.safetensors`` (names ``params/layer1_0/bn1/weight``), atomically."""
    flat = {_show(p): np.asarray(v) for p, v in flatten_tree(variables).items()}
    checkpoint_io.write_checkpoint(flat, path)


def load_variables(path: str, target: Any, *, cast: bool = False, strict: bool = True) -> tuple[dict, PortReport]:
    """Read variables written by :func:`save_variables`, checked against ``target``.

    Unlike ``flax.serialization.from_state_dict``, unexpected keys are an error (not dropped)
    and shapes and dtypes are checked; all problems are reported together.
    """
    loaded = checkpoint_io.read_checkpoint(path)
    flax_flat = flatten_tree(target)
    shown = {_show(p): p for p in flax_flat}
    report = PortReport(missing_keys=[s for s in shown if s not in loaded],
                        unexpected_keys=[k for k in loaded if k not in shown])
    out = dict(flax_flat)
    for name, value in loaded.items():
        if name not in shown:
            continue
        p = shown[name]
        if value.shape != tuple(np.shape(flax_flat[p])):
            report.shape_mismatches.append(
                f"{name}: the file has shape {value.shape}, the target {tuple(np.shape(flax_flat[p]))}")
            continue
        value = _coerce(name, value, flax_flat[p], cast, report)
        if value is not None:
            out[p] = value
            report.matched.append(Entry(name, p, "identity", value.shape, value.shape))
    if strict and not report.ok:
        raise PortingError(report, f"{path!r} into the target variables")
    return unflatten_tree({p: _as_jax(v, _show(p)) for p, v in out.items()}), report
