"""``ruletag rules explain`` and ``match --explain``: the traced condition tree shows true
leaves on a firing event and the false leaf of a near miss, and its verdict equals the
compiled table's on every rule of the pinned corpus sample."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ruletag.cli import main
from ruletag.rules.explain import Trace, explain, to_text
from ruletag.rules.fields import FieldMap
from ruletag.rules.ir import (
    And,
    Compare,
    Equals,
    Exists,
    FieldValue,
    Literal_,
    Match,
    Node,
    Or,
    Predicate,
    Wild,
)
from ruletag.rules.loader import compile_rules
from ruletag.rules.matcher import Matcher
from support.paths import DATA, SAMPLE, SEED_RULES
from test_differential import _material, records_from

SIGMA_ID = "c649a6c7-cd8c-4a78-9c04-000fc76df954"
ELASTIC_ID = "8e2485b6-a74f-411b-bf7f-38b819f3a846"
SEEDS = DATA / "seeds"
FM = FieldMap.default()


def _jsonl(name: str) -> list[dict]:
    return [json.loads(x) for x in (SEEDS / name).read_text().splitlines() if x.strip()]


FIRE = _jsonl("net_connection_win_wuauclt_network_connection.fire.jsonl")
QUIET = _jsonl("net_connection_win_wuauclt_network_connection.quiet.jsonl")
EQL_FIRE = _jsonl("potential_wsus_abuse_for_lateral_movement.fire.jsonl")
EQL_QUIET = _jsonl("potential_wsus_abuse_for_lateral_movement.quiet.jsonl")


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    table, _ = compile_rules([SEED_RULES], cache_dir=tmp_path_factory.mktemp("cache"))
    return Matcher(table)


def _rule(table, rule_id: str):  # type: ignore[no-untyped-def]
    return next(r for r in table.rules if r.id == rule_id)


def _find_all(t: Trace) -> list[Trace]:
    return [t, *(x for c in t.children for x in _find_all(c))]


def test_firing_event_shows_true_leaves_and_verdict(seeds) -> None:  # type: ignore[no-untyped-def]
    rule = _rule(seeds, SIGMA_ID)
    for rec in FIRE:
        e = explain(rule, rec, FM)
        assert e.verdict is True and e.condition.result is True
        assert e.logsource is not None and e.logsource.result is True
        image = next(x for x in _find_all(e.condition) if x.text.startswith("Image matches"))
        assert image.result is True
        assert image.fields[0]["field"] == "Image" and image.fields[0]["values"]
        text = to_text(e)
        assert "verdict: MATCH" in text and "[true ] Image matches" in text


def test_near_miss_shows_the_false_leaf(seeds) -> None:  # type: ignore[no-untyped-def]
    rule = _rule(seeds, SIGMA_ID)
    near = {**FIRE[0], "DestinationIp": "10.1.2.3"}  # a private address: the filter applies
    e = explain(rule, near, FM)
    assert e.verdict is False and e.logsource is not None and e.logsource.result is True
    nodes = _find_all(e.condition)
    cidr = next(x for x in nodes if x.text.startswith("DestinationIp in cidr"))
    assert cidr.result is True and cidr.fields[0]["values"] == ["10.1.2.3"]
    nots = [x for x in nodes if x.node == "not"]
    assert nots and nots[0].result is False  # "not filter" is what failed
    # Out of the logsource: the logsource part says so, the detection part may be true.
    other = {**FIRE[0], "EventID": 1}
    e2 = explain(rule, other, FM)
    assert e2.verdict is False and e2.logsource is not None and e2.logsource.result is False
    assert e2.condition.result is True
    assert "NOT in it" in to_text(e2)


def test_elastic_rule_fields_after_mapping(seeds) -> None:  # type: ignore[no-untyped-def]
    rule = _rule(seeds, ELASTIC_ID)
    for rec in EQL_FIRE:
        assert explain(rule, rec, FM).verdict is True
    for rec in EQL_QUIET:
        assert explain(rule, rec, FM).verdict is False
    flat = {"process.parent.name": "x", "Image": "C:\\a\\PsExec64.exe"}
    e = explain(rule, flat, FM)
    leaves = {x.text.split(" ")[0]: x for x in e.condition.leaves()}
    name = leaves["process.name"].fields[0]
    assert name["values"] == ["PsExec64.exe"] and name["from"][0].startswith("derived: basename")
    exe = leaves["process.executable"].fields[0]
    assert exe["from"] == ["Image"]  # the record path that supplied the value


def test_verdict_equals_table_on_seed_events(seeds) -> None:  # type: ignore[no-untyped-def]
    for rec in FIRE + QUIET + EQL_FIRE + EQL_QUIET:
        hits = set(seeds.match(dict(rec)))
        for i, rule in enumerate(seeds.rules):
            assert explain(rule, rec, FM).verdict == (i in hits), (rule.id, rec)


_SAMPLE_TABLE = Matcher(compile_rules([SAMPLE], use_cache=False)[0], tune_after=0)
_FIELDS, _TEXTS = _material(_SAMPLE_TABLE.rules, FM)


@settings(
    max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(st.lists(records_from(_FIELDS, _TEXTS), min_size=1, max_size=4))
def test_verdict_equals_table_on_every_sample_rule(records: list[dict]) -> None:
    table = _SAMPLE_TABLE
    for rec in records:
        hits = set(table.match(rec))
        for i, rule in enumerate(table.rules):
            assert explain(rule, rec, FM).verdict == (i in hits), (rule.id, rec)


def _satisfy(node: Node, rec: dict) -> None:
    """Fill ``rec`` so that ``node`` likely holds: every And child, the first Or child;
    negations are left alone (their fields stay absent)."""
    if isinstance(node, And):
        for a in node.args:
            _satisfy(a, rec)
    elif isinstance(node, Or):
        _satisfy(node.args[0], rec)
    elif isinstance(node, Match):
        text = "".join("x" if t is Wild.ONE else "" if t is Wild.ANY else t for t in node.pattern)
        rec.setdefault(node.field or "message", text)
    elif isinstance(node, Equals):
        rec.setdefault(node.field, node.value)
    elif isinstance(node, Compare):
        rec.setdefault(node.field, node.value + (1 if ">" in node.op else -1))
    elif isinstance(node, Exists):
        rec.setdefault(node.field, "x")
    elif isinstance(node, Predicate) and isinstance(node.left, FieldValue):
        right = node.right[0] if isinstance(node.right, tuple) else node.right
        if isinstance(right, Literal_) and right.value is not None and node.op != "!=":
            rec.setdefault(node.left.field, str(right.value).replace("*", "").replace("?", "x"))


def test_verdict_equals_table_on_records_built_to_fire_each_sample_rule() -> None:
    table = _SAMPLE_TABLE
    fired = 0
    for rule in table.rules:
        rec: dict = {}
        if rule.logsource is not None and (ls := FM.logsource_condition(rule.logsource)):
            _satisfy(ls, rec)
        _satisfy(rule.condition, rec)
        hits = set(table.match(rec))
        for i, other in enumerate(table.rules):
            assert explain(other, rec, FM).verdict == (i in hits), (other.id, rec)
        fired += rule in [table.rules[i] for i in hits]
    print(f"{fired} of {len(table.rules)} sample rules fired on their built record")
    assert fired >= len(table.rules) // 3, f"only {fired} of {len(table.rules)} rules fired"


def test_cli_explain_text_json_and_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    events = tmp_path / "ev.jsonl"
    events.write_text("\n".join(json.dumps(r) for r in (FIRE[0], QUIET[0])) + "\n")
    args = ["rules", "explain", "--rules", str(SEED_RULES), "--rule", SIGMA_ID]
    assert main([*args, "--event", str(events)]) == 0
    out = capsys.readouterr().out
    assert out.count("verdict: MATCH") == 1 and out.count("verdict: no match") == 1
    assert main([*args, "--event", str(events), "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [d["verdict"] for d in lines] == [True, False]
    assert [d["table_verdict"] for d in lines] == [True, False]
    assert lines[0]["condition"]["children"]
    # One pretty-printed JSON object, rules from a pipeline config, rule by part of its name.
    one = tmp_path / "one.json"
    one.write_text(json.dumps(EQL_FIRE[0], indent=2))
    cfg = Path(__file__).resolve().parents[1] / "pipelines" / "default.yaml"
    assert (
        main(["rules", "explain", "-c", str(cfg), "--rule", "wsus abuse", "--event", str(one)]) == 0
    )
    assert "verdict: MATCH" in capsys.readouterr().out
    assert main([*args[:4], "--rule", "no such rule", "--event", str(one)]) == 2


def test_match_explain_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    events = tmp_path / "ev.jsonl"
    events.write_text("\n".join(json.dumps(r) for r in (FIRE[0], QUIET[0], EQL_FIRE[0])) + "\n")
    argv = ["match", "--rules", str(SEED_RULES), "--events", str(events), "--explain"]
    assert main(argv) == 0
    out = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(out) == 3
    assert [e["rule_id"] for e in out[0]["explain"]] == [SIGMA_ID]
    assert out[0]["explain"][0]["verdict"] is True
    assert "explain" not in out[1] and "detections" not in out[1]
    assert [e["rule_id"] for e in out[2]["explain"]] == [ELASTIC_ID]
    assert out[2]["explain"][0]["condition"]["result"] is True
