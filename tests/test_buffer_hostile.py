"""Disk mode against hostile conditions (issue 11, items 7-9): chunk ids reused with other
content, damaged segment bytes, a full filesystem. Real files, a real relay on 127.0.0.1."""

from __future__ import annotations

import asyncio
import errno
import io
import logging
import os
import shutil
import struct
import subprocess
import zlib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest

from ruletag.config.model import ListenConfig
from ruletag.delivery.buffer import DiskBuffer
from ruletag.delivery.durable import DurablePipeline
from ruletag.protocol import Chunk
from ruletag.runtime.metrics import Metrics, MetricsServer, health_of
from ruletag.transport.server import Server
from support import servers
from support.peers import Sink, Source, eventually, make_chunk, seqs
from support.reliability import report, rss_kib
from support.servers import durable_pipeline


@dataclass
class DiskRelay:
    """Server -> DurablePipeline -> Forwarder -> sink, with /metrics and /health."""

    server: Server
    pipe: DurablePipeline
    http: MetricsServer

    @property
    def port(self) -> int:
        return self.server.port


@asynccontextmanager
async def disk_relay(path: Path, sink: Sink, **buffer: Any) -> AsyncIterator[DiskRelay]:
    """A relay in disk mode on 127.0.0.1 whose downstream is ``sink`` (up or down)."""
    async with durable_pipeline(path, sink.port, **buffer) as pipe:
        server = Server(ListenConfig(host="127.0.0.1", port=0), pipe.submit)
        await server.start()
        metrics = Metrics()
        metrics.bind(
            server=server,
            forwarder=pipe.forwarder,
            buffer=pipe.stats,
            health=health_of((lambda: server.listening, "listener not up")),
        )
        http = MetricsServer(metrics, "127.0.0.1", 0)
        await http.start()
        try:
            yield DiskRelay(server, pipe, http)
        finally:
            await http.stop()
            await server.stop(timeout=1)


async def http_get(port: int, path: str) -> str:
    """The body of ``GET path`` on 127.0.0.1:port."""
    return (await servers.http_get(port, path))[2].decode()


def with_id(chunk: Chunk, chunk_id: bytes) -> Chunk:
    return Chunk(tag=chunk.tag, entries=chunk.entries, count=chunk.count, chunk_id=chunk_id)


# -- item 7: chunk ids are not unique ----------------------------------------------------------


def test_same_chunk_id_other_content_is_a_new_chunk(arun: Any, tmp_path: Path) -> None:
    """Two connections send the same ``chunk`` id with different records: both are acked and
    both delivered. A true resend (same id, same content) is stored once."""

    async def scenario() -> None:
        sink = Sink()
        await sink.start()
        await sink.stop()  # downstream down: everything stays buffered together
        async with disk_relay(tmp_path / "buf", sink) as relay:
            first = with_id(make_chunk("t", [{"seq": i} for i in range(3)]), b"same-id")
            other = with_id(make_chunk("t", [{"seq": 100 + i} for i in range(3)]), b"same-id")
            a, b = await Source.connect(relay.port), await Source.connect(relay.port)
            acked = 0
            for src, chunk in ((a, first), (b, other), (a, first)):  # the last: a resend
                await src.send_chunk(chunk)
                assert await src.read_ack(timeout=5) == b"same-id"
                acked += 1
            stats = relay.pipe.stats
            assert stats.appended == 2 and stats.duplicates_dropped == 1
            await sink.start()
            await sink.wait_records(6, timeout=10)
            await eventually(lambda: relay.pipe.stats.chunks == 0, "delivery", timeout=10)
            await asyncio.sleep(0.3)  # a third delivery would show up now
            await a.close()
            await b.close()
        got = seqs(sink)
        report(
            tmp_path,
            "disk_same_chunk_id",
            chunks_sent=3,
            chunks_acked=acked,
            records_sent=9,
            records_delivered=len(got),
            lost=6 - len(set(got)),
            duplicates_dropped=stats.duplicates_dropped,
        )
        assert sorted(got) == [0, 1, 2, 100, 101, 102]
        await sink.stop()

    arun(scenario(), timeout=30)


# -- item 8: a damaged record loses only itself --------------------------------------------------


def test_damaged_record_is_skipped_alone_and_named(
    arun: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """400 acked chunks in one segment, bytes flipped inside the 201st, restart: 399 delivered
    and the log names the lost one (count, chunk id, segment, offset)."""
    caplog.set_level(logging.WARNING)
    path = tmp_path / "buf"
    total, victim = 400, 200

    async def fill() -> int:
        sink = Sink()
        await sink.start()
        await sink.stop()
        acked = 0
        async with disk_relay(path, sink) as relay:
            src = await Source.connect(relay.port)
            for i in range(total):
                chunk = make_chunk("t", [{"seq": i, "msg": f"payload-{i:05d}-" + "x" * 40}])
                await src.send_chunk(with_id(chunk, b"c-%05d" % i))
                await src.read_ack(timeout=5)
                acked += 1
            await src.close()
        return acked

    async def replay() -> Sink:
        sink = Sink()
        await sink.start()
        async with disk_relay(path, sink):
            await sink.wait_records(total - 1, timeout=20)
            await asyncio.sleep(0.3)
        await sink.stop()
        return sink

    acked = arun(fill(), timeout=60)
    segments = sorted(path.glob("segment-*.log"))
    assert len(segments) == 1, segments
    data = bytearray(segments[0].read_bytes())
    at = data.index(b"payload-%05d-" % victim) + 20
    for k in range(3):
        data[at + k] ^= 0x5A
    segments[0].write_bytes(bytes(data))
    caplog.clear()

    sink = arun(replay(), timeout=60)
    got = seqs(sink)
    report(
        tmp_path,
        "disk_damaged_record",
        chunks_sent=total,
        chunks_acked=acked,
        records_delivered=len(set(got)),
        lost=total - len(set(got)),
        duplicated=len(got) - len(set(got)),
    )
    assert sorted(set(got)) == [i for i in range(total) if i != victim]
    log = caplog.text
    assert "1 chunk record(s) lost" in log and "'c-00200'" in log, log
    assert segments[0].name in log and "bytes " in log


# -- segment format versions -----------------------------------------------------------------


def _v1_record(kind: int, payload: bytes) -> bytes:
    return struct.pack(">4sBII", b"RTB1", kind, len(payload), zlib.crc32(payload)) + payload


def test_format_1_segment_is_replayed(tmp_path: Path) -> None:
    """A segment written by the previous format (no header, RTB1 records) is still read."""
    chunks = [make_chunk("t", [{"seq": i}]) for i in range(3)]
    body = b"".join(
        _v1_record(
            1,
            msgpack.packb(
                [i + 1, c.tag, c.entries, c.count, b"id-%d" % i, 0, False, 1.0], use_bin_type=True
            ),
        )
        for i, c in enumerate(chunks)
    ) + _v1_record(2, msgpack.packb([2]))
    (tmp_path / "segment-000000000001.log").write_bytes(body)
    buf = DiskBuffer(tmp_path)
    report_ = buf.open()
    assert report_.problems == [] and buf.pending_ids() == [1, 3]
    got = buf.get(3)
    assert got is not None and got.entries == chunks[2].entries and got.chunk_id == b"id-2"
    new = buf.append(make_chunk("t", [{"seq": 9}]))  # goes to a new, format-2 segment
    assert new == 4 and (tmp_path / "segment-000000000002.log").read_bytes()[:4] == b"RTBS"
    for rec_id in (1, 3, 4):
        buf.ack(rec_id)
    assert not (tmp_path / "segment-000000000001.log").exists()
    buf.close()


def test_newer_format_segment_is_refused_and_left_alone(tmp_path: Path) -> None:
    future = tmp_path / "segment-000000000005.log"
    future.write_bytes(struct.pack(">4sHH", b"RTBS", 9, 0) + b"future records")
    before = future.read_bytes()
    buf = DiskBuffer(tmp_path)
    report_ = buf.open()
    assert report_.refused == [future.name]
    assert any("version 9" in p and "NOT replayed" in p for p in report_.problems)
    buf.ack(buf.append(make_chunk("t", [{"seq": 1}])))
    buf.close()
    assert future.read_bytes() == before  # never written, never deleted
    assert all(int(p.stem.split("-")[1]) > 5 for p in tmp_path.glob("*.log") if p != future)


def test_flipped_kind_byte_is_not_taken_for_an_ack(tmp_path: Path) -> None:
    """The header checksum catches a damaged kind/length: a chunk record can never be read
    as an ACK record (which would silently drop the chunk)."""
    buf = DiskBuffer(tmp_path)
    buf.open()
    ids = [buf.append(make_chunk("t", [{"seq": i}])) for i in range(3)]
    buf.close()
    seg = next(tmp_path.glob("segment-*.log"))
    data = bytearray(seg.read_bytes())
    first = data.index(b"RTB2")
    second = data.index(b"RTB2", first + 1)
    data[second + 4] = 2  # chunk 2's kind byte -> ACK
    seg.write_bytes(bytes(data))
    again = DiskBuffer(tmp_path)
    rep = again.open()
    assert again.pending_ids() == [ids[0], ids[2]]
    assert rep.lost_chunks == 1 and "chunk 2" in rep.problems[0]


def test_injected_enospc_rolls_the_active_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC on the segment being written rolls it, so its delivered bytes come back."""
    buf = DiskBuffer(tmp_path)  # 64 MiB segments: size never rolls here
    buf.open()
    for i in range(5):
        buf.ack(buf.append(make_chunk("t", [{"seq": i}])))
    first = next(tmp_path.glob("segment-*.log"))
    assert buf.bytes_used > 0
    real_fsync = os.fsync

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("ruletag.delivery.buffer.os.fsync", no_space)
    with pytest.raises(OSError):
        buf.append(make_chunk("t", [{"seq": 9}]))
    assert not first.exists() and buf.bytes_used == 0  # the delivered active segment is gone
    monkeypatch.setattr("ruletag.delivery.buffer.os.fsync", real_fsync)
    rec_id = buf.append(make_chunk("t", [{"seq": 9}]))
    buf.close()
    again = DiskBuffer(tmp_path)
    assert again.open().problems == [] and again.pending_ids() == [rec_id]


# -- item 9: a full disk never wedges the relay ---------------------------------------------------


def test_full_flag_clears_when_the_waiting_chunk_goes_away(
    arun: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``stats.full`` (/health, ruletag_buffer_full) is true only while a chunk waits for space:
    a sender that disconnects while waiting does not leave it set."""

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    async def scenario() -> None:
        sink = Sink()
        await sink.start()
        async with disk_relay(tmp_path / "buf", sink) as relay:
            monkeypatch.setattr("ruletag.delivery.buffer.os.fsync", no_space)
            task = asyncio.ensure_future(relay.pipe.submit(make_chunk("t", [{"seq": 1}])))
            await eventually(lambda: relay.pipe.stats.full, "the full state")
            assert "buffer full" in await http_get(relay.http.port, "/health")
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            assert not relay.pipe.stats.full
            monkeypatch.undo()
        await sink.stop()

    arun(scenario(), timeout=30)


SMALL_FS_BYTES = 2 << 20


class _BudgetFile(io.FileIO):
    """A segment file in a folder that behaves like a ``budget``-byte filesystem: a write
    that does not fit is short, the next one fails with ENOSPC; freed files give space back."""

    budget = SMALL_FS_BYTES

    def write(self, data: Any) -> int:
        folder = Path(self.name).parent
        used = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
        room = self.budget - used
        if room <= 0:
            raise OSError(errno.ENOSPC, "No space left on device (simulated)")
        return super().write(memoryview(data)[:room])


def _mount_tmpfs(mnt: Path) -> str | None:
    """Mount a 2 MiB tmpfs on ``mnt`` (root or CAP_SYS_ADMIN); None, or why it could not."""
    if shutil.which("mount") is None:
        return "no mount command"
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        timeout=10,
    )
    return None if proc.returncode == 0 else proc.stderr.strip() or f"exit {proc.returncode}"


@pytest.fixture
def small_fs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A 2 MiB filesystem: a real tmpfs where it can be mounted (root, as in CI), otherwise a
    folder whose segment files fail with ENOSPC past 2 MiB in all (never a skip)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    why = _mount_tmpfs(mnt)
    if why is not None:
        logging.getLogger(__name__).info("no tmpfs (%s): simulating a 2 MiB filesystem", why)
        monkeypatch.setattr(
            "ruletag.delivery.buffer._open_segment", lambda path: _BudgetFile(path, "ab")
        )
        yield mnt
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=10)


def big_chunk(seq: int) -> Chunk:
    """About 4 KiB: 10 records of ~400 bytes."""
    return make_chunk("t", [{"seq": seq * 100 + j, "msg": "y" * 380} for j in range(10)])


async def fill_until_full(relay: DiskRelay, first_seq: int) -> tuple[Source, list[int], int]:
    """Send until an ack does not come (the disk is full); the unacked chunk is in flight."""
    src = await Source.connect(relay.port)
    acked: list[int] = []
    for seq in range(first_seq, first_seq + 5000):
        await src.send_chunk(big_chunk(seq))
        try:
            await src.read_ack(timeout=3)
        except TimeoutError:
            if relay.pipe.stats.full:
                return src, acked, seq
            await src.read_ack(timeout=10)  # only slow (a loaded machine): not full yet
        acked.append(seq)
    raise AssertionError("a 2 MiB filesystem never filled")


async def send_acked(relay: DiskRelay, first_seq: int, n: int) -> int:
    """A new sender sends ``n`` chunks one at a time; returns how many were acked."""
    src = await Source.connect(relay.port)
    acked = 0
    try:
        for seq in range(first_seq, first_seq + n):
            await src.send_chunk(big_chunk(seq))
            await src.read_ack(timeout=10)
            acked += 1
    except TimeoutError:
        pass
    finally:
        await src.close()
    return acked


def on_disk(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in folder.glob("segment-*.log")}


def records_of(first: int, last: int) -> set[int]:
    """The record seqs of chunks ``first`` .. ``last`` (inclusive) made by ``big_chunk``."""
    return {s * 100 + j for s in range(first, last + 1) for j in range(10)}


async def full_disk_round(relay: DiskRelay, sink: Sink, folder: Path, seq: int) -> dict[str, int]:
    """Downstream down until the disk is full, then up; then a new sender sends 400 chunks."""
    await sink.stop()
    src, acked, held = await fill_until_full(relay, seq)
    assert relay.pipe.stats.full, "no buffer-full state while the disk is full"
    health = await http_get(relay.http.port, "/health")
    metrics = await http_get(relay.http.port, "/metrics")
    assert "buffer full" in health and "ruletag_buffer_full 1.0" in metrics, health
    full_files = {name for name, size in on_disk(folder).items() if size}
    await sink.start()
    await src.read_ack(timeout=20)  # the chunk held while the disk was full is acked now
    await src.close()
    want = records_of(seq, held)
    await eventually(lambda: want <= set(seqs(sink)), "every acked record", 30)
    await eventually(lambda: relay.pipe.stats.chunks == 0, "an empty buffer", 30)
    left = on_disk(folder)
    assert not full_files & set(left), (full_files, left)  # the active segment included
    assert "buffer full" not in await http_get(relay.http.port, "/health")
    fresh = await send_acked(relay, held + 1, 400)
    assert fresh == 400, f"a new sender got {fresh} of 400 chunks acked"
    fresh_want = records_of(held + 1, held + 400)
    await eventually(lambda: fresh_want <= set(seqs(sink)), "the new sender's records", 30)
    return {
        "filled_chunks": len(acked) + 1,
        "new_sender_acked": fresh,
        "segments_left": len(on_disk(folder)),
        "next_seq": held + 401,
    }


@pytest.mark.slow
def test_full_disk_reclaims_every_segment_and_never_wedges(
    arun: Any, small_fs: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Downstream down until a 2 MiB filesystem is full (backpressure, /health says so), then
    up: every acked chunk is delivered, every written segment (the active one included) is
    reclaimed, and a new sender gets all of its 400 chunks acked. Twice in a row."""
    caplog.set_level(logging.INFO)
    figures: dict[str, Any] = {}

    async def scenario() -> None:
        sink = Sink()
        await sink.start()
        seq = 0
        async with disk_relay(small_fs, sink, max_bytes=1 << 30, segment_bytes=64 << 20) as relay:
            for rnd in (1, 2):
                got = await full_disk_round(relay, sink, small_fs, seq)
                seq = got.pop("next_seq")
                figures[f"round{rnd}"] = "/".join(f"{k}={v}" for k, v in got.items())
            stats = relay.pipe.stats
            figures.update(write_errors=stats.write_errors, peak_rss_kib=rss_kib(os.getpid()))
        delivered = seqs(sink)
        figures.update(
            records_sent=seq * 10,
            records_delivered=len(set(delivered)),
            lost=seq * 10 - len(set(delivered)),
            duplicated=len(delivered) - len(set(delivered)),
        )
        await sink.stop()

    arun(scenario(), timeout=150)
    report(tmp_path, "disk_full_filesystem", **figures)
    assert figures["lost"] == 0
    assert caplog.text.count("NOT acked") >= 2  # one clear line per full episode
