"""The two seed rules: ``ruletag rules test``-style fixtures and the capture replay.

``tests/data/seeds/<rule>.fire.jsonl`` holds events (ECS, Sysmon, Security and Winlogbeat
shapes) that must fire that rule, ``<rule>.quiet.jsonl`` near misses that must not; each
record says why in ``test_note``. They run through the loader + table in-process and through
the ``ruletag match`` console script. The Fluent Bit capture ``windows-events.jsonl`` is
replayed against both rules together: each record gets exactly its expected rule ids
(``logsource-dependent:<id>`` means the rule must NOT match, since logsource is honoured).

One deliberate difference from ``windows-events.expected.json``: capture line 38 has only
``:\\Windows\\WinSxS\\`` in its CommandLine. The expected file calls it a near miss because it
was written from the seed's flattened rendering, where ``filter_main_winsxs`` reads as two
``or``-ed ``contains``. The SigmaHQ rule we load says ``contains|all`` (both strings), so
under the real rule that record fires.
"""

from __future__ import annotations

import json
import os
import subprocess
from functools import cache
from pathlib import Path

import pytest

from ruletag.rules.compiler import CompiledTable, build
from ruletag.rules.fields import FieldMap
from ruletag.rules.loader import load_rules
from ruletag.rules.matcher import Matcher
from support.paths import CAPTURES, SEED_RULES, seed_rule_files
from support.seeds import SIGMA_ID
from support.servers import ruletag_script

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "data" / "seeds"

SEEDS = sorted({p.name.split(".")[0] for p in FIXTURES.glob("*.jsonl")})


def rule_file(stem: str) -> Path:
    (path,) = [p for p in seed_rule_files() if p.stem == stem]
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]


@cache
def table_for(*paths: Path) -> CompiledTable:
    result = load_rules(list(paths))
    assert result.problems == [], [str(p) for p in result.problems]
    return build(result.rules, FieldMap.default(), "test")


def matched_ids(table: CompiledTable, record: dict) -> list[str]:
    return sorted(table.rules[i].id for i in Matcher(table).match(record))


def test_every_seed_rule_has_both_fixture_files() -> None:
    assert SEEDS == [
        "net_connection_win_wuauclt_network_connection",
        "potential_wsus_abuse_for_lateral_movement",
    ]
    for stem in SEEDS:
        for kind in ("fire", "quiet"):
            rows = read_jsonl(FIXTURES / f"{stem}.{kind}.jsonl")
            assert len(rows) >= 4 and all(r.get("test_note") for r in rows)
        shapes = {
            ("ecs" if "event" in r or "@timestamp" in r else "windows")
            for r in read_jsonl(FIXTURES / f"{stem}.fire.jsonl")
        }
        assert shapes == {"ecs", "windows"}, stem


@pytest.mark.parametrize("stem", SEEDS)
def test_fixtures_in_process(stem: str) -> None:
    table = table_for(rule_file(stem))
    (rule,) = table.rules
    for kind, want in (("fire", [rule.id]), ("quiet", [])):
        for rec in read_jsonl(FIXTURES / f"{stem}.{kind}.jsonl"):
            assert matched_ids(table, rec) == want, f"{kind}: {rec['test_note']}"


def ruletag_match(rules: Path, events: Path, cache: Path) -> list[dict]:
    """``ruletag match --rules RULES --events EVENTS`` through the console script; its output."""
    p = subprocess.run(
        [str(ruletag_script()), "match", "--rules", str(rules), "--events", str(events)],
        capture_output=True,
        env={**os.environ, "XDG_CACHE_HOME": str(cache)},
        timeout=120,
        check=False,
    )
    assert p.returncode == 0, p.stderr
    return [json.loads(line) for line in p.stdout.splitlines()]


@pytest.mark.parametrize("stem", SEEDS)
def test_fixtures_through_ruletag_match(stem: str, tmp_path: Path) -> None:
    rid = table_for(rule_file(stem)).rules[0].id
    for kind in ("fire", "quiet"):
        events = FIXTURES / f"{stem}.{kind}.jsonl"
        out = ruletag_match(rule_file(stem), events, tmp_path)
        assert [o["test_note"] for o in out] == [r["test_note"] for r in read_jsonl(events)]
        for o in out:
            got = [d["rule_id"] for d in o.get("detections", [])]
            assert got == ([rid] if kind == "fire" else []), f"{kind}: {o['test_note']}"


#: Capture lines whose expectation differs under the real rule files (see the module docstring).
CAPTURE_OVERRIDES = {38: [SIGMA_ID]}


def expected_capture() -> list[tuple[str, list[str]]]:
    exp = json.loads((CAPTURES / "windows-events.expected.json").read_text("utf-8"))
    rows = []
    for r in exp["records"]:
        ids = sorted(i for i in r["expected_rule_ids"] if not i.startswith("logsource-dependent:"))
        ids = CAPTURE_OVERRIDES.get(r["line"], ids)
        rows.append((f"line {r['line']} ({r['key']}): {r['note']}", ids))
    return rows


def test_capture_replay_in_process() -> None:
    table = table_for(*seed_rule_files())
    records = read_jsonl(CAPTURES / "windows-events.jsonl")
    expected = expected_capture()
    assert len(records) == len(expected) == 52
    for rec, (why, want) in zip(records, expected, strict=True):
        assert matched_ids(table, rec) == want, why
    (large,) = read_jsonl(CAPTURES / "windows-events-large.jsonl")
    assert matched_ids(table, large) == []


@pytest.mark.parametrize(
    "capture",
    [
        "windows-events.jsonl",  # the JSON lines Fluent Bit read
        "default.bin",  # Fluent Bit 4.2.8 out_forward, Forward mode, [time, record]
        "compress-gzip.bin",  # CompressedPackedForward
        "fluent-bit-5.1.1/default.bin",  # Forward mode with [[time, metadata], record] entries
        "tag-dynamic-ack.bin",  # Message mode
    ],
)
def test_capture_replay_through_ruletag_match(capture: str, tmp_path: Path) -> None:
    out = ruletag_match(SEED_RULES, CAPTURES / capture, tmp_path)
    records = read_jsonl(CAPTURES / "windows-events.jsonl")
    want = dict(
        zip(
            (json.dumps(r, sort_keys=True) for r in records),
            (ids for _, ids in expected_capture()),
            strict=True,
        )
    )
    seen = 0
    for o in out:
        got = sorted(d["rule_id"] for d in o.pop("detections", []))
        key = json.dumps(o, sort_keys=True)
        if key in want:
            assert got == want[key], f"{capture}: {key[:120]}"
            seen += 1
        else:  # dummy heartbeat records and the 64 KiB PowerShell record match nothing
            assert got == [], key[:120]
    assert seen == 52
