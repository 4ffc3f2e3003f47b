"""Porting between torch and Flax: checkpoint files, ``state_dict`` <-> Flax variables, the CLI.

* :mod:`.formats` -- safe reading and writing of checkpoint files (also ``jaxbn.checkpoint_io``);
* :mod:`.tensors` -- torch tensor <-> NumPy array, bit-exact (bfloat16 included);
* :mod:`.paths` -- Flax variable paths and their ``/``-joined names;
* :mod:`.mapping` -- torch ``state_dict`` <-> Flax variables with torch's strictness (the names
  re-exported here);
* :mod:`.cli` -- ``python -m jaxbn convert``.
"""

from .mapping import (
    PortingError,
    PortReport,
    Rules,
    canonical_name,
    flax_to_torch,
    load_variables,
    save_variables,
    structural_flax_target,
    structural_torch_target,
    target_from_module,
    torch_to_flax,
)
from .paths import flatten_tree, plain_tree, unflatten_tree

__all__ = [
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
