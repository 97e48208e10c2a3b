"""EQL missing events ``![...]`` (issue 16): front-end, Elasticsearch's acceptance rules
(semantics doc A.8), the watermark with its allowed lateness, ``ruletag match`` end to end,
and the corpus."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ruletag.errors import InvalidRule, UnsupportedRule
from ruletag.rules.elastic import load_elastic_file
from ruletag.rules.eql import parse_eql_query
from ruletag.rules.ir import Const, Rule, Sequence
from ruletag.rules.stateful import Clocked, stateful_engines
from ruletag.rules.stateful.missing import MissingState
from ruletag.rules.stateful.sequence import MISSING_REF, Completion, SequenceEngine
from support.paths import SAMPLE, corpus, needs_corpus
from support.servers import ruletag_script

ALERT_RULE = SAMPLE / "elastic/rules/cross-platform/defense_evasion_missing_events_after_alert.toml"

# --------------------------------------------------------------------------- front-end


def seq(query: str) -> Sequence:
    got = parse_eql_query(query)
    assert isinstance(got, Sequence)
    return got


def test_missing_clauses_keep_their_position_and_keys() -> None:
    s = seq(
        "sequence by h with maxspan=1m\n"
        ' ![process where x == "lead"] by u\n'
        ' [process where x == "a"] by u\n'
        ' ![process where x == "mid"] by u\n'
        ' [process where x == "c"] by u with runs=2\n'
        ' ![process where x == "trail"] by v'
    )
    assert len(s.steps) == 3  # a, c, c: missing clauses are not steps
    assert [(m.position, m.step.keys) for m in s.missing] == [
        (0, ("h", "u")),
        (1, ("h", "u")),
        (3, ("h", "v")),
    ]
    assert s.maxspan == 60.0


def test_corpus_missing_event_rule_loads() -> None:
    (rule,) = load_elastic_file(ALERT_RULE)
    assert rule.kind == "sequence" and rule.condition == Const(False)
    s = rule.sequence
    assert s is not None and s.maxspan == 300.0 and len(s.steps) == 1
    (gap,) = s.missing
    assert gap.position == 1 and gap.step.keys == ("host.id",)


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("sequence [a where true] ![b where true]", "needs 'with maxspan'"),
        ("sequence with maxspan=1m ![a where true] ![b where true]", "positive"),
        ("sequence with maxspan=1m [a where true] ![b where true] with runs=2", "runs"),
        ("sequence with maxspan=1m [a where true] by x ![b where true]", "inconsistent"),
        ("sequence with maxspan=1m [a where true]", "at least two steps"),
    ],
)
def test_refused_missing_event_sequences(query: str, message: str) -> None:
    with pytest.raises((InvalidRule, UnsupportedRule), match=re.escape(message)):
        parse_eql_query(query)


# --------------------------------------------------------------------------- engine


def rule_of(query: str, rule_id: str = "miss-1") -> Rule:
    return Rule(
        id=rule_id,
        name=rule_id,
        source="elastic",
        condition=Const(False),
        kind="sequence",
        sequence=seq(query),
    )


def ev(i: str, ts: float, x: str, h: str = "h1") -> dict[str, Any]:
    return {"@timestamp": ts, "event": {"id": i, "category": "process"}, "x": x, "h": h}


def ids(c: Completion) -> list[str]:
    return [str(e.get("id", "-")) for e in c.events]


def run(
    query: str, records: Iterable[dict[str, Any]], lateness: float = 0.0
) -> list[tuple[str, list[str]]]:
    """(id of the record the completion came with, or "flush"; the events' ids, "-" for a
    missing placeholder)."""
    engine = SequenceEngine([rule_of(query)], lateness=lateness)
    out = []
    for rec in records:
        out.extend((rec["event"]["id"], ids(c)) for c in engine.feed(rec))
    out.extend(("flush", ids(c)) for c in engine.flush())
    return out


TRAILING = 'sequence by h with maxspan=10s [process where x == "a"] ![process where x == "b"]'
LEADING = (
    "sequence by h with maxspan=10s\n"
    ' ![process where x == "b"] [process where x == "a"] [process where x == "c"]'
)
MIDDLE = (
    "sequence by h with maxspan=10s\n"
    ' [process where x == "a"] ![process where x == "b"] [process where x == "c"]'
)
BOTH = (
    "sequence by h with maxspan=10s\n"
    ' ![process where x == "b"] [process where x == "a"] ![process where x == "d"]'
)


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        # no b at all: confirmed at the end of input
        ([("1", 0, "a")], [("flush", ["1", "-"])]),
        # b exactly maxspan after the first positive: not "more than" maxspan, rejected
        ([("1", 0, "a"), ("2", 10, "b")], []),
        # b just past the window: the sequence stands, confirmed by b (lateness 0) itself
        ([("1", 0, "a"), ("2", 10.001, "b")], [("2", ["1", "-"])]),
        # b at the same timestamp as a is not strictly after it
        ([("1", 0, "a"), ("2", 0, "b")], [("flush", ["1", "-"])]),
        # b before a does not matter for a trailing clause
        ([("2", -1, "b"), ("1", 0, "a")], [("flush", ["1", "-"])]),
    ],
)
def test_trailing_missing_event(events: list[tuple[str, float, str]], expected: Any) -> None:
    assert run(TRAILING, [ev(i, t, x) for i, t, x in events]) == expected


def test_trailing_missing_event_of_another_key_does_not_count() -> None:
    records = [ev("1", 0, "a", h="h1"), ev("2", 3, "b", h="h2")]
    assert run(TRAILING, records) == [("flush", ["1", "-"])]


@pytest.mark.parametrize(
    ("b_at", "accepted"),
    [
        (None, True),  # no leading hit
        (0.0, True),  # latest b is 10.5 s before the last positive: > maxspan
        (0.5, False),  # exactly maxspan before the last positive: rejected
        (4.0, False),
        (5.0, True),  # same time as the first positive: not strictly before it
        (7.0, True),  # after the first positive: not a leading hit
    ],
)
def test_leading_missing_event(b_at: float | None, accepted: bool) -> None:
    records = [ev("a", 5, "a"), ev("c", 10.5, "c")]
    if b_at is not None:
        records.insert(0, ev("b", b_at, "b"))
    # leading and middle clauses need no wait past the last positive: with lateness 0 the
    # completing record itself carries the sequence
    expected = [("c", ["-", "a", "c"])] if accepted else []
    assert run(LEADING, records) == expected


@pytest.mark.parametrize(
    ("b_at", "accepted"),
    [(None, True), (1.0, False), (0.0, True), (4.0, True), (3.999, False), (-1.0, True)],
)
def test_middle_missing_event(b_at: float | None, accepted: bool) -> None:
    """A b strictly between a (at 0) and c (at 4) breaks the sequence, whatever maxspan."""
    records = [ev("a", 0, "a"), ev("c", 4, "c")]
    if b_at is not None:
        records.insert(1, ev("b", b_at, "b"))
        records.sort(key=lambda r: r["@timestamp"])
    expected = [("c", ["a", "-", "c"])] if accepted else []
    assert run(MIDDLE, records) == expected


@pytest.mark.parametrize(
    ("b_at", "d_at", "accepted"),
    [
        (None, None, True),
        (None, 6.0, True),  # no leading hit: a window ending at a avoids d
        (0.0, None, True),  # no trailing hit: a window starting at a avoids b
        (0.0, 10.5, True),  # the gap between the hits exceeds maxspan
        (0.0, 10.0, False),  # exactly maxspan: no free window
        (2.0, 11.0, False),
    ],
)
def test_leading_and_trailing_missing_events(
    b_at: float | None, d_at: float | None, accepted: bool
) -> None:
    records = [ev("a", 5, "a")]
    if b_at is not None:
        records.insert(0, ev("b", b_at, "b"))
    if d_at is not None:
        records.append(ev("d", d_at, "d"))
    out = run(BOTH, records)
    assert out == ([("flush", ["-", "a", "-"])] if accepted else [])


def test_missing_state_rules_directly() -> None:
    """The acceptance table of the semantics doc (A.8), on MissingState alone."""
    state = MissingState([0, 1], stages=1, span=10.0)  # ![b] [a] ![d]
    assert state.accepts(("k",), [5.0])
    state.seen(0, ("k",), 0.0)
    state.seen(1, ("k",), 10.0)
    assert not state.accepts(("k",), [5.0])  # T - L == maxspan
    assert state.accepts(("other",), [5.0])
    assert state.counters["missing_accepted"] == 2
    assert state.counters["missing_rejected"] == 1


# --------------------------------------------------------------------------- watermark


def test_trailing_waits_for_the_watermark_past_the_window_plus_lateness() -> None:
    """maxspan 10 s, lateness 2 s: the a at 0 is confirmed by the first record whose time
    passes 10 + 2 s, and that record carries it, even though it hits no step of the rule."""
    engine = SequenceEngine([rule_of(TRAILING)], lateness=2.0)
    assert isinstance(engine, Clocked)
    got: list[tuple[str, list[str]]] = []
    for i, t, x in [("a", 0, "a"), ("o1", 5, "o"), ("o2", 11.5, "o"), ("o3", 12, "o")]:
        rec = ev(i, t, x)
        got.extend((i, ids(c)) for c in engine.feed(rec))
        if i == "o1":
            assert engine.pending() == 1
    assert got == []  # the watermark is 10 s: not past the window yet
    got.extend(("o4", ids(c)) for c in engine.feed(ev("o4", 12.001, "o")))
    assert got == [("o4", ["a", "-"])]
    assert engine.pending() == 0
    assert engine.flush() == []


def test_a_late_missing_event_within_the_lateness_still_counts() -> None:
    engine = SequenceEngine([rule_of(TRAILING)], lateness=3.0)
    out = []
    for i, t, x in [("a", 0, "a"), ("o", 12, "o"), ("b", 9, "b"), ("o2", 20, "o")]:
        out.extend(engine.feed(ev(i, t, x)))
    assert out == []  # b (at 9, arrived when the watermark was 9) rejected the sequence
    assert engine.stats()["missing_rejected"] == 1


def test_a_missing_event_later_than_the_lateness_is_counted_late() -> None:
    engine = SequenceEngine([rule_of(TRAILING)], lateness=1.0)
    out = []
    for i, t, x in [("a", 0, "a"), ("o", 12, "o"), ("b", 9, "b")]:
        out.extend((i, ids(c)) for c in engine.feed(ev(i, t, x)))
    assert out == [("o", ["a", "-"])]  # confirmed at watermark 11; b came too late
    stats = engine.stats()
    assert stats["missing_late"] == 1 and stats["missing_accepted"] == 1


def test_observe_and_advance_move_the_watermark() -> None:
    engine = SequenceEngine([rule_of(TRAILING)], lateness=0.0)
    assert engine.feed(ev("a", 100, "a")) == []
    assert engine.observe({"@timestamp": 105}) == []
    assert engine.observe({"no": "time"}) == []
    (c,) = engine.observe({"@timestamp": "1970-01-01T00:01:50.5Z"})  # 110.5 s
    assert ids(c) == ["a", "-"] and c.keys == ("h1",)
    assert engine.advance(1e9) == []


def test_one_engine_holds_plain_and_missing_event_rules() -> None:
    plain = Rule(
        id="plain",
        name="plain",
        source="elastic",
        condition=Const(False),
        kind="sequence",
        sequence=seq('sequence by h [process where x == "a"] [process where x == "c"]'),
    )
    (engine,) = stateful_engines([plain, rule_of(TRAILING)])
    assert isinstance(engine, SequenceEngine)
    first = engine.feed(ev("a", 0, "a"))
    second = engine.feed(ev("c", 1, "c"))
    assert first == [] and [c.rule.id for c in second] == ["plain"]
    assert [(c.rule.id, ids(c)) for c in engine.flush()] == [("miss-1", ["a", "-"])]


def test_missing_history_is_bounded_in_time() -> None:
    leading = MissingState([0], stages=1, span=10.0)  # ![b] [a]
    for t in range(100):
        leading.seen(0, ("k",), float(t))
    leading.release(100.0)
    assert min(leading.history[("k",)][0]) == 80.0  # older than watermark - 2 * maxspan: gone
    assert leading.stats()["missing_keys"] == 1


def test_trailing_only_rejects_on_arrival_and_keeps_only_the_lateness_window() -> None:
    state = MissingState([1], stages=1, span=10.0)  # [a] ![b]
    state.candidate(("k",), [0.0], "first")
    state.candidate(("k",), [50.0], "second")
    state.seen(0, ("k",), 5.0)  # hits the first (in (0, 10]) at once
    assert state.pending[0][5] is True
    assert state.release(55.0) == []  # the first, rejected; the second waits (deadline 60)
    assert state.stats()["missing_events"] == 0  # pruned back to the watermark
    state.seen(0, ("k",), 58.0)  # hits the second at once
    assert state.flush() == []
    assert state.counters["missing_rejected"] == 2 and state.counters["missing_accepted"] == 0


# --------------------------------------------------------------------------- property


@st.composite
def streams(draw: Any) -> tuple[list[tuple[float, str, str]], list[float]]:
    n = draw(st.integers(1, 14))
    events = [
        (
            float(draw(st.integers(0, 40))),
            draw(st.sampled_from(["h1", "h2"])),
            draw(st.sampled_from(["a", "b", "o"])),
        )
        for _ in range(n)
    ]
    jitter = [float(draw(st.integers(0, 4))) for _ in range(n)]
    return events, jitter


@settings(max_examples=80, deadline=None)
@given(streams())
@example(  # a b seen before a late a, then pruned before that a's decision (a fixed bug)
    (
        [(11.0, "h1", "a"), (0.0, "h1", "a"), (2.0, "h1", "b"), (1.0, "h1", "a")],
        [0.0, 0.0, 0.0, 1.0],
    )
)
def test_trailing_results_match_a_slow_reference_under_bounded_disorder(
    data: tuple[list[tuple[float, str, str]], list[float]],
) -> None:
    """Records arrive up to 4 s out of event-time order and lateness is 4 s: the streaming
    results are exactly the reference's: every a with no b of its key at a time in
    (a, a + maxspan] (maxspan 10 s)."""
    events, jitter = data
    order = sorted(range(len(events)), key=lambda i: (events[i][0] + jitter[i], i))
    records = [ev(str(i), events[i][0], events[i][2], h=events[i][1]) for i in order]
    got = sorted(tuple(c[1]) for c in run(TRAILING, records, lateness=4.0))
    expected = sorted(
        (str(i), "-")
        for i, (t, h, x) in enumerate(events)
        if x == "a" and not any(x2 == "b" and h2 == h and t < t2 <= t + 10 for t2, h2, x2 in events)
    )
    assert got == expected


# --------------------------------------------------------------------------- ruletag match


def alert(i: str, ts: str, host: str) -> dict[str, Any]:
    return {
        "@timestamp": ts,
        "event": {"id": i},
        "host": {"id": host},
        "data_stream": {"dataset": "endpoint.alerts"},
    }


def telemetry(i: str, ts: str, host: str) -> dict[str, Any]:
    return {"@timestamp": ts, "event": {"id": i, "category": ["process"]}, "host": {"id": host}}


def match(tmp_path: Path, events: list[dict[str, Any]], *extra: str) -> list[dict[str, Any]]:
    src = tmp_path / "events.jsonl"
    src.write_text("".join(json.dumps(e) + "\n" for e in events))
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = subprocess.run(
        [str(ruletag_script()), "match", "--events", str(src), "--rules", str(ALERT_RULE), *extra],
        capture_output=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    return [json.loads(line) for line in proc.stdout.decode().splitlines()]


def test_ruletag_match_confirms_on_the_watermark_and_flushes_at_the_end(tmp_path: Path) -> None:
    events = [
        alert("a1", "2026-03-01T10:00:00Z", "h1"),  # followed by telemetry: no detection
        alert("a2", "2026-03-01T10:00:10Z", "h2"),  # silent host: detected
        telemetry("t1", "2026-03-01T10:02:00Z", "h1"),
        {"@timestamp": "2026-03-01T10:05:10Z", "event": {"id": "o1"}},  # watermark 10:05:00
        {"@timestamp": "2026-03-01T10:05:20.5Z", "event": {"id": "o2"}},  # past 10:05:10 + 10 s
        alert("a3", "2026-03-01T10:06:00Z", "h3"),  # pending at the end of input
    ]
    out = match(tmp_path, events, "--lateness", "10")
    assert [r.get("event", {}).get("id") for r in out] == [
        "a1",
        "a2",
        "t1",
        "o1",
        "o2",
        "a3",
        None,
    ]
    annotated = {
        r.get("event", {}).get("id", "end"): r["detections"] for r in out if "detections" in r
    }
    assert set(annotated) == {"o2", "end"}
    (d,) = annotated["o2"]
    assert d["rule_id"] == load_elastic_file(ALERT_RULE)[0].id
    assert d["sequence"] == {
        "keys": ["h2"],
        "events": [{"timestamp": "2026-03-01T10:00:10Z", "id": "a2"}, dict(MISSING_REF)],
    }
    last = out[-1]
    assert last["end_of_input"] is True
    assert [x["sequence"]["keys"] for x in last["detections"]] == [["h3"]]


def test_ruletag_match_without_prefilter_gives_the_same_lines(tmp_path: Path) -> None:
    events = [
        alert("a2", "2026-03-01T10:00:10Z", "h2"),
        {"@timestamp": "2026-03-01T10:05:20.5Z", "event": {"id": "o2"}},
    ]
    fast = match(tmp_path, events, "--lateness", "10")
    slow = match(tmp_path, events, "--lateness", "10", "--no-prefilter")
    assert fast == slow
    assert "detections" in fast[1] and len(fast) == 2


LATE = ("--lateness", "-1")


def test_ruletag_match_refuses_a_negative_lateness(tmp_path: Path) -> None:
    src = tmp_path / "events.jsonl"
    src.write_text("{}\n")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = subprocess.run(
        [str(ruletag_script()), "match", "--events", str(src), "--rules", str(ALERT_RULE), *LATE],
        capture_output=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert b"--lateness" in proc.stderr


# --------------------------------------------------------------------------- corpus


@needs_corpus
def test_active_corpus_sequence_and_sample_rules_load() -> None:
    """Every active EQL sequence and sample rule loads (missing events and samples included),
    or is refused with a precise reason (there is none left today)."""
    kinds: dict[str, int] = {}
    refused: dict[str, int] = {}
    missing = 0
    for path in sorted(corpus("elastic").rglob("*.toml")):
        if "_deprecated" in path.parts:
            continue
        text = path.read_text(encoding="utf-8")
        if not re.search(r"(?m)^\s*(sequence|sample)\b", text) or 'language = "eql"' not in text:
            continue
        try:
            (rule,) = load_elastic_file(path)
        except (InvalidRule, UnsupportedRule) as exc:
            refused[exc.reason] = refused.get(exc.reason, 0) + 1
            continue
        kinds[rule.kind] = kinds.get(rule.kind, 0) + 1
        if rule.sequence is not None and rule.sequence.missing:
            missing += 1
            assert rule.sequence.maxspan is not None
    print(kinds, refused, missing)
    assert refused == {}
    assert kinds["sample"] == 3 and kinds["sequence"] >= 190
    assert missing == 2
    engines = stateful_engines(
        [r for p in sorted(corpus("elastic").rglob("*.toml")) for r in _load(p)]
    )
    assert {e.kind for e in engines} >= {"sequence", "sample"}


def _load(path: Path) -> list[Rule]:
    try:
        return [r for r in load_elastic_file(path) if r.kind in ("sequence", "sample")]
    except (InvalidRule, UnsupportedRule):
        return []


def test_the_engine_default_lateness_is_the_config_default() -> None:
    from ruletag.config.model import DEFAULT_LATENESS as CONFIGURED
    from ruletag.rules.stateful.sequence import DEFAULT_LATENESS

    assert DEFAULT_LATENESS == CONFIGURED
    assert SequenceEngine([rule_of(TRAILING)]).lateness == CONFIGURED


def test_missing_state_snapshot_and_restore() -> None:
    state = MissingState([1], stages=1, span=10.0)
    state.seen(0, ("k",), 3.0)
    state.candidate(("k",), [0.0], ({"id": "a"}, dict(MISSING_REF)))
    state.candidate(("j",), [1.0], ({"id": "b"}, dict(MISSING_REF)))
    data = json.loads(json.dumps(state.snapshot()))
    again = MissingState([1], stages=1, span=10.0)
    again.restore(data)
    assert again.stats()["missing_pending"] == 2 and again.stats()["missing_events"] == 1
    assert again.flush() == [(("j",), ({"id": "b"}, {"missing": True}))]  # k: b at 3 rejects
    other = MissingState([0], stages=1, span=10.0)
    other.restore(data)  # another layout: ignored
    assert other.stats()["missing_pending"] == 0
