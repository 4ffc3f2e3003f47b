"""Flax variables as files: written flat (``params/layer1_0/bn1/weight``), read back checked."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import formats
from .copying import Copy, as_variables, copy_checked
from .matching import Entry, match_flat_names
from .paths import display_name, flatten_tree, names_from_tree
from .report import PortingError, PortReport


def save_variables(variables: Any, path: str) -> None:
    """Write Flax variables (a linen dict or an NNX state) as Flax msgpack (``.msgpack``,
    ``flax.serialization``), ``.safetensors`` / ``.npz`` (names ``params/layer1_0/bn1/weight``)
    or an Orbax checkpoint directory (a path without an extension), atomically
    (:func:`jaxbn.porting.formats.write_checkpoint`)."""
    formats.write_checkpoint(names_from_tree(variables), path)


def load_variables(path: str, target: Any, *, cast: bool = False, strict: bool = True) -> tuple[dict, PortReport]:
    """Read variables written by :func:`save_variables` (or the CLI), checked against ``target``.

    Names match exactly, or else by collection, :func:`jaxbn.porting.canonical_name` of the module
    path and leaf, as :func:`jaxbn.porting.torch_to_flax` matches
    (``params/layer1_0/downsample_0/kernel`` in the file fills
    ``params/layer1_0/downsample/0/kernel`` of an NNX-style target). Unlike
    ``flax.serialization.from_state_dict``, unexpected keys are an error (not dropped) and
    shapes and dtypes are checked; all problems are reported together.
    """
    loaded = formats.read_checkpoint(path)
    flax_flat = flatten_tree(target)
    matches, unexpected = match_flat_names(list(loaded), flax_flat)
    used = set(matches.values())
    report = PortReport(missing_keys=[display_name(p) for p in flax_flat if p not in used],
                        unexpected_keys=unexpected)

    def copy(name: str) -> Copy:
        p, value = matches[name], loaded[name]
        return Copy(Entry(name, p, "identity", value.shape, value.shape), p, name, value, flax_flat[p],
                    f"{name}: the file has shape {value.shape}, the target {tuple(np.shape(flax_flat[p]))}")

    out = dict(flax_flat)
    out.update(copy_checked(map(copy, matches), cast, report))
    if strict and not report.ok:
        raise PortingError(report, f"{path!r} into the target variables")
    return as_variables(out, as_jax=True), report
