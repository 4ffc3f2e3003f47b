"""torch ``state_dict`` -> Flax variables and back, with torch's strictness.

Each direction is the same walk: match names (:mod:`.matching`), change kernel layouts
(:mod:`.layouts`), copy strictly (:mod:`.copying`). Like
``torch.nn.Module.load_state_dict(strict=True)``, one :class:`PortingError` lists every missing
key, unexpected key, shape mismatch and dtype mismatch together; with ``strict=False`` the
:class:`PortReport` is returned instead and unmatched target leaves keep their value. A
checkpoint without ``num_batches_tracked`` (torch's version-1 BatchNorm) loads it from the
target (0 for a fresh one), as torch does.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from copy import deepcopy
from typing import Any

import jax
import numpy as np

from .copying import Copy, as_variables, copy_checked
from .layouts import to_flax, to_torch
from .matching import Entry, match_keys, missing_stats_hints
from .names import Rules
from .paths import display_name, flatten_tree
from .report import PortingError, PortReport
from .tensors import as_numpy, numpy_to_tensor


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
      rules: name rewriting, see :mod:`jaxbn.porting.names`.
      strict: raise :class:`PortingError` on any problem (else return it in the report).
      cast: allow converting between floating dtypes.
      as_jax: return ``jax.Array`` leaves (else NumPy arrays, e.g. to write a file).

    Returns:
      ``(variables, report)``: plain nested dicts of arrays shaped like ``target``.
    """
    arrays = {k: as_numpy(v) for k, v in state_dict.items()}
    flax_flat = flatten_tree(target)
    match = match_keys({k: a.shape for k, a in arrays.items()}, flax_flat, rules)
    report = PortReport(missing_keys=match.missing, unexpected_keys=match.unmatched, ignored=match.ignored,
                        filled=[display_name(p) for p in match.filled])
    report.hints = missing_stats_hints(match.unmatched, flax_flat)

    def copy(e: Entry) -> Copy:
        value = to_flax(e.transform, arrays[e.torch_key])
        target_leaf = flax_flat[e.flax_path]
        return Copy(e, e.flax_path, e.torch_key, value, target_leaf,
                    f"{e.torch_key}: copying a param with shape {e.torch_shape} from checkpoint "
                    f"({e.transform} layout {value.shape}), the shape in the current model is "
                    f"{tuple(np.shape(target_leaf))} at {display_name(e.flax_path)}")

    out = dict(flax_flat)
    out.update(copy_checked(map(copy, match.entries), cast, report))
    for p in match.filled:
        leaf = flax_flat[p]
        out[p] = np.zeros((), leaf.dtype) if isinstance(leaf, jax.ShapeDtypeStruct) else leaf
    if strict and not report.ok:
        raise PortingError(report, "torch state_dict into Flax variables")
    return as_variables(out, as_jax), report


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
    match = match_keys({k: a.shape for k, a in targets.items()}, flax_flat, rules)
    report = PortReport(missing_keys=match.unmatched,
                        unexpected_keys=match.missing + [display_name(p) for p in match.filled],
                        ignored=match.ignored)

    def copy(e: Entry) -> Copy:
        value = to_torch(e.transform, flax_flat[e.flax_path])
        want = targets[e.torch_key]
        return Copy(e, e.torch_key, display_name(e.flax_path), value, want,
                    f"{e.torch_key}: {display_name(e.flax_path)} has shape {e.flax_shape} ({e.transform} "
                    f"layout {value.shape}), the torch model expects {want.shape}")

    out = copy_checked(map(copy, match.entries), cast, report)
    if strict and not report.ok:
        raise PortingError(report, "Flax variables into a torch state_dict")
    if as_torch:
        out = {k: numpy_to_tensor(v) for k, v in out.items()}
    if metadata is not None:
        out = collections.OrderedDict(out)
        out._metadata = deepcopy(metadata)
    return out, report
