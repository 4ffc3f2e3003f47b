"""Python names for the emitted source (:mod:`.emit`): any name a torch model may use, made safe.

torch names children, inputs and classes freely (``setattr(model, "lambda", ...)``, a child
``jnp``, a class ``Conv``, ``add_module("a-b", ...)``); the emitted file must still mean the same.
:class:`Names` hands out identifiers that are never a keyword, a builtin, an import or a name
already given in its scope; :func:`is_attribute` says which names ``self.<name>`` can spell.
Pure Python.
"""

from __future__ import annotations

import builtins
import itertools
import keyword
import unicodedata
from collections.abc import Iterable

__all__ = ["RESERVED", "Names", "identifier", "is_attribute", "is_field"]

RESERVED = frozenset(keyword.kwlist) | frozenset(dir(builtins))
"""Never given out: keywords and builtins (the emitted code calls ``float``,
``slice``, ``getattr``, ``setattr``, ...)."""


def identifier(text: str) -> str:
    """``text`` as an identifier: NFKC-normalized (as Python reads identifiers), each character
    not allowed in a name replaced by ``_``, ``_`` before a leading digit, a leading ``__``
    (which Python mangles inside a class) shortened to ``_``. Keywords are :class:`Names`' job."""
    text = unicodedata.normalize("NFKC", text)
    name = "".join(c if ("a" + c).isidentifier() else "_" for c in text)
    if not name or not name.isidentifier():
        name = "_" + name
    return "_" + name.lstrip("_") if name.startswith("__") else name


def is_attribute(name: str) -> bool:
    """``self.<name>`` reaches the attribute ``name`` (else ``getattr(self, name)`` must):
    an identifier, no keyword, unchanged by NFKC, not mangled (``__x``)."""
    return (name.isidentifier() and not keyword.iskeyword(name)
            and unicodedata.normalize("NFKC", name) == name
            and not (name.startswith("__") and not name.endswith("__")))


def is_field(name: str) -> bool:
    """``name`` can be a ``flax.linen.Module`` dataclass field (``name: nn.Module`` in a class
    body, ``Block(name=...)`` at the call): an :func:`is_attribute` name, not ``self`` (the
    dataclass ``__init__``'s own argument) and no dunder."""
    return is_attribute(name) and name != "self" and not name.startswith("__")


class Names:
    """One scope's names: :meth:`fresh` never returns a reserved or already given name.

    ``Names(taken)`` starts with :data:`RESERVED` and ``taken``; :meth:`child` is a nested scope
    (a method inside the file) that starts with everything this one holds.
    """

    def __init__(self, taken: Iterable[str] = ()) -> None:
        self._taken = set(RESERVED) | set(taken)

    def fresh(self, wanted: str, *, numbered: bool = False) -> str:
        """A new name close to ``wanted``: itself, else ``wanted_``, ``wanted_2``, ... (or with
        ``numbered``: ``wanted2``, ``wanted3``, ..., for class names)."""
        base = identifier(wanted)
        first = [base] if numbered else [base, f"{base}_"]
        rest = (f"{base}{'' if numbered else '_'}{k}" for k in itertools.count(2))
        name = next(n for n in itertools.chain(first, rest) if n not in self._taken)
        self._taken.add(name)
        return name

    def take(self, name: str) -> str:
        """Reserve ``name`` exactly (an import, ``Model``); it must be free."""
        if name in self._taken:
            raise ValueError(f"the name {name!r} is taken")
        self._taken.add(name)
        return name

    def child(self) -> Names:
        """A nested scope starting with this one's names."""
        return Names(self._taken)
