"""EQL sequences (issue 16): front-end, the streaming matcher against Elasticsearch's
documented semantics (``docs/rules.md`` "Sequences"), bounds, and ``ruletag match``."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ruletag.errors import InvalidRule, UnsupportedRule
from ruletag.rules.elastic import load_elastic_file
from ruletag.rules.eql import parse_eql, parse_eql_query
from ruletag.rules.ir import Const, Match, Rule, Sequence, Step
from ruletag.rules.stateful.sequence import SequenceEngine, SequenceState, event_time
from support.paths import SAMPLE, corpus, needs_corpus
from support.servers import ruletag_script

# --------------------------------------------------------------------------- front-end


def seq(query: str, category_field: str = "event.category") -> Sequence:
    got = parse_eql_query(query, category_field)
    assert isinstance(got, Sequence)
    return got


def test_shared_keys_come_first_and_runs_expand() -> None:
    s = seq(
        "sequence by host.id with maxspan=2m\n"
        ' [process where process.name == "a"] by process.entity_id\n'
        " [network where true] by process.parent.entity_id with runs=3\n"
        ' until [process where event.type == "end"] by process.entity_id'
    )
    assert s.maxspan == 120.0
    assert len(s.steps) == 4
    assert s.steps[0].keys == ("host.id", "process.entity_id")
    assert s.steps[1] == s.steps[2] == s.steps[3]
    assert s.steps[1] == Step(
        Match("event.category", ("network",), cased=True), ("host.id", "process.parent.entity_id")
    )
    assert s.until is not None and s.until.keys == ("host.id", "process.entity_id")


@pytest.mark.parametrize(
    ("unit", "seconds"), [("ms", 0.25), ("s", 250), ("m", 15000), ("h", 900000), ("d", 21600000)]
)
def test_maxspan_units(unit: str, seconds: float) -> None:
    s = seq(f"sequence with maxspan=250{unit} [any where true] [any where true]")
    assert s.maxspan == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("query", "error", "message"),
    [
        ("sequence [a where true] by x [b where true]", InvalidRule, "inconsistent number"),
        ("sequence with maxspan=0s [a where true] [b where true]", InvalidRule, "positive"),
        ("sequence with maxspan=1.5s [a where true] [b where true]", InvalidRule, "positive"),
        ("sequence with maxspan=5 [a where true] [b where true]", InvalidRule, "unit"),
        ("sequence with maxspan=5s by x [a where true] [b where true]", InvalidRule, "before"),
        ("sequence [a where true] with runs=101", InvalidRule, "runs"),
        ("sequence [a where true]", InvalidRule, "at least two steps"),
        ("sequence by ?x [a where true] [b where true]", UnsupportedRule, "optional"),
        ("sample by x [a where true] by y, z [b where true]", InvalidRule, "inconsistent"),
    ],
)
def test_refused_sequences(query: str, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        parse_eql_query(query)


def test_single_clause_with_runs_is_a_sequence_and_parse_eql_refuses_it() -> None:
    assert len(seq("sequence by u [a where true] with runs=5").steps) == 5
    with pytest.raises(UnsupportedRule, match="EQL sequence"):
        parse_eql("sequence [a where true] [b where true]")


def test_category_override_is_the_category_field() -> None:
    s = seq("sequence [iam where true] [any where true]", "event.type")
    assert s.steps[0].condition == Match("event.type", ("iam",), cased=True)
    assert s.steps[1].condition == Const(True)


def test_corpus_sequence_rules_load_with_their_settings() -> None:
    okta = SAMPLE / (
        "elastic/rules/integrations/okta/"
        "credential_access_okta_mfa_bombing_via_push_notifications.toml"
    )
    (rule,) = load_elastic_file(okta)
    assert rule.kind == "sequence" and rule.condition == Const(False)
    assert rule.sequence is not None
    assert len(rule.sequence.steps) == 5 and rule.sequence.until is not None
    assert rule.sequence.maxspan == 600.0
    assert rule.sequence.steps[0].keys == ("okta.actor.id",)


# --------------------------------------------------------------------------- engine


def sequence_rule(query: str, rule_id: str = "seq-1", **kw: Any) -> Rule:
    return Rule(
        id=rule_id,
        name=rule_id,
        source="elastic",
        condition=Const(False),
        kind="sequence",
        sequence=dataclasses.replace(seq(query), **kw),
    )


def run(rule: Rule, records: Iterable[dict[str, Any]], **kw: Any) -> list[list[str]]:
    """Every completed sequence, as the ids of its events."""
    engine = SequenceEngine([rule], **kw)
    out = []
    for rec in records:
        for c in engine.feed(rec):
            out.append([e["id"] for e in c.events])
    return out


def ev(i: int, ts: float, **fields: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {"@timestamp": ts, "event": {"id": str(i), "category": "process"}}
    for k, v in fields.items():
        node = rec
        *head, last = k.split("__")
        for h in head:
            node = node.setdefault(h, {})
        node[last] = v
    return rec


ATTRIB_BASH_CAT = (
    "sequence by user.name\n"
    ' [process where process.name == "attrib"]\n'
    ' [process where process.name == "bash"]\n'
    ' [process where process.name == "cat"]'
)


def test_how_sequences_handle_matches() -> None:
    """Elasticsearch's documented example (semantics doc A.5): two attrib for root, only the
    later stays; bash moves it on; a second bash does nothing; a later attrib waits in state A
    while cat completes the partial in state B; a second user is interleaved."""
    names = [
        ("root", "attrib"),  # 1
        ("root", "attrib"),  # 2: replaces 1 in A
        ("elkbee", "bash"),  # 3: nothing in A for elkbee
        ("root", "bash"),  # 4: 2 moves to B
        ("root", "bash"),  # 5: A is empty
        ("elkbee", "attrib"),  # 6
        ("root", "attrib"),  # 7: new partial in A
        ("elkbee", "bash"),  # 8
        ("root", "cat"),  # 9: completes 2,4,9
        ("elkbee", "cat"),  # 10: completes 6,8,10
        ("root", "cat"),  # 11: B is empty (7 still waits in A)
    ]
    records = [ev(i, 1000 + i, user__name=u, process__name=p) for i, (u, p) in enumerate(names, 1)]
    engine = SequenceEngine([sequence_rule(ATTRIB_BASH_CAT)])
    got = []
    for rec in records:
        for c in engine.feed(rec):
            got.append((rec["event"]["id"], list(c.keys), [e["id"] for e in c.events]))
    assert got == [("9", ["root"], ["2", "4", "9"]), ("10", ["elkbee"], ["6", "8", "10"])]
    assert engine.stats()["partials"] == 1  # 7, in state A
    assert engine.stats()["completed"] == 2


def test_runs_overlap_k_minus_n_plus_one() -> None:
    rule = sequence_rule('sequence by u with maxspan=1m [process where x == "a"] with runs=3')
    records = [ev(i, 100 + i, u="k", x="a") for i in range(1, 6)]
    assert run(rule, records) == [["1", "2", "3"], ["2", "3", "4"], ["3", "4", "5"]]


def test_runs_overlap_is_bounded_by_maxspan() -> None:
    rule = sequence_rule('sequence by u with maxspan=2s [process where x == "a"] with runs=3')
    records = [ev(i, t, u="k", x="a") for i, t in enumerate([0, 1, 2, 3.5, 4, 5], 1)]
    # 1,2,3 spans 2 s (inclusive); 2,3,4 spans 2.5 s: dropped; 3,4,5 spans 2 s; 4,5,6 1.5 s
    assert run(rule, records) == [["1", "2", "3"], ["3", "4", "5"], ["4", "5", "6"]]


def test_maxspan_boundary_is_inclusive() -> None:
    rule = sequence_rule(
        'sequence by u with maxspan=10s [process where x == "a"] [process where x == "b"]'
    )
    assert run(rule, [ev(1, 0, u="k", x="a"), ev(2, 10, u="k", x="b")]) == [["1", "2"]]
    assert run(rule, [ev(1, 0, u="k", x="a"), ev(2, 10.001, u="k", x="b")]) == []
    # a failed maxspan check drops the hit and the partial: no fall-back to an older one
    recs = [ev(1, 0, u="k", x="a"), ev(2, 5, u="k", x="a"), ev(3, 16, u="k", x="b")]
    assert run(rule, recs) == []


UNTIL_RULE = (
    "sequence by u\n"
    ' [process where x == "A"] [process where x == "B"] [process where x == "C"]\n'
    ' until [process where x == "U"]'
)


@pytest.mark.parametrize(
    ("order", "expected"),
    [
        ("ABC", [["A", "B", "C"]]),
        ("ABCU", [["A", "B", "C"]]),  # an until after the last event cancels nothing
        ("ABUC", []),
        ("AUBC", []),
        ("UABC", [["A", "B", "C"]]),  # an until before the first event stops nothing
        ("AUABC", [["A2", "B", "C"]]),
    ],
)
def test_until(order: str, expected: list[list[str]]) -> None:
    seen: dict[str, int] = {}
    records = []
    for t, x in enumerate(order):
        seen[x] = seen.get(x, 0) + 1
        ident = x if seen[x] == 1 else f"{x}{seen[x]}"
        records.append(
            {"@timestamp": t, "u": "k", "x": x, "event": {"id": ident, "category": "process"}}
        )
    assert run(sequence_rule(UNTIL_RULE), records) == expected


def test_an_event_matching_a_step_and_until_kills_the_partial_it_extended() -> None:
    rule = sequence_rule(
        'sequence by u [any where x == "A"] [any where y == "B"] [any where true]'
        ' until [any where y == "B"]'
    )
    recs = [
        {"@timestamp": 1, "u": "k", "x": "A", "event": {"id": "1"}},
        {"@timestamp": 2, "u": "k", "y": "B", "event": {"id": "2"}},
        {"@timestamp": 3, "u": "k", "event": {"id": "3"}},
    ]
    assert run(rule, recs) == []


def test_the_okta_corpus_rule_runs_five_then_until() -> None:
    okta = SAMPLE / (
        "elastic/rules/integrations/okta/"
        "credential_access_okta_mfa_bombing_via_push_notifications.toml"
    )
    (rule,) = load_elastic_file(okta)

    def okta_event(i: int, ts: int, kind: str) -> dict[str, Any]:
        deny = kind == "deny"
        return {
            "@timestamp": f"2026-01-01T00:{ts // 60:02d}:{ts % 60:02d}Z",
            "event": {"id": str(i)},
            "data_stream": {"dataset": "okta.system"},
            "okta": {
                "actor": {"id": "u1"},
                "event_type": "user.mfa.okta_verify.deny_push" if deny else "user.session.start",
                "outcome": {"result": "DENY" if deny else "SUCCESS"},
            },
        }

    kinds = ["deny"] * 4 + ["ok"] + ["deny"] * 6
    got = run(rule, [okta_event(i, 10 * i, k) for i, k in enumerate(kinds, 1)])
    # the success at 5 drops 1..4; 6..10 complete, then 7..11
    assert got == [["6", "7", "8", "9", "10"], ["7", "8", "9", "10", "11"]]


def test_per_step_keys_line_up_by_position_and_multi_valued_keys_fan_out() -> None:
    rule = sequence_rule(
        'sequence by host\n [process where x == "start"] by pid\n [network where true] by ppid'
    )
    start = {"@timestamp": 1, "host": "h", "pid": 7, "x": "start", "event": {"id": "s"}}
    start["event"]["category"] = "process"
    net = {"@timestamp": 2, "host": "h", "ppid": "7", "event": {"id": "n", "category": "network"}}
    assert run(rule, [start, net]) == [["s", "n"]]  # 7 and "7" are one key value
    multi = dict(start, host=["h1", "h2"])
    net2 = dict(net, host=["h2", "h1"])
    assert sorted(map(tuple, run(rule, [multi, net2]))) == [("s", "n"), ("s", "n")]
    missing = dict(net)
    del missing["ppid"]
    assert run(rule, [start, missing]) == []  # a null key takes no part


def test_late_events_are_ordered_by_event_time() -> None:
    rule = sequence_rule(
        'sequence by u with maxspan=1m [process where x == "a"] [process where x == "b"]'
    )
    # b arrives before a but is later in event time: no sequence (a must precede b)
    assert run(rule, [ev(2, 20, u="k", x="b"), ev(1, 10, u="k", x="a")]) == []
    # a late a that lands between an earlier a and the b: Elasticsearch's choice (latest a
    # strictly before b) is reproduced
    late = [ev(1, 10, u="k", x="a"), ev(3, 30, u="k", x="a"), ev(2, 20, u="k", x="a")]
    assert run(rule, [*late, ev(4, 25, u="k", x="b")]) == [["2", "4"]]
    engine = SequenceEngine([rule])
    for r in late:
        engine.feed(r)
    assert engine.stats()["late_records"] == 1


def test_equal_timestamps_order_by_arrival() -> None:
    rule = sequence_rule('sequence by u [process where x == "a"] [process where x == "b"]')
    assert run(rule, [ev(1, 5, u="k", x="a"), ev(2, 5, u="k", x="b")]) == [["1", "2"]]
    assert run(rule, [ev(2, 5, u="k", x="b"), ev(1, 5, u="k", x="a")]) == []


def test_key_cap_evicts_the_least_recently_used_key() -> None:
    rule = sequence_rule('sequence by u [process where x == "a"] [process where x == "b"]')
    engine = SequenceEngine([rule], max_keys=2)
    for i, u in enumerate(["k1", "k2", "k3"], 1):
        engine.feed(ev(i, i, u=u, x="a"))
    st_ = engine.stats()
    assert (st_["keys"], st_["evicted_keys"], st_["evicted_partials"]) == (2, 1, 1)
    assert engine.feed(ev(4, 4, u="k1", x="b")) == []  # k1 was evicted
    assert [e["id"] for e in engine.feed(ev(5, 5, u="k2", x="b"))[0].events] == ["2", "5"]


def test_partial_cap_drops_the_oldest_partial_of_a_stage() -> None:
    state = SequenceState(2, 100.0, max_partials=2)
    for i in range(3):
        state.hit(0, ("k",), (float(i), (1,), i), {"id": str(i)})
    assert state.partials() == 2 and state.counters["evicted_partials"] == 1
    # a late b between 0 and 1 finds nothing: partial 0 was evicted
    assert state.hit(1, ("k",), (0.5, (1,), 9), {"id": "b"}) is None


def test_expiry_drops_partials_older_than_the_span() -> None:
    rule = sequence_rule(
        'sequence by u with maxspan=5s [process where x == "a"] [process where x == "b"]'
    )
    engine = SequenceEngine([rule])
    for i in range(100):
        engine.feed(ev(i, i * 10, u=f"k{i}", x="a"))
    assert engine.stats()["keys"] <= 2
    assert engine.stats()["expired_partials"] >= 98


def test_no_maxspan_uses_the_rule_look_back() -> None:
    rule = sequence_rule('sequence by u [process where x == "a"] [process where x == "b"]')
    assert rule.sequence is not None
    ttl = rule.sequence.ttl
    recs = [ev(1, 0, u="k", x="a"), ev(2, ttl + 1, u="k", x="b")]
    assert run(rule, recs) == []


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("2026-01-01T00:00:00Z", 1767225600.0),
        ("2026-01-01T00:00:00.250+00:00", 1767225600.25),
        ("2026-01-01 01:00:00+01:00", 1767225600.0),
        (1767225600, 1767225600.0),
        (1767225600250, 1767225600.25),
        ("1767225600", 1767225600.0),
        ("yesterday", None),
        (None, None),
        (True, None),
    ],
)
def test_event_time(value: object, seconds: float | None) -> None:
    assert event_time(value) == seconds


def test_records_without_a_timestamp_take_no_part() -> None:
    rule = sequence_rule('sequence by u [process where x == "a"] [process where x == "b"]')
    recs = [{"u": "k", "x": "a", "event": {"category": "process"}}, ev(2, 2, u="k", x="b")]
    engine = SequenceEngine([rule])
    assert [c for r in recs for c in engine.feed(r)] == []
    assert engine.stats()["no_timestamp"] == 1


def test_event_ids_fall_back_to_a_content_digest() -> None:
    rule = sequence_rule('sequence by u [any where x == "a"] [any where x == "b"]')
    a = {"@timestamp": 1, "u": "k", "x": "a"}
    b = {"@timestamp": 2, "u": "k", "x": "b", "ProcessGuid": "{g}"}
    engine = SequenceEngine([rule])
    engine.feed(a)
    (done,) = engine.feed(b)
    first, second = done.events
    assert first["id"].startswith("sha256:") and len(first["id"]) == 39
    assert second == {"timestamp": 2, "id": "{g}"}


# --------------------------------------------------------------------------- property


EVENTS = st.lists(
    st.tuples(
        st.integers(0, 30),  # timestamp
        st.sampled_from(["k1", "k2"]),  # key
        st.frozensets(st.integers(0, 2), max_size=2),  # stages the event matches
        st.booleans(),  # an until event
    ),
    max_size=25,
)


def reference(events: list[tuple[int, str, frozenset[int], bool]], n: int, span: float):
    """Elasticsearch's documented model, events in ordinal order: per key, one pending
    sequence per state, the newer replacing the older; an until event empties its key."""
    slots: dict[str, list[tuple[float, tuple[int, ...]] | None]] = {}
    out = []
    for i, (ts, key, stages, until) in enumerate(events):
        s = slots.setdefault(key, [None] * (n - 1))
        for stage in sorted((x for x in stages if x < n), reverse=True):
            if stage == 0:
                s[0] = (ts, (i,))
                continue
            p = s[stage - 1]
            s[stage - 1] = None
            if p is None or ts - p[0] > span:
                continue
            if stage == n - 1:
                out.append((*p[1], i))
            else:
                s[stage] = (p[0], (*p[1], i))
        if until:
            slots[key] = [None] * (n - 1)
    return out


def stream(events, order: list[int], n: int, span: float, sweep: bool):
    state = SequenceState(n, span, max_partials=64)
    out = []
    for arrival, i in enumerate(order):
        ts, key, stages, until = events[i]
        o = (float(ts), (1,), arrival)
        if sweep:
            state.expire(float(max(events[j][0] for j in order[: arrival + 1])))
        for stage in sorted((x for x in stages if x < n), reverse=True):
            done = state.hit(stage, (key,), o, {"id": i})
            if done is not None:
                out.append(tuple(e["id"] for e in done))
        if until:
            state.until((key,), o)
    return out


@settings(max_examples=300, deadline=None)
@given(EVENTS, st.integers(2, 3), st.sampled_from([3.0, 10.0, 1000.0]), st.booleans())
def test_streaming_matches_the_documented_model_in_event_time_order(
    events, n: int, span: float, sweep: bool
) -> None:
    """In ordinal order the ordered partial lists (the code's model) give the documentation's
    one-slot-per-state results, with or without expiry sweeps (derivations of A.5 and D.1)."""
    events = sorted(events, key=lambda e: e[0])  # stable: equal timestamps keep arrival order
    assert stream(events, list(range(len(events))), n, span, sweep) == reference(events, n, span)


@settings(max_examples=300, deadline=None)
@given(EVENTS, st.integers(2, 3), st.sampled_from([3.0, 10.0]), st.randoms())
def test_streaming_results_are_valid_sequences_in_any_arrival_order(
    events, n: int, span: float, rnd
) -> None:
    """Whatever the arrival order, every result is an in-order assignment of the steps under
    Elasticsearch's rules: one key, step conditions, strictly increasing ordinals, maxspan,
    and no until event of the key between consecutive events a, b (in event time) that arrived
    after a and before b (an until that arrives before the partial it would stop exists is not
    kept: Elasticsearch records until events only for keys with partials in flight)."""
    order = list(range(len(events)))
    rnd.shuffle(order)
    arrival = {i: a for a, i in enumerate(order)}
    ordinal = {i: (events[i][0], arrival[i]) for i in order}
    for result in stream(events, order, n, span, sweep=False):
        assert len(result) == n and len({events[i][1] for i in result}) == 1
        assert all(stage in events[i][2] for stage, i in enumerate(result))
        assert all(ordinal[a] < ordinal[b] for a, b in itertools.pairwise(result))
        assert events[result[-1]][0] - events[result[0]][0] <= span
        for a, b in itertools.pairwise(result):
            for u, (_, key, _, until) in enumerate(events):
                if until and key == events[a][1] and arrival[a] < arrival[u] < arrival[b]:
                    assert not (ordinal[a] <= ordinal[u] < ordinal[b])


# --------------------------------------------------------------------------- ruletag match


COMPRESSION_RULE = SAMPLE / (
    "elastic/rules/macos/collection_sensitive_file_access_followed_by_compression.toml"
)


def file_event(i: int, ts: str, entity: str, action: str, **file: str) -> dict[str, Any]:
    return {
        "@timestamp": ts,
        "event": {"id": f"e{i}", "category": ["file"], "action": action},
        "host": {"os": {"type": "macos"}},
        "process": {"entity_id": entity},
        "file": file,
    }


def test_ruletag_match_annotates_the_completing_record(tmp_path: Path) -> None:
    events = [
        file_event(1, "2026-03-01T10:00:00.000Z", "p1", "open", name="secrets.db"),
        file_event(2, "2026-03-01T10:00:01.000Z", "p2", "open", name="other.db"),
        file_event(
            3,
            "2026-03-01T10:00:20.000Z",
            "p1",
            "modification",
            extension="zip",
            path="/tmp/out.zip",
            name="out.zip",
        ),
        file_event(
            4,
            "2026-03-01T10:00:45.000Z",
            "p2",
            "modification",
            extension="zip",
            path="/tmp/late.zip",
            name="late.zip",
        ),  # 44 s after p2's open: outside maxspan=30s
    ]
    src = tmp_path / "events.jsonl"
    src.write_text("".join(json.dumps(e) + "\n" for e in events))
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = subprocess.run(
        [str(ruletag_script()), "match", "--events", str(src), "--rules", str(COMPRESSION_RULE)],
        capture_output=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    out = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert [r["event"]["id"] for r in out] == ["e1", "e2", "e3", "e4"]  # every record passes
    annotated = [r for r in out if "detections" in r]
    assert [r["event"]["id"] for r in annotated] == ["e3"]
    (d,) = annotated[0]["detections"]
    assert d["rule_id"] == load_elastic_file(COMPRESSION_RULE)[0].id
    assert d["sequence"] == {
        "keys": ["p1"],
        "events": [
            {"timestamp": "2026-03-01T10:00:00.000Z", "id": "e1"},
            {"timestamp": "2026-03-01T10:00:20.000Z", "id": "e3"},
        ],
    }


# --------------------------------------------------------------------------- whole corpus


@needs_corpus
def test_active_corpus_sequences_load() -> None:
    loaded = 0
    refused: dict[str, int] = {}
    for path in sorted(corpus("elastic").rglob("*.toml")):
        text = path.read_text(encoding="utf-8")
        if "_deprecated" in path.parts or not re.search(r"(?m)^\s*sequence\b", text):
            continue
        try:
            (rule,) = load_elastic_file(path)
        except (InvalidRule, UnsupportedRule) as exc:
            refused[exc.reason] = refused.get(exc.reason, 0) + 1
            continue
        assert rule.kind == "sequence" and rule.sequence is not None
        loaded += 1
    print(loaded, refused)
    assert loaded >= 190
    assert set(refused) <= {"deprecated rule"}
