"""Elastic new_terms rules (issue 16): front-end, the streaming first-seen state (learning, cap,
expiry, snapshot/restore), the annotation, the config, and ``ruletag match``."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgpack
import pytest

from ruletag.config.load import parse_new_terms
from ruletag.config.model import NewTermsConfig
from ruletag.enrich.annotate import stateful_detection
from ruletag.errors import ConfigError, InvalidRule, UnsupportedRule
from ruletag.rules.elastic import load_elastic_file
from ruletag.rules.ir import Const, Match, NewTerms, Rule, fields_of
from ruletag.rules.stateful import stateful_engines
from ruletag.rules.stateful.newterms import NewTerm, NewTermsEngine, configure_new_terms
from ruletag.rules.stateful.threshold import iso_time
from support.paths import SAMPLE, corpus, needs_corpus
from support.servers import ruletag_script

BBR = SAMPLE / "elastic/rules_building_block"
GITHUB_RULE = BBR / "initial_access_github_new_ip_address_for_user.toml"
GETCONF_RULE = BBR / "discovery_getconf_execution.toml"
LOCALGROUP_RULE = SAMPLE / "elastic/rules/windows/discovery_privileged_localgroup_membership.toml"

RULE_TEMPLATE = """\
[metadata]
maturity = "production"

[rule]
author = ["A"]
name = "t"
rule_id = "t-1"
severity = "low"
type = "new_terms"
language = "{language}"
{extra}
query = '''
event.action:exec
'''
{new_terms}
"""

NEW_TERMS = """\
[rule.new_terms]
field = "new_terms_fields"
value = {fields}
[[rule.new_terms.history_window_start]]
field = "history_window_start"
value = "{start}"
"""


def write_rule(
    tmp_path: Path,
    new_terms: str | None = None,
    *,
    fields: str = '["host.id", "process.executable"]',
    start: str = "now-7d",
    language: str = "kuery",
    extra: str = "",
) -> Path:
    if new_terms is None:
        new_terms = NEW_TERMS.format(fields=fields, start=start)
    path = tmp_path / "t.toml"
    path.write_text(
        RULE_TEMPLATE.format(language=language, extra=extra, new_terms=new_terms),
        encoding="utf-8",
    )
    return path


# --------------------------------------------------------------------------- front-end


def test_new_terms_rule_loads_with_its_settings(tmp_path: Path) -> None:
    extra = 'timestamp_override = "event.ingested"'
    (rule,) = load_elastic_file(write_rule(tmp_path, start="now-10d", extra=extra))
    assert (rule.kind, rule.rule_type, rule.condition) == ("new_terms", "new_terms", Const(False))
    assert rule.new_terms == NewTerms(
        condition=Match("event.action", ("exec",), cased=True),
        fields=("host.id", "process.executable"),
        history=10 * 86400.0,
        timestamp_field="event.ingested",
        timestamp_fallback="@timestamp",
    )


def test_timestamp_fallback_can_be_disabled_and_no_override_is_timestamp(tmp_path: Path) -> None:
    extra = 'timestamp_override = "event.ingested"\ntimestamp_override_fallback_disabled = true'
    (rule,) = load_elastic_file(write_rule(tmp_path, start="now-12h", extra=extra))
    assert rule.new_terms is not None
    assert rule.new_terms.timestamp_fallback is None
    assert rule.new_terms.history == 12 * 3600.0
    (rule,) = load_elastic_file(write_rule(tmp_path, fields='["user.name"]'))
    assert rule.new_terms is not None
    assert (rule.new_terms.timestamp_field, rule.new_terms.timestamp_fallback) == (
        "@timestamp",
        None,
    )
    assert rule.new_terms.fields == ("user.name",)


@pytest.mark.parametrize(
    ("kw", "error", "reason"),
    [
        ({"new_terms": ""}, InvalidRule, "rule.new_terms is missing or not a table"),
        ({"fields": "[]"}, InvalidRule, "rule.new_terms.value must be a non-empty list"),
        ({"fields": '["a", 1]'}, InvalidRule, "rule.new_terms.value must be a non-empty list"),
        ({"fields": '["a", "b", "c", "d"]'}, InvalidRule, "rule.new_terms.value: more than 3"),
        (
            {"new_terms": '[rule.new_terms]\nfield = "new_terms_fields"\nvalue = ["a"]\n'},
            InvalidRule,
            "rule.new_terms.history_window_start must be one table",
        ),
        (
            {"start": "now-1y"},
            UnsupportedRule,
            "new_terms history_window_start 'now-1y' is not now-<n><s|m|h|d|w>",
        ),
        ({"start": "now-0d"}, InvalidRule, "rule.new_terms.history_window_start must be before"),
        (
            {"language": "lucene"},
            UnsupportedRule,
            "query language lucene is not supported",
        ),
        (
            {"language": "eql"},
            UnsupportedRule,
            "elastic rule type new_terms: query language eql is not supported",
        ),
    ],
)
def test_bad_new_terms_rules_say_why(
    tmp_path: Path, kw: dict[str, str], error: type[Exception], reason: str
) -> None:
    with pytest.raises(error) as info:
        load_elastic_file(write_rule(tmp_path, **kw))
    assert str(getattr(info.value, "reason", "")).startswith(reason)


def test_sample_corpus_rules_load() -> None:
    (gh,) = load_elastic_file(GITHUB_RULE)
    assert gh.new_terms is not None and gh.building_block
    assert (gh.new_terms.fields, gh.new_terms.history) == (
        ("user.name", "github.actor_ip"),
        5 * 86400.0,
    )
    assert gh.new_terms.timestamp_field == "event.ingested"
    assert {"event.dataset", "github.actor_ip"} <= fields_of(gh.new_terms.condition)
    (gc,) = load_elastic_file(GETCONF_RULE)
    assert gc.new_terms is not None
    assert gc.new_terms.fields == ("process.parent.executable",)
    (lg,) = load_elastic_file(LOCALGROUP_RULE)
    assert lg.new_terms is not None
    assert lg.new_terms.fields == ("winlog.event_data.CallerProcessName",)


def test_rule_filters_are_part_of_the_condition() -> None:
    (rule,) = load_elastic_file(LOCALGROUP_RULE)
    engine = NewTermsEngine([rule])
    engine.configure(learn=0)

    def enum(n: int, caller: str) -> dict[str, Any]:
        return {
            "@timestamp": iso_time(T0 + n),
            "host": {"os": {"type": "windows"}},
            "event": {"category": "iam", "action": "user-member-enumerated"},
            "group": {"name": "Administrators"},
            "winlog": {"event_data": {"CallerProcessName": caller}},
        }

    # the [[rule.filters]] leave out C:\Program Files\*.exe
    assert engine.feed(enum(1, "C:\\Program Files\\Tool\\tool.exe")) == []
    (hit,) = engine.feed(enum(2, "C:\\Users\\x\\evil.exe"))
    assert hit.terms == (("winlog.event_data.CallerProcessName", "C:\\Users\\x\\evil.exe"),)


# --------------------------------------------------------------------------- the state

T0 = 1_700_000_000.0
DAY = 86400.0


def nt_rule(
    fields: tuple[str, ...] = ("user", "host"),
    history: float = 7 * DAY,
    rule_id: str = "r",
    **kw: Any,
) -> Rule:
    action = kw.pop("condition_action", "exec")
    nt = NewTerms(condition=Match("action", (action,)), fields=fields, history=history, **kw)
    return Rule(
        id=rule_id,
        name=rule_id,
        source="elastic",
        condition=Const(False),
        kind="new_terms",
        new_terms=nt,
    )


def ev(n: int, t: float | None, user: Any = "u1", host: Any = "h1", **kw: Any) -> dict:
    rec: dict[str, Any] = {"id": n, "action": kw.pop("action", "exec"), "user": user, "host": host}
    rec.update(kw)
    if t is not None:
        rec["@timestamp"] = iso_time(T0 + t)
    return rec


def run(
    engine: NewTermsEngine, records: Iterable[dict[str, Any]]
) -> list[tuple[int, dict[str, str], float | None]]:
    """(record id, terms, last seen relative to T0) for every new combination, in order."""
    out = []
    for rec in records:
        for r in engine.feed(rec):
            last = None if r.last_seen is None else r.last_seen - T0
            out.append((rec["id"], dict(r.terms), last))
    return out


def engine_of(*rules: Rule, learn: float | None = 0.0, **kw: Any) -> NewTermsEngine:
    return NewTermsEngine(list(rules) or [nt_rule()], learn=learn, **kw)


def test_first_seen_combination_fires_once() -> None:
    engine = engine_of()
    got = run(engine, [ev(1, 0), ev(2, 10), ev(3, 20, host="h2"), ev(4, 30, action="other")])
    assert got == [(1, {"user": "u1", "host": "h1"}, None), (3, {"user": "u1", "host": "h2"}, None)]
    assert engine.stats()["fired"] == 2 and engine.stats()["terms"] == 2


def test_seen_within_the_window_stays_quiet_boundary_inclusive() -> None:
    engine = engine_of(nt_rule(history=100.0))
    # each sighting moves "last seen": 0, 100 (exactly the window later: quiet), 200.5 (fires)
    got = run(engine, [ev(1, 0), ev(2, 100), ev(3, 200.5)])
    assert [(n, last) for n, _, last in got] == [(1, None), (3, 100.0)]


def test_seen_only_before_the_window_fires_again_with_last_seen() -> None:
    engine = engine_of(nt_rule(history=7 * DAY))
    got = run(engine, [ev(1, 0), ev(2, 3 * DAY), ev(3, 11 * DAY), ev(4, 18 * DAY + 1)])
    # 11d: last seen 3d, 8 days before: new again; 18d+1s: last seen 11d, 7d+1s before
    assert [(n, last) for n, _, last in got] == [(1, None), (3, 3 * DAY), (4, 11 * DAY)]
    (alert,) = engine.feed(ev(5, 40 * DAY))
    d = stateful_detection(alert)
    assert d["rule_id"] == "r"
    assert d["new_terms"] == {
        "terms": [{"field": "user", "value": "u1"}, {"field": "host", "value": "h1"}],
        "history_window": {"start": iso_time(T0 + 33 * DAY), "end": iso_time(T0 + 40 * DAY)},
        "last_seen": iso_time(T0 + 18 * DAY + 1),
    }


def test_multi_valued_fields_give_one_result_per_new_combination() -> None:
    engine = engine_of()
    got = run(engine, [ev(1, 0, user=["a", "b"], host=["h1", "h2", "h1"])])
    assert sorted((t["user"], t["host"]) for _, t, _ in got) == [
        ("a", "h1"),
        ("a", "h2"),
        ("b", "h1"),
        ("b", "h2"),
    ]
    got = run(engine, [ev(2, 5, user=["b", "c"], host="h2")])
    assert [(t["user"], t["host"]) for _, t, _ in got] == [("c", "h2")]
    # a missing or null term field: no combination at all
    assert run(engine, [ev(3, 6, user=None), ev(4, 7, host=[])]) == []
    assert engine.stats()["no_terms"] == 2


def test_single_field_values_are_compared_as_text() -> None:
    engine = engine_of(nt_rule(fields=("port",)))
    got = run(engine, [ev(1, 0, port=443), ev(2, 1, port="443"), ev(3, 2, port=8443)])
    assert [(n, t) for n, t, _ in got] == [(1, {"port": "443"}), (3, {"port": "8443"})]


def test_learning_period_is_the_history_window_by_default() -> None:
    engine = engine_of(nt_rule(history=100.0), learn=None)
    assert engine.stats()["learning"] == 1
    got = run(
        engine,
        [
            ev(1, 0, host="a"),  # learning starts at 0, ends at 100
            ev(2, 50, host="b"),  # learned
            ev(3, 99, host="c"),  # learned
            ev(4, 100, host="d"),  # the learning is over: fires
            ev(5, 120, host="b"),  # seen at 50, within 100: quiet
            ev(6, 130, host="e"),
        ],
    )
    assert [n for n, _, _ in got] == [4, 6]
    assert engine.stats()["learned"] == 3 and engine.stats()["learning"] == 0


def test_learning_runs_from_the_start_of_the_stream_not_from_each_rule() -> None:
    a = nt_rule(fields=("host",), history=100.0, rule_id="a")
    b = nt_rule(fields=("user",), history=100.0, rule_id="b", condition_action="other")
    engine = engine_of(a, b, learn=None)
    got = run(
        engine,
        [
            ev(1, 0, host="h1"),  # a: learned; the stream starts at 0
            ev(2, 150, user="x", action="other"),  # b's first record, after 0 + 100: fires
            ev(3, 160, host="h2"),  # a's learning is over too
        ],
    )
    assert [n for n, _, _ in got] == [2, 3]


def test_learning_for_a_configured_time_and_no_learning() -> None:
    engine = engine_of(nt_rule(history=1000.0), learn=None)
    configure_new_terms([engine], learn=10.0)
    got = run(engine, [ev(1, 0, host="a"), ev(2, 9, host="b"), ev(3, 10, host="c")])
    assert [n for n, _, _ in got] == [3]
    eager = engine_of(learn=None)
    configure_new_terms([object(), eager], learn=0.0)
    assert [n for n, _, _ in run(eager, [ev(1, 0)])] == [1]


def test_cap_evicts_the_least_recently_seen_combination() -> None:
    engine = engine_of(nt_rule(fields=("host",)), max_terms=2)
    got = run(
        engine,
        [
            ev(1, 0, host="a"),
            ev(2, 1, host="b"),
            ev(3, 2, host="a"),  # a is now the most recently seen
            ev(4, 3, host="c"),  # evicts b
            ev(5, 4, host="a"),  # quiet
            ev(6, 5, host="b"),  # evicted: fires again (and evicts c)
        ],
    )
    assert [n for n, _, _ in got] == [1, 2, 4, 6]
    st = engine.stats()
    assert (st["terms"], st["evicted_terms"]) == (2, 2)
    engine.configure(learn=0.0, max_terms=1)
    assert engine.stats()["terms"] == 1 and engine.stats()["evicted_terms"] == 3


def test_old_combinations_expire_and_late_records_are_ignored() -> None:
    engine = engine_of(nt_rule(fields=("host",), history=100.0))
    run(engine, [ev(n, n, host=f"h{n}") for n in range(10)])
    assert engine.stats()["terms"] == 10
    run(engine, [ev(100, 1000, host="x")])  # a sweep: everything before 900 goes
    st = engine.stats()
    assert (st["terms"], st["expired_terms"]) == (1, 10)
    # older than watermark - history: late, ignored; a combination seen later: quiet
    assert run(engine, [ev(101, 899, host="new")]) == []
    assert run(engine, [ev(102, 950, host="x")]) == []
    assert engine.stats()["late_records"] == 1
    assert [n for n, _, _ in run(engine, [ev(103, 950, host="y")])] == [103]


def test_event_time_override_with_fallback_and_records_without_time() -> None:
    rule = nt_rule(
        fields=("host",),
        history=100.0,
        timestamp_field="event.ingested",
        timestamp_fallback="@timestamp",
    )
    engine = engine_of(rule)
    r1 = ev(1, None, host="a", event={"ingested": iso_time(T0)})
    r2 = ev(2, 0, host="a")  # no event.ingested: @timestamp, T0 -> seen: quiet
    r3 = ev(3, None, host="b")
    assert [n for n, _, _ in run(engine, [r1, r2, r3])] == [1]
    assert engine.stats()["no_timestamp"] == 1
    strict = engine_of(nt_rule(fields=("host",), timestamp_field="event.ingested"))
    assert run(strict, [ev(4, 0, host="a")]) == []
    assert strict.stats()["no_timestamp"] == 1


def test_rules_sharing_a_condition_keep_their_own_terms() -> None:
    a = nt_rule(fields=("host",), rule_id="a")
    b = nt_rule(fields=("user",), rule_id="b")
    engine = engine_of(a, b)
    assert len(engine.table.rules) == 1
    got = [(r.rule.id, r.terms) for r in engine.feed(ev(1, 0))]
    assert got == [("a", (("host", "h1"),)), ("b", (("user", "u1"),))]
    got = [(r.rule.id, r.terms) for r in engine.feed(ev(2, 1, host="h2"))]
    assert got == [("a", (("host", "h2"),))]


def test_step_hits_give_the_same_results_as_feeding_every_record() -> None:
    records = [ev(n, n, host=f"h{n % 3}", action="exec" if n % 2 else "noise") for n in range(40)]
    records += [{"id": 99, "message": "unrelated", "@timestamp": iso_time(T0)}]
    slow = engine_of()
    fast = engine_of()
    pack = msgpack.Packer(use_bin_type=True).pack
    parts = [pack([0, r]) for r in records]
    spans, pos = [], 0
    for p in parts:
        spans.append((pos, pos + len(p)))
        pos += len(p)
    hits = fast.step_hits(b"".join(parts), spans)
    assert set(hits) == {i for i, r in enumerate(records) if r.get("action") == "exec"}
    want = run(slow, records)
    got = []
    for i, rec in enumerate(records):
        if i in hits:
            got += [(rec["id"], dict(r.terms), None) for r in fast.feed(rec, hits[i])]
    assert got == want and len(want) == 3


def test_snapshot_restore_round_trip_does_not_learn_again() -> None:
    rule = nt_rule(fields=("host",), history=100.0)
    first = engine_of(rule, learn=None)
    run(first, [ev(1, 0, host="a"), ev(2, 50, host="b"), ev(3, 150, host="c")])
    snap = json.loads(json.dumps(first.snapshot()))
    assert snap["kind"] == "new_terms" and snap["version"] == 1
    # a (last seen 0) expired at 150: more than the 100 s history before the watermark
    assert snap["rules"]["r"]["terms"] == [[["b"], T0 + 50], [["c"], T0 + 150]]

    again = engine_of(rule, learn=None)  # a restart: it would learn for 100 s
    assert again.restore(snap) == {"restored": 1, "skipped": 0}
    assert again.stats()["learning"] == 0 and again.stats()["terms"] == 2
    assert again.stats()["fired"] == first.stats()["fired"] == 1
    # b (seen at 50) and c are within 100 s of 140: quiet; d is new
    got = run(again, [ev(4, 140, host="b"), ev(5, 145, host="c"), ev(6, 146, host="d")])
    assert [n for n, _, _ in got] == [6]
    fresh = engine_of(rule, learn=None)  # without the snapshot: learns, nothing fires
    assert run(fresh, [ev(6, 146, host="d")]) == []


def test_restore_skips_rules_whose_fields_changed_and_rejects_bad_data() -> None:
    old = engine_of(nt_rule(fields=("host",)))
    run(old, [ev(1, 0)])
    snap = old.snapshot()
    changed = engine_of(nt_rule(fields=("user",)))
    assert changed.restore(snap) == {"restored": 0, "skipped": 1}
    assert changed.stats()["terms"] == 0
    other = engine_of(nt_rule(fields=("host",), rule_id="other"))
    assert other.restore(snap) == {"restored": 0, "skipped": 0}
    with pytest.raises(ValueError):
        old.restore({"kind": "threshold", "version": 1, "rules": {}})
    bad = json.loads(json.dumps(snap))
    bad["rules"]["r"]["terms"] = [[["h1"], "yesterday"]]
    assert old.restore(bad) == {"restored": 0, "skipped": 1}
    assert old.stats()["terms"] == 1  # left as it was


def test_stateful_engines_builds_the_new_terms_engine() -> None:
    engines = stateful_engines([nt_rule()])
    assert [e.kind for e in engines] == ["new_terms"]
    assert isinstance(engines[0], NewTermsEngine)


def test_annotation_without_last_seen() -> None:
    alert = NewTerm(nt_rule(), (("user", "u"), ("host", "h")), T0 + 3600, 3600.0)
    block = stateful_detection(alert)["new_terms"]
    assert block == {
        "terms": [{"field": "user", "value": "u"}, {"field": "host", "value": "h"}],
        "history_window": {"start": iso_time(T0), "end": iso_time(T0 + 3600)},
    }


# --------------------------------------------------------------------------- config


def test_new_terms_config() -> None:
    assert parse_new_terms(None) == NewTermsConfig(learn=None, max_terms=100_000)
    assert parse_new_terms({"learn": False, "max_terms": 5}) == NewTermsConfig(0.0, 5)
    assert parse_new_terms({"learn": "2h"}).learn == 7200.0
    assert parse_new_terms({"learn": True}).learn is None
    with pytest.raises(ConfigError, match=r"rules\.new_terms\.max_terms"):
        parse_new_terms({"max_terms": 0})
    with pytest.raises(ConfigError, match=r"rules\.new_terms\.learn"):
        parse_new_terms({"learn": "soon"})
    with pytest.raises(ConfigError, match=r"rules\.new_terms\.keep: unknown key"):
        parse_new_terms({"keep": 1})


# --------------------------------------------------------------------------- ruletag match


def getconf_event(n: int, t: float, parent: str) -> dict[str, Any]:
    return {
        "@timestamp": iso_time(T0 + t),
        "event": {"id": f"e{n}", "category": "process", "type": "start", "action": "exec"},
        "host": {"os": {"type": "linux"}},
        "process": {"name": "getconf", "parent": {"executable": parent}},
    }


def ruletag_match(
    tmp_path: Path, events: list[dict[str, Any]], *flags: str, stderr: list[str] | None = None
) -> list[dict]:
    src = tmp_path / "events.jsonl"
    src.write_text("".join(json.dumps(e) + "\n" for e in events))
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    cmd = [str(ruletag_script()), "match", "--events", str(src), "--rules", str(GETCONF_RULE)]
    proc = subprocess.run([*cmd, *flags], capture_output=True, env=env, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    if stderr is not None:
        stderr.append(proc.stderr.decode())
    return [json.loads(line) for line in proc.stdout.decode().splitlines()]


def test_ruletag_match_end_to_end(tmp_path: Path) -> None:
    (rule,) = load_elastic_file(GETCONF_RULE)
    events = [
        getconf_event(1, 0, "/bin/bash"),
        getconf_event(2, 60, "/usr/bin/python3"),
        getconf_event(3, 120, "/bin/bash"),
        getconf_event(4, 180, "/usr/bin/google_guest_agent_manager"),  # excluded by the query
        getconf_event(5, 6 * DAY, "/usr/bin/perl"),  # after the 5-day learning period
        getconf_event(6, 6 * DAY + 1, "/bin/bash"),  # last seen 6 days before: new again
        getconf_event(7, 6 * DAY + 2, "/usr/bin/python3"),
    ]
    eager = ruletag_match(tmp_path, events, "--new-terms-no-learning")
    assert [r["event"]["id"] for r in eager] == [f"e{n}" for n in range(1, 8)]
    fired = {r["event"]["id"]: r["detections"] for r in eager if "detections" in r}
    assert sorted(fired) == ["e1", "e2", "e5", "e6", "e7"]
    (d,) = fired["e6"]
    assert d["rule_id"] == rule.id and d["building_block"] is True
    assert d["new_terms"] == {
        "terms": [{"field": "process.parent.executable", "value": "/bin/bash"}],
        "history_window": {
            "start": iso_time(T0 + DAY + 1),
            "end": iso_time(T0 + 6 * DAY + 1),
        },
    }  # no last_seen: e5 moved the watermark 6 days on, /bin/bash (seen at 120 s) expired
    err: list[str] = []
    learning = ruletag_match(tmp_path, events, stderr=err)
    assert [r["event"]["id"] for r in learning if "detections" in r] == ["e5", "e6", "e7"]
    assert "still learning" not in err[0]
    short = ruletag_match(tmp_path, events[:3], stderr=err)
    assert not any("detections" in r for r in short)
    assert "ruletag: new_terms: 1 rule still learning at the end of the input" in err[1]


# --------------------------------------------------------------------------- whole corpus


@needs_corpus
def test_active_corpus_new_terms_rules_all_load() -> None:
    loaded: list[Rule] = []
    for path in sorted(corpus("elastic").rglob("*.toml")):
        text = path.read_text(encoding="utf-8")
        if "_deprecated" in path.parts or not re.search(r'(?m)^type\s*=\s*"new_terms"', text):
            continue
        (rule,) = load_elastic_file(path)  # a rule that cannot load raises its reason here
        assert rule.kind == "new_terms" and rule.new_terms is not None, path
        loaded.append(rule)
    assert len(loaded) == 241
    assert all(1 <= len(r.new_terms.fields) <= 3 for r in loaded if r.new_terms)
    engine = NewTermsEngine(loaded)
    assert engine.stats()["rules"] == 241
