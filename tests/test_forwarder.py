"""Forwarder tests against tests/peers.Sink and npm @fluent-org/logger's FluentServer."""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from ruletag.config.model import ForwardConfig, ForwardServer, ForwardTLS
from ruletag.errors import AuthenticationError
from ruletag.protocol import Chunk
from ruletag.transport.forwarder import DeliveryError, Forwarder
from support.paths import JS_DIR
from support.peers import BackgroundLoop, Sink, Source, make_chunk
from support.servers import Certs, require, selfsigned_cert

HOST = "127.0.0.1"


def run(coro: Coroutine[Any, Any, Any], timeout: float = 20.0) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def server(port: int, **kw: Any) -> ForwardServer:
    return ForwardServer(host=HOST, port=port, **kw)


def fconfig(*servers: ForwardServer, **kw: Any) -> ForwardConfig:
    base: dict[str, Any] = dict(
        ack_timeout=2.0,
        retry_backoff_base=0.05,
        retry_backoff_max=0.2,
        connect_timeout=2.0,
    )
    base.update(kw)
    return ForwardConfig(servers=tuple(servers), **base)


def recs(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"i": i, "msg": f"record {i}"} for i in range(start, start + n)]


async def started(cfg: ForwardConfig) -> Forwarder:
    fw = Forwarder(cfg)
    await fw.start()
    return fw


# -- acks, pipelining, retries ---------------------------------------------------------------


def test_acked_chunks_are_pipelined_on_one_connection() -> None:
    async def main() -> None:
        async with Sink() as sink:
            fw = await started(fconfig(server(sink.port)))
            chunks = [make_chunk("app.log", recs(2, 2 * i)) for i in range(5)]
            await asyncio.gather(*(fw.send(c) for c in chunks))
            await fw.close()
            assert sorted(r["i"] for r in sink.records) == list(range(10))
            ids = sink.chunk_ids
            assert len(ids) == 5 and None not in ids and len(set(ids)) == 5
            assert all(len(i) == 24 for i in ids if i is not None)
            assert fw.acks == 5 and fw.chunks_sent == 5 and fw.records_sent == 10
            assert fw.connects == 1 and fw.retries == 0 and fw.in_flight_bytes == 0
            assert {t for t, _, _ in sink.entries} == {"app.log"}

    run(main())


def test_ack_timeout_resends_the_same_chunk_id() -> None:
    async def main() -> None:
        async with Sink(withhold_first=1) as sink:
            fw = await started(fconfig(server(sink.port), ack_timeout=0.3))
            await fw.send(make_chunk("t", recs(1)))
            await fw.close()
            assert len(sink.chunks) == 2
            assert sink.chunk_ids[0] == sink.chunk_ids[1] is not None
            assert fw.ack_timeouts == 1 and fw.retries == 1 and fw.acks == 1

    run(main())


def test_slow_acks_within_the_timeout_are_not_retried() -> None:
    async def main() -> None:
        async with Sink(ack_delay=0.2) as sink:
            fw = await started(fconfig(server(sink.port), ack_timeout=3.0))
            await asyncio.gather(*(fw.send(make_chunk("t", recs(1, i))) for i in range(3)))
            await fw.close()
            assert len(sink.chunks) == 3 and fw.retries == 0 and sink.acks_sent == 3

    run(main())


def test_downstream_down_then_up_loses_nothing() -> None:
    async def main() -> None:
        sink = await Sink().start()
        await sink.stop()
        fw = await started(fconfig(server(sink.port)))
        sends = [asyncio.ensure_future(fw.send(make_chunk("t", recs(1, i)))) for i in range(4)]
        await asyncio.sleep(0.4)
        assert not any(s.done() for s in sends)
        assert fw.servers_up == 0 or fw.retries > 0
        await sink.start()
        await asyncio.gather(*sends)
        await fw.close()
        await sink.stop()
        assert sorted(r["i"] for r in sink.records) == [0, 1, 2, 3]
        assert fw.retries >= 1 and fw.connect_failures >= 1

    run(main())


def test_connection_closed_mid_pipeline_resends_unacked_chunks() -> None:
    async def main() -> None:
        async with Sink(close_after=1) as sink:
            fw = await started(fconfig(server(sink.port)))
            await asyncio.gather(*(fw.send(make_chunk("t", recs(1, i))) for i in range(6)))
            await fw.close()
            assert {r["i"] for r in sink.records} == set(range(6))
            assert sink.connections >= 6 and fw.connects >= 6

    run(main())


def test_a_late_failure_drops_only_the_connection_that_failed() -> None:
    """An ack timeout reported after another chunk reconnected must not close the new one."""

    async def main() -> None:
        async with Sink() as sink:
            fw = await started(fconfig(server(sink.port)))
            await fw.send(make_chunk("t", recs(1)))
            (srv,) = fw._servers
            stale = srv.conn
            assert stale is not None
            fresh = await fw._connect(srv)  # what a reconnect by another chunk leaves behind
            srv.conn = fresh
            fw._mark_failed(srv, stale, TimeoutError())
            assert stale.closed and not fresh.closed and srv.conn is fresh
            srv.failures = 0  # skip the backoff: the next chunk goes out on ``fresh``
            await fw.send(make_chunk("t", recs(1, 1)))
            assert fw.connects == 2 and sink.connections == 2
            await fw.close()
            assert sorted(r["i"] for r in sink.records) == [0, 1]

    run(main())


def test_retry_limit_raises_a_clear_error() -> None:
    async def main() -> None:
        sink = await Sink().start()
        await sink.stop()
        fw = await started(fconfig(server(sink.port, name="gone"), retry_limit=2))
        with pytest.raises(DeliveryError, match="after 3 attempts"):
            await fw.send(make_chunk("t", recs(1)))
        assert fw.retries == 2 and fw.in_flight_bytes == 0
        await fw.close()

    run(main())


def test_close_fails_undelivered_sends() -> None:
    async def main() -> None:
        async with Sink(ack=False) as sink:
            fw = await started(fconfig(server(sink.port), ack_timeout=0.2))
            task = asyncio.ensure_future(fw.send(make_chunk("t", recs(1))))
            await sink.wait_chunks(1)
            await fw.close(timeout=0.2)
            with pytest.raises(DeliveryError, match="closed"):
                await task
            with pytest.raises(DeliveryError):
                await fw.send(make_chunk("t", recs(1)))

    run(main())


def test_without_require_ack_send_returns_once_written() -> None:
    async def main() -> None:
        async with Sink(ack=False) as sink:
            fw = await started(fconfig(server(sink.port), require_ack=False, ack_timeout=0.2))
            await fw.send(make_chunk("t", recs(3)))
            await sink.wait_records(3)
            await fw.close()
            assert sink.chunk_ids == [None] and fw.acks == 0 and fw.chunks_sent == 1

    run(main())


def test_keepalive_off_opens_one_connection_per_chunk() -> None:
    async def main() -> None:
        async with Sink() as sink:
            fw = await started(fconfig(server(sink.port), keepalive=False))
            for i in range(3):
                await fw.send(make_chunk("t", recs(1, i)))
            await fw.close()
            assert fw.connects == 3 and sink.connections == 3 and len(sink.records) == 3

    run(main())


# -- several servers -------------------------------------------------------------------------


def test_round_robin_and_failover_to_the_second_server() -> None:
    async def main() -> None:
        async with Sink() as a, Sink() as b:
            fw = await started(fconfig(server(a.port, name="a"), server(b.port, name="b")))
            for i in range(4):
                await fw.send(make_chunk("t", recs(1, i)))
            assert len(a.chunks) == 2 and len(b.chunks) == 2
            await a.stop()
            for i in range(4, 8):
                await fw.send(make_chunk("t", recs(1, i)))
            await fw.close()
            got = {r["i"] for r in a.records} | {r["i"] for r in b.records}
            assert got == set(range(8))
            assert {r["i"] for r in b.records} >= {4, 5, 6, 7}

    run(main())


def test_standby_is_used_only_while_no_active_server_is_healthy() -> None:
    async def main() -> None:
        async with Sink() as active, Sink() as standby:
            fw = await started(fconfig(server(active.port), server(standby.port, standby=True)))
            for i in range(3):
                await fw.send(make_chunk("t", recs(1, i)))
            assert len(active.chunks) == 3 and standby.chunks == []
            await active.stop()
            await fw.send(make_chunk("t", recs(1, 3)))
            assert [r["i"] for r in standby.records] == [3]
            await fw.close()

    run(main())


# -- handshake, TLS, payload forms -----------------------------------------------------------


def test_shared_key_and_user_password() -> None:
    async def main() -> None:
        async with Sink(shared_key="s3cret", users={"alice": "pw"}) as sink:
            good = server(sink.port, shared_key="s3cret", username="alice", password="pw")
            fw = await started(fconfig(good))
            await fw.send(make_chunk("t", recs(2)))
            await fw.close()
            assert len(sink.records) == 2 and sink.auth_failures == 0

            for bad in (replace(good, password="nope"), replace(good, shared_key="wrong")):
                fw = await started(fconfig(bad, retry_limit=1))
                with pytest.raises(DeliveryError):
                    await fw.send(make_chunk("t", recs(1)))
                await fw.close()
            assert len(sink.records) == 2 and sink.auth_failures >= 2

    run(main())


@pytest.fixture
def tls_cert(certs: Certs) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 / localhost."""
    return certs.cert, certs.key


def test_tls_with_verification(tls_cert: tuple[str, str], tmp_path: Path) -> None:
    cert, key = tls_cert

    async def main() -> None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        async with Sink(ssl_context=ctx, shared_key="k") as sink:
            tls = ForwardTLS(enabled=True, ca_file=cert)
            fw = await started(fconfig(server(sink.port, tls=tls, shared_key="k")))
            await fw.send(make_chunk("t", recs(2)))
            await fw.close()
            assert len(sink.records) == 2

            other = tmp_path / "other.pem"  # a CA that did not sign the server certificate
            selfsigned_cert(other, tmp_path / "k.pem", "x")
            bad = ForwardTLS(enabled=True, ca_file=str(other))
            fw = await started(fconfig(server(sink.port, tls=bad, shared_key="k"), retry_limit=0))
            with pytest.raises(DeliveryError, match="CERTIFICATE_VERIFY_FAILED"):
                await fw.send(make_chunk("t", recs(1)))
            await fw.close()
            assert len(sink.records) == 2

    run(main())


def test_gzip_compression() -> None:
    async def main() -> None:
        async with Sink() as sink:
            fw = await started(fconfig(server(sink.port), compress=True))
            chunk = make_chunk("t", [{"msg": "the same text again " * 10}] * 200)
            await fw.send(chunk)
            await fw.close()
            assert len(sink.records) == 200
            assert 0 < sink.chunks[0].wire_size < len(chunk.entries) // 10

    run(main())


@pytest.mark.parametrize("entry_format", ["v1", "v2"])
def test_entry_format(entry_format: str) -> None:
    async def main() -> None:
        async with Sink() as sink:
            fw = await started(fconfig(server(sink.port), entry_format=entry_format))
            await fw.send(make_chunk("t", recs(2), v2=True))
            await fw.send(make_chunk("t", recs(1, 2)))
            await fw.close()
            times = [t for _, t, _ in sink.entries]
            assert [r["i"] for r in sink.records] == [0, 1, 2]
            if entry_format == "v1":
                assert times == [1_700_000_000] * 3
            else:
                assert times[:2] == [[1_700_000_000, {"m": 1}]] * 2
                assert times[2] == 1_700_000_000

    run(main())


def test_metrics_payload_is_forwarded_untouched() -> None:
    async def main() -> None:
        async with Sink() as sink:
            fw = await started(fconfig(server(sink.port), compress=True))
            payload = b"\x92\xa7cmetric\xc4\x03\x00\x01\x02"
            await fw.send(Chunk(tag="metrics", entries=payload, count=1, signal=1))
            await fw.close()
            got = sink.chunks[0]
            assert got.signal == 1 and got.entries == payload and got.tag == "metrics"
            assert sink.entries == []

    run(main())


def test_in_flight_bytes_limit_still_delivers_everything() -> None:
    async def main() -> None:
        async with Sink(ack_delay=0.05) as sink:
            fw = await started(fconfig(server(sink.port), max_in_flight_bytes=1))
            peak = 0

            async def watch() -> None:
                nonlocal peak
                while True:
                    peak = max(peak, fw.in_flight_bytes)
                    await asyncio.sleep(0.005)

            w = asyncio.ensure_future(watch())
            await asyncio.gather(*(fw.send(make_chunk("t", recs(1, i))) for i in range(4)))
            w.cancel()
            await fw.close()
            assert len(sink.records) == 4
            assert 0 < peak < 2 * len(make_chunk("t", recs(1)).entries) + 200

    run(main())


# -- npm @fluent-org/logger FluentServer -----------------------------------------------------


@contextmanager
def fluent_server(*args: str) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """Run tests/js/fluent_server.mjs; yields (port, received records as parsed JSON lines)."""
    require(
        shutil.which("node") is not None,
        "node is not installed (needed for the npm FluentServer peer)",
    )
    require(
        (JS_DIR / "node_modules" / "@fluent-org" / "logger").is_dir(),
        "tests/js/node_modules is missing",
    )
    proc = subprocess.Popen(
        ["node", str(JS_DIR / "fluent_server.mjs"), "0", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    reader: threading.Thread | None = None
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("LISTENING "), first
        lines: list[dict[str, Any]] = []

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(json.loads(line))

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        yield int(first.split()[1]), lines
    finally:
        proc.kill()
        proc.wait(10)
        if reader is not None:
            reader.join(5)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


def wait_lines(lines: list[Any], n: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while len(lines) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(lines) >= n, lines


@pytest.mark.parametrize("compress", [False, True])
def test_fluent_server_acks_v1_entries(compress: bool) -> None:
    with fluent_server() as (port, lines):

        async def main() -> Forwarder:
            fw = await started(fconfig(server(port), compress=compress))
            await fw.send(make_chunk("js.v2in", recs(2), v2=True))  # rewritten to v1
            await fw.send(make_chunk("js.v1in", recs(1, 2)))
            await fw.close()
            return fw

        fw = run(main())
        wait_lines(lines, 3)
        assert fw.acks == 2 and fw.retries == 0
        assert [(x["tag"], x["record"]["i"]) for x in lines] == [
            ("js.v2in", 0),
            ("js.v2in", 1),
            ("js.v1in", 2),
        ]
        assert lines[0]["time"] == 1_700_000_000


def test_fluent_server_shared_key_and_users() -> None:
    with fluent_server("--shared-key", "k3y", "--user", "bob:pw") as (port, lines):

        async def main() -> None:
            good = server(port, shared_key="k3y", username="bob", password="pw")
            fw = await started(fconfig(good))
            await fw.send(make_chunk("js", recs(1)))
            await fw.close()
            for bad in (replace(good, password="x"), replace(good, shared_key="nope")):
                fw = await started(fconfig(bad, retry_limit=1))
                with pytest.raises(DeliveryError):
                    await fw.send(make_chunk("js", recs(1, 1)))
                await fw.close()

        run(main())
        wait_lines(lines, 1)
        time.sleep(0.1)
        assert [x["record"]["i"] for x in lines] == [0]


def test_fluent_server_tls(tls_cert: tuple[str, str]) -> None:
    cert, key = tls_cert
    with fluent_server("--tls-cert", cert, "--tls-key", key) as (port, lines):

        async def main() -> None:
            tls = ForwardTLS(enabled=True, ca_file=cert, server_hostname="localhost")
            fw = await started(fconfig(server(port, tls=tls)))
            await fw.send(make_chunk("js.tls", recs(2)))
            await fw.close()

        run(main())
        wait_lines(lines, 2)
        assert [x["record"]["i"] for x in lines] == [0, 1]


# -- the peers themselves --------------------------------------------------------------------


def test_source_and_sink_handshake_acks_and_restart_on_the_same_port() -> None:
    with BackgroundLoop() as bg:
        sink = Sink(shared_key="k", users={"u": "p"})
        bg.run(sink.start())
        port = sink.port

        async def talk() -> tuple[bytes | None, bytes]:
            src = await Source.connect(port, shared_key="k", username="u", password="p")
            sent = await src.send_chunk(make_chunk("peer", recs(2)))
            got = await src.read_ack()
            await src.close()
            return sent, got

        sent, got = bg.run(talk())
        assert sent == got and sink.records == recs(2)
        bg.run(sink.stop())
        with pytest.raises(OSError):
            bg.run(Source.connect(port, shared_key="k", username="u", password="p"))
        bg.run(sink.start())
        assert sink.port == port
        sent, got = bg.run(talk())
        assert sent == got and len(sink.records) == 4
        with pytest.raises(AuthenticationError):
            bg.run(Source.connect(port, shared_key="k", username="u", password="bad"))
        bg.run(sink.stop())
        assert sink.auth_failures == 1
