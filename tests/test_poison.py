"""Poison chunks, dead letters, backoff and clean logs of the downstream client (forwarder).

A hostile downstream rejects one chunk (closes the connection on it, or never acks it) while
it accepts everything else. The poison chunk must land in the dead-letter folder after
``forward.max_rejects`` rejects, a steady sender must keep its throughput meanwhile, and
``ruletag dead-letter resend`` must deliver it later. Also: no "never retrieved" tracebacks
after ack timeouts, and a bounded time from a downstream healing to the first delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ruletag import protocol
from ruletag.config.model import ForwardConfig, ForwardServer
from ruletag.protocol import Chunk
from ruletag.transport import deadletter
from ruletag.transport.forwarder import Forwarder
from support.paths import REPO
from support.peers import Sink, Source, decode_entries, make_chunk
from support.reliability import report
from support.servers import start_relay, start_serve

MARKER = "POISON-7f3a1c"
RECORDS_PER_CHUNK = 10
MAX_REJECTS = 5


class PoisonSink(Sink):
    """A Sink that rejects every chunk containing :data:`MARKER`: ``mode="close"`` closes the
    connection on it, ``mode="noack"`` never acks it. Other chunks are recorded and acked."""

    def __init__(self, mode: str, **kw: Any) -> None:
        super().__init__(**kw)
        self.mode = mode
        self.poison_seen = 0
        self._poisoned = False

    def _record(self, chunk: Chunk) -> None:
        if MARKER.encode() in chunk.entries:
            self.poison_seen += 1
            self._poisoned = True
            return
        super()._record(chunk)

    def _maybe_ack(self, writer: asyncio.StreamWriter, conn: Any, chunk_id: bytes) -> None:
        if self._poisoned:
            self._poisoned = False
            if self.mode == "close":
                writer.transport.abort()
            return
        super()._maybe_ack(writer, conn, chunk_id)


class Steady:
    """An upstream client keeping ``window`` chunks unacked; records each ack's time."""

    def __init__(self, port: int, window: int = 8) -> None:
        self.port = port
        self.window = window
        self.sent: dict[bytes, list[int]] = {}
        self.acked: dict[bytes, float] = {}
        self._seq = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._room = asyncio.Event()

    async def start(self) -> None:
        src = await Source.connect(self.port)
        self._tasks = [
            asyncio.ensure_future(self._write(src)),
            asyncio.ensure_future(self._read(src)),
        ]
        self._src = src

    async def _write(self, src: Source) -> None:
        while True:
            while len(self.sent) - len(self.acked) >= self.window:
                self._room.clear()
                await self._room.wait()
            seqs = list(range(self._seq, self._seq + RECORDS_PER_CHUNK))
            self._seq += RECORDS_PER_CHUNK
            chunk = make_chunk("steady", [{"seq": s, "msg": "steady record"} for s in seqs])
            chunk_id = protocol.new_chunk_id()
            self.sent[chunk_id] = seqs
            await src.send_chunk(
                Chunk(tag=chunk.tag, entries=chunk.entries, count=chunk.count, chunk_id=chunk_id)
            )

    async def _read(self, src: Source) -> None:
        while True:
            chunk_id = await src.read_ack(timeout=60)
            self.acked.setdefault(chunk_id, time.monotonic())
            self._room.set()

    def rate(self, start: float, end: float) -> float:
        """Chunks acked per second between two monotonic times."""
        n = sum(1 for t in self.acked.values() if start <= t <= end)
        return n / max(end - start, 1e-6)

    async def stop(self, drain: float = 10.0) -> None:
        """Stop producing, wait (up to ``drain`` s) for every sent chunk's ack, disconnect."""
        self._tasks[0].cancel()
        deadline = time.monotonic() + drain
        while len(self.acked) < len(self.sent) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        await self._src.close()


@contextlib.contextmanager
def captured(name: str = "ruletag") -> Iterator[list[logging.LogRecord]]:
    """The log records of logger ``name`` (its own handler: works with propagate off)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger(name)
    handler, level = Keep(logging.DEBUG), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def poison_chunk() -> Chunk:
    chunk = make_chunk("poison.tag", [{"marker": MARKER, "msg": "the downstream hates me"}])
    return Chunk(
        tag=chunk.tag, entries=chunk.entries, count=chunk.count, chunk_id=protocol.new_chunk_id()
    )


def forward_options(mode: str, folder: Path) -> dict[str, Any]:
    return {
        "max_rejects": MAX_REJECTS,
        "dead_letter_path": str(folder),
        "retry_backoff_base": 0.2,
        "retry_backoff_max": 1.0,
        "ack_timeout": 0.5 if mode == "noack" else 5,
    }


async def baseline_rate(mode: str, folder: Path, seconds: float) -> float:
    """The steady sender's chunks/s through a relay to the same downstream, no poison."""
    async with start_relay(forward=forward_options(mode, folder), sink=PoisonSink(mode)) as r:
        steady = Steady(r.port)
        await steady.start()
        await asyncio.sleep(0.3)
        start = time.monotonic()
        await asyncio.sleep(seconds)
        rate = steady.rate(start, time.monotonic())
        await steady.stop()
    return rate


async def resend_with_cli(folder: Path) -> tuple[list[Any], str]:
    """``ruletag dead-letter list`` then ``resend`` to an accepting Sink: its records, output."""
    async with Sink() as good:
        out = []
        for args in (
            ["list", str(folder)],
            ["resend", str(folder), "--forward", f"127.0.0.1:{good.port}"],
            ["list", str(folder)],
        ):
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "ruletag",
                "dead-letter",
                *args,
                cwd=REPO,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            stdout, _ = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0, stdout.decode()
            out.append(stdout.decode())
        return good.records, "".join(out)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["close", "noack"])
def test_poison_chunk_is_dead_lettered_while_a_steady_sender_keeps_its_pace(
    mode: str, tmp_path: Path
) -> None:
    folder = tmp_path / "dead"

    async def main() -> None:
        base = await baseline_rate(mode, tmp_path / "unused", 2.0)
        sink = PoisonSink(mode)
        with captured() as logs:
            async with start_relay(forward=forward_options(mode, folder), sink=sink) as r:
                steady = Steady(r.port)
                await steady.start()
                await asyncio.sleep(0.3)
                bad = await Source.connect(r.port)
                started = time.monotonic()
                await bad.send_chunk(poison_chunk())
                ack = asyncio.ensure_future(bad.read_ack(timeout=40))
                while not deadletter.files(folder):
                    assert time.monotonic() - started < 40, "no dead letter after 40 s"
                    await asyncio.sleep(0.02)
                ended = time.monotonic()
                await ack  # the poison's sender is answered once its chunk is set aside
                during = steady.rate(started, ended)
                await steady.stop()
                await bad.close()
                fw = r.forwarder
                delivered = {rec["seq"] for rec in sink.records if "seq" in rec}
                sent = {s for seqs in steady.sent.values() for s in seqs}
                acked = {s for cid in steady.acked for s in steady.sent[cid]}
                rejects, dead, tries = fw.rejects, fw.dead_letters, sink.poison_seen
        (path,) = deadletter.files(folder)
        dl = deadletter.read(path)
        records, cli_out = await resend_with_cli(folder)
        report(
            tmp_path,
            f"poison_{mode}",
            steady_records_sent=len(sent),
            steady_acked=len(acked),
            steady_delivered=len(delivered & sent),
            lost=len(sent - delivered),
            poison_tries=tries,
            rejects=rejects,
            dead_letters=dead,
            seconds_to_dead_letter=round(ended - started, 2),
            steady_chunks_per_s_baseline=round(base, 1),
            steady_chunks_per_s_during=round(during, 1),
            resent=len(records),
        )
        assert acked == sent == delivered & sent, "every steady record is acked and delivered"
        assert dead == 1 and rejects == MAX_REJECTS and tries >= MAX_REJECTS
        assert during >= base / 5, f"steady sender slowed from {base:.0f} to {during:.0f}/s"
        assert dl.chunk.tag == "poison.tag" and dl.chunk.count == 1 and dl.chunk.signal == 0
        assert decode_entries(dl.chunk.entries)[0][1]["marker"] == MARKER
        assert f"rejected {MAX_REJECTS} times" in dl.reason
        assert ("closed the connection" if mode == "close" else "no ack within") in dl.reason
        set_aside = [x for x in logs if "set aside as dead letter" in x.getMessage()]
        assert len(set_aside) == 1 and path.name in set_aside[0].getMessage()
        assert [r["marker"] for r in records] == [MARKER]
        assert "poison.tag" in cli_out and "resent 1 dead letter(s), 0 kept" in cli_out
        assert deadletter.files(folder) == []

    asyncio.run(asyncio.wait_for(main(), 120))


def test_ack_timeouts_leave_no_never_retrieved_tracebacks(tmp_path: Path) -> None:
    """A ``ruletag serve`` whose downstream withholds acks for a while logs one line per event."""
    cfg = tmp_path / "relay.yaml"

    async def main() -> None:
        async with Sink(ack=False) as sink:
            cfg.write_text(
                yaml.safe_dump(
                    {
                        "listen": {"host": "127.0.0.1", "port": 0},
                        "forward": {
                            "servers": [{"host": "127.0.0.1", "port": sink.port}],
                            "ack_timeout": 0.3,
                            "retry_backoff_base": 0.05,
                            "retry_backoff_max": 0.2,
                            "dead_letter_path": str(tmp_path / "d"),
                        },
                    }
                )
            )
            sp = await asyncio.to_thread(start_serve, ["--config", str(cfg)])
            try:
                src = await Source.connect(sp.port)
                ids = [await src.send_chunk(make_chunk("t", [{"i": i}])) for i in range(20)]
                await asyncio.sleep(2.0)  # several rounds of ack timeouts with 20 in flight
                timeouts_seen = len(sink.chunks)
                sink.ack = True
                acks = [await src.read_ack(timeout=20) for _ in ids]
                await src.close()
            finally:
                output = await asyncio.to_thread(sp.stop)
        never = output.count("never retrieved")
        report(
            tmp_path,
            "ack_timeout_logs",
            chunks_sent=len(ids),
            acked=len(set(acks)),
            downstream_receipts_before_acks=timeouts_seen,
            log_lines=output.count("\n"),
            never_retrieved=never,
            tracebacks=output.count("Traceback"),
        )
        assert set(acks) == set(ids) and timeouts_seen > len(ids)
        assert never == 0 and "Traceback" not in output, output[-3000:]

    asyncio.run(asyncio.wait_for(main(), 60))


def fconfig(port: int, **kw: Any) -> ForwardConfig:
    return ForwardConfig(
        servers=(ForwardServer(host="127.0.0.1", port=port),), connect_timeout=1.0, **kw
    )


@pytest.mark.slow
@pytest.mark.parametrize("outage", ["refused", "stalled"])
def test_first_delivery_after_the_downstream_heals_is_bounded(outage: str, tmp_path: Path) -> None:
    """Bound: refused connections -> ``retry_backoff_max`` + connect time; a stall (accepts,
    never acks) -> ``ack_timeout`` + ``retry_backoff_base`` + connect time, since every
    successful connect resets the backoff."""
    base, cap, ack_timeout = 0.1, 2.0 if outage == "refused" else 20.0, 0.3
    bound = (cap if outage == "refused" else ack_timeout + base) + 1.0  # + connect, margin

    async def main() -> None:
        sink = await Sink(ack=False).start()
        if outage == "refused":
            await sink.stop()
        fw = Forwarder(
            fconfig(
                sink.port,
                retry_backoff_base=base,
                retry_backoff_max=cap,
                ack_timeout=ack_timeout,
                dead_letter_path=str(tmp_path),
            )
        )
        await fw.start()
        sends = [asyncio.ensure_future(fw.send(make_chunk("t", [{"i": i}]))) for i in range(3)]
        await asyncio.sleep(5.0)  # long enough for the backoff to grow to its cap
        assert not any(s.done() for s in sends)
        healed = time.monotonic()
        if outage == "refused":
            sink.ack = True
            await sink.start()
        else:
            sink.ack = True
        while sink.acks_sent == 0:
            assert time.monotonic() - healed < 30, "nothing delivered 30 s after healing"
            await asyncio.sleep(0.005)
        first = time.monotonic() - healed
        await asyncio.wait_for(asyncio.gather(*sends), 30)
        await fw.close()
        await sink.stop()
        report(
            tmp_path,
            f"heal_{outage}",
            chunks=3,
            delivered=len(sink.records),
            retries=fw.retries,
            connect_failures=fw.connect_failures,
            ack_timeouts=fw.ack_timeouts,
            seconds_to_first_delivery=round(first, 2),
            bound_s=bound,
            backoff_max_s=cap,
        )
        assert {r["i"] for r in sink.records} == {0, 1, 2}
        assert first <= bound, f"first delivery {first:.2f} s after healing (bound {bound} s)"

    asyncio.run(asyncio.wait_for(main(), 60))


def test_without_a_usable_dead_letter_folder_the_chunk_is_kept_and_retried(
    tmp_path: Path,
) -> None:
    """The folder cannot be created (a file is in the way): one error line, the poison chunk
    stays in flight with growing delay, and the other chunks are delivered."""
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("x")

    async def main() -> None:
        async with PoisonSink("close") as sink:
            fw = Forwarder(
                fconfig(
                    sink.port,
                    retry_backoff_base=0.05,
                    retry_backoff_max=0.2,
                    ack_timeout=2.0,
                    max_rejects=2,
                    dead_letter_path=str(blocked / "dead"),
                )
            )
            await fw.start()
            with captured() as logs:
                poison = asyncio.ensure_future(fw.send(poison_chunk()))
                sent = 0
                # Bounded by time, not by count: a fast machine sends thousands of steady
                # chunks while the retry delay grows.
                deadline = asyncio.get_running_loop().time() + 30.0
                while fw.rejects < 6:
                    now = asyncio.get_running_loop().time()
                    assert now < deadline, "the poison chunk was never charged in 30 s"
                    await fw.send(make_chunk("steady", [{"seq": sent}]))
                    sent += 1
                    await asyncio.sleep(0.002)
                assert not poison.done()
                await fw.close(timeout=0.2)
            with contextlib.suppress(Exception):
                await poison
        errors = [x for x in logs if "cannot write a dead letter" in x.getMessage()]
        report(
            tmp_path,
            "dead_letter_folder_unusable",
            steady_sent=sent,
            steady_delivered=len(sink.records),
            poison_tries=sink.poison_seen,
            rejects=fw.rejects,
            dead_letters=fw.dead_letters,
            error_lines=len(errors),
        )
        assert fw.dead_letters == 0 and len(errors) == 1
        assert {r["seq"] for r in sink.records} == set(range(sent))

    asyncio.run(asyncio.wait_for(main(), 60))
