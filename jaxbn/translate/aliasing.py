"""torch's memory sharing inside one traced forward, for in-place operations: :class:`Aliasing`.

In torch an in-place operation (``y.add_(1)``, ``y += 1``, ``F.relu(y, inplace=True)``,
``nn.ReLU(inplace=True)``) changes the tensor itself: every name bound to it sees the new value,
even when the operation's result is discarded. The translator reproduces that by *rebinding*:
after the operation every later read of ``y`` reads its result (:meth:`Aliasing.resolve`). That is
exact unless another value shares ``y``'s memory -- a view (``view``, ``transpose``, indexing,
``chunk``) or a module that may return its input itself (``nn.Identity``, dropout in eval) -- and
is read afterwards: :meth:`Aliasing.in_place` names such a value and the caller refuses. A change
to memory that one of the forward's inputs shares changes the *caller's* tensor: it is recorded in
:attr:`Aliasing.mutated_inputs`, so the caller can refuse where it reads that tensor afterwards.

Pure Python over value names (``torch.fx`` node names): no torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

__all__ = ["Aliasing"]


class Aliasing:
    """The values of one forward, in order: which tensor each is and which share memory.

    Args:
      last_read: value name -> index of the last operation reading it (the output included);
        values never read are absent.
    """

    def __init__(self, last_read: Mapping[str, int]):
        self._last_read = last_read
        self._made: dict[str, int] = {}  # name -> index of the operation making it
        self._tensor: dict[str, str] = {}  # name -> the tensor it is (in-place results: their target's)
        self._storage: dict[str, str] = {}  # union-find over tensors: memory they share
        self._rebound: dict[str, str] = {}  # name -> the in-place result later reads read instead
        self._inputs: list[str] = []
        self.mutated_inputs: dict[str, str] = {}
        """Input name -> what changed it in place (the first culprit)."""

    def resolve(self, name: str) -> str:
        """The value a read of ``name`` reads now (after the in-place changes so far)."""
        while name in self._rebound:
            name = self._rebound[name]
        return name

    def new(self, name: str, index: int, shares: Iterable[str] = (), is_input: bool = False) -> None:
        """A new tensor ``name`` made at ``index``, sharing memory with ``shares`` (views and
        results that may be their argument itself; plain Python values are never tracked)."""
        self._made[name] = index
        self._tensor[name] = name
        self._storage[name] = name
        for other in shares:
            if other in self._tensor:
                self._storage[self._root(name)] = self._root(self._tensor[other])
        if is_input:
            self._inputs.append(name)

    def in_place(self, target: str, result: str, index: int, culprit: str) -> str | None:
        """``result`` is the tensor ``target`` changed in place at ``index``: later reads of
        ``target`` read ``result``. Returns a value sharing its memory that is read afterwards
        (the caller refuses: it would see the change), else ``None``."""
        if target not in self._tensor:
            return None
        tensor = self._tensor[target]
        conflict = next((u for u in self._sharing(target)
                         if self._tensor[u] != tensor and self._read_after(u, index)), None)
        self._record_inputs(target, culprit)
        self._made[result] = index
        self._tensor[result] = tensor
        self._rebound[target] = result
        return conflict

    def changed_by_call(self, target: str, index: int, culprit: str) -> str | None:
        """``target`` changed in place at ``index`` by a call returning something else (a child
        block mutating its input): returns a value sharing its memory, itself included, that is
        read afterwards, else ``None``."""
        if target not in self._tensor:
            return None
        conflict = next((u for u in self._sharing(target) if self._read_after(u, index)), None)
        self._record_inputs(target, culprit)
        return conflict

    def inputs_shared_by(self, names: Iterable[str]) -> set[str]:
        """The inputs whose memory one of ``names`` shares (a forward returning its input)."""
        out = set()
        for name in names:
            if name in self._tensor:
                out |= {i for i in self._inputs if self._root(i) == self._root(name)}
        return out

    def sharing(self, name: str) -> list[str]:
        """The tensors sharing memory with ``name`` (itself included; ``[]`` for an untracked value)."""
        return self._sharing(name) if name in self._tensor else []

    def _sharing(self, name: str) -> list[str]:
        root = self._root(name)
        return [u for u in self._tensor if self._root(u) == root]

    def _read_after(self, name: str, index: int) -> bool:
        return self._made[name] < index < self._last_read.get(name, -1)

    def _record_inputs(self, target: str, culprit: str) -> None:
        for name in self.inputs_shared_by([target]):
            self.mutated_inputs.setdefault(name, culprit)

    def _root(self, name: str) -> str:
        tensor = self._tensor.get(name, name)
        while self._storage[tensor] != tensor:
            tensor = self._storage[tensor]
        return tensor
