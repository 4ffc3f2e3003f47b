"""The error every porting module raises for a file or a name it cannot handle."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint cannot be read or written: unreadable, corrupt, unsafe, of an unknown format,
    holding tensors of an unsupported kind, or names that cannot be mapped without inventing any."""


class UnsupportedError(NotImplementedError):
    """A torch module or operation :func:`jaxbn.from_torch` does not translate (named in the
    message). Defined here so that ``jaxbn.porting`` names it without importing the translator."""
