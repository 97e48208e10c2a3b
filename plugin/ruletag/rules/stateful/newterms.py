"""Streaming Elastic new_terms rules: the first combination of field values in a history window.

:class:`NewTermsState` is the state of one rule: every combination of the rule's term fields
seen (a record gives the cartesian product of its values, multi-valued fields expanded like
Elasticsearch's terms, none when a field is missing or null) with the latest event time it was
seen at. A record matching the rule's condition fires once for each of its combinations not
seen in ``[ts - history, ts]`` (inclusive; ``ts`` its event time) and not seen later either
(a late record whose combination came after it stays quiet); every combination is then
remembered at ``max(last seen, ts)``. Records are processed on arrival, compared by event time.

Learning: a fresh state has no history, so a rule first learns for ``learn`` seconds of event
time (default: its own history window) from the start of the stream (the first record the
engine is fed, whichever rule it hits): combinations are remembered, nothing fires
(``learned`` counts them). ``learn=0`` fires from the first record
(``ruletag match --new-terms-no-learning``). A state restored from :meth:`NewTermsEngine.snapshot`
keeps the learning end it had, so a restart does not learn again.

Bounds: at most ``max_terms`` combinations per rule, the least recently seen evicted first
(``evicted_terms``; an evicted combination fires again when next seen); combinations last seen
more than ``history`` before the rule's watermark (its latest event time) are expired, since
they would fire again anyway (``expired_terms``). A record older than ``watermark - history`` is
``late_records`` and ignored; a record less late than that whose combination was expired fires
(the expiry assumes records come roughly in event-time order). A record without a parseable
event time is not used (``no_timestamp``), nor one without every term field (``no_terms``).

:class:`NewTermsEngine` runs every new_terms rule of a rule set: the conditions are compiled
into a small table of their own with the raw pre-filter (the main table holds new_terms rules
as never-firing entries), so only records that hit a condition are fed; results come back as
:class:`NewTerm` values. :meth:`NewTermsEngine.snapshot` / :meth:`~NewTermsEngine.restore` keep
the state as JSON-able data, per rule id.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any, Final

from ruletag.rules.fields import FieldMap, RecordView
from ruletag.rules.ir import NewTerms, Node, Rule
from ruletag.rules.stateful.sequence import event_time, join_keys

__all__ = [
    "DEFAULT_MAX_TERMS",
    "SNAPSHOT_VERSION",
    "NewTerm",
    "NewTermsEngine",
    "NewTermsState",
    "configure_new_terms",
    "learning_note",
]

Key = tuple[str, ...]

#: Combinations kept per rule before the least recently seen is evicted.
DEFAULT_MAX_TERMS: Final = 100_000
#: The format of :meth:`NewTermsEngine.snapshot`.
SNAPSHOT_VERSION: Final = 1

_COUNTERS = (
    "fired",
    "learned",
    "evicted_terms",
    "expired_terms",
    "late_records",
    "no_timestamp",
    "no_terms",
)


class NewTermsState:
    """The combinations one new_terms rule has seen (see the module docstring).

    ``learn``: seconds of event time to learn before firing, from the first record; None: the
    rule's history window.
    """

    def __init__(
        self,
        new_terms: NewTerms,
        *,
        max_terms: int = DEFAULT_MAX_TERMS,
        learn: float | None = None,
    ) -> None:
        if max_terms < 1:
            raise ValueError("max_terms must be at least 1")
        self.new_terms = new_terms
        self.history = new_terms.history
        self.max_terms = max_terms
        self.learn = new_terms.history if learn is None else max(learn, 0.0)
        #: event time before which nothing fires; None until the first record
        self.learn_until: float | None = None
        self.watermark = -math.inf
        self.next_sweep = -math.inf
        #: combination -> latest event time seen, least recently seen first
        self.terms: OrderedDict[Key, float] = OrderedDict()
        self.counters: dict[str, int] = dict.fromkeys(_COUNTERS, 0)

    @property
    def learning(self) -> bool:
        """Still learning: the watermark before the learning end (no record yet: whether
        there is a learning period at all)."""
        if self.learn_until is None:
            return self.learn > 0
        return self.watermark < self.learn_until

    def observe(
        self, ts: float, keys: Iterable[Key], start: float | None = None
    ) -> list[tuple[Key, float | None]]:
        """A record at event time ``ts`` with the combinations ``keys``; the new ones it fires
        for, each with when it was last seen before (None: never, as far as the state knows).
        ``start``: when the stream began, if before ``ts`` (the learning period runs from it)."""
        if self.learn_until is None:
            self.learn_until = (ts if start is None else min(start, ts)) + self.learn
        if ts < self.watermark - self.history:
            self.counters["late_records"] += 1
            return []
        sweep = False
        if ts > self.watermark:
            self.watermark = ts
            sweep = ts >= self.next_sweep
        learning = self.learning
        bound = ts - self.history
        terms = self.terms
        out: list[tuple[Key, float | None]] = []
        for key in keys:
            last = terms.get(key)
            if last is not None and last >= bound:  # seen in the window, or after ts
                if ts > last:
                    terms[key] = ts
                terms.move_to_end(key)
                continue
            if learning:
                self.counters["learned"] += 1
            else:
                self.counters["fired"] += 1
                out.append((key, last))
            terms[key] = ts
            terms.move_to_end(key)
            if len(terms) > self.max_terms:
                terms.popitem(last=False)
                self.counters["evicted_terms"] += 1
        if sweep:  # after the checks: what this record saw keeps its "last seen"
            self.expire()
            self.next_sweep = ts + max(self.history / 4, 1.0)
        return out

    def expire(self) -> int:
        """Forget the combinations last seen before ``watermark - history``; how many."""
        bound = self.watermark - self.history
        old = [k for k, t in self.terms.items() if t < bound]
        for k in old:
            del self.terms[k]
        self.counters["expired_terms"] += len(old)
        return len(old)

    def set_max_terms(self, max_terms: int) -> None:
        """Change the cap, evicting the least recently seen combinations beyond it."""
        if max_terms < 1:
            raise ValueError("max_terms must be at least 1")
        self.max_terms = max_terms
        while len(self.terms) > max_terms:
            self.terms.popitem(last=False)
            self.counters["evicted_terms"] += 1

    # ------------------------------------------------------------------ snapshot

    def snapshot(self) -> dict[str, Any]:
        """The state as JSON-able data (combinations least recently seen first)."""
        return {
            "fields": list(self.new_terms.fields),
            "history": self.history,
            "watermark": _finite(self.watermark),
            "learn_until": self.learn_until,
            "terms": [[list(k), t] for k, t in self.terms.items()],
            "counters": dict(self.counters),
        }

    def restore(self, data: Mapping[str, Any]) -> None:
        """Replace the state with :meth:`snapshot` data of a rule with the same fields
        (ValueError otherwise, the state left unchanged)."""
        if list(data.get("fields") or ()) != list(self.new_terms.fields):
            raise ValueError("term fields differ")
        raw = data.get("terms")
        if not isinstance(raw, list):
            raise ValueError("terms must be a list")
        terms: OrderedDict[Key, float] = OrderedDict()
        for item in raw:
            if not (isinstance(item, list | tuple) and len(item) == 2):
                raise ValueError("bad term entry")
            key, t = item
            if not isinstance(key, list | tuple) or len(key) != len(self.new_terms.fields):
                raise ValueError("bad term key")
            k = tuple(str(v) for v in key)
            terms[k] = _number(t)
            terms.move_to_end(k)
        watermark = data.get("watermark")
        learn_until = data.get("learn_until")
        counters = data.get("counters") or {}
        wm = -math.inf if watermark is None else _number(watermark)
        self.learn_until = None if learn_until is None else _number(learn_until)
        self.watermark = wm
        self.next_sweep = -math.inf
        self.terms = terms
        if isinstance(counters, Mapping):
            for name in _COUNTERS:
                v = counters.get(name)
                if isinstance(v, int) and not isinstance(v, bool):
                    self.counters[name] = v
        self.set_max_terms(self.max_terms)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _number(x: object) -> float:
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        raise ValueError(f"not a finite number: {x!r}")
    return float(x)


# --------------------------------------------------------------------------- engine


@dataclass(frozen=True, slots=True)
class NewTerm:
    """A combination a record showed first: the rule, ``(field, value)`` per term field, the
    record's event time, the rule's history window, and when the combination was last seen
    (older than the window; None: never)."""

    rule: Rule
    terms: tuple[tuple[str, str], ...]
    time: float
    history: float
    last_seen: float | None = None


def record_time(view: RecordView, nt: NewTerms) -> float | None:
    """The record's event time for ``nt``: its timestamp field, else the fallback field."""
    ts = event_time(next(iter(view.values(nt.timestamp_field)), None))
    if ts is None and nt.timestamp_fallback is not None:
        ts = event_time(next(iter(view.values(nt.timestamp_fallback)), None))
    return ts


class NewTermsEngine:
    """Every new_terms rule of ``rules``, fed record by record (see the module docstring)."""

    kind = "new_terms"

    def __init__(
        self,
        rules: Iterable[Rule],
        fieldmap: FieldMap | None = None,
        *,
        max_terms: int = DEFAULT_MAX_TERMS,
        learn: float | None = None,
    ) -> None:
        from ruletag.rules.stateful.tables import step_matcher, step_table

        self.rules: list[Rule] = []
        self.states: list[NewTermsState] = []
        cond_rules: list[Rule] = []
        index: dict[Node, int] = {}
        #: condition-table rule -> the new_terms rules (indexes) with that condition
        self._targets: list[list[int]] = []
        for r in rules:
            nt = r.new_terms
            if r.kind != "new_terms" or nt is None:
                continue
            ri = len(self.rules)
            self.rules.append(r)
            self.states.append(NewTermsState(nt, max_terms=max_terms, learn=learn))
            k = index.get(nt.condition)
            if k is None:
                k = index[nt.condition] = len(cond_rules)
                cond_rules.append(
                    Rule(id=f"{r.id}#terms", name=r.name, source=r.source, condition=nt.condition)
                )
                self._targets.append([])
            self._targets[k].append(ri)
        self.table = step_table(cond_rules, fieldmap, self.kind)
        #: the condition table's matcher: callers with packed entries use its raw pre-filter
        #: (``step_hits``) so records that hit no condition cost no Python work here
        self.matcher = step_matcher(self.table)
        #: event time of the first record fed (any rule): the learning periods start there
        self.start: float | None = None

    @classmethod
    def of(cls, rules: Iterable[Rule], fieldmap: FieldMap | None = None) -> NewTermsEngine | None:
        """An engine for the new_terms rules among ``rules``; None when there are none."""
        found = [r for r in rules if r.kind == "new_terms"]
        return cls(found, fieldmap) if found else None

    def configure(self, *, learn: float | None = None, max_terms: int = DEFAULT_MAX_TERMS) -> None:
        """Set the learning period (None: each rule's history window; 0: none) and the cap
        per rule; a rule that has already started learning keeps its learning end."""
        for st in self.states:
            st.learn = st.history if learn is None else max(learn, 0.0)
            st.set_max_terms(max_terms)

    def stats(self) -> dict[str, int]:
        """Live combinations, rules still learning, and the counters, summed over the rules."""
        out = {"rules": len(self.rules), "terms": 0, "learning": 0}
        for st in self.states:
            out["terms"] += len(st.terms)
            out["learning"] += st.learning
            for k, v in st.counters.items():
                out[k] = out.get(k, 0) + v
        return out

    def step_hits(self, entries: bytes, spans: Seq[tuple[int, int]]) -> dict[int, list[int]]:
        """Entry index -> the conditions it hits, for packed ``[time, record]`` entries (the raw
        pre-filter leaves most entries undecoded); feed only those records."""
        return self.matcher.match_entries(entries, spans)

    def feed(self, record: Mapping[str, object], hits: Seq[int] | None = None) -> list[NewTerm]:
        """Offer one record (in arrival order); the new combinations it shows. ``hits``: its
        condition hits when already known (:meth:`step_hits`)."""
        if hits is None:
            hits = self.matcher.match(record)
        if not hits:
            return []
        view = self.table.fieldmap.view(record)
        out: list[NewTerm] = []
        for h in hits:
            for ri in self._targets[h]:
                out.extend(self._feed_rule(ri, view))
        return out

    def _feed_rule(self, ri: int, view: RecordView) -> list[NewTerm]:
        rule, st = self.rules[ri], self.states[ri]
        nt = st.new_terms
        ts = record_time(view, nt)
        if ts is None:
            st.counters["no_timestamp"] += 1
            return []
        if self.start is None:
            self.start = ts
        keys = join_keys(view, nt.fields)
        if not keys:
            st.counters["no_terms"] += 1
            return []
        return [
            NewTerm(rule, tuple(zip(nt.fields, key, strict=True)), ts, nt.history, last)
            for key, last in st.observe(ts, keys, self.start)
        ]

    # ------------------------------------------------------------------ snapshot

    def snapshot(self) -> dict[str, Any]:
        """Every rule's state as JSON-able data, by rule id."""
        return {
            "kind": self.kind,
            "version": SNAPSHOT_VERSION,
            "rules": {r.id: st.snapshot() for r, st in zip(self.rules, self.states, strict=True)},
        }

    def restore(self, data: Mapping[str, Any]) -> dict[str, int]:
        """Restore the rules found in :meth:`snapshot` data (by rule id, when their term fields
        are unchanged); the others start afresh. ``{"restored": n, "skipped": m}``."""
        if data.get("kind") != self.kind or data.get("version") != SNAPSHOT_VERSION:
            raise ValueError("not a new_terms snapshot of this version")
        saved = data.get("rules")
        if not isinstance(saved, Mapping):
            raise ValueError("rules must be a mapping")
        restored = skipped = 0
        for r, st in zip(self.rules, self.states, strict=True):
            one = saved.get(r.id)
            if not isinstance(one, Mapping):
                continue
            try:
                st.restore(one)
            except ValueError:
                skipped += 1
            else:
                restored += 1
        return {"restored": restored, "skipped": skipped}


def learning_note(engines: Iterable[object]) -> str | None:
    """A line for the user when new_terms rules are still learning (nothing could fire yet)."""
    for e in engines:
        if isinstance(e, NewTermsEngine):
            st = e.stats()
            n = st["learning"]
            if n and st["learned"]:
                return (
                    f"new_terms: {n} rule{'s' if n != 1 else ''} still learning at the end of "
                    "the input "
                    f"({st['learned']} combinations learned, none reported; "
                    "--new-terms-no-learning reports them)"
                )
    return None


def configure_new_terms(
    engines: Iterable[object], *, learn: float | None = None, max_terms: int = DEFAULT_MAX_TERMS
) -> None:
    """:meth:`NewTermsEngine.configure` on the new_terms engines among ``engines``."""
    for e in engines:
        if isinstance(e, NewTermsEngine):
            e.configure(learn=learn, max_terms=max_terms)
