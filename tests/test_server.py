"""Server tests on 127.0.0.1: acks after submit, in order; limits; TLS; auth; shutdown."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from ruletag import protocol
from ruletag.config.load import config_from_mapping
from ruletag.errors import AuthenticationError
from ruletag.protocol import Chunk
from ruletag.transport.server import Server
from support.peers import Source, decode_entries, eventually, make_chunk
from support.servers import Certs

HOST = "127.0.0.1"


def listen_config(**listen: Any) -> Any:
    data = {"listen": {"host": HOST, "port": 0, **listen}, "forward": {"servers": ["127.0.0.1:9"]}}
    return config_from_mapping(data).listen


class Recorder:
    """A submit() that records chunks; optionally blocks until released or fails."""

    def __init__(self) -> None:
        self.chunks: list[Chunk] = []
        self.gate: asyncio.Event | None = None
        self.fail_tags: set[str] = set()
        self.delays: dict[str, float] = {}

    async def __call__(self, chunk: Chunk) -> None:
        if chunk.tag in self.delays:
            await asyncio.sleep(self.delays[chunk.tag])
        if self.gate is not None:
            await self.gate.wait()
        if chunk.tag in self.fail_tags:
            raise RuntimeError("downstream refused")
        self.chunks.append(chunk)


async def with_server(
    body: Callable[[Server, Recorder], Awaitable[None]], **listen: Any
) -> Recorder:
    rec = Recorder()
    nonce = listen.pop("nonce", None)
    server = Server(listen_config(**listen), rec, nonce=nonce)
    await server.start()
    try:
        await body(server, rec)
    finally:
        await server.stop(timeout=1.0)
    return rec


async def read_eof(reader: asyncio.StreamReader, timeout: float = 3.0) -> bytes:
    """Read until the server closes; returns what arrived."""
    out = bytearray()
    async with asyncio.timeout(timeout):
        while True:
            try:
                data = await reader.read(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            out += data
    return bytes(out)


def frame(tag: str, n: int = 2, chunk_id: bytes | None = None) -> bytes:
    c = make_chunk(tag, [{"i": i, "msg": "x" * 20} for i in range(n)])
    return protocol.encode_chunk(c.tag, c.entries, c.count, chunk_id=chunk_id)


def test_chunk_submitted_then_acked(arun: Any) -> None:
    async def body(server: Server, rec: Recorder) -> None:
        src = await Source.connect(server.port)
        cid = await src.send_chunk(make_chunk("t.a", [{"a": 1}, {"a": 2}]))
        assert await src.read_ack() == cid
        await src.close()

    rec = arun(with_server(body))
    assert [c.tag for c in rec.chunks] == ["t.a"]
    assert [r["a"] for _, r in decode_entries(rec.chunks[0].entries)] == [1, 2]


def test_acks_in_arrival_order_even_when_submits_finish_out_of_order(arun: Any) -> None:
    async def body(server: Server, rec: Recorder) -> None:
        rec.delays = {"slow": 0.3, "mid": 0.1}
        src = await Source.connect(server.port)
        ids = [
            await src.send_chunk(make_chunk(tag, [{"t": tag}])) for tag in ("slow", "mid", "fast")
        ]
        got = [await src.read_ack() for _ in ids]
        assert got == ids
        await src.close()

    rec = arun(with_server(body))
    assert [c.tag for c in rec.chunks] == ["fast", "mid", "slow"]  # finished out of order


def test_no_ack_without_chunk_option(arun: Any) -> None:
    async def body(server: Server, rec: Recorder) -> None:
        reader, writer = await asyncio.open_connection(HOST, server.port)
        writer.write(frame("t.noack") + frame("t.ack", chunk_id=b"abc=="))
        writer.write_eof()
        reply = await read_eof(reader)
        assert reply == protocol.ServerConnection().ack(b"abc==")
        writer.close()

    rec = arun(with_server(body))
    assert [c.tag for c in rec.chunks] == ["t.noack", "t.ack"]


def test_failed_submit_closes_without_ack(arun: Any) -> None:
    async def body(server: Server, rec: Recorder) -> None:
        rec.fail_tags = {"bad"}
        reader, writer = await asyncio.open_connection(HOST, server.port)
        writer.write(frame("bad", chunk_id=b"id1"))
        assert await read_eof(reader) == b""
        writer.close()
        assert server.stats.submit_errors == 1
        # the server still serves other connections
        src = await Source.connect(server.port)
        cid = await src.send_chunk(make_chunk("good", [{"a": 1}]))
        assert await src.read_ack() == cid
        await src.close()

    arun(with_server(body))


def test_protocol_error_closes_only_that_connection(arun: Any, caplog: Any) -> None:
    async def body(server: Server, rec: Recorder) -> None:
        good = await Source.connect(server.port)
        reader, writer = await asyncio.open_connection(HOST, server.port)
        writer.write(b"\xc1\xc1\xc1")
        assert await read_eof(reader) == b""
        writer.close()
        cid = await good.send_chunk(make_chunk("good", [{"a": 1}]))
        assert await good.read_ack() == cid
        await good.close()
        assert server.stats.protocol_errors == 1

    with caplog.at_level(logging.WARNING, logger="ruletag"):
        arun(with_server(body))
    assert any("protocol error" in r.getMessage() for r in caplog.records)


def test_oversized_frame_closes_only_that_connection(arun: Any) -> None:
    async def body(server: Server, rec: Recorder) -> None:
        good = await Source.connect(server.port)
        reader, writer = await asyncio.open_connection(HOST, server.port)
        big = make_chunk("big", [{"blob": "y" * 8000}])
        writer.write(protocol.encode_chunk(big.tag, big.entries, 1, chunk_id=b"big"))
        assert await read_eof(reader) == b""
        writer.close()
        small = make_chunk("small", [{"blob": "y" * 100}])
        for _ in range(3):
            cid = await good.send_chunk(small)
            assert await good.read_ack() == cid
        await good.close()

    rec = arun(with_server(body, max_frame_size=4096))
    assert [c.tag for c in rec.chunks] == ["small"] * 3


def test_zero_byte_connection_is_not_an_error(arun: Any, caplog: Any) -> None:
    async def body(server: Server, rec: Recorder) -> None:
        for _ in range(3):
            _reader, writer = await asyncio.open_connection(HOST, server.port)
            writer.close()
            await writer.wait_closed()
        await eventually(lambda: server.stats.connections_accepted == 3, "3 accepted")
        await eventually(lambda: not server.connections, "the connections to end")

    with caplog.at_level(logging.INFO, logger="ruletag"):
        arun(with_server(body))
    assert [r for r in caplog.records if r.levelno >= logging.INFO] == []


def test_eof_after_data_still_gets_its_ack(arun: Any) -> None:
    async def body(server: Server, rec: Recorder) -> None:
        rec.delays = {"t": 0.2}
        reader, writer = await asyncio.open_connection(HOST, server.port)
        writer.write(frame("t", chunk_id=b"late=="))
        writer.write_eof()
        assert await read_eof(reader) == protocol.ServerConnection().ack(b"late==")
        writer.close()

    arun(with_server(body))


def test_max_connections_refused_at_accept(arun: Any, caplog: Any) -> None:
    async def body(server: Server, rec: Recorder) -> None:
        a = await Source.connect(server.port)
        b = await Source.connect(server.port)
        await eventually(lambda: len(server.connections) == 2, "a and b accepted")
        reader, writer = await asyncio.open_connection(HOST, server.port)
        assert await read_eof(reader) == b""
        writer.close()
        reader, writer = await asyncio.open_connection(HOST, server.port)
        assert await read_eof(reader) == b""
        writer.close()
        assert server.stats.connections_refused == 2
        for src in (a, b):
            cid = await src.send_chunk(make_chunk("t", [{"a": 1}]))
            assert await src.read_ack() == cid
        await a.close()
        await eventually(lambda: len(server.connections) == 1, "a's slot to be free again")
        c = await Source.connect(server.port)
        cid = await c.send_chunk(make_chunk("t", [{"a": 2}]))
        assert await c.read_ack() == cid
        await c.close()
        await b.close()

    with caplog.at_level(logging.WARNING, logger="ruletag"):
        arun(with_server(body, max_connections=2))
    refusals = [r for r in caplog.records if "refusing" in r.getMessage()]
    assert len(refusals) == 1  # one line per burst


def test_idle_timeout_closes_silent_connection(arun: Any) -> None:
    async def body(server: Server, rec: Recorder) -> None:
        reader, writer = await asyncio.open_connection(HOST, server.port)
        busy = await Source.connect(server.port)
        for _ in range(6):  # keeps talking for ~0.6 s, longer than the timeout
            cid = await busy.send_chunk(make_chunk("t", [{"a": 1}]))
            assert await busy.read_ack() == cid
            await asyncio.sleep(0.1)
        assert await read_eof(reader) == b""
        assert server.stats.idle_closed == 1  # closed by the idle timeout, not by the end
        cid = await busy.send_chunk(make_chunk("t", [{"a": 1}]))  # the busy one is still up
        assert await busy.read_ack() == cid
        writer.close()
        await busy.close()

    arun(with_server(body, idle_timeout="300ms"))


def test_backpressure_pauses_reading_and_resumes(arun: Any) -> None:
    async def body(server: Server, rec: Recorder) -> None:
        rec.gate = asyncio.Event()
        src = await Source.connect(server.port)
        chunk = make_chunk("t", [{"blob": "z" * 1000}])
        ids = []
        for _ in range(20):
            ids.append(await src.send_chunk(chunk))
        (proto,) = server.connections
        await eventually(lambda: proto.read_paused, "reading to pause")
        assert server.in_flight <= 4096 + chunk.size
        rec.gate.set()
        got = [await src.read_ack() for _ in ids]
        assert got == ids
        assert not proto.read_paused
        assert server.in_flight == 0
        await src.close()

    rec = arun(with_server(body, max_in_flight_bytes=4096))
    assert len(rec.chunks) == 20


def test_global_in_flight_limit_pauses_every_connection(arun: Any) -> None:
    async def body(server: Server, rec: Recorder) -> None:
        rec.gate = asyncio.Event()
        a = await Source.connect(server.port)
        b = await Source.connect(server.port)
        chunk = make_chunk("t", [{"blob": "z" * 1000}])
        ida = [await a.send_chunk(chunk) for _ in range(5)]
        await eventually(
            lambda: len(server.connections) == 2 and all(p.read_paused for p in server.connections),
            "both paused",
        )
        idb = [await b.send_chunk(chunk) for _ in range(2)]
        rec.gate.set()
        assert [await a.read_ack() for _ in ida] == ida
        assert [await b.read_ack() for _ in idb] == idb
        await a.close()
        await b.close()

    arun(with_server(body, max_total_in_flight_bytes=3000))


def test_shared_key_and_users(arun: Any) -> None:
    async def body(server: Server, rec: Recorder) -> None:
        ok = await Source.connect(server.port, shared_key="k3y", username="alice", password="pw")
        cid = await ok.send_chunk(make_chunk("t", [{"a": 1}]))
        assert await ok.read_ack() == cid
        await ok.close()
        for kwargs in (
            {"shared_key": "wrong", "username": "alice", "password": "pw"},
            {"shared_key": "k3y", "username": "alice", "password": "bad"},
            {"shared_key": "k3y", "username": "mallory", "password": "pw"},
        ):
            with pytest.raises((AuthenticationError, ConnectionError)):
                await Source.connect(server.port, **kwargs)
        assert server.stats.auth_failures == 3

    rec = arun(with_server(body, shared_key="k3y", users=[{"username": "alice", "password": "pw"}]))
    assert len(rec.chunks) == 1


def test_tag_prefix(arun: Any) -> None:
    async def body(server: Server, rec: Recorder) -> None:
        src = await Source.connect(server.port)
        cid = await src.send_chunk(make_chunk("app", [{"a": 1}]))
        assert await src.read_ack() == cid
        await src.close()

    rec = arun(with_server(body, tag_prefix="edge."))
    assert rec.chunks[0].tag == "edge.app"


def client_ssl(certs: Certs, *, with_cert: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=certs.cert)
    if with_cert:
        ctx.load_cert_chain(certs.client_cert, certs.client_key)
    return ctx


def test_tls_listener(arun: Any, certs: Certs) -> None:
    async def body(server: Server, rec: Recorder) -> None:
        src = await Source.connect(
            server.port, host="localhost", ssl_context=client_ssl(certs, with_cert=False)
        )
        cid = await src.send_chunk(make_chunk("tls", [{"a": 1}]))
        assert await src.read_ack() == cid
        await src.close()
        # a plaintext client gets nothing and is closed
        reader, writer = await asyncio.open_connection(HOST, server.port)
        writer.write(frame("plain", chunk_id=b"p"))
        assert await read_eof(reader) == b""
        writer.close()

    rec = arun(with_server(body, tls={"cert_file": certs.cert, "key_file": certs.key}))
    assert [c.tag for c in rec.chunks] == ["tls"]


def test_tls_client_cert_required(arun: Any, certs: Certs) -> None:
    async def body(server: Server, rec: Recorder) -> None:
        src = await Source.connect(
            server.port, host="localhost", ssl_context=client_ssl(certs, with_cert=True)
        )
        cid = await src.send_chunk(make_chunk("mtls", [{"a": 1}]))
        assert await src.read_ack() == cid
        await src.close()
        with pytest.raises((ssl.SSLError, ConnectionError)):
            bad = await Source.connect(
                server.port, host="localhost", ssl_context=client_ssl(certs, with_cert=False)
            )
            await bad.send_chunk(make_chunk("nocert", [{"a": 1}]))
            await bad.read_ack()

    tls = {
        "cert_file": certs.cert,
        "key_file": certs.key,
        "ca_file": certs.client_cert,
        "client_cert_required": True,
    }
    rec = arun(with_server(body, tls=tls))
    assert [c.tag for c in rec.chunks] == ["mtls"]


def test_unix_socket_listener(arun: Any, tmp_path: Path) -> None:
    path = str(tmp_path / "fwd.sock")

    async def body(server: Server, rec: Recorder) -> None:
        assert server.address == f"unix:{path}"
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(frame("unix", chunk_id=b"u1"))
        writer.write_eof()
        assert await read_eof(reader) == protocol.ServerConnection().ack(b"u1")
        writer.close()

    rec = arun(with_server(body, path=path, host=None, port=None))
    assert [c.tag for c in rec.chunks] == ["unix"]
    assert not Path(path).exists()


def test_graceful_shutdown_finishes_in_flight_chunks(arun: Any) -> None:
    async def scenario() -> None:
        rec = Recorder()
        rec.gate = asyncio.Event()
        server = Server(listen_config(), rec)
        await server.start()
        src = await Source.connect(server.port)
        cid = await src.send_chunk(make_chunk("t", [{"a": 1}]))
        await eventually(lambda: server.in_flight > 0, "the chunk to arrive")
        stopping = asyncio.create_task(server.stop(timeout=5.0))
        await asyncio.sleep(0.2)
        assert not stopping.done()
        with pytest.raises(OSError):  # no longer accepting
            await asyncio.open_connection(HOST, server.port)
        rec.gate.set()
        assert await src.read_ack() == cid
        await asyncio.wait_for(stopping, 3.0)
        await src.close()

    arun(scenario())


def test_graceful_shutdown_gives_up_after_timeout(arun: Any) -> None:
    async def scenario() -> None:
        rec = Recorder()
        rec.gate = asyncio.Event()  # never set
        server = Server(listen_config(), rec)
        await server.start()
        reader, writer = await asyncio.open_connection(HOST, server.port)
        writer.write(frame("t", chunk_id=b"never"))
        await eventually(lambda: server.in_flight > 0, "the chunk to arrive")
        await asyncio.wait_for(server.stop(timeout=0.3), 10)  # gives up instead of waiting
        assert await read_eof(reader) == b""  # closed, no ack
        writer.close()

    arun(scenario())


def test_shutdown_cancels_chunks_of_connections_already_closed(arun: Any) -> None:
    """A connection closed (protocol error) with a chunk in flight: stop() ends that submit."""
    cancelled = asyncio.Event()

    async def stuck(chunk: Chunk) -> None:
        try:
            await asyncio.Event().wait()  # the downstream never acks
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def scenario() -> None:
        server = Server(listen_config(), stuck)
        await server.start()
        reader, writer = await asyncio.open_connection(HOST, server.port)
        writer.write(frame("t", chunk_id=b"gone") + b"\xc1")  # a chunk, then a bad byte
        assert await read_eof(reader) == b""  # closed by the server, no ack
        writer.close()
        assert server.pending_chunks == 1 and not server.connections
        await server.stop(timeout=0.2)
        assert cancelled.is_set()
        assert server.pending_chunks == 0 and not server.working

    arun(scenario())
