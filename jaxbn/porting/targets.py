"""What to fill: the Flax or torch target of a conversion, from a module or from names alone.

:func:`target_from_module` gives a linen model's abstract variables; without a model (the CLI),
:func:`structural_flax_target` and :func:`structural_torch_target` derive the target from the
other side's names, refusing any name they would have to invent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from ..functional.types import counter_dtype
from .errors import CheckpointError
from .layouts import flax_shape, kernel_transform, torch_shape
from .names import (
    BUFFER_LEAVES,
    COUNTER,
    WEIGHT_ALIASES,
    canonical_name,
    checked_torch_key,
    flax_module_path,
    is_linen,
    module_path,
    split_key,
)
from .paths import display_name, flatten_tree, unflatten_tree
from .tensors import as_numpy


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
        module, leaf = split_key(checked_torch_key(key))
        path = flax_module_path(module)
        if leaf == "weight" and a.ndim >= 2:
            shape = flax_shape(kernel_transform(a.ndim), a.shape)
            flax_path, leaf_value = ("params", *path, "kernel"), jax.ShapeDtypeStruct(shape, a.dtype)
        else:
            collection = "batch_stats" if leaf in BUFFER_LEAVES else "params"
            flax_path, leaf_value = (collection, *path, leaf), jax.ShapeDtypeStruct(a.shape, a.dtype)
        if flax_path in source:
            _refuse_collision(source[flax_path], key, f"both map to {display_name(flax_path)!r}")
        flat[flax_path], source[flax_path] = leaf_value, key
        if leaf == "running_mean" and f"{module + '.' if module else ''}{COUNTER}" not in arrays:
            flat[("batch_stats", *path, COUNTER)] = jax.ShapeDtypeStruct((), np.int64)
            source[("batch_stats", *path, COUNTER)] = key
    for flax_path, key in source.items():
        for depth in range(1, len(flax_path)):
            if flax_path[:depth] in source:
                _refuse_collision(source[flax_path[:depth]], key,
                                  f"{display_name(flax_path[:depth])!r} would be a tensor and the parent of "
                                  f"{display_name(flax_path)!r}")
    counter = counter_dtype()  # int32 without x64: counters are range-checked on conversion
    flat = {p: jax.ShapeDtypeStruct(v.shape, counter) if str(p[-1]) == COUNTER else v
            for p, v in flat.items()}
    return unflatten_tree(flat)


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
    linen = is_linen(flat)
    out: dict[str, np.ndarray] = {}
    source: dict[str, tuple] = {}
    for path, leaf in flat.items():
        dotted = [str(p) for p in path if "." in str(p)]
        if dotted:
            raise CheckpointError(f"Flax variable {display_name(path)!r}: key {dotted[0]!r} contains '.', "
                                  "the separator of torch keys; rename it or give a torch target (--like)")
        module = canonical_name(module_path(path, linen))
        name = str(path[-1])
        shape = tuple(np.shape(leaf))
        if name == "kernel":
            shape = torch_shape(kernel_transform(len(shape)), shape)
        torch_leaf = "weight" if name in WEIGHT_ALIASES else name
        key = f"{module}.{torch_leaf}" if module else torch_leaf
        if key in source:
            _refuse_collision(display_name(source[key]), display_name(path), f"both map to the torch key {key!r}")
        out[key], source[key] = np.empty(shape, np.asarray(leaf).dtype), path
    return out


def _refuse_collision(first: str, second: str, how: str) -> None:
    raise CheckpointError(f"keys {first!r} and {second!r} collide: {how}; rename one of them")
