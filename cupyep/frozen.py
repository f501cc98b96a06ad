"""Frozen dataclasses that key the launch caches, hashed once.

A frozen dataclass's generated ``__hash__`` builds and hashes a tuple of its
fields on every dict lookup (~0.5 us for a kernel spec or a Config), and the
normal calls look several up per call. Declared with ``eq=False`` and calling
``_freeze()`` from ``__post_init__``, these compare and hash by a field tuple
made at construction. Pickles carry the fields, not the hash: string hashes
differ between processes.
"""
from __future__ import annotations

import dataclasses


class HashedOnce:
    """Mixin for ``@dataclass(frozen=True, eq=False)`` classes."""

    __slots__ = ()

    def _freeze(self) -> None:
        key = tuple(getattr(self, f.name) for f in dataclasses.fields(self))
        object.__setattr__(self, "_key", key)
        object.__setattr__(self, "_hash", hash(key))

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return self is other or (type(other) is type(self) and self._key == other._key)

    def __getstate__(self):
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __setstate__(self, state):
        for name, value in state.items():
            object.__setattr__(self, name, value)
        self._freeze()
