"""Sigma correlation rules: the document parser, the linking step and the streaming engine.

:func:`correlation_rule` turns one ``correlation:`` YAML document into a ``Rule`` of kind
``"correlation"`` whose references are still names or ids; :func:`link_correlations` (run by
the loader once every file is parsed) resolves them against the loaded rules by ``id`` or
Sigma ``name``, copies each referenced rule's condition into the correlation, rejects unknown
references and reference cycles (each with its own reason), and hides the stand-alone results
of referenced rules when every correlation that uses them says ``generate: false`` (the
default; ``generate`` is read at the top level or inside ``correlation:``): such a rule stays
in the main table as a never-firing entry (condition ``Const(False)``), like stateful rules.

Semantics decided here (the specification leaves them open; see
``stateful-detections.md`` B.2-B.6):

* Event time: the first parseable of :data:`TIME_FIELDS` (``@timestamp``, ``timestamp``,
  ``TimeCreated``, ``UtcTime``, ...); a record without one does not count (``no_timestamp``).
* Groups: one per tuple of ``group-by`` values (aliases resolved per referenced rule); a
  multi-valued field puts the record in one group per value, a record missing a group-by field
  takes no part (as Elasticsearch terms buckets and Splunk ``stats by``).
* A record matching several referenced rules is one event for ``event_count`` and the value
  types, and a hit of each of those rules for ``temporal``; for ``temporal_ordered`` the
  events must be distinct records in the rules' order by (event time, arrival) (equal times
  are in order when they arrive in order).
* Windows slide in event time: a group holds the events of ``[watermark - timespan,
  watermark]`` (both ends inclusive; the watermark is the latest event time the rule saw).
  With only lower bounds (``gt``, ``gte``) the condition is checked each time an event enters
  a group and fires on that record. A condition with an upper bound or equality (``lt``,
  ``lte``, ``eq``, ``neq``) is checked once per window instead, when the window (opened by the
  group's first event, ``timespan`` long) closes: on the first later record the rule sees.
* After firing a group forgets its events (rsigma's ``reset``; Hayabusa's non-overlapping
  windows): each alert is made of fresh events.
* Temporal types without a condition need every referenced rule (pySigma). A value type
  counts the events carrying the condition's field (numeric for sums, averages and
  percentiles; non-numeric values are skipped); ``value_percentile`` is the value at rank
  ``percentile`` (default 50, linear interpolation), ``value_median`` rank 50.
* Chains: when a correlation fires, its result is an event of every correlation that refers
  to it, at the event time of the record that completed it, with the group values taken from
  the inner result by field name (else from that record).

Bounds: at most ``max_groups`` groups per rule (least recently used evicted) and
``max_events`` events per group (oldest dropped); results keep at most ``max_refs`` event
references (the latest). ``stats()`` counts groups, events, fired, evictions, late records.
"""

from __future__ import annotations

import heapq
import itertools
import math
import operator
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Sequence as Seq
from dataclasses import dataclass, replace
from typing import Any

from ruletag.errors import InvalidRule, RuleError, UnsupportedRule
from ruletag.rules.algebra import as_text
from ruletag.rules.fields import FieldMap, RecordView
from ruletag.rules.ir import (
    DEFAULT_RISK_SCORE,
    Const,
    Correlation,
    CorrelationInput,
    Logsource,
    Node,
    Rule,
)
from ruletag.rules.stateful.sequence import EventRef, event_id, event_time, join_keys
from ruletag.rules.stateful.snapshot import DigestCache

__all__ = [
    "TIME_FIELDS",
    "TYPES",
    "CorrelationEngine",
    "CorrelationState",
    "Fire",
    "correlation_rule",
    "link_correlations",
    "parse_timespan",
]

TYPES = frozenset(
    {
        "event_count",
        "value_count",
        "temporal",
        "temporal_ordered",
        "value_sum",
        "value_avg",
        "value_percentile",
        "value_median",
    }
)
_VALUE_TYPES = frozenset(
    {"value_count", "value_sum", "value_avg", "value_percentile", "value_median"}
)
_NUMERIC_TYPES = _VALUE_TYPES - {"value_count"}
_OPS = ("gt", "gte", "lt", "lte", "eq", "neq")
_UPPER = frozenset({"lt", "lte", "eq", "neq"})
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "M": 2629746, "y": 31556952}
_SPAN = re.compile(r"(\d+)([smhdwMy])")
_LEVELS = ("informational", "low", "medium", "high", "critical")
#: record fields holding event time, the first parseable wins
TIME_FIELDS = (
    "@timestamp",
    "timestamp",
    "TimeCreated",
    "UtcTime",
    "EventTime",
    "eventTime",
    "Event.System.TimeCreated.SystemTime",
)
MAX_CHAIN = 10


# --------------------------------------------------------------------------- parsing


def parse_timespan(value: object) -> float | None:
    """Seconds of a Sigma ``timespan`` (``90m``, ``1h``, ``2d``...); None if malformed or 0."""
    m = _SPAN.fullmatch(str(value).strip()) if isinstance(value, str | int) else None
    if m is None or int(m.group(1)) == 0:
        return None
    return float(int(m.group(1)) * _UNITS[m.group(2)])


def _strs(value: object) -> tuple[str, ...] | None:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    return None


def correlation_rule(doc: Mapping[str, Any], path: str, line: int, index: int) -> Rule:
    """One Sigma correlation document -> an unlinked ``Rule`` of kind ``"correlation"``.

    Raises :class:`InvalidRule` (not a valid correlation) or :class:`UnsupportedRule`."""
    import uuid

    def bad(reason: str) -> InvalidRule:
        return InvalidRule(f"correlation: {reason}", path, line)

    corr = doc.get("correlation")
    if not isinstance(corr, dict):
        raise bad("'correlation' is not a mapping")
    title = doc.get("title")
    if not isinstance(title, str) or not title:
        raise bad("missing title")
    ctype = corr.get("type")
    if ctype not in TYPES:
        raise bad(f"unknown type {ctype!r}")
    refs = _strs(corr.get("rules"))
    if not refs:
        raise bad("'rules' must be a non-empty list of rule ids or names")
    span = parse_timespan(corr.get("timespan", corr.get("timeframe")))
    if span is None:
        raise bad("'timespan' must be a positive number with a unit s, m, h, d, w, M or y")
    group_by: tuple[str, ...] = ()
    if corr.get("group-by") is not None:
        got = _strs(corr.get("group-by"))
        if got is None:
            raise bad("'group-by' must be a list of field names")
        group_by = got
    cond = corr.get("condition")
    ops: list[tuple[str, float]] = []
    fields: tuple[str, ...] = ()
    percentile: float | None = None
    if cond is not None:
        if not isinstance(cond, dict):
            if isinstance(cond, str):
                raise UnsupportedRule("correlation: extended (text) conditions", path, line)
            raise bad("'condition' is not a mapping")
        for k, v in cond.items():
            if k in _OPS:
                if isinstance(v, bool) or not isinstance(v, int | float):
                    raise bad(f"condition {k}: not a number")
                ops.append((k, float(v)))
            elif k == "field":
                got = _strs(v)
                if got is None:
                    raise bad("condition field: not a field name or list")
                fields = got
            elif k == "percentile":
                if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 100:
                    raise bad("condition percentile: not a number in 0..100")
                percentile = float(v)
            else:
                raise bad(f"unknown condition key {k!r}")
    if not ops and ctype not in ("temporal", "temporal_ordered"):
        raise bad(f"{ctype} needs a condition (gt, gte, lt, lte, eq or neq)")
    if ctype in _VALUE_TYPES and not fields:
        raise bad(f"{ctype} needs a condition field")
    if ctype in _NUMERIC_TYPES and len(fields) > 1:
        raise bad(f"{ctype} takes one condition field")
    aliases: list[tuple[str, tuple[tuple[str, str], ...]]] = []
    raw_aliases = corr.get("aliases") or {}
    if not isinstance(raw_aliases, dict):
        raise bad("'aliases' is not a mapping")
    for alias, per_rule in raw_aliases.items():
        if not isinstance(per_rule, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in per_rule.items()
        ):
            raise bad(f"alias {alias!r}: want a mapping of rule name -> field")
        aliases.append((str(alias), tuple(per_rule.items())))
    generate = doc.get("generate", corr.get("generate", False))
    if not isinstance(generate, bool):
        raise bad("'generate' is not a boolean")
    level = doc.get("level") if doc.get("level") in _LEVELS else "medium"
    assert isinstance(level, str)
    rid = doc.get("id")
    rule_id = (
        rid
        if isinstance(rid, str) and rid
        else str(uuid.uuid5(uuid.NAMESPACE_URL, f"sigma:{path}#{index}"))
    )
    author = doc.get("author")
    name = doc.get("name")
    modified = doc.get("modified") or doc.get("date") or ""
    tags = _strs(doc.get("tags")) or ()
    return Rule(
        id=rule_id,
        name=title,
        source="sigma",
        condition=Const(False),
        path=path,
        line=line,
        severity=level,
        risk_score=DEFAULT_RISK_SCORE[level],
        author=(author,) if isinstance(author, str) and author else _strs(author) or (),
        modified=str(modified),
        kind="correlation",
        tags=tags,
        status=str(doc.get("status") or ""),
        ref_name=name if isinstance(name, str) else "",
        correlation=Correlation(
            type=str(ctype),
            refs=refs,
            timespan=span,
            group_by=group_by,
            condition=tuple(ops),
            field=fields,
            percentile=percentile,
            aliases=tuple(aliases),
            generate=generate,
        ),
    )


# --------------------------------------------------------------------------- linking


def link_correlations(rules: list[Rule]) -> tuple[list[Rule], list[RuleError]]:
    """Resolve every correlation's references among ``rules`` (by id, then by Sigma name).

    Returns the rules with the correlations linked (inputs filled in), the referenced rules
    hidden where ``generate`` says so, and the correlations that cannot link removed, each with
    a problem naming the reference (unknown rule, reference cycle, chain deeper than 10)."""
    corrs = [r for r in rules if r.kind == "correlation" and r.correlation is not None]
    if not corrs:
        return rules, []
    by_id = {r.id: r for r in rules}
    by_name: dict[str, Rule] = {}
    for r in rules:
        if r.ref_name and r.ref_name not in by_name:
            by_name[r.ref_name] = r

    def resolve(ref: str) -> Rule | None:
        return by_id.get(ref) or by_name.get(ref)

    problems: dict[str, RuleError] = {}
    for r in corrs:
        assert r.correlation is not None
        for ref in r.correlation.refs:
            target = resolve(ref)
            if target is None:
                problems[r.id] = InvalidRule(
                    f"correlation: unknown rule {ref!r} (no loaded rule has that id or name)",
                    r.path,
                    r.line,
                )
                break
            if target.kind not in ("event", "correlation"):
                problems[r.id] = UnsupportedRule(
                    f"correlation: rule {ref!r} is a {target.kind} rule", r.path, r.line
                )
                break

    # cycles and depth, then failures propagate to the correlations that use a failed one
    def depth(r: Rule, seen: tuple[str, ...]) -> int:
        label = r.ref_name or r.id
        if label in seen:
            raise _Cycle((*seen[seen.index(label) :], label))
        assert r.correlation is not None
        d = 0
        for ref in r.correlation.refs:
            t = resolve(ref)
            if t is not None and t.kind == "correlation":
                d = max(d, depth(t, (*seen, label)))
        return d + 1

    for r in corrs:
        if r.id in problems:
            continue
        try:
            if depth(r, ()) > MAX_CHAIN:
                problems[r.id] = UnsupportedRule(
                    f"correlation: chain deeper than {MAX_CHAIN}", r.path, r.line
                )
        except _Cycle as cyc:
            problems[r.id] = InvalidRule(
                "correlation: reference cycle " + " -> ".join(cyc.ids), r.path, r.line
            )
    changed = True
    while changed:
        changed = False
        for r in corrs:
            if r.id in problems:
                continue
            assert r.correlation is not None
            for ref in r.correlation.refs:
                t = resolve(ref)
                if t is not None and t.id in problems:
                    problems[r.id] = UnsupportedRule(
                        f"correlation: referenced correlation {ref!r} did not load",
                        r.path,
                        r.line,
                    )
                    changed = True
                    break

    # which referenced rules still produce their own results
    wanted: dict[str, bool] = {}
    for r in corrs:
        if r.id in problems:
            continue
        assert r.correlation is not None
        for ref in r.correlation.refs:
            t = resolve(ref)
            assert t is not None
            wanted[t.id] = wanted.get(t.id, False) or r.correlation.generate

    done: dict[str, Rule] = {}

    def linked(r: Rule) -> Rule:
        """``r`` with its inputs filled in; an inner correlation is linked first and carried
        whole, so an outer correlation works even when selection leaves the inner one out."""
        got = done.get(r.id)
        if got is not None:
            return got
        c = r.correlation
        assert c is not None
        inputs = []
        for ref in c.refs:
            t = resolve(ref)
            assert t is not None
            event = t.kind == "event"
            inputs.append(
                CorrelationInput(
                    ref=ref,
                    rule_id=t.id,
                    condition=t.condition if event else None,
                    fields=_input_fields(c, ref, t),
                    logsource=t.logsource if event else None,
                    rule=None if event else linked(t),
                )
            )
        emit = wanted.get(r.id, True)
        got = done[r.id] = replace(r, correlation=replace(c, inputs=tuple(inputs), emit=emit))
        return got

    out: list[Rule] = []
    for r in rules:
        if r.id in problems:
            continue
        if r.kind == "correlation" and r.correlation is not None:
            r = linked(r)
        elif r.kind == "event" and wanted.get(r.id) is False:
            r = replace(r, condition=Const(False))
        out.append(r)
    return out, list(problems.values())


class _Cycle(Exception):
    def __init__(self, ids: tuple[str, ...]) -> None:
        super().__init__(ids)
        self.ids = ids


def _input_fields(c: Correlation, ref: str, target: Rule) -> tuple[str, ...]:
    """Per group-by entry, the field to read in the events of ``target`` (alias resolved)."""
    names = {ref, target.ref_name, target.id} - {""}
    aliases = dict(c.aliases)
    out: list[str] = []
    for g in c.group_by:
        per_rule = aliases.get(g)
        if per_rule is None:
            out.append(g)
            continue
        found = [f for name, f in per_rule if name in names]
        out.append(found[0] if found else g)
    return tuple(out)


# --------------------------------------------------------------------------- state

Key = tuple[str, ...]


@dataclass(slots=True)
class _Event:
    ts: float
    arrival: int
    inputs: frozenset[int]  # which referenced rules it matched
    value: Any  # the condition field's value (a tuple of texts, a number, or None)
    ref: dict[str, Any]


class _Group:
    __slots__ = ("events", "opened")

    def __init__(self) -> None:
        self.events: list[_Event] = []  # by (ts, arrival)
        self.opened = -math.inf  # start of the window a close-checked condition waits for


@dataclass(frozen=True, slots=True)
class Fire:
    """A correlation that fired: the rule, its group, the aggregate, the events' refs."""

    rule: Rule
    group: tuple[tuple[str, str], ...]  # (group-by field, value)
    type: str
    value: float  # the count / distinct count / rules matched / sum / average / percentile
    start: float  # event time of the first event counted
    end: float  # event time of the last one
    events: tuple[EventRef, ...]
    ts: float  # event time of the completing record (chains use it)
    raw_ts: Any = None


_CMP: dict[str, Callable[[float, float], bool]] = {
    "gt": operator.gt,
    "gte": operator.ge,
    "lt": operator.lt,
    "lte": operator.le,
    "eq": operator.eq,
    "neq": operator.ne,
}


def _holds(ops: Seq[tuple[str, float]], x: float) -> bool:
    return all(_CMP[op](x, v) for op, v in ops)


def _percentile(values: list[float], rank: float) -> float:
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * rank / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


class CorrelationState:
    """The groups of one correlation rule (see the module docstring)."""

    def __init__(
        self, corr: Correlation, *, max_groups: int = 100_000, max_events: int = 10_000
    ) -> None:
        self.corr = corr
        self.span = corr.timespan
        self.ops = corr.condition or (("gte", float(len(corr.refs))),)
        self.at_close = any(op in _UPPER for op, _ in self.ops)
        self.max_groups = max_groups
        self.max_events = max_events
        self.watermark = -math.inf
        self.groups: OrderedDict[Key, _Group] = OrderedDict()
        self.closing: list[tuple[float, Key]] = []  # (window end, key) heap (at_close only)
        self.counters: dict[str, int] = {
            "fired": 0,
            "evicted_groups": 0,
            "evicted_events": 0,
            "expired_groups": 0,
            "late_records": 0,
        }

    def events(self) -> int:
        return sum(len(g.events) for g in self.groups.values())

    def aggregate(self, events: Seq[_Event]) -> float | None:
        """The value the condition is compared with, over ``events``; None: nothing to
        compare (a value type without any usable value)."""
        t = self.corr.type
        if t == "event_count":
            return float(len(events))
        if t == "value_count":
            return float(len({e.value for e in events if e.value is not None}))
        if t == "temporal":
            return float(len(frozenset().union(*(e.inputs for e in events))))
        if t == "temporal_ordered":
            nxt = 0
            for e in events:  # greedy: the longest prefix of the rules seen in order
                if nxt < len(self.corr.refs) and nxt in e.inputs:
                    nxt += 1
            return float(nxt)
        nums = [float(e.value) for e in events if e.value is not None]
        if not nums:
            return None
        if t == "value_sum":
            return math.fsum(nums)
        if t == "value_avg":
            return math.fsum(nums) / len(nums)
        if t == "value_median":
            return _percentile(nums, 50.0)
        return _percentile(nums, 50.0 if self.corr.percentile is None else self.corr.percentile)

    def advance(self, ts: float) -> list[tuple[Key, list[_Event], float]]:
        """Move the watermark to ``ts`` (if later); windows that close (at-close conditions)
        and hold: (key, events, value) each; idle groups expire."""
        if ts <= self.watermark:
            return []
        self.watermark = ts
        out: list[tuple[Key, list[_Event], float]] = []
        if self.at_close:
            while self.closing and self.closing[0][0] < ts:
                end, key = heapq.heappop(self.closing)
                g = self.groups.get(key)
                if g is None or g.opened + self.span != end:
                    continue
                n = 0
                while n < len(g.events) and g.events[n].ts <= end:
                    n += 1
                window, rest = g.events[:n], g.events[n:]
                value = self.aggregate(window)
                if value is not None and _holds(self.ops, value):
                    self.counters["fired"] += 1
                    out.append((key, window, value))
                g.events = rest
                if rest:
                    self._open(key, g, rest[0].ts)
                else:
                    del self.groups[key]
        else:
            bound = ts - self.span
            # the least recently used first: stop at the first group still in the window
            for key in list(itertools.islice(self.groups, 64)):
                g = self.groups[key]
                if g.events and g.events[-1].ts >= bound:
                    break
                del self.groups[key]
                self.counters["expired_groups"] += 1
        return out

    def _open(self, key: Key, g: _Group, start: float) -> None:
        g.opened = start
        heapq.heappush(self.closing, (start + self.span, key))

    def hit(self, key: Key, ev: _Event) -> tuple[list[_Event], float] | None:
        """An event for group ``key`` (watermark already advanced); the events and value
        when the group fires on it (lower-bound conditions only)."""
        bound = self.watermark - self.span
        if ev.ts < bound:
            self.counters["late_records"] += 1
            return None
        g = self.groups.get(key)
        if g is None:
            g = self.groups[key] = _Group()
            if len(self.groups) > self.max_groups:
                _, old = self.groups.popitem(last=False)
                self.counters["evicted_groups"] += 1
                self.counters["evicted_events"] += len(old.events)
        else:
            self.groups.move_to_end(key)
        if self.at_close and (not g.events or ev.ts < g.opened):
            self._open(key, g, ev.ts if not g.events else min(ev.ts, g.opened))
        i = len(g.events)
        while i and (g.events[i - 1].ts, g.events[i - 1].arrival) > (ev.ts, ev.arrival):
            i -= 1
        g.events.insert(i, ev)
        if not self.at_close:
            n = 0
            while n < len(g.events) and g.events[n].ts < bound:
                n += 1
            del g.events[:n]
        extra = len(g.events) - self.max_events
        if extra > 0:
            del g.events[:extra]
            self.counters["evicted_events"] += extra
        if self.at_close:
            return None
        value = self.aggregate(g.events)
        if value is None or not _holds(self.ops, value):
            return None
        fired = g.events
        del self.groups[key]
        self.counters["fired"] += 1
        return fired, value

    # ------------------------------------------------------------------ snapshots

    def snapshot(self) -> dict[str, Any]:
        return {
            "watermark": None if self.watermark == -math.inf else self.watermark,
            "counters": dict(self.counters),
            "groups": [
                {
                    "key": list(k),
                    "opened": None if g.opened == -math.inf else g.opened,
                    "events": [
                        [
                            e.ts,
                            e.arrival,
                            sorted(e.inputs),
                            list(e.value) if isinstance(e.value, tuple) else e.value,
                            e.ref,
                        ]
                        for e in g.events
                    ],
                }
                for k, g in self.groups.items()
            ],
        }

    def restore(self, snap: Mapping[str, Any]) -> None:
        wm = snap.get("watermark")
        self.watermark = -math.inf if wm is None else float(wm)
        self.counters.update({k: int(v) for k, v in snap.get("counters", {}).items()})
        self.groups.clear()
        self.closing.clear()
        for gs in snap.get("groups", []):
            key = tuple(str(k) for k in gs["key"])
            g = self.groups[key] = _Group()
            for ts, arrival, inputs, value, ref in gs["events"]:
                v = tuple(value) if isinstance(value, list) else value
                g.events.append(_Event(float(ts), int(arrival), frozenset(inputs), v, dict(ref)))
            if gs.get("opened") is not None and self.at_close:
                self._open(key, g, float(gs["opened"]))


# --------------------------------------------------------------------------- engine


def record_time(view: RecordView, first: str = "@timestamp") -> tuple[float, Any] | None:
    """(seconds, raw value) of the record's event time, from ``first`` then
    :data:`TIME_FIELDS`; None when none parses."""
    for f in (first, *TIME_FIELDS):
        for v in view.values(f):
            ts = event_time(v)
            if ts is not None:
                return ts, v
            break
    return None


def _value(view: RecordView, corr: Correlation) -> Any:
    if not corr.field:
        return None
    if corr.type == "value_count":
        parts: list[str] = []
        for f in corr.field:
            t = next((t for t in map(as_text, view.values(f)) if t is not None), None)
            if t is None:
                return None
            parts.append(t)
        return tuple(parts)
    for v in view.values(corr.field[0]):
        if isinstance(v, bool):
            continue
        if isinstance(v, int | float):
            return float(v)
        t = as_text(v)
        if t is not None:
            try:
                x = float(t)
            except ValueError:
                continue
            if math.isfinite(x):
                return x
    return None


def _reachable(rules: Iterable[Rule]) -> list[Rule]:
    """The correlations of ``rules`` and every inner correlation they carry, once each by id,
    inner ones first."""
    out: dict[str, Rule] = {}

    def visit(r: Rule) -> None:
        if r.id in out or r.correlation is None:
            return
        for inp in r.correlation.inputs:
            if inp.rule is not None:
                visit(inp.rule)
        out[r.id] = r

    for r in rules:
        if r.kind == "correlation":
            visit(r)
    return list(out.values())


@dataclass
class _Run:
    rule: Rule
    state: CorrelationState
    parents: list[tuple[int, int]]  # (run, input) that this correlation's results feed


class CorrelationEngine:
    """Every linked Sigma correlation of ``rules``, fed record by record."""

    kind = "correlation"

    def __init__(
        self,
        rules: Iterable[Rule],
        fieldmap: FieldMap | None = None,
        *,
        max_groups: int = 100_000,
        max_events: int = 10_000,
        max_refs: int = 100,
    ) -> None:
        from ruletag.rules.stateful.tables import step_matcher, step_table

        self.runs: list[_Run] = []
        self.max_refs = max_refs
        found = _reachable(rules)
        run_of = {r.id: i for i, r in enumerate(found)}
        for r in found:
            assert r.correlation is not None
            st = CorrelationState(r.correlation, max_groups=max_groups, max_events=max_events)
            self.runs.append(_Run(r, st, []))
        base_rules: list[Rule] = []
        index: dict[tuple[Node, Logsource | None], int] = {}
        self._targets: list[list[tuple[int, int]]] = []  # base rule -> (run, input)
        for ri, run in enumerate(self.runs):
            assert run.rule.correlation is not None
            for ii, inp in enumerate(run.rule.correlation.inputs):
                if inp.condition is None:
                    child = run_of.get(inp.rule_id)
                    if child is not None:
                        self.runs[child].parents.append((ri, ii))
                    continue
                k = index.get((inp.condition, inp.logsource))
                if k is None:
                    k = index[(inp.condition, inp.logsource)] = len(base_rules)
                    base_rules.append(
                        Rule(
                            id=f"{inp.rule_id}#corr{k}",
                            name=inp.ref,
                            source=run.rule.source,
                            condition=inp.condition,
                            logsource=inp.logsource,
                        )
                    )
                    self._targets.append([])
                self._targets[k].append((ri, ii))
        self.table = step_table(base_rules, fieldmap, self.kind)
        self.matcher = step_matcher(self.table)
        self._arrival = 0
        self._digest = DigestCache()  # rule id -> definition digest, for checkpoints

    @classmethod
    def of(
        cls, rules: Iterable[Rule], fieldmap: FieldMap | None = None
    ) -> CorrelationEngine | None:
        """An engine for the linked correlation rules among ``rules``; None if there are none."""
        found = [
            r
            for r in rules
            if r.kind == "correlation" and r.correlation is not None and r.correlation.inputs
        ]
        return cls(found, fieldmap) if found else None

    def stats(self) -> dict[str, int]:
        out = {"rules": len(self.runs), "groups": 0, "events": 0}
        for run in self.runs:
            out["groups"] += len(run.state.groups)
            out["events"] += run.state.events()
            for k, v in run.state.counters.items():
                out[k] = out.get(k, 0) + v
        return out

    def step_hits(self, entries: bytes, spans: Seq[tuple[int, int]]) -> dict[int, list[int]]:
        """Entry index -> the referenced rules' conditions it hits (raw pre-filter first)."""
        return self.matcher.match_entries(entries, spans)

    def snapshot(self) -> dict[str, Any]:
        """The engine's state as JSON-able data, per rule id."""
        return {
            "format": 1,
            "arrival": self._arrival,
            "rules": {run.rule.id: run.state.snapshot() for run in self.runs},
            "digests": {run.rule.id: self._digest(run.rule) for run in self.runs},
        }

    def restore(self, snap: Mapping[str, Any]) -> int:
        """Take back a :meth:`snapshot`; rules it does not know, or whose definition changed,
        start empty. How many rules got their state back."""
        if snap.get("format") != 1:
            return 0
        self._arrival = int(snap.get("arrival", 0))
        rules = snap.get("rules", {})
        digests = snap.get("digests", {})
        restored = 0
        for run in self.runs:
            got = rules.get(run.rule.id)
            if got is not None and digests.get(run.rule.id) == self._digest(run.rule):
                run.state.restore(got)
                restored += 1
        return restored

    def feed(self, record: Mapping[str, object], hits: Seq[int] | None = None) -> list[Fire]:
        """Offer one record (in arrival order); the correlations it makes fire (inner
        correlations of a chain only when they emit)."""
        self._arrival += 1
        if hits is None:
            hits = self.matcher.match(record)
        per_run: dict[int, set[int]] = {}
        for h in hits:
            for ri, ii in self._targets[h]:
                per_run.setdefault(ri, set()).add(ii)
        if not per_run:
            return []
        view = self.table.fieldmap.view(record)
        got = record_time(view)
        if got is None:
            for ri in per_run:
                c = self.runs[ri].state.counters
                c["no_timestamp"] = c.get("no_timestamp", 0) + 1
            return []
        ts, raw = got
        ref: dict[str, Any] = {"timestamp": raw, "id": event_id(view)}
        out: list[Fire] = []
        for ri, inputs in per_run.items():
            self._feed_run(ri, inputs, view, ts, raw, ref, None, out, 0)
        return out

    def _feed_run(
        self,
        ri: int,
        inputs: set[int],
        view: RecordView,
        ts: float,
        raw: Any,
        ref: dict[str, Any],
        terms: Mapping[str, str] | None,
        out: list[Fire],
        depth: int,
    ) -> None:
        run = self.runs[ri]
        c = run.rule.correlation
        assert c is not None
        fires: list[tuple[Key, list[_Event], float]] = list(run.state.advance(ts))
        value = _value(view, c)
        by_key: dict[Key, set[int]] = {}
        for ii in sorted(inputs):
            fields = c.inputs[ii].fields
            if terms is not None:
                keys = self._keys_from(terms, fields, view)
            else:
                keys = join_keys(view, fields)
            for key in keys:
                by_key.setdefault(key, set()).add(ii)
        # one event per record and group, carrying every referenced rule it matched
        for key, matched in by_key.items():
            ev = _Event(ts, self._arrival, frozenset(matched), value, ref)
            done = run.state.hit(key, ev)
            if done is not None:
                fires.append((key, *done))
        for key, events, agg in fires:
            fire = Fire(
                run.rule,
                tuple(zip(c.group_by, key, strict=True)),
                c.type,
                agg,
                events[0].ts,
                events[-1].ts,
                tuple(e.ref for e in events[-self.max_refs :]),
                ts,
                raw,
            )
            if c.emit:
                out.append(fire)
            if depth < MAX_CHAIN:
                tref = {
                    "timestamp": raw,
                    "id": f"correlation:{run.rule.id}",
                    "events": [dict(e) for e in fire.events],
                }
                for pri, pii in run.parents:
                    self._feed_run(
                        pri, {pii}, view, ts, raw, tref, dict(fire.group), out, depth + 1
                    )

    @staticmethod
    def _keys_from(terms: Mapping[str, str], fields: Seq[str], view: RecordView) -> list[Key]:
        parts: list[str] = []
        for f in fields:
            v = terms.get(f)
            if v is None:
                ks = join_keys(view, (f,))
                if not ks:
                    return []
                v = ks[0][0]
            parts.append(v)
        return [tuple(parts)]
