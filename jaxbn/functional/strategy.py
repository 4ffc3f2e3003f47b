"""How jaxbn computes: the speed choices that change the compiled program, never its values
beyond rounding, as one static value.

A :class:`Strategy` travels in :attr:`jaxbn.BatchNormFlags.strategy`, so it is part of what
``jax.jit`` caches on: two strategies give two programs. ``None`` there (the default) means
:func:`default_strategy` for JAX's default backend, resolved once per call at trace time by
:func:`resolve_strategy` -- the one place jaxbn reads the backend.
"""

from __future__ import annotations

import dataclasses
import enum

import jax


class OneRead(enum.Enum):
    """Whether the forward statistics come from the one-read Pallas kernel
    (:mod:`jaxbn.functional.gpu_moments`) where it applies."""

    OFF = "off"
    """The XLA two-pass statistics everywhere (the kernel's custom call cannot be exported)."""
    CUDA = "cuda"
    """The compiled Triton kernel on CUDA GPUs (``lax.platform_dependent``), XLA elsewhere."""
    INTERPRETED = "interpreted"
    """The kernel in Pallas' interpreter on every backend: its tests, without a GPU."""


BACKWARD_WAIT_BYTES_CPU = 2 * 2**20
"""XLA:CPU's threshold for :attr:`Strategy.backward_wait_bytes`: above it the input is out of
cache, and an early backward reduction competes with the forward pass for the cores."""


@dataclasses.dataclass(frozen=True)
class Strategy:
    """The speed choices of one call: hashable and static, part of ``jax.jit``'s cache key.

    Attributes:
      running_mean_shift: in training with buffers, take the layer's running mean as the shift
        of the batch statistics (where it can be trusted; else a third read fixes the mean)
        instead of reading one from the batch first -- on XLA:CPU that read is one small kernel
        on every norm's critical path; an XLA:GPU conditional reads its predicate on the host.
      backward_wait_bytes: inputs larger than this many bytes make the backward pass's
        reduction wait for the forward's ``invstd``; ``None``: never wait. On XLA:CPU a
        reduction started early runs beside the forward pass and oversubscribes the cores;
        XLA:GPU runs kernels in order, so there the wait is one more kernel and orders nothing.
      one_read: the one-read statistics kernel (:class:`OneRead`): off by default because
        ``jax.export`` refuses its custom call and every distinct shape costs a Triton compile.
    """

    running_mean_shift: bool = False
    backward_wait_bytes: int | None = None
    one_read: OneRead = OneRead.OFF

    def __post_init__(self) -> None:
        if not isinstance(self.running_mean_shift, bool):
            raise TypeError("Strategy.running_mean_shift must be a bool, "
                            f"got {type(self.running_mean_shift).__name__}")
        wait = self.backward_wait_bytes
        if wait is not None and (not isinstance(wait, int) or isinstance(wait, bool) or wait < 0):
            raise TypeError(f"Strategy.backward_wait_bytes must be a non-negative int or None, "
                            f"got {wait!r}")
        object.__setattr__(self, "one_read", OneRead(self.one_read))  # also takes "cuda", ...

    def replace(self, **changes) -> "Strategy":
        """A copy with some choices changed."""
        return dataclasses.replace(self, **changes)


def default_strategy(backend: str) -> Strategy:
    """The strategy a call gets on ``backend`` (``jax.default_backend()``'s names) unless its
    flags name one: the running-mean shift and the backward wait on the CPU, neither elsewhere;
    the one-read kernel nowhere."""
    if backend == "cpu":
        return Strategy(running_mean_shift=True, backward_wait_bytes=BACKWARD_WAIT_BYTES_CPU)
    return Strategy()


def resolve_strategy(strategy: Strategy | None) -> Strategy:
    """``strategy``, or (``None``) :func:`default_strategy` of JAX's default backend now, at
    trace time. A program traced on a CPU host and lowered for a GPU gets the CPU's choices,
    which compute the same values to rounding."""
    return default_strategy(jax.default_backend()) if strategy is None else strategy
