"""Fault tests against a real ``ruletag serve`` subprocess on loopback: kill -9 mid-stream (disk
and memory mode), downstream outage / flapping / never acking / acking slowly. Each counts the
records sent, acked, delivered and duplicated, and measures ruletag's RSS (/proc/<pid>/status),
and prints them (``pytest -s``) and appends them to ``<basetemp>/reliability.jsonl``.

The sender behaves like fluentd/Fluent Bit with ``require_ack_response``: it keeps every chunk
until acked and resends unacked chunks with the same chunk id after a reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import yaml

from ruletag import protocol
from support.peers import BackgroundLoop, Sink, cancel_all, pack_entries, read_acks
from support.reliability import report, rss_kib
from support.servers import ServeProcess, start_serve

pytestmark = pytest.mark.slow

RECORDS_PER_CHUNK = 20


class Streamer:
    """A forward client that streams numbered records and tracks what was acked.

    ``window`` caps unacked chunks (None: no cap, so only TCP backpressure slows it down).
    """

    def __init__(self, window: int | None = 50, payload: int = 100) -> None:
        self.window = window
        self.payload = "p" * payload
        self.chunks: dict[bytes, tuple[bytes, list[int]]] = {}  # id -> (frame, seqs)
        self.acked: set[bytes] = set()
        self.bytes_written = 0
        self.bytes_acked = 0
        self.next_seq = 0
        self.producing = True  # False: stop making new chunks (the connection stays open)
        self._writer: asyncio.StreamWriter | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._ack_event = asyncio.Event()

    @property
    def unacked_bytes(self) -> int:
        return self.bytes_written - self.bytes_acked

    def new_chunk(self) -> bytes:
        seqs = list(range(self.next_seq, self.next_seq + RECORDS_PER_CHUNK))
        self.next_seq += RECORDS_PER_CHUNK
        entries, count = pack_entries({"seq": s, "msg": self.payload} for s in seqs)
        chunk_id = protocol.new_chunk_id()
        frame = protocol.encode_chunk("fault.test", entries, count, chunk_id=chunk_id)
        self.chunks[chunk_id] = (frame, seqs)
        return chunk_id

    async def connect(self, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        self._writer = writer
        self._tasks = [asyncio.get_running_loop().create_task(self._read(reader))]

    async def _read(self, reader: asyncio.StreamReader) -> None:
        await read_acks(reader, self._on_ack)

    def _on_ack(self, chunk_id: bytes) -> None:
        if chunk_id in self.chunks:
            if chunk_id not in self.acked:
                self.acked.add(chunk_id)
                self.bytes_acked += len(self.chunks[chunk_id][0])
            self._ack_event.set()

    async def _write(self, chunk_id: bytes) -> None:
        assert self._writer is not None
        frame = self.chunks[chunk_id][0]
        self._writer.write(frame)
        await self._writer.drain()
        self.bytes_written += len(frame)

    def stream(self, limit: int | None = None) -> None:
        """Start writing new chunks in the background (until ``stop`` or ``limit`` chunks)."""

        async def run() -> None:
            with contextlib.suppress(OSError):
                while self.producing and (limit is None or len(self.chunks) < limit):
                    while self.window is not None and (
                        len(self.chunks) - len(self.acked) >= self.window
                    ):
                        self._ack_event.clear()
                        await self._ack_event.wait()
                    await self._write(self.new_chunk())

        self._tasks.append(asyncio.get_running_loop().create_task(run()))

    async def resend_unacked(self) -> int:
        """Resend every chunk not acked yet, same frame and chunk id; return how many."""
        todo = [cid for cid in self.chunks if cid not in self.acked]
        for cid in todo:
            await self._write(cid)
        return len(todo)

    async def wait_all_acked(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.acked) < len(self.chunks):
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.chunks) - len(self.acked)} chunks never acked")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        await cancel_all(self._tasks)
        if self._writer is not None:
            self._writer.close()

    def acked_seqs(self) -> set[int]:
        return {s for cid in self.acked for s in self.chunks[cid][1]}

    def all_seqs(self) -> set[int]:
        return {s for _, seqs in self.chunks.values() for s in seqs}


async def sink_seqs(sink: Sink) -> list[int]:
    return [r["seq"] for r in sink.records]


def wait_for(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def write_config(
    path: Path, sink_port: int, *, buffer_dir: Path | None = None, **forward: Any
) -> Path:
    data: dict[str, Any] = {
        "listen": {
            "host": "127.0.0.1",
            "port": 0,
            "max_in_flight_bytes": "1MiB",
            "max_total_in_flight_bytes": "4MiB",
            "max_frame_size": "1MiB",
        },
        "forward": {
            "servers": [{"host": "127.0.0.1", "port": sink_port}],
            "retry_backoff_base": 0.05,
            "retry_backoff_max": 0.5,
            "ack_timeout": 2,
            "connect_timeout": 1,
            "max_in_flight_bytes": "2MiB",
            **forward,
        },
    }
    if buffer_dir is not None:
        data["buffer"] = {
            "type": "disk",
            "path": str(buffer_dir),
            "max_size": "16MiB",
            "segment_size": "2MiB",
        }
    path.write_text(yaml.safe_dump(data))
    return path


@contextlib.contextmanager
def running(args: list[str]) -> Iterator[ServeProcess]:
    """``ruletag serve ARGS``; its output is drained into ``sp.lines`` (a full pipe would
    block ruletag's logging, and so its event loop)."""
    sp = start_serve(args)

    def drain() -> None:
        assert sp.proc.stdout is not None
        for line in sp.proc.stdout:
            sp.lines.append(line)

    threading.Thread(target=drain, daemon=True).start()
    try:
        yield sp
    finally:
        if sp.proc.poll() is None:
            sp.proc.kill()
            sp.proc.wait(5)


def kill9(sp: ServeProcess) -> None:
    os.kill(sp.proc.pid, signal.SIGKILL)
    sp.proc.wait(5)


# -- kill -9 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["disk", "memory"])
def test_kill9_mid_stream_loses_nothing_acked(mode: str, tmp_path: Path) -> None:
    with BackgroundLoop() as bg:
        sink = Sink()
        bg.run(sink.start())
        args = ["--listen", "127.0.0.1:0", "--forward", f"127.0.0.1:{sink.port}"]
        if mode == "disk":
            args += ["--buffer-dir", str(tmp_path / "buffer")]
        streamer = Streamer(window=50)
        with running(args) as sp:
            bg.run(streamer.connect(sp.port))
            bg.loop.call_soon_threadsafe(streamer.stream)
            wait_for(lambda: len(streamer.acked) >= 300, 30, "300 acked chunks")
            kill9(sp)
        acked_at_kill = set(streamer.acked)
        bg.run(streamer.stop())
        delivered_at_kill = set(bg.run(sink_seqs(sink)))
        acked_seqs = {s for cid in acked_at_kill for s in streamer.chunks[cid][1]}
        if mode == "memory":  # an ack means "already delivered downstream"
            assert acked_seqs <= delivered_at_kill
        sent_chunks = len(streamer.chunks)
        with running(args) as sp2:
            bg.run(streamer.connect(sp2.port))
            resent = bg.run(streamer.resend_unacked())
            bg.run(streamer.wait_all_acked(30), timeout=40)
            expected = streamer.all_seqs()
            wait_for(lambda: expected <= set(bg.run(sink_seqs(sink))), 30, "every record")
            time.sleep(0.3)
            got = bg.run(sink_seqs(sink))
            bg.run(streamer.stop())
        lost = acked_seqs - set(got)
        assert not lost, f"{len(lost)} acked records lost"
        assert set(got) == expected
        report(
            tmp_path,
            f"kill9_{mode}",
            chunks_sent=sent_chunks,
            records_sent=len(expected),
            records_acked_before_kill=len(acked_seqs),
            chunks_resent=resent,
            records_delivered=len(set(got)),
            lost=len(lost),
            duplicated=len(got) - len(set(got)),
        )
        bg.run(sink.stop())


# -- downstream trouble -------------------------------------------------------------------------


class RssSampler:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[int] = []

    def sample(self) -> int:
        value = rss_kib(self.pid)
        self.samples.append(value)
        return value

    @property
    def peak_mib(self) -> float:
        return round(max(self.samples) / 1024, 1)


def _stall_and_check(
    bg: BackgroundLoop, streamer: Streamer, rss: RssSampler, seconds: float
) -> tuple[int, int]:
    """Let the stall run; return (unacked bytes at half time, at the end)."""
    end = time.monotonic() + seconds
    half = time.monotonic() + seconds / 2
    at_half = -1
    while time.monotonic() < end:
        rss.sample()
        if at_half < 0 and time.monotonic() >= half:
            at_half = streamer.unacked_bytes
        time.sleep(0.25)
    return at_half, streamer.unacked_bytes


@pytest.mark.parametrize(
    ("trouble", "seconds", "mode"),
    [("down", 30.0, "memory"), ("never_acks", 6.0, "memory"), ("down", 10.0, "disk")],
)
def test_stalled_downstream_backpressure_and_bounded_memory(
    trouble: str, seconds: float, mode: str, tmp_path: Path
) -> None:
    """Downstream down (30 s) or accepting but never acking: the sender's unacked data stops
    growing (backpressure reached it), ruletag's RSS stays bounded, and once downstream is
    back every record arrives. In disk mode the sender is acked until the 16 MiB buffer is
    full, then held the same way."""
    with BackgroundLoop() as bg:
        sink = Sink()
        bg.run(sink.start())
        buffer_dir = tmp_path / "buffer" if mode == "disk" else None
        cfg = write_config(tmp_path / "relay.yaml", sink.port, buffer_dir=buffer_dir)
        with running(["--config", str(cfg)]) as sp:
            rss = RssSampler(sp.proc.pid)
            baseline = rss.sample()
            streamer = Streamer(window=None, payload=400)  # only TCP can slow it down
            bg.run(streamer.connect(sp.port))
            if trouble == "down":
                bg.run(sink.stop())
            else:
                sink.ack = False
            bg.loop.call_soon_threadsafe(streamer.stream)
            at_half, at_end = _stall_and_check(bg, streamer, rss, seconds)
            assert at_end - at_half <= 2 * 1024 * 1024, (
                f"sender kept pushing during the stall: {at_half} -> {at_end} unacked bytes"
            )
            peak = max(rss.samples)
            assert peak - baseline < 200 * 1024, f"RSS grew {baseline} -> {peak} KiB"
            acked_during_stall = len(streamer.acked_seqs())
            if buffer_dir is not None:
                on_disk = sum(f.stat().st_size for f in buffer_dir.glob("segment-*.log"))
                assert 0 < on_disk <= 16 * 1024 * 1024
                assert acked_during_stall > 0  # decoupled from the outage until full
            bg.run(streamer.stop())  # the sender stops producing; keeps its unacked chunks
            if trouble == "down":
                bg.run(sink.start())
            else:
                sink.ack = True
            bg.run(streamer.connect(sp.port))
            bg.run(streamer.resend_unacked(), timeout=60)
            bg.run(streamer.wait_all_acked(60), timeout=70)
            expected = streamer.all_seqs()
            wait_for(lambda: expected <= set(bg.run(sink_seqs(sink))), 30, "every record")
            got = bg.run(sink_seqs(sink))
            rss.sample()
            bg.run(streamer.stop())
        assert set(got) == expected
        report(
            tmp_path,
            f"stalled_downstream_{trouble}_{mode}",
            stall_s=seconds,
            records_sent=len(expected),
            records_acked_during_stall=acked_during_stall,
            records_acked=len(streamer.acked_seqs()),
            records_delivered=len(set(got)),
            duplicated=len(got) - len(set(got)),
            sender_unacked_bytes_half=at_half,
            sender_unacked_bytes_end=at_end,
            rss_baseline_mib=round(baseline / 1024, 1),
            rss_peak_mib=rss.peak_mib,
        )
        bg.run(sink.stop())


@pytest.mark.parametrize("trouble", ["flapping", "slow_acks"])
def test_unreliable_downstream_loses_nothing(trouble: str, tmp_path: Path) -> None:
    """Downstream going up and down every 0.5 s, or acking 0.3 s late, for 6 s of streaming:
    every record arrives, every chunk is acked upstream, memory stays bounded."""
    with BackgroundLoop() as bg:
        sink = Sink(ack_delay=0.3 if trouble == "slow_acks" else 0.0)
        bg.run(sink.start())
        cfg = write_config(tmp_path / "relay.yaml", sink.port)
        with running(["--config", str(cfg)]) as sp:
            rss = RssSampler(sp.proc.pid)
            baseline = rss.sample()
            streamer = Streamer(window=40)
            bg.run(streamer.connect(sp.port))
            bg.loop.call_soon_threadsafe(streamer.stream)
            end = time.monotonic() + 6
            up = True
            while time.monotonic() < end:
                time.sleep(0.5)
                rss.sample()
                if trouble == "flapping":
                    bg.run(sink.stop() if up else sink.start())
                    up = not up
            streamer.producing = False
            if not up:
                bg.run(sink.start())
            bg.run(streamer.wait_all_acked(60), timeout=70)
            expected = streamer.all_seqs()
            wait_for(lambda: expected <= set(bg.run(sink_seqs(sink))), 30, "every record")
            got = bg.run(sink_seqs(sink))
            bg.run(streamer.stop())
        assert len(streamer.chunks) >= 100
        assert set(got) == expected
        assert max(rss.samples) - baseline < 200 * 1024
        report(
            tmp_path,
            f"downstream_{trouble}",
            records_sent=len(expected),
            records_acked=len(streamer.acked_seqs()),
            records_delivered=len(set(got)),
            duplicated=len(got) - len(set(got)),
            rss_baseline_mib=round(baseline / 1024, 1),
            rss_peak_mib=rss.peak_mib,
        )
        bg.run(sink.stop())


def test_records_are_what_was_sent(tmp_path: Path) -> None:
    """Sanity check of the harness: a record's content survives the relay."""
    with BackgroundLoop() as bg:
        sink = Sink()
        bg.run(sink.start())
        with running(["--listen", "127.0.0.1:0", "--forward", f"127.0.0.1:{sink.port}"]) as sp:
            streamer = Streamer(window=5)
            bg.run(streamer.connect(sp.port))
            bg.loop.call_soon_threadsafe(streamer.stream, 3)
            bg.run(streamer.wait_all_acked(10), timeout=15)
            records = bg.run(sink.wait_records(3 * RECORDS_PER_CHUNK))
            bg.run(streamer.stop())
        assert records[0] == {"seq": 0, "msg": streamer.payload}
        assert msgpack.packb(records[-1])  # plain data
        bg.run(sink.stop())
