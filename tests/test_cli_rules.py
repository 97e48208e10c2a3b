"""The real ``ruletag`` console script: ``rules check``, ``rules compile`` and ``match``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import msgpack
import pytest

from support.paths import SEED_RULES, SIGMA_SEED
from support.seeds import SIGMA_ID
from support.servers import ruletag_script

SEEDS = SEED_RULES

HIT = {
    "EventID": 3,
    "Channel": "Microsoft-Windows-Sysmon/Operational",
    "Image": "C:\\Windows\\System32\\wuauclt.exe",
    "DestinationIp": "8.8.8.8",
    "CommandLine": "wuauclt.exe /UpdateDeployProvider x.dll /RunHandlerComServer",
}
MISS = {**HIT, "DestinationIp": "10.1.2.3"}

PLACEHOLDER_RULE = """\
title: Placeholder test
id: 11111111-2222-4333-8444-555555555555
status: test
author: Tester
date: 2024-01-01
logsource:
    product: windows
    category: process_creation
detection:
    selection:
        User|expand: '%admins%'
    condition: selection
level: low
"""


def run(*args: str, stdin: bytes | None = None, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    return subprocess.run(
        [str(ruletag_script()), *args],
        input=stdin,
        capture_output=True,
        env=env,
        timeout=120,
        check=False,
    )


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    d = tmp_path / "rules"
    d.mkdir()
    shutil.copy(SIGMA_SEED, d / SIGMA_SEED.name)
    (d / "broken.yml").write_text("title: x\ndetection: [\n", encoding="utf-8")
    (d / "README.md").write_text("not a rule", encoding="utf-8")
    return d


def test_rules_check_text(rules_dir: Path, tmp_path: Path) -> None:
    p = run("rules", "check", str(rules_dir), cache=tmp_path / "c")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.decode().splitlines()
    assert lines[0].startswith(f"{rules_dir / 'broken.yml'}:")
    assert ": invalid: " in lines[0]
    assert lines[-1].startswith("2 files: 1 loaded, 0 unsupported, 1 invalid, 0 duplicates")
    assert "sigma 1/0/1" in lines[-1]


def test_rules_check_json(rules_dir: Path, tmp_path: Path) -> None:
    p = run("rules", "check", "--json", str(rules_dir), cache=tmp_path / "c")
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    assert (s["loaded"], s["unsupported"], s["invalid"], s["duplicates"]) == (1, 0, 1, 0)
    assert s["by_source"]["sigma"] == {
        "files": 2,
        "loaded": 1,
        "kept": 1,
        "unsupported": 0,
        "invalid": 1,
    }
    assert sum(s["by_reason"].values()) == 1
    (prob,) = s["problems"]
    assert prob["kind"] == "invalid" and prob["path"] == str(rules_dir / "broken.yml")


def test_rules_check_vars_expands_placeholders(tmp_path: Path) -> None:
    rule = tmp_path / "ph.yml"
    rule.write_text(PLACEHOLDER_RULE, encoding="utf-8")
    varfile = tmp_path / "vars.yml"
    varfile.write_text("admins: [alice, bob]\n", encoding="utf-8")
    p = run("rules", "check", "--json", "--vars", str(varfile), str(rule), cache=tmp_path / "c")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["loaded"] == 1
    events = tmp_path / "ev.jsonl"
    events.write_text(
        json.dumps({"EventID": 1, "Channel": "Microsoft-Windows-Sysmon/Operational", "User": "BOB"})
        + "\n",
        encoding="utf-8",
    )
    m = run(
        "match",
        "--rules",
        str(rule),
        "--vars",
        str(varfile),
        "--events",
        str(events),
        cache=tmp_path / "c",
    )
    assert m.returncode == 0, m.stderr
    (out,) = [json.loads(x) for x in m.stdout.splitlines()]
    assert [d["rule_id"] for d in out["detections"]] == ["11111111-2222-4333-8444-555555555555"]


def test_compile_then_match_with_the_table(rules_dir: Path, tmp_path: Path) -> None:
    table = tmp_path / "out.table"
    p = run("rules", "compile", str(rules_dir), "-o", str(table), cache=tmp_path / "c")
    assert p.returncode == 0, p.stderr
    assert table.is_file() and table.stat().st_size > 0
    out = p.stdout.decode()
    assert "1 loaded" in out and "compile" in out and str(table) in out
    assert "broken.yml" in p.stderr.decode()
    events = tmp_path / "ev.jsonl"
    events.write_text(json.dumps(MISS) + "\n" + json.dumps(HIT) + "\n", encoding="utf-8")
    m = run("match", "--rules", str(table), "--events", str(events), cache=tmp_path / "c")
    assert m.returncode == 0, m.stderr
    got = [json.loads(x) for x in m.stdout.splitlines()]
    assert len(got) == 2
    assert "detections" not in got[0]
    assert got[0]["DestinationIp"] == "10.1.2.3"
    (det,) = got[1]["detections"]
    assert det["rule_id"] == SIGMA_ID and det["author"] and det["source"] == "sigma"
    only = run(
        "match",
        "--rules",
        str(table),
        "--events",
        str(events),
        "--only-matches",
        cache=tmp_path / "c",
    )
    assert [json.loads(x)["DestinationIp"] for x in only.stdout.splitlines()] == ["8.8.8.8"]


def test_match_msgpack_from_stdin_all_shapes(tmp_path: Path) -> None:
    """Bare maps, [time, record] entries and forward-protocol messages, in input order."""
    rec = [dict(HIT, n=i) for i in range(6)]
    rec[2] = dict(MISS, n=2)
    entries = msgpack.packb([1714564800, rec[4]]) + msgpack.packb([[1714564800, {}], rec[5]])
    stream = b"".join(
        [
            msgpack.packb(rec[0]),
            msgpack.packb([1714564800, rec[1]]),
            msgpack.packb(["tag", 1714564800, rec[2], {"chunk": "abc"}]),  # Message
            msgpack.packb(["tag", [[1714564800, rec[3]]]]),  # Forward
            msgpack.packb(None),  # heartbeat
            msgpack.packb(["tag", entries, {"size": 2}]),  # PackedForward
        ]
    )
    m = run(
        "match", "--rules", str(SIGMA_SEED), "--events", "-", stdin=stream, cache=tmp_path / "c"
    )
    assert m.returncode == 0, m.stderr
    got = [json.loads(x) for x in m.stdout.splitlines()]
    assert [g["n"] for g in got] == list(range(6))
    assert [("detections" in g) for g in got] == [True, True, False, True, True, True]


def test_match_uses_and_fills_the_cache(tmp_path: Path) -> None:
    events = tmp_path / "ev.jsonl"
    events.write_text(json.dumps(HIT) + "\n", encoding="utf-8")
    cache = tmp_path / "c"
    first = run("match", "--rules", str(SIGMA_SEED), "--events", str(events), cache=cache)
    second = run("match", "--rules", str(SIGMA_SEED), "--events", str(events), cache=cache)
    assert first.returncode == second.returncode == 0
    assert first.stdout == second.stdout
    assert "[cached]" not in first.stderr.decode() and "[cached]" in second.stderr.decode()
    assert len(list((cache / "ruletag").glob("*.table"))) == 1


def test_match_bad_events_file_fails_cleanly(tmp_path: Path) -> None:
    events = tmp_path / "ev.jsonl"
    events.write_text('{"a": 1}\n{not json\n', encoding="utf-8")
    m = run("match", "--rules", str(SIGMA_SEED), "--events", str(events), cache=tmp_path / "c")
    assert m.returncode == 1
    assert "line 2" in m.stderr.decode()
    assert json.loads(m.stdout.splitlines()[0]) == {"a": 1}


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("missing.bin", None, "No such file"),
        ("truncated.bin", msgpack.packb(HIT) + msgpack.packb([1714564800, HIT])[:-3], "truncated"),
        ("badgzip.bin", msgpack.packb(["t", b"\x1f\x8b\x08\x00\x00\x80", {}]), "bad gzip"),
    ],
)
def test_match_unusable_events_fail_with_one_line(
    tmp_path: Path, name: str, data: bytes | None, message: str
) -> None:
    """A missing file, a cut msgpack stream or a broken gzip payload: exit 1, no traceback."""
    events = tmp_path / name
    if data is not None:
        events.write_bytes(data)
    m = run("match", "--rules", str(SIGMA_SEED), "--events", str(events), cache=tmp_path / "c")
    err = m.stderr.decode()
    assert m.returncode == 1 and message in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["check", "compile", "match"])
def test_a_bad_vars_file_exits_2_with_one_message(tmp_path: Path, command: str) -> None:
    varfile = tmp_path / "vars.yml"
    varfile.write_text("- not a map\n")
    args = {
        "check": ("rules", "check", str(SEEDS)),
        "compile": ("rules", "compile", str(SEEDS), "-o", str(tmp_path / "t.rtt")),
        "match": ("match", "--rules", str(SEEDS), "--events", str(varfile)),
    }[command]
    p = run(*args, "--vars", str(varfile), cache=tmp_path / "c")
    assert p.returncode == 2
    assert p.stderr.decode().startswith(f"ruletag: --vars {varfile}")
