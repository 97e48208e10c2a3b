"""``ruletag test`` and ``ruletag validate`` on every shipped pipeline; the tests: block runner."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from ruletag.commands.test import lookup, parse_tests
from ruletag.errors import ConfigError
from support.paths import SAMPLE, SEED_RULES
from support.peers import Source, make_chunk
from support.seeds import EQL_ID as WSUS

REPO = Path(__file__).resolve().parents[1]
PIPELINES = sorted((REPO / "pipelines").glob("*.yaml"))
FLUENT_BIT = REPO / "pipelines" / "fluent-bit"


def _ruletag(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """Run the installed console script (the same entry point a user runs)."""
    script = Path(sys.executable).with_name("ruletag")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "ruletag"]
    return subprocess.run(
        [*cmd, *args], capture_output=True, text=True, timeout=120, cwd=cwd, check=False
    )


def test_every_shipped_pipeline_has_tests() -> None:
    assert {p.name for p in PIPELINES} >= {"default.yaml", "production.yaml"}
    for p in PIPELINES:
        data = yaml.safe_load(p.read_text("utf-8"))
        assert data.get("tests"), f"{p.name} has no tests: block"


@pytest.mark.parametrize("pipeline", PIPELINES, ids=lambda p: p.name)
def test_ruletag_test_passes_on_shipped_pipeline(pipeline: Path) -> None:
    proc = _ruletag("test", str(pipeline))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    n = len(yaml.safe_load(pipeline.read_text("utf-8"))["tests"])
    assert proc.stdout.count("\nPASS ") + proc.stdout.startswith("PASS ") == n
    assert f"{n} passed, 0 failed" in proc.stdout


@pytest.mark.parametrize("pipeline", PIPELINES, ids=lambda p: p.name)
def test_ruletag_validate_passes_on_shipped_pipeline(pipeline: Path) -> None:
    proc = _ruletag("validate", str(pipeline))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith(f"OK {pipeline}")


def test_default_pipeline_loads_both_seed_rules() -> None:
    proc = _ruletag("validate", "pipelines/default.yaml")
    assert "OK pipelines/default.yaml: 2 rules" in proc.stdout
    assert "0 unsupported, 0 invalid" in proc.stdout


def _write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


HEAD = f"""
outputs: [stdout]
rules: {{paths: ["{SEED_RULES}"], cache_dir: cache}}
"""

ECS_HIT = """
        event: {type: [start], category: [process]}
        host: {os: {type: windows}}
        process:
          name: PsExec64.exe
          executable: 'C:\\Windows\\SoftwareDistribution\\Download\\Install\\PsExec64.exe'
          parent: {name: wuauclt.exe}
"""


def test_failing_tests_exit_1_with_reasons(tmp_path: Path) -> None:
    cfg = _write(
        tmp_path,
        HEAD
        + f"""
tests:
  - name: passes
    input:
      tag: t
      record:{ECS_HIT}
    expect: {{rule_ids: [{WSUS}]}}
  - name: wrong rule id
    input:
      tag: t
      record:{ECS_HIT}
    expect: {{rule_ids: [not-this-one]}}
  - name: hit expected to be silent
    input:
      tag: t
      record:{ECS_HIT}
    expect: {{no_detection: true}}
  - name: wrong field and tag
    input: {{tag: t, record: {{a: 1}}}}
    expect: {{tag: other, fields: {{a: 2, b.c: 3}}}}
""",
    )
    proc = _ruletag("test", str(cfg))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    assert "PASS passes" in out
    assert (
        f"FAIL wrong rule id: record 1 (tests[1].input): rule_ids ['{WSUS}'] != "
        "expected ['not-this-one']" in out
    )
    assert (
        f"FAIL hit expected to be silent: record 1 (tests[2].input): expected no detection, "
        f"got rule_ids ['{WSUS}']" in out
    )
    assert "FAIL wrong field and tag: record 1 (tests[3].input): tag 't' != expected 'other'" in out
    assert "field a = 1 != expected 2" in out and "field b.c missing (expected 3)" in out
    assert "1 passed, 3 failed" in out


def test_records_file_and_per_record_outputs(tmp_path: Path) -> None:
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "r.jsonl").write_text(
        '{"log": "miss"}\n\n{"EventID": 3, "Channel": "Microsoft-Windows-Sysmon/Operational", '
        '"Image": "C:\\\\Windows\\\\System32\\\\wuauclt.exe", "DestinationIp": "1.1.1.1", '
        '"CommandLine": "wuauclt.exe /RunHandlerComServer"}\n',
        encoding="utf-8",
    )
    cfg = _write(
        tmp_path,
        HEAD
        + """
enrich: {retag_prefix: "alert."}
tests:
  - name: file records in order
    inputs:
      - {tag: w, records_file: ev/r.jsonl}
    outputs:
      - {no_detection: true, tag: w}
      - {rule_ids: [c649a6c7-cd8c-4a78-9c04-000fc76df954], tag: alert.w,
         fields: {detections.0.severity: medium, DestinationIp: 1.1.1.1}}
""",
    )
    proc = _ruletag("test", str(cfg), cwd=tmp_path.parent)  # relative to the config, not cwd
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS file records in order" in proc.stdout


SEQUENCE_RULE = SAMPLE / (
    "elastic/rules/macos/collection_sensitive_file_access_followed_by_compression.toml"
)
FILE_OPEN = (
    "{'@timestamp': '2026-03-01T10:00:00Z', event: {category: [file], action: open}, "
    "host: {os: {type: macos}}, process: {entity_id: p1}, file: {name: s.db}}"
)
FILE_ZIP = (
    "{'@timestamp': '2026-03-01T10:00:20Z', event: {category: [file], action: modification}, "
    "host: {os: {type: macos}}, process: {entity_id: p1}, "
    "file: {name: o.zip, extension: zip, path: /tmp/o.zip}}"
)


def test_pipeline_tests_express_sequences_each_from_an_empty_state(tmp_path: Path) -> None:
    """An EQL sequence in a tests: block: the second step completes it; a test holding only
    the second step, after one holding only the first, sees no detection (each test starts
    with empty stateful state)."""
    cfg = _write(
        tmp_path,
        f"""
outputs: [stdout]
rules: {{paths: ["{SEQUENCE_RULE}"], cache_dir: cache}}
tests:
  - name: the first step alone
    inputs: [{{record: {FILE_OPEN}}}]
    outputs: [{{no_detection: true}}]
  - name: the second step alone
    inputs: [{{record: {FILE_ZIP}}}]
    outputs: [{{no_detection: true}}]
  - name: open then compress
    inputs: [{{record: {FILE_OPEN}}}, {{record: {FILE_ZIP}}}]
    outputs:
      - {{no_detection: true}}
      - fields: {{detections.0.sequence.keys.0: p1, detections.0.sequence.events.1.timestamp:
          '2026-03-01T10:00:20Z'}}
""",
    )
    proc = _ruletag("test", str(cfg), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS open then compress" in proc.stdout
    assert "PASS the second step alone" in proc.stdout


@pytest.mark.parametrize(
    ("tests_block", "message"),
    [
        ("tests: []", "tests: must be a non-empty list"),
        ("tests: [{name: x, input: {record: {a: 1}}}]", "tests[0]: needs exactly one of expect"),
        (
            "tests: [{name: x, input: {record: {a: 1}}, expect: {rule_id: [a]}}]",
            "tests[0].expect.rule_id: unknown key",
        ),
        (
            "tests: [{name: x, input: {records_file: nope.jsonl}, expect: {no_detection: true}}]",
            "cannot read",
        ),
        (
            "tests: [{name: x, inputs: [{record: {a: 1}}], outputs: [{tag: a}, {tag: b}]}]",
            "has 2 items for 1 input records",
        ),
    ],
)
def test_bad_tests_block_exits_2(tmp_path: Path, tests_block: str, message: str) -> None:
    cfg = _write(tmp_path, "outputs: [stdout]\n" + tests_block + "\n")
    proc = _ruletag("test", str(cfg))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "INVALID" in proc.stdout and message in proc.stdout
    # validate checks the tests block too
    assert _ruletag("validate", str(cfg)).returncode == 1


def test_bad_config_and_missing_rules_are_invalid(tmp_path: Path) -> None:
    bad_yaml = _write(tmp_path, "outputs: [stdout\n", "bad.yaml")
    missing = _write(
        tmp_path,
        "outputs: [stdout]\nrules: {paths: [no-such-dir]}\n"
        "tests: [{name: t, input: {record: {}}, expect: {tag: test}}]\n",
        "m.yaml",
    )
    for cfg in (bad_yaml, missing):
        proc = _ruletag("validate", str(cfg))
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "INVALID" in proc.stderr
        assert _ruletag("test", str(cfg)).returncode == 2
    err = _ruletag("validate", str(missing)).stderr
    assert f"INVALID {missing}: rules: rule path missing" in err


def test_validate_reports_unusable_rules_without_failing(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    for f in SEED_RULES.iterdir():
        if f.suffix in (".yml", ".toml"):
            (rules / f.name).write_bytes(f.read_bytes())
    (rules / "broken.yml").write_text("title: x\ndetection: [\n", encoding="utf-8")
    cfg = _write(tmp_path, "outputs: [stdout]\nrules: {paths: [rules], cache_dir: c}\n")
    proc = _ruletag("validate", str(cfg))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 rules" in proc.stdout and "1 invalid" in proc.stdout
    assert "broken.yml" in proc.stdout


def test_parse_tests_in_process(tmp_path: Path) -> None:
    tests = parse_tests(
        [
            {
                "name": "a",
                "input": {"tag": "x", "record": {"k": 1}, "time": 5},
                "expect": {"rule_ids": ["r2", "r1"], "tag": "y"},
            }
        ],
        tmp_path,
    )
    (t,) = tests
    assert t.records[0].tag == "x" and t.records[0].time == 5 and not t.per_record
    assert t.expectations[0].rule_ids == frozenset({"r1", "r2"})
    with pytest.raises(ConfigError, match="duplicate test name"):
        parse_tests([{"name": "a", "input": {"record": {}}, "expect": {"tag": "t"}}] * 2, tmp_path)
    with pytest.raises(ConfigError, match="contradicts"):
        parse_tests(
            [
                {
                    "name": "a",
                    "input": {"record": {}},
                    "expect": {"no_detection": True, "rule_ids": ["x"]},
                }
            ],
            tmp_path,
        )


def test_lookup_paths() -> None:
    rec = {"a": {"b": [{"c": 1}, {"c": 2}]}, "x.y": {"z": 3}, "p": {"q.r": 4}}
    assert lookup(rec, "a.b.1.c") == (True, 2)
    assert lookup(rec, "a.b.-1.c") == (True, 2)
    assert lookup(rec, "x.y.z") == (True, 3)
    assert lookup(rec, "p.q.r") == (True, 4)
    assert lookup(rec, "a.b.5") == (False, None)
    assert lookup(rec, "a.missing") == (False, None)


# ------------------------------------------------------------------------- Fluent Bit configs


def _classic(path: Path) -> list[tuple[str, dict[str, str]]]:
    sections: list[tuple[str, dict[str, str]]] = []
    for line in path.read_text("utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            sections.append((line.strip("[]").upper(), {}))
        else:
            key, _, value = line.partition(" ")
            sections[-1][1][key.lower()] = value.strip()
    return sections


def test_fluent_bit_agent_configs_forward_with_acks_tls_and_key() -> None:
    (out,) = [s for name, s in _classic(FLUENT_BIT / "agent.conf") if name == "OUTPUT"]
    data = yaml.safe_load((FLUENT_BIT / "agent.yaml").read_text("utf-8"))
    (yout,) = data["pipeline"]["outputs"]
    for o in (out, {k.lower(): str(v) for k, v in yout.items()}):
        assert o["name"] == "forward"
        assert o["require_ack_response"] in ("on", "True")
        assert o["retry_limit"] == "no_limits"
        assert o["shared_key"] and o["self_hostname"] != "ruletag-in"
        assert o["tls"] in ("on", "True") and o["tls.verify"] in ("on", "True")
        assert "retain_metadata_in_forward_mode" in o


def test_fluent_bit_aggregator_configs_accept_forward_with_key_and_tls() -> None:
    inputs = [s for name, s in _classic(FLUENT_BIT / "aggregator.conf") if name == "INPUT"]
    data = yaml.safe_load((FLUENT_BIT / "aggregator.yaml").read_text("utf-8"))
    for i in (inputs[0], {k.lower(): str(v) for k, v in data["pipeline"]["inputs"][0].items()}):
        assert i["name"] == "forward"
        assert i["shared_key"] and i["self_hostname"] != "ruletag-out"
        assert i["tls"] in ("on", "True") and i["tls.crt_file"] and i["tls.key_file"]


# ---------------------------------------------------------------- the default pipeline, served


def test_default_pipeline_served_prints_annotated_records(
    tmp_path: Path, serve_process: Any
) -> None:
    data = yaml.safe_load((REPO / "pipelines" / "default.yaml").read_text("utf-8"))
    data["listen"]["port"] = 0  # the real file says 24224; keep the test off fixed ports
    data["rules"]["cache_dir"] = str(tmp_path / "cache")
    cfg = tmp_path / "default.yaml"
    cfg.write_text(yaml.safe_dump(data), encoding="utf-8")
    sp = serve_process(["--config", str(cfg)])
    assert "2 rules loaded" in sp.lines[-1]
    hit = {
        "EventID": 3,
        "Channel": "Microsoft-Windows-Sysmon/Operational",
        "Image": "C:\\Windows\\System32\\wuauclt.exe",
        "DestinationIp": "8.8.8.8",
        "CommandLine": "wuauclt.exe /RunHandlerComServer",
    }
    miss = {**hit, "DestinationIp": "10.0.0.1"}

    async def send() -> None:
        src = await Source.connect(sp.port)
        try:
            chunk_id = await src.send_chunk(make_chunk("windows.sysmon", [miss, hit, miss]))
            assert await src.read_ack() == chunk_id
        finally:
            await src.close()

    asyncio.run(asyncio.wait_for(send(), 20))
    rest = sp.stop()
    assert sp.proc.returncode == 0, rest
    printed = [json.loads(ln) for ln in rest.splitlines() if ln.startswith('{"tag"')]
    assert [p["record"]["DestinationIp"] for p in printed] == ["10.0.0.1", "8.8.8.8", "10.0.0.1"]
    assert "detections" not in printed[0]["record"] and "detections" not in printed[2]["record"]
    (det,) = printed[1]["record"]["detections"]
    assert det["rule_id"] == "c649a6c7-cd8c-4a78-9c04-000fc76df954"
    assert {p["tag"] for p in printed} == {"windows.sysmon"}


def test_serve_rules_without_forward_writes_stdout(serve_process: Any) -> None:
    sp = serve_process(["--rules", "builtin:seeds", "--listen", "127.0.0.1:0"])
    assert "forwarding to stdout" in sp.lines[-1]
    rec = {
        "EventID": 1,
        "Channel": "Microsoft-Windows-Sysmon/Operational",
        "Image": "C:\\Windows\\SoftwareDistribution\\Download\\Install\\PsExec64.exe",
        "ParentImage": "C:\\Windows\\System32\\wuauclt.exe",
    }

    async def send() -> None:
        src = await Source.connect(sp.port)
        try:
            chunk_id = await src.send_chunk(make_chunk("sysmon", [rec]))
            assert await src.read_ack() == chunk_id
        finally:
            await src.close()

    asyncio.run(asyncio.wait_for(send(), 20))
    rest = sp.stop()
    (line,) = [json.loads(ln) for ln in rest.splitlines() if ln.startswith('{"tag"')]
    assert [d["rule_id"] for d in line["record"]["detections"]] == [WSUS]


def test_serve_needs_a_destination_or_rules() -> None:
    proc = _ruletag("serve", "--listen", "127.0.0.1:0")
    assert proc.returncode == 2 and "serve needs --config FILE" in proc.stderr
