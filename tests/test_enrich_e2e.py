"""Inline enrichment end to end: ``ruletag serve`` with rules, metrics and hot reload.

Every scenario runs a real ``ruletag serve`` subprocess between a tests/peers ``Source`` and a
``Sink`` on 127.0.0.1: the Fluent Bit seed events (both shapes) must arrive annotated with
their expected rule ids (``ruletag`` and ``ecs`` styles), unmatched records byte for byte as
sent, in order, matched ones re-tagged when asked; ``/metrics`` counts them, ``/health`` is up,
and reloads (rule-file change and SIGHUP) during traffic lose no record and no ack.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ruletag.config.load import (
    config_from_cli,
    config_from_mapping,
    load_config,
    with_cli_overrides,
)
from ruletag.config.model import BUILTIN_RULES, EnrichConfig, MetricsConfig, builtin_rules_path
from ruletag.errors import ConfigError
from ruletag.protocol import iter_entries
from support import servers
from support.paths import CAPTURES
from support.paths import SEED_RULES as SEEDS
from support.peers import Sink, Source, make_chunk
from support.seeds import EQL_ID, SIGMA_ID
from support.seeds import SIGMA_HIT as HIT

TAG = "windows.events"
#: Line 38: the real SigmaHQ rule says ``contains|all`` (see test_seed_rules.py).
OVERRIDES = {38: [SIGMA_ID]}
DETECTION_KEYS = {
    "rule_id",
    "name",
    "source",
    "severity",
    "risk_score",
    "author",
    "tactics",
    "techniques",
    "ruleset_version",
}


def seed_events() -> tuple[list[dict[str, Any]], list[list[str]]]:
    """The 52 capture records and the sorted rule ids each must get."""
    records = [
        json.loads(line)
        for line in (CAPTURES / "windows-events.jsonl").read_text("utf-8").splitlines()
        if line
    ]
    exp = json.loads((CAPTURES / "windows-events.expected.json").read_text("utf-8"))
    want = []
    for r in exp["records"]:
        ids = sorted(i for i in r["expected_rule_ids"] if not i.startswith("logsource-"))
        want.append(OVERRIDES.get(r["line"], ids))
    assert len(records) == len(want) == 52
    return records, want


def entries_of(chunks: list[Any]) -> list[tuple[str, bytes]]:
    """(tag, exact entry bytes) of every entry the sink received, in order."""
    out = []
    for c in chunks:
        out.extend((c.tag, c.entries[s:e]) for s, e in iter_entries(c.entries))
    return out


def unpack(entry: bytes) -> Any:
    return msgpack.unpackb(entry, raw=False, strict_map_key=False)


async def http_get(port: int, path: str) -> tuple[int, str]:
    status, _, body = await servers.http_get(port, path)
    return status, body.decode()


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = await http_get(port, "/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(body)
        for s in fam.samples
    }


def metrics_port(lines: list[str]) -> int:
    m = re.search(r"metrics on [\d.]+:(\d+)", lines[-1])
    assert m, lines[-1]
    return int(m.group(1))


async def send_all(port: int, chunks: list[list[dict[str, Any]]], tag: str = TAG) -> list[bytes]:
    """Send each list of records as one chunk, waiting for each ack; return the sent entries."""
    src = await Source.connect(port)
    sent: list[bytes] = []
    try:
        for recs in chunks:
            chunk = make_chunk(tag, recs)
            sent.extend(chunk.entries[s:e] for s, e in iter_entries(chunk.entries))
            cid = await src.send_chunk(chunk)
            assert await src.read_ack(timeout=10) == cid
    finally:
        await src.close()
    return sent


def stop_serve(sp: Any) -> None:
    """SIGTERM, expect exit 0, and keep the rest of its log in ``sp.lines``."""
    sp.proc.send_signal(signal.SIGTERM)
    assert sp.proc.wait(10) == 0
    sp.lines.extend(sp.proc.stdout.read().splitlines(keepends=True))


# --------------------------------------------------------------------------- config sections


def test_config_sections(tmp_path: Path) -> None:
    fwd = {"servers": ["127.0.0.1:24225"]}
    cfg = config_from_mapping({
        "forward": fwd,
        "rules": {"paths": ["rules/", BUILTIN_RULES, "/abs/x.yml"], "vars": {"a": "1", "b": [2]},
                  "cache_dir": "cache", "reload_interval": "500ms"},
        "enrich": {"key": "alerts", "style": "ECS", "retag_prefix": "alert."},
        "metrics": {"listen": "0.0.0.0:0"},
    }, tmp_path)  # fmt: skip
    assert cfg.rules is not None and cfg.enrich is not None and cfg.metrics is not None
    assert cfg.rules.paths == (str(tmp_path / "rules"), builtin_rules_path(), "/abs/x.yml")
    assert Path(builtin_rules_path(), "net_connection_win_wuauclt_network_connection.yml").is_file()
    assert cfg.rules.vars == {"a": ("1",), "b": ("2",)}
    assert cfg.rules.cache_dir == str(tmp_path / "cache") and cfg.rules.reload_interval == 0.5
    assert cfg.enrich == EnrichConfig(key="alerts", style="ecs", retag_prefix="alert.")
    assert cfg.metrics == MetricsConfig("0.0.0.0", 0)
    for bad, where in [
        ({"rules": {"paths": []}}, "rules.paths"),
        ({"rules": {"paths": ["x"], "oops": 1}}, "rules.oops"),
        ({"rules": {"paths": [3]}}, "rules.paths[0]"),
        ({"enrich": {"style": "ecs"}}, "enrich: needs a rules section"),
        ({"rules": {"paths": ["x"]}, "enrich": {"style": "splunk"}}, "enrich.style"),
        ({"rules": {"paths": ["x"]}, "enrich": {"key": ""}}, "enrich.key"),
        ({"metrics": {"listen": "h:99999"}}, "metrics.listen"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(where)):
            config_from_mapping({"forward": fwd, **bad}, tmp_path)


def test_cli_config_and_overrides(tmp_path: Path) -> None:
    cfg = config_from_cli(
        "127.0.0.1:0", "127.0.0.1:9", rules=["r1", BUILTIN_RULES], metrics="127.0.0.1:0"
    )
    assert cfg.rules is not None and cfg.rules.paths == (
        str(Path.cwd() / "r1"),
        builtin_rules_path(),
    )
    assert cfg.metrics == MetricsConfig("127.0.0.1", 0) and cfg.enrich is None
    f = tmp_path / "p.yaml"
    f.write_text(
        "forward: {servers: ['127.0.0.1:9']}\nrules: {paths: [here], reload_interval: 0}\n"
    )
    loaded = load_config(f)
    assert loaded.rules is not None and loaded.rules.paths == (str(tmp_path / "here"),)
    over = with_cli_overrides(loaded, rules=["there"], metrics="127.0.0.1:1234")
    assert over.rules is not None and over.rules.paths == (str(Path.cwd() / "there"),)
    assert over.rules.reload_interval == 0 and over.metrics == MetricsConfig("127.0.0.1", 1234)


# --------------------------------------------------------------------------- end to end


def test_seed_events_annotated_in_ruletag_style(
    arun, serve_process, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    records, want = seed_events()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the compiled-table cache

    async def scenario() -> None:
        async with Sink() as sink:
            sp = await asyncio.to_thread(serve_process, [
                "--rules", BUILTIN_RULES, "--listen", "127.0.0.1:0",
                "--forward", f"127.0.0.1:{sink.port}", "--metrics", "127.0.0.1:0",
                "--log-format", "json",
            ])  # fmt: skip
            ready = json.loads(sp.lines[-1])
            assert "2 rules loaded (ruleset " in ready["msg"]
            mport = metrics_port(sp.lines)
            assert await http_get(mport, "/health") == (200, "ok\n")
            sent = await send_all(sp.port, [records[i : i + 13] for i in range(0, 52, 13)])
            got = entries_of(sink.chunks)
            assert len(got) == 52
            versions = set()
            for n, ((tag, data), orig, ids) in enumerate(zip(got, sent, want, strict=True)):
                assert tag == TAG
                entry = unpack(data)
                dets = entry[1].pop("detections", [])
                assert sorted(d["rule_id"] for d in dets) == ids, f"line {n + 1}"
                if not ids:
                    assert data == orig, f"line {n + 1}: unmatched record changed"
                    continue
                assert entry == unpack(orig)  # only the detections key was added
                for d in dets:
                    assert set(d) == DETECTION_KEYS and d["author"] and d["techniques"]
                    assert d["severity"] == "medium" and d["source"] in ("sigma", "elastic")
                    versions.add(d["ruleset_version"])
            assert len(versions) == 1 and versions.pop() in ready["msg"]

            s = await scrape(mport)
            n_sigma = sum(ids == [SIGMA_ID] for ids in want)
            n_eql = sum(ids == [EQL_ID] for ids in want)
            assert s[("ruletag_records_in_total", ())] == 52
            assert s[("ruletag_records_out_total", ())] == 52
            assert s[("ruletag_records_matched_total", ())] == n_sigma + n_eql == 15
            assert s[("ruletag_detections_total", (("rule_id", SIGMA_ID),))] == n_sigma
            assert s[("ruletag_detections_total", (("rule_id", EQL_ID),))] == n_eql
            assert s[("ruletag_detections_by_severity_total", (("severity", "medium"),))] == 15
            assert s[("ruletag_rules_loaded", ())] == 2
            assert s[("ruletag_stage_duration_seconds_count", (("stage", "decode"),))] >= 1
            assert s[("ruletag_stage_duration_seconds_count", (("stage", "filter"),))] == 4
            assert s[("ruletag_stage_duration_seconds_count", (("stage", "forward"),))] == 4
            assert s[("ruletag_downstream_up", (("server", f"127.0.0.1:{sink.port}"),))] == 1
            await asyncio.to_thread(stop_serve, sp)
        closed = [json.loads(ln) for ln in sp.lines if '"connection_closed"' in ln]
        assert closed and all(c["reason"] for c in closed)

    arun(scenario(), timeout=60)


def test_ecs_style_and_retag_from_config(arun, serve_process, tmp_path: Path) -> None:
    records, want = seed_events()
    rules = tmp_path / "rules"
    shutil.copytree(SEEDS, rules)

    async def scenario() -> None:
        async with Sink() as sink:
            cfg = tmp_path / "pipeline.yaml"
            cfg.write_text(
                "listen: {host: 127.0.0.1, port: 0}\n"
                f"forward: {{servers: ['127.0.0.1:{sink.port}']}}\n"
                "rules: {paths: [rules], cache_dir: cache}\n"
                "enrich: {style: ecs, retag_prefix: 'alert.'}\n"
            )
            sp = await asyncio.to_thread(serve_process, ["--config", str(cfg)])
            assert (tmp_path / "cache").is_dir()  # relative to the config file
            sent = await send_all(sp.port, [records[:26], records[26:]])
            got = entries_of(sink.chunks)
            assert len(got) == 52
            for n, ((tag, data), orig, ids) in enumerate(zip(got, sent, want, strict=True)):
                if not ids:
                    assert (tag, data) == (TAG, orig), f"line {n + 1}"
                    continue
                assert tag == f"alert.{TAG}", f"line {n + 1}"
                rec = unpack(data)[1]
                assert "detections" not in rec
                assert rec["rule"]["id"] == ids and rec["rule"]["name"] and rec["rule"]["author"]
                assert rec["rule"]["ruleset"].startswith("ruletag-")
                assert rec["threat"]["framework"] == "MITRE ATT&CK"
                assert rec["threat"]["technique"]["id"] and rec["threat"]["tactic"]["name"]
                assert rec["event"]["severity"] == 2 and rec["event"]["risk_score"] > 0
                orig_rec = unpack(orig)[1]
                assert {k: v for k, v in rec.items() if k not in ("rule", "threat", "event")} == {
                    k: v for k, v in orig_rec.items() if k not in ("rule", "threat", "event")
                }
                if isinstance(orig_rec.get("event"), dict):  # ECS shape: event.* kept, merged
                    assert rec["event"]["id"] == orig_rec["event"]["id"]
            # order: the tags alternate in runs, so the sink saw more chunks than were sent
            assert len(sink.chunks) > 2
            await asyncio.to_thread(stop_serve, sp)

    arun(scenario(), timeout=60)


# --------------------------------------------------------------------------- reload


async def wait_metric(
    port: int, key: tuple[str, tuple[tuple[str, str], ...]], value: float, timeout: float = 10.0
) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        s = await scrape(port)
        if s.get(key) == value:
            return
        assert asyncio.get_running_loop().time() < deadline, f"{key} != {value}: {s.get(key)}"
        await asyncio.sleep(0.05)


def test_reloads_during_traffic_lose_nothing(arun, serve_process, tmp_path: Path) -> None:
    records, _ = seed_events()
    ecs_hit = records[0]  # matches the EQL rule only
    rules = tmp_path / "rules"
    rules.mkdir()
    sigma = SEEDS / "net_connection_win_wuauclt_network_connection.yml"
    eql = SEEDS / "potential_wsus_abuse_for_lateral_movement.toml"
    shutil.copy(sigma, rules / sigma.name)

    async def scenario() -> None:
        async with Sink() as sink:
            cfg = tmp_path / "pipeline.yaml"
            cfg.write_text(
                "listen: {host: 127.0.0.1, port: 0}\n"
                f"forward: {{servers: ['127.0.0.1:{sink.port}']}}\n"
                "rules: {paths: [rules], cache_dir: cache, reload_interval: 100ms}\n"
                "metrics: {listen: '127.0.0.1:0'}\n"
            )
            sp = await asyncio.to_thread(serve_process, ["--config", str(cfg)])
            mport = metrics_port(sp.lines)
            reloads_ok = ("ruletag_rule_reloads_total", (("result", "ok"),))
            stop = asyncio.Event()
            seq = 0
            acked = 0

            async def traffic(conn_no: int) -> None:
                nonlocal seq, acked
                src = await Source.connect(sp.port)
                try:
                    while not stop.is_set():
                        batch = []
                        for rec in (HIT, ecs_hit, {"log": "miss"}):
                            seq += 1
                            batch.append({**rec, "seq": seq, "conn": conn_no})
                        cid = await src.send_chunk(make_chunk(TAG, batch))
                        assert await src.read_ack(timeout=10) == cid
                        acked += len(batch)
                finally:
                    await src.close()

            senders = [asyncio.create_task(traffic(i)) for i in range(3)]
            await asyncio.sleep(0.3)
            shutil.copy(eql, rules / eql.name)  # file change -> reload with 2 rules
            await wait_metric(mport, reloads_ok, 1)
            await wait_metric(mport, ("ruletag_rules_loaded", ()), 2)
            await asyncio.sleep(0.2)
            sp.proc.send_signal(signal.SIGHUP)  # unchanged rules: still a reload
            await wait_metric(mport, reloads_ok, 2)
            rules.rename(tmp_path / "away")  # rule folder gone: refused, the old set stays
            await wait_metric(mport, ("ruletag_rule_reloads_total", (("result", "failed"),)), 1)
            assert (await scrape(mport))[("ruletag_rules_loaded", ())] == 2
            await asyncio.sleep(0.2)
            (tmp_path / "away").rename(rules)
            await wait_metric(mport, reloads_ok, 3)
            stop.set()
            await asyncio.gather(*senders)
            assert acked == seq > 30
            got = await sink.wait_records(seq, timeout=10)
            assert sorted(r["seq"] for r in got) == list(range(1, seq + 1))  # nothing lost
            # the EQL rule appeared mid-stream: later ECS hits carry it, earlier ones do not
            ecs = [r for r in got if r.get("event", {}).get("id") == "ecs-01"]
            flags = [bool(r.get("detections")) for r in sorted(ecs, key=lambda r: r["seq"])]
            assert not flags[0] and flags[-1]
            assert all(
                r["detections"][0]["rule_id"] == SIGMA_ID for r in got if r.get("EventID") == 3
            )
            s = await scrape(mport)
            assert s[("ruletag_records_in_total", ())] == seq
            assert s[("ruletag_connections_total", ())] == 3
            assert s[("ruletag_submit_errors_total", ())] == 0
            await asyncio.to_thread(stop_serve, sp)
        text = "".join(sp.lines)
        assert "rules reloaded (rule files changed" in text and "rules reloaded (SIGHUP)" in text

    arun(scenario(), timeout=90)


def test_health_flips_during_shutdown_in_process(
    arun, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``Relay.serve`` in-process: /health is 200 while serving, 503 once shutdown began."""
    from ruletag.runtime.relay import Relay

    async def scenario() -> None:
        async with Sink(ack=False) as sink:
            cfg = config_from_mapping({
                "listen": {"host": "127.0.0.1", "port": 0, "shutdown_timeout": 5},
                "forward": {"servers": [f"127.0.0.1:{sink.port}"], "ack_timeout": 1,
                            "retry_backoff_base": 0.05, "retry_backoff_max": 0.2},
                "rules": {"paths": [BUILTIN_RULES], "cache_dir": str(tmp_path / "c"),
                          "reload_interval": 0},
                "metrics": {"listen": "127.0.0.1:0"},
            })  # fmt: skip
            relay = Relay(cfg)
            task = asyncio.create_task(relay.serve())
            while not any("ruletag ready" in r.getMessage() for r in caplog.records):
                assert not task.done(), task
                await asyncio.sleep(0.02)
            ready = [m for r in caplog.records if "ruletag ready" in (m := r.getMessage())]
            mport = metrics_port(ready)
            lport = int(ready[0].split("listening on 127.0.0.1:")[1].split(",")[0])
            assert await http_get(mport, "/health") == (200, "ok\n")
            src = await Source.connect(lport)
            cid = await src.send_chunk(make_chunk(TAG, [HIT]))
            await sink.wait_records(1)  # delivered, but the sink withholds its ack
            relay.should_exit = True
            deadline = asyncio.get_running_loop().time() + 10
            while (health := await http_get(mport, "/health"))[0] == 200:  # until it stops
                assert asyncio.get_running_loop().time() < deadline, "still healthy"
                await asyncio.sleep(0.02)
            assert health == (503, "listener not up\n")
            sink.ack = True  # the resend after ack_timeout is acked: the chunk completes
            assert await src.read_ack(timeout=10) == cid
            await src.close()
            assert await asyncio.wait_for(task, 10) == 0
            assert sink.records[-1]["detections"][0]["rule_id"] == SIGMA_ID

    with caplog.at_level("INFO", logger="ruletag"):
        arun(scenario(), timeout=30)


def test_serve_with_unusable_rules_exits_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ruletag", "serve", "--rules", str(tmp_path / "missing.yml"),
         "--listen", "127.0.0.1:0", "--forward", "127.0.0.1:1"],
        capture_output=True, text=True, timeout=30, cwd=tmp_path,
        env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")},
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"ruletag: invalid config: rules: rule path missing: {tmp_path / 'missing.yml'}"
    ]


def test_fluent_logger_client_records_are_annotated(
    arun, serve_process, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PyPI fluent-logger (Message mode, nanosecond EventTime) through ``serve --rules``."""
    from fluent import sender

    records, want = seed_events()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))

    async def scenario() -> None:
        async with Sink() as sink:
            sp = await asyncio.to_thread(serve_process, [
                "--rules", BUILTIN_RULES, "--listen", "127.0.0.1:0",
                "--forward", f"127.0.0.1:{sink.port}",
            ])  # fmt: skip

            def emit_all() -> None:
                s = sender.FluentSender(
                    "windows", host="127.0.0.1", port=sp.port, nanosecond_precision=True
                )
                try:
                    for rec in records:
                        assert s.emit("events", rec), s.last_error
                finally:
                    s.close()

            await asyncio.to_thread(emit_all)
            got = await sink.wait_records(52, timeout=10)
            assert [t for t, _, _ in sink.entries] == [TAG] * 52
            for n, (rec, ids) in enumerate(zip(got, want, strict=True)):
                assert sorted(d["rule_id"] for d in rec.pop("detections", [])) == ids, n + 1
            assert got == records
            await asyncio.to_thread(stop_serve, sp)

    arun(scenario(), timeout=60)
