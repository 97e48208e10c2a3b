"""Streaming EQL sequences: Elasticsearch's sequence matcher, fed one record at a time.

:class:`SequenceState` is the state machine of one rule: per join key, per stage, the partial
sequences ordered by the ordinal of their last event (Elasticsearch's ``SequenceMatcher``):

* a hit for the first stage starts a new partial;
* a hit for stage N takes, in the same key's stage N-1 group, the latest partial whose last
  ordinal is strictly smaller than the hit's, and removes it and every older partial of that
  group; then checks maxspan (``ts - start > span`` fails; the bound is inclusive) and
  ``until`` (an until event of that key with ``last <= until < hit`` fails). A failed check
  drops the hit; there is no fall-back to an older partial;
* the hit completing the last stage yields the sequence; other partials of the key survive.

An event is offered to the stages last to first (so it never advances a partial it just
created), then to ``until``. Ordinals are ``(timestamp, tiebreaker, arrival number)``: records
are processed on arrival and compared by event time, so records that arrive in event-time
order give Elasticsearch's results exactly; a late record is compared with the partials still
kept (exact when it lands between them; partials already consumed or expired are gone).

Bounds: a partial expires when its first event is more than ``span`` (maxspan, else the rule's
look-back) older than the rule's watermark (the latest event time seen); at most ``max_keys``
keys per rule (the least recently used key is evicted first) and ``max_partials`` partials per
key and stage (the oldest first). ``SequenceState.counters`` counts completions, evictions,
expiries and late records.

:class:`SequenceEngine` runs every sequence rule of a rule set: the step and until conditions
are compiled into a small table of their own (the main table holds sequence rules as
never-firing entries), a record's step hits go to the rules' state machines, and completed
sequences come back as :class:`Completion` values.

Missing events ``![...]`` (:mod:`.missing`): the positive steps are matched as above, then each
completed match waits until the engine's watermark (the latest event time it has seen, minus
``lateness`` seconds) shows the missing clauses absent; it is returned by the :meth:`feed` (or
:meth:`SequenceEngine.observe`) call whose record moved the watermark far enough, so the
annotation goes on that record, or by :meth:`SequenceEngine.flush` at the end of the input.
Its ``events`` hold ``{"missing": true}`` placeholders where the missing clauses stand.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from bisect import bisect_left, insort
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import ujson

from ruletag.rules.algebra import as_text
from ruletag.rules.fields import FieldMap, RecordView
from ruletag.rules.ir import Node, Rule
from ruletag.rules.ir import Sequence as SequenceIR
from ruletag.rules.stateful.missing import MissingState
from ruletag.rules.stateful.snapshot import from_time, json_value, restorable, rule_digest, to_time

__all__ = [
    "Completion",
    "EventRef",
    "SequenceEngine",
    "SequenceState",
    "event_time",
]

#: (timestamp seconds, tiebreaker sort key, arrival number)
Ordinal = tuple[float, tuple[Any, ...], int]
#: A record that took part in a sequence: ``{"timestamp": ..., "id": ...}``.
EventRef = Mapping[str, Any]
Key = tuple[str, ...]

UNTIL = -1
#: stage code of missing clause ``m``: ``MISSING - m``
MISSING = -2
#: default allowed lateness (seconds) of the watermark that confirms missing events
DEFAULT_LATENESS = 2.0
#: the placeholder of a missing clause in a completed sequence's events
MISSING_REF: EventRef = {"missing": True}
#: tiebreaker sort key of a record without a tiebreaker value (sorts after any value)
NO_TIEBREAKER: tuple[Any, ...] = (1,)
#: record fields used as an event's stable id, first present wins; else a content digest
ID_FIELDS = ("event.id", "ProcessGuid", "process.entity_id")
#: keys an annotator adds to records; left out of the content digest
_ANNOTATION_KEYS = frozenset({"detections", "explain"})


class _Partial:
    __slots__ = ("last", "refs", "start")

    def __init__(self, start: float, last: Ordinal, refs: tuple[EventRef, ...]) -> None:
        self.start = start
        self.last = last
        self.refs = refs


def _last(p: _Partial) -> Ordinal:
    return p.last


class _KeyState:
    __slots__ = ("groups", "untils")

    def __init__(self, stages: int) -> None:
        #: stage -> its partials, ordered by last ordinal (the last stage completes: no group)
        self.groups: list[list[_Partial]] = [[] for _ in range(stages - 1)]
        self.untils: list[Ordinal] = []

    def partials(self) -> int:
        return sum(len(g) for g in self.groups)


class SequenceState:
    """The partial sequences of one rule with ``stages`` steps (see the module docstring)."""

    def __init__(
        self, stages: int, span: float, *, max_keys: int = 100_000, max_partials: int = 16
    ) -> None:
        if stages < 1:
            raise ValueError("a sequence has at least one stage")
        self.stages = stages
        self.span = span
        self.max_keys = max_keys
        self.max_partials = max_partials
        self.keys: OrderedDict[Key, _KeyState] = OrderedDict()
        self.counters: dict[str, int] = {
            "completed": 0,
            "evicted_keys": 0,
            "evicted_partials": 0,
            "expired_partials": 0,
            "late_records": 0,
        }

    def partials(self) -> int:
        """Partial sequences held."""
        return sum(ks.partials() for ks in self.keys.values())

    # ------------------------------------------------------------------ events

    def hit(
        self, stage: int, key: Key, ordinal: Ordinal, ref: EventRef
    ) -> tuple[EventRef, ...] | None:
        """A record with ``ordinal`` matched step ``stage`` with join ``key``; the events of
        the sequence it completes, if it does."""
        ts = ordinal[0]
        if self.stages == 1:  # one positive step (and missing events): every hit completes
            self.counters["completed"] += 1
            return (ref,)
        if stage == 0:
            ks = self._touch(key)
            self._insert(ks.groups[0], _Partial(ts, ordinal, (ref,)))
            return None
        ks0 = self.keys.get(key)
        if ks0 is None:
            return None
        ks = ks0
        group = ks.groups[stage - 1]
        i = bisect_left(group, ordinal, key=_last) - 1
        if i < 0:
            return None
        p = group[i]
        del group[: i + 1]
        self.keys.move_to_end(key)
        done: tuple[EventRef, ...] | None = None
        if ts - p.start > self.span:
            pass  # outside maxspan: the hit and the partials taken are dropped
        elif self._until_between(ks, p.last, ordinal):
            pass
        elif stage == self.stages - 1:
            done = (*p.refs, ref)
            self.counters["completed"] += 1
        else:
            self._insert(ks.groups[stage], _Partial(p.start, ordinal, (*p.refs, ref)))
        if not ks.partials():
            del self.keys[key]
        return done

    def until(self, key: Key, ordinal: Ordinal) -> None:
        """An ``until`` event of ``key``: recorded only while the key has partials."""
        ks = self.keys.get(key)
        if ks is None:
            return
        insort(ks.untils, ordinal)
        oldest = min(g[0].last for g in ks.groups if g)
        # an until before every partial's last event can stop none of them
        drop = bisect_left(ks.untils, oldest)
        if drop:
            del ks.untils[:drop]
        if len(ks.untils) > self.max_partials:
            del ks.untils[: len(ks.untils) - self.max_partials]

    def expire(self, watermark: float) -> int:
        """Drop the partials whose first event is more than ``span`` before ``watermark``."""
        bound = watermark - self.span
        dropped = 0
        for key in list(self.keys):
            ks = self.keys[key]
            for g in ks.groups:
                keep = [p for p in g if p.start >= bound]
                dropped += len(g) - len(keep)
                g[:] = keep
            if not ks.partials():
                del self.keys[key]
        self.counters["expired_partials"] += dropped
        return dropped

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _until_between(ks: _KeyState, last: Ordinal, ordinal: Ordinal) -> bool:
        j = bisect_left(ks.untils, ordinal) - 1  # the nearest until strictly before the hit
        return j >= 0 and ks.untils[j] >= last

    def _touch(self, key: Key) -> _KeyState:
        ks = self.keys.get(key)
        if ks is not None:
            self.keys.move_to_end(key)
            return ks
        ks = self.keys[key] = _KeyState(self.stages)
        if len(self.keys) > self.max_keys:
            _, old = self.keys.popitem(last=False)
            self.counters["evicted_keys"] += 1
            self.counters["evicted_partials"] += old.partials()
        return ks

    def _insert(self, group: list[_Partial], p: _Partial) -> None:
        insort(group, p, key=_last)
        if len(group) > self.max_partials:
            del group[0]
            self.counters["evicted_partials"] += 1


# --------------------------------------------------------------------------- records


def event_time(value: object) -> float | None:
    """Seconds since the epoch of a timestamp value: ISO 8601 text (no zone: UTC), or an
    epoch number (values above 10^12 are milliseconds); None if it is neither."""
    if isinstance(value, list) and value:
        value = value[0]
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        v = float(value)
        return v / 1000.0 if abs(v) > 1e12 else v
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    text = value.strip()
    if text.replace(".", "", 1).isdigit():
        return event_time(float(text))
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def event_id(view: RecordView) -> str:
    """A stable id of the record: the first of :data:`ID_FIELDS` present, else a digest of its
    content (annotation keys left out)."""
    for f in ID_FIELDS:
        for v in view.values(f):
            t = as_text(v)
            if t:
                return t
    rec = {k: v for k, v in view.record.items() if k not in _ANNOTATION_KEYS}
    try:
        blob = ujson.dumps(rec, sort_keys=True, ensure_ascii=False, reject_bytes=False)
    except (TypeError, OverflowError):
        blob = repr(sorted(rec.items(), key=lambda kv: str(kv[0])))
    return "sha256:" + hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _tiebreaker(view: RecordView, f: str | None) -> tuple[Any, ...]:
    if f is None:
        return NO_TIEBREAKER
    for v in view.values(f):
        if isinstance(v, int | float) and not isinstance(v, bool):
            return (0, 0, float(v))
        t = as_text(v)
        if t is not None:
            return (0, 1, t)
    return NO_TIEBREAKER


def join_keys(view: RecordView, fields: Seq[str]) -> list[Key]:
    """Every join-key tuple of the record (cartesian product of multi-valued fields);
    ``[]`` when a key field is missing or null."""
    per_field: list[list[str]] = []
    for f in fields:
        vals = list(dict.fromkeys(t for t in map(as_text, view.values(f)) if t is not None))
        if not vals:
            return []
        per_field.append(vals)
    return [tuple(k) for k in itertools.product(*per_field)]


def _plain_value(record: Mapping[str, object], name: str) -> object:
    """``record[name]`` as a literal key or a path of nested maps; None if neither (cheap: no
    field-map view, for the timestamp of records that hit no step)."""
    value = record.get(name)
    if value is not None or "." not in name:
        return value
    node: object = record
    for part in name.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(part)
    return node


def _with_gaps(seq: SequenceIR, refs: tuple[EventRef, ...]) -> tuple[EventRef, ...]:
    """The positive events ``refs`` with a :data:`MISSING_REF` where each missing clause
    stands, in clause order."""
    out: list[EventRef] = []
    at = sorted(m.position for m in seq.missing)
    j = 0
    for i, ref in enumerate(refs):
        while j < len(at) and at[j] == i:
            out.append(MISSING_REF)
            j += 1
        out.append(ref)
    out.extend(MISSING_REF for _ in at[j:])
    return tuple(out)


# --------------------------------------------------------------------------- engine


@dataclass(frozen=True, slots=True)
class Completion:
    """A sequence a record completed: the rule, the join key, every event's reference."""

    rule: Rule
    keys: Key
    events: tuple[EventRef, ...]


@dataclass
class _RuleRun:
    rule: Rule
    state: SequenceState
    watermark: float = -math.inf
    next_sweep: float = -math.inf
    stages_of: dict[int, list[int]] = field(default_factory=dict)
    missing: MissingState | None = None


class SequenceEngine:
    """Every sequence rule of ``rules``, fed record by record (see the module docstring)."""

    kind = "sequence"

    def __init__(
        self,
        rules: Iterable[Rule],
        fieldmap: FieldMap | None = None,
        *,
        max_keys: int = 100_000,
        max_partials: int = 16,
        lateness: float = DEFAULT_LATENESS,
    ) -> None:
        from ruletag.rules.stateful.tables import step_matcher, step_table

        self.runs: list[_RuleRun] = []
        step_rules: list[Rule] = []
        index: dict[tuple[int, Node], int] = {}
        #: step-table rule -> (run, stage or UNTIL) pairs it feeds
        self._targets: list[list[tuple[int, int]]] = []
        for r in rules:
            seq = r.sequence
            if r.kind != "sequence" or seq is None:
                continue
            ri = len(self.runs)
            span = seq.maxspan if seq.maxspan is not None else seq.ttl
            state = SequenceState(
                len(seq.steps), span, max_keys=max_keys, max_partials=max_partials
            )
            self.runs.append(_RuleRun(r, state))
            parts = [(stage, s.condition) for stage, s in enumerate(seq.steps)]
            if seq.until is not None:
                parts.append((UNTIL, seq.until.condition))
            if seq.missing:
                positions = [m.position for m in seq.missing]
                self.runs[-1].missing = MissingState(
                    positions, len(seq.steps), span, max_keys=max_keys
                )
                parts.extend((MISSING - m, ms.step.condition) for m, ms in enumerate(seq.missing))
            for stage, cond in parts:
                k = index.get((ri, cond))
                if k is None:
                    k = index[(ri, cond)] = len(step_rules)
                    step_rules.append(
                        Rule(
                            id=f"{r.id}#{len(step_rules)}",
                            name=r.name,
                            source=r.source,
                            condition=cond,
                        )
                    )
                    self._targets.append([])
                self._targets[k].append((ri, stage))
        self.table = step_table(step_rules, fieldmap, self.kind)
        #: the step table's matcher: callers with packed entries use its raw pre-filter
        #: (``step_hits``) so records that hit no step cost no Python work here
        self.matcher = step_matcher(self.table)
        self._arrival = 0
        self._digests: dict[str, str] = {}  # rule id -> rule_digest, for checkpoints
        self.lateness = lateness
        #: the latest event time seen (missing events: the watermark is this minus lateness)
        self.clock = -math.inf
        self._checks = [run for run in self.runs if run.missing is not None]
        self._time_fields = tuple(
            dict.fromkeys(
                run.rule.sequence.timestamp_field
                for run in self._checks
                if run.rule.sequence is not None
            )
        )

    @classmethod
    def of(cls, rules: Iterable[Rule], fieldmap: FieldMap | None = None) -> SequenceEngine | None:
        """An engine for the sequence rules among ``rules``; None when there are none."""
        seqs = [r for r in rules if r.kind == "sequence"]
        return cls(seqs, fieldmap) if seqs else None

    def stats(self) -> dict[str, int]:
        """Live keys and partials, and the counters, summed over the rules."""
        out = {"rules": len(self.runs), "keys": 0, "partials": 0}
        for run in self.runs:
            out["keys"] += len(run.state.keys)
            out["partials"] += run.state.partials()
            counters = dict(run.state.counters)
            if run.missing is not None:
                counters.update(run.missing.stats())
            for k, v in counters.items():
                out[k] = out.get(k, 0) + v
        return out

    # ------------------------------------------------------------------ time (missing events)

    def pending(self) -> int:
        """Sequences waiting for the watermark to confirm their missing events; while there
        are some, callers should show the engine every record (:meth:`observe`)."""
        return sum(len(run.missing.pending) for run in self._checks if run.missing is not None)

    def watermark(self) -> float:
        """The latest event time seen minus the allowed lateness."""
        return self.clock - self.lateness

    def advance(self, ts: float) -> list[Completion]:
        """Event time ``ts`` was seen; the sequences whose missing events it confirms."""
        if ts > self.clock:
            self.clock = ts
        return self._release(self.watermark())

    def observe(self, record: Mapping[str, object]) -> list[Completion]:
        """A record that hit no step still moves the watermark (read from the rules' timestamp
        fields); the sequences it confirms."""
        if not self._checks:
            return []
        best = -math.inf
        for f in self._time_fields:
            ts = event_time(_plain_value(record, f))
            if ts is None:  # an aliased or oddly nested field: the field map's full view
                view = self.table.fieldmap.view(record)
                ts = event_time(next(iter(view.values(f)), None))
            if ts is not None and ts > best:
                best = ts
        return self.advance(best) if best > -math.inf else []

    def flush(self) -> list[Completion]:
        """End of input: decide every waiting sequence now."""
        return self._release(math.inf)

    def _release(self, watermark: float) -> list[Completion]:
        out: list[Completion] = []
        for run in self._checks:
            assert run.missing is not None
            for key, events in run.missing.release(watermark):  # and prunes its history
                out.append(Completion(run.rule, key, events))
        return out

    def step_hits(self, entries: bytes, spans: Seq[tuple[int, int]]) -> dict[int, list[int]]:
        """Entry index -> the step conditions it hits, for packed ``[time, record]`` entries
        (the raw pre-filter leaves most entries undecoded); feed only those records."""
        return self.matcher.match_entries(entries, spans)

    def feed(self, record: Mapping[str, object], hits: Seq[int] | None = None) -> list[Completion]:
        """Offer one record (in arrival order); the sequences it completes. ``hits``: its step
        hits when already known (:meth:`step_hits`); a record that hits no step may be skipped,
        since only the order of the records fed matters."""
        self._arrival += 1
        if hits is None:
            hits = self.matcher.match(record)
        if not hits:
            return self.observe(record) if self._checks and self.pending() else []
        per_run: dict[int, set[int]] = {}
        for h in hits:
            for ri, stage in self._targets[h]:
                per_run.setdefault(ri, set()).add(stage)
        view = self.table.fieldmap.view(record)
        out: list[Completion] = []
        for ri, stages in per_run.items():
            out.extend(self._feed_run(self.runs[ri], stages, view))
        if self._checks:
            out.extend(self._release(self.watermark()))
        return out

    def _feed_run(self, run: _RuleRun, stages: set[int], view: RecordView) -> list[Completion]:
        seq = run.rule.sequence
        assert seq is not None
        raw_ts = next(iter(view.values(seq.timestamp_field)), None)
        ts = event_time(raw_ts)
        state = run.state
        if ts is None:
            state.counters["no_timestamp"] = state.counters.get("no_timestamp", 0) + 1
            return []
        if ts < run.watermark:
            state.counters["late_records"] += 1
        else:
            run.watermark = ts
            if ts >= run.next_sweep:
                state.expire(ts)
                run.next_sweep = ts + max(state.span, 1.0)
        late = ts < self.watermark()  # missing events: decisions may already have been made
        if ts > self.clock:
            self.clock = ts
        ordinal: Ordinal = (ts, _tiebreaker(view, seq.tiebreaker_field), self._arrival)
        ref: EventRef = {"timestamp": raw_ts, "id": event_id(view)}
        out: list[Completion] = []
        missing = run.missing
        if missing is not None:
            if late:
                missing.counters["missing_late"] = missing.counters.get("missing_late", 0) + 1
            for code in stages:
                if code <= MISSING:
                    clause = MISSING - code
                    for key in join_keys(view, seq.missing[clause].step.keys):
                        missing.seen(clause, key, ts)
        for stage in sorted((s for s in stages if s >= 0), reverse=True):
            for key in join_keys(view, seq.steps[stage].keys):
                done = state.hit(stage, key, ordinal, ref)
                if done is None:
                    continue
                if missing is None:
                    out.append(Completion(run.rule, key, done))
                    continue
                times = [event_time(e["timestamp"]) for e in done[:-1]]
                times.append(ts)
                missing.candidate(
                    key, [ts if t is None else t for t in times], _with_gaps(seq, done)
                )
        if UNTIL in stages and seq.until is not None:
            for key in join_keys(view, seq.until.keys):
                state.until(key, ordinal)
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
        for run in self.runs:
            st = run.state
            keys = [
                [
                    list(key),
                    [
                        [[p.start, _ordinal_out(p.last), [_ref_out(r) for r in p.refs]] for p in g]
                        for g in ks.groups
                    ],
                    [_ordinal_out(o) for o in ks.untils],
                ]
                for key, ks in st.keys.items()
            ]
            rules[run.rule.id] = {
                "digest": self._digest(run.rule),
                "watermark": to_time(run.watermark),
                "next_sweep": to_time(run.next_sweep),
                "counters": dict(st.counters),
                "keys": keys,
            }
            if run.missing is not None:  # missing events: their history and pending matches
                rules[run.rule.id]["missing"] = run.missing.snapshot()
        return {
            "kind": self.kind,
            "arrival": self._arrival,
            "clock": to_time(self.clock),
            "rules": rules,
        }

    def restore(self, snap: Mapping[str, Any]) -> int:
        """Take back the state of every rule of ``snap`` whose id and definition are unchanged;
        how many rules were restored."""
        restored = 0
        for run in self.runs:
            saved = restorable(snap, run.rule, self._digest(run.rule))
            if saved is None:
                continue
            st = run.state
            st.keys.clear()
            for key, groups, untils in saved["keys"]:
                ks = _KeyState(st.stages)
                for g, items in zip(ks.groups, groups, strict=True):
                    g.extend(
                        _Partial(float(start), _ordinal_in(last), tuple(refs))
                        for start, last, refs in items
                    )
                ks.untils = [_ordinal_in(o) for o in untils]
                st.keys[tuple(key)] = ks
            st.counters.update(saved["counters"])
            run.watermark = from_time(saved["watermark"])
            run.next_sweep = from_time(saved["next_sweep"])
            if run.missing is not None and isinstance(saved.get("missing"), Mapping):
                run.missing.restore(saved["missing"])
            restored += 1
        self._arrival = max(self._arrival, int(snap.get("arrival", 0)))
        self.clock = max(self.clock, from_time(snap.get("clock")))
        return restored


def _ordinal_out(o: Ordinal) -> list[Any]:
    return [o[0], list(o[1]), o[2]]


def _ordinal_in(data: Seq[Any]) -> Ordinal:
    return (float(data[0]), tuple(data[1]), int(data[2]))


def _ref_out(ref: EventRef) -> dict[str, Any]:
    return {k: json_value(v) for k, v in ref.items()}
