"""Aggregating ES|QL rules (issue 16): ``STATS ... BY ... | WHERE ...`` parsed into
``ir.Aggregation`` (``rules/esql_stats.py``), refused constructs with their reasons, the
streaming engine (``rules/stateful/aggregation.py``), ``ruletag match`` and the corpus."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ruletag.enrich.annotate import stateful_detection
from ruletag.errors import InvalidRule, UnsupportedRule
from ruletag.protocol import iter_entries
from ruletag.rules import functions
from ruletag.rules.algebra import as_text, number_of
from ruletag.rules.elastic import load_elastic_file
from ruletag.rules.esql_stats import fires_early, parse_esql_aggregation
from ruletag.rules.ir import (
    Aggregate,
    Aggregation,
    And,
    Call,
    Case,
    Compare,
    Const,
    FieldValue,
    Literal_,
    Match,
    Rule,
)
from ruletag.rules.stateful import stateful_engines
from ruletag.rules.stateful.aggregation import (
    AggregateAlert,
    AggregationEngine,
    aggregate,
    step_condition,
)
from support.paths import SAMPLE, corpus, needs_corpus
from support.servers import ruletag_script

GKE_RULE = (
    SAMPLE / "elastic/rules/integrations/gcp/discovery_gcp_gke_api_request_failure_burst.toml"
)


#: the source and a base condition every test record meets (a STATS over every record is refused)
W = 'from l | where @timestamp >= "2000-01-01"'


def agg(query: str) -> Aggregation:
    got = parse_esql_aggregation(query)
    assert got is not None
    return got


def rule(query: str, window: float = 60.0, rid: str = "r1") -> Rule:
    return Rule(
        id=rid,
        name=rid,
        source="elastic",
        condition=Const(False),
        kind="aggregation",
        aggregation=dataclasses.replace(agg(query), window=window),
    )


def ts(second: float) -> str:
    minute, sec = divmod(second, 60)
    return f"2026-03-01T10:{int(minute):02d}:{sec:06.3f}Z"


def ev(second: float, **fields: Any) -> dict[str, Any]:
    return {"@timestamp": ts(second), "event": {"action": "fail"}, **fields}


def feed(engine: AggregationEngine, records: list[dict[str, Any]]) -> list[tuple[int, Any]]:
    """(record index, alert) of every alert, in order."""
    return [(i, a) for i, r in enumerate(records) for a in engine.feed(r)]


# --------------------------------------------------------------------------- parsing


def test_query_without_stats_is_not_an_aggregation() -> None:
    assert parse_esql_aggregation('from l | where a == "x"') is None


def test_stats_by_where_parses_into_an_aggregation() -> None:
    got = agg(
        'from logs-* | where event.action == "fail" | eval u = to_lower(user.name)\n'
        "| stats n = count(*), hosts = count_distinct(host.name), seen = values(u),\n"
        "    first = min(@timestamp) by u, source.ip\n"
        "| where n >= 3 | keep n, u"
    )
    assert got.condition == Match("event.action", ("fail",), cased=True)
    lower = Call("to_lower", (FieldValue("user.name"),))
    assert got.keys == (("u", lower), ("source.ip", FieldValue("source.ip")))
    assert got.aggregates == (
        Aggregate("n", "count", None),
        Aggregate("hosts", "count_distinct", FieldValue("host.name")),
        Aggregate("seen", "values", lower),
        Aggregate("first", "min", FieldValue("@timestamp")),
    )
    assert got.having == Compare("n", ">=", 3)
    assert (got.omitted, got.window, got.timestamp_field) == ((), 360.0, "@timestamp")


def test_unnamed_columns_are_named_by_their_text() -> None:
    got = agg(f"{W} | stats count(*), max(x) by host.name | where `count(*)` > 2")
    assert [a.name for a in got.aggregates] == ["count(*)", "max(x)"]
    assert got.keys == (("host.name", FieldValue("host.name")),)
    assert got.having == Compare("count(*)", ">", 2)


def test_a_stats_without_by_is_one_group() -> None:
    got = agg(f"{W} | stats n = count()")
    assert got.keys == () and got.aggregates == (Aggregate("n", "count", None),)
    assert got.having == Const(True)


def test_time_span_literals_and_date_trunc_keys() -> None:
    got = agg(f"{W} | eval t = date_trunc(5 minutes, @timestamp) | stats n = count(*) by t")
    assert got.keys == (
        ("t", Call("date_trunc", (Literal_("5 minutes"), FieldValue("@timestamp")))),
    )


def test_case_values_and_aggregates_inside_expressions() -> None:
    got = agg(
        f'{W} | eval cloud = data_stream.dataset == "aws"\n'
        "| stats hits = sum(case(cloud, 1, 0)), ratio = sum(x) / count(*)\n"
        "| where ratio > 0.5 and hits > 0"
    )
    cond = Match("data_stream.dataset", ("aws",), cased=True)
    assert got.aggregates == (
        Aggregate("hits", "sum", Case(((cond, Literal_(1)),), Literal_(0))),
        Aggregate("ratio", "sum", FieldValue("x")),
        Aggregate("ratio#2", "count", None),
    )
    assert "ratio#2" in repr(got.having) and "divide" in repr(got.having)


def test_unevaluated_aggregate_is_omitted_unless_a_condition_reads_it() -> None:
    got = agg(f'{W} | stats n = count(*), s = values(mv_concat(a, ",")) | where n > 1')
    assert got.omitted == ("s",)
    assert [a.name for a in got.aggregates] == ["n"]
    got = agg(f'{W} | stats n = count(*), t = top(a, 3, "desc") | where n > 1')
    assert got.omitted == ("t",) and [a.name for a in got.aggregates] == ["n"]
    with pytest.raises(UnsupportedRule, match=r"ES\|QL function MV_CONCAT is not supported"):
        parse_esql_aggregation(f'{W} | stats s = values(mv_concat(a, ",")) | where s == "x"')


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        (
            f"{W} | stats n = count(*) by a | stats m = count(*)",
            "ES|QL STATS after STATS (aggregating aggregated rows) is not supported",
        ),
        (
            f"{W} | inline stats n = count(*) by a | stats m = max(n)",
            "ES|QL INLINE STATS aggregates over many events (stateful)",
        ),
        (
            f"{W} | lookup join t on a | stats n = count(*)",
            "ES|QL LOOKUP JOIN reads another index",
        ),
        (
            f"{W} | enrich p on a | stats n = count(*)",
            "ES|QL ENRICH reads an enrich index",
        ),
        (
            f"{W} | eval b = to_lower(a) | mv_expand a | stats n = count(*) by b",
            "ES|QL MV_EXPAND of a column an earlier EVAL computes or reads is not supported",
        ),
        (
            "from logs-x | stats n = count(*) by user.name | where n > 9",
            "ES|QL STATS over every record (no WHERE before STATS): the FROM index pattern",
        ),
        (
            'from logs-x | where not kql("tags : a") | stats n = count(*) by user.name',
            "ES|QL STATS over nearly every record (the WHERE before STATS tests no field value",
        ),
        (
            "from logs-x | where g is null and user.id is not null | stats n = count(*) by user.id",
            "ES|QL STATS over nearly every record (the WHERE before STATS tests no field value",
        ),
        (
            f"{W} | mv_expand _ignored | stats n = count(*)",
            "ES|QL MV_EXPAND _ignored: index-time metadata",
        ),
        (
            f'{W} | stats t = top(a, 3, "desc") | where t == "x"',
            "ES|QL STATS aggregate function TOP",
        ),
        (
            f"{W} | stats m = median(a) | where m > 1",
            "ES|QL STATS aggregate function MEDIAN",
        ),
        (
            f"{W} | stats n = count(*) | completion r = p",
            "ES|QL COMPLETION is not supported",
        ),
        (
            "from l | where @timestamp > now() | stats n = count(*)",
            "ES|QL NOW() on single events",
        ),
        (
            f"{W} | stats x = a",
            "ES|QL STATS column x holds no aggregate function",
        ),
        (
            f"{W} | stats n = count(*) | where mv_count(n) > 1",
            "ES|QL function MV_COUNT",
        ),
    ],
)
def test_refused_constructs_name_their_reason(query: str, reason: str) -> None:
    with pytest.raises(UnsupportedRule) as exc:
        parse_esql_aggregation(query)
    assert exc.value.reason.startswith(reason), exc.value.reason


def test_an_aggregate_of_an_aggregate_is_invalid() -> None:
    with pytest.raises(InvalidRule, match="MAX of an aggregate function"):
        parse_esql_aggregation(f"{W} | stats n = max(count(*))")


def test_columns_removed_before_stats_cannot_be_aggregated() -> None:
    with pytest.raises(InvalidRule, match="unknown column"):
        parse_esql_aggregation(f"{W} | keep a | stats n = count_distinct(b)")


def test_after_stats_only_keys_and_aggregates_are_columns() -> None:
    with pytest.raises(InvalidRule, match=r"unknown column \[host.name\]"):
        parse_esql_aggregation(f'{W} | stats n = count(*) by a | where host.name == "x"')


def test_rule_file_sets_window_and_kind(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text(
        '[metadata]\nmaturity = "production"\n\n[rule]\nauthor = ["A"]\nname = "t"\n'
        'rule_id = "t-1"\nseverity = "low"\ntype = "esql"\nlanguage = "esql"\n'
        'from = "now-15m"\ntimestamp_field = "event.created"\nquery = \'\'\'\n'
        'from logs-* | where user.name like "a*" | stats n = count(*) by user.name\n'
        "| where n >= 2\n'''\n"
    )
    (r,) = load_elastic_file(path)
    assert (r.kind, r.condition) == ("aggregation", Const(False))
    assert r.aggregation is not None
    assert (r.aggregation.window, r.aggregation.timestamp_field) == (900.0, "event.created")


def test_sample_corpus_rule_loads() -> None:
    (r,) = load_elastic_file(GKE_RULE)
    assert r.kind == "aggregation" and r.aggregation is not None
    a = r.aggregation
    assert a.window == 660.0
    assert [k for k, _ in a.keys] == [
        "user.email",
        "source.ip",
        "user_agent.original",
        "data_stream.namespace",
        "Esql.time_interval",
    ]
    assert a.having == Compare("Esql.failures_count", ">=", 10)


def test_mv_expand_splits_the_conditions_after_it() -> None:
    got = agg(
        'from l | where host.os.type == "linux" | mv_expand event.action\n'
        '| where event.action == "exec" and process.name == "sh" | stats n = count(*)'
    )
    assert got.expand == ("event.action",)
    assert got.condition == And(
        (
            Match("host.os.type", ("linux",), cased=True),
            Match("process.name", ("sh",), cased=True),
        )
    )
    assert got.row_condition == Match("event.action", ("exec",), cased=True)


def test_step_condition_adds_an_existential_row_condition_only() -> None:
    """The pre-filter sees the MV_EXPAND row condition when it is existential (a row passes
    only if the record does): a linux sh record without event.action is not fed; a negated
    row condition (a row may pass where the record fails) is left to the rows."""
    positive = rule(
        'from l | where host.os.type == "linux" | mv_expand event.action\n'
        '| where event.action == "exec" | stats n = count(*) by host.id | where n >= 1'
    )
    assert positive.aggregation is not None
    assert step_condition(positive.aggregation) == And(
        (
            Match("host.os.type", ("linux",), cased=True),
            Match("event.action", ("exec",), cased=True),
        )
    )
    engine = AggregationEngine([positive])
    records = [
        {"@timestamp": ts(0), "host": {"os": {"type": "linux"}, "id": "h"}},
        {
            "@timestamp": ts(1),
            "host": {"os": {"type": "linux"}, "id": "h"},
            "event": {"action": ["open", "exec"]},
        },
    ]
    entries = b"".join(msgpack.packb([0, r]) for r in records)
    assert engine.step_hits(entries, list(iter_entries(entries))) == {1: [0]}
    negative = rule(
        f'{W} | mv_expand event.action | where event.action != "noise" | stats n = count(*)'
    )
    assert negative.aggregation is not None
    assert step_condition(negative.aggregation) == negative.aggregation.condition


def test_aggregate_filters_parse() -> None:
    got = agg(f'{W} | stats n = count(*) where a == "x", m = count_distinct(b) by c')
    assert got.aggregates == (
        Aggregate("n", "count", None, Match("a", ("x",), cased=True)),
        Aggregate("m", "count_distinct", FieldValue("b")),
    )


@pytest.mark.parametrize(
    ("where", "early"),
    [
        ("n >= 3", False),
        ("n >= 3 and (d > 1 or hi > 10)", False),
        ("lo < 0", False),
        ("true", False),
        ('n >= 3 and k != "x"', False),
        ("n < 3", True),
        ("d == 1", True),
        ("n >= 3 and lo > 1", True),
        ('date_diff("minute", lo, now()) <= 10', True),
        ("not n >= 3", True),
        ("s > 10", True),  # a sum may shrink with negative numbers
    ],
)
def test_fires_early_flags_conditions_a_later_row_may_undo(where: str, early: bool) -> None:
    got = agg(
        f"{W} | stats n = count(*), d = count_distinct(x), hi = max(x), lo = min(x),"
        f" s = sum(x) by k | where {where}"
    )
    assert fires_early(got) is early


# --------------------------------------------------------------------------- functions


def test_date_functions() -> None:
    assert functions.call("date_trunc", ["5 minutes", "2026-03-01T10:07:31.250Z"]) == (
        "2026-03-01T10:05:00.000Z"
    )
    assert functions.call("date_trunc", ["1 hour", 1772359651000]) == "2026-03-01T10:00:00.000Z"
    assert functions.call("date_trunc", ["1 week", "2026-03-05T10:00:00Z"]) == (
        "2026-03-02T00:00:00.000Z"  # a Monday
    )
    assert functions.call("date_trunc", ["1 month", "2026-03-05T10:00:00Z"]) == (
        "2026-03-01T00:00:00.000Z"
    )
    assert functions.call("date_trunc", ["5 fortnights", "2026-03-05T10:00:00Z"]) is None
    a, b = "2026-03-01T10:00:00.000Z", "2026-03-01T10:07:59.000Z"
    assert functions.call("date_diff", ["minute", a, b]) == 7
    assert functions.call("date_diff", ["seconds", b, a]) == -479
    assert (
        functions.call("date_diff", ["month", "2026-01-31T00:00:00Z", "2026-03-30T00:00:00Z"]) == 1
    )
    assert functions.call("date_diff", ["minute", a, None]) is None
    assert functions.call("date_add", [b, "9 minutes", -1]) == "2026-03-01T09:58:59.000Z"
    assert functions.call("date_add", ["2026-01-31T00:00:00Z", "1 month"]) == (
        "2026-02-28T00:00:00.000Z"
    )
    assert functions.call("date_add", [None, "1 hour"]) is None
    assert functions.call("to_ip", [" 10.0.0.1"]) == "10.0.0.1"
    assert functions.call("to_ip", ["no"]) is None


# --------------------------------------------------------------------------- engine

COUNT_RULE = (
    'from l | where event.action == "fail" | stats n = count(*) by user.name | where n >= 3'
)


def test_count_fires_once_on_the_record_reaching_it_then_suppresses() -> None:
    engine = AggregationEngine([rule(COUNT_RULE, window=60)])
    records = [ev(s, user={"name": "a"}) for s in (0, 10, 20, 30, 40, 50, 90)]
    records.insert(1, ev(5, user={"name": "b"}))
    records.insert(2, {"@timestamp": ts(6), "event": {"action": "ok"}, "user": {"name": "a"}})
    fired = feed(engine, records)
    # 0, 10, 20 reach 3 (record 4); 30, 40, 50 are suppressed (less than a window after the
    # alert) but stay counted; 90 is 70 s after the alert: 30, 40, 50, 90 fire again
    assert [(i, a.keys, a.values, a.count) for i, a in fired] == [
        (4, (("user.name", "a"),), (("n", 3),), 3),
        (8, (("user.name", "a"),), (("n", 4),), 4),
    ]
    alert = fired[0][1]
    assert (alert.start, alert.end) == (alert.end - 60, alert.end)
    assert stateful_detection(alert)["aggregation"]["window"] == {
        "start": "2026-03-01T09:59:20.000Z",
        "end": "2026-03-01T10:00:20.000Z",
    }
    assert engine.stats()["fired"] == 2


def test_refires_in_the_next_window() -> None:
    engine = AggregationEngine([rule(COUNT_RULE, window=60)])
    seconds = [0, 10, 20, 30, 40, 50, 81, 82, 83]
    fired = feed(engine, [ev(s, user={"name": "a"}) for s in seconds])
    # fires at 20 (3 records), suppressed until the watermark passes 80; records after the
    # alert (30, 40, 50) stay counted and 81 brings the group past 3 again
    assert [i for i, _ in fired] == [2, 6]
    assert fired[1][1].count == 4 and fired[1][1].values == (("n", 4),)


def test_window_expiry_drops_old_records() -> None:
    engine = AggregationEngine([rule(COUNT_RULE, window=60)])
    fired = feed(engine, [ev(s, user={"name": "a"}) for s in (0, 30, 61, 95, 100)])
    # at 61 the window is [1, 61] (30, 61), at 95 [35, 95] (61, 95), at 100 [40, 100]:
    # 61, 95, 100
    assert [i for i, _ in fired] == [4]
    assert fired[0][1].count == 3


def test_late_records_are_ignored() -> None:
    engine = AggregationEngine([rule(COUNT_RULE, window=60)])
    fired = feed(engine, [ev(s, user={"name": "a"}) for s in (100, 101, 30, 102)])
    assert [i for i, _ in fired] == [3]
    assert engine.stats()["late_records"] == 1


def test_every_aggregate_function_exactly() -> None:
    q = (
        f"{W} | stats c = count(x), d = count_distinct(x), v = values(x), lo = min(x),"
        " hi = max(x), s = sum(x), a = avg(x), t0 = min(@timestamp), rows = count(*)"
        " | where rows >= 4"
    )
    engine = AggregationEngine([rule(q)])
    records = [ev(0, x=5), ev(1, x=[1, 5]), ev(2), ev(3, x="2.5")]
    fired = feed(engine, records)
    assert len(fired) == 1
    values = dict(fired[0][1].values)
    assert values == {
        "c": 4,
        "d": 3,
        "v": [5, 1, "2.5"],
        "lo": 1,  # mixed number/text: by text
        "hi": 5,
        "s": 13.5,
        "a": 3.375,
        "t0": ts(0),
        "rows": 4,
    }


@pytest.mark.parametrize(
    ("stats", "where", "quiet", "fires"),
    [
        ("count_distinct(x)", ">= 2", [{"x": "a"}, {"x": "a"}, {"y": "b"}], [{"x": "b"}]),
        ("count(x)", ">= 2", [{"x": 1}, {"y": 1}], [{"x": 1}]),
        ("sum(x)", "> 10", [{"x": 4}, {"x": 6}], [{"x": 1}]),
        ("avg(x)", ">= 5", [{"x": 1}, {"x": 5}], [{"x": 12}]),
        ("max(x)", "> 100", [{"x": 99}, {"x": 100}], [{"x": 101}]),
        ("min(x)", "< 0", [{"x": 1}, {"x": 0}], [{"x": -3}]),
        ("values(x)", '== "c"', [{"x": "a"}, {"x": "b"}], [{"x": "c"}]),
    ],
)
def test_fire_and_quiet_per_aggregate(
    stats: str, where: str, quiet: list[dict[str, Any]], fires: list[dict[str, Any]]
) -> None:
    engine = AggregationEngine([rule(f"{W} | stats m = {stats} | where m {where}")])
    records = [ev(i, **f) for i, f in enumerate(quiet + fires)]
    assert [i for i, _ in feed(engine, records)] == [len(quiet)]


def test_mv_expand_counts_rows_and_tests_each_row() -> None:
    q = (
        f'{W} | mv_expand event.action | where event.action != "noise"\n'
        "| stats n = count(*), acts = values(event.action) by user.name | where n >= 3"
    )
    engine = AggregationEngine([rule(q)])
    records = [
        {"@timestamp": ts(0), "event": {"action": ["a", "noise", "b"]}, "user": {"name": "u"}},
        {"@timestamp": ts(1), "event": {"action": ["noise"]}, "user": {"name": "u"}},
        {"@timestamp": ts(2), "event": {"action": "c"}, "user": {"name": "u"}},
    ]
    fired = feed(engine, records)
    # rows a, b (record 0) and c (record 2); "noise" rows fail the row condition
    assert [(i, dict(a.values), a.count) for i, a in fired] == [
        (2, {"n": 3, "acts": ["a", "b", "c"]}, 3)
    ]


def test_aggregate_filters_count_only_their_rows() -> None:
    q = (
        f"{W} | stats total = count(*), bad = count(*) where code >= 500,"
        " bad_paths = count_distinct(path) where code >= 500 | where bad >= 2"
    )
    engine = AggregationEngine([rule(q)])
    records = [ev(0, code=200, path="/a"), ev(1, code=503, path="/b"), ev(2, code=404)]
    records.append(ev(3, code=500, path="/b"))
    fired = feed(engine, records)
    assert [(i, dict(a.values)) for i, a in fired] == [(3, {"total": 4, "bad": 2, "bad_paths": 1})]


def test_multi_valued_key_is_every_group_and_null_key_is_a_group() -> None:
    engine = AggregationEngine([rule(f"{W} | stats n = count(*) by k | where n >= 2")])
    fired = feed(engine, [ev(0, k=["a", "b"]), ev(1, k="b"), ev(2), ev(3, k=None), ev(4, k="a")])
    assert [(i, a.keys) for i, a in fired] == [
        (1, (("k", "b"),)),
        (3, (("k", None),)),
        (4, (("k", "a"),)),
    ]


def test_case_values_and_date_diff_with_now() -> None:
    q = (
        f'{W} | eval cloud = src == "aws" | stats aws = sum(case(cloud, 1, 0)),'
        " first = min(@timestamp) by id"
        ' | where aws > 0 and date_diff("seconds", first, now()) >= 30'
    )
    engine = AggregationEngine([rule(q, window=120)])
    records = [ev(0, id=1, src="aws"), ev(20, id=1, src="gcp"), ev(31, id=1, src="gcp")]
    records.insert(0, ev(0, id=2, src="gcp"))
    records.append(ev(40, id=2, src="gcp"))
    fired = feed(engine, records)
    assert [(i, a.keys, dict(a.values)) for i, a in fired] == [
        (3, (("id", 1),), {"aws": 1, "first": ts(0)})
    ]


def test_dates_compare_as_instants_with_now_minus_a_span() -> None:
    # "seen twice, first within the last 9 minutes": NOW() is the aggregating record's time
    q = (
        f"{W} | stats n = count(*), first = min(@timestamp) by k"
        " | where n >= 2 and first >= now() - 9 minutes"
    )
    got = agg(q)
    assert "date_add" in repr(got.having) and "date_diff" in repr(got.having)
    engine = AggregationEngine([rule(q, window=3600)])
    records = [ev(0, k="a"), ev(600, k="b"), ev(601, k="a"), ev(602, k="b")]
    fired = feed(engine, records)
    # a: first seen 601 s before its second record (> 540 s): quiet; b: 2 s apart: fires
    assert [(i, a.keys, dict(a.values)) for i, a in fired] == [
        (3, (("k", "b"),), {"n": 2, "first": ts(600)})
    ]


def test_records_not_matching_the_condition_do_not_count() -> None:
    engine = AggregationEngine([rule(COUNT_RULE)])
    other = [
        {"@timestamp": ts(s), "event": {"action": "ok"}, "user": {"name": "a"}} for s in (0, 1)
    ]
    assert feed(engine, [*other, ev(2, user={"name": "a"})]) == []
    assert engine.stats()["events"] == 1


def test_records_without_timestamp_are_counted_apart() -> None:
    engine = AggregationEngine([rule(COUNT_RULE)])
    assert feed(engine, [{"event": {"action": "fail"}, "user": {"name": "a"}}]) == []
    assert engine.stats()["no_timestamp"] == 1


def test_group_cap_evicts_least_recently_used() -> None:
    r = rule(COUNT_RULE)
    engine = AggregationEngine([r], max_groups=2)
    feed(engine, [ev(i, user={"name": n}) for i, n in enumerate("abcab")])
    st = engine.stats()
    assert (st["groups"], st["evicted_groups"]) == (2, 3)


def test_snapshot_and_restore_resume_the_counts() -> None:
    r = rule(COUNT_RULE, window=60)
    first = AggregationEngine([r])
    feed(first, [ev(0, user={"name": "a"}), ev(10, user={"name": "a"})])
    data = json.loads(json.dumps(first.snapshot()))
    second = AggregationEngine([r])
    second.restore(data)
    assert second.stats() == first.stats()
    fired = feed(second, [ev(20, user={"name": "a"})])
    assert [a.count for _, a in fired] == [3]
    with pytest.raises(ValueError, match="version"):
        second.restore({"version": 99})


def test_engine_is_built_by_stateful_engines_and_annotates() -> None:
    r = rule(COUNT_RULE, window=60)
    (engine,) = stateful_engines([r])
    assert isinstance(engine, AggregationEngine) and engine.kind == "aggregation"
    alerts = [a for s in (0, 1, 2) for a in engine.feed(ev(s, user={"name": "a"}))]
    assert len(alerts) == 1 and isinstance(alerts[0], AggregateAlert)
    d = stateful_detection(alerts[0])
    assert d["rule_id"] == "r1"
    assert d["aggregation"] == {
        "keys": [{"field": "user.name", "value": "a"}],
        "values": {"n": 3},
        "count": 3,
        "window": {"start": "2026-03-01T09:59:02.000Z", "end": "2026-03-01T10:00:02.000Z"},
    }


# --------------------------------------------------------------------------- ruletag match


def gke_event(n: int, second: int, user: str) -> dict[str, Any]:
    return {
        "@timestamp": ts(second),
        "event": {"id": f"e{n}", "outcome": "failure", "type": "denied", "action": "get"},
        "data_stream": {"dataset": "gcp.audit", "namespace": "default"},
        "service": {"name": "k8s.io"},
        "user": {"email": user},
        "source": {"ip": "10.0.0.9"},
        "user_agent": {"original": "kubectl"},
        "orchestrator": {"resource": {"name": f"pod{n}"}},
    }


def test_ruletag_match_annotates_the_record_completing_the_aggregation(tmp_path: Path) -> None:
    events = [gke_event(n, n * 10, "a@x" if n % 3 else "b@x") for n in range(1, 17)]
    src = tmp_path / "events.jsonl"
    src.write_text("".join(json.dumps(e) + "\n" for e in events))
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = subprocess.run(
        [str(ruletag_script()), "match", "--events", str(src), "--rules", str(GKE_RULE)],
        capture_output=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    out = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert [r["event"]["id"] for r in out] == [f"e{n}" for n in range(1, 17)]
    annotated = [r for r in out if "detections" in r]
    # a@x: 1, 2, 4, 5, 7, 8, 10, 11, 13, 14 -> the 10th failure is e14 (at 10:02:20, inside
    # the 5-minute bucket 10:00)
    assert [r["event"]["id"] for r in annotated] == ["e14"]
    (d,) = annotated[0]["detections"]
    assert d["rule_id"] == "94556bc7-e057-4759-9e49-fa79ee366101"
    block = d["aggregation"]
    assert block["keys"] == [
        {"field": "user.email", "value": "a@x"},
        {"field": "source.ip", "value": "10.0.0.9"},
        {"field": "user_agent.original", "value": "kubectl"},
        {"field": "data_stream.namespace", "value": "default"},
        {"field": "Esql.time_interval", "value": "2026-03-01T10:00:00.000Z"},
    ]
    assert block["values"]["Esql.failures_count"] == 10
    assert block["values"]["Esql.unique_actions"] == 1
    assert block["values"]["Esql.actions"] == "get"
    assert block["values"]["Esql.resources"] == [
        f"pod{n}" for n in (1, 2, 4, 5, 7, 8, 10, 11, 13, 14)
    ]
    assert block["window"] == {
        "start": "2026-03-01T09:51:20.000Z",
        "end": "2026-03-01T10:02:20.000Z",
    }


# --------------------------------------------------------------------------- whole corpus

_STATS = re.compile(r"(?im)^\s*\|?\s*(inline\s+)?stats\b")


@needs_corpus
def test_active_corpus_aggregating_esql_rules_by_reason() -> None:
    """Every active aggregating ES|QL rule loads as an aggregation or is refused with a reason
    (never invalid); the loaded count and the reasons are printed."""
    reasons: Counter[str] = Counter()
    loaded = total = early = 0
    for path in sorted(corpus("elastic").rglob("*.toml")):
        text = path.read_text(encoding="utf-8")
        if "_deprecated" in path.parts or 'language = "esql"' not in text:
            continue
        if not _STATS.search(text):
            continue
        total += 1
        try:
            (r,) = load_elastic_file(path)
        except UnsupportedRule as exc:
            reasons[exc.reason] += 1
            continue
        assert r.kind == "aggregation" and r.aggregation is not None, path
        loaded += 1
        early += fires_early(r.aggregation)
    for reason, count in reasons.most_common():
        print(f"{count:5d}  {reason}")
    print(f"{loaded:5d}  loaded of {total} aggregating ES|QL rules")
    print(f"{early:5d}  of them with a condition a later record may undo (fires_early)")
    assert total == 164
    assert loaded >= 117  # 121 before the "nearly every record" refusals (5 rules)


# --------------------------------------------------------------------------- property


def naive(function: str, values: list[Any]) -> object:
    """The aggregate recomputed from scratch (the slow reference of the running state)."""
    if function == "count":
        return len(values)
    texts = [as_text(v) for v in values]
    if function == "count_distinct":
        return len(set(texts))
    if function in ("min", "max"):
        if not values:
            return None
        pick = min if function == "min" else max
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            return pick(values)
        return as_text(pick(values, key=lambda v: as_text(v) or ""))
    if function == "values":
        return sorted({t or "" for t in texts}) if texts else None
    nums = [n for n in (number_of(v) for v in values) if n is not None]
    if not nums:
        return None
    return sum(nums) if function == "sum" else sum(nums) / len(nums)


VALUE = st.one_of(st.integers(-5, 5), st.sampled_from(["a", "b", "3", "x"]), st.booleans())
EVENTS = st.lists(
    st.tuples(st.integers(0, 200), st.lists(VALUE, max_size=3)), min_size=1, max_size=40
)


@settings(max_examples=150, deadline=None)
@given(events=EVENTS, window=st.integers(1, 60))
# a number and a text with the same canonical text, the text leaving first: what stays is the
# number (it was once reported as the text that had left)
@example(events=[(5, []), (0, ["3"]), (1, [3])], window=4)
def test_running_aggregates_equal_a_recomputation(
    events: list[tuple[int, list[Any]]], window: int
) -> None:
    """Rows enter in event-time order and leave the window; after each row the running state
    of every aggregate equals the aggregate recomputed over the rows still held."""
    functions_ = ["count", "count_distinct", "values", "min", "max", "sum", "avg"]
    q = f"{W} | stats " + ", ".join(f"{f} = {f}(x)" for f in functions_) + " | where false"
    engine = AggregationEngine([rule(q, window=float(window))])
    state = engine.states[0]
    held: list[tuple[int, list[Any]]] = []
    for second, values in sorted(events, key=lambda e: e[0]):
        engine.feed(ev(second, x=values))
        held = [(s, v) for s, v in [*held, (second, values)] if s >= second - window]
        ((_, group),) = state.groups.items()
        assert len(group.events) == len(held)
        flat = [v for _, vs in held for v in vs]
        for f, acc in zip(functions_, group.accs, strict=True):
            got = aggregate(f, acc)
            want = naive(f, flat)
            if f == "values":
                got = (
                    None
                    if got is None
                    else sorted(as_text(v) or "" for v in (got if isinstance(got, list) else [got]))
                )
            elif f in ("min", "max") and not isinstance(want, int | type(None)):
                got = as_text(got)
            if isinstance(want, float):
                assert got == pytest.approx(want), f
            else:
                assert got == want, f
