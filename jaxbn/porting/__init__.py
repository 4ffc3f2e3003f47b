"""Porting between torch and Flax: checkpoint files, ``state_dict`` <-> Flax variables, the CLI.

* :mod:`.formats` -- safe reading and writing of checkpoint files (also ``jaxbn.checkpoint_io``);
* :mod:`.mapping` -- torch ``state_dict`` <-> Flax variables with torch's strictness (the names
  re-exported here);
* :mod:`.cli` -- ``python -m jaxbn convert``.
"""

from .mapping import (
    PortingError,
    PortReport,
    Rules,
    canonical_name,
    flatten_tree,
    flax_to_torch,
    load_variables,
    plain_tree,
    save_variables,
    structural_flax_target,
    structural_torch_target,
    target_from_module,
    torch_to_flax,
    unflatten_tree,
)
from .settings import NormSettings, norm_settings
from .translate import UnsupportedError, from_torch

__all__ = [
    "NormSettings",
    "UnsupportedError",
    "from_torch",
    "norm_settings",
    "PortReport",
    "PortingError",
    "Rules",
    "canonical_name",
    "flatten_tree",
    "flax_to_torch",
    "load_variables",
    "plain_tree",
    "save_variables",
    "structural_flax_target",
    "structural_torch_target",
    "target_from_module",
    "torch_to_flax",
    "unflatten_tree",
]
