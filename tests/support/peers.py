"""Reusable forward-protocol test peers on 127.0.0.1 (ephemeral ports), built on the codec.

``Sink``: a downstream server that records every chunk and decoded entry and acks by default.
Its behaviour can be changed at any time through attributes::

    sink = Sink(shared_key="k", users={"u": "p"})
    await sink.start()                  # sink.port is now set; start() again after stop()
    sink.ack = False                    # withhold every ack (or withhold_first = N)
    sink.ack_delay = 0.5                # ack slowly
    sink.close_after = 2                # close each connection after its 2nd chunk (acked)
    await sink.wait_records(10)         # -> list of records, or AssertionError on timeout
    await sink.stop()                   # outage; start() reuses the same port

``Source``: a client that does the handshake and sends raw bytes or chunks, reading acks.
``make_chunk`` / ``pack_entries`` build ``events.Chunk`` values from Python records.
``BackgroundLoop`` runs coroutines on an event loop in a thread, for synchronous tests.
``eventually(predicate)`` waits for a condition with a deadline (never a fixed sleep).
``read_acks(reader, on_ack)`` counts the acks a server sends to a raw writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Any, TypeVar

import msgpack

from ruletag import protocol
from ruletag.errors import AuthenticationError, RemoteProtocolError
from ruletag.protocol import Ack, Chunk, ConnectionClosed, EventTime

T = TypeVar("T")
HOST = "127.0.0.1"


async def eventually(
    predicate: Callable[[], object], what: str = "", timeout: float = 10.0
) -> None:
    """Wait until ``predicate()`` is true; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.01)


def _ext_hook(code: int, data: bytes) -> Any:
    if code == 0 and len(data) == 8:
        return EventTime(int.from_bytes(data[:4], "big"), int.from_bytes(data[4:], "big"))
    return msgpack.ExtType(code, data)


def _default(obj: Any) -> Any:
    if isinstance(obj, EventTime):
        return msgpack.ExtType(
            0, obj.seconds.to_bytes(4, "big") + obj.nanoseconds.to_bytes(4, "big")
        )
    raise TypeError(f"cannot pack {type(obj).__name__}")


def decode_entries(entries: bytes) -> list[list[Any]]:
    """Decode packed entries: ``[time, record]`` or ``[[time, meta], record]`` lists."""
    unpacker = msgpack.Unpacker(
        raw=False, strict_map_key=False, ext_hook=_ext_hook, unicode_errors="surrogateescape"
    )
    unpacker.feed(entries)
    return list(unpacker)


def pack_entries(
    records: Iterable[Mapping[str, Any]],
    *,
    time: int | EventTime = 1_700_000_000,
    metadata: Mapping[str, Any] | None = None,
) -> tuple[bytes, int]:
    """Pack records as entries (v2 ``[[time, metadata], record]`` if ``metadata`` is given)."""
    packer = msgpack.Packer(default=_default, use_bin_type=True)
    out = bytearray()
    count = 0
    for rec in records:
        head: Any = [time, dict(metadata)] if metadata is not None else time
        out += packer.pack([head, dict(rec)])
        count += 1
    return bytes(out), count


def make_chunk(
    tag: str,
    records: Iterable[Mapping[str, Any]],
    *,
    v2: bool = False,
    time: int | EventTime = 1_700_000_000,
) -> Chunk:
    """A log ``Chunk`` of ``records`` (v2 entries carry ``{"m": 1}`` metadata)."""
    entries, count = pack_entries(records, time=time, metadata={"m": 1} if v2 else None)
    return Chunk(tag=tag, entries=entries, count=count, v2=v2, size=len(entries))


async def cancel_all(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait until each has ended (whatever it raised)."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(BaseException):
            await task


def seqs(sink: Sink) -> list[int]:
    """The ``seq`` field of every record ``sink`` received, in arrival order."""
    return [r["seq"] for r in sink.records]


async def read_acks(reader: asyncio.StreamReader, on_ack: Callable[[bytes], None]) -> None:
    """Decode what a server sends on ``reader`` until EOF, calling ``on_ack(chunk_id)`` for
    every ack; any error ends it quietly (the caller judges by the acks it counted)."""
    client = protocol.ClientConnection()
    with contextlib.suppress(Exception):
        while data := await reader.read(65536):
            client.receive_data(data)
            while (event := client.next_event()) is not protocol.NEED_DATA:
                if isinstance(event, Ack):
                    on_ack(event.chunk_id)


class Sink:
    """A forward-protocol server that records what it receives. See the module docstring."""

    def __init__(
        self,
        *,
        shared_key: str | None = None,
        users: Mapping[str, str] | None = None,
        hostname: str = "sink",
        ssl_context: ssl.SSLContext | None = None,
        ack: bool = True,
        ack_delay: float = 0.0,
        withhold_first: int = 0,
        close_after: int | None = None,
        port: int = 0,
    ) -> None:
        self.shared_key = shared_key
        self.users = dict(users or {})
        self.hostname = hostname
        self.ssl_context = ssl_context
        self.ack = ack
        self.ack_delay = ack_delay
        self.withhold_first = withhold_first
        self.close_after = close_after
        self.port = port
        self.chunks: list[Chunk] = []
        self.entries: list[tuple[str, Any, Any]] = []  # (tag, time field, record)
        self.acks_sent = 0
        self.connections = 0
        self.auth_failures = 0
        self.errors: list[BaseException] = []
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._changed: asyncio.Event | None = None

    @property
    def records(self) -> list[Any]:
        """Every decoded record, in arrival order."""
        return [rec for _, _, rec in self.entries]

    @property
    def chunk_ids(self) -> list[bytes | None]:
        return [c.chunk_id for c in self.chunks]

    async def start(self) -> Sink:
        """Listen on 127.0.0.1 (``port`` 0 picks one; a restart reuses it)."""
        self._changed = asyncio.Event()
        self._server = await asyncio.start_server(
            self._handle, HOST, self.port, ssl=self.ssl_context
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Stop listening and drop every open connection (unacked chunks stay unacked)."""
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.transport.abort()
        if self._tasks:
            _, stuck = await asyncio.wait(list(self._tasks), timeout=2.0)
            for t in stuck:
                t.cancel()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> Sink:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait_records(self, n: int, timeout: float = 5.0) -> list[Any]:
        """Wait until at least ``n`` records arrived; AssertionError after ``timeout``."""
        await self._wait(lambda: len(self.entries) >= n, timeout, f"{n} records")
        return self.records

    async def wait_chunks(self, n: int, timeout: float = 5.0) -> list[Chunk]:
        """Wait until at least ``n`` chunks arrived; AssertionError after ``timeout``."""
        await self._wait(lambda: len(self.chunks) >= n, timeout, f"{n} chunks")
        return self.chunks

    async def _wait(self, cond: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"sink: timed out waiting for {what}; have {len(self.chunks)} chunks, "
                    f"{len(self.entries)} records"
                )
            assert self._changed is not None
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.1))

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        conn = protocol.ServerConnection(
            shared_key=self.shared_key.encode() if self.shared_key is not None else None,
            users={u.encode(): p.encode() for u, p in self.users.items()} or None,
            hostname=self.hostname,
        )
        received = 0
        try:
            writer.write(conn.initial_bytes())
            while True:
                data = await reader.read(65536)
                conn.receive_data(data)
                while (event := conn.next_event()) is not protocol.NEED_DATA:
                    if isinstance(event, ConnectionClosed):
                        break
                    out = conn.data_to_send()
                    if out:
                        writer.write(out)
                    if isinstance(event, Chunk):
                        received += 1
                        self._record(event)
                        if event.chunk_id is not None:
                            self._maybe_ack(writer, conn, event.chunk_id)
                        if self.close_after is not None and received >= self.close_after:
                            await writer.drain()
                            return
                out = conn.data_to_send()
                if out:
                    writer.write(out)
                await writer.drain()
                if not data:
                    return
        except AuthenticationError as exc:
            self.auth_failures += 1
            self.errors.append(exc)
            with contextlib.suppress(Exception):
                writer.write(conn.data_to_send())
                await writer.drain()
        except (RemoteProtocolError, OSError) as exc:
            self.errors.append(exc)
        except asyncio.CancelledError:
            pass  # stop(): end quietly (asyncio logs handler tasks that end cancelled)
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)
            writer.close()
            self._notify()

    def _record(self, chunk: Chunk) -> None:
        self.chunks.append(chunk)
        if chunk.signal == 0:
            for entry in decode_entries(chunk.entries):
                self.entries.append((chunk.tag, entry[0], entry[1]))
        self._notify()

    def _maybe_ack(
        self, writer: asyncio.StreamWriter, conn: protocol.ServerConnection, chunk_id: bytes
    ) -> None:
        if not self.ack or len(self.chunks) <= self.withhold_first:
            return
        payload = conn.ack(chunk_id)
        if self.ack_delay <= 0:
            writer.write(payload)
            self.acks_sent += 1
            return

        def later() -> None:
            if not writer.is_closing():
                writer.write(payload)
                self.acks_sent += 1

        asyncio.get_running_loop().call_later(self.ack_delay, later)

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()


class Source:
    """A forward client for tests: ``await Source.connect(port, shared_key=...)``."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        client: protocol.ClientConnection,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.client = client
        self._acks: list[bytes] = []

    @classmethod
    async def connect(
        cls,
        port: int,
        *,
        host: str = HOST,
        shared_key: str | None = None,
        username: str = "",
        password: str = "",
        hostname: str = "source",
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 5.0,
    ) -> Source:
        """Connect and, with ``shared_key``, finish the handshake (raises on failure)."""
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ssl_context), timeout
        )
        client = protocol.ClientConnection(
            shared_key=shared_key.encode() if shared_key is not None else None,
            username=username,
            password=password,
            hostname=hostname,
        )
        src = cls(reader, writer, client)
        try:
            await asyncio.wait_for(src._handshake(), timeout)
        except BaseException:
            writer.close()
            raise
        return src

    async def _handshake(self) -> None:
        while not self.client.ready:
            await self._pump()

    async def _pump(self) -> None:
        data = await self.reader.read(65536)
        self.client.receive_data(data)
        while (event := self.client.next_event()) is not protocol.NEED_DATA:
            if isinstance(event, ConnectionClosed):
                break
            if isinstance(event, Ack):
                self._acks.append(event.chunk_id)
        out = self.client.data_to_send()
        if out:
            self.writer.write(out)
            await self.writer.drain()
        if not data:
            raise ConnectionResetError("peer closed the connection")

    async def send_bytes(self, data: bytes) -> None:
        """Write raw bytes as they are."""
        self.writer.write(data)
        await self.writer.drain()

    async def send_chunk(self, chunk: Chunk, *, ack: bool = True) -> bytes | None:
        """Send ``chunk`` as PackedForward; returns the chunk id used (None if ``ack=False``)."""
        chunk_id = (chunk.chunk_id or protocol.new_chunk_id()) if ack else None
        frame = protocol.encode_chunk(
            chunk.tag, chunk.entries, chunk.count, chunk_id=chunk_id, signal=chunk.signal
        )
        await self.send_bytes(frame)
        return chunk_id

    async def read_ack(self, timeout: float = 5.0) -> bytes:
        """The next ack's chunk id (TimeoutError / ConnectionResetError otherwise)."""

        async def next_ack() -> bytes:
            while not self._acks:
                await self._pump()
            return self._acks.pop(0)

        return await asyncio.wait_for(next_ack(), timeout)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


class BackgroundLoop:
    """An event loop in a daemon thread: ``with BackgroundLoop() as bg: bg.run(coro)``."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> BackgroundLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run ``coro`` on the loop and return its result (blocks the calling thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)
