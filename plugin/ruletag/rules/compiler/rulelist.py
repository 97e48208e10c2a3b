"""The rules of a table read back from its file, each unpickled when first used.

A serve with every rule reads ~5,700 rules at each start and uses few of them: the
annotations of the rules that match, and the stateful rules (found by their kind without
reading the others). Unpickling them all was ~0.2 s of a start-up, so a table file holds each
rule pickled on its own (``store.py``) and :class:`StoredRules` reads one when it is asked for.
"""

from __future__ import annotations

import pickle
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import overload

from ruletag.rules.ir import Rule

__all__ = ["StoredRules", "rule_ids", "rule_kinds", "stateful_rules"]


class StoredRules(Sequence[Rule]):
    """A table's rules as stored: each rule's kind and id at hand, the rule itself unpickled
    from its bytes on first use (then its bytes are dropped). Equal to any sequence of equal
    rules, like the tuple a freshly built table holds. Safe to read from several threads (a
    pre-filter tuning thread reads rules while the matching thread annotates)."""

    __slots__ = ("_blobs", "_lock", "_rules", "ids", "kinds")

    def __init__(self, kinds: Sequence[str], ids: Sequence[str], blobs: Sequence[bytes]) -> None:
        if not len(kinds) == len(ids) == len(blobs):
            raise ValueError("stored rules: kinds, ids and rules differ in number")
        #: each rule's ``kind`` and ``id``, without reading it
        self.kinds: tuple[str, ...] = tuple(kinds)
        self.ids: tuple[str, ...] = tuple(ids)
        self._blobs: list[bytes | None] = list(blobs)
        self._rules: list[Rule | None] = [None] * len(self._blobs)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._blobs)

    @overload
    def __getitem__(self, i: int) -> Rule: ...

    @overload
    def __getitem__(self, i: slice) -> tuple[Rule, ...]: ...

    def __getitem__(self, i: int | slice) -> Rule | tuple[Rule, ...]:
        if isinstance(i, slice):
            return tuple(self[k] for k in range(*i.indices(len(self))))
        got = self._rules[i]
        if got is None:
            with self._lock:
                got = self._rules[i]
                if got is None:
                    got = pickle.loads(self._blobs[i])  # type: ignore[arg-type]
                    if not isinstance(got, Rule):
                        raise TypeError(f"stored rule {i} is a {type(got).__name__}")
                    self._rules[i] = got
                    self._blobs[i] = None
        return got

    def __iter__(self) -> Iterator[Rule]:
        for i in range(len(self)):
            yield self[i]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str | bytes):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        read = sum(r is not None for r in self._rules)
        return f"<StoredRules: {len(self)} rules, {read} read>"

    def blob(self, i: int, pickled: Callable[[Rule], bytes]) -> bytes:
        """Rule ``i`` as stored: its bytes, or ``pickled(rule)`` once it has been read."""
        with self._lock:
            b = self._blobs[i]
            rule = self._rules[i]
        return b if b is not None else pickled(rule)  # type: ignore[arg-type]

    def loaded(self) -> int:
        """How many rules have been read (for tests and diagnostics)."""
        return sum(r is not None for r in self._rules)


def rule_kinds(rules: Sequence[Rule]) -> Sequence[str]:
    """Each rule's ``kind``; stored rules are not read for it."""
    if isinstance(rules, StoredRules):
        return rules.kinds
    return [r.kind for r in rules]


def rule_ids(rules: Sequence[Rule]) -> Sequence[str]:
    """Each rule's ``id``; rules that know their ids without being read (stored rules, or
    any sequence with an ``ids`` attribute) are not read for it."""
    ids: Sequence[str] | None = getattr(rules, "ids", None)
    if ids is not None:
        return ids
    return [r.id for r in rules]


def stateful_rules(rules: Iterable[Rule]) -> list[Rule]:
    """The rules whose kind is not ``event``; of stored rules only those are read."""
    if isinstance(rules, StoredRules):
        return [rules[i] for i, k in enumerate(rules.kinds) if k != "event"]
    return [r for r in rules if r.kind != "event"]
