"""Stateful rules in the relay (issue 16): a real relay on 127.0.0.1 between a tests/peers
``Source`` and ``Sink`` evaluates EQL sequences and thresholds: the completing record carries
its annotation, every record passes in order and unmatched ones byte for byte; alert records on
``enrich.alert_tag``; state survives a hot reload that keeps the rules; checkpoints and a
kill -9 restart; the ``ruletag_stateful`` gauges."""

from __future__ import annotations

import asyncio
import json
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

from ruletag.config.load import config_from_mapping
from ruletag.enrich.stateful import StatefulStage
from ruletag.protocol import iter_entries
from ruletag.rules.elastic import load_elastic_file
from ruletag.runtime.relay import Relay
from support.paths import CORRELATION, SAMPLE
from support.peers import Sink, Source, eventually, make_chunk
from support.servers import http_get

SEQ_RULE = SAMPLE / (
    "elastic/rules/macos/collection_sensitive_file_access_followed_by_compression.toml"
)
STOP_RULE = SAMPLE / "elastic/rules/windows/impact_stop_process_service_threshold.toml"
TAG = "endpoint.events"


def file_event(i: int, ts: str, entity: str, action: str, **file: str) -> dict[str, Any]:
    return {
        "@timestamp": ts,
        "event": {"id": f"e{i}", "category": ["file"], "action": action},
        "host": {"os": {"type": "macos"}},
        "process": {"entity_id": entity},
        "file": file,
    }


def open_event(i: int, second: int, entity: str) -> dict[str, Any]:
    return file_event(i, f"2026-03-01T10:00:{second:02d}.000Z", entity, "open", name="s.db")


def zip_event(i: int, second: int, entity: str) -> dict[str, Any]:
    ts = f"2026-03-01T10:00:{second:02d}.000Z"
    return file_event(
        i, ts, entity, "modification", extension="zip", path="/tmp/o.zip", name="o.zip"
    )


def stop_event(n: int, second: int, host: str) -> dict[str, Any]:
    return {
        "@timestamp": f"2026-03-01T10:01:{second:02d}.000Z",
        "event": {"id": f"s{n}", "category": "process", "type": "start"},
        "host": {"id": host, "os": {"type": "windows"}},
        "process": {"name": "taskkill.exe", "args": ["/F", "/IM", f"p{n}.exe"]},
    }


def noise(n: int) -> dict[str, Any]:
    return {"@timestamp": "2026-03-01T10:00:00.000Z", "event": {"id": f"n{n}"}, "msg": "x" * n}


def make_config(rules: list[Path], sink_port: int, **extra: Any) -> Any:
    data: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "forward": {"servers": [f"127.0.0.1:{sink_port}"], "ack_timeout": 5},
        "rules": {"paths": [str(p) for p in rules], "reload_interval": 0},
        **extra,
    }
    return config_from_mapping(data)


async def send(port: int, chunks: list[list[dict[str, Any]]]) -> list[bytes]:
    """Each list of records as one chunk, acked one by one; the entry bytes sent, in order."""
    src = await Source.connect(port)
    sent: list[bytes] = []
    try:
        for recs in chunks:
            chunk = make_chunk(TAG, recs)
            sent.extend(chunk.entries[s:e] for s, e in iter_entries(chunk.entries))
            cid = await src.send_chunk(chunk)
            assert await src.read_ack(timeout=10) == cid
    finally:
        await src.close()
    return sent


def received(sink: Sink) -> list[tuple[str, bytes]]:
    out = []
    for c in sink.chunks:
        out.extend((c.tag, c.entries[s:e]) for s, e in iter_entries(c.entries))
    return out


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def traffic() -> list[list[dict[str, Any]]]:
    """Three chunks: sequence steps among noise and 15 threshold hits; e3 completes p1's
    sequence (e4 is outside maxspan for p2), s13 brings host h1 to 10 stops."""
    first = [open_event(1, 0, "p1"), noise(1), open_event(2, 1, "p2"), noise(2)]
    second = [noise(3), zip_event(3, 20, "p1"), noise(4), zip_event(4, 45, "p2")]
    third = [stop_event(n, n, "h1" if n % 4 else "h2") for n in range(1, 16)] + [noise(5)]
    return [first, second, third]


SEQUENCE_BLOCK = {
    "keys": ["p1"],
    "events": [
        {"timestamp": "2026-03-01T10:00:00.000Z", "id": "e1"},
        {"timestamp": "2026-03-01T10:00:20.000Z", "id": "e3"},
    ],
}
THRESHOLD_BLOCK = {
    "terms": [{"field": "host.id", "value": "h1"}],
    "count": 10,
    "window": {"start": "2026-03-01T09:52:13.000Z", "end": "2026-03-01T10:01:13.000Z"},
}


def check_annotated(got: list[tuple[str, bytes]], sent: list[bytes]) -> dict[str, Any]:
    """Order and count unchanged, unannotated entries byte for byte; the annotations by id."""
    assert len(got) == len(sent)
    found: dict[str, Any] = {}
    for (tag, data), orig in zip(got, sent, strict=True):
        assert tag == TAG
        rec = unpack(data)
        assert rec[1]["event"]["id"] == unpack(orig)[1]["event"]["id"]
        if "detections" in rec[1]:
            found[rec[1]["event"]["id"]] = rec[1]["detections"]
        else:
            assert data == orig
    return found


def test_relay_annotates_completing_records(
    arun: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    seq_id = load_elastic_file(SEQ_RULE)[0].id
    stop_id = load_elastic_file(STOP_RULE)[0].id

    async def scenario() -> None:
        async with Sink() as sink:
            relay = Relay(make_config([SEQ_RULE, STOP_RULE], sink.port))
            await relay.startup()
            try:
                assert relay.server is not None
                sent = await send(relay.server.port, traffic())
                got = received(sink)
                live = relay.enrichment.live
                assert live is not None and live.filter is not None
                stage = live.filter.stateful
                assert stage is not None
                stats = stage.stats()
            finally:
                await relay.shutdown()
        found = check_annotated(got, sent)
        assert sorted(found) == ["e3", "s13"]
        (d,) = found["e3"]
        assert d["rule_id"] == seq_id and d["sequence"] == SEQUENCE_BLOCK
        assert d["ruleset_version"]
        (t,) = found["s13"]
        assert t["rule_id"] == stop_id and t["threshold"] == THRESHOLD_BLOCK
        assert stats["sequence"]["completed"] == 1 and stats["threshold"]["fired"] == 1
        assert stats["sequence"]["keys"] == 0  # e4 took p2's partial, outside maxspan

    arun(scenario(), timeout=120)


def test_alert_tag_adds_one_alert_record_after_the_completing_one(
    arun: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))

    async def scenario() -> None:
        async with Sink() as sink:
            cfg = make_config([SEQ_RULE], sink.port, enrich={"alert_tag": "ruletag.alerts"})
            relay = Relay(cfg)
            await relay.startup()
            try:
                assert relay.server is not None
                sent = await send(relay.server.port, traffic()[:2])
            finally:
                await relay.shutdown()
            got = received(sink)
        assert len(got) == len(sent) + 1
        ids = [unpack(d)[1].get("event", {}).get("id") for _, d in got]
        assert ids[:7] == [unpack(s)[1]["event"]["id"] for s in sent[:6]] + [None]
        tag, data = got[6]
        assert tag == "ruletag.alerts" and [t for t, _ in got].count("ruletag.alerts") == 1
        time_, alert = unpack(data)
        completing = unpack(got[5][1])
        assert completing[1]["event"]["id"] == "e3"
        assert time_ == completing[0]
        assert alert["source_tag"] == TAG
        assert alert["detection"] == completing[1]["detections"][0]
        assert alert["detection"]["sequence"] == SEQUENCE_BLOCK

    arun(scenario(), timeout=120)


def test_reload_keeps_state_of_unchanged_rules(
    arun: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Step 1, a reload that adds a rule file, step 2: the sequence still completes."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    rules = tmp_path / "rules"
    rules.mkdir()
    shutil.copy(SEQ_RULE, rules / "seq.toml")

    async def scenario() -> None:
        async with Sink() as sink:
            relay = Relay(make_config([rules], sink.port))
            await relay.startup()
            try:
                assert relay.server is not None and relay.enrichment.reloader is not None
                live = relay.enrichment.live
                assert live is not None and live.filter is not None
                before = live.filter
                await send(relay.server.port, traffic()[:1])
                shutil.copy(STOP_RULE, rules / "stop.toml")
                assert await relay.enrichment.reloader.reload("test")
                assert live.filter is not before and live.filter.stateful is not None
                assert live.filter.stateful.rule_counts() == {"sequence": 1, "threshold": 1}
                await send(relay.server.port, traffic()[1:2])
            finally:
                await relay.shutdown()
            got = received(sink)
        done = [unpack(d)[1] for _, d in got if "detections" in unpack(d)[1]]
        assert [r["event"]["id"] for r in done] == ["e3"]
        assert done[0]["detections"][0]["sequence"] == SEQUENCE_BLOCK

    arun(scenario(), timeout=120)


def test_stage_snapshot_round_trip_through_json() -> None:
    rules = load_elastic_file(SEQ_RULE) + load_elastic_file(STOP_RULE)
    a = StatefulStage.of(rules)
    assert a is not None
    records = [r for chunk in traffic() for r in chunk]
    head, tail = records[:3] + records[8:15], records[3:8] + records[15:]
    chunk = make_chunk(TAG, head)
    assert not a.results(chunk.entries, list(iter_entries(chunk.entries)))
    snap = json.loads(json.dumps(a.snapshot()))
    b = StatefulStage.of(rules)
    assert b is not None
    assert b.restore(snap) == 2
    assert json.loads(json.dumps(b.snapshot())) == snap
    chunk = make_chunk(TAG, tail)
    done = b.results(chunk.entries, list(iter_entries(chunk.entries)))
    got = {tail[i]["event"]["id"]: [type(r).__name__ for r in rs] for i, rs in done.items()}
    assert got == {"e3": ["Completion"], "s13": ["Alert"]}
    # a rule whose definition changed gets no state back
    snap["engines"]["sequence"]["rules"][rules[0].id]["digest"] = "other"
    d = StatefulStage.of(rules)
    assert d is not None and d.restore(snap) == 1  # only the threshold rule


def test_a_cached_stage_reads_only_the_stateful_rules(tmp_path: Path) -> None:
    """A stage built from the caches (the rule table's and the step tables') reads the
    stateful rules of the table and none of the engines' step rules: the combined step
    table is found by the step rules' ids, which are at hand unread."""
    from ruletag.rules.compiler import build, load, save
    from ruletag.rules.compiler.rulelist import StoredRules

    rules = load_elastic_file(SEQ_RULE) + load_elastic_file(STOP_RULE)
    save(build(rules, None, "v-stage"), tmp_path / "t.table")
    cache = tmp_path / "steps"
    first = StatefulStage.of(load(tmp_path / "t.table").rules, None, cache, "v-stage")
    assert first is not None and first.steps is not None  # compiled, then cached
    table = load(tmp_path / "t.table")
    assert isinstance(table.rules, StoredRules) and table.rules.loaded() == 0
    stage = StatefulStage.of(table.rules, None, cache, "v-stage")
    assert stage is not None and stage.steps is not None
    assert table.rules.loaded() == len(rules) == 2  # both stateful here
    for e in stage.engines:
        step_rules = e.table.rules  # type: ignore[attr-defined]
        assert isinstance(step_rules, StoredRules) and step_rules.loaded() == 0, e.kind
    assert stage.steps.table.version == first.steps.table.version
    chunk = make_chunk(TAG, [r for c in traffic() for r in c])
    spans = list(iter_entries(chunk.entries))
    got = stage.results(chunk.entries, spans)
    assert got and got.keys() == first.results(chunk.entries, spans).keys()


def test_metrics_export_the_engines_stats(
    arun: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))

    async def scenario() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        async with Sink() as sink:
            cfg = make_config(
                [SEQ_RULE, STOP_RULE],
                sink.port,
                metrics={"listen": "127.0.0.1:0"},
                state={"path": str(tmp_path / "state"), "snapshot_interval": "1h"},
            )
            relay = Relay(cfg)
            await relay.startup()
            try:
                assert relay.server is not None and relay.enrichment.http is not None
                await send(relay.server.port, traffic())
                assert relay.state is not None and await relay.state.save()
                port = int(relay.enrichment.http.address.rsplit(":", 1)[1])
                status, _, body = await http_get(port, "/metrics")
                assert status == 200
            finally:
                await relay.shutdown()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(body.decode())
            for s in fam.samples
        }

    got = arun(scenario(), timeout=120)
    g = {k[1]: v for k, v in got.items() if k[0] == "ruletag_stateful"}
    assert g[(("engine", "sequence"), ("stat", "completed"))] == 1
    assert g[(("engine", "sequence"), ("stat", "rules"))] == 1
    assert g[(("engine", "threshold"), ("stat", "fired"))] == 1
    assert g[(("engine", "threshold"), ("stat", "groups"))] == 2  # h1 (suppressed) and h2
    assert got[("ruletag_state_snapshots_total", ())] == 1
    assert got[("ruletag_state_snapshot_bytes", ())] > 100
    # every record that hit a step or base condition was fed: 4 file events + 15 stops
    assert got[("ruletag_stateful_records_fed_total", ())] == 19


# --------------------------------------------------------------------------- checkpoints


def test_kill_9_and_restart_resume_a_partial_sequence(
    arun: Any, tmp_path: Path, serve_process: Any
) -> None:
    """A relay in a subprocess with a state folder: first step, a checkpoint, kill -9, a new
    relay on the same folder, second step -> the completing record is annotated."""
    state = tmp_path / "state"

    async def scenario() -> list[Any]:
        async with Sink() as sink:
            cfg = tmp_path / "relay.yaml"
            cfg.write_text(
                json.dumps(
                    {
                        "listen": {"host": "127.0.0.1", "port": 0},
                        "forward": {"servers": [f"127.0.0.1:{sink.port}"], "ack_timeout": 5},
                        "rules": {
                            "paths": [str(SEQ_RULE)],
                            "reload_interval": 0,
                            "cache_dir": str(tmp_path / "cache"),
                        },
                        "state": {"path": str(state), "snapshot_interval": "100ms"},
                    }
                )
            )
            args = ["--config", str(cfg)]
            sp = await asyncio.to_thread(serve_process, args)
            await send(sp.port, [[open_event(1, 0, "p1"), noise(1)]])

            def saved_partial() -> bool:
                try:
                    doc = json.loads((state / "state.json").read_text())
                except (OSError, ValueError):
                    return False
                rules = doc["stage"]["engines"]["sequence"]["rules"]
                return any(r["keys"] for r in rules.values())

            await eventually(saved_partial, timeout=10)
            sp.proc.send_signal(signal.SIGKILL)
            assert await asyncio.to_thread(sp.proc.wait, 10) == -signal.SIGKILL
            sp2 = await asyncio.to_thread(serve_process, args)
            assert any("state: restored 1 stateful rules" in ln for ln in sp2.lines)
            await send(sp2.port, [[noise(2), zip_event(3, 20, "p1")]])
            await asyncio.to_thread(sp2.stop)
            return [rec for _, _, rec in sink.entries]

    records = arun(scenario(), timeout=120)
    assert [r["event"]["id"] for r in records] == ["e1", "n1", "n2", "e3"]
    (d,) = records[3]["detections"]
    assert d["sequence"] == SEQUENCE_BLOCK
    assert "detections" not in records[0]


# --------------------------------------------------------------------------- workers


def test_workers_refuse_stateful_rules_unless_stateful_off(tmp_path: Path) -> None:
    cfg = tmp_path / "w.yaml"
    base = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "forward": {"servers": ["127.0.0.1:9"]},
        "rules": {"paths": [str(SEQ_RULE)], "cache_dir": str(tmp_path / "cache")},
        "workers": 2,
    }
    cfg.write_text(json.dumps(base))
    proc = subprocess.run(
        [sys.executable, "-m", "ruletag", "serve", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert "workers: 2 with stateful rules (1 sequence) would split" in proc.stdout + proc.stderr
    check = subprocess.run(
        [sys.executable, "-m", "ruletag", "validate", str(cfg)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert check.returncode == 1 and "would split the state of a key" in check.stderr
    cfg.write_text(json.dumps({**base, "enrich": {"stateful": "off"}}))
    check = subprocess.run(
        [sys.executable, "-m", "ruletag", "validate", str(cfg)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert check.returncode == 0, check.stderr


def test_two_tiers_stateless_workers_then_one_stateful_relay(
    arun: Any, tmp_path: Path, serve_process: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tier 1: ``workers: 2`` with ``enrich.stateful: off``; tier 2: one stateful relay. The
    two steps of a sequence sent on different connections (different workers) complete in
    tier 2."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))

    async def scenario() -> list[Any]:
        async with Sink() as sink:
            tier2 = Relay(make_config([SEQ_RULE], sink.port))
            await tier2.startup()
            try:
                assert tier2.server is not None
                cfg = tmp_path / "tier1.yaml"
                cfg.write_text(
                    json.dumps(
                        {
                            "listen": {"host": "127.0.0.1", "port": 0},
                            "forward": {"servers": [f"127.0.0.1:{tier2.server.port}"]},
                            "rules": {"paths": [str(SEQ_RULE)], "cache_dir": str(tmp_path / "c")},
                            "enrich": {"stateful": "off"},
                            "workers": 2,
                        }
                    )
                )
                sp = await asyncio.to_thread(serve_process, ["--config", str(cfg)])
                assert any("not evaluated here" in ln for ln in sp.lines)
                chunks = [[open_event(1, 0, "p1")], [noise(1)], [noise(2)], [noise(3)]]
                chunks += [[zip_event(3, 20, "p1")]]
                for recs in chunks:  # one connection each: the kernel spreads them
                    await send(sp.port, [recs])
                sp.proc.send_signal(signal.SIGTERM)
                assert await asyncio.to_thread(sp.proc.wait, 20) == 0
            finally:
                await tier2.shutdown()
            return [rec for _, _, rec in sink.entries]

    records = arun(scenario(), timeout=120)
    assert [r["event"]["id"] for r in records] == ["e1", "n1", "n2", "n3", "e3"]
    assert [r["event"]["id"] for r in records if "detections" in r] == ["e3"]
    assert records[4]["detections"][0]["sequence"] == SEQUENCE_BLOCK


# --------------------------------------------------------------------------- config


def test_config_keys_and_state_folder(tmp_path: Path) -> None:
    from ruletag.config.model import DEFAULT_SNAPSHOT_INTERVAL
    from ruletag.errors import ConfigError
    from ruletag.runtime.state import state_folder

    fwd = {"servers": ["127.0.0.1:9"]}
    rules = {"paths": ["r"]}
    cfg = config_from_mapping({
        "forward": fwd, "rules": rules,
        "enrich": {"alert_tag": "ruletag.alerts", "stateful": "off"},
        "state": {"path": "st", "snapshot_interval": "500ms"},
    }, tmp_path)  # fmt: skip
    assert cfg.enrich is not None
    assert (cfg.enrich.alert_tag, cfg.enrich.stateful) == ("ruletag.alerts", "off")
    assert state_folder(cfg) == (tmp_path / "st", 0.5)
    disk = {"type": "disk", "path": "buf"}
    cfg = config_from_mapping({"forward": fwd, "rules": rules, "buffer": disk}, tmp_path)
    assert state_folder(cfg) == (tmp_path / "buf" / "state", DEFAULT_SNAPSHOT_INTERVAL)
    assert state_folder(config_from_mapping({"forward": fwd}))[0] is None
    for bad, where in [
        ({"state": {}}, "state.path: is required"),
        ({"state": {"path": "x", "snapshot_interval": 0}}, "state.snapshot_interval"),
        ({"state": {"path": "x", "oops": 1}}, "state.oops"),
        ({"rules": rules, "enrich": {"stateful": "maybe"}}, "enrich.stateful"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(where)):
            config_from_mapping({"forward": fwd, **bad}, tmp_path)


def test_unreadable_checkpoint_is_set_aside(arun: Any, tmp_path: Path) -> None:
    from ruletag.runtime.state import StateStore

    stage = StatefulStage.of(load_elastic_file(SEQ_RULE))
    assert stage is not None
    (tmp_path / "state.json").write_text("{not json")
    store = StateStore(tmp_path, lambda: stage, 60)
    assert store.restore() == 0
    assert (tmp_path / "state.json.bad").exists() and not (tmp_path / "state.json").exists()
    chunk = make_chunk(TAG, [open_event(1, 0, "p1")])
    stage.results(chunk.entries, list(iter_entries(chunk.entries)))
    assert arun(store.save())
    doc = json.loads((tmp_path / "state.json").read_text())
    assert doc["format"] == "ruletag-state"
    assert not list(tmp_path.glob("*.tmp"))
    fresh = StatefulStage.of(load_elastic_file(SEQ_RULE))
    assert fresh is not None
    assert StateStore(tmp_path, lambda: fresh, 60).restore() == 1
    assert fresh.stats()["sequence"]["keys"] == 1


def test_ecs_style_puts_the_stateful_rule_in_rule_fields() -> None:
    from ruletag.enrich.filter import RuleFilter
    from ruletag.rules.compiler import build

    rules = load_elastic_file(SEQ_RULE)
    table = build(rules)
    f = RuleFilter(table, style="ecs", stateful=StatefulStage.of(rules, table.fieldmap))
    recs = [open_event(1, 0, "p1"), noise(1), zip_event(3, 20, "p1")]
    chunk = make_chunk(TAG, recs)
    (out,) = f(chunk)
    got = [unpack(out.entries[s:e]) for s, e in iter_entries(out.entries)]
    assert [r[1]["event"]["id"] for r in got] == ["e1", "n1", "e3"]
    assert "rule" not in got[0][1] and "ruletag" not in got[1][1]
    done = got[2][1]
    assert done["rule"]["id"] == [rules[0].id]
    assert done["event"]["severity"] == 3  # high
    (block,) = done["ruletag"]["stateful"]
    assert block["sequence"] == SEQUENCE_BLOCK
    assert f.stats.records_matched == 1 and f.stats.detections == {rules[0].id: 1}


def test_adopt_keeps_the_very_engines_when_the_stateful_rules_are_unchanged() -> None:
    rules = load_elastic_file(SEQ_RULE)
    a, b = StatefulStage.of(rules), StatefulStage.of(rules)
    assert a is not None and b is not None
    chunk = make_chunk(TAG, [open_event(1, 0, "p1")])
    a.results(chunk.entries, list(iter_entries(chunk.entries)))
    assert "unchanged" in b.adopt(a)
    assert b.engines == a.engines and b.records_fed == 1
    c = StatefulStage.of(rules + load_elastic_file(STOP_RULE))
    assert c is not None
    assert c.adopt(b).startswith("state of 1 unchanged stateful rules kept")
    assert c.stats()["sequence"]["keys"] == 1 and c.stats()["threshold"]["groups"] == 0


def test_the_stateful_signature_waits_for_a_reload_and_is_taken_off_the_loop() -> None:
    """A start-up never needs the digests of the stateful definitions (~0.1 s with every
    rule); a reload's ``prepare`` (on the loading thread) works them out, so that ``swap``
    only compares them on the loop."""
    from ruletag.enrich.filter import RuleFilter
    from ruletag.rules.compiler import build
    from ruletag.runtime.reload import LiveFilter

    rules = load_elastic_file(SEQ_RULE)
    table = build(rules)
    live = LiveFilter(lambda t: RuleFilter(t, stateful=StatefulStage.of(t.rules, t.fieldmap)))
    first = live.prepare(table)
    assert first.stateful is not None and "signature" not in vars(first.stateful)
    assert first.stateful.rule_counts() == {"sequence": 1}
    live.swap(first, None)  # type: ignore[arg-type]
    second = live.prepare(table)
    assert second.stateful is not None
    assert "signature" in vars(second.stateful) and "signature" in vars(first.stateful)
    assert second.stateful.signature == first.stateful.signature != frozenset()
    live.swap(second, None)  # type: ignore[arg-type]
    assert second.stateful.engines == first.stateful.engines  # unchanged: the same engines


def test_ir_repr_is_the_dataclass_text_without_its_recursion_guard() -> None:
    """Saved state is matched to its rule by a digest of the ``repr`` of the rule's stateful
    definition, so the text must stay the dataclass one; the guard against cycles (which IR
    values cannot have) is dropped for speed."""
    from ruletag.rules.ir import And, Match, Not, Wild

    node = And((Match("a", ("x", Wild.ANY), True), Not(Match(None, ("y",)))))
    assert repr(node) == (
        "And(args=(Match(field='a', pattern=('x', <Wild.ANY: '*'>), cased=True), "
        "Not(arg=Match(field=None, pattern=('y',), cased=False))))"
    )
    assert not hasattr(Match.__repr__, "__wrapped__")


def test_ir_values_keep_their_hash_once_taken() -> None:
    """An IR value's hash is the dataclass one (a hash of its fields), taken once: hashing a
    condition again does not walk its tree (the stateful engines look conditions up by
    value). Equal values hash equal; copies and pickles carry only the fields."""
    import copy
    import dataclasses
    import pickle

    from ruletag.rules.ir import And, Match, Not, Wild

    def tree() -> And:
        return And((Match("a", ("x", Wild.ANY), True), Not(Match(None, ("y",)))))

    node = tree()
    leaf = node.args[0]
    fields = tuple(getattr(leaf, f.name) for f in dataclasses.fields(leaf))
    assert hash(leaf) == hash(fields)  # the value the generated hash gives
    assert hash(node) == hash(tree()) and {node: 1}[tree()] == 1
    calls = []
    inner = type(leaf).__hash__

    class Counting(Match):
        __slots__ = ()

        def __hash__(self) -> int:
            calls.append(self)
            return inner(self)

    counted = And((Counting("a", ("x",)),))
    hash(counted)
    hash(counted)
    assert len(calls) == 1  # the second hash of the tree did not reach the leaf
    for other in (copy.copy(node), pickle.loads(pickle.dumps(node)), dataclasses.replace(node)):
        assert other == node and hash(other) == hash(node)
    assert not hasattr(copy.copy(node), "_hash")


# --------------------------------------------------------------------------- new terms

NEW_TERMS_RULE = """\
[metadata]
maturity = "production"

[rule]
author = ["A"]
name = "first exec"
rule_id = "nt-1"
severity = "low"
type = "new_terms"
language = "kuery"
query = '''
event.action:exec
'''
[rule.new_terms]
field = "new_terms_fields"
value = ["host.id", "process.executable"]
[[rule.new_terms.history_window_start]]
field = "history_window_start"
value = "now-7d"
"""


def exec_event(n: int, minute: int, exe: str) -> dict[str, Any]:
    return {
        "@timestamp": f"2026-03-01T10:{minute:02d}:00.000Z",
        "event": {"id": f"x{n}", "action": "exec"},
        "host": {"id": "h1"},
        "process": {"executable": exe},
    }


@pytest.mark.parametrize(("learn", "fired"), [(False, ["x1", "x3"]), (None, [])])
def test_relay_evaluates_new_terms_rules_after_learning(
    arun: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    learn: bool | None,
    fired: list[str],
) -> None:
    """rules.new_terms.learn: false fires on each first-seen (host, executable); the default
    learns for the rule's 7-day history window first, so a fresh start fires nothing."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    rule = tmp_path / "nt.toml"
    rule.write_text(NEW_TERMS_RULE, encoding="utf-8")
    records = [
        exec_event(1, 0, "/bin/a"),
        noise(1),
        exec_event(2, 1, "/bin/a"),
        exec_event(3, 2, "/bin/b"),
    ]
    rules_section: dict[str, Any] = {"paths": [str(rule)], "reload_interval": 0}
    if learn is not None:
        rules_section["new_terms"] = {"learn": learn}

    async def scenario() -> tuple[list[bytes], list[tuple[str, bytes]], dict[str, Any]]:
        async with Sink() as sink:
            data = {
                "listen": {"host": "127.0.0.1", "port": 0},
                "forward": {"servers": [f"127.0.0.1:{sink.port}"], "ack_timeout": 5},
                "rules": rules_section,
            }
            cfg = config_from_mapping(data)
            relay = Relay(cfg)
            await relay.startup()
            try:
                assert relay.server is not None
                sent = await send(relay.server.port, [records])
                stage = relay.enrichment.stage()
                assert stage is not None
                stats = stage.stats()
            finally:
                await relay.shutdown()
            return sent, received(sink), stats

    sent, got, stats = arun(scenario(), timeout=120)
    found = check_annotated(got, sent)
    assert sorted(found) == fired
    for ident in fired:
        (d,) = found[ident]
        assert d["rule_id"] == "nt-1"
        assert d["new_terms"]["terms"][0] == {"field": "host.id", "value": "h1"}
    assert stats["new_terms"]["fired"] == len(fired)
    assert stats["new_terms"]["learned"] == (0 if fired else 2)


# --------------------------------------------------------------------------- correlations


def failed_logon(n: int) -> dict[str, Any]:
    return {
        "@timestamp": f"2024-05-01T10:{n // 60:02d}:{n % 60:02d}.000Z",
        "Channel": "Security",
        "EventID": 4625,
        "ComputerName": "A",
        "User": f"u{n}",
        "event": {"id": f"f{n}"},
    }


def test_relay_sigma_correlation_counts_across_a_restart(
    arun: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The specification's event_count (>= 100 failed logons per host in 1h): 60 failures,
    a clean restart on the same state folder, 40 more -> the 100th record fires, once."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    rules = CORRELATION / "counts.yml"
    state = {"path": str(tmp_path / "state"), "snapshot_interval": "1h"}

    async def run_relay(records: list[dict[str, Any]]) -> tuple[list[bytes], list[Any]]:
        async with Sink() as sink:
            relay = Relay(make_config([rules], sink.port, state=state))
            await relay.startup()
            try:
                assert relay.server is not None
                sent = await send(relay.server.port, [records[:30], records[30:]])
            finally:
                await relay.shutdown()
            return sent, received(sink)

    first, second = [failed_logon(n) for n in range(60)], [failed_logon(n) for n in range(60, 100)]
    sent1, got1 = arun(run_relay(first), timeout=120)
    assert check_annotated(got1, sent1) == {}
    sent2, got2 = arun(run_relay(second), timeout=120)
    found = check_annotated(got2, sent2)
    assert sorted(found) == ["f99"]
    (d,) = found["f99"]
    assert d["rule_id"] == "0e95725d-7320-415d-80f7-004da920fc11"
    corr = d["correlation"]
    assert corr["type"] == "event_count" and corr["value"] == 100
    assert corr["group"] == [{"field": "ComputerName", "value": "A"}]
    window = {"start": "2024-05-01T10:00:00.000Z", "end": "2024-05-01T10:01:39.000Z"}
    assert corr["window"] == window


# --------------------------------------------------------------------------- missing events

ALERT_RULE = SAMPLE / (
    "elastic/rules/cross-platform/defense_evasion_missing_events_after_alert.toml"
)


def endpoint(ident: str, ts: str, host: str, **fields: Any) -> dict[str, Any]:
    return {"@timestamp": ts, "event": {"id": ident}, "host": {"id": host}, **fields}


def test_relay_confirms_missing_events_on_the_watermark_across_a_restart(
    arun: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Alert followed by no telemetry within 5 min (a corpus rule): h1's alert is pending when
    the relay stops; the restarted relay resumes it from the checkpoint and confirms it on the
    first record whose event time passes the window (the last of a chunk, which hits no step:
    it only moves the watermark). h2's alert, followed by a process event, never completes."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    state = {"path": str(tmp_path / "state"), "snapshot_interval": "1h"}
    alert = {"data_stream": {"dataset": "endpoint.alerts"}}
    first = [
        endpoint("a1", "2026-03-01T10:00:00.000Z", "h1", **alert),
        endpoint("a2", "2026-03-01T10:01:00.000Z", "h2", **alert),
        endpoint("p2", "2026-03-01T10:02:00.000Z", "h2", event={"id": "p2", "category": "process"}),
        endpoint("n1", "2026-03-01T10:03:00.000Z", "h3"),
    ]
    second = [
        endpoint("n2", "2026-03-01T10:04:00.000Z", "h3"),
        endpoint("n3", "2026-03-01T10:06:30.000Z", "h3"),
    ]

    async def run_relay(records: list[dict[str, Any]]) -> tuple[list[bytes], list[Any], Any]:
        async with Sink() as sink:
            relay = Relay(make_config([ALERT_RULE], sink.port, state=state))
            await relay.startup()
            try:
                assert relay.server is not None
                sent = await send(relay.server.port, [records])
                stage = relay.enrichment.stage()
                assert stage is not None
                stats = stage.stats()
            finally:
                await relay.shutdown()
            return sent, received(sink), stats

    sent1, got1, stats1 = arun(run_relay(first), timeout=120)
    assert check_annotated(got1, sent1) == {}
    assert stats1["sequence"]["missing_pending"] == 2
    sent2, got2, stats2 = arun(run_relay(second), timeout=120)
    found = check_annotated(got2, sent2)
    assert sorted(found) == ["n3"]
    (d,) = found["n3"]
    assert d["sequence"]["keys"] == ["h1"]
    assert d["sequence"]["events"] == [
        {"timestamp": "2026-03-01T10:00:00.000Z", "id": "a1"},
        {"missing": True},
    ]
    assert stats2["sequence"]["missing_pending"] == 0
    assert stats2["sequence"]["missing_rejected"] == 1  # h2


# --------------------------------------------------------------------------- ES|QL STATS

ESQL_STATS_RULE = """\
[metadata]
maturity = "production"

[rule]
author = ["A"]
name = "login failures"
rule_id = "agg-1"
severity = "low"
type = "esql"
language = "esql"
from = "now-15m"
query = '''
from logs-* | where event.action == "login_failed"
| stats n = count(*), hosts = count_distinct(host.id) by user.name | where n >= 3
'''
"""


def test_relay_evaluates_aggregating_esql_rules(
    arun: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """STATS ... BY user.name | WHERE n >= 3 over a 15-minute look-back: the third failure of
    u1 fires with the group's row; u2's two failures and the noise pass untouched."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    rule = tmp_path / "agg.toml"
    rule.write_text(ESQL_STATS_RULE, encoding="utf-8")

    def failure(n: int, user: str) -> dict[str, Any]:
        return {
            "@timestamp": f"2026-03-01T10:0{n}:00.000Z",
            "event": {"id": f"l{n}", "action": "login_failed"},
            "user": {"name": user},
            "host": {"id": f"h{n % 2}"},  # u1: h1 three times
        }

    records = [failure(1, "u1"), failure(2, "u2"), noise(1), failure(3, "u1")]
    records += [failure(4, "u2"), failure(5, "u1")]

    async def scenario() -> tuple[list[bytes], list[Any]]:
        async with Sink() as sink:
            relay = Relay(make_config([rule], sink.port))
            await relay.startup()
            try:
                assert relay.server is not None
                sent = await send(relay.server.port, [records[:3], records[3:]])
            finally:
                await relay.shutdown()
            return sent, received(sink)

    sent, got = arun(scenario(), timeout=120)
    found = check_annotated(got, sent)
    assert sorted(found) == ["l5"]
    (d,) = found["l5"]
    assert d["rule_id"] == "agg-1"
    agg = d["aggregation"]
    assert agg["keys"] == [{"field": "user.name", "value": "u1"}]
    assert agg["values"]["n"] == 3 and agg["values"]["hosts"] == 1 and agg["count"] == 3


def test_workers_auto_serves_stateful_rules_in_one_process(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``workers: auto`` (4 CPUs here) with a sequence rule: serve keeps one process and says
    why; without stateful rules, or with ``enrich.stateful: off``, it keeps the 4."""
    from dataclasses import replace

    from ruletag.commands.serve import _auto_workers

    def config(rules: list[Path], **extra: Any) -> Any:
        data = {
            "listen": {"host": "127.0.0.1", "port": 0},
            "forward": {"servers": ["127.0.0.1:9"]},
            "rules": {"paths": [str(p) for p in rules], "cache_dir": str(tmp_path / "cache")},
            "workers": "auto",
            **extra,
        }
        return replace(config_from_mapping(data), workers=4)

    with caplog.at_level("WARNING"):
        assert _auto_workers(config([SEQ_RULE])).workers == 1
    assert "workers: auto runs 1 process, not 4: 1 stateful rules" in caplog.text
    threshold = config([STOP_RULE])
    assert _auto_workers(threshold).workers == 1  # a threshold rule is stateful too
    off = config([SEQ_RULE], enrich={"stateful": "off"})
    assert _auto_workers(off).workers == 4
    plain = config([SAMPLE / "sigma"])
    assert _auto_workers(plain).workers == 4
    explicit = replace(config([SEQ_RULE]), workers_auto=False)
    assert _auto_workers(explicit).workers == 4  # workers: 4 is refused by the relay instead


# --------------------------------------------------------------------------- step tables


def test_step_tables_are_cached_and_give_the_same_results(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engines' step tables go to <cache>/steps once and are read back (not compiled) on
    the next build; results are the same; a damaged file is compiled again, with a warning."""
    import ruletag.rules.compiler as compiler

    rules = load_elastic_file(SEQ_RULE) + load_elastic_file(STOP_RULE)
    records = [r for chunk in traffic() for r in chunk]
    chunk = make_chunk(TAG, records)
    spans = list(iter_entries(chunk.entries))

    def run(stage: StatefulStage | None) -> dict[int, list[str]]:
        assert stage is not None
        done = stage.results(chunk.entries, spans)
        return {i: [type(r).__name__ for r in rs] for i, rs in done.items()}

    fresh = run(StatefulStage.of(rules))
    assert sorted(fresh.values()) == [["Alert"], ["Completion"]]
    cache = tmp_path / "cache"
    assert run(StatefulStage.of(rules, None, cache)) == fresh
    files = sorted((cache / "steps").glob("*.table"))
    assert len(files) == 3  # the sequence and threshold engines' tables, the stage's combined one
    built: list[int] = []
    original = compiler.build

    def counting_build(*args: Any, **kwargs: Any) -> Any:
        built.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(compiler, "build", counting_build)
    assert run(StatefulStage.of(rules, None, cache)) == fresh
    assert built == []  # both read back
    files[0].write_bytes(files[0].read_bytes()[:100])
    with caplog.at_level("WARNING"):
        assert run(StatefulStage.of(rules, None, cache)) == fresh
    assert built == [1] and "unreadable, compiling it again" in caplog.text


def test_step_keys_are_remembered_under_the_table_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given the rules' table version, a start reads each step table's key from beside the
    tables instead of working it out from the ``repr`` of every condition; the key is the
    same, a damaged memo is worked out again, and another version never reads it."""
    import ruletag.rules.stateful.tables as tables

    rules = load_elastic_file(SEQ_RULE) + load_elastic_file(STOP_RULE)
    cache = tmp_path / "cache"
    keyed: list[int] = []
    original = tables.step_key

    def counting_key(*args: Any, **kwargs: Any) -> str:
        keyed.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(tables, "step_key", counting_key)
    plain = StatefulStage.of(rules, None, cache)
    assert plain is not None and len(keyed) == 3 and not list((cache / "steps").glob("*.key"))
    first = StatefulStage.of(rules, None, cache, "v1")
    memos = sorted((cache / "steps").glob("*.key"))
    assert len(keyed) == 6 and len(memos) == 3
    again = StatefulStage.of(rules, None, cache, "v1")
    assert len(keyed) == 6  # every key read back
    assert first is not None and again is not None and plain.steps is not None
    assert again.steps is not None and first.steps is not None
    assert again.steps.table.version == first.steps.table.version == plain.steps.table.version
    memos[0].write_text("not a key")
    StatefulStage.of(rules, None, cache, "v1")
    assert len(keyed) == 7  # the damaged one worked out again
    StatefulStage.of(rules, None, cache, "v2")
    assert len(keyed) == 10 and len(list((cache / "steps").glob("*.key"))) == 6
