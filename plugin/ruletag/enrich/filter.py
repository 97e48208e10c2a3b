"""The rule filter stage: annotate matched records of a chunk, pass the rest through untouched.

``RuleFilter(table)(chunk) -> list[Chunk]`` is the pipeline's ``transform``. Entries that
match no rule keep their exact bytes; only matched entries are decoded, annotated and
re-encoded. Entry order is kept; with re-tagging, matched entries move to ``<prefix><tag>``
and the chunk is cut into consecutive runs so the downstream still sees the original order.

With stateful rules (``stateful``: an :class:`ruletag.enrich.stateful.StatefulStage`), the
record that completes a sequence or reaches a threshold gets that detection appended to its
annotations (:func:`ruletag.enrich.annotate.stateful_detection`; in ``ecs`` style its rule joins
``rule.*``/``threat.*`` and the detection goes under ``ruletag.stateful``) and, with
``alert_tag``, one extra alert record per detection follows it on that tag.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import msgpack

from ruletag.enrich.annotate import detection, stateful_detection
from ruletag.protocol import Chunk, iter_entries
from ruletag.rules.compiler import CompiledTable
from ruletag.rules.compiler.rulelist import rule_ids
from ruletag.rules.ir import Rule
from ruletag.rules.matcher import Matcher

if TYPE_CHECKING:  # the stateful engines are imported only where stateful rules run
    from ruletag.enrich.stateful import StatefulStage

log = logging.getLogger(__name__)

Style = Literal["ruletag", "ecs"]


@dataclass
class FilterStats:
    """Counters the metrics endpoint reads."""

    records_in: int = 0
    records_matched: int = 0
    chunks_in: int = 0
    detections: dict[str, int] = field(default_factory=dict)  # rule id -> count
    by_severity: dict[str, int] = field(default_factory=dict)
    record_errors: int = 0  # records forwarded unannotated because matching them failed


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, unicode_errors="surrogateescape", strict_map_key=False)


_packer_opts = {"use_bin_type": True, "unicode_errors": "surrogateescape"}


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, **_packer_opts)


class Annotations(dict[int, dict[str, Any]]):
    """Rule number -> its annotation payload, made on first use: most rules of a large set
    never match, and making every payload when a table loads took ~30 ms of a start with
    every corpus rule."""

    __slots__ = ("_make",)

    def __init__(self, make: Callable[[int], dict[str, Any]]) -> None:
        super().__init__()
        self._make = make

    def __missing__(self, i: int) -> dict[str, Any]:
        d = self[i] = self._make(i)
        return d


class RuleFilter:
    """Annotates records with the detections of a :class:`CompiledTable` (through its own
    :class:`Matcher`)."""

    def __init__(
        self,
        table: CompiledTable,
        *,
        key: str = "detections",
        style: Style = "ruletag",
        retag_prefix: str = "",
        on_match: Callable[[Sequence[Rule]], None] | None = None,
        tune_after: int | None = None,
        tuned_path: Path | None = None,
        follow: bool = False,
        stateful: StatefulStage | None = None,
        alert_tag: str = "",
    ) -> None:
        self.table = table
        #: this filter's own matcher over the shared table (``tune_after``, ``tuned_path``,
        #: ``follow``: see Matcher)
        self.matcher = Matcher(table, tune_after, tuned_path, follow)
        self.key = key
        self.style = style
        self.retag_prefix = retag_prefix
        self.stats = FilterStats()
        self._on_match = on_match
        #: rule number -> its annotation payload, built once, on the rule's first match
        self._annotations = Annotations(self._annotation)
        #: the stateful rules' engines (None: the rule set has none)
        self.stateful = stateful
        #: with stateful rules: the tag of the extra alert record per detection ("" = none)
        self.alert_tag = alert_tag

    # ------------------------------------------------------------------ annotations

    @functools.cached_property
    def _rule_numbers(self) -> dict[str, int]:
        """Rule id -> its number (the last of equal ids), the rules themselves not read."""
        return {rid: i for i, rid in enumerate(rule_ids(self.table.rules))}

    def _annotation(self, i: int) -> dict[str, Any]:
        d = detection(self.table.rules[i])
        d["ruleset_version"] = self.table.version
        return d

    def _annotate(
        self, record: dict[str, Any], matched: list[int], extra: Sequence[dict[str, Any]] = ()
    ) -> None:
        if self.style == "ruletag":
            record[self.key] = [self._annotations[i] for i in matched] + list(extra)
            return
        rules = [self.table.rules[i] for i in matched]
        if extra:
            by_id = self._rule_numbers
            rules += [self.table.rules[by_id[d["rule_id"]]] for d in extra if d["rule_id"] in by_id]
            ruletag = record.get("ruletag")
            if not isinstance(ruletag, dict):
                ruletag = record["ruletag"] = {}
            ruletag["stateful"] = list(extra)
        _set_ecs(record, rules, self.table.version)

    def _stateful_annotation(self, result: object) -> dict[str, Any]:
        d = stateful_detection(result)
        d["ruleset_version"] = self.table.version
        return d

    # ------------------------------------------------------------------ the stage

    def __call__(self, chunk: Chunk) -> list[Chunk]:
        if chunk.signal != 0 or not chunk.entries:
            return [chunk]
        stats = self.stats
        stats.chunks_in += 1
        stats.records_in += chunk.count
        spans = chunk.spans if chunk.spans is not None else iter_entries(chunk.entries)
        try:
            hits = self.matcher.match_entries(chunk.entries, spans)
        except Exception as exc:  # a bug or an odd record must not block the whole chunk
            hits = self._match_one_by_one(chunk.entries, spans, exc)
        done = self.stateful.results(chunk.entries, spans) if self.stateful is not None else {}
        if not hits and not done:
            return [chunk]
        entries = chunk.entries
        view = memoryview(entries)  # the unmatched runs are copied once, by the join below
        tag = chunk.tag
        alert_tag = self.retag_prefix + tag if self.retag_prefix else tag
        # Runs of (tag, byte pieces, count), in entry order. Unmatched entries between two
        # matches are one slice of the original bytes; pieces are joined once per run.
        runs: list[tuple[str, list[bytes | memoryview], list[int]]] = []

        def add(run_tag: str, data: bytes | memoryview, n: int) -> None:
            if runs and runs[-1][0] == run_tag:
                runs[-1][1].append(data)
                runs[-1][2][0] += n
            else:
                runs.append((run_tag, [data], [n]))

        done_end, done_idx = spans[0][0], -1
        for idx in sorted(hits.keys() | done.keys()):
            start, end = spans[idx]
            if idx > done_idx + 1:
                add(tag, view[done_end:start], idx - done_idx - 1)
            matched = hits.get(idx, [])
            extra = [self._stateful_annotation(r) for r in done.get(idx, ())]
            alerts: list[bytes] = []
            try:
                entry = _unpack(entries[start:end])
                record = entry[1]
                if isinstance(record, dict):
                    self._annotate(record, matched, extra)
                    data = _pack(entry)
                    self._count(matched, extra)
                    if self.alert_tag:
                        alerts = [_pack([entry[0], self._alert(tag, d)]) for d in extra]
                else:  # not a map: nothing to annotate, keep as it came
                    data = entries[start:end]
            except Exception as exc:
                self._record_error(idx, exc)
                data = entries[start:end]
            add(alert_tag, data, 1)
            for a in alerts:
                add(self.alert_tag, a, 1)
            done_end, done_idx = end, idx
        if done_idx < len(spans) - 1:
            add(tag, view[done_end : spans[-1][1]], len(spans) - 1 - done_idx)
        # A chunk id belongs to the upstream chunk; runs get none (the forwarder assigns its own).
        return [
            replace(chunk, tag=t, entries=b"".join(parts), count=n[0], chunk_id=None, spans=None)
            for t, parts, n in runs
        ]

    def _match_one_by_one(
        self, entries: bytes, spans: Sequence[tuple[int, int]], exc: Exception
    ) -> dict[int, list[int]]:
        """Slow path after a failed chunk scan: match each entry alone, skip the bad ones."""
        log.warning(
            "matching a chunk failed (%s: %s); matching its records one by one",
            type(exc).__name__,
            exc,
        )
        hits: dict[int, list[int]] = {}
        for idx, (start, end) in enumerate(spans):
            try:
                one = self.matcher.match_entries(entries[start:end], [(0, end - start)])
            except Exception as err:
                self._record_error(idx, err)
                continue
            if one:
                hits[idx] = one[0]
        return hits

    def _record_error(self, idx: int, exc: Exception) -> None:
        """Count (and log, sparingly) a record forwarded unannotated because it failed."""
        self.stats.record_errors += 1
        n = self.stats.record_errors
        if n <= 10 or n % 1000 == 0:
            log.error(
                "record %d of a chunk forwarded unannotated: matching failed: %s: %s "
                "(%d such records so far)",
                idx,
                type(exc).__name__,
                exc,
                n,
            )

    def _alert(self, tag: str, annotation: dict[str, Any]) -> dict[str, Any]:
        """The extra alert record of one stateful detection (``enrich.alert_tag``)."""
        return {"source_tag": tag, "detection": annotation}

    def _count(self, matched: list[int], extra: Sequence[dict[str, Any]] = ()) -> None:
        stats = self.stats
        if not matched and not extra:
            return
        stats.records_matched += 1
        for d in extra:
            rid, sev = d["rule_id"], d["severity"]
            stats.detections[rid] = stats.detections.get(rid, 0) + 1
            stats.by_severity[sev] = stats.by_severity.get(sev, 0) + 1
        if not matched:
            return
        rules = [self.table.rules[i] for i in matched]
        for r in rules:
            stats.detections[r.id] = stats.detections.get(r.id, 0) + 1
            stats.by_severity[r.severity] = stats.by_severity.get(r.severity, 0) + 1
        if self._on_match is not None:
            self._on_match(rules)


def _set_ecs(record: dict[str, Any], rules: Sequence[Rule], version: str) -> None:
    """Write ECS ``rule.*``, ``threat.*`` and ``event.severity``/``risk_score`` fields."""

    def uniq(values: list[Any]) -> list[Any]:
        seen: list[Any] = []
        for v in values:
            if v not in seen:
                seen.append(v)
        return seen

    def put(obj: dict[str, Any], name: str, value: dict[str, Any]) -> None:
        cur = obj.get(name)
        if isinstance(cur, dict):
            cur.update(value)
        else:
            obj[name] = value

    put(
        record,
        "rule",
        {
            "id": uniq([r.id for r in rules]),
            "name": uniq([r.name for r in rules]),
            "author": uniq([a for r in rules for a in r.author]),
            "ruleset": f"ruletag-{version}" if version else "ruletag",
        },
    )
    put(
        record,
        "threat",
        {
            "framework": "MITRE ATT&CK",
            "tactic": {
                "id": uniq([t.id for r in rules for t in r.tactics if t.id]),
                "name": uniq([t.name for r in rules for t in r.tactics]),
            },
            "technique": {
                "id": uniq([t.id for r in rules for t in r.techniques if t.id]),
                "name": uniq([t.name for r in rules for t in r.techniques]),
            },
        },
    )
    order = ["informational", "low", "medium", "high", "critical"]
    worst = max(rules, key=lambda r: order.index(r.severity) if r.severity in order else 2)
    put(
        record,
        "event",
        {
            "severity": order.index(worst.severity) if worst.severity in order else 2,
            "risk_score": max(r.risk_score for r in rules),
        },
    )
