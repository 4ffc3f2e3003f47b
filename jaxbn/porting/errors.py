"""The error every porting module raises for a file or a name it cannot handle."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint cannot be read or written: unreadable, corrupt, unsafe, of an unknown format,
    holding tensors of an unsupported kind, or names that cannot be mapped without inventing any."""
