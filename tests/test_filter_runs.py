"""The filter's output runs and the codec's entry spans (the hot-path shortcuts of issue 6)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgpack
import pytest

from ruletag import protocol
from ruletag.enrich.filter import RuleFilter
from ruletag.protocol import Chunk
from ruletag.rules.loader import compile_rules
from support.paths import CAPTURES, SEED_RULES

CAPTURE = CAPTURES / "windows-events.jsonl"
EXPECTED = CAPTURES / "windows-events.expected.json"


def _pack(time: int, record: dict[str, Any]) -> bytes:
    ts = msgpack.ExtType(0, time.to_bytes(4, "big") + b"\0\0\0\0")
    return msgpack.packb([ts, record], use_bin_type=True)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> tuple[RuleFilter, list[Any], list[Any]]:
    assert CAPTURE.exists(), "tests/data/captures is missing"
    table, _ = compile_rules([SEED_RULES], cache_dir=tmp_path_factory.mktemp("cache"))
    lines = [json.loads(x) for x in CAPTURE.read_text(encoding="utf-8").splitlines()]
    items = json.loads(EXPECTED.read_text())["records"]
    pos = [
        lines[i["line"] - 1]
        for i in items
        if i["expected_rule_ids"] and "logsource" not in i["expected_rule_ids"][0]
    ]
    neg = [lines[i["line"] - 1] for i in items if not i["expected_rule_ids"]]
    return RuleFilter(table), pos, neg


def _runs_one_by_one(chunk: Chunk, f: RuleFilter, prefix: str) -> list[tuple[str, list[Any]]]:
    """What the filter must produce, entry by entry: (tag, decoded entries) runs."""
    runs: list[tuple[str, list[Any]]] = []
    for s, e in protocol.iter_entries(chunk.entries):
        entry = msgpack.unpackb(chunk.entries[s:e], raw=False)
        matched = f.matcher.match(entry[1])
        tag = prefix + chunk.tag if matched else chunk.tag
        if runs and runs[-1][0] == tag:
            runs[-1][1].append(entry[1])
        else:
            runs.append((tag, [entry[1]]))
    return runs


@pytest.mark.parametrize("layout", ["first", "middle", "last", "all", "none", "alternate"])
@pytest.mark.parametrize("prefix", ["", "alert."])
def test_runs_keep_order_bytes_and_counts(
    seeds: tuple[RuleFilter, list[Any], list[Any]], layout: str, prefix: str
) -> None:
    base, pos, neg = seeds
    f = RuleFilter(base.table, retag_prefix=prefix)
    n = 9
    hit_at = {
        "first": {0},
        "middle": {4},
        "last": {8},
        "all": set(range(n)),
        "none": set(),
        "alternate": {0, 2, 3, 7},
    }[layout]
    records = [pos[i % len(pos)] if i in hit_at else neg[i % len(neg)] for i in range(n)]
    entries = b"".join(_pack(1000 + i, r) for i, r in enumerate(records))
    frame = protocol.encode_chunk("win", entries, n, chunk_id=b"abc")
    conn = protocol.ServerConnection()
    conn.receive_data(frame)
    chunk = conn.next_event()
    assert isinstance(chunk, Chunk)
    assert chunk.spans == protocol.iter_entries(chunk.entries)  # the codec's spans are exact
    out = f(chunk)
    want = _runs_one_by_one(chunk, f, prefix)
    if not prefix:
        want = [(chunk.tag, [r for _, rs in want for r in rs])]
    assert [c.tag for c in out] == [t for t, _ in want]
    got_records = [
        [msgpack.unpackb(c.entries[s:e], raw=False)[1] for s, e in protocol.iter_entries(c.entries)]
        for c in out
    ]
    assert [len(g) for g in got_records] == [c.count for c in out]
    flat = [r for g in got_records for r in g]
    assert len(flat) == n
    for i, r in enumerate(flat):
        assert ("detections" in r) == (i in hit_at)
        assert {k: v for k, v in r.items() if k != "detections"} == records[i]
    # unmatched entries leave byte for byte; derived chunks carry no stale spans or chunk id
    spans = protocol.iter_entries(entries)
    kept = b"".join(entries[s:e] for i, (s, e) in enumerate(spans) if i not in hit_at)
    out_unmatched = b"".join(
        c.entries[s:e]
        for c in out
        for s, e in protocol.iter_entries(c.entries)
        if b"detections" not in c.entries[s:e]
    )
    assert out_unmatched == kept
    if hit_at:
        assert all(c.spans is None and c.chunk_id is None for c in out)
    else:
        assert out == [chunk]


def test_spans_absent_when_float_times_are_rewritten() -> None:
    conn = protocol.ServerConnection()
    conn.receive_data(msgpack.packb(["t", [[1.5, {"a": 1}], [2, {"b": 2}]]]))
    chunk = conn.next_event()
    assert isinstance(chunk, Chunk) and chunk.spans is None
    assert len(protocol.iter_entries(chunk.entries)) == 2
    conn.receive_data(msgpack.packb(["t", [[1, {"a": 1}], [2, {"b": 2}]]]))
    chunk = conn.next_event()
    assert isinstance(chunk, Chunk)
    assert chunk.spans == protocol.iter_entries(chunk.entries) == [(0, 6), (6, 12)]


def test_a_record_that_breaks_matching_is_forwarded_and_only_it(
    seeds: tuple[RuleFilter, list[Any], list[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    base, pos, neg = seeds
    f = RuleFilter(base.table)
    records = [pos[0], {"poison": True}, pos[1], neg[0]]
    entries = b"".join(_pack(1000 + i, r) for i, r in enumerate(records))
    chunk = Chunk(tag="win", entries=entries, count=len(records))
    real = f.matcher.match_entries

    def breaks_on_poison(buf: bytes, spans: Any) -> dict[int, list[int]]:
        if b"poison" in buf:
            raise RuntimeError("matcher bug")
        return real(buf, spans)

    monkeypatch.setattr(f.matcher, "match_entries", breaks_on_poison)
    out = f(chunk)
    got = [
        msgpack.unpackb(out[0].entries[s:e], raw=False)[1]
        for s, e in protocol.iter_entries(out[0].entries)
    ]
    assert len(out) == 1 and out[0].count == 4
    assert "detections" in got[0] and "detections" in got[2]  # the others still matched
    assert got[1] == {"poison": True} and "detections" not in got[3]
    assert f.stats.record_errors == 1


def test_annotations_are_made_on_a_rules_first_match_and_reused(
    seeds: tuple[RuleFilter, list[Any], list[Any]],
) -> None:
    """A large rule set loads without making a payload per rule; a matched rule's payload
    is made once, is its detection with the rule-set version, and is the same on each match."""
    from ruletag.enrich.annotate import detection

    base, pos, neg = seeds
    f = RuleFilter(base.table)
    assert dict(f._annotations) == {}
    records = [pos[0], neg[0], pos[0]]
    entries = b"".join(_pack(1000 + i, r) for i, r in enumerate(records))
    conn = protocol.ServerConnection()
    conn.receive_data(protocol.encode_chunk("win", entries, 3))
    chunk = conn.next_event()
    assert isinstance(chunk, Chunk)
    out = f(chunk)
    got = [
        msgpack.unpackb(c.entries[s:e], raw=False)[1]
        for c in out
        for s, e in c.spans or protocol.iter_entries(c.entries)
    ]
    matched = f.matcher.match(pos[0])
    assert matched and set(f._annotations) == set(matched)
    want = [
        detection(base.table.rules[i]) | {"ruleset_version": base.table.version} for i in matched
    ]
    assert got[0]["detections"] == got[2]["detections"] == want
    assert "detections" not in got[1]
    again = f._annotations[matched[0]]
    assert f._annotations[matched[0]] is again


@pytest.mark.parametrize("style", ["ruletag", "ecs"])
def test_a_filter_over_a_loaded_table_reads_only_the_rules_that_match(
    seeds: tuple[RuleFilter, list[Any], list[Any]], tmp_path: Path, style: str
) -> None:
    """A table read from the rule cache is matched without reading its rules: only the
    rules a record matches are read, for their annotations (in either style)."""
    from ruletag.rules.compiler import load, save
    from ruletag.rules.compiler.rulelist import StoredRules

    base, pos, neg = seeds
    save(base.table, tmp_path / "t.table")
    table = load(tmp_path / "t.table")
    assert isinstance(table.rules, StoredRules)
    f = RuleFilter(table, style=style)  # type: ignore[arg-type]
    entries = b"".join(_pack(1000 + i, r) for i, r in enumerate([neg[0], neg[1]]))
    conn = protocol.ServerConnection()
    conn.receive_data(protocol.encode_chunk("win", entries, 2))
    chunk = conn.next_event()
    assert isinstance(chunk, Chunk)
    f(chunk)
    assert table.rules.loaded() == 0
    matched = f.matcher.match(pos[0])
    assert matched
    conn.receive_data(protocol.encode_chunk("win", _pack(1000, pos[0]), 1))
    chunk = conn.next_event()
    assert isinstance(chunk, Chunk)
    out = f(chunk)
    assert table.rules.loaded() == len(set(matched)) < len(table.rules)
    (c,) = out
    record = msgpack.unpackb(c.entries, raw=False)[1]
    assert record != pos[0]  # annotated
