"""Load driver and downstream sink for benchmarking a running ``ruletag serve``.

* :func:`run_sink` (started in its own process by :class:`SinkProcess`): a lean asyncio
  forward-protocol server that acks every chunk, counts records and bytes, and notes when each
  traffic chunk arrived (the first entry's EventTime seconds, see ``gen_traffic.py``).
* :func:`drive`: sends the pre-built frames of a traffic file over ``connections`` TCP
  connections with acks, at full speed (a window of unacked chunks per connection) or at a
  fixed record rate, for ``duration`` seconds.
* :class:`ProcStats`: CPU seconds and peak RSS of a process and its children, from ``/proc``.

Added latency is the time from writing a chunk to ruletag until the sink received it.

    python bench/load.py --traffic /tmp/ruletag-bench/traffic.bin --listen 127.0.0.1:24224 \
        --sink-port 24225 --pid $(pgrep -f 'ruletag serve') --duration 10
(start ``ruletag serve --listen 127.0.0.1:24224 --forward 127.0.0.1:24225`` yourself)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gen_traffic import load_index

HOST = "127.0.0.1"
_CLK = os.sysconf("SC_CLK_TCK")


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - the `fast` extra is installed in .venv
        return asyncio.new_event_loop()


# ----------------------------------------------------------------------------------- sink


class _SinkState:
    def __init__(self, t0: int) -> None:
        self.t0 = t0
        self.records = 0
        self.chunks = 0
        self.entry_bytes = 0
        self.wire_bytes = 0
        self.receipts: list[tuple[int, float]] = []  # (traffic chunk index, monotonic time)
        self.detections = 0


class _SinkProtocol(asyncio.Protocol):
    """Acks every chunk; counts; decodes only the first entry's time of each chunk."""

    def __init__(self, state: _SinkState) -> None:
        self.state = state
        self.unpacker = msgpack.Unpacker(raw=False, max_buffer_size=256 * 2**20)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        st = self.state
        st.wire_bytes += len(data)
        self.unpacker.feed(data)
        acks = []
        for msg in self.unpacker:
            if not isinstance(msg, list) or len(msg) < 2:
                continue  # heartbeat or something we do not count
            now = time.monotonic()
            entries = msg[1]
            opts = msg[2] if len(msg) > 2 and isinstance(msg[2], dict) else {}
            if isinstance(entries, bytes | bytearray):
                n = opts.get("size")
                if not isinstance(n, int):
                    up = msgpack.Unpacker(raw=True, strict_map_key=False)
                    up.feed(entries)
                    n = sum(1 for _ in up)
                st.records += n
                st.entry_bytes += len(entries)
                idx = _chunk_index(entries, st.t0)
                if idx is not None:
                    st.receipts.append((idx, now))
            elif isinstance(entries, list):  # Forward mode
                st.records += len(entries)
            st.chunks += 1
            chunk = opts.get("chunk")
            if chunk is not None:
                acks.append(msgpack.packb({"ack": chunk}))
        if acks and self.transport is not None:
            self.transport.write(b"".join(acks))


def _chunk_index(entries: bytes, t0: int) -> int | None:
    """The traffic chunk index from the first entry's EventTime (``[fixext8 time, rec]``)."""
    if len(entries) >= 7 and entries[0] == 0x92 and entries[1] == 0xD7 and entries[2] == 0:
        return int.from_bytes(entries[3:7], "big") - t0
    try:
        up = msgpack.Unpacker(raw=True, strict_map_key=False)
        up.feed(entries[:4096])
        entry = up.unpack()
        ts = entry[0]
        if isinstance(ts, list):
            ts = ts[0]
        if isinstance(ts, msgpack.ExtType):
            return int.from_bytes(ts.data[:4], "big") - t0
        if isinstance(ts, int | float):
            return int(ts) - t0
    except Exception:
        return None
    return None


def run_sink(conn: Connection, t0: int, port: int = 0) -> None:
    """Process entry point: serve on ``port``, report it, answer ``stats``/``stop`` requests."""
    loop = _new_loop()
    asyncio.set_event_loop(loop)
    state = _SinkState(t0)

    async def main() -> None:
        server = await loop.create_server(lambda: _SinkProtocol(state), HOST, port, backlog=512)
        conn.send(server.sockets[0].getsockname()[1])
        done = asyncio.Event()

        def on_cmd() -> None:
            cmd = conn.recv()
            if cmd == "stop":
                done.set()
                return
            receipts = state.receipts
            state.receipts = []
            conn.send(
                {
                    "records": state.records,
                    "chunks": state.chunks,
                    "entry_bytes": state.entry_bytes,
                    "wire_bytes": state.wire_bytes,
                    "receipts": receipts,
                }
            )

        loop.add_reader(conn.fileno(), on_cmd)
        await done.wait()
        server.close()

    loop.run_until_complete(main())
    loop.close()


class SinkProcess:
    """The sink in a child process (so it does not share a CPU with the driver)."""

    def __init__(self, t0: int, port: int = 0) -> None:
        ctx = mp.get_context("fork")
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=run_sink, args=(child, t0, port), daemon=True)
        self.proc.start()
        self.port: int = self._conn.recv()

    def stats(self) -> dict[str, Any]:
        """Counters so far; receipts are handed over once (then cleared)."""
        self._conn.send("stats")
        return self._conn.recv()  # type: ignore[no-any-return]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send("stop")
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()


# ------------------------------------------------------------------------------- process stats


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        return out
    for c in list(out):
        out += _children(c)
    return out


def _cpu(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(parts[11]) + int(parts[12])) / _CLK  # utime, stime


def _status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class ProcStats:
    """CPU seconds and RSS of a process tree (``pid`` and its descendants)."""

    pid: int

    def pids(self) -> list[int]:
        return [self.pid, *_children(self.pid)]

    def cpu(self) -> float:
        return sum(_cpu(p) for p in self.pids())

    def peak_rss_mb(self) -> float:
        """Sum over the tree of each process's peak RSS (VmHWM)."""
        return sum(_status_kb(p, "VmHWM") for p in self.pids()) / 1024

    def rss_mb(self) -> float:
        return sum(_status_kb(p, "VmRSS") for p in self.pids()) / 1024


# -------------------------------------------------------------------------------- driver


@dataclass
class Traffic:
    """The frames of a traffic file, in memory. ``cursor``: the frame the next run starts
    at; each run goes on where the last one stopped, so short runs (a warm-up made of 1 s
    runs) cycle through the whole mix rather than replaying its first frames."""

    frames: list[bytes]
    counts: list[int]
    t0: int
    entry_bytes: int
    wire_bytes: int
    cursor: int = 0

    @classmethod
    def load(cls, path: Path) -> Traffic:
        meta = load_index(path)
        data = path.read_bytes()
        frames = [data[o : o + n] for o, n, *_ in meta["chunks"]]
        counts = [c[2] for c in meta["chunks"]]
        return cls(frames, counts, meta["t0"], meta["entry_bytes"], meta["bytes"])


@dataclass
class DriveResult:
    """What one load run measured (driver side)."""

    mode: str
    seconds: float
    chunks_acked: int
    records_acked: int
    wire_bytes: int
    sends: dict[int, list[float]] = field(default_factory=dict)  # chunk index -> send times


class _Client(asyncio.Protocol):
    def __init__(self) -> None:
        self.unpacker = msgpack.Unpacker(raw=True)
        self.acked = 0
        self.event = asyncio.Event()
        self.transport: asyncio.Transport | None = None
        self.lost: BaseException | None = None
        self.can_write = asyncio.Event()
        self.can_write.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.unpacker.feed(data)
        for msg in self.unpacker:
            if isinstance(msg, dict) and b"ack" in msg:
                self.acked += 1
        self.event.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionResetError("ruletag closed the connection")
        self.event.set()
        self.can_write.set()

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()


async def _drive(
    traffic: Traffic,
    host: str,
    port: int,
    *,
    duration: float,
    connections: int,
    window: int,
    rate: float | None,
) -> DriveResult:
    loop = asyncio.get_running_loop()
    n = len(traffic.frames)
    sends: dict[int, list[float]] = {}
    stop_at = time.monotonic() + duration
    start = time.monotonic()
    totals = {"chunks": 0, "records": 0, "bytes": 0}
    # chunk k of the whole run is due at start + k / chunk_rate (fixed-rate mode)
    chunk_rate = rate / (sum(traffic.counts) / n) if rate else None
    next_slot = [0]
    order = [(traffic.cursor + j) % n for j in range(n)]

    async def one(c: int) -> None:
        _, proto = await loop.create_connection(_Client, host, port)
        assert proto.transport is not None
        mine = order[c::connections]
        sent_counts: list[int] = []
        i = 0
        while time.monotonic() < stop_at:
            if proto.lost:
                raise proto.lost
            while len(sent_counts) - proto.acked >= window:
                proto.event.clear()
                await proto.event.wait()
                if proto.lost:
                    raise proto.lost
            if chunk_rate:
                due = start + next_slot[0] / chunk_rate
                next_slot[0] += 1
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            await proto.can_write.wait()
            idx = mine[i % len(mine)]
            i += 1
            sends.setdefault(idx, []).append(time.monotonic())
            proto.transport.write(traffic.frames[idx])
            sent_counts.append(traffic.counts[idx])
        while proto.acked < len(sent_counts):
            if proto.lost:
                raise proto.lost
            proto.event.clear()
            await asyncio.wait_for(proto.event.wait(), 60)
        totals["chunks"] += len(sent_counts)
        totals["records"] += sum(sent_counts)
        totals["bytes"] += sum(
            len(traffic.frames[mine[k % len(mine)]]) for k in range(len(sent_counts))
        )
        proto.transport.close()

    await asyncio.gather(*(one(c) for c in range(connections)))
    elapsed = time.monotonic() - start
    traffic.cursor = (traffic.cursor + totals["chunks"]) % n
    return DriveResult(
        "rate" if rate else "full",
        elapsed,
        totals["chunks"],
        totals["records"],
        totals["bytes"],
        sends,
    )


def drive(
    traffic: Traffic,
    host: str,
    port: int,
    *,
    duration: float = 10.0,
    connections: int = 1,
    window: int = 8,
    rate: float | None = None,
) -> DriveResult:
    """Send frames (cycling through the traffic) for ``duration`` s; wait for every ack."""
    loop = _new_loop()
    try:
        return loop.run_until_complete(
            _drive(
                traffic,
                host,
                port,
                duration=duration,
                connections=connections,
                window=window,
                rate=rate,
            )
        )
    finally:
        loop.close()


def latencies(sends: dict[int, list[float]], receipts: list[tuple[int, float]]) -> list[float]:
    """Pair the k-th send of each chunk with its k-th receipt; seconds, sorted."""
    got: dict[int, list[float]] = {}
    for idx, t in receipts:
        got.setdefault(idx, []).append(t)
    out = []
    for idx, ts in sends.items():
        for s, r in zip(ts, sorted(got.get(idx, ())), strict=False):
            out.append(r - s)
    out.sort()
    return out


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of sorted ``values`` (0.0 if empty)."""
    if not values:
        return 0.0
    return values[min(len(values) - 1, int(q * len(values)))]


def measure(
    traffic: Traffic,
    sink: SinkProcess,
    listen: tuple[str, int],
    pid: int | None,
    *,
    duration: float,
    connections: int = 1,
    window: int = 8,
    rate: float | None = None,
) -> dict[str, Any]:
    """One load run; throughput, latency and the ruletag process tree's CPU and RSS."""
    ps = ProcStats(pid) if pid else None
    sink.stats()  # drop earlier receipts
    base = sink.stats()
    cpu0 = ps.cpu() if ps else 0.0
    sink_cpu0 = _cpu(sink.proc.pid or 0)
    me0 = time.process_time()
    res = drive(
        traffic, *listen, duration=duration, connections=connections, window=window, rate=rate
    )
    cpu = (ps.cpu() - cpu0) if ps else 0.0
    driver_cpu = time.process_time() - me0
    sink_cpu = _cpu(sink.proc.pid or 0) - sink_cpu0
    time.sleep(0.05)
    after = sink.stats()
    lat = latencies(res.sends, after["receipts"])
    received = after["records"] - base["records"]
    entry_mb = (after["entry_bytes"] - base["entry_bytes"]) / 1e6
    return {
        "mode": res.mode,
        "seconds": round(res.seconds, 2),
        "records": res.records_acked,
        "records_received": received,
        "records_per_s": round(res.records_acked / res.seconds),
        "mb_per_s": round(res.wire_bytes / 1e6 / res.seconds, 1),
        "entry_mb": round(entry_mb, 1),
        "p50_ms": round(pct(lat, 0.50) * 1000, 2),
        "p99_ms": round(pct(lat, 0.99) * 1000, 2),
        "cpu_s": round(cpu, 2),
        "cpu_us_per_record": round(cpu / max(1, res.records_acked) * 1e6, 2),
        "driver_cpu_s": round(driver_cpu, 2),
        "sink_cpu_s": round(sink_cpu, 2),
        "peak_rss_mb": round(ps.peak_rss_mb(), 1) if ps else 0.0,
        "rss_mb": round(ps.rss_mb(), 1) if ps else 0.0,
    }


def free_port() -> int:
    """An ephemeral TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--traffic", default="/tmp/ruletag-bench/traffic.bin")
    ap.add_argument("--listen", default="127.0.0.1:24224", help="where ruletag listens")
    ap.add_argument("--sink-port", type=int, default=24225, help="port of the sink we start")
    ap.add_argument("--pid", type=int, help="ruletag's pid (for CPU and RSS)")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--connections", type=int, default=1)
    ap.add_argument("--window", type=int, default=8, help="unacked chunks per connection")
    ap.add_argument("--rate", type=float, help="records/s (fixed rate) instead of full speed")
    ap.add_argument(
        "--wait",
        type=float,
        default=0.0,
        help="seconds to wait after the sink is up (to start ruletag meanwhile)",
    )
    ns = ap.parse_args(argv)
    traffic = Traffic.load(Path(ns.traffic))
    host, _, port = ns.listen.rpartition(":")
    sink = SinkProcess(traffic.t0, ns.sink_port)
    try:
        time.sleep(ns.wait)
        out = measure(
            traffic,
            sink,
            (host, int(port)),
            ns.pid,
            duration=ns.duration,
            connections=ns.connections,
            window=ns.window,
            rate=ns.rate,
        )
    finally:
        sink.close()
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
