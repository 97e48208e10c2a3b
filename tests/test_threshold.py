"""Elastic threshold rules (issue 16): front-end, the streaming counter (``docs/rules.md``
"Thresholds"), bounds, and ``ruletag match``."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from ruletag.errors import InvalidRule, UnsupportedRule
from ruletag.rules.elastic import load_elastic_file
from ruletag.rules.ir import Const, Match, Rule, Threshold
from ruletag.rules.stateful.threshold import ThresholdEngine, ThresholdState, iso_time
from support.paths import SAMPLE, corpus, needs_corpus
from support.servers import ruletag_script

STOP_RULE = SAMPLE / "elastic/rules/windows/impact_stop_process_service_threshold.toml"
ENUM_RULE = SAMPLE / "elastic/rules_building_block/discovery_suspicious_proc_enumeration.toml"

RULE_TEMPLATE = """\
[metadata]
maturity = "production"

[rule]
author = ["A"]
name = "t"
rule_id = "t-1"
severity = "low"
type = "threshold"
language = "{language}"
from = "{from_}"
query = '''
event.action:logon-failed
'''
{threshold}
"""


def write_rule(
    tmp_path: Path,
    threshold: str = '[rule.threshold]\nfield = ["user.name"]\nvalue = 3\n',
    language: str = "kuery",
    from_: str = "now-9m",
) -> Path:
    path = tmp_path / "t.toml"
    path.write_text(RULE_TEMPLATE.format(language=language, from_=from_, threshold=threshold))
    return path


# --------------------------------------------------------------------------- front-end


def test_threshold_rule_loads_with_its_settings(tmp_path: Path) -> None:
    text = (
        '[rule.threshold]\nfield = "host.id"\nvalue = 2\n'
        '[[rule.threshold.cardinality]]\nfield = "user.name"\nvalue = 5\n'
    )
    (rule,) = load_elastic_file(write_rule(tmp_path, text, from_="now-35m"))
    assert rule.kind == "threshold" and rule.condition == Const(False)
    assert rule.threshold == Threshold(
        condition=Match("event.action", ("logon-failed",), cased=True),
        fields=("host.id",),
        value=2,
        cardinality_field="user.name",
        cardinality_value=5,
        window=2100.0,
    )


def test_threshold_without_fields_is_one_group_and_default_look_back(tmp_path: Path) -> None:
    path = write_rule(tmp_path, "[rule.threshold]\nfield = []\nvalue = 30\n", from_="")
    (rule,) = load_elastic_file(path)
    assert rule.threshold is not None
    assert (rule.threshold.fields, rule.threshold.value, rule.threshold.window) == ((), 30, 360.0)


@pytest.mark.parametrize(
    ("threshold", "error", "reason"),
    [
        ("", InvalidRule, "rule.threshold is missing or not a table"),
        ("[rule.threshold]\nfield = []\nvalue = 0\n", InvalidRule, "rule.threshold.value must"),
        ("[rule.threshold]\nfield = [1]\nvalue = 1\n", InvalidRule, "rule.threshold.field must"),
        (
            "[rule.threshold]\nvalue = 1\n[[rule.threshold.cardinality]]\nvalue = 2\n",
            InvalidRule,
            "rule.threshold.cardinality.field is missing",
        ),
        (
            "[rule.threshold]\nvalue = 1\n[[rule.threshold.cardinality]]\nfield = 'a'\nvalue = 2\n"
            "[[rule.threshold.cardinality]]\nfield = 'b'\nvalue = 2\n",
            UnsupportedRule,
            "threshold with more than one cardinality condition",
        ),
    ],
)
def test_bad_threshold_tables(
    tmp_path: Path, threshold: str, error: type[Exception], reason: str
) -> None:
    with pytest.raises(error) as info:
        load_elastic_file(write_rule(tmp_path, threshold))
    assert str(getattr(info.value, "reason", "")).startswith(reason)


def test_lucene_threshold_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedRule) as info:
        load_elastic_file(write_rule(tmp_path, language="lucene"))
    assert info.value.reason == "query language lucene is not supported"


# --------------------------------------------------------------------------- the counter

T0 = 1_700_000_000.0


def th_rule(
    value: int = 3,
    fields: tuple[str, ...] = ("user",),
    window: float = 60.0,
    card: tuple[str, int] | None = None,
) -> Rule:
    th = Threshold(
        condition=Match("action", ("fail",)),
        fields=fields,
        value=value,
        cardinality_field=card[0] if card else None,
        cardinality_value=card[1] if card else 0,
        window=window,
    )
    return Rule(
        id="r", name="r", source="elastic", condition=Const(False), kind="threshold", threshold=th
    )


def ev(n: int, t: float | None, user: Any = "u1", action: str = "fail", **kw: Any) -> dict:
    rec: dict[str, Any] = {"id": n, "action": action, "user": user, **kw}
    if t is not None:
        rec["@timestamp"] = iso_time(T0 + t)
    return rec


def run(rule: Rule, records: Iterable[dict[str, Any]], **kw: Any) -> list[tuple[int, Any]]:
    """(record id, alert summary) for every alert, in order."""
    engine = ThresholdEngine([rule], **kw)
    out = []
    for rec in records:
        for a in engine.feed(rec):
            summary = (dict(a.terms), a.count, a.cardinality, a.end - T0)
            out.append((rec["id"], summary))
    return out


def test_fires_on_the_nth_record_in_the_window_not_before() -> None:
    rule = th_rule(value=3)
    assert run(rule, [ev(1, 0), ev(2, 10)]) == []
    got = run(rule, [ev(1, 0), ev(2, 10), ev(3, 20), ev(4, 30)])
    assert got == [(3, ({"user": "u1"}, 3, None, 20.0))]


def test_records_not_matching_the_base_condition_do_not_count() -> None:
    rule = th_rule(value=2)
    assert run(rule, [ev(1, 0), ev(2, 1, action="ok"), ev(3, 2)]) == [
        (3, ({"user": "u1"}, 2, None, 2.0))
    ]


def test_window_boundary_is_inclusive() -> None:
    rule = th_rule(value=2, window=60)
    # 60 s apart: both in [t - 60, t]
    assert run(rule, [ev(1, 0), ev(2, 60)]) == [(2, ({"user": "u1"}, 2, None, 60.0))]
    # 60.001 s apart: the first has left the window
    assert run(rule, [ev(1, 0), ev(2, 60.001)]) == []


def test_groups_count_independently() -> None:
    rule = th_rule(value=2)
    recs = [ev(1, 0, "a"), ev(2, 1, "b"), ev(3, 2, "c"), ev(4, 3, "b"), ev(5, 4, "a")]
    assert run(rule, recs) == [
        (4, ({"user": "b"}, 2, None, 3.0)),
        (5, ({"user": "a"}, 2, None, 4.0)),
    ]


def test_multi_valued_group_field_counts_in_each_group_missing_in_none() -> None:
    rule = th_rule(value=2)
    recs = [ev(1, 0, ["a", "b"]), ev(2, 1, None), ev(3, 2, "b"), ev(4, 3, "a")]
    assert run(rule, recs) == [
        (3, ({"user": "b"}, 2, None, 2.0)),
        (4, ({"user": "a"}, 2, None, 3.0)),
    ]


def test_no_group_fields_is_one_group() -> None:
    rule = th_rule(value=3, fields=())
    recs = [ev(1, 0, "a"), ev(2, 1, "b"), ev(3, 2, None)]
    assert run(rule, recs) == [(3, ({}, 3, None, 2.0))]


def test_cardinality_needs_the_distinct_count_too() -> None:
    rule = th_rule(value=1, card=("port", 3))
    recs = [
        ev(1, 0, port=22),
        ev(2, 1, port=22),
        ev(3, 2, port=80),
        ev(4, 3),  # no port: counted, adds no distinct value
        ev(5, 4, port=[80, 443]),  # multi-valued: each value is distinct
    ]
    assert run(rule, recs) == [(5, ({"user": "u1"}, 5, ("port", 3), 4.0))]


def test_cardinality_counts_only_values_inside_the_window() -> None:
    rule = th_rule(value=1, card=("port", 2), window=10)
    assert run(rule, [ev(1, 0, port=1), ev(2, 11, port=2)]) == []
    assert run(rule, [ev(1, 0, port=1), ev(2, 10, port=2)]) == [
        (2, ({"user": "u1"}, 2, ("port", 2), 10.0))
    ]


def test_suppressed_for_a_window_then_fires_again() -> None:
    rule = th_rule(value=2, window=60)
    recs = [
        ev(1, 0),
        ev(2, 10),  # fires: window ends at 10
        ev(3, 20),
        ev(4, 30),  # 2 new records, but within 60 s of the alert: suppressed
        ev(5, 70),  # 60 s after the alert: still suppressed (refire needs > window)
        ev(6, 70.5),  # > 60 s after the alert, 4 records since it in [10.5, 70.5]
        ev(7, 71),  # suppressed again
    ]
    assert run(rule, recs) == [
        (2, ({"user": "u1"}, 2, None, 10.0)),
        (6, ({"user": "u1"}, 4, None, 70.5)),
    ]


def test_records_at_or_before_an_alert_never_count_again() -> None:
    rule = th_rule(value=2, window=60)
    recs = [ev(1, 0), ev(2, 10), ev(3, 10), ev(4, 5), ev(5, 80), ev(6, 81)]
    engine = ThresholdEngine([rule])
    fired = [r["id"] for r in recs for _ in engine.feed(r)]
    assert fired == [2, 6]  # 3 and 4 are at/before the alert at 10: late, ignored
    assert engine.stats()["late_records"] == 2


def test_records_without_a_timestamp_are_not_counted() -> None:
    rule = th_rule(value=2)
    engine = ThresholdEngine([rule])
    assert [a for r in (ev(1, 0), ev(2, None), ev(3, None)) for a in engine.feed(r)] == []
    assert engine.stats()["no_timestamp"] == 2
    (alert,) = engine.feed(ev(4, 1))
    assert alert.count == 2  # records 1 and 4: the untimed ones were not counted


def test_late_record_inside_the_window_counts_older_than_it_does_not() -> None:
    rule = th_rule(value=3, window=60)
    assert run(rule, [ev(1, 100), ev(2, 50), ev(3, 101)]) == [(3, ({"user": "u1"}, 3, None, 101.0))]
    engine = ThresholdEngine([rule])
    for r in (ev(1, 100), ev(2, 39), ev(3, 101)):
        assert engine.feed(r) == []
    assert engine.stats()["late_records"] == 1


def test_group_cap_evicts_the_least_recently_used_group() -> None:
    rule = th_rule(value=2)
    recs = [ev(1, 0, "a"), ev(2, 1, "b"), ev(3, 2, "c"), ev(4, 3, "a"), ev(5, 4, "c")]
    engine = ThresholdEngine([rule], max_groups=2)
    fired = [(r["id"], dict(a.terms)) for r in recs for a in engine.feed(r)]
    assert fired == [(5, {"user": "c"})]  # "a" was evicted when "c" arrived
    stats = engine.stats()
    assert stats["evicted_groups"] == 2 and stats["groups"] == 2


def test_event_cap_never_goes_below_the_rule_counts() -> None:
    rule = th_rule(value=5)
    assert rule.threshold is not None
    state = ThresholdState(rule.threshold, max_events=2)
    assert state.max_events == 5
    assert run(rule, [ev(i, i) for i in range(1, 6)], max_events=2) == [
        (5, ({"user": "u1"}, 5, None, 5.0))
    ]
    card = th_rule(value=1, card=("port", 3))
    assert run(card, [ev(i, i, port=i % 2) for i in range(1, 40)], max_events=2) == []
    assert run(card, [ev(i, i, port=i) for i in range(1, 4)], max_events=2) == [
        (3, ({"user": "u1"}, 3, ("port", 3), 3.0))
    ]


def test_idle_groups_expire() -> None:
    rule = th_rule(value=10, window=60)
    engine = ThresholdEngine([rule])
    for r in (ev(1, 0, "a"), ev(2, 1, "b"), ev(3, 200, "c")):
        engine.feed(r)
    stats = engine.stats()
    assert (stats["groups"], stats["events"], stats["expired_groups"]) == (1, 1, 2)


def test_rules_sharing_a_base_condition_count_separately() -> None:
    r2 = dataclasses.replace(th_rule(value=2), id="r2")
    r3 = dataclasses.replace(th_rule(value=3), id="r3")
    engine = ThresholdEngine([r2, r3])
    assert len(engine.table.rules) == 1
    fired = [(r["id"], a.rule.id) for r in (ev(1, 0), ev(2, 1), ev(3, 2)) for a in engine.feed(r)]
    assert fired == [(2, "r2"), (3, "r3")]


# --------------------------------------------------------------------------- ruletag match


def stop_event(n: int, second: int, host: str) -> dict[str, Any]:
    return {
        "@timestamp": f"2026-03-01T10:00:{second:02d}.000Z",
        "event": {"id": f"e{n}", "category": "process", "type": "start"},
        "host": {"id": host, "os": {"type": "windows"}},
        "process": {"name": "taskkill.exe", "args": ["/F", "/IM", f"p{n}.exe"]},
    }


def test_ruletag_match_annotates_the_record_reaching_the_threshold(tmp_path: Path) -> None:
    (rule,) = load_elastic_file(STOP_RULE)
    assert rule.threshold is not None
    assert (rule.threshold.fields, rule.threshold.value, rule.threshold.window) == (
        ("host.id",),
        10,
        540.0,
    )
    events = [stop_event(n, n, "h1" if n % 4 else "h2") for n in range(1, 16)]
    src = tmp_path / "events.jsonl"
    src.write_text("".join(json.dumps(e) + "\n" for e in events))
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = subprocess.run(
        [str(ruletag_script()), "match", "--events", str(src), "--rules", str(STOP_RULE)],
        capture_output=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    out = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert [r["event"]["id"] for r in out] == [f"e{n}" for n in range(1, 16)]
    annotated = [r for r in out if "detections" in r]
    # h1 holds 1, 2, 3, 5, 6, 7, 9, 10, 11, 13: the 10th is e13
    assert [r["event"]["id"] for r in annotated] == ["e13"]
    (d,) = annotated[0]["detections"]
    assert d["rule_id"] == rule.id
    assert d["threshold"] == {
        "terms": [{"field": "host.id", "value": "h1"}],
        "count": 10,
        "window": {"start": "2026-03-01T09:51:13.000Z", "end": "2026-03-01T10:00:13.000Z"},
    }


def test_sample_cardinality_rule_loads() -> None:
    (rule,) = load_elastic_file(ENUM_RULE)
    assert rule.threshold is not None
    th = rule.threshold
    assert th.fields == ("host.id", "process.pid", "process.name")
    assert (th.value, th.cardinality_field, th.cardinality_value) == (1, "file.path", 100)
    assert th.window == 119 * 60.0


# --------------------------------------------------------------------------- whole corpus


@needs_corpus
def test_active_corpus_threshold_rules_all_load() -> None:
    loaded = 0
    for path in sorted(corpus("elastic").rglob("*.toml")):
        text = path.read_text(encoding="utf-8")
        if "_deprecated" in path.parts or not re.search(r'(?m)^type = "threshold"', text):
            continue
        (rule,) = load_elastic_file(path)
        assert rule.kind == "threshold" and rule.threshold is not None
        loaded += 1
    assert loaded == 28
