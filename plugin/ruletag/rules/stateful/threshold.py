"""Streaming Elastic threshold rules: counts per group over a sliding event-time window.

:class:`ThresholdState` is the state of one rule. Every record that matches the rule's base
condition goes to the groups named by its values of the group fields (one group when the rule
has none; a multi-valued field puts the record in one group per value, a missing one in none,
like Elasticsearch's terms buckets). A group keeps the event times (and the distinct-count
field's values) of its records inside the window ``[watermark - window, watermark]``, where the
watermark is the latest event time the rule has seen and ``window`` the rule's look-back. When
a record brings a group to ``value`` records or more (and, with a cardinality condition, to
``cardinality_value`` distinct values or more) the record fires: one alert, after which the
group's records are forgotten and the group is suppressed: it fires again at the earliest on a
record whose event time is more than ``window`` after the watermark at the alert, and records
with an event time at or before the alert never count again (Kibana's threshold signal
history). Records are processed on arrival and compared by event time; a record older than the
window or than the group's last alert is counted as late and ignored. A record without a
parseable timestamp is not counted (``no_timestamp``).

Bounds: at most ``max_groups`` groups per rule, the least recently used evicted first; at most
``max_events`` records kept per group (never fewer than the rule's counts need), the oldest
dropped first; a group with nothing in the window and no running suppression is expired.
``ThresholdState.counters`` counts alerts, evictions, expiries and late records.

:class:`ThresholdEngine` runs every threshold rule of a rule set: the base conditions are
compiled into a small table of their own (the main table holds threshold rules as never-firing
entries) and a record's hits go to the rules' states; alerts come back as :class:`Alert` values.
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ruletag.rules.algebra import as_text
from ruletag.rules.fields import FieldMap, RecordView
from ruletag.rules.ir import Node, Rule, Threshold
from ruletag.rules.stateful.sequence import event_time, join_keys
from ruletag.rules.stateful.snapshot import from_time, restorable, rule_digest, to_time

__all__ = ["Alert", "ThresholdEngine", "ThresholdState", "iso_time"]

Key = tuple[str, ...]
#: one counted record: (event time, arrival number, its distinct-count values)
_Event = tuple[float, int, tuple[str, ...]]


def _time(e: _Event) -> float:
    return e[0]


class _Group:
    __slots__ = ("distinct", "events", "fired_at")

    def __init__(self) -> None:
        self.events: list[_Event] = []  # ordered by event time, then arrival
        self.distinct: Counter[str] = Counter()
        self.fired_at = -math.inf

    def drop_before(self, bound: float) -> int:
        """Forget the events older than ``bound``; how many."""
        i = bisect_left(self.events, bound, key=_time)
        self.forget(i)
        return i

    def forget(self, n: int) -> None:
        for _, _, vals in self.events[:n]:
            for v in vals:
                left = self.distinct[v] - 1
                if left:
                    self.distinct[v] = left
                else:
                    del self.distinct[v]
        del self.events[:n]


@dataclass(frozen=True, slots=True)
class Fired:
    """What a group held when it fired: its count, distinct count, the watermark."""

    count: int
    distinct: int | None
    end: float


class ThresholdState:
    """The groups of one threshold rule (see the module docstring)."""

    def __init__(
        self, threshold: Threshold, *, max_groups: int = 100_000, max_events: int = 10_000
    ) -> None:
        self.threshold = threshold
        self.window = threshold.window
        self.max_groups = max_groups
        self.max_events = max(max_events, threshold.value, threshold.cardinality_value)
        self.watermark = -math.inf
        self.next_sweep = -math.inf
        self.groups: OrderedDict[Key, _Group] = OrderedDict()
        self.counters: dict[str, int] = {
            "fired": 0,
            "evicted_groups": 0,
            "evicted_events": 0,
            "expired_groups": 0,
            "late_records": 0,
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

    def hit(self, key: Key, ts: float, arrival: int, values: tuple[str, ...]) -> Fired | None:
        """A record with event time ``ts`` (watermark already advanced) for group ``key``,
        with distinct-count ``values``; what the group held if the record makes it fire."""
        th = self.threshold
        bound = self.watermark - self.window
        g = self.groups.get(key)
        if ts < bound or (g is not None and ts <= g.fired_at):
            self.counters["late_records"] += 1
            return None
        if g is None:
            g = self.groups[key] = _Group()
            if len(self.groups) > self.max_groups:
                _, old = self.groups.popitem(last=False)
                self.counters["evicted_groups"] += 1
                self.counters["evicted_events"] += len(old.events)
        else:
            self.groups.move_to_end(key)
        insort(g.events, (ts, arrival, values))
        for v in values:
            g.distinct[v] += 1
        g.drop_before(bound)
        extra = len(g.events) - self.max_events
        if extra > 0:
            g.forget(extra)
            self.counters["evicted_events"] += extra
        if self.watermark - g.fired_at <= self.window:
            return None  # suppressed: this group fired less than a window ago
        count = len(g.events)
        if count < th.value:
            return None
        distinct: int | None = None
        if th.cardinality_field is not None:
            distinct = len(g.distinct)
            if distinct < th.cardinality_value:
                return None
        fired = Fired(count, distinct, self.watermark)
        g.forget(len(g.events))
        g.fired_at = self.watermark
        self.counters["fired"] += 1
        return fired

    def expire(self) -> int:
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
        return len(idle)


# --------------------------------------------------------------------------- engine


def iso_time(seconds: float) -> str:
    """Event time as ISO 8601 UTC text with milliseconds (``2024-05-01T10:00:00.000Z``)."""
    dt = datetime.fromtimestamp(seconds, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


@dataclass(frozen=True, slots=True)
class Alert:
    """A threshold a record reached: the rule, the group's field values, what it held."""

    rule: Rule
    terms: tuple[tuple[str, str], ...]  # (field, value) per group field
    count: int
    cardinality: tuple[str, int] | None  # (field, distinct values) for a cardinality rule
    start: float  # window start (watermark - window), seconds
    end: float  # window end (the watermark at the alert), seconds


class ThresholdEngine:
    """Every threshold rule of ``rules``, fed record by record (see the module docstring)."""

    kind = "threshold"

    def __init__(
        self,
        rules: Iterable[Rule],
        fieldmap: FieldMap | None = None,
        *,
        max_groups: int = 100_000,
        max_events: int = 10_000,
    ) -> None:
        from ruletag.rules.stateful.tables import step_matcher, step_table

        self.rules: list[Rule] = []
        self.states: list[ThresholdState] = []
        base_rules: list[Rule] = []
        index: dict[Node, int] = {}
        #: base-table rule -> the threshold rules (indexes) with that base condition
        self._targets: list[list[int]] = []
        for r in rules:
            th = r.threshold
            if r.kind != "threshold" or th is None:
                continue
            ri = len(self.rules)
            self.rules.append(r)
            self.states.append(ThresholdState(th, max_groups=max_groups, max_events=max_events))
            k = index.get(th.condition)
            if k is None:
                k = index[th.condition] = len(base_rules)
                base_rules.append(
                    Rule(id=f"{r.id}#base", name=r.name, source=r.source, condition=th.condition)
                )
                self._targets.append([])
            self._targets[k].append(ri)
        self.table = step_table(base_rules, fieldmap, self.kind)
        self._matcher = step_matcher(self.table)  # re-tunes its raw pre-filter on the traffic
        self._arrival = 0
        self._digests: dict[str, str] = {}  # rule id -> rule_digest, for checkpoints

    @classmethod
    def of(cls, rules: Iterable[Rule], fieldmap: FieldMap | None = None) -> ThresholdEngine | None:
        """An engine for the threshold rules among ``rules``; None when there are none."""
        found = [r for r in rules if r.kind == "threshold"]
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
        (the base table's raw pre-filter leaves most entries undecoded); feed only those."""
        return self._matcher.match_entries(entries, spans)

    def feed(self, record: Mapping[str, object], hits: Seq[int] | None = None) -> list[Alert]:
        """Offer one record (in arrival order); the thresholds it reaches. ``hits``: its
        base-condition hits when already known."""
        self._arrival += 1
        if hits is None:
            hits = self._matcher.match(record)
        if not hits:
            return []
        view = self.table.fieldmap.view(record)
        out: list[Alert] = []
        for h in hits:
            for ri in self._targets[h]:
                out.extend(self._feed_rule(ri, view))
        return out

    def _feed_rule(self, ri: int, view: RecordView) -> list[Alert]:
        rule, state = self.rules[ri], self.states[ri]
        th = state.threshold
        ts = event_time(next(iter(view.values(th.timestamp_field)), None))
        if ts is None:
            state.counters["no_timestamp"] = state.counters.get("no_timestamp", 0) + 1
            return []
        values: tuple[str, ...] = ()
        if th.cardinality_field is not None:
            vals = (as_text(v) for v in view.values(th.cardinality_field))
            values = tuple(dict.fromkeys(t for t in vals if t is not None))
        state.advance(ts)
        out: list[Alert] = []
        for key in join_keys(view, th.fields):
            fired = state.hit(key, ts, self._arrival, values)
            if fired is None:
                continue
            card = None
            if th.cardinality_field is not None and fired.distinct is not None:
                card = (th.cardinality_field, fired.distinct)
            out.append(
                Alert(
                    rule,
                    tuple(zip(th.fields, key, strict=True)),
                    fired.count,
                    card,
                    fired.end - state.window,
                    fired.end,
                )
            )
        return out

    # ------------------------------------------------------------------ checkpoints

    def _digest(self, rule: Rule) -> str:
        d = self._digests.get(rule.id)
        if d is None:
            d = self._digests[rule.id] = rule_digest(rule)
        return d

    def snapshot(self) -> dict[str, Any]:
        """The engine's state as JSON-ready data (see :mod:`ruletag.rules.stateful.snapshot`)."""
        rules: dict[str, Any] = {}
        for rule, st in zip(self.rules, self.states, strict=True):
            rules[rule.id] = {
                "digest": self._digest(rule),
                "watermark": to_time(st.watermark),
                "next_sweep": to_time(st.next_sweep),
                "counters": dict(st.counters),
                "groups": [
                    [list(key), to_time(g.fired_at), [[t, a, list(v)] for t, a, v in g.events]]
                    for key, g in st.groups.items()
                ],
            }
        return {"kind": self.kind, "arrival": self._arrival, "rules": rules}

    def restore(self, snap: Mapping[str, Any]) -> int:
        """Take back the state of every rule of ``snap`` whose id and definition are unchanged;
        how many rules were restored."""
        restored = 0
        for rule, st in zip(self.rules, self.states, strict=True):
            saved = restorable(snap, rule, self._digest(rule))
            if saved is None:
                continue
            st.groups.clear()
            for key, fired_at, events in saved["groups"]:
                g = _Group()
                g.fired_at = from_time(fired_at)
                g.events = [(float(t), int(a), tuple(v)) for t, a, v in events]
                for _, _, vals in g.events:
                    for v in vals:
                        g.distinct[v] += 1
                st.groups[tuple(key)] = g
            st.counters.update(saved["counters"])
            st.watermark = from_time(saved["watermark"])
            st.next_sweep = from_time(saved["next_sweep"])
            restored += 1
        self._arrival = max(self._arrival, int(snap.get("arrival", 0)))
        return restored
