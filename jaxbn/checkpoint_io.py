"""Safe checkpoint reading and writing: the stable public name of :mod:`jaxbn.porting.formats`'s
public API.

Everything documented there -- :func:`read_checkpoint`, :func:`write_checkpoint`,
:class:`CheckpointError`, the format registry -- is re-exported here (``formats.__all__``).
"""

from .porting import formats
from .porting.formats import *  # noqa: F403 -- the public API of the format registry

__all__ = list(formats.__all__)
