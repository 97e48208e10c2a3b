"""Disk mode (ruletag.durable): acks mean "on disk", delivery survives outages and restarts,
a full buffer and ENOSPC hold acks instead of dropping. In-process, loopback sockets only."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from pathlib import Path
from typing import Any

import pytest

from ruletag.config.load import config_from_mapping
from ruletag.delivery.buffer import DiskBuffer
from ruletag.delivery.durable import DurablePipeline
from ruletag.protocol import Chunk
from ruletag.transport.server import Server
from support.peers import Sink, Source, eventually, make_chunk, seqs
from support.reliability import report
from support.servers import durable_pipeline


def recs(i: int, n: int = 3) -> list[dict[str, Any]]:
    return [{"seq": i * 1000 + j, "msg": "x" * 50} for j in range(n)]


def durable(
    path: Path,
    sink: Sink,
    *,
    max_bytes: int = 1 << 30,
    segment_bytes: int = 1 << 20,
    forward: dict[str, Any] | None = None,
) -> contextlib.AbstractAsyncContextManager[DurablePipeline]:
    return durable_pipeline(
        path, sink.port, forward=forward, max_bytes=max_bytes, segment_bytes=segment_bytes
    )


def test_submit_returns_while_downstream_is_down_then_delivers(arun: Any, tmp_path: Path) -> None:
    async def scenario() -> None:
        sink = Sink()
        await sink.start()
        await sink.stop()  # downstream down; the port is kept for the restart
        async with durable(tmp_path, sink) as pipe:
            for i in range(20):
                await asyncio.wait_for(pipe.submit(make_chunk("t", recs(i))), 5)
            assert pipe.stats.chunks == 20 and pipe.stats.bytes > 0
            await sink.start()
            await sink.wait_records(60, timeout=10)
            for _ in range(100):
                if pipe.stats.chunks == 0:
                    break
                await asyncio.sleep(0.05)
            assert pipe.stats.chunks == 0 and pipe.stats.oldest_age == 0.0
        assert sorted(set(seqs(sink))) == sorted(i * 1000 + j for i in range(20) for j in range(3))
        await sink.stop()

    arun(scenario(), timeout=30)


def test_unacked_chunks_are_replayed_after_restart(arun: Any, tmp_path: Path) -> None:
    async def scenario() -> None:
        sink = Sink()
        await sink.start()
        await sink.stop()
        async with durable(tmp_path, sink) as pipe:
            for i in range(10):
                await pipe.submit(make_chunk("t", recs(i)))
        left = DiskBuffer(tmp_path)
        assert left.open().pending == 10
        left.close()
        async with durable(tmp_path, sink):
            await sink.start()
            await sink.wait_records(30, timeout=10)
        assert sorted(set(seqs(sink))) == sorted(i * 1000 + j for i in range(10) for j in range(3))
        assert DiskBuffer(tmp_path).open().pending == 0
        await sink.stop()

    arun(scenario(), timeout=30)


def test_resend_of_a_buffered_chunk_id_is_stored_once(arun: Any, tmp_path: Path) -> None:
    async def scenario() -> None:
        sink = Sink()
        await sink.start()
        await sink.stop()
        async with durable(tmp_path, sink) as pipe:
            chunk = make_chunk("t", recs(1))
            with_id = Chunk(
                tag=chunk.tag, entries=chunk.entries, count=chunk.count, chunk_id=b"same-id"
            )
            await pipe.submit(with_id)
            await pipe.submit(with_id)  # fluentd resends after an ack timeout
            assert pipe.stats.appended == 1 and pipe.stats.duplicates_dropped == 1
            await sink.start()
            await sink.wait_records(3, timeout=10)
            await asyncio.sleep(0.3)
        assert len(sink.records) == 3
        await sink.stop()

    arun(scenario(), timeout=30)


def test_full_buffer_holds_the_ack_until_space_returns(
    arun: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)

    async def scenario() -> None:
        sink = Sink()
        await sink.start()
        await sink.stop()
        async with durable(tmp_path, sink, max_bytes=4000, segment_bytes=1000) as pipe:
            stored = 0
            blocked = None
            for i in range(50):
                task = asyncio.ensure_future(pipe.submit(make_chunk("t", recs(i, 5))))
                done, _ = await asyncio.wait({task}, timeout=0.5)
                if not done:
                    blocked = (i, task)
                    break
                stored += 1
            assert blocked is not None, "a 4000-byte buffer never filled"
            assert pipe.stats.full_waits >= 1 and pipe.stats.bytes <= 4000
            assert "disk buffer full" in caplog.text
            await sink.start()  # downstream back: delivery frees space, the submit returns
            await asyncio.wait_for(blocked[1], 10)
            total = stored + 1
            await sink.wait_records(total * 5, timeout=10)
        assert sorted(set(seqs(sink))) == sorted(
            i * 1000 + j for i in range(total) for j in range(5)
        )
        report(
            tmp_path,
            "disk_buffer_full",
            stored_before_full=stored,
            sent=total * 5,
            delivered=len(set(seqs(sink))),
            duplicated=len(seqs(sink)) - len(set(seqs(sink))),
        )
        await sink.stop()

    arun(scenario(), timeout=30)


def test_enospc_means_no_ack_a_clear_log_and_recovery(
    arun: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An injected ENOSPC (fsync fails like a full disk): submit does not return, so the
    server sends no ack; the error is logged; when space returns the chunk is written."""
    caplog.set_level(logging.INFO)
    real_fsync = __import__("os").fsync
    disk_full = True

    def fsync(fd: int) -> None:
        if disk_full:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    async def scenario() -> None:
        nonlocal disk_full
        sink = Sink()
        await sink.start()
        async with durable(tmp_path / "buf", sink) as pipe:
            await pipe.submit(make_chunk("t", recs(0)))
            monkeypatch.setattr("ruletag.delivery.buffer.os.fsync", fsync)
            task = asyncio.ensure_future(pipe.submit(make_chunk("t", recs(1))))
            await eventually(lambda: pipe.stats.write_errors >= 1, "a failed write")
            await eventually(lambda: "NOT acked" in caplog.text, "the error line")
            assert not task.done(), "a chunk that could not be written was acked"
            assert "ENOSPC" in caplog.text
            disk_full = False
            await asyncio.wait_for(task, 5)
            await sink.wait_records(6, timeout=10)
        got = seqs(sink)
        assert sorted(set(got)) == [0, 1, 2, 1000, 1001, 1002]
        report(
            tmp_path,
            "disk_enospc",
            sent=6,
            acked=6,
            delivered=len(set(got)),
            duplicated=len(got) - len(set(got)),
            write_errors=pipe.stats.write_errors,
        )
        await sink.stop()

    arun(scenario(), timeout=30)
    problems = DiskBuffer(tmp_path / "buf").open().problems
    assert problems == []


def test_server_acks_from_disk_while_downstream_is_down(arun: Any, tmp_path: Path) -> None:
    """Through the real server: the sender gets its acks during a downstream outage."""

    async def scenario() -> None:
        sink = Sink()
        await sink.start()
        await sink.stop()
        async with durable(tmp_path, sink) as pipe:
            cfg = config_from_mapping(
                {
                    "listen": {"port": 0},
                    "forward": {"servers": [{"host": "127.0.0.1", "port": sink.port}]},
                }
            )
            server = Server(cfg.listen, pipe.submit)
            await server.start()
            src = await Source.connect(server.port)
            for i in range(10):
                cid = await src.send_chunk(make_chunk("t", recs(i)))
                assert await src.read_ack(timeout=5) == cid
            await src.close()
            await sink.start()
            await sink.wait_records(30, timeout=10)
            await server.stop(timeout=1)
        await sink.stop()

    arun(scenario(), timeout=30)


# -- buffer invariants 7-9 and the buffer config ------------------------------------------------


def test_buffer_keeps_only_an_index_in_memory(tmp_path: Path) -> None:
    buf = DiskBuffer(tmp_path)
    buf.open()
    chunk = make_chunk("t", recs(1, 50))
    rec_id = buf.append(chunk)
    entry = buf._pending[rec_id]
    held = [getattr(entry, name) for name in type(entry).__slots__]
    assert not any(isinstance(v, Chunk) or v == chunk.entries for v in held)
    assert buf.get(rec_id) == Chunk(tag="t", entries=chunk.entries, count=chunk.count)
    buf.close()


def test_full_buffer_of_acked_data_rolls_and_reclaims(tmp_path: Path) -> None:
    buf = DiskBuffer(tmp_path, max_bytes=3000, segment_bytes=2000)
    buf.open()
    for i in range(20):  # each chunk is acked at once: the buffer must never stay full
        rec_id = buf.append(make_chunk("t", recs(i, 4)))
        buf.ack(rec_id)
    assert buf.chunks == 0 and buf.bytes_used <= 3000
    buf.close()


def test_failed_ack_record_still_frees_space(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    buf = DiskBuffer(tmp_path, segment_bytes=600)
    buf.open()
    ids = [buf.append(make_chunk("t", recs(i))) for i in range(4)]
    real_write = DiskBuffer._write

    def failing(self: DiskBuffer, kind: int, payload: bytes, *, sync: bool) -> None:
        if kind == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, kind, payload, sync=sync)

    monkeypatch.setattr(DiskBuffer, "_write", failing)
    for rec_id in ids:
        buf.ack(rec_id)
    assert buf.chunks == 0 and buf.ack_write_errors == 4
    assert "may be delivered again" in caplog.text
    buf.close()


def test_buffer_config_and_cli_override(tmp_path: Path) -> None:
    from ruletag.config.load import with_cli_overrides
    from ruletag.errors import ConfigError

    base = {"forward": {"servers": ["127.0.0.1:24225"]}}
    cfg = config_from_mapping(
        {
            **base,
            "buffer": {
                "type": "disk",
                "path": "buf",
                "max_size": "64MiB",
                "segment_size": "8MiB",
                "fsync": "never",
            },
        },
        tmp_path,
    )
    assert cfg.buffer is not None and cfg.buffer.disk
    assert cfg.buffer.path == str(tmp_path / "buf") and cfg.buffer.max_size == 64 << 20
    assert cfg.buffer.fsync == "never"
    assert config_from_mapping(base).buffer is None
    for bad, needle in [
        ({"type": "disk"}, "buffer.path"),
        ({"type": "tape"}, "buffer.type"),
        (
            {"type": "disk", "path": "b", "max_size": "1MiB", "segment_size": "1MiB"},
            "buffer.max_size",
        ),
        ({"type": "disk", "path": "b", "fsync": "sometimes"}, "buffer.fsync"),
        ({"type": "disk", "path": "b", "colour": 1}, "buffer.colour"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            config_from_mapping({**base, "buffer": bad}, tmp_path)
    over = with_cli_overrides(config_from_mapping(base), buffer_dir=str(tmp_path / "d"))
    assert over.buffer is not None and over.buffer.disk
    assert over.buffer.path == str(tmp_path / "d")


class _FlakyOutput:
    """An output whose first sends fail with an unexpected error, then succeed."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.sent: list[Chunk] = []

    async def send(self, chunk: Chunk) -> None:
        if self.failures:
            self.failures -= 1
            raise RuntimeError("output bug")
        self.sent.append(chunk)


def test_unexpected_output_error_keeps_delivery_going(arun: Any, tmp_path: Path) -> None:
    """A delivery task survives an output raising something unexpected: the chunk stays
    buffered and is delivered on a later try (a dead task would strand it until a restart)."""

    async def scenario() -> None:
        out = _FlakyOutput(failures=3)
        pipe = DurablePipeline(out, DiskBuffer(tmp_path), concurrency=1, retry_max=0.05)
        await pipe.start()
        try:
            await pipe.submit(make_chunk("t", recs(1)))
            await pipe.submit(make_chunk("t", recs(2)))
            async with asyncio.timeout(10):
                while len(out.sent) < 2 or pipe.stats.chunks:
                    await asyncio.sleep(0.01)
        finally:
            await pipe.close(timeout=0.5)
        assert [c.count for c in out.sent] == [3, 3] and pipe.stats.delivered == 2

    arun(scenario())
