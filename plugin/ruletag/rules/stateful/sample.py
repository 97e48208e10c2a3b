"""Streaming EQL ``sample by``: one distinct record per filter, same join keys, any order.

Semantics (docs/rules.md "Samples", after Elasticsearch): the records of a sample share the
values of the join keys (each filter's ``by`` list lines up by position with the others), each
filter is satisfied by a **different** record, and the sample lists them in filter order.
There is no order between the filters and no ``maxspan``; the rule's look-back bounds a sample.

:class:`SampleState` (one rule) keeps, per key, the first records (by event time, then arrival)
that matched each filter, at most as many per filter as there are filters (enough: if some
choice of distinct records fills every filter, one exists among those). After each new
record it looks for an assignment of distinct records to the filters, trying filters in order
and each filter's records earliest first (augmenting paths, as Elasticsearch backtracks over
its candidates); the record whose arrival makes one possible *completes* the sample, which is
returned once. A key then yields no other sample until its state expires: at most one sample
per key and look-back window (Elasticsearch's default ``max_samples_per_key`` of 1, per rule
run). A key's state expires when its first record is more than ``ttl`` seconds (the rule's
look-back) older than the rule's watermark (the latest event time seen); at most ``max_keys``
keys (least recently used evicted first). Records without a timestamp count at the watermark.

:class:`SampleEngine` runs every sample rule of a rule set behind the stateful
:class:`~ruletag.rules.stateful.Engine` protocol, with the filters compiled into a small table
of their own (the main table holds sample rules as never-firing entries).
"""

from __future__ import annotations

import math
from bisect import insort
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any

from ruletag.rules.fields import FieldMap, RecordView
from ruletag.rules.ir import Node, Rule
from ruletag.rules.stateful.sequence import EventRef, event_id, event_time, join_keys
from ruletag.rules.stateful.snapshot import DigestCache

__all__ = ["SampleEngine", "SampleResult", "SampleState"]

Key = tuple[str, ...]
#: a record offered to a filter: (event time, arrival number, its reference)
_Cand = tuple[float, int, EventRef]


class _KeySample:
    __slots__ = ("cands", "done", "start")

    def __init__(self, filters: int, start: float) -> None:
        self.start = start
        self.done = False
        #: per filter, its first candidate records, by (time, arrival)
        self.cands: list[list[_Cand]] = [[] for _ in range(filters)]


def _cand_order(c: _Cand) -> tuple[float, int]:
    return (c[0], c[1])


class SampleState:
    """The open samples of one rule with ``filters`` filters (see the module docstring)."""

    def __init__(self, filters: int, ttl: float, *, max_keys: int = 100_000) -> None:
        if filters < 1:
            raise ValueError("a sample has at least one filter")
        self.filters = filters
        self.ttl = ttl
        self.max_keys = max_keys
        self.keys: OrderedDict[Key, _KeySample] = OrderedDict()
        self.counters: dict[str, int] = {"completed": 0, "evicted_keys": 0, "expired_keys": 0}

    def hit(
        self, filters: Iterable[int], key: Key, ts: float, arrival: int, ref: EventRef
    ) -> tuple[EventRef, ...] | None:
        """A record (``arrival``-th, at ``ts``) matched ``filters`` with join ``key``; the
        records of the sample it completes, in filter order, if it does."""
        ks = self.keys.get(key)
        if ks is None:
            ks = self.keys[key] = _KeySample(self.filters, ts)
            if len(self.keys) > self.max_keys:
                self.keys.popitem(last=False)
                self.counters["evicted_keys"] += 1
        else:
            self.keys.move_to_end(key)
            ks.start = min(ks.start, ts)
        if ks.done:
            return None
        added = False
        for f in filters:
            group = ks.cands[f]
            if len(group) < self.filters or (ts, arrival) < _cand_order(group[-1]):
                insort(group, (ts, arrival, ref), key=_cand_order)
                del group[self.filters :]
                added = True
        if not added:
            return None
        chosen = _assign(ks.cands)
        if chosen is None:
            return None
        ks.done = True
        ks.cands = [[] for _ in range(self.filters)]  # keep only the "done" mark
        self.counters["completed"] += 1
        return tuple(c[2] for c in chosen)

    def expire(self, watermark: float) -> int:
        """Drop the keys whose first record is more than ``ttl`` before ``watermark``."""
        bound = watermark - self.ttl
        old = [k for k, ks in self.keys.items() if ks.start < bound]
        for k in old:
            del self.keys[k]
        self.counters["expired_keys"] += len(old)
        return len(old)


def _assign(cands: list[list[_Cand]]) -> list[_Cand] | None:
    """Distinct records, one per filter (filters in order, records earliest first), or None."""
    owner: dict[int, int] = {}  # arrival number -> filter it is assigned to
    pick: list[_Cand | None] = [None] * len(cands)

    def place(f: int, seen: set[int]) -> bool:
        for c in cands[f]:  # a free record first, the earliest
            if c[1] not in owner and c[1] not in seen:
                owner[c[1]] = f
                pick[f] = c
                return True
        for c in cands[f]:  # else take one from a filter that can do with another
            if c[1] in seen:
                continue
            seen.add(c[1])
            other = owner.get(c[1])
            if other is not None and place(other, seen):
                owner[c[1]] = f
                pick[f] = c
                return True
        return False

    for f in range(len(cands)):
        if not place(f, set()):
            return None
    return [c for c in pick if c is not None]


@dataclass(frozen=True, slots=True)
class SampleResult:
    """A sample a record completed: the rule, the join key, every record's reference (in
    filter order)."""

    rule: Rule
    keys: Key
    events: tuple[EventRef, ...]


@dataclass
class _Run:
    rule: Rule
    state: SampleState
    watermark: float = -math.inf
    next_sweep: float = -math.inf


class SampleEngine:
    """Every sample rule of ``rules``, fed record by record (see the module docstring)."""

    kind = "sample"

    def __init__(
        self, rules: Iterable[Rule], fieldmap: FieldMap | None = None, *, max_keys: int = 100_000
    ) -> None:
        from ruletag.rules.stateful.tables import step_matcher, step_table

        self.runs: list[_Run] = []
        step_rules: list[Rule] = []
        index: dict[tuple[int, Node], int] = {}
        #: step-table rule -> (run, filter) pairs it feeds
        self._targets: list[list[tuple[int, int]]] = []
        for r in rules:
            sample = r.sample
            if r.kind != "sample" or sample is None:
                continue
            ri = len(self.runs)
            self.runs.append(_Run(r, SampleState(len(sample.steps), sample.ttl, max_keys=max_keys)))
            for f, step in enumerate(sample.steps):
                k = index.get((ri, step.condition))
                if k is None:
                    k = index[(ri, step.condition)] = len(step_rules)
                    step_rules.append(
                        Rule(
                            id=f"{r.id}#{len(step_rules)}",
                            name=r.name,
                            source=r.source,
                            condition=step.condition,
                        )
                    )
                    self._targets.append([])
                self._targets[k].append((ri, f))
        self.table = step_table(step_rules, fieldmap, self.kind)
        self.matcher = step_matcher(self.table)
        self._arrival = 0
        self._digest = DigestCache()  # rule id -> definition digest, for checkpoints

    @classmethod
    def of(cls, rules: Iterable[Rule], fieldmap: FieldMap | None = None) -> SampleEngine | None:
        """An engine for the sample rules among ``rules``; None when there are none."""
        found = [r for r in rules if r.kind == "sample"]
        return cls(found, fieldmap) if found else None

    def stats(self) -> dict[str, int]:
        """Live keys and the counters, summed over the rules."""
        out = {"rules": len(self.runs), "keys": 0}
        for run in self.runs:
            out["keys"] += len(run.state.keys)
            for k, v in run.state.counters.items():
                out[k] = out.get(k, 0) + v
        return out

    def step_hits(self, entries: bytes, spans: Seq[tuple[int, int]]) -> dict[int, list[int]]:
        """Entry index -> the filters it hits, for packed ``[time, record]`` entries."""
        return self.matcher.match_entries(entries, spans)

    def feed(
        self, record: Mapping[str, object], hits: Seq[int] | None = None
    ) -> list[SampleResult]:
        """Offer one record (in arrival order); the samples it completes."""
        self._arrival += 1
        if hits is None:
            hits = self.matcher.match(record)
        if not hits:
            return []
        per_run: dict[int, list[int]] = {}
        for h in hits:
            for ri, f in self._targets[h]:
                per_run.setdefault(ri, []).append(f)
        view = self.table.fieldmap.view(record)
        out: list[SampleResult] = []
        for ri, filters in per_run.items():
            out.extend(self._feed_run(self.runs[ri], sorted(set(filters)), view))
        return out

    def _feed_run(self, run: _Run, filters: list[int], view: RecordView) -> list[SampleResult]:
        sample = run.rule.sample
        assert sample is not None
        raw_ts = next(iter(view.values(sample.timestamp_field)), None)
        ts = event_time(raw_ts)
        state = run.state
        if ts is None:
            state.counters["no_timestamp"] = state.counters.get("no_timestamp", 0) + 1
            ts = run.watermark if run.watermark > -math.inf else 0.0
        elif ts > run.watermark:
            run.watermark = ts
            if ts >= run.next_sweep:
                state.expire(ts)
                run.next_sweep = ts + max(state.ttl / 4, 1.0)
        ref: EventRef = {"timestamp": raw_ts, "id": event_id(view)}
        out: list[SampleResult] = []
        # a record's key under each filter it hit (filters may name different key fields)
        by_key: dict[Key, list[int]] = {}
        for f in filters:
            for key in join_keys(view, sample.steps[f].keys):
                by_key.setdefault(key, []).append(f)
        for key, fs in by_key.items():
            done = state.hit(fs, key, ts, self._arrival, ref)
            if done is not None:
                out.append(SampleResult(run.rule, key, done))
        return out

    def snapshot(self) -> dict[str, Any]:
        """The open samples as JSON-able data (see :meth:`restore`)."""
        rules: dict[str, Any] = {}
        for run in self.runs:
            keys = [
                {
                    "key": list(k),
                    "start": ks.start,
                    "done": ks.done,
                    "cands": [[[c[0], c[1], dict(c[2])] for c in g] for g in ks.cands],
                }
                for k, ks in run.state.keys.items()
            ]
            rules[run.rule.id] = {
                "digest": self._digest(run.rule),
                "filters": run.state.filters,
                "watermark": _finite(run.watermark),
                "keys": keys,
            }
        return {"kind": self.kind, "version": 1, "arrival": self._arrival, "rules": rules}

    def restore(self, data: Mapping[str, Any]) -> int:
        """Resume from :meth:`snapshot` output; rules it does not know start empty. How many
        rules were restored."""
        if data.get("version") != 1:
            return 0
        self._arrival = max(self._arrival, int(data.get("arrival", 0)))
        saved = data.get("rules") or {}
        restored = 0
        for run in self.runs:
            got = saved.get(run.rule.id)
            if not got or got.get("filters") != run.state.filters:
                continue
            if got.get("digest") != self._digest(run.rule):
                continue  # the rule changed: it starts empty
            restored += 1
            wm = got.get("watermark")
            run.watermark = -math.inf if wm is None else float(wm)
            state = run.state
            state.keys.clear()
            for item in got.get("keys", []):
                cands = item.get("cands", [])
                if len(cands) != state.filters:
                    continue  # the rule changed shape
                ks = _KeySample(state.filters, float(item["start"]))
                ks.done = bool(item.get("done"))
                ks.cands = [[(float(t), int(a), dict(ref)) for t, a, ref in g] for g in cands]
                state.keys[tuple(str(x) for x in item["key"])] = ks
        return restored


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None
