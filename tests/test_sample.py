"""EQL ``sample by`` (issue 16): front-end, the streaming SampleEngine against the semantics
doc (A.9: unordered join per key, one distinct record per filter, filter order), bounds,
snapshot/restore, ``ruletag match`` end to end, and the corpus."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from ruletag.enrich.annotate import stateful_detection
from ruletag.errors import InvalidRule, UnsupportedRule
from ruletag.rules.elastic import load_elastic_file
from ruletag.rules.eql import parse_eql, parse_eql_query
from ruletag.rules.ir import And, Const, Match, Rule, Sample
from ruletag.rules.stateful import stateful_engines
from ruletag.rules.stateful.sample import SampleEngine, SampleResult, SampleState
from support.paths import SAMPLE, corpus, needs_corpus
from support.servers import ruletag_script

RWX_RULE = SAMPLE / "elastic/rules/linux/execution_netcon_from_rwx_mem_region_binary.toml"

# --------------------------------------------------------------------------- front-end


def sample(query: str) -> Sample:
    got = parse_eql_query(query)
    assert isinstance(got, Sample)
    return got


def test_shared_keys_come_first_and_line_up_by_position() -> None:
    s = sample(
        "sample by host.id\n"
        ' [process where x == "a"] by process.pid\n'
        ' [network where x == "b"] by process.parent.pid'
    )
    assert [st.keys for st in s.steps] == [
        ("host.id", "process.pid"),
        ("host.id", "process.parent.pid"),
    ]
    cond = s.steps[1].condition
    assert isinstance(cond, And)
    assert Match("event.category", ("network",), cased=True) in cond.args


@pytest.mark.parametrize(
    ("query", "error", "message"),
    [
        ("sample by x [a where true] by y, z [b where true]", InvalidRule, "inconsistent"),
        ("sample by x [a where true]", InvalidRule, "at least two filters"),
        ("sample by ?x [a where true] [b where true]", UnsupportedRule, "optional"),
    ],
)
def test_refused_samples(query: str, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        parse_eql_query(query)


def test_parse_eql_still_refuses_a_sample() -> None:
    with pytest.raises(UnsupportedRule, match="EQL sample"):
        parse_eql("sample by x [a where true] [b where true]")


def test_corpus_sample_rule_loads_with_its_filters_and_lookback() -> None:
    (rule,) = load_elastic_file(RWX_RULE)
    assert rule.kind == "sample" and rule.condition == Const(False)
    s = rule.sample
    assert s is not None and len(s.steps) == 2 and s.ttl == 540.0
    assert all(st.keys == ("host.id", "process.pid", "process.name") for st in s.steps)


# --------------------------------------------------------------------------- engine


def rule_of(query: str, rule_id: str = "sample-1", ttl: float = 540.0) -> Rule:
    s = sample(query)
    return Rule(
        id=rule_id,
        name=rule_id,
        source="elastic",
        condition=Const(False),
        kind="sample",
        sample=Sample(s.steps, ttl=ttl),
    )


def ev(i: str, ts: float | None, x: str | list[str], **fields: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {"event": {"id": i, "category": "process"}, "x": x, "h": "h1"}
    if ts is not None:
        rec["@timestamp"] = ts
    rec.update(fields)
    return rec


def run(rule: Rule, records: Iterable[dict[str, Any]]) -> list[tuple[str, list[str], list[str]]]:
    """(id of the completing record, the join key, the sample's record ids in filter order)."""
    engine = SampleEngine([rule])
    out = []
    for rec in records:
        for r in engine.feed(rec):
            out.append((rec["event"]["id"], list(r.keys), [str(e["id"]) for e in r.events]))
    return out


ABC = 'sample by h [process where x == "a"] [process where x == "b"] [process where x == "c"]'


def test_unordered_join_in_filter_order() -> None:
    records = [ev("1", 10, "c"), ev("2", 5, "a"), ev("3", 7, "b")]
    assert run(rule_of(ABC), records) == [("3", ["h1"], ["2", "3", "1"])]


def test_first_records_fill_and_one_sample_per_key() -> None:
    records = [
        ev("1", 1, "a"),
        ev("2", 2, "a"),  # a second a: the first one stays
        ev("3", 3, "b"),
        ev("4", 4, "c"),  # completes 1, 3, 4
        ev("5", 5, "a"),
        ev("6", 6, "b"),
        ev("7", 7, "c"),  # same key within the look-back: no second sample
    ]
    assert run(rule_of(ABC), records) == [("4", ["h1"], ["1", "3", "4"])]


def test_keys_are_joined_apart() -> None:
    records = [
        ev("1", 1, "a", h="h1"),
        ev("2", 2, "b", h="h2"),
        ev("3", 3, "c", h="h1"),
        ev("4", 4, "b", h="h1"),  # completes h1
        ev("5", 5, "a", h="h2"),
        ev("6", 6, "c", h="h2"),  # completes h2
    ]
    assert run(rule_of(ABC), records) == [
        ("4", ["h1"], ["1", "4", "3"]),
        ("6", ["h2"], ["5", "2", "6"]),
    ]


def test_each_filter_needs_a_different_record() -> None:
    """One record matching both filters fills only one; the second record completes, and the
    assignment backtracks: the first record moves to the filter the second cannot fill."""
    rule = rule_of('sample by h [process where x == "a"] [process where x in ("a", "b")]')
    records = [ev("1", 1, ["a", "b"]), ev("2", 2, ["a", "b"])]
    assert run(rule, records) == [("2", ["h1"], ["1", "2"])]
    only_b_first = [ev("1", 1, ["a", "b"]), ev("2", 2, "b")]
    assert run(rule, only_b_first) == [("2", ["h1"], ["1", "2"])]
    a_then_a = [ev("1", 1, "a"), ev("2", 2, "a")]  # x == "a" satisfies both filters
    assert run(rule, a_then_a) == [("2", ["h1"], ["1", "2"])]
    assert run(rule, [ev("1", 1, "b"), ev("2", 2, "b")]) == []  # nothing fills filter 1


def test_per_filter_keys_line_up_by_position() -> None:
    rule = rule_of('sample [process where x == "a"] by pid [process where x == "b"] by ppid')
    records = [
        ev("1", 1, "a", pid="10"),
        ev("2", 2, "b", ppid="11"),  # another key
        ev("3", 3, "b", ppid="10", pid="11"),  # completes key 10
    ]
    assert run(rule, records) == [("3", ["10"], ["1", "3"])]


def test_null_keys_do_not_take_part_and_multi_values_fan_out() -> None:
    rule = rule_of('sample by h [process where x == "a"] [process where x == "b"]')
    records = [
        ev("1", 1, "a", h=None),
        ev("2", 2, "b", h=None),
        ev("3", 3, "a", h=["k1", "k2"]),
        ev("4", 4, "b", h="k2"),
        ev("5", 5, "b", h="k1"),
    ]
    assert run(rule, records) == [("4", ["k2"], ["3", "4"]), ("5", ["k1"], ["3", "5"])]


def test_a_key_expires_after_the_lookback() -> None:
    rule = rule_of('sample by h [process where x == "a"] [process where x == "b"]', ttl=60.0)
    records = [
        ev("1", 0, "a"),
        ev("2", 61, "c"),  # hits nothing: does not move the clock
        ev("3", 61, "a"),  # the clock passes 0 + 60: the key (and its a at 0) expire
        ev("4", 62, "b"),  # completes 3, 4
        ev("5", 63, "a"),
        ev("6", 64, "b"),  # done for this key until 61 + 60
        ev("7", 200, "a"),
        ev("8", 201, "b"),  # a new window: a second sample
    ]
    assert run(rule, records) == [("4", ["h1"], ["3", "4"]), ("8", ["h1"], ["7", "8"])]


def test_records_without_timestamp_take_part() -> None:
    rule = rule_of('sample by h [process where x == "a"] [process where x == "b"]')
    assert run(rule, [ev("1", None, "a"), ev("2", None, "b")]) == [("2", ["h1"], ["1", "2"])]


def test_sample_state_caps_keys() -> None:
    state = SampleState(2, 100.0, max_keys=2)
    for k in ("k1", "k2", "k3"):
        assert state.hit([0], (k,), 1.0, 1, {"id": k}) is None
    assert list(state.keys) == [("k2",), ("k3",)]
    assert state.counters["evicted_keys"] == 1


def test_annotation_and_engine_protocol() -> None:
    rule = rule_of(ABC)
    (engine,) = stateful_engines([rule])
    assert isinstance(engine, SampleEngine) and engine.kind == "sample"
    done = [
        r for rec in [ev("1", 1, "a"), ev("2", 2, "b"), ev("3", 3, "c")] for r in engine.feed(rec)
    ]
    (result,) = done
    assert isinstance(result, SampleResult)
    d = stateful_detection(result)
    assert d["rule_id"] == "sample-1"
    assert d["sample"] == {
        "keys": ["h1"],
        "events": [
            {"timestamp": 1, "id": "1"},
            {"timestamp": 2, "id": "2"},
            {"timestamp": 3, "id": "3"},
        ],
    }
    assert engine.stats() == {
        "rules": 1,
        "keys": 1,
        "completed": 1,
        "evicted_keys": 0,
        "expired_keys": 0,
    }


def test_step_hits_match_the_record_path() -> None:
    import msgpack

    engine = SampleEngine([rule_of(ABC)])
    recs = [ev("1", 1, "a"), ev("2", 2, "zzz"), ev("3", 3, "c")]
    parts = [msgpack.packb([0, r]) for r in recs]
    spans, pos = [], 0
    for p in parts:
        spans.append((pos, pos + len(p)))
        pos += len(p)
    hits = engine.step_hits(b"".join(parts), spans)
    assert sorted(hits) == [0, 2]
    assert hits[0] == engine.matcher.match(recs[0])


def test_snapshot_and_restore_resume_open_samples() -> None:
    rule = rule_of(ABC)
    first = SampleEngine([rule])
    for rec in [ev("1", 1, "a"), ev("2", 2, "b")]:
        assert first.feed(rec) == []
    data = json.loads(json.dumps(first.snapshot()))  # JSON-able
    second = SampleEngine([rule])
    assert second.restore(data) == 1
    (result,) = second.feed(ev("3", 3, "c"))
    assert [e["id"] for e in result.events] == ["1", "2", "3"]
    other = SampleEngine([rule_of(ABC, rule_id="other")])
    other.restore(data)  # a rule the snapshot does not know starts empty
    assert other.feed(ev("3", 3, "c")) == []
    assert other.restore({"version": 99}) == 0  # an unknown format is ignored
    two = SampleEngine([rule_of('sample by h [process where x == "a"] [process where x == "b"]')])
    assert two.restore(data) == 0  # the rule changed shape (2 filters, not 3)
    assert other.stats()["keys"] == 1


# --------------------------------------------------------------------------- ruletag match


def rwx_event(i: str, ts: str, **over: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "@timestamp": ts,
        "event": {"id": i, "category": ["process"]},
        "host": {"id": "h1", "os": {"type": "linux"}},
        "process": {"pid": 4242, "name": "payload"},
        "auditd": {"data": {"syscall": "mprotect", "a2": "7"}},
    }
    rec.update(over)
    return rec


def test_ruletag_match_annotates_the_record_completing_the_sample(tmp_path: Path) -> None:
    net = {
        "event": {
            "id": "n1",
            "category": ["network"],
            "type": ["start"],
            "action": "connection_attempted",
        },
        "destination": {"ip": "203.0.113.9"},
        "auditd": {},
    }
    events = [
        rwx_event("n1", "2026-03-01T10:00:00Z", **net),  # the network filter first: any order
        rwx_event("x", "2026-03-01T10:00:01Z", process={"pid": 1, "name": "other"}),
        rwx_event("m1", "2026-03-01T10:00:02Z"),  # mprotect RWX: completes the sample
    ]
    src = tmp_path / "events.jsonl"
    src.write_text("".join(json.dumps(e) + "\n" for e in events))
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = subprocess.run(
        [str(ruletag_script()), "match", "--events", str(src), "--rules", str(RWX_RULE)],
        capture_output=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    out = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert [r["event"]["id"] for r in out] == ["n1", "x", "m1"]  # every record, no extra line
    assert [r["event"]["id"] for r in out if "detections" in r] == ["m1"]
    (d,) = out[2]["detections"]
    assert d["rule_id"] == load_elastic_file(RWX_RULE)[0].id
    assert d["sample"] == {
        "keys": ["h1", "4242", "payload"],
        "events": [
            {"timestamp": "2026-03-01T10:00:02Z", "id": "m1"},
            {"timestamp": "2026-03-01T10:00:00Z", "id": "n1"},
        ],
    }


# --------------------------------------------------------------------------- corpus


@needs_corpus
def test_every_active_corpus_sample_loads_and_builds_an_engine() -> None:
    rules = []
    for path in sorted(corpus("elastic").rglob("*.toml")):
        text = path.read_text(encoding="utf-8")
        if "_deprecated" in path.parts or not re.search(r"(?m)^\s*sample\b", text):
            continue
        (rule,) = load_elastic_file(path)
        assert rule.kind == "sample" and rule.sample is not None
        rules.append(rule)
    assert len(rules) == 3
    engine = SampleEngine.of(rules)
    assert engine is not None and engine.stats()["rules"] == 3
