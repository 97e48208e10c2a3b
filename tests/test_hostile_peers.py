"""Connection-level limits and fairness against hostile peers (real server on 127.0.0.1).

- Unauthenticated connections may buffer only ``listen.max_unauthenticated_bytes`` and must
  pass the handshake within ``listen.handshake_timeout``; memory held by large partial
  messages returns to the OS when their connections close (RSS of a ruletag subprocess).
- Peers dripping bytes lose their connection slot (``listen.frame_timeout`` /
  ``listen.min_frame_rate``) and a legitimate agent then gets in, while a slow but honest
  sender still completes its message.
- One PackedForward of a million tiny entries does not stall a steady client's acks; the
  filter's output for a chunk handled in slices is byte for byte what it is in one piece.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest

from ruletag import protocol
from ruletag.delivery.pipeline import Pace, apply_transform, slice_bounds
from ruletag.enrich.filter import RuleFilter
from ruletag.protocol import Chunk
from ruletag.rules.loader import compile_rules
from support.paths import SEED_RULES as SEEDS
from support.peers import Source, eventually, make_chunk, pack_entries
from support.reliability import report, rss_kib
from support.seeds import SIGMA_HIT as HIT
from support.servers import ServeProcess, start_relay

KEY = "peers-key"
MIB = 1024 * 1024


class LightSink:
    """A downstream that frames, records and acks chunks in C (msgpack), never per entry.

    The ruletag under test is a subprocess; this sink keeps the test's event loop free, so
    the latencies measured by the test's clients are the relay's.
    """

    def __init__(self) -> None:
        self.port = 0
        self.chunks: list[tuple[str, bytes, int]] = []  # (tag, entries, count)
        self._server: asyncio.Server | None = None

    async def start(self) -> LightSink:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    def entries(self, tag: str) -> bytes:
        return b"".join(e for t, e, _ in self.chunks if t == tag)

    def count(self, tag: str) -> int:
        return sum(n for t, _, n in self.chunks if t == tag)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        unpacker = msgpack.Unpacker(raw=True, max_buffer_size=64 * MIB)
        try:
            while data := await reader.read(1 << 20):
                unpacker.feed(data)
                for msg in unpacker:
                    tag, entries, options = msg[0], msg[1], msg[2]
                    self.chunks.append((tag.decode(), entries, options[b"size"]))
                    if b"chunk" in options:
                        writer.write(b"\x81\xa3ack" + msgpack.packb(options[b"chunk"]))
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


def write_config(tmp_path: Path, sink_port: int, listen: dict[str, Any], rules: bool) -> Path:
    """A pipeline config: ``listen`` on 127.0.0.1:0, forward to ``sink_port``."""
    lines = ["listen:", "  host: 127.0.0.1", "  port: 0"]
    lines += [f"  {k}: {v}" for k, v in listen.items()]
    lines += ["forward:", f"  servers: ['127.0.0.1:{sink_port}']", "  ack_timeout: 10s"]
    if rules:
        lines += ["rules:", "  paths: [builtin:seeds]", f"  cache_dir: {tmp_path / 'cache'}"]
    path = tmp_path / "pipeline.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


class RssSampler:
    """Samples a process's RSS every few ms while running; ``peak`` in KiB."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._task: asyncio.Task[None] | None = None

    def now(self) -> int:
        value = rss_kib(self.pid)
        self.peak = max(self.peak, value)
        return value

    async def _run(self) -> None:
        while True:
            self.now()
            await asyncio.sleep(0.01)

    def start(self) -> None:
        self.peak = 0
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> int:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        return self.peak


async def closed_within(reader: asyncio.StreamReader, timeout: float) -> float:
    """Seconds until the server closes the connection (fails after ``timeout``)."""
    start = time.monotonic()
    async with asyncio.timeout(timeout):
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass
    return time.monotonic() - start


def big_frame_head(size: int) -> bytes:
    """The first bytes of a PackedForward whose bin payload is ``size`` bytes long."""
    return b"\x93\xa1t\xc6" + size.to_bytes(4, "big")


async def write_partial(port: int, nbytes: int, *, auth: bool) -> tuple[Any, Any, int]:
    """Connect (authenticate if ``auth``) and write the first ``nbytes`` of a larger
    message; returns (reader, writer, bytes written before the server closed)."""
    if auth:
        src = await Source.connect(port, shared_key=KEY, hostname="big")
        reader, writer = src.reader, src.writer
    else:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = big_frame_head(nbytes + MIB) + b"\x00" * nbytes
    written = 0
    with contextlib.suppress(ConnectionError):
        for i in range(0, len(data), 256 * 1024):
            writer.write(data[i : i + 256 * 1024])
            await asyncio.wait_for(writer.drain(), 10)
            written = i + 256 * 1024
    return reader, writer, written


async def serve(factory: Callable[[list[str]], ServeProcess], cfg: Path) -> ServeProcess:
    return await asyncio.to_thread(factory, ["--config", str(cfg)])


# ------------------------------------------------------------------------- before handshake


@pytest.mark.slow
def test_unauthenticated_buffers_are_capped_and_memory_returns(
    arun: Any, serve_process: Any, tmp_path: Path
) -> None:
    listen = {
        "shared_key": KEY,
        "max_unauthenticated_bytes": "64KiB",
        "handshake_timeout": "2s",
        "max_frame_size": "16MiB",
    }

    async def scenario() -> dict[str, Any]:
        sink = await LightSink().start()
        sp = await serve(serve_process, write_config(tmp_path, sink.port, listen, rules=False))
        rss = RssSampler(sp.proc.pid)
        try:
            src = await Source.connect(sp.port, shared_key=KEY, hostname="warm")
            cid = await src.send_chunk(make_chunk("warm", [{"i": i} for i in range(100)]))
            assert await src.read_ack(timeout=10) == cid
            await src.close()
            await asyncio.sleep(0.5)
            base = rss.now()

            # 10 unauthenticated connections, each sending 6 MiB of a partial message
            rss.start()
            conns = await asyncio.gather(
                *(write_partial(sp.port, 6 * MIB, auth=False) for _ in range(10))
            )
            closes = await asyncio.gather(*(closed_within(r, 10) for r, _, _ in conns))
            unauth_peak = await rss.stop()
            for _, w, _ in conns:
                w.close()
            written = [n for _, _, n in conns]
            assert max(written) < 6 * MIB, "an unauthenticated peer wrote everything"

            # a handshake that never completes (one PING byte a second) ends at the deadline
            reader, writer = await asyncio.open_connection("127.0.0.1", sp.port)
            ping = msgpack.packb(["PING", "h", "s", "d", "", ""])

            async def drip() -> None:
                for b in ping:
                    writer.write(bytes([b]))
                    await asyncio.sleep(0.5)

            dripper = asyncio.create_task(drip())
            handshake_closed = await closed_within(reader, 10)
            dripper.cancel()
            writer.close()

            # authenticated: 10 partial messages of 8 MiB are held, then the peers go away
            rss.start()
            held = await asyncio.gather(
                *(write_partial(sp.port, 8 * MIB, auth=True) for _ in range(10))
            )
            await asyncio.sleep(1.0)
            held_peak = await rss.stop()
            for _, w, _ in held:
                w.close()
            await asyncio.sleep(2.5)  # connection_lost, then one rate-limited malloc_trim
            after = rss.now()
            log = await asyncio.to_thread(sp.stop)
        finally:
            await sink.stop()
        figures = {
            "unauth_connections": 10,
            "unauth_closed": len(closes),
            "unauth_bytes_written_max": max(written),
            "rss_base_mib": round(base / 1024, 1),
            "rss_peak_unauth_mib": round(unauth_peak / 1024, 1),
            "handshake_closed_after_s": round(handshake_closed, 2),
            "rss_peak_held_8mib_x10_mib": round(held_peak / 1024, 1),
            "rss_after_close_mib": round(after / 1024, 1),
        }
        assert "max_unauthenticated_bytes" in log and "no handshake within" in log
        assert unauth_peak - base < 40 * 1024, figures
        assert 1.0 <= handshake_closed <= 6.0, figures
        assert held_peak - base > 60 * 1024, figures  # the partial messages were really held
        assert after - base < 40 * 1024, figures
        return figures

    report(tmp_path, "unauthenticated_memory", **arun(scenario(), timeout=120))


# ------------------------------------------------------------------------------- drippers


@pytest.mark.slow
def test_drippers_lose_their_slots_and_honest_peers_get_through(arun: Any, tmp_path: Path) -> None:
    listen = {
        "shared_key": KEY,
        "max_connections": 4,
        "handshake_timeout": 2.0,
        "frame_timeout": 2.0,
        "min_frame_rate": "64KiB",
        "idle_timeout": 300,
    }
    tick = 1.0

    async def scenario() -> dict[str, Any]:
        async with start_relay(listen=listen) as relay:
            port = relay.port
            srv = relay.server
            stop = asyncio.Event()

            async def drip(reader: Any, writer: Any, data: bytes) -> float:
                start = time.monotonic()
                with contextlib.suppress(ConnectionError):
                    for b in data:
                        if stop.is_set() or reader.at_eof():
                            break
                        writer.write(bytes([b]))
                        await writer.drain()
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(reader.read(65536), tick)
                writer.close()
                return time.monotonic() - start

            # two drippers before the handshake, two after it (a message byte by byte)
            tasks = []
            for _ in range(2):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                tasks.append(asyncio.create_task(drip(reader, writer, b"\x96\xa4PING" * 50)))
            for _ in range(2):
                src = await Source.connect(port, shared_key=KEY, hostname="drip")
                entries, n = pack_entries([{"x": "y" * 200}])
                frame = protocol.encode_chunk("drip", entries, n, chunk_id=protocol.new_chunk_id())
                tasks.append(asyncio.create_task(drip(src.reader, src.writer, frame)))
            await eventually(lambda: len(srv.connections) == 4, "4 drippers connected")
            refused_before = srv.stats.connections_refused

            # a legitimate agent keeps trying until it gets a slot, then sends 5 chunks
            t0 = time.monotonic()
            agent = None
            while agent is None:
                try:
                    agent = await Source.connect(port, shared_key=KEY, hostname="agent", timeout=1)
                except (ConnectionError, TimeoutError):
                    assert time.monotonic() - t0 < 20, "the drippers kept every slot"
                    await asyncio.sleep(0.2)
            agent_in = time.monotonic() - t0
            acked = 0
            for i in range(5):
                cid = await agent.send_chunk(make_chunk("agent", [{"i": i}]))
                assert await agent.read_ack(timeout=5) == cid
                acked += 1
            await agent.close()
            held = await asyncio.wait_for(asyncio.gather(*tasks), 20)
            stop.set()

            # a slow but honest sender: a 2 MB message at about 200 KB/s completes
            honest = await Source.connect(port, shared_key=KEY, hostname="honest")
            entries, n = pack_entries({"blob": "z" * 1000, "i": i} for i in range(2000))
            cid = protocol.new_chunk_id()
            frame = protocol.encode_chunk("honest", entries, n, chunk_id=cid)
            t1 = time.monotonic()
            for i in range(0, len(frame), 20_000):
                await honest.send_bytes(frame[i : i + 20_000])
                await asyncio.sleep(0.1)
            assert await honest.read_ack(timeout=10) == cid
            honest_s = time.monotonic() - t1
            await honest.close()
            records = await relay.sink.wait_records(5 + n, timeout=10)
            figures = {
                "drippers": 4,
                "dripper_slot_held_s": [round(h, 1) for h in held],
                "refused_while_held": srv.stats.connections_refused - refused_before,
                "agent_in_after_s": round(agent_in, 1),
                "agent_sent": 5,
                "agent_acked": acked,
                "handshake_timeouts": srv.stats.handshake_timeouts,
                "slow_frames": srv.stats.slow_frames,
                "honest_bytes": len(frame),
                "honest_s": round(honest_s, 1),
                "honest_records_delivered": sum(1 for r in records if "blob" in r),
                "drip_records_delivered": sum(1 for r in records if "x" in r),
            }
            assert max(held) < 2.0 + 4 * tick, figures
            assert srv.stats.handshake_timeouts == 2 and srv.stats.slow_frames == 2, figures
            assert figures["honest_records_delivered"] == n, figures
            assert figures["drip_records_delivered"] == 0, figures
            assert honest_s > 5.0, figures  # slower than frame_timeout: still completed
            return figures

    report(tmp_path, "drippers", **arun(scenario(), timeout=90))


# -------------------------------------------------------------------------------- fairness


@pytest.mark.slow
def test_huge_chunk_does_not_stall_a_steady_client(
    arun: Any, serve_process: Any, tmp_path: Path
) -> None:
    listen = {"max_frame_size": "32MiB"}
    entries, n = pack_entries({"a": i % 100} for i in range(1_000_000))

    async def scenario() -> dict[str, Any]:
        sink = await LightSink().start()
        sp = await serve(serve_process, write_config(tmp_path, sink.port, listen, rules=True))
        try:
            steady = await Source.connect(sp.port, hostname="steady")
            big = await Source.connect(sp.port, hostname="big")
            latencies: list[tuple[float, float]] = []  # (sent at, latency)
            stop = asyncio.Event()

            async def steady_loop() -> None:
                i = 0
                while not stop.is_set():
                    sent = time.monotonic()
                    cid = await steady.send_chunk(make_chunk("steady", [{"s": i}]))
                    assert await steady.read_ack(timeout=20) == cid
                    latencies.append((sent, time.monotonic() - sent))
                    i += 1
                    await asyncio.sleep(0.01)

            task = asyncio.create_task(steady_loop())
            await asyncio.sleep(1.0)
            cid = protocol.new_chunk_id()
            frame = protocol.encode_chunk("big", entries, n, chunk_id=cid)
            t0 = time.monotonic()
            await big.send_bytes(frame)
            assert await big.read_ack(timeout=30) == cid
            t1 = time.monotonic()
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.wait_for(task, 20)
            await steady.close()
            await big.close()
            await asyncio.to_thread(sp.stop)
        finally:
            await sink.stop()
        during = [lat for sent, lat in latencies if t0 - 0.05 <= sent <= t1]
        before = [lat for sent, lat in latencies if sent < t0]
        figures = {
            "big_entries": n,
            "big_bytes": len(frame),
            "big_acked_after_s": round(t1 - t0, 2),
            "big_delivered": sink.count("big"),
            "big_identical": sink.entries("big") == entries,
            "steady_acked": len(latencies),
            "steady_acked_during_big": len(during),
            "steady_worst_before_ms": round(max(before) * 1000, 1),
            "steady_worst_during_big_ms": round(max(during, default=0) * 1000, 1),
            "steady_delivered": sink.count("steady"),
        }
        assert figures["big_identical"] and figures["big_delivered"] == n, figures
        assert len(during) >= 3, figures
        # A stall would hold the steady client for the whole huge chunk (t1 - t0); the bound
        # is a fifth of that, and never below 0.5 s, so a loaded machine does not fail it.
        figures["steady_bound_ms"] = round(max(0.5, 0.2 * (t1 - t0)) * 1000, 1)
        assert max(during) < max(0.5, 0.2 * (t1 - t0)), figures
        return figures

    report(tmp_path, "huge_chunk_fairness", **arun(scenario(), timeout=120))


def _decoded(frame: bytes) -> Chunk:
    conn = protocol.ServerConnection()
    conn.receive_data(frame)
    event = conn.next_event()
    assert isinstance(event, Chunk)
    return event


def _fields(chunks: list[Chunk]) -> list[tuple[Any, ...]]:
    return [
        (c.tag, c.entries, c.count, c.chunk_id, c.v2, c.signal, c.size, c.options) for c in chunks
    ]


def test_sliced_filter_output_is_byte_identical(arun: Any, tmp_path: Path) -> None:
    table, _ = compile_rules([SEEDS], cache_dir=tmp_path / "cache")
    records = [
        dict(HIT, n=i) if i % 7 == 3 else {"EventID": 1, "n": i, "pad": "x" * (i % 50)}
        for i in range(20_000)
    ]
    v1, n = pack_entries(records)
    v2, _ = pack_entries(records[:5000], metadata={"m": 1})
    packed = _decoded(protocol.encode_chunk("win", v1 + v2, n + 5000, chunk_id=b"c1"))
    # Forward mode with float times: the codec rewrites the entries and gives no spans
    floats = _decoded(
        msgpack.packb(
            ["win", [[1.5 + i, r] for i, r in enumerate(records[:6000])], {"chunk": "c2"}]
        )
    )
    plain = _decoded(
        protocol.encode_chunk(
            "win", *pack_entries({"EventID": 1, "n": i} for i in range(9000)), chunk_id=b"c3"
        )
    )
    assert floats.spans is None and len(slice_bounds(packed.spans or [])) > 5

    async def compare() -> dict[str, Any]:
        checked = 0
        for prefix in ("", "alert."):
            for chunk in (packed, floats, plain):
                want = RuleFilter(table, retag_prefix=prefix)(chunk)
                got = await apply_transform(RuleFilter(table, retag_prefix=prefix), chunk)
                assert _fields(got) == _fields(want), (prefix, chunk.chunk_id)
                if prefix and chunk is not plain:
                    assert len(want) > 100  # matched and unmatched runs alternate
                checked += 1
        unchanged = await apply_transform(RuleFilter(table), plain)
        assert len(unchanged) == 1 and unchanged[0] is plain
        return {
            "chunks_compared": checked,
            "entries": packed.count + floats.count + plain.count,
            "slices_of_the_packed_chunk": len(slice_bounds(packed.spans or [])),
        }

    report(tmp_path, "sliced_filter_identity", **arun(compare(), timeout=60))


def test_slices_of_one_chunk_use_one_rule_set_across_a_reload(arun: Any) -> None:
    """A reload while a large chunk is being sliced must not split it between two rule sets."""
    chunk = _decoded(
        protocol.encode_chunk(
            "win", *pack_entries({"EventID": 1, "n": i} for i in range(20_000)), chunk_id=b"c"
        )
    )
    seen: list[str] = []

    def rule_set(name: str) -> Callable[[Chunk], list[Chunk]]:
        def transform(part: Chunk) -> list[Chunk]:
            seen.append(name)
            live.current = rule_set("new")  # a reload lands between two slices
            return [part]

        return transform

    class Live:
        def __init__(self) -> None:
            self.current = rule_set("old")

        def __call__(self, part: Chunk) -> list[Chunk]:
            return self.current(part)

        def pinned(self) -> Callable[[Chunk], list[Chunk]]:
            return self.current

    live = Live()
    out = arun(apply_transform(live, chunk))
    assert len(seen) > 1 and set(seen) == {"old"}
    assert out == [chunk]


def test_pace_hands_cheap_transforms_whole_chunks_and_slices_slow_ones(arun: Any) -> None:
    """Slicing a chunk costs a copy and a join; a pipeline's Pace skips it for a transform
    fast enough to run the chunk whole within the budget, keeps it for a slow one, and goes
    back to slicing at once when the transform gets slower (a reload to more rules)."""
    chunk = _decoded(
        protocol.encode_chunk(
            "win", *pack_entries({"EventID": 1, "n": i} for i in range(20_000)), chunk_id=b"c"
        )
    )
    assert len(slice_bounds(chunk.spans or [])) > 3
    sizes: list[int] = []
    delay = [0.0]

    def transform(part: Chunk) -> list[Chunk]:
        sizes.append(part.count)
        if delay[0]:  # CPU work, as a filter's: the pace counts CPU time, not sleep
            end = time.thread_time() + delay[0] * len(part.entries) / len(chunk.entries)
            while time.thread_time() < end:
                pass
        return [part]

    pace = Pace()
    out = arun(apply_transform(transform, chunk, pace))
    assert out == [chunk] and len(sizes) > 3  # unknown cost: sliced, and measured
    sizes.clear()
    arun(apply_transform(transform, chunk, pace))
    assert sizes == [chunk.count]  # cheap: one piece
    # a one-record chunk is mostly per-call cost: not measured, so it does not make the
    # large chunks look slow
    tiny = make_chunk("win", [{"EventID": 1}])
    before = pace.per_byte
    delay[0] = 4 * Pace.BUDGET
    arun(apply_transform(transform, tiny, pace))
    delay[0] = 0.0
    assert pace.per_byte == before
    delay[0] = 4 * Pace.BUDGET  # the whole chunk would hold the loop 4x the budget
    sizes.clear()
    arun(apply_transform(transform, chunk, pace))
    assert sizes == [chunk.count]  # handed over whole once, on the old figure ...
    for _ in range(3):
        sizes.clear()
        out = arun(apply_transform(transform, chunk, pace))
        assert len(sizes) > 3 and out == [chunk]  # ... then sliced again, every time


def test_pace_counts_cpu_time_so_a_preempted_chunk_does_not_bring_back_slicing(
    arun: Any,
) -> None:
    """On a busy host the filter's thread is preempted or waits for the GIL now and then; the
    wall time of that one chunk says nothing about the filter's cost. Timed by the wall clock,
    each such outlier sent the following chunks back to slicing (a copy and a join each)."""
    chunk = _decoded(
        protocol.encode_chunk(
            "win", *pack_entries({"EventID": 1, "n": i} for i in range(20_000)), chunk_id=b"c"
        )
    )
    sizes: list[int] = []
    stall = [0.0]

    def transform(part: Chunk) -> list[Chunk]:
        sizes.append(part.count)
        if stall[0]:
            time.sleep(stall[0])  # off the CPU: preempted, or waiting for the GIL
        return [part]

    pace = Pace()
    arun(apply_transform(transform, chunk, pace))  # unknown cost: sliced, and measured
    stall[0] = 4 * Pace.BUDGET
    sizes.clear()
    arun(apply_transform(transform, chunk, pace))
    assert sizes == [chunk.count]  # cheap so far: whole, though it stalled this time
    stall[0] = 0.0
    sizes.clear()
    out = arun(apply_transform(transform, chunk, pace))
    assert sizes == [chunk.count] and out == [chunk]  # still whole after the stall
