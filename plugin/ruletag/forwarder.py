"""Downstream forward-protocol client: send chunks, wait for acks, retry and fail over.

One :class:`Forwarder` owns every downstream server of a pipeline. ``send(chunk)`` encodes the
chunk once as PackedForward with a fresh chunk id, then keeps resending that same frame (same
id, so downstream can dedupe) until a server acks it: round-robin over healthy active servers,
standby servers only while no active one is healthy, exponential backoff with jitter per server.
Chunks are pipelined on keepalive connections and acks are matched by id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

from ruletag import codec
from ruletag.config import ForwardConfig, ForwardTLS
from ruletag.errors import AuthenticationError, ProtocolError, RuletagError
from ruletag.events import Ack, Chunk, ConnectionClosed

log = logging.getLogger(__name__)

#: Most chunks awaiting an ack on one connection at a time.
MAX_CHUNKS_PER_CONNECTION = 64
_READ_SIZE = 65536


class DeliveryError(RuletagError):
    """A chunk could not be delivered: retry limit reached, or the forwarder was closed."""


def build_ssl_context(tls: ForwardTLS) -> ssl.SSLContext | None:
    """Client SSL context from a server's ``tls`` settings, or None when TLS is off."""
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(cafile=tls.ca_file)
    if not tls.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if tls.cert_file:
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
    return ctx


class _ServerDown(ConnectionError):
    """The picked server went into backoff while we waited for it: pick again."""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no ack before ack_timeout"
    return str(exc) or type(exc).__name__


class _Connection:
    """One open connection to a downstream: handshake done, acks read by a background task."""

    def __init__(
        self,
        server: _Server,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        client: codec.ClientConnection,
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.client = client
        self.pending: dict[bytes, asyncio.Future[None]] = {}
        self.slots = asyncio.Semaphore(MAX_CHUNKS_PER_CONNECTION)
        self.closed = False
        self.error: BaseException | None = None
        self.reader_task = asyncio.get_running_loop().create_task(self._read_loop())

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self.reader.read(_READ_SIZE)
                self.client.receive_data(data)
                while (event := self.client.next_event()) is not codec.NEED_DATA:
                    if isinstance(event, Ack):
                        fut = self.pending.pop(event.chunk_id, None)
                        if fut is None:
                            log.warning("%s: ack for unknown chunk %r", self.server, event.chunk_id)
                        elif not fut.done():
                            fut.set_result(None)
                    elif isinstance(event, ConnectionClosed):
                        raise ConnectionResetError("downstream closed the connection")
                if not data:
                    raise ConnectionResetError("downstream closed the connection")
        except asyncio.CancelledError:
            self._fail(ConnectionAbortedError("connection closed"))
            raise
        except (OSError, ProtocolError, ssl.SSLError) as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        pending = list(self.pending.values())
        self.pending.clear()
        for fut in pending:
            if not fut.done():
                fut.set_exception(exc)
        if not self.closed:
            self.closed = True
            self.writer.close()
            if pending:
                log.warning("%s: connection lost with %d chunk(s) unacked: %s",
                            self.server, len(pending), exc)
            else:
                log.info("%s: connection closed (%s)", self.server, exc)

    async def send(self, frame: bytes, chunk_id: bytes | None, ack_timeout: float) -> None:
        """Write one frame; with ``chunk_id`` wait for its ack (raises TimeoutError/OSError)."""
        async with self.slots:
            if self.closed:
                raise ConnectionResetError(f"connection to {self.server} is closed")
            fut: asyncio.Future[None] | None = None
            if chunk_id is not None:
                fut = asyncio.get_running_loop().create_future()
                self.pending[chunk_id] = fut
            try:
                self.writer.write(frame)
                await self.writer.drain()
                if fut is not None:
                    await asyncio.wait_for(asyncio.shield(fut), ack_timeout)
            finally:
                if chunk_id is not None:
                    self.pending.pop(chunk_id, None)
                if fut is not None and not fut.done():
                    fut.cancel()

    async def aclose(self) -> None:
        """Close the socket and stop the reader task."""
        self.reader_task.cancel()
        with contextlib.suppress(BaseException):
            await self.reader_task
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)


@dataclass(eq=False)
class _Server:
    """A downstream node: its settings, health and (keepalive) connection."""

    host: str
    port: int
    name: str
    standby: bool
    shared_key: bytes | None
    username: str
    password: str
    ssl_context: ssl.SSLContext | None
    server_hostname: str | None
    failures: int = 0
    retry_at: float = 0.0
    conn: _Connection | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def __str__(self) -> str:
        return f"downstream {self.name}"

    def healthy(self, now: float) -> bool:
        return self.failures == 0 or now >= self.retry_at


class Forwarder:
    """Sends chunks downstream with acks, pipelining, retry and failover. Never drops silently.

    Counters for metrics: ``chunks_sent``, ``records_sent``, ``bytes_sent`` (acked or, without
    ``require_ack``, written), ``acks``, ``retries``, ``ack_timeouts``, ``connects``,
    ``connect_failures``; ``servers_up`` and ``in_flight_bytes`` are live gauges.
    """

    def __init__(self, config: ForwardConfig) -> None:
        self.config = config
        self.require_ack = config.require_ack
        self.retry_limit = config.retry_limit
        self.in_flight_bytes = 0
        self.chunks_sent = 0
        self.records_sent = 0
        self.bytes_sent = 0
        self.acks = 0
        self.retries = 0
        self.ack_timeouts = 0
        self.connects = 0
        self.connect_failures = 0
        self._servers: list[_Server] = []
        self._rr = 0
        self._space: asyncio.Condition | None = None
        self._sending = 0
        self._closing = False
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Build per-server settings (TLS contexts); connections are opened on first use."""
        self._space = asyncio.Condition()
        self._servers = []
        for s in self.config.servers:
            key = s.shared_key
            self._servers.append(
                _Server(
                    host=s.host,
                    port=s.port,
                    name=s.name or s.address,
                    standby=s.standby,
                    shared_key=key.encode() if key is not None else None,
                    username=s.username,
                    password=s.password,
                    ssl_context=build_ssl_context(s.tls),
                    server_hostname=s.tls.server_hostname,
                )
            )
        if not self._servers:
            raise DeliveryError("forward: no downstream servers configured")

    async def close(self, timeout: float = 10.0) -> None:
        """Let in-flight sends finish for up to ``timeout`` s, then fail them and disconnect."""
        self._closing = True
        if self._space is not None:
            async with self._space:
                self._space.notify_all()
        deadline = time.monotonic() + timeout
        while self._sending and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        for server in self._servers:
            if server.conn is not None:
                await server.conn.aclose()
                server.conn = None

    @property
    def servers_up(self) -> int:
        """Servers not currently backing off after a failure."""
        now = time.monotonic()
        return sum(1 for s in self._servers if s.healthy(now))

    # -- sending ---------------------------------------------------------------------------

    def _encode(self, chunk: Chunk, chunk_id: bytes | None) -> bytes:
        entries = chunk.entries
        if chunk.signal == 0 and chunk.v2 and self.config.entry_format != "v2":
            entries = codec.entries_to_v1(entries, chunk.spans)
        return codec.encode_chunk(
            chunk.tag,
            entries,
            chunk.count,
            chunk_id=chunk_id,
            compress=self.config.compress and chunk.signal == 0,
            signal=chunk.signal,
        )

    async def send(self, chunk: Chunk) -> None:
        """Deliver ``chunk``; return once downstream acked it (or, without acks, once written).

        Retries forever unless ``retry_limit`` is set, in which case :class:`DeliveryError`
        is raised after that many failed retries. Also raised if the forwarder is closed.
        """
        if self._closing or self._space is None:
            raise DeliveryError("forwarder is not running")
        chunk_id = codec.new_chunk_id() if self.require_ack else None
        frame = self._encode(chunk, chunk_id)
        size = len(frame)
        async with self._space:
            await self._space.wait_for(
                lambda: self._closing
                or self.in_flight_bytes == 0
                or self.in_flight_bytes + size <= self.config.max_in_flight_bytes
            )
            if self._closing:
                raise DeliveryError("forwarder closed before the chunk could be sent")
            self.in_flight_bytes += size
        self._sending += 1
        inner = asyncio.get_running_loop().create_task(self._deliver(chunk, frame, chunk_id))
        self._tasks.add(inner)
        try:
            await inner  # cancelling the caller cancels the delivery too
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if inner.cancelled() and (me is None or not me.cancelling()):
                raise DeliveryError(
                    f"forwarder closed before chunk {chunk_id!r} (tag {chunk.tag!r}) was delivered"
                ) from None
            raise
        finally:
            self._tasks.discard(inner)
            self._sending -= 1
            async with self._space:
                self.in_flight_bytes -= size
                self._space.notify_all()

    async def _deliver(self, chunk: Chunk, frame: bytes, chunk_id: bytes | None) -> None:
        attempt = 0
        while True:
            server = await self._pick()
            conn: _Connection | None = None
            try:
                conn = await self._connection(server)
                await self._send_on(conn, frame, chunk_id)
            except _ServerDown:
                continue
            except (OSError, TimeoutError, ProtocolError, ssl.SSLError) as exc:
                attempt += 1
                self._mark_failed(server, conn, exc)
                if self.retry_limit is not None and attempt > self.retry_limit:
                    msg = (
                        f"giving up on chunk {chunk_id!r} (tag {chunk.tag!r}, {chunk.count} "
                        f"records) after {attempt} attempts: {_describe(exc)}"
                    )
                    log.error("forward: %s", msg)
                    raise DeliveryError(msg) from exc
                self.retries += 1
                log.info("forward: chunk %r to %s failed (%s); retry %d",
                            chunk_id, server, _describe(exc), attempt)
                continue
            if server.failures:
                log.info("%s is healthy again", server)
            server.failures = 0
            self.chunks_sent += 1
            self.records_sent += chunk.count
            self.bytes_sent += len(frame)
            if chunk_id is not None:
                self.acks += 1
            return

    async def _pick(self) -> _Server:
        """Next healthy server: actives round-robin, standbys only if no active is healthy."""
        while True:
            now = time.monotonic()
            for group in (
                [s for s in self._servers if not s.standby],
                [s for s in self._servers if s.standby],
            ):
                ready = [s for s in group if s.healthy(now)]
                if ready:
                    self._rr += 1
                    return ready[self._rr % len(ready)]
            wake = min(s.retry_at for s in self._servers)
            await asyncio.sleep(max(0.0, wake - now))

    def _mark_failed(
        self, server: _Server, conn: _Connection | None, exc: BaseException
    ) -> None:
        """Back ``server`` off after a failed send; drop ``conn``, the connection that failed.

        Only that connection is dropped: by now ``server.conn`` may be a newer connection
        that another chunk opened after the failure, which must not be torn down.
        """
        if isinstance(exc, TimeoutError):
            self.ack_timeouts += 1
        now = time.monotonic()
        if conn is not None and (conn.closed or isinstance(exc, TimeoutError)):
            if server.conn is conn:
                server.conn = None
            conn._fail(exc if isinstance(exc, OSError) else ConnectionAbortedError(str(exc)))
        if server.failures and now < server.retry_at:
            return  # already backing off: chunks failing together count as one failure
        server.failures += 1
        cfg = self.config
        delay = min(cfg.retry_backoff_max, cfg.retry_backoff_base * 2 ** (server.failures - 1))
        delay = delay / 2 + random.uniform(0, delay / 2)
        server.retry_at = now + delay
        if isinstance(exc, AuthenticationError):
            log.error("%s refused our handshake (check shared_key, username, password and "
                      "self_hostname): %s", server, exc)
        elif server.failures == 1:
            log.warning("%s marked down: %s", server, _describe(exc))

    async def _connection(self, server: _Server) -> _Connection:
        """The server's keepalive connection (opened if needed), or a fresh one without
        keepalive."""
        if not self.config.keepalive:
            return await self._connect(server)
        async with server.lock:
            if server.conn is None or server.conn.closed:
                server.conn = None
                if not server.healthy(time.monotonic()):
                    raise _ServerDown(str(server))
                server.conn = await self._connect(server)
            return server.conn

    async def _send_on(self, conn: _Connection, frame: bytes, chunk_id: bytes | None) -> None:
        """Send on ``conn``; without keepalive, the connection is closed afterwards."""
        try:
            await conn.send(frame, chunk_id, self.config.ack_timeout)
        finally:
            if not self.config.keepalive:
                await conn.aclose()

    async def _connect(self, server: _Server) -> _Connection:
        """Open a connection and do the shared-key handshake, within ``connect_timeout``."""
        try:
            conn = await asyncio.wait_for(self._open(server), self.config.connect_timeout)
        except TimeoutError:
            self.connect_failures += 1
            raise ConnectionError(f"connect/handshake to {server} timed out") from None
        except BaseException:
            self.connect_failures += 1
            raise
        self.connects += 1
        log.info("%s: connected to %s:%d", server, server.host, server.port)
        return conn

    async def _open(self, server: _Server) -> _Connection:
        reader, writer = await asyncio.open_connection(
            server.host,
            server.port,
            ssl=server.ssl_context,
            server_hostname=(server.server_hostname or server.host)
            if server.ssl_context
            else None,
            limit=_READ_SIZE * 4,
        )
        client = codec.ClientConnection(
            shared_key=server.shared_key,
            username=server.username,
            password=server.password,
            hostname=self.config.self_hostname,
        )
        try:
            while not client.ready:
                data = await reader.read(_READ_SIZE)
                client.receive_data(data)
                while (event := client.next_event()) is not codec.NEED_DATA:
                    if isinstance(event, ConnectionClosed):
                        break
                out = client.data_to_send()
                if out:
                    writer.write(out)
                    await writer.drain()
                if not data and not client.ready:
                    raise ConnectionResetError("downstream closed during the handshake")
        except BaseException:
            writer.close()
            raise
        return _Connection(server, reader, writer, client)
