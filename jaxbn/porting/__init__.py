"""Porting between torch and Flax: checkpoint files, ``state_dict`` <-> Flax variables, the CLI.

* :mod:`.formats` -- safe reading and writing of checkpoint files (also ``jaxbn.checkpoint_io``);
* :mod:`.tensors` -- torch tensor <-> NumPy array, bit-exact (bfloat16 included);
* :mod:`.paths` -- Flax variable paths and their ``/``-joined names;
* :mod:`.mapping` -- torch ``state_dict`` <-> Flax variables with torch's strictness (the names
  re-exported here);
* :mod:`.cli` -- ``python -m jaxbn convert``.
"""

from . import mapping
from .mapping import *  # noqa: F403 -- the mapping API is the package's API
from .mapping import Rules
from .paths import plain_tree

__all__ = [*mapping.__all__, "Rules", "plain_tree"]
