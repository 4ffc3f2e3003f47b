"""Porting between torch and Flax: checkpoint files, ``state_dict`` <-> Flax variables, the CLI.

* :mod:`.formats` -- safe reading and writing of checkpoint files (also ``jaxbn.checkpoint_io``);
* :mod:`.tensors` -- torch tensor <-> NumPy array, bit-exact (bfloat16 included);
* :mod:`.paths` -- Flax variable paths and their ``/``-joined names;
* :mod:`.mapping` -- torch ``state_dict`` <-> Flax variables with torch's strictness (the names
  re-exported here);
* :mod:`.settings` -- each torch norm layer's core parameters (eps, momentum, affine, buffers,
  track_running_stats) as data;
* :mod:`.translate` -- :func:`from_torch`: a torch model captured with ``torch.fx`` as a trainable
  linen model (its layers and ops in :mod:`.torch_nn`, :mod:`.torch_ops`); :mod:`.emit` writes
  it as readable Flax source;
* :mod:`.cli`, :mod:`.port_cli` -- ``python -m jaxbn convert`` / ``port``.
"""

from . import mapping
from .mapping import *  # noqa: F403 -- the mapping API is the package's API
from .mapping import Rules
from .paths import plain_tree
from .settings import NormSettings, norm_settings
from .translate import UnsupportedError, from_torch

__all__ = [*mapping.__all__, "Rules", "plain_tree", "NormSettings", "norm_settings",
           "UnsupportedError", "from_torch"]
