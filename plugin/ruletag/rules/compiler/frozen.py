"""Immutability for compiled objects: fields are set once, when the object is made.

A compiled table (and its pre-filter) is shared by every matcher built over it, possibly on
several threads, so nothing may change it after it is built or loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Frozen:
    """A base whose instances reject attribute assignment and deletion after construction.

    Subclasses declare ``__slots__`` and set their fields in ``__init__`` with
    :meth:`_set`."""

    __slots__ = ()

    def _set(self, **fields: Any) -> None:
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable: cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable: cannot delete {name!r}")


def frozen_map(d: Mapping[K, V]) -> Mapping[K, V]:
    """A read-only view of a new dict copy of ``d``."""
    return MappingProxyType(dict(d))
