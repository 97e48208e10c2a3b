"""Hostile input against a running relay, while a well-behaved client keeps sending.

Each attack runs on its own connection(s): oversized frames, gzip bombs, deep nesting, huge
map/array headers, invalid UTF-8, random garbage, wrong shared key, wrong password, a client
that connects and sends nothing (idle timeout), more connections than the limit. The steady
client (authenticated, acks on) must get every ack and every one of its records must arrive.
Also: TLS on both sides (listener and forwarder, client certificates), certificates made by
the tests (conftest ``certs``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import random
import ssl
from pathlib import Path
from typing import Any

import msgpack
import pytest

from ruletag.errors import AuthenticationError
from support.codec import pack
from support.peers import Sink, Source, eventually, make_chunk
from support.reliability import report
from support.servers import Certs, start_relay

KEY = "hostile-key"
USERS = [{"username": "alice", "password": "right"}]
LISTEN = {
    "shared_key": KEY,
    "users": USERS,
    "max_frame_size": "64KiB",
    "max_inflate_size": "256KiB",
    "idle_timeout": 0.5,
    "max_connections": 16,
}


class Steady:
    """A well-behaved client sending one acked chunk every few ms until stopped."""

    def __init__(self) -> None:
        self.sent = 0
        self.acked = 0
        self.stop = asyncio.Event()

    async def run(self, port: int, **auth: Any) -> None:
        src = await Source.connect(port, **auth)
        try:
            while not self.stop.is_set():
                records = [{"steady": self.sent * 10 + j} for j in range(10)]
                cid = await src.send_chunk(make_chunk("steady", records))
                self.sent += 1
                assert await src.read_ack(timeout=10) == cid
                self.acked += 1
                await asyncio.sleep(0.005)
        finally:
            await src.close()


async def closed_by_server(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    """Read until the server closes; return what it sent (fails on timeout)."""
    out = bytearray()
    async with asyncio.timeout(timeout):
        with contextlib.suppress(ConnectionResetError):
            while data := await reader.read(65536):
                out += data
    return bytes(out)


async def raw(port: int, data: bytes, *, handshake: bool = True) -> bytes:
    """Open a connection, (authenticate,) write ``data``, return what came back until close."""
    if handshake:
        src = await Source.connect(
            port, shared_key=KEY, username="alice", password="right", hostname="attacker"
        )
        reader, writer = src.reader, src.writer
    else:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    with contextlib.suppress(ConnectionResetError, BrokenPipeError):
        writer.write(data)
        await writer.drain()
    try:
        return await closed_by_server(reader)
    finally:
        writer.close()


ATTACKS: dict[str, bytes] = {
    "oversized frame": pack(["t", b"\x00" * (200 * 1024), {}]),
    "gzip bomb": pack(["t", gzip.compress(b"\x00" * (16 * 1024 * 1024)), {"compressed": "gzip"}]),
    "deep nesting": b"\x93\xa1t\x91\x92\x01\x81\xa1a" + b"\x91" * 50_000 + b"\xc0",
    # claim 4G items, then keep sending them: the frame limit ends it (not memory)
    "huge map header": b"\x93\xa1t\x91\x92\x01\xdf\xff\xff\xff\xff" + b"\xc0" * 100_000,
    "huge array header": b"\x92\xa1t\xdd\xff\xff\xff\xff" + b"\x01" * 100_000,
    "invalid utf-8 tag": b"\x93\xa2\xff\xfe\x01\x80",
    "not an array": pack({"a": 1}),
    "bad event time": pack(["t", msgpack.ExtType(5, b"x"), {"a": 1}]),
}


def test_hostile_input_never_disturbs_a_steady_client(arun: Any, tmp_path: Path) -> None:
    async def scenario() -> dict[str, Any]:
        async with start_relay(listen=LISTEN) as relay:
            port = relay.port
            steady = Steady()
            task = asyncio.create_task(
                steady.run(
                    port, shared_key=KEY, username="alice", password="right", hostname="steady"
                )
            )
            await asyncio.sleep(0.1)
            errors_before = relay.server.stats.protocol_errors
            for name, data in ATTACKS.items():
                await raw(port, data)  # the server closes the connection
                assert not task.done(), f"steady client died during {name!r}"
            assert relay.server.stats.protocol_errors - errors_before >= len(ATTACKS)

            rng = random.Random(1234)
            garbage = 0
            for _ in range(40):
                blob = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(raw(port, blob), 2)
                garbage += 1

            # wrong shared key, wrong password: refused, no data accepted
            for auth in (
                {"shared_key": "wrong", "username": "alice", "password": "right"},
                {"shared_key": KEY, "username": "alice", "password": "wrong"},
                {"shared_key": KEY, "username": "mallory", "password": "right"},
            ):
                with pytest.raises(AuthenticationError):
                    await Source.connect(port, hostname="attacker", **auth)
            assert relay.server.stats.auth_failures >= 3

            # a client that connects and sends nothing is closed by the idle timeout
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            helo = await closed_by_server(reader, timeout=5)
            assert helo.startswith(b"\x92\xa4HELO")
            writer.close()
            assert relay.server.stats.idle_closed >= 1

            # more connections than the limit: the extra ones are closed at accept. All 20 at
            # once: opened one after another on a loaded machine, the first ones could reach
            # the idle timeout (0.5 s) and free their slots before the last were accepted
            opening = [asyncio.open_connection("127.0.0.1", port) for _ in range(20)]
            held = await asyncio.gather(*opening)
            # the steady client holds one slot, so at least 5 of the 20 are refused
            await eventually(
                lambda: relay.server.stats.connections_refused >= 20 - 16 + 1,
                "the extra connections to be refused",
            )
            refused = relay.server.stats.connections_refused
            for _, w in held:
                w.close()
            await asyncio.sleep(0.7)  # idle timeout frees the held slots

            await asyncio.sleep(0.2)
            steady.stop.set()
            await asyncio.wait_for(task, 10)
            expected = steady.acked * 10
            records = await relay.sink.wait_records(expected, timeout=10)
            steady_records = [r["steady"] for r in records if "steady" in r]
            assert sorted(set(steady_records)) == list(range(expected))
            assert len(records) == len(steady_records), "an attack's records got through"
            return {
                "attacks": len(ATTACKS),
                "garbage_connections": garbage,
                "auth_refused": relay.server.stats.auth_failures,
                "refused_at_accept": refused,
                "steady_chunks_sent": steady.sent,
                "steady_chunks_acked": steady.acked,
                "steady_records_delivered": len(set(steady_records)),
                "duplicated": len(steady_records) - len(set(steady_records)),
            }

    figures = arun(scenario(), timeout=90)
    report(tmp_path, "hostile_input", **figures)


def _server_ctx(cert: str, key: str, ca: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    if ca:
        ctx.load_verify_locations(cafile=ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def test_tls_on_both_sides_with_client_certificates(arun: Any, certs: Certs) -> None:
    """Sender --TLS (client cert required)--> ruletag --TLS (client cert, verified)--> sink."""

    async def scenario() -> None:
        sink = Sink(ssl_context=_server_ctx(certs.cert, certs.key, ca=certs.client_cert))
        await sink.start()
        listen = {
            "tls": {
                "cert_file": certs.cert,
                "key_file": certs.key,
                "ca_file": certs.client_cert,
                "client_cert_required": True,
            }
        }
        forward = {
            "tls": {
                "ca_file": certs.cert,
                "cert_file": certs.client_cert,
                "key_file": certs.client_key,
                "server_hostname": "localhost",
            }
        }
        async with start_relay(listen=listen, forward=forward, sink=sink) as relay:
            client_ctx = ssl.create_default_context(cafile=certs.cert)
            client_ctx.check_hostname = False
            client_ctx.load_cert_chain(certs.client_cert, certs.client_key)
            src = await Source.connect(relay.port, ssl_context=client_ctx)
            for i in range(5):
                cid = await src.send_chunk(make_chunk("tls", [{"i": i}]))
                assert await src.read_ack() == cid
            await src.close()
            records = await sink.wait_records(5)
            assert [r["i"] for r in records] == list(range(5))
            # without a client certificate the listener refuses the TLS handshake
            bare = ssl.create_default_context(cafile=certs.cert)
            bare.check_hostname = False
            with pytest.raises((ssl.SSLError, ConnectionError, TimeoutError, OSError)):
                other = await Source.connect(relay.port, ssl_context=bare, timeout=3)
                await other.send_chunk(make_chunk("tls", [{"i": 99}]))
                await other.read_ack(timeout=3)
        await sink.stop()

    arun(scenario(), timeout=60)
