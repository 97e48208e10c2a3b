"""Sigma correlation rules (issue 16): the parser, the linking step, the streaming engine
(``rules/stateful/correlation.py``) on the specification's examples, and ``ruletag match``."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ruletag.enrich.annotate import stateful_detection
from ruletag.errors import InvalidRule
from ruletag.rules.ir import Const, Correlation, CorrelationInput, Logsource, Match, Rule
from ruletag.rules.loader import load_rules
from ruletag.rules.stateful import stateful_engines
from ruletag.rules.stateful.correlation import (
    CorrelationEngine,
    correlation_rule,
    link_correlations,
    parse_timespan,
)
from support.paths import CORRELATION, corpus, needs_corpus
from support.servers import ruletag_script

DATA = CORRELATION
T0 = 1714557600.0  # 2024-05-01T10:00:00Z


def iso(seconds: float) -> str:
    dt = datetime.fromtimestamp(seconds, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def rules_of(name: str) -> list[Rule]:
    got = load_rules([DATA / name])
    assert got.problems == []
    return got.rules


def engine(name: str) -> CorrelationEngine:
    eng = CorrelationEngine.of(rules_of(name))
    assert eng is not None
    return eng


def run(eng: CorrelationEngine, records: Iterable[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Per record, the annotations of what it fired."""
    return [[stateful_detection(r) for r in eng.feed(rec)] for rec in records]


def fired(out: list[list[dict[str, Any]]]) -> list[tuple[int, str, Any]]:
    """(record index, rule id, aggregate value) of every result."""
    return [(i, d["rule_id"], d["correlation"]["value"]) for i, ds in enumerate(out) for d in ds]


def logon(t: float, event_id: int, **fields: Any) -> dict[str, Any]:
    return {"@timestamp": iso(T0 + t), "Channel": "Security", "EventID": event_id, **fields}


MANY = "0e95725d-7320-415d-80f7-004da920fc11"
VALUES = "0e95725d-7320-415d-80f7-004da920fc12"
FAILED = "5638f7c0-ac70-491d-8465-2a65075e0d86"
CHAIN = "b180ead8-d58f-40b2-ae54-c8940995b9b6"
INNER = "a8418a5a-5fc4-46b5-b23b-6c73beb19d41"


# --------------------------------------------------------------------------- front-end


def test_correlation_document_is_parsed_and_linked_by_id() -> None:
    rules = {r.id: r for r in rules_of("counts.yml")}
    many = rules[MANY]
    assert many.kind == "correlation" and many.condition == Const(False)
    assert many.name == "Many failed logins" and many.severity == "medium"
    base = load_rules([DATA / "counts.yml"]).rules[-1]
    assert many.correlation == Correlation(
        type="event_count",
        refs=(FAILED,),
        timespan=3600.0,
        group_by=("ComputerName",),
        condition=(("gte", 100.0),),
        inputs=(
            CorrelationInput(
                ref=FAILED,
                rule_id=FAILED,
                condition=many.correlation.inputs[0].condition,
                fields=("ComputerName",),
                logsource=Logsource("windows", None, "security"),
            ),
        ),
    )
    assert many.correlation.inputs[0].condition not in (None, Const(False))
    vc = rules[VALUES].correlation
    assert vc is not None and vc.type == "value_count" and vc.field == ("User",)
    assert vc.timespan == 86400.0 and vc.group_by == ("ComputerName", "WorkstationName")
    # generate: false (the default): the base rule no longer fires on its own
    assert base.id == FAILED and base.condition == Const(False)


def test_generate_true_keeps_the_base_rule_firing_top_level_or_nested() -> None:
    rules = {r.id: r for r in rules_of("values.yml")}
    base = rules["9a8b7c6d-0001-4e2f-9a1b-000000000010"]
    assert base.condition != Const(False)
    doc = {
        "title": "t",
        "correlation": {
            "type": "event_count",
            "rules": ["x"],
            "timespan": "5m",
            "condition": {"gte": 2},
            "generate": True,
        },
    }
    got = correlation_rule(doc, "f.yml", 1, 0).correlation
    assert got is not None and got.generate is True


def test_aliases_resolve_per_referenced_rule() -> None:
    (corr, *_) = rules_of("aliases.yml")
    assert corr.correlation is not None
    assert [i.fields for i in corr.correlation.inputs] == [
        ("destination.ip", "source.ip"),
        ("source.ip", "destination.ip"),
    ]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30.0), ("90m", 5400.0), ("1h", 3600.0), ("2d", 172800.0), ("1w", 604800.0)],
)
def test_timespan_units(text: str, seconds: float) -> None:
    assert parse_timespan(text) == seconds


@pytest.mark.parametrize("text", ["0s", "1.5h", "1H", "5", "m", ""])
def test_bad_timespans(text: str) -> None:
    assert parse_timespan(text) is None


@pytest.mark.parametrize(
    ("corr", "reason"),
    [
        ({"type": "nope", "rules": ["a"], "timespan": "1h"}, "correlation: unknown type 'nope'"),
        (
            {"type": "event_count", "rules": [], "timespan": "1h", "condition": {"gte": 1}},
            "correlation: 'rules' must be a non-empty list of rule ids or names",
        ),
        (
            {"type": "event_count", "rules": ["a"], "timespan": "1h"},
            "correlation: event_count needs a condition (gt, gte, lt, lte, eq or neq)",
        ),
        (
            {"type": "value_count", "rules": ["a"], "timespan": "1h", "condition": {"gte": 1}},
            "correlation: value_count needs a condition field",
        ),
        (
            {"type": "temporal", "rules": ["a"], "timespan": "1x"},
            "correlation: 'timespan' must be a positive number with a unit s, m, h, d, w, M or y",
        ),
        (
            {"type": "event_count", "rules": ["a"], "timespan": "1h", "condition": {"ge": 1}},
            "correlation: unknown condition key 'ge'",
        ),
    ],
)
def test_bad_correlations_are_invalid_with_a_reason(corr: dict[str, Any], reason: str) -> None:
    with pytest.raises(InvalidRule) as e:
        correlation_rule({"title": "t", "correlation": corr}, "f.yml", 3, 0)
    assert (e.value.reason, e.value.line) == (reason, 3)


def test_unresolved_reference_and_cycle_have_precise_reasons() -> None:
    got = load_rules([DATA / "unresolved.yml", DATA / "cycle.yml"])
    reasons = sorted((Path(p.path or "").name, p.line, p.kind, p.reason) for p in got.problems)
    assert reasons == [
        ("cycle.yml", 2, "invalid", "correlation: reference cycle cycle_a -> cycle_b -> cycle_a"),
        ("cycle.yml", 13, "invalid", "correlation: reference cycle cycle_b -> cycle_a -> cycle_b"),
        (
            "unresolved.yml",
            2,
            "invalid",
            "correlation: unknown rule 'no_such_rule' (no loaded rule has that id or name)",
        ),
        (
            "unresolved.yml",
            14,
            "unsupported",
            "correlation: referenced correlation 'broken' did not load",
        ),
    ]
    # the base rule stays, and fires on its own: no correlation that loaded uses it
    assert [(r.name, r.condition != Const(False)) for r in got.rules] == [("Present rule", True)]


def test_a_correlation_alone_cannot_link_to_rules_of_another_file(tmp_path: Path) -> None:
    src = (DATA / "counts.yml").read_text().split("\n---\n")
    (tmp_path / "a.yml").write_text(src[0])
    alone = load_rules([tmp_path / "a.yml"])
    assert [p.reason for p in alone.problems] == [
        f"correlation: unknown rule '{FAILED}' (no loaded rule has that id or name)"
    ]
    (tmp_path / "b.yml").write_text(src[2])
    both = load_rules([tmp_path])
    assert both.problems == [] and {r.kind for r in both.rules} == {"event", "correlation"}


# --------------------------------------------------------------------------- event_count


def test_event_count_fires_on_the_hundredth_failure_per_host() -> None:
    eng = engine("counts.yml")
    recs = [
        logon(i, 4625, ComputerName="A", User=f"u{i}", **{"event.id": f"e{i}"}) for i in range(99)
    ]
    recs.insert(50, logon(50.5, 4625, ComputerName="B", User="x"))
    recs.append(logon(99, 4625, ComputerName="A", User="u99", **{"event.id": "e99"}))
    recs.append(logon(100, 4624, ComputerName="A", User="u1"))  # success: not counted
    out = run(eng, recs)
    assert fired(out) == [(100, MANY, 100)]
    d = out[100][0]
    assert d["correlation"]["group"] == [{"field": "ComputerName", "value": "A"}]
    assert d["correlation"]["window"] == {"start": iso(T0), "end": iso(T0 + 99)}
    assert [e["id"] for e in d["correlation"]["events"]] == [f"e{i}" for i in range(100)]
    assert d["correlation"]["events"][0]["timestamp"] == iso(T0)
    # fired: the group starts afresh
    assert eng.stats()["fired"] == 1


@pytest.mark.parametrize(("last", "fires"), [(3600.0, True), (3600.001, False)])
def test_event_count_timespan_boundary_is_inclusive(last: float, fires: bool) -> None:
    eng = engine("counts.yml")
    recs = [logon(i, 4625, ComputerName="A") for i in range(99)]
    recs.append(logon(last, 4625, ComputerName="A"))
    out = run(eng, recs)
    assert fired(out) == ([(99, MANY, 100)] if fires else [])


def test_group_by_field_missing_takes_no_part_multi_valued_counts_in_each() -> None:
    eng = engine("counts.yml")
    recs = [logon(i, 4625, ComputerName=["A", "B"]) for i in range(99)]
    recs += [logon(99, 4625), logon(100, 4625, ComputerName="B")]
    assert fired(run(eng, recs)) == [(100, MANY, 100)]


# --------------------------------------------------------------------------- value_count


def test_value_count_counts_distinct_users_per_host_and_workstation() -> None:
    eng = engine("counts.yml")
    recs = []
    for i in range(99):
        recs.append(logon(i, 4625, ComputerName="A", WorkstationName="W", User=f"u{i}"))
        recs.append(logon(i, 4625, ComputerName="A", WorkstationName="W", User="u0"))
    recs.append(logon(200, 4625, ComputerName="A", WorkstationName="X", User="new"))
    recs.append(logon(201, 4625, ComputerName="A", User="no-workstation"))
    recs.append(logon(202, 4625, ComputerName="A", WorkstationName="W", User="u99"))
    out = run(eng, recs)
    assert [(i, r, v) for i, r, v in fired(out) if r == VALUES] == [(len(recs) - 1, VALUES, 100)]
    d = next(d for d in out[-1] if d["rule_id"] == VALUES)
    assert d["correlation"]["group"] == [
        {"field": "ComputerName", "value": "A"},
        {"field": "WorkstationName", "value": "W"},
    ]


# --------------------------------------------------------------------------- temporal


def proc(t: float, image: str, host: str = "H", user: str = "U") -> dict[str, Any]:
    return {
        "UtcTime": iso(t + T0).replace("T", " ").rstrip("Z"),  # Sysmon's form
        "Channel": "Microsoft-Windows-Sysmon/Operational",
        "EventID": 1,
        "Image": "C:\\Windows\\System32\\" + image,
        "ComputerName": host,
        "User": user,
    }


RECON = "7c9d3f4e-1b2a-4c5d-8e6f-0a1b2c3d4e01"


def test_temporal_all_three_commands_in_any_order_within_five_minutes() -> None:
    eng = engine("temporal.yml")
    recs = [
        proc(0, "net.exe"),
        proc(10, "whoami.exe"),
        proc(11, "whoami.exe", user="other"),
        proc(300, "ipconfig.exe"),  # 300 s after the first: inside (inclusive)
    ]
    out = run(eng, recs)
    assert fired(out) == [(3, RECON, 3)]
    assert out[3][0]["correlation"]["group"] == [
        {"field": "ComputerName", "value": "H"},
        {"field": "User", "value": "U"},
    ]
    assert len(out[3][0]["correlation"]["events"]) == 3


def test_temporal_needs_every_rule_within_the_timespan() -> None:
    eng = engine("temporal.yml")
    recs = [proc(0, "net.exe"), proc(10, "whoami.exe"), proc(300.5, "ipconfig.exe")]
    assert fired(run(eng, recs)) == []
    # the net.exe of t=0 left the window; a new one completes it again
    assert fired(run(eng, [proc(301, "net.exe")])) == [(0, RECON, 3)]


# --------------------------------------------------------------------------- aliases


def test_aliases_group_both_sides_of_a_connection() -> None:
    eng = engine("aliases.yml")
    error = {
        "@timestamp": iso(T0),
        "http.response.status_code": 500,
        "source.ip": "1.2.3.4",
        "destination.ip": "10.0.0.1",
    }
    conn = {
        "@timestamp": iso(T0 + 10),
        "event.category": "network",
        "event.type": "connection",
        "event.outcome": "success",
        "source.ip": "10.0.0.1",
        "destination.ip": "1.2.3.4",
    }
    wrong_way = {**conn, "source.ip": "1.2.3.4", "destination.ip": "10.0.0.1"}
    out = run(eng, [error, wrong_way, conn])
    assert fired(out) == [(2, "3f1e2d4c-5b6a-4978-8a9b-0c1d2e3f4a01", 2)]
    assert out[2][0]["correlation"]["group"] == [
        {"field": "internal_ip", "value": "10.0.0.1"},
        {"field": "remote_ip", "value": "1.2.3.4"},
    ]


# --------------------------------------------------------------------------- chains


def test_spec_example_failed_logins_followed_by_success() -> None:
    eng = engine("chain.yml")
    recs = [logon(i * 10, 4625, User="alice", **{"event.id": f"f{i}"}) for i in range(10)]
    recs.append(logon(200, 4624, User="alice", **{"event.id": "s1"}))
    recs.append(logon(210, 4624, User="bob", **{"event.id": "s2"}))
    out = run(eng, recs)
    # the inner event_count (generate: false) is not reported, only the outer correlation
    assert fired(out) == [(10, CHAIN, 2)]
    d = out[10][0]
    assert d["severity"] == "high" and d["author"] == ["Florian Roth (Nextron Systems)"]
    inner = {
        "timestamp": iso(T0 + 90),
        "id": f"correlation:{INNER}",
        "events": [{"timestamp": iso(T0 + i * 10), "id": f"f{i}"} for i in range(10)],
    }
    assert d["correlation"] == {
        "type": "temporal_ordered",
        "group": [{"field": "User", "value": "alice"}],
        "value": 2,
        "window": {"start": iso(T0 + 90), "end": iso(T0 + 200)},
        "events": [inner, {"timestamp": iso(T0 + 200), "id": "s1"}],
    }


def test_outer_correlation_carries_its_chain_when_selection_drops_the_rest() -> None:
    outer = [r for r in rules_of("chain.yml") if r.id == CHAIN]  # e.g. --min-level high
    eng = CorrelationEngine.of(outer)
    assert eng is not None
    recs = [logon(i, 4625, User="alice") for i in range(10)] + [logon(20, 4624, User="alice")]
    assert fired(run(eng, recs)) == [(10, CHAIN, 2)]
    assert eng.stats()["rules"] == 2  # the inner event_count runs too, unreported


def test_temporal_ordered_needs_the_order_and_the_timespan() -> None:
    eng = engine("chain.yml")
    early = [logon(0, 4624, User="alice")]
    fails = [logon(10 + i, 4625, User="alice") for i in range(10)]
    assert fired(run(eng, early + fails)) == []  # success before the failures
    late = [logon(19 + 600.001, 4624, User="alice")]  # 10 min after the inner result + 1 ms
    assert fired(run(eng, late)) == []
    eng2 = engine("chain.yml")
    nine = [logon(i, 4625, User="bob") for i in range(9)] + [logon(20, 4624, User="bob")]
    assert fired(run(eng2, nine)) == []


# --------------------------------------------------------------------------- value types


def transfer(t: float, n: Any, src: str = "10.0.0.5") -> dict[str, Any]:
    return {
        "@timestamp": iso(T0 + t),
        "event.category": "network",
        "event.type": "connection",
        "network.direction": "outbound",
        "network.bytes": n,
        "source.ip": src,
    }


def rule_fires(out: list[list[dict[str, Any]]], suffix: str) -> list[tuple[int, Any]]:
    rid = f"9a8b7c6d-0001-4e2f-9a1b-00000000000{suffix}"
    return [(i, v) for i, r, v in fired(out) if r == rid]


def test_value_sum_avg_percentile_median() -> None:
    eng = engine("values.yml")
    out = run(eng, [transfer(0, 400), transfer(1, "200"), transfer(2, "x"), transfer(3, 950)])
    assert rule_fires(out, "1") == [(3, 1550)]  # 400 + 200 + 950 > 1000 ("x" skipped)
    assert rule_fires(out, "2") == [(3, pytest.approx(1550 / 3))]  # first average >= 500
    # 90th percentile of 200, 400, 950 (linear interpolation): 400 + 0.8 * 550
    assert rule_fires(out, "3") == [(3, 840)]
    # median 400 fires at once; the group starts afresh: median(200, 950) = 575
    assert rule_fires(out, "4") == [(0, 400), (3, 575)]


def test_range_condition_is_checked_when_the_window_closes() -> None:
    eng = engine("values.yml")
    three = [transfer(t, 1) for t in (0, 20, 60)] + [transfer(60.001, 1)]
    out = run(eng, three)
    # the window [0, 60] holds 3 records (gt 2, lte 4): reported on the first record after it
    assert rule_fires(out, "5") == [(3, 3)]
    d = next(d for d in out[3] if d["rule_id"].endswith("5"))
    assert d["correlation"]["window"] == {"start": iso(T0), "end": iso(T0 + 60)}
    eng2 = engine("values.yml")
    five = [transfer(t, 1) for t in (0, 1, 2, 3, 4)] + [transfer(61, 1)]
    assert rule_fires(run(eng2, five), "5") == []  # 5 records: more than 4


# --------------------------------------------------------------------------- time and bounds


def test_event_time_fields_late_and_timestampless_records() -> None:
    eng = engine("counts.yml")
    base = {"Channel": "Security", "EventID": 4625, "ComputerName": "A"}
    recs = [
        {**base, "TimeCreated": iso(T0 + 7200)},
        {**base, "timestamp": int((T0 + 7201) * 1000)},  # epoch milliseconds
        {**base, "@timestamp": iso(T0)},  # more than the timespan before the watermark: late
        dict(base),  # no event time at all
    ]
    assert fired(run(eng, recs)) == []
    st = eng.stats()
    # counters are summed over the rules: both rules of the file saw the record without time
    assert (st["events"], st["late_records"], st["no_timestamp"]) == (2, 1, 2)


def test_group_cap_evicts_the_least_recently_used_group() -> None:
    eng = CorrelationEngine(rules_of("counts.yml"), max_groups=2)
    run(eng, [logon(i, 4625, ComputerName=h) for i, h in enumerate("ABCA")])
    st = eng.stats()
    # event_count and value_count: value_count needs WorkstationName, so only one rule counts
    assert (st["groups"], st["evicted_groups"], st["evicted_events"]) == (2, 2, 2)


def test_snapshot_restore_resumes_counts() -> None:
    recs = [logon(i, 4625, ComputerName="A", **{"event.id": f"e{i}"}) for i in range(100)]
    one = engine("counts.yml")
    assert fired(run(one, recs[:60])) == []
    snap = json.loads(json.dumps(one.snapshot()))
    two = engine("counts.yml")
    two.restore(snap)
    out = run(two, recs[60:])
    assert fired(out) == [(39, MANY, 100)]
    assert [e["id"] for e in out[39][0]["correlation"]["events"]][:2] == ["e0", "e1"]


def test_the_builder_makes_a_correlation_engine_only_for_linked_correlations() -> None:
    kinds = [e.kind for e in stateful_engines(rules_of("chain.yml"))]
    assert kinds == ["correlation"]
    unlinked = correlation_rule(
        {"title": "t", "correlation": {"type": "temporal", "rules": ["a"], "timespan": "1m"}},
        "f.yml",
        1,
        0,
    )
    assert stateful_engines([unlinked]) == []


# --------------------------------------------------------------------------- ruletag match


def test_ruletag_match_annotates_the_completing_record(tmp_path: Path) -> None:
    recs = [logon(i * 10, 4625, User="alice", **{"event.id": f"f{i}"}) for i in range(10)]
    recs.append(logon(200, 4624, User="alice", **{"event.id": "s1"}))
    recs.append(logon(210, 4624, User="bob", **{"event.id": "s2"}))
    src = tmp_path / "events.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    proc = subprocess.run(
        [str(ruletag_script()), "match", "--events", str(src), "--rules", str(DATA / "chain.yml")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")},
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in proc.stdout.splitlines()]
    assert len(lines) == len(recs)
    got = [(i, [d["rule_id"] for d in r.get("detections", [])]) for i, r in enumerate(lines)]
    # every record passes; only the success after ten failures carries a detection (the
    # base rules and the inner correlation say generate: false)
    assert [g for g in got if g[1]] == [(10, [CHAIN])]
    assert lines[10]["detections"][0]["correlation"]["events"][-1] == {
        "timestamp": iso(T0 + 200),
        "id": "s1",
    }


# --------------------------------------------------------------------------- corpus


@needs_corpus
def test_corpus_correlation_documents_load_or_have_a_reason() -> None:
    folder = corpus("sigma")
    docs = 0
    for path in folder.rglob("*.yml"):
        text = path.read_text("utf-8", "replace")
        docs += len(re.findall(r"^correlation:", text, re.MULTILINE))
    got = load_rules([folder])
    loaded = sum(r.kind == "correlation" for r in got.rules)
    reasons = [p for p in got.problems if p.reason.startswith("correlation:")]
    assert loaded + len(reasons) == docs
    assert all(
        r.correlation is not None and r.correlation.inputs
        for r in got.rules
        if r.kind == "correlation"
    )


# --------------------------------------------------------------------------- property


def _abc_rules(ctype: str, condition: dict[str, Any] | None) -> list[Rule]:
    bases = [
        Rule(id=x, name=x, source="sigma", condition=Match("r", (x,)), ref_name=x) for x in "abc"
    ]
    corr: dict[str, Any] = {"type": ctype, "rules": ["a", "b", "c"], "group-by": ["g"]}
    corr["timespan"] = "10s"
    if condition is not None:
        corr["condition"] = condition
    rule = correlation_rule({"title": "p", "id": "p", "correlation": corr}, "p.yml", 1, 0)
    linked, problems = link_correlations([*bases, rule])
    assert problems == []
    return linked


def _slow(ctype: str, need: int, events: list[tuple[float, str, str]]) -> list[int]:
    """The records that fire, by brute force: per group, the events since its last alert and
    within the timespan of the newest, searched for ``need`` rules (in order, for ordered)."""
    kept: dict[str, list[tuple[float, str]]] = {}
    out: list[int] = []
    for i, (ts, rule, group) in enumerate(events):
        window = [e for e in kept.get(group, []) if e[0] >= ts - 10] + [(ts, rule)]
        kept[group] = window
        if ctype == "event_count":
            hit = len(window) >= need
        elif ctype == "temporal":
            hit = len({r for _, r in window}) >= need
        else:
            hit = any(
                [window[j][1] for j in combo] == ["a", "b", "c"]
                for combo in itertools.combinations(range(len(window)), 3)
            )
        if hit:
            out.append(i)
            kept[group] = []
    return out


@settings(max_examples=60, deadline=None)
@given(
    ctype=st.sampled_from(["event_count", "temporal", "temporal_ordered"]),
    steps=st.lists(
        st.tuples(
            st.sampled_from([0.0, 0.0, 1.0, 3.0, 7.0, 11.0]),
            st.sampled_from("abc"),
            st.sampled_from("xy"),
        ),
        max_size=40,
    ),
)
def test_streaming_matches_a_slow_reference_on_in_order_events(
    ctype: str, steps: list[tuple[float, str, str]]
) -> None:
    need = 4 if ctype == "event_count" else 3
    cond = {"gte": need} if ctype == "event_count" else None
    eng = CorrelationEngine.of(_abc_rules(ctype, cond))
    assert eng is not None
    events: list[tuple[float, str, str]] = []
    t = T0
    for gap, rule, group in steps:
        t += gap
        events.append((t, rule, group))
    got = [i for i, (ts, r, g) in enumerate(events) if eng.feed({"@timestamp": ts, "r": r, "g": g})]
    assert got == _slow(ctype, need, events)


def test_step_hits_over_packed_entries_feed_only_the_referenced_rules_hits() -> None:
    recs = [logon(i, 4625, User="alice") for i in range(10)]
    recs += [logon(i + 10, 4688, User="alice") for i in range(5)]  # hits no referenced rule
    recs.append(logon(20, 4624, User="alice"))
    buf = bytearray()
    spans = []
    for r in recs:
        start = len(buf)
        buf += msgpack.packb([0, r])
        spans.append((start, len(buf)))
    eng = engine("chain.yml")
    hits = eng.step_hits(bytes(buf), spans)
    assert sorted(hits) == [*range(10), 15]
    out = [(i, [f.rule.id for f in eng.feed(recs[i], h)]) for i, h in sorted(hits.items())]
    assert [x for x in out if x[1]] == [(15, [CHAIN])]
