"""Streaming aggregating ES|QL rules (``STATS ... BY ... | WHERE ...``) over a sliding window.

:class:`AggregationState` is the state of one rule (:class:`~ruletag.rules.ir.Aggregation`).
A record that matches the rule's base condition (its ``WHERE``s before ``STATS``) is put in the
groups named by its key values (the cartesian product of multi-valued keys; a null key is a
group of its own) with its contribution to every aggregate (the non-null values of the
aggregate's input). A group keeps the contributions of its records inside the window
``[watermark - window, watermark]``, where the watermark is the latest event time the rule has
seen and ``window`` the rule's look-back. When a record arrives the group's aggregates are
computed from what it holds and the row (keys, aggregates, ``NOW()`` = the watermark) is tested
against the conditions after ``STATS``; when they hold the record fires: one alert, after which
the group's records are forgotten and the group is suppressed until the watermark passes the
alert by more than ``window`` (once per group and window, like the threshold engine); records
with an event time at or before the alert never count again. Records are processed on arrival
and compared by event time; a record older than the window or than the group's last alert is
counted as late and ignored; one without a parseable timestamp is not counted.

Evaluated on arrival, a condition that later records could make false (``count < 3``,
``count == 1``) fires at the first record that satisfies it, where Elasticsearch tests the
whole look-back at the end of each run: such rules fire earlier (and possibly where
Elasticsearch would not).

Aggregates: ``count`` (rows for ``COUNT(*)``, else non-null values), ``count_distinct``
(exact, by canonical text), ``values`` (distinct values in arrival order: a single value is a
scalar, none is null), ``min``/``max`` (numbers numerically, other values by their text, so
ISO timestamps compare in time order), ``sum`` and ``avg`` (numbers and numeric text; null
when there is none).

Bounds: at most ``max_groups`` groups per rule, the least recently used evicted first; at most
``max_events`` records kept per group, the oldest dropped first; a group with nothing in the
window and no running suppression is expired. :meth:`AggregationEngine.snapshot` and
:meth:`AggregationEngine.restore` carry the state as JSON-able data.
"""

from __future__ import annotations

import itertools
import math
from bisect import bisect_left, insort
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any

from ruletag.rules.algebra import and_, as_text, number_of
from ruletag.rules.fields import FieldMap, RecordView
from ruletag.rules.ir import (
    NOW_FIELD,
    Aggregate,
    Aggregation,
    AggValue,
    And,
    Case,
    Cidr,
    Compare,
    Const,
    Equals,
    Exists,
    Match,
    Node,
    Or,
    Regex,
    Rule,
)
from ruletag.rules.reference import evaluate, values_of
from ruletag.rules.stateful.sequence import event_time
from ruletag.rules.stateful.snapshot import DigestCache
from ruletag.rules.stateful.threshold import iso_time

__all__ = ["AggregateAlert", "AggregationEngine", "AggregationState", "aggregate", "row_values"]

Scalar = str | int | float | bool
Key = tuple[Scalar | None, ...]
#: one record in a group: (event time, arrival number, its values per aggregate)
_Event = tuple[float, int, tuple[tuple[Scalar, ...], ...]]

_ROW_MAP: FieldMap | None = None


class _PlainRow(RecordView):
    """An aggregated row: columns read by their exact names, no field mapping."""

    __slots__ = ()

    def values(self, field: str) -> list[object]:
        v = self.record.get(field)
        if v is None:
            return []
        return [x for x in v if x is not None] if isinstance(v, list) else [v]


def _row_map() -> FieldMap:
    """The field mapping of aggregated rows: none (columns are read by their names)."""
    global _ROW_MAP
    if _ROW_MAP is None:
        _ROW_MAP = FieldMap({})
    return _ROW_MAP


def _scalar(v: object) -> Scalar | None:
    if isinstance(v, str | int | float | bool):
        return v
    if isinstance(v, bytes | bytearray):
        return bytes(v).decode("utf-8", "surrogateescape")
    return None


def row_values(value: AggValue, view: RecordView) -> list[Scalar]:
    """The non-null scalar values of a per-record value (a ``CASE`` takes the first branch
    whose condition holds)."""
    while isinstance(value, Case):
        value = next((v for c, v in value.branches if evaluate(c, view)), value.default)
    out: list[Scalar] = []
    for v in values_of(value, view):
        s = _scalar(v)
        if s is not None:
            out.append(s)
    return out


def _time(e: _Event) -> float:
    return e[0]


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


class _Acc:
    """The running state of one aggregate of one group: the number of non-null values, the
    distinct values and the numeric sum.

    Distinct values are keyed by their canonical text, so ``3`` and ``"3"`` are one. Each slot
    keeps a number and a non-number with that text, and how many of each are held: ``[number,
    count, other, count]``. A value that leaves takes its kind's count down, so what stays is
    always represented by a value of a kind still held."""

    __slots__ = ("n", "numbers", "seen", "total")

    def __init__(self) -> None:
        self.n = 0
        self.seen: dict[str | None, list[Any]] = {}
        self.total: int | float = 0
        self.numbers = 0

    def add(self, values: tuple[Scalar, ...], sign: int) -> None:
        """Count ``values`` in (``sign`` 1) or out (-1)."""
        for v in values:
            self.n += sign
            text = as_text(v)
            slot = self.seen.get(text)
            if slot is None:  # sign is 1: a removed value was added before
                slot = self.seen[text] = [None, 0, None, 0]
            i = 0 if _is_number(v) else 2
            if slot[i + 1] == 0:
                slot[i] = v
            slot[i + 1] += sign
            if slot[1] + slot[3] <= 0:
                del self.seen[text]
            num = number_of(v)
            if num is not None:
                self.total += sign * num
                self.numbers += sign
        if self.numbers == 0:
            self.total = 0  # no drift once every number left

    def distinct(self) -> list[Any]:
        """One value per distinct text held, in first-arrival order: a non-number where one
        is held with that text, else the number."""
        return [slot[2] if slot[3] > 0 else slot[0] for slot in self.seen.values()]


def aggregate(function: str, acc: _Acc) -> object:
    """One aggregate (``COUNT(*)`` counts its ``True`` values) from its running state."""
    if function == "count":
        return acc.n
    if function == "count_distinct":
        return len(acc.seen)
    values = acc.distinct()
    if function == "values":
        return None if not values else values[0] if len(values) == 1 else values
    if function in ("min", "max"):
        if not values:
            return None
        pick = min if function == "min" else max
        if all(_is_number(v) for v in values):
            return pick(values)
        return pick(values, key=lambda v: as_text(v) or "")
    if not acc.numbers:
        return None
    if function == "sum":
        return acc.total
    assert function == "avg", function
    return acc.total / acc.numbers


class _Group:
    __slots__ = ("accs", "events", "fired_at")

    def __init__(self, aggregates: int) -> None:
        self.events: list[_Event] = []  # ordered by event time, then arrival
        self.accs = [_Acc() for _ in range(aggregates)]
        self.fired_at = -math.inf

    def add(self, event: _Event) -> None:
        insort(self.events, event)
        for acc, vals in zip(self.accs, event[2], strict=True):
            acc.add(vals, 1)

    def forget(self, n: int) -> None:
        """Forget the ``n`` oldest events."""
        for _, _, contrib in self.events[:n]:
            for acc, vals in zip(self.accs, contrib, strict=True):
                acc.add(vals, -1)
        del self.events[:n]

    def drop_before(self, bound: float) -> None:
        self.forget(bisect_left(self.events, bound, key=_time))


class AggregationState:
    """The groups of one aggregating rule (see the module docstring)."""

    def __init__(
        self, agg: Aggregation, *, max_groups: int = 100_000, max_events: int = 10_000
    ) -> None:
        self.agg = agg
        self.window = agg.window
        self.max_groups = max_groups
        self.max_events = max_events
        self.watermark = -math.inf
        self.next_sweep = -math.inf
        self.groups: OrderedDict[Key, _Group] = OrderedDict()
        self.counters: dict[str, int] = {
            "fired": 0,
            "evicted_groups": 0,
            "evicted_events": 0,
            "expired_groups": 0,
            "late_records": 0,
            "no_timestamp": 0,
        }

    def events(self) -> int:
        """Records held over all groups."""
        return sum(len(g.events) for g in self.groups.values())

    def advance(self, ts: float) -> None:
        """Move the watermark to event time ``ts`` (if later) and expire idle groups."""
        if ts <= self.watermark:
            return
        self.watermark = ts
        if ts >= self.next_sweep:
            self.expire()
            self.next_sweep = ts + max(self.window, 1.0)

    def row(self, key: Key, g: _Group) -> dict[str, object]:
        """The aggregated row of group ``key``: key columns, aggregates, ``NOW()``."""
        row: dict[str, object] = {NOW_FIELD: iso_time(self.watermark)}
        for (name, _), v in zip(self.agg.keys, key, strict=True):
            row[name] = v
        for a, acc in zip(self.agg.aggregates, g.accs, strict=True):
            row[a.name] = aggregate(a.function, acc)
        return row

    def hit(
        self, key: Key, ts: float, arrival: int, contrib: tuple[tuple[Scalar, ...], ...]
    ) -> tuple[dict[str, object], int] | None:
        """A record with event time ``ts`` (watermark already advanced) for group ``key``;
        the group's row and record count if the record makes it fire."""
        bound = self.watermark - self.window
        g = self.groups.get(key)
        if ts < bound or (g is not None and ts <= g.fired_at):
            self.counters["late_records"] += 1
            return None
        if g is None:
            g = self.groups[key] = _Group(len(self.agg.aggregates))
            if len(self.groups) > self.max_groups:
                _, old = self.groups.popitem(last=False)
                self.counters["evicted_groups"] += 1
                self.counters["evicted_events"] += len(old.events)
        else:
            self.groups.move_to_end(key)
        g.add((ts, arrival, contrib))
        g.drop_before(bound)
        extra = len(g.events) - self.max_events
        if extra > 0:
            g.forget(extra)
            self.counters["evicted_events"] += extra
        if self.watermark - g.fired_at <= self.window:
            return None  # suppressed: this group fired less than a window ago
        row = self.row(key, g)
        if not evaluate(self.agg.having, _PlainRow(_row_map(), row)):
            return None
        count = len(g.events)
        g.forget(count)
        g.fired_at = self.watermark
        self.counters["fired"] += 1
        return row, count

    def expire(self) -> None:
        """Drop the groups with no record in the window and no running suppression."""
        bound = self.watermark - self.window
        idle = [
            k
            for k, g in self.groups.items()
            if g.fired_at < bound and (not g.events or g.events[-1][0] < bound)
        ]
        for k in idle:
            del self.groups[k]
        for g in self.groups.values():
            g.drop_before(bound)
        self.counters["expired_groups"] += len(idle)

    # ---- persistence

    def snapshot(self) -> dict[str, Any]:
        """The state as JSON-able data."""
        return {
            "watermark": _finite(self.watermark),
            "groups": [
                {
                    "key": list(k),
                    "fired_at": _finite(g.fired_at),
                    "events": [[ts, n, [list(c) for c in contrib]] for ts, n, contrib in g.events],
                }
                for k, g in self.groups.items()
            ],
            "counters": dict(self.counters),
        }

    def restore(self, data: Mapping[str, Any]) -> None:
        """Replace the state by a :meth:`snapshot`."""
        self.watermark = _infinite(data.get("watermark"))
        self.next_sweep = -math.inf
        self.groups.clear()
        for item in data.get("groups") or ():
            g = _Group(len(self.agg.aggregates))
            g.fired_at = _infinite(item.get("fired_at"))
            for ts, n, contrib in item.get("events") or ():
                g.add((float(ts), int(n), tuple(tuple(c) for c in contrib)))
            self.groups[tuple(item["key"])] = g
        self.counters.update({k: int(v) for k, v in (data.get("counters") or {}).items()})


def _finite(x: float) -> float | None:
    return None if math.isinf(x) else x


def _infinite(x: object) -> float:
    return -math.inf if x is None else float(x)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- engine


@dataclass(frozen=True, slots=True)
class AggregateAlert:
    """A group an aggregating rule fired on: its key columns, its aggregates, the window."""

    rule: Rule
    keys: tuple[tuple[str, object], ...]  # (column, value) per BY key
    values: tuple[tuple[str, object], ...]  # (column, value) per aggregate
    count: int  # records in the group
    start: float  # window start (watermark - window), seconds
    end: float  # window end (the watermark at the alert), seconds


class AggregationEngine:
    """Every aggregating ES|QL rule of ``rules``, fed record by record (module docstring)."""

    kind = "aggregation"

    def __init__(
        self,
        rules: Iterable[Rule],
        fieldmap: FieldMap | None = None,
        *,
        max_groups: int = 100_000,
        max_events: int = 10_000,
    ) -> None:
        from ruletag.rules.matcher import Matcher
        from ruletag.rules.stateful.tables import step_table

        self.rules: list[Rule] = []
        self.states: list[AggregationState] = []
        base_rules: list[Rule] = []
        index: dict[Node, int] = {}
        #: base-table rule -> the aggregating rules (indexes) with that base condition
        self._targets: list[list[int]] = []
        for r in rules:
            agg = r.aggregation
            if r.kind != "aggregation" or agg is None:
                continue
            ri = len(self.rules)
            self.rules.append(r)
            self.states.append(AggregationState(agg, max_groups=max_groups, max_events=max_events))
            cond = step_condition(agg)
            k = index.get(cond)
            if k is None:
                k = index[cond] = len(base_rules)
                base_rules.append(
                    Rule(id=f"{r.id}#base", name=r.name, source=r.source, condition=cond)
                )
                self._targets.append([])
            self._targets[k].append(ri)
        self.table = step_table(base_rules, fieldmap, self.kind)
        self.matcher = Matcher(self.table, tune_after=0)
        self._arrival = 0
        self._digest = DigestCache()  # rule id -> definition digest, for checkpoints

    @classmethod
    def of(
        cls, rules: Iterable[Rule], fieldmap: FieldMap | None = None
    ) -> AggregationEngine | None:
        """An engine for the aggregating rules among ``rules``; None when there are none."""
        found = [r for r in rules if r.kind == "aggregation" and r.aggregation is not None]
        return cls(found, fieldmap) if found else None

    def stats(self) -> dict[str, int]:
        """Live groups and records held, and the counters, summed over the rules."""
        out = {"rules": len(self.rules), "groups": 0, "events": 0}
        for st in self.states:
            out["groups"] += len(st.groups)
            out["events"] += st.events()
            for k, v in st.counters.items():
                out[k] = out.get(k, 0) + v
        return out

    def step_hits(self, entries: bytes, spans: Seq[tuple[int, int]]) -> dict[int, list[int]]:
        """Entry index -> the base conditions it hits, for packed ``[time, record]`` entries
        (the raw pre-filter leaves most entries undecoded); feed only those records."""
        return self.matcher.match_entries(entries, spans)

    def feed(
        self, record: Mapping[str, object], hits: Seq[int] | None = None
    ) -> list[AggregateAlert]:
        """Offer one record (in arrival order); the groups it makes fire. ``hits``: its
        base-condition hits when already known (:meth:`step_hits`)."""
        self._arrival += 1
        if hits is None:
            hits = self.matcher.match(record)
        if not hits:
            return []
        view = self.table.fieldmap.view(record)
        out: list[AggregateAlert] = []
        for h in hits:
            for ri in self._targets[h]:
                out.extend(self._feed_rule(ri, view))
        return out

    def _feed_rule(self, ri: int, view: RecordView) -> list[AggregateAlert]:
        rule, state = self.rules[ri], self.states[ri]
        agg = state.agg
        ts = event_time(next(iter(view.values(agg.timestamp_field)), None))
        if ts is None:
            state.counters["no_timestamp"] += 1
            return []
        state.advance(ts)
        out: list[AggregateAlert] = []
        for rv in _rows(agg, view, self.table.fieldmap):
            per_key: list[list[Scalar | None]] = []
            for _, value in agg.keys:
                vals: list[Scalar | None] = list(
                    {as_text(v): v for v in row_values(value, rv)}.values()
                )
                per_key.append(vals or [None])
            contrib = tuple(_contribution(a, rv) for a in agg.aggregates)
            for key in itertools.product(*per_key):
                self._arrival += 1  # orders the rows of one record too
                fired = state.hit(key, ts, self._arrival, contrib)
                if fired is None:
                    continue
                row, count = fired
                out.append(
                    AggregateAlert(
                        rule,
                        tuple((name, row[name]) for name, _ in agg.keys),
                        tuple((a.name, row[a.name]) for a in agg.aggregates),
                        count,
                        state.watermark - state.window,
                        state.watermark,
                    )
                )
        return out

    # ---- persistence

    def snapshot(self) -> dict[str, Any]:
        """Every rule's state as JSON-able data, keyed by rule id."""
        return {
            "version": 1,
            "arrival": self._arrival,
            "rules": {r.id: st.snapshot() for r, st in zip(self.rules, self.states, strict=True)},
            "digests": {r.id: self._digest(r) for r in self.rules},
        }

    def restore(self, data: Mapping[str, Any]) -> int:
        """Load a :meth:`snapshot`; rules it does not name, or whose definition changed, keep
        an empty state. How many rules got their state back."""
        if data.get("version") != 1:
            raise ValueError(f"aggregation snapshot version {data.get('version')!r} unknown")
        self._arrival = int(data.get("arrival") or 0)
        saved = data.get("rules") or {}
        digests = data.get("digests") or {}
        restored = 0
        for r, st in zip(self.rules, self.states, strict=True):
            if r.id in saved and digests.get(r.id) == self._digest(r):
                st.restore(saved[r.id])
                restored += 1
        return restored


def _contribution(a: Aggregate, view: RecordView) -> tuple[Scalar, ...]:
    """What one row adds to an aggregate: its non-null values (``COUNT(*)``: ``(True,)``);
    nothing when it fails the aggregate's filter."""
    if a.filter != _TRUE and not evaluate(a.filter, view):
        return ()
    return (True,) if a.value is None else tuple(row_values(a.value, view))


_TRUE = Const(True)
#: at most this many ``MV_EXPAND`` rows per record and rule (the first ones are kept)
MAX_ROWS = 1024


class _RowView(RecordView):
    """A record seen as one ``MV_EXPAND`` row: the expanded fields hold one value each."""

    __slots__ = ("_over",)

    def __init__(
        self, fieldmap: FieldMap, record: Mapping[str, object], over: dict[str, list[object]]
    ) -> None:
        super().__init__(fieldmap, record)
        self._over = over

    def values(self, field: str) -> list[object]:
        got = self._over.get(field)
        return got if got is not None else super().values(field)


#: Leaves that hold for a record when they hold for one of its values (existential).
_EXISTENTIAL = (Const, Match, Regex, Cidr, Compare, Equals, Exists)


def _existential(node: Node) -> bool:
    if isinstance(node, And | Or):
        return all(_existential(a) for a in node.args)
    return isinstance(node, _EXISTENTIAL)


def step_condition(agg: Aggregation) -> Node:
    """What a record must satisfy to give a row: the conditions before ``STATS``, and the
    per-row ``MV_EXPAND`` condition when it is made of existential leaves (a row passes it only
    if the record, whose field holds every row's value, passes it too); so the pre-filter
    skips the records no row of which could count."""
    if agg.expand and _existential(agg.row_condition):
        return and_(agg.condition, agg.row_condition)
    return agg.condition


def _rows(agg: Aggregation, view: RecordView, fieldmap: FieldMap) -> list[RecordView]:
    """The rows of a record: itself, or one per combination of its expanded fields' values
    (a null field: one row) that satisfies the rule's per-row condition."""
    if not agg.expand:
        return [view]
    per_field = [[[v] for v in view.values(f)] or [[]] for f in agg.expand]
    out: list[RecordView] = []
    for combo in itertools.islice(itertools.product(*per_field), MAX_ROWS):
        row = _RowView(fieldmap, view.record, dict(zip(agg.expand, combo, strict=True)))
        if evaluate(agg.row_condition, row):
            out.append(row)
    return out
