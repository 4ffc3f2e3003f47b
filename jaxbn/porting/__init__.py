"""Porting between torch and Flax: checkpoint files, ``state_dict`` <-> Flax variables, the CLI.

One job per module, from the bottom up:

* :mod:`.errors` -- :class:`CheckpointError`, the error for a file or a name that cannot be handled;
* :mod:`.tensors` -- torch tensor <-> NumPy array, bit-exact (bfloat16 included);
* :mod:`.paths` -- Flax variable paths and their ``/``-joined names;
* :mod:`.formats` -- safe reading and writing of checkpoint files, one registry entry per format
  (public name: ``jaxbn.checkpoint_io``), :mod:`.orbax_format` its Orbax directories;
* :mod:`.names` -- how a torch key and a Flax path name the same tensor (:func:`canonical_name`,
  ``rules``);
* :mod:`.layouts` -- kernel layouts, torch ``(O, I, *k)`` <-> Flax ``(*k, I, O)``;
* :mod:`.matching` -- which torch key fills which Flax leaf, before any value is read;
* :mod:`.report` -- :class:`PortReport` and :class:`PortingError`;
* :mod:`.copying` -- the strict, checked copy every direction shares;
* :mod:`.directions` -- :func:`torch_to_flax`, :func:`flax_to_torch`;
* :mod:`.targets` -- what to fill: :func:`target_from_module`, the structural targets;
* :mod:`.variables_io` -- :func:`save_variables`, :func:`load_variables`;
* :mod:`.settings` -- each torch norm layer's core parameters (eps, momentum, affine, buffers,
  track_running_stats) as data;
* :mod:`.cli` -- ``python -m jaxbn convert``.

The torch -> Flax translator (:func:`jaxbn.from_torch`) is :mod:`jaxbn.translate`.
"""

from .directions import flax_to_torch, torch_to_flax
from .errors import UnsupportedError
from .names import Rules, canonical_name
from .paths import flatten_tree, plain_tree, unflatten_tree
from .report import PortingError, PortReport
from .settings import NormSettings, norm_settings
from .targets import structural_flax_target, structural_torch_target, target_from_module
from .variables_io import load_variables, save_variables

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
    "Rules",
    "plain_tree",
    "NormSettings",
    "norm_settings",
    "UnsupportedError",
]
