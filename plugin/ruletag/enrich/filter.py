"""The rule filter stage: annotate matched records of a chunk, pass the rest through untouched.

``RuleFilter(table)(chunk) -> list[Chunk]`` is the pipeline's ``transform``. Entries that
match no rule keep their exact bytes; only matched entries are decoded, annotated and
re-encoded. Entry order is kept; with re-tagging, matched entries move to ``<prefix><tag>``
and the chunk is cut into consecutive runs so the downstream still sees the original order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import msgpack

from ruletag.enrich.annotate import detection
from ruletag.protocol import Chunk, iter_entries
from ruletag.rules.compiler import CompiledTable
from ruletag.rules.ir import Rule
from ruletag.rules.matcher import Matcher

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
    ) -> None:
        self.table = table
        #: this filter's own matcher over the shared table (``tune_after``: see Matcher)
        self.matcher = Matcher(table, tune_after)
        self.key = key
        self.style = style
        self.retag_prefix = retag_prefix
        self.stats = FilterStats()
        self._on_match = on_match
        # Annotation payloads are built once per rule, at table-load time, not per record.
        self._annotations = [self._annotation(r) for r in table.rules]

    # ------------------------------------------------------------------ annotations

    def _annotation(self, rule: Rule) -> dict[str, Any]:
        d = detection(rule)
        d["ruleset_version"] = self.table.version
        return d

    def _annotate(self, record: dict[str, Any], matched: list[int]) -> None:
        if self.style == "ruletag":
            record[self.key] = [self._annotations[i] for i in matched]
            return
        rules = [self.table.rules[i] for i in matched]
        _set_ecs(record, rules, self.table.version)

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
        if not hits:
            return [chunk]
        entries = chunk.entries
        tag = chunk.tag
        alert_tag = self.retag_prefix + tag if self.retag_prefix else tag
        # Runs of (tag, byte pieces, count), in entry order. Unmatched entries between two
        # matches are one slice of the original bytes; pieces are joined once per run.
        runs: list[tuple[str, list[bytes], list[int]]] = []

        def add(run_tag: str, data: bytes, n: int) -> None:
            if runs and runs[-1][0] == run_tag:
                runs[-1][1].append(data)
                runs[-1][2][0] += n
            else:
                runs.append((run_tag, [data], [n]))

        done_end, done_idx = spans[0][0], -1
        for idx in sorted(hits):
            start, end = spans[idx]
            if idx > done_idx + 1:
                add(tag, entries[done_end:start], idx - done_idx - 1)
            try:
                entry = _unpack(entries[start:end])
                record = entry[1]
                if isinstance(record, dict):
                    self._annotate(record, hits[idx])
                    data = _pack(entry)
                    self._count(hits[idx])
                else:  # not a map: nothing to annotate, keep as it came
                    data = entries[start:end]
            except Exception as exc:
                self._record_error(idx, exc)
                data = entries[start:end]
            add(alert_tag, data, 1)
            done_end, done_idx = end, idx
        if done_idx < len(spans) - 1:
            add(tag, entries[done_end : spans[-1][1]], len(spans) - 1 - done_idx)
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

    def _count(self, matched: list[int]) -> None:
        stats = self.stats
        stats.records_matched += 1
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
