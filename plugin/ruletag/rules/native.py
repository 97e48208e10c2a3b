"""Which implementation of the matcher's per-record helpers runs: C or the Python reference.

``ruletag.rules._native`` (C, built by ``setup.py`` when a compiler is there) is used
when it imports; otherwise, or with ``RULETAG_PURE_PYTHON=1`` in the environment, the pure-Python
reference implementations below. Both have the same semantics (``tests/test_native.py`` runs
them side by side); :data:`IMPLEMENTATION` names the one in use and is part of the rule-table
cache key, so a table is only ever read back by the build that wrote it.

* ``flatten_record(record)``: every dotted path of a record -> its values (selected in
  :mod:`ruletag.rules.fields`, beside its reference ``py_flatten_record``).
* ``Adder(hits, only=None)``: a Hyperscan match handler adding each pattern id to ``hits``
  (only those in ``only``, when given).
* ``EntryHits(spans)``: a Hyperscan match handler for a scan over a whole chunk of packed
  entries; ``per_entry`` maps each entry index to the ids of the patterns ending inside it.
* ``holding(rules, programs, hits, lazy, view, cache)``: the rules whose formula holds, walking
  the table's programs (selected in :mod:`ruletag.rules.matcher.table`; the reference is the
  generated formula functions, ``Matcher._holding`` without the extension).
* ``evaluate(ctx, view, rules, groups)``: a rule list's field-group scan and formulas in one
  call (the reference: ``Matcher._evaluate``).

A built module whose :data:`ABI` is not the one this code expects (an old build left beside
newer sources) is not used: the reference runs, with a warning saying how to rebuild.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Sequence
from typing import Any

from ruletag.extensions import extension

__all__ = [
    "ABI",
    "IMPLEMENTATION",
    "Adder",
    "EntryHits",
    "PyAdder",
    "PyEntryHits",
    "native_module",
]


class PyAdder:
    """Reference ``Adder``: ``hits.add(id)`` per match (``id in only`` first, when given)."""

    __slots__ = ("hits", "only")

    def __init__(self, hits: set[int], only: frozenset[int] | set[int] | None = None) -> None:
        self.hits = hits
        self.only = only

    def __call__(self, i: int, _f: int = 0, _t: int = 0, _fl: int = 0, _c: object = None) -> None:
        if self.only is None or i in self.only:
            self.hits.add(i)


class PyEntryHits:
    """Reference ``EntryHits``: files each match under the entry ``(start, end]`` its end
    offset ``to`` falls in (matches past every entry's end are dropped)."""

    __slots__ = ("_ends", "_last", "_last_set", "_starts", "per_entry")

    def __init__(self, spans: Sequence[tuple[int, int]]) -> None:
        self._starts = [s for s, _ in spans]
        self._ends = [e for _, e in spans]
        self.per_entry: dict[int, set[int]] = {}
        self._last = -1
        self._last_set: set[int] = set()

    def __call__(self, i: int, _f: int, to: int, _fl: int = 0, _c: object = None) -> None:
        k = self._last
        if not (k >= 0 and self._starts[k] < to <= self._ends[k]):
            k = bisect.bisect_right(self._starts, to - 1) - 1
            if k < 0 or to > self._ends[k]:
                return
            got = self.per_entry.get(k)
            if got is None:
                got = self.per_entry[k] = set()
            self._last, self._last_set = k, got
        self._last_set.add(i)


#: the C module's interface version this code calls (``ABI`` in ``_native.c``)
ABI = 7
_warned: list[int] = []


def native_module() -> Any | None:
    """The C module, or None when it is not built, is an older build than these sources
    (warned once), or ``RULETAG_PURE_PYTHON`` is set."""
    log = logging.getLogger(__name__)
    return extension("ruletag.rules", "_native", ABI, "C helpers", log, _warned)


_mod = native_module()

Adder: Callable[..., Callable[..., None]]
EntryHits: Callable[[Sequence[tuple[int, int]]], Any]
if _mod is not None:
    IMPLEMENTATION = f"c{_mod.ABI}"
    Adder = _mod.Adder
    EntryHits = _mod.EntryHits
else:
    IMPLEMENTATION = "python"
    Adder = PyAdder
    EntryHits = PyEntryHits
