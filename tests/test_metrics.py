"""Metrics: private registries, counters read from a live relay, /metrics and /health over HTTP.

A real in-process relay (server -> pipeline -> forwarder -> Sink) with the bundled seed rules
is scraped through ``MetricsServer`` on 127.0.0.1 and parsed with prometheus-client's parser.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ruletag.config.load import config_from_mapping
from ruletag.delivery.pipeline import Pipeline
from ruletag.enrich.filter import RuleFilter
from ruletag.rules.loader import compile_rules
from ruletag.runtime.metrics import STAGES, Metrics, MetricsServer, health_of
from ruletag.runtime.reload import LiveFilter, Reloader
from ruletag.transport.forwarder import Forwarder
from ruletag.transport.server import Server
from support.paths import SEED_RULES as SEEDS
from support.peers import Sink, Source, eventually, make_chunk
from support.seeds import SIGMA_HIT as HIT
from support.seeds import SIGMA_ID as SYSMON_RULE
from support.servers import FAST_FORWARD, http_get

MISS = {"log": "nothing to see here", "n": 1}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_registries_are_private() -> None:
    a, b = Metrics(), Metrics()
    a.reload_done(True)
    a.observe("filter", 0.001)
    sa = samples(a.render()[0].decode())
    sb = samples(b.render()[0].decode())
    assert sa[("ruletag_rule_reloads_total", (("result", "ok"),))] == 1
    assert sb[("ruletag_rule_reloads_total", (("result", "ok"),))] == 0
    assert sa[("ruletag_stage_duration_seconds_count", (("stage", "filter"),))] == 1
    assert sb[("ruletag_stage_duration_seconds_count", (("stage", "filter"),))] == 0
    # nothing bound: not ready, and no relay families yet
    assert sb[("ruletag_ready", ())] == 0
    assert not any(name == "ruletag_records_in_total" for name, _ in sb)


def test_health_of_and_broken_check() -> None:
    state = {"table": False}
    check = health_of((lambda: state["table"], "rule table not loaded"), (lambda: True, "x"))
    m = Metrics()
    m.bind(health=check)
    assert m.health() == (False, "rule table not loaded")
    state["table"] = True
    assert m.health() == (True, "ok")

    def broken() -> tuple[bool, str]:
        raise RuntimeError("boom")

    m.bind(health=broken)
    ok, reason = m.health()
    assert not ok and "boom" in reason


def test_openmetrics_negotiation() -> None:
    m = Metrics()
    body, ctype = m.render("application/openmetrics-text; version=1.0.0")
    assert ctype.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")
    body, ctype = m.render("")
    assert ctype.startswith("text/plain") and b"# EOF" not in body


def test_relay_metrics_and_health_over_http(arun, tmp_path: Path) -> None:
    async def scenario() -> None:
        metrics = Metrics()
        async with Sink() as sink:
            cfg = config_from_mapping({
                "listen": {"host": "127.0.0.1", "port": 0},
                "forward": {"servers": [{"host": "127.0.0.1", "port": sink.port}],
                            **FAST_FORWARD},
            })  # fmt: skip
            live = LiveFilter(lambda t: RuleFilter(t))
            reloader = Reloader(
                live,
                lambda: compile_rules([SEEDS], None, tmp_path),
                [SEEDS],
                interval=0,
                on_result=metrics.reload_done,
            )
            forwarder = Forwarder(cfg.forward)
            await forwarder.start()
            pipeline = Pipeline(metrics.instrument_sender(forwarder), metrics.timed_transform(live))
            server = Server(cfg.listen, pipeline.submit)
            metrics.bind(
                server=server,
                forwarder=forwarder,
                rules=live,
                health=health_of(
                    (lambda: live.loaded, "rule table not loaded"),
                    (lambda: server.listening, "listener not up"),
                ),
            )
            http = MetricsServer(metrics, "127.0.0.1", 0)
            await http.start()
            try:
                status, _, body = await http_get(http.port, "/health")
                assert (status, body) == (503, b"rule table not loaded\n")
                await reloader.load_initial()
                status, _, body = await http_get(http.port, "/health")
                assert (status, body) == (503, b"listener not up\n")
                await server.start()
                status, _, body = await http_get(http.port, "/health")
                assert (status, body) == (200, b"ok\n")

                src = await Source.connect(server.port)
                for recs in ([HIT, MISS, MISS], [MISS], [HIT]):
                    cid = await src.send_chunk(make_chunk("win", recs))
                    assert await src.read_ack() == cid
                await src.close()
                await sink.wait_records(5)
                assert await reloader.reload("test")

                status, headers, body = await http_get(http.port, "/metrics")
                assert status == 200 and headers["content-type"].startswith("text/plain")
                s = samples(body.decode())
                assert s[("ruletag_records_in_total", ())] == 5
                assert s[("ruletag_records_out_total", ())] == 5
                assert s[("ruletag_chunks_in_total", ())] == 3
                assert s[("ruletag_bytes_in_total", ())] == server.stats.bytes_in > 0
                assert s[("ruletag_forward_bytes_total", ())] == forwarder.bytes_sent > 0
                assert s[("ruletag_connections_slow_frames_total", ())] == 0
                assert s[("ruletag_connections_handshake_timeouts_total", ())] == 0
                out_bytes = sum(len(c.entries) for c in sink.chunks)
                assert s[("ruletag_bytes_out_total", ())] == out_bytes > 0
                assert s[("ruletag_chunks_out_total", ())] == len(sink.chunks)
                assert s[("ruletag_records_matched_total", ())] == 2
                assert s[("ruletag_detections_total", (("rule_id", SYSMON_RULE),))] == 2
                assert s[("ruletag_detections_by_severity_total", (("severity", "medium"),))] == 2
                assert s[("ruletag_rules_loaded", ())] == 2
                # the seeds' pre-filter has not seen 20,000 records: not tuned, no drift
                assert s[("ruletag_prefilter_tuned_on_records", ())] == 0
                assert s[("ruletag_prefilter_retunes_total", ())] == 0
                assert s[("ruletag_ruleset_info", (("version", live.version),))] == 1
                assert s[("ruletag_rule_reloads_total", (("result", "ok"),))] == 1  # not startup
                assert s[("ruletag_rule_reloads_total", (("result", "failed"),))] == 0
                assert s[("ruletag_downstream_pending_chunks", ())] == 0
                assert s[("ruletag_downstream_up", (("server", f"127.0.0.1:{sink.port}"),))] == 1
                assert s[("ruletag_connections_total", ())] == 1
                assert s[("ruletag_protocol_errors_total", ())] == 0
                assert s[("ruletag_ready", ())] == 1
                for stage in ("filter", "forward"):
                    key = ("ruletag_stage_duration_seconds_count", (("stage", stage),))
                    assert s[key] >= 3, stage
                assert {lab[0][1] for name, lab in s if name.endswith("_seconds_count")} == set(
                    STAGES
                )

                # a protocol error is counted; the downstream going away flips downstream_up
                bad = await Source.connect(server.port)
                await bad.send_bytes(b"\xc1")
                await eventually(lambda: server.stats.protocol_errors == 1, "the protocol error")
                await bad.close()
                status, _, body = await http_get(http.port, "/metrics")
                assert samples(body.decode())[("ruletag_protocol_errors_total", ())] == 1

                status, _, _ = await http_get(http.port, "/nope")
                assert status == 404
                await server.stop(timeout=1)
                status, _, body = await http_get(http.port, "/health")
                assert status == 503
            finally:
                await http.stop()
                await forwarder.close(timeout=1)

    arun(scenario())


@pytest.mark.parametrize("request_bytes", [b"POST /metrics HTTP/1.1\r\n\r\n", b"\r\n\r\n"])
def test_http_rejects_bad_requests(arun, request_bytes: bytes) -> None:
    async def scenario() -> None:
        http = MetricsServer(Metrics(), "127.0.0.1", 0)
        await http.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", http.port)
            writer.write(request_bytes)
            raw = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            assert raw.split(b" ", 2)[1] in (b"400", b"405")
        finally:
            await http.stop()

    arun(scenario())


def test_disk_buffer_gauges_are_exported() -> None:
    from ruletag.delivery.durable import BufferStats

    metrics = Metrics()
    stats = BufferStats(
        bytes=4096,
        chunks=3,
        oldest_stored_at=1.0,
        duplicates_dropped=2,
        full_waits=1,
        write_errors=4,
    )
    metrics.bind(buffer=stats)
    body, _ = metrics.render()
    s = samples(body.decode())
    assert s[("ruletag_buffer_bytes", ())] == 4096
    assert s[("ruletag_buffer_chunks", ())] == 3
    assert s[("ruletag_buffer_oldest_age_seconds", ())] > 0
    assert s[("ruletag_buffer_duplicates_dropped_total", ())] == 2
    assert s[("ruletag_buffer_full_waits_total", ())] == 1
    assert s[("ruletag_buffer_write_errors_total", ())] == 4


def test_prefilter_tuning_and_drift_are_exported() -> None:
    """The live matcher's tuning and drift figures reach /metrics (a matcher that re-tuned
    once because its traffic changed, as in test_prefilter_tuning)."""
    from ruletag.rules.matcher import Matcher
    from ruletag.runtime.reload import LiveFilter

    class Filter:
        def __init__(self) -> None:
            self.table = SimpleNamespace(rules=(), version="v1")
            self.matcher = Matcher.__new__(Matcher)
            self.matcher.stats = {
                "raw_tuned_on_records": 40_000,
                "hot_rules": 83,
                "raw_drift": 0.94,
                "raw_retunes": 1,
            }

    live = LiveFilter(lambda t: t)
    live.filter = Filter()  # type: ignore[assignment]
    metrics = Metrics()
    metrics.bind(rules=live)
    s = samples(metrics.render()[0].decode())
    assert s[("ruletag_prefilter_tuned_on_records", ())] == 40_000
    assert s[("ruletag_prefilter_often_passed_rules", ())] == 83
    assert s[("ruletag_prefilter_drift", ())] == 0.94
    assert s[("ruletag_prefilter_retunes_total", ())] == 1
