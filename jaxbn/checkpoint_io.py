"""Safe checkpoint reading and writing: the stable public name of :mod:`jaxbn.porting.formats`.

``import jaxbn.checkpoint_io`` gives that very module (one module, two names), so everything
documented there -- :func:`read_checkpoint`, :func:`write_checkpoint`, :class:`CheckpointError`,
... -- is here too.
"""

import sys

from .porting import formats

sys.modules[__name__] = formats
