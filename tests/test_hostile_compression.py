"""Compressed input and metrics/traces chunks from hostile peers.

- A CompressedPackedForward made of many tiny gzip members is refused (member cap) or decoded
  in time linear in its size, and never stalls the other connections.
- The in-flight limits count a compressed chunk at its decompressed size, so a downstream that
  stops acking pauses a sender of highly compressible chunks instead of filling ruletag's
  memory (measured on a ``ruletag serve`` subprocess).
- A metrics/traces chunk (``fluent_signal`` 1/2) must be msgpack: a malformed one closes its
  connection with a reason, unacked and not forwarded; a valid one still passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from ruletag import protocol
from ruletag.config.load import config_from_mapping
from ruletag.errors import ConfigError, RemoteProtocolError
from ruletag.protocol import Ack, Chunk
from support.codec import pack
from support.peers import (
    BackgroundLoop,
    Sink,
    Source,
    cancel_all,
    make_chunk,
    pack_entries,
    read_acks,
)
from support.reliability import report, rss_kib
from support.servers import ServeProcess, start_relay

EMPTY_MEMBER = gzip.compress(b"", mtime=0)  # 20 bytes
MIB = 1024 * 1024


def compressed_frame(payload: bytes, chunk_id: bytes | None = None, signal: int = 0) -> bytes:
    """A CompressedPackedForward message carrying ``payload`` (already gzipped) as bin."""
    options: dict[str, Any] = {"compressed": "gzip", "size": 1}
    if chunk_id is not None:
        options["chunk"] = chunk_id.decode()
    if signal:
        options["fluent_signal"] = signal
    return pack(["t", payload, options])


def many_members(size: int) -> bytes:
    """``size`` bytes (rounded down) of empty gzip members."""
    return EMPTY_MEMBER * (size // len(EMPTY_MEMBER))


def decode(frame: bytes, **kwargs: Any) -> Any:
    server = protocol.ServerConnection(max_frame_size=32 * MIB, **kwargs)
    server.receive_data(frame)
    return server.next_event()


def timed_decode(frame: bytes, **kwargs: Any) -> tuple[Any, float]:
    """(event or the RemoteProtocolError raised, seconds spent)."""
    start = time.perf_counter()
    try:
        result: Any = decode(frame, **kwargs)
    except RemoteProtocolError as exc:
        result = exc
    return result, time.perf_counter() - start


# -- codec --------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_many_empty_members_are_refused_fast(tmp_path: Path) -> None:
    figures: dict[str, Any] = {}
    for mib in (4, 15):
        payload = many_members(mib * MIB)
        result, seconds = timed_decode(compressed_frame(payload))
        assert isinstance(result, RemoteProtocolError)
        assert "more than 1024 members" in str(result)
        assert seconds < 1.0, f"{mib} MiB of members took {seconds:.2f} s"
        figures[f"refused_{mib}mib_s"] = round(seconds, 4)
        figures[f"members_{mib}mib"] = len(payload) // len(EMPTY_MEMBER)
    report(tmp_path, "many_gzip_members_codec", **figures)


@pytest.mark.timeout(120)
def test_many_members_under_a_raised_cap_decode_in_linear_time(tmp_path: Path) -> None:
    entries, count = pack_entries([{"msg": "last member"}])
    payload = many_members(4 * MIB) + gzip.compress(entries, mtime=0)
    members = len(payload) // len(EMPTY_MEMBER)
    chunk, seconds = timed_decode(compressed_frame(payload), max_inflate_members=members + 1)
    assert isinstance(chunk, Chunk), chunk
    assert (chunk.count, chunk.entries) == (count, entries)
    assert seconds < 5.0, f"{members} members took {seconds:.2f} s"
    report(tmp_path, "many_gzip_members_decoded", members=members, seconds=round(seconds, 3))


def test_member_cap_padding_and_multimember() -> None:
    one, _ = pack_entries([{"a": 1}])
    two, _ = pack_entries([{"b": 2}])
    members = gzip.compress(one, mtime=0) + gzip.compress(two, mtime=0)
    chunk = decode(compressed_frame(members + b"\x00" * 4096), max_inflate_members=2)
    assert (chunk.count, chunk.entries) == (2, one + two)
    with pytest.raises(RemoteProtocolError, match="more than 1 members"):
        decode(compressed_frame(members), max_inflate_members=1)
    with pytest.raises(RemoteProtocolError):  # padding must be zeros only
        decode(compressed_frame(members + b"\x00\x00\x01"))
    with pytest.raises(RemoteProtocolError, match="truncated"):
        decode(compressed_frame(members[:-5]))
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        decode(compressed_frame(members), max_inflate_size=len(one + two) - 1)


def test_chunk_size_counts_decompressed_bytes() -> None:
    entries, count = pack_entries({"seq": i, "msg": "x" * 1000} for i in range(1000))
    frame = protocol.encode_chunk("t", entries, count, compress=True)
    assert len(frame) < len(entries) // 20
    chunk = decode(frame)
    assert chunk.wire_size == len(frame)
    assert chunk.size >= len(entries)
    plain = protocol.encode_chunk("t", entries, count)
    assert decode(plain).size == decode(plain).wire_size == len(plain)


METRICS = pack(
    {
        "meta": {"cmetrics": {}, "processing": {"static_labels": []}},
        "metrics": [{"meta": {"type": 0, "opts": {"name": "up"}}, "values": []}],
    }
)
BAD_SIGNAL_PAYLOADS = {
    "not msgpack": b"\xc1\xc1 this is not msgpack",
    "truncated object": METRICS[:-3],
    "complete object then garbage": METRICS + b"\xc1",
}


@pytest.mark.parametrize("signal", [1, 2])
@pytest.mark.parametrize("name", list(BAD_SIGNAL_PAYLOADS))
@pytest.mark.parametrize("compress", [False, True])
def test_malformed_signal_payload_is_a_protocol_error(
    signal: int, name: str, compress: bool
) -> None:
    payload = BAD_SIGNAL_PAYLOADS[name]
    frame = protocol.encode_chunk("m", payload, 1, chunk_id=b"id", compress=compress, signal=signal)
    with pytest.raises(RemoteProtocolError, match=f"fluent_signal {signal} payload"):
        decode(frame)


@pytest.mark.parametrize("compress", [False, True])
def test_valid_signal_payload_passes(compress: bool) -> None:
    payload = METRICS * 3
    chunk = decode(protocol.encode_chunk("m", payload, 1, compress=compress, signal=1))
    assert (chunk.signal, chunk.entries) == (1, payload)


# -- end to end: a relay on 127.0.0.1 ----------------------------------------------------------


class LatencyProbe:
    """A well-behaved client: one acked chunk after another; records each ack's latency."""

    def __init__(self) -> None:
        self.sent = 0
        self.acked = 0
        self.worst = 0.0
        self.stop = asyncio.Event()

    async def run(self, port: int) -> None:
        src = await Source.connect(port)
        try:
            while not self.stop.is_set():
                start = time.perf_counter()
                cid = await src.send_chunk(make_chunk("steady", [{"n": self.sent}]))
                self.sent += 1
                assert await src.read_ack(timeout=60) == cid
                self.acked += 1
                self.worst = max(self.worst, time.perf_counter() - start)
                await asyncio.sleep(0.005)
        finally:
            await src.close()


async def send_until_closed(port: int, data: bytes, timeout: float = 30.0) -> tuple[bytes, float]:
    """Write ``data`` on a new connection; (what came back until close, seconds after write)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    with contextlib.suppress(ConnectionError):
        writer.write(data)
        await writer.drain()
    start = time.perf_counter()
    back = bytearray()
    try:
        async with asyncio.timeout(timeout):
            with contextlib.suppress(ConnectionError):
                while piece := await reader.read(65536):
                    back += piece
    finally:
        writer.close()
    return bytes(back), time.perf_counter() - start


def acks_in(data: bytes) -> list[bytes]:
    client = protocol.ClientConnection()
    client.receive_data(data)
    out = []
    with contextlib.suppress(RemoteProtocolError):
        while isinstance(event := client.next_event(), Ack):
            out.append(event.chunk_id)
    return out


@pytest.mark.timeout(240)
def test_many_members_never_stall_other_connections(arun: Any, tmp_path: Path) -> None:
    async def scenario() -> dict[str, Any]:
        async with start_relay() as relay:
            probe = LatencyProbe()
            task = asyncio.create_task(probe.run(relay.port))
            await asyncio.sleep(0.2)
            figures: dict[str, Any] = {}
            for mib in (4, 15):
                frame = compressed_frame(many_members(mib * MIB), chunk_id=b"bomb")
                back, seconds = await send_until_closed(relay.port, frame, timeout=120)
                assert not acks_in(back)
                figures[f"closed_after_{mib}mib_s"] = round(seconds, 3)
                assert not task.done(), "the steady client died"
            await asyncio.sleep(0.2)
            probe.stop.set()
            await asyncio.wait_for(task, 60)
            await relay.sink.wait_records(probe.acked, timeout=10)
            assert len(relay.sink.records) == probe.acked  # nothing of the attack got through
            assert relay.server.stats.protocol_errors >= 2
            return {
                **figures,
                "steady_chunks_sent": probe.sent,
                "steady_chunks_acked": probe.acked,
                "steady_records_delivered": len(relay.sink.records),
                "steady_worst_ack_latency_s": round(probe.worst, 3),
            }

    figures = arun(scenario(), timeout=230)
    report(tmp_path, "many_gzip_members_relay", **figures)
    assert figures["steady_worst_ack_latency_s"] < 2.0


@pytest.mark.parametrize("compress", [False, True])
def test_malformed_metrics_chunk_closes_its_connection(
    arun: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, compress: bool
) -> None:
    async def scenario() -> dict[str, Any]:
        async with start_relay() as relay:
            bad = protocol.encode_chunk(
                "metrics", b"\xc1\xc1 not msgpack", 1, chunk_id=b"bad", compress=compress, signal=1
            )
            back, _ = await send_until_closed(relay.port, bad, timeout=10)
            assert acks_in(back) == []
            src = await Source.connect(relay.port)
            good = Chunk(tag="metrics", entries=METRICS, count=1, signal=1)
            cid = await src.send_chunk(good)
            assert await src.read_ack() == cid
            await src.close()
            chunks = await relay.sink.wait_chunks(1)
            assert [(c.signal, c.entries) for c in chunks] == [(1, METRICS)]
            return {
                "bad_sent": 1,
                "bad_acked": len(acks_in(back)),
                "good_sent": 1,
                "good_acked": 1,
                "forwarded": len(chunks),
                "protocol_errors": relay.server.stats.protocol_errors,
            }

    with caplog.at_level(logging.WARNING, logger="ruletag.transport.server"):
        figures = arun(scenario(), timeout=30)
    assert "fluent_signal 1 payload is not msgpack" in caplog.text
    report(tmp_path, f"malformed_metrics_chunk_{'gzip' if compress else 'plain'}", **figures)


def test_max_inflate_members_is_a_listen_key(arun: Any, caplog: pytest.LogCaptureFixture) -> None:
    forward = {"servers": [{"host": "127.0.0.1", "port": 1}]}
    listen = config_from_mapping({"forward": forward}).listen
    assert listen.max_inflate_members == protocol.DEFAULT_MAX_INFLATE_MEMBERS
    with pytest.raises(ConfigError, match=r"listen\.max_inflate_members: must be an int"):
        config_from_mapping({"listen": {"max_inflate_members": 0}, "forward": forward})
    entries, _ = pack_entries([{"a": 1}])
    two = compressed_frame(gzip.compress(entries) * 2, chunk_id=b"two")

    async def scenario() -> list[bytes]:
        async with start_relay(listen={"max_inflate_members": 1}) as relay:
            back, _ = await send_until_closed(relay.port, two, timeout=10)
            assert relay.sink.chunks == []
            return acks_in(back)

    with caplog.at_level(logging.WARNING, logger="ruletag.transport.server"):
        assert arun(scenario(), timeout=30) == []
    assert "gzip payload has more than 1 members" in caplog.text


# -- end to end: memory of a ruletag subprocess ------------------------------------------------

RECORDS_PER_CHUNK = 1000


class CompressedSender:
    """Writes highly compressible compressed chunks as fast as TCP takes them; counts acks."""

    def __init__(self) -> None:
        entries, self.count = pack_entries(
            {"seq": i, "msg": "the same text again " * 50} for i in range(RECORDS_PER_CHUNK)
        )
        self.decompressed = len(entries)
        self.payload = gzip.compress(entries, mtime=0)
        self.sent = 0
        self.acked: set[bytes] = set()
        self.producing = True
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._write(writer)), loop.create_task(self._read(reader))]

    async def _write(self, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while self.producing:
                cid = protocol.new_chunk_id()
                writer.write(compressed_frame(self.payload, chunk_id=cid))
                await writer.drain()
                self.sent += 1

    async def _read(self, reader: asyncio.StreamReader) -> None:
        await read_acks(reader, self.acked.add)

    async def stop(self) -> None:
        await cancel_all(self._tasks)


def _relay_config(path: Path, sink_port: int) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "listen": {
                    "host": "127.0.0.1",
                    "port": 0,
                    "max_in_flight_bytes": "4MiB",
                    "max_total_in_flight_bytes": "16MiB",
                    "max_frame_size": "1MiB",
                },
                "forward": {
                    "servers": [{"host": "127.0.0.1", "port": sink_port}],
                    "ack_timeout": 30,
                    "connect_timeout": 1,
                    "max_in_flight_bytes": "4MiB",
                },
            }
        )
    )
    return path


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_compressed_chunks_are_bounded_by_decompressed_size(
    tmp_path: Path, serve_process: Any
) -> None:
    """Downstream accepts but never acks; the sender pushes 1 MB-per-chunk records gzipped to a
    few KB. ruletag's RSS stays tens of MB over its baseline and the sender is paused."""
    limit_kib = 400 * 1024  # stop early (and fail) rather than exhaust the machine
    seconds = 6.0
    with BackgroundLoop() as bg:
        sink = Sink(ack=False)
        bg.run(sink.start())
        sp: ServeProcess = serve_process(
            ["--config", str(_relay_config(tmp_path / "r.yaml", sink.port))]
        )
        baseline = peak = rss_kib(sp.proc.pid)
        sender = CompressedSender()
        bg.run(sender.start(sp.port))
        end = time.monotonic() + seconds
        sent_half = -1
        while time.monotonic() < end and peak - baseline < limit_kib:
            time.sleep(0.1)
            peak = max(peak, rss_kib(sp.proc.pid))
            if sent_half < 0 and time.monotonic() >= end - seconds / 2:
                sent_half = sender.sent
        sent_end = sender.sent
        sender.producing = False
        bg.run(sender.stop())
        forwarded = len(sink.chunks)
        bg.run(sink.stop())
    report(
        tmp_path,
        "compressed_chunks_stalled_downstream",
        stall_s=seconds,
        chunk_wire_bytes=len(compressed_frame(sender.payload, b"x" * 24)),
        chunk_decompressed_bytes=sender.decompressed,
        chunks_sent_half=sent_half,
        chunks_sent_end=sent_end,
        records_sent=sent_end * sender.count,
        records_acked=len(sender.acked) * sender.count,
        chunks_forwarded_unacked=forwarded,
        rss_baseline_mib=round(baseline / 1024, 1),
        rss_peak_mib=round(peak / 1024, 1),
    )
    assert peak - baseline < 100 * 1024, f"RSS grew {baseline} -> {peak} KiB"
    assert not sender.acked
    assert sent_end == sent_half, "the sender was not paused"
