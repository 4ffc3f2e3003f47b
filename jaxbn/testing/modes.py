"""Which mode each torch norm layer runs in, as the user set it: the reference for a twin's modes.

torch keeps one ``training`` flag per module. ``model.train()`` sets them all, and users then
freeze layers (``model.train(); bn.eval()``) or override ``train()`` to keep some BatchNorms in
eval (mmdet's ``norm_eval``). A run *in the model's own mode* (``model.training``) therefore uses
every module's flag as it is; a run in the other mode is torch's ``model.train(mode)``, done on a
copy (a custom ``train()`` included) so the caller's model is never touched.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from ..porting.settings import family_of

__all__ = ["audited_mode", "deviation_words", "in_mode", "mode_note", "norm_modes", "own_modes_words"]

# apply keywords that carry a call's mode, and the torch ``training`` each value means
_MODE_KEYWORDS = {"train": lambda v: v, "training": lambda v: v, "use_running_average": lambda v: not v}


def in_mode(torch_module: Any, training: bool) -> tuple[Any, bool]:
    """``(module, own)``: the torch model as it runs in this mode.

    PyTorch equivalent: the model itself when ``model.training == training`` (``own=True``: its
    per-module flags, frozen layers included, as the user set them), else
    ``copy.deepcopy(model).train(training)`` (``own=False``; the caller's model is untouched).
    """
    if bool(torch_module.training) == training:
        return torch_module, True
    return copy.deepcopy(torch_module).train(training), False


def norm_modes(torch_module: Any) -> dict[str, bool]:
    """``{path: module.training}`` for every BatchNorm / InstanceNorm layer (``named_modules`` order)."""
    return {name: bool(sub.training) for name, sub in torch_module.named_modules()
            if family_of(sub) is not None}


def deviation_words(path: str, training: bool, model_training: bool) -> str:
    """A norm layer's mode in words, with why when it differs from its model's
    (``"eval (frozen: bn1.eval() in a training model)"``)."""
    mode = "train" if training else "eval"
    if training == model_training:
        return mode
    name = path or "the model"
    if training:
        return f"{mode} ({name}.train() in a model in eval mode)"
    return f"{mode} (frozen: {name}.eval() in a training model)"


def own_modes_words(torch_module: Any) -> list[str]:
    """Every norm layer whose mode differs from its model's, in words (``"bn1 eval: frozen"``)."""
    root = bool(torch_module.training)
    return [f"{path or 'the model'} {'train' if t else 'eval: frozen'}"
            for path, t in norm_modes(torch_module).items() if t != root]


def mode_note(torch_module: Any, training: bool) -> str | None:
    """What the torch side of a ``training`` run uses, when its norm layers are not all in that
    mode (``None`` when they are: plain ``model.train(training)``)."""
    module, own = in_mode(torch_module, training)
    deviations = own_modes_words(module)
    if not deviations:
        return None
    run = "train" if training else "eval"
    source = "the torch model's own modes" if own else f"model.{run}() on a copy"
    return f"{run} run: {source} ({', '.join(deviations)})"


def audited_mode(torch_module: Any, torch_training: bool | None, apply_kwargs: Mapping[str, Any]) -> bool:
    """The torch mode a Flax call is audited against: ``torch_training`` if given, else the
    call's own mode keyword (``train`` / ``training`` / ``use_running_average``) if it is a
    bool, else the torch model's ``training``."""
    if torch_training is not None:
        return bool(torch_training)
    for key, to_training in _MODE_KEYWORDS.items():
        if isinstance(apply_kwargs.get(key), bool):
            return to_training(apply_kwargs[key])
    return bool(torch_module.training)
