"""Relay throughput: PackedForward with acks, ~1 KB records, through a running ruletag server
(in-process: Server -> Pipeline -> Forwarder) into an acking sink, all on 127.0.0.1.

Usage: python bench/bench_relay.py [--records 200000] [--per-chunk 500] [--connections 4]
                                   [--window 8]
Prints records/s and MB/s (payload bytes of the entries). Not a test: no assertions on speed.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import msgpack

from ruletag import protocol
from ruletag.config.load import config_from_mapping
from ruletag.delivery.pipeline import Pipeline
from ruletag.protocol import Chunk
from ruletag.transport.forwarder import Forwarder
from ruletag.transport.server import Server


class CountingSink:
    """A downstream that decodes with the codec, counts records and acks every chunk."""

    def __init__(self) -> None:
        self.records = 0
        self.port = 0

    async def start(self) -> None:
        srv = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = srv.sockets[0].getsockname()[1]
        self._srv = srv

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = protocol.ServerConnection(hostname="bench-sink")
        writer.write(conn.initial_bytes())
        while data := await reader.read(1 << 18):
            conn.receive_data(data)
            while (ev := conn.next_event()) is not protocol.NEED_DATA:
                if isinstance(ev, Chunk):
                    self.records += ev.count
                    if ev.chunk_id is not None:
                        writer.write(conn.ack(ev.chunk_id))
            out = conn.data_to_send()
            if out:
                writer.write(out)
        writer.close()


def make_entries(n: int) -> bytes:
    rec = {
        "host": {"name": "ws-0042", "os": {"type": "windows"}},
        "event": {"code": 4688, "category": "process"},
        "process": {"name": "powershell.exe", "command_line": "x" * 760},
        "user": {"name": "alice", "domain": "CORP"},
    }
    packer = msgpack.Packer()
    return b"".join(packer.pack([1700000000 + i, rec]) for i in range(n))


async def client(port: int, frames: list[bytes], window: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    cc = protocol.ClientConnection(hostname="bench-client")
    sem = asyncio.Semaphore(window)
    done = asyncio.Event()
    acked = 0

    async def read_acks() -> None:
        nonlocal acked
        while acked < len(frames):
            data = await reader.read(65536)
            if not data:
                raise ConnectionError("relay closed the connection")
            cc.receive_data(data)
            while cc.next_event() is not protocol.NEED_DATA:
                acked += 1
                sem.release()
        done.set()

    task = asyncio.create_task(read_acks())
    for f in frames:
        await sem.acquire()
        writer.write(f)
        await writer.drain()
    await done.wait()
    await task
    writer.close()


async def run(records: int, per_chunk: int, connections: int, window: int) -> None:
    sink = CountingSink()
    await sink.start()
    cfg = config_from_mapping(
        {
            "listen": {"port": 0},
            "forward": {"servers": [{"host": "127.0.0.1", "port": sink.port}]},
        }
    )
    forwarder = Forwarder(cfg.forward)
    await forwarder.start()
    server = Server(cfg.listen, Pipeline(forwarder).submit)
    await server.start()
    entries = make_entries(per_chunk)
    chunks_per_conn = max(1, records // per_chunk // connections)
    frames = [
        [
            protocol.encode_chunk(
                "bench.relay", entries, per_chunk, chunk_id=protocol.new_chunk_id()
            )
            for _ in range(chunks_per_conn)
        ]
        for _ in range(connections)
    ]
    total = chunks_per_conn * connections * per_chunk
    start = time.perf_counter()
    await asyncio.gather(*(client(server.port, f, window) for f in frames))
    elapsed = time.perf_counter() - start
    await server.stop(timeout=5)
    await forwarder.close(timeout=5)
    size = len(entries) * chunks_per_conn * connections
    print(f"records relayed:  {total} ({sink.records} counted at the sink)")
    print(f"record size:      {len(entries) / per_chunk:.0f} bytes")
    print(f"elapsed:          {elapsed:.2f} s")
    print(f"throughput:       {total / elapsed:,.0f} records/s, {size / elapsed / 1e6:.1f} MB/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--per-chunk", type=int, default=500)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--window", type=int, default=8, help="unacked chunks per connection")
    ns = ap.parse_args()
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        runner.run(run(ns.records, ns.per_chunk, ns.connections, ns.window))


if __name__ == "__main__":
    main()
