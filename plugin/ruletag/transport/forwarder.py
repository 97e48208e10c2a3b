"""Downstream forward-protocol client: send chunks, wait for acks, retry and fail over.

One :class:`Forwarder` owns every downstream server of a pipeline. ``send(chunk)`` encodes the
chunk once as PackedForward with a fresh chunk id, then keeps resending that same frame (same
id, so downstream can dedupe) until a server acks it: round-robin over healthy active servers,
standby servers only while no active one is healthy, exponential backoff with jitter per server
(reset as soon as the server answers: a connect/handshake or an ack). Chunks are pipelined on
one keepalive connection per server and acks are matched by id.

Poison chunks (a chunk the downstream rejects while it accepts the others):

- A connection that dies with several chunks in flight charges none of them: they become
  *suspects* and are resent one at a time on a separate *isolation* connection, so the
  innocent ones are acked and a poison chunk no longer tears down the shared connection.
- A failure is charged to a chunk (a *reject*) only when it was alone on the connection (it
  was closed on it, or it was not acked in time) and the downstream acked other chunks
  meanwhile; a down or broken downstream is never blamed on a chunk.
- A chunk that failed alone waits before its next try: exponential per chunk, with jitter,
  capped at ``retry_backoff_max``.
- After ``max_rejects`` rejects the chunk is written durably to the dead-letter folder
  (``ruletag.transport.deadletter``) and ``send`` returns. If that folder cannot be written (or
  ``max_rejects`` is 0) the chunk keeps being retried with growing delay; never dropped.

Healing bound: once a downstream that refused connections listens again, the first delivery
follows within ``retry_backoff_max`` + the connect/handshake time + one round trip.
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

from ruletag import protocol
from ruletag.config.model import ForwardConfig, ForwardTLS
from ruletag.errors import AuthenticationError, ProtocolError, RuletagError
from ruletag.protocol import Ack, Chunk, ConnectionClosed
from ruletag.transport import deadletter

log = logging.getLogger(__name__)

#: Most chunks awaiting an ack on one connection at a time.
MAX_CHUNKS_PER_CONNECTION = 64
_READ_SIZE = 65536
_SEND_ERRORS = (OSError, TimeoutError, ProtocolError, ssl.SSLError)


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


class _NotSent(ConnectionResetError):
    """The connection was already closed before the frame was written: not this chunk's fault."""


class _Stalled(ConnectionAbortedError):
    """We closed a connection whose downstream stopped acking anything."""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no ack before ack_timeout"
    return str(exc) or type(exc).__name__


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Done callback: mark a future's exception as retrieved (no "never retrieved" logs)."""
    if not fut.cancelled():
        fut.exception()


async def _write(writer: asyncio.StreamWriter, data: bytes) -> None:
    """Write and drain; a transport that closed under us raises ConnectionResetError."""
    try:
        writer.write(data)
        await writer.drain()
    except RuntimeError as exc:  # uvloop: "unable to perform operation ...; handler is closed"
        raise ConnectionResetError(str(exc)) from None


class _Connection:
    """One open connection to a downstream: handshake done, acks read by a background task."""

    def __init__(
        self,
        server: _Server,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        client: protocol.ClientConnection,
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.client = client
        self.pending: dict[bytes, asyncio.Future[None]] = {}
        self.slots = asyncio.Semaphore(MAX_CHUNKS_PER_CONNECTION)
        self.closed = False
        self.error: BaseException | None = None
        self.lost_with = 0  # chunks awaiting an ack when the connection failed
        self.last_ack_at = 0.0
        self.reader_task = asyncio.get_running_loop().create_task(self._read_loop())
        self.reader_task.add_done_callback(_retrieve)

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self.reader.read(_READ_SIZE)
                self.client.receive_data(data)
                while (event := self.client.next_event()) is not protocol.NEED_DATA:
                    if isinstance(event, Ack):
                        self._acked(event.chunk_id)
                    elif isinstance(event, ConnectionClosed):
                        raise ConnectionResetError("downstream closed the connection")
                if not data:
                    raise ConnectionResetError("downstream closed the connection")
        except asyncio.CancelledError:
            self._fail(ConnectionAbortedError("connection closed"))
            raise
        except (OSError, ProtocolError, ssl.SSLError) as exc:
            self._fail(exc)
        except Exception as exc:  # a bug must still fail the waiting chunks, not hang them
            log.error("%s: unexpected error reading acks: %r", self.server, exc)
            self._fail(ConnectionAbortedError(f"reader failed: {exc!r}"))

    def _acked(self, chunk_id: bytes) -> None:
        now = time.monotonic()
        self.last_ack_at = now
        self.server.answered(now)
        fut = self.pending.pop(chunk_id, None)
        if fut is None:  # a late ack of a chunk already resent elsewhere
            log.debug("%s: ack for unknown chunk %r", self.server, chunk_id)
        elif not fut.done():
            fut.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        pending = list(self.pending.values())
        self.pending.clear()
        if not self.closed:
            self.lost_with = len(pending)
        for fut in pending:
            if not fut.done():
                fut.set_exception(exc)
        if not self.closed:
            self.closed = True
            self.writer.close()
            if isinstance(exc, _Stalled):
                pass  # the chunk that timed out logs it
            elif pending:
                log.warning(
                    "%s: connection lost with %d chunk(s) unacked: %s",
                    self.server,
                    len(pending),
                    _describe(exc),
                )
            else:
                log.info("%s: connection closed (%s)", self.server, _describe(exc))

    async def send(self, frame: bytes, chunk_id: bytes | None, ack_timeout: float) -> None:
        """Write one frame; with ``chunk_id`` wait for its ack (raises TimeoutError/OSError)."""
        async with self.slots:
            if self.closed:
                raise _NotSent(f"connection to {self.server} is closed")
            fut: asyncio.Future[None] | None = None
            if chunk_id is not None:
                fut = asyncio.get_running_loop().create_future()
                fut.add_done_callback(_retrieve)
                self.pending[chunk_id] = fut
            try:
                await _write(self.writer, frame)
                if fut is not None:
                    await asyncio.wait((fut,), timeout=ack_timeout)
                    if not fut.done():
                        raise TimeoutError(f"no ack within {ack_timeout} s")
                    fut.result()
            finally:
                if chunk_id is not None and self.pending.get(chunk_id) is fut:
                    del self.pending[chunk_id]
                if fut is not None and not fut.done():
                    fut.cancel()

    async def aclose(self) -> None:
        """Close the socket and stop the reader task."""
        self._fail(ConnectionAbortedError("connection closed"))  # at once: no new sends on it
        self.reader_task.cancel()
        with contextlib.suppress(BaseException):
            await self.reader_task
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)


@dataclass(eq=False)
class _Server:
    """A downstream node: its settings, health, shared connection and isolation connection."""

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
    last_ack_at: float = 0.0
    conn: _Connection | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    probe: _Connection | None = None  # the isolation connection: one suspect at a time
    probe_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    isolating: int = 0  # deliveries using or waiting for the isolation connection

    def __str__(self) -> str:
        return f"downstream {self.name}"

    def healthy(self, now: float) -> bool:
        return self.failures == 0 or now >= self.retry_at

    def answered(self, now: float, *, ack: bool = True) -> None:
        """The server answered (an ack, or a connect/handshake): reset its backoff."""
        if ack:
            self.last_ack_at = now
        if self.failures:
            log.info("%s is healthy again", self)
        self.failures = 0
        self.retry_at = 0.0


@dataclass(eq=False)
class _Delivery:
    """One chunk on its way: its frame and what its failed tries say about it."""

    chunk: Chunk
    frame: bytes
    chunk_id: bytes | None
    attempts: int = 0  # failed attempts of any kind (``retry_limit``)
    tries: int = 0  # failures while alone on a connection (per-chunk delay)
    rejects: int = 0  # failures charged to this chunk (``max_rejects``)
    suspect: bool = False  # on a connection that died with others: resend in isolation
    since: float = field(default_factory=time.monotonic)  # evidence window start
    not_before: float = 0.0
    stuck_logged: bool = False

    @property
    def isolated(self) -> bool:
        return self.suspect or self.tries > 0

    @property
    def label(self) -> str:
        ident = self.chunk_id.decode("ascii", "replace") if self.chunk_id else "-"
        return f"chunk {ident} (tag {self.chunk.tag!r}, {self.chunk.count} records)"


class Forwarder:
    """Sends chunks downstream with acks, pipelining, retry and failover. Never drops silently.

    Counters for metrics: ``chunks_sent``, ``records_sent``, ``bytes_sent`` (acked or, without
    ``require_ack``, written), ``acks``, ``retries``, ``ack_timeouts``, ``connects``,
    ``connect_failures``, ``rejects`` (failures charged to a chunk), ``dead_letters`` (chunks
    set aside); ``servers_up`` and ``in_flight_bytes`` are live gauges.
    """

    def __init__(self, config: ForwardConfig) -> None:
        self.config = config
        self.require_ack = config.require_ack
        self.retry_limit = config.retry_limit
        self.dead_letter_path = config.dead_letter_path or deadletter.default_dir()
        self.in_flight_bytes = 0
        self.chunks_sent = 0
        self.records_sent = 0
        self.bytes_sent = 0
        self.acks = 0
        self.retries = 0
        self.ack_timeouts = 0
        self.connects = 0
        self.connect_failures = 0
        self.rejects = 0
        self.dead_letters = 0
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
            for conn in (server.conn, server.probe):
                if conn is not None:
                    await conn.aclose()
            server.conn = server.probe = None

    @property
    def servers_up(self) -> int:
        """Servers not currently backing off after a failure."""
        now = time.monotonic()
        return sum(1 for s in self._servers if s.healthy(now))

    # -- sending ---------------------------------------------------------------------------

    def _encode(self, chunk: Chunk, chunk_id: bytes | None) -> bytes:
        entries = chunk.entries
        if chunk.signal == 0 and chunk.v2 and self.config.entry_format != "v2":
            entries = protocol.entries_to_v1(entries, chunk.spans)
        return protocol.encode_chunk(
            chunk.tag,
            entries,
            chunk.count,
            chunk_id=chunk_id,
            compress=self.config.compress and chunk.signal == 0,
            signal=chunk.signal,
        )

    async def send(self, chunk: Chunk) -> None:
        """Deliver ``chunk``; return once downstream acked it (or, without acks, once written),
        or once it was written to the dead-letter folder after ``max_rejects`` rejects.

        Retries forever unless ``retry_limit`` is set, in which case :class:`DeliveryError`
        is raised after that many failed retries. Also raised if the forwarder is closed.
        """
        if self._closing or self._space is None:
            raise DeliveryError("forwarder is not running")
        chunk_id = protocol.new_chunk_id() if self.require_ack else None
        frame = self._encode(chunk, chunk_id)
        size = len(frame)
        async with self._space:
            await self._space.wait_for(
                lambda: (
                    self._closing
                    or self.in_flight_bytes == 0
                    or self.in_flight_bytes + size <= self.config.max_in_flight_bytes
                )
            )
            if self._closing:
                raise DeliveryError("forwarder closed before the chunk could be sent")
            self.in_flight_bytes += size
        self._sending += 1
        delivery = _Delivery(chunk, frame, chunk_id)
        inner = asyncio.get_running_loop().create_task(self._deliver(delivery))
        inner.add_done_callback(_retrieve)
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

    async def _deliver(self, d: _Delivery) -> None:
        while True:
            wait = d.not_before - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            server = await self._pick()
            conn: _Connection | None = None
            sent_at = 0.0
            try:
                if d.isolated:
                    async with self._isolation(server):
                        conn = await self._probe_connection(server)
                        sent_at = time.monotonic()
                        await self._send_on(conn, d.frame, d.chunk_id)
                else:
                    conn = await self._connection(server)
                    sent_at = time.monotonic()
                    await self._send_on(conn, d.frame, d.chunk_id)
            except (_ServerDown, _NotSent):
                continue
            except _SEND_ERRORS as exc:
                if await self._failed(server, conn, d, exc, sent_at):
                    return  # dead-lettered
                continue
            self.chunks_sent += 1
            self.records_sent += d.chunk.count
            self.bytes_sent += len(d.frame)
            if d.chunk_id is not None:
                self.acks += 1
            return

    @contextlib.asynccontextmanager
    async def _isolation(self, server: _Server) -> Any:
        """Hold the server's isolation lane; a failure closes the isolation connection before
        the next suspect can use it, and the last user closes it when done."""
        server.isolating += 1
        try:
            async with server.probe_lock:
                try:
                    yield
                except _SEND_ERRORS as exc:
                    probe, server.probe = server.probe, None
                    if probe is not None and not probe.closed:
                        probe._fail(_Stalled(_describe(exc)))
                    raise
        finally:
            server.isolating -= 1
            if server.isolating == 0 and server.probe is not None:
                idle, server.probe = server.probe, None
                await idle.aclose()

    async def _probe_connection(self, server: _Server) -> _Connection:
        """The server's isolation connection, opened if needed."""
        if not self.config.keepalive:
            return await self._connect(server)
        if server.probe is None or server.probe.closed:
            server.probe = None
            server.probe = await self._reconnect(server)
        return server.probe

    async def _reconnect(self, server: _Server) -> _Connection:
        """A new connection to ``server``; refused while it backs off after a failure."""
        if not server.healthy(time.monotonic()):
            raise _ServerDown(str(server))
        return await self._connect(server)

    # -- failures: the server's, or the chunk's ---------------------------------------------

    async def _failed(
        self,
        server: _Server,
        conn: _Connection | None,
        d: _Delivery,
        exc: BaseException,
        sent_at: float,
    ) -> bool:
        """Judge one failed try of ``d``; True once it was dead-lettered (done).

        Raises :class:`DeliveryError` when ``retry_limit`` is reached.
        """
        d.attempts += 1
        now = time.monotonic()
        rejected: str | None = None
        if isinstance(exc, TimeoutError):
            self.ack_timeouts += 1
        if conn is None or isinstance(exc, AuthenticationError):
            self._mark_failed(server, conn, exc)  # connect/handshake: the server's fault
        elif isinstance(exc, _Stalled):
            pass  # another chunk's ack timeout closed the connection; it marked the server
        elif not d.isolated and conn.lost_with > 1 and not isinstance(exc, TimeoutError):
            d.suspect = True  # died with others in flight: resend alone before blaming it
        else:
            rejected = self._judge_alone(server, conn, d, exc, sent_at)
        d.since = now
        if rejected is not None:
            d.rejects += 1
            self.rejects += 1
            log.info(
                "forward: %s rejected by %s (%d of max_rejects %d): %s",
                d.label,
                server,
                d.rejects,
                self.config.max_rejects,
                rejected,
            )
            if await self._maybe_dead_letter(server, d, rejected):
                return True
        if self.retry_limit is not None and d.attempts > self.retry_limit:
            msg = f"giving up on {d.label} after {d.attempts} attempts: {_describe(exc)}"
            log.error("forward: %s", msg)
            raise DeliveryError(msg) from exc
        self.retries += 1
        if rejected is None:
            log.info(
                "forward: %s to %s failed (%s); retry %d%s",
                d.label,
                server,
                _describe(exc),
                d.attempts,
                " alone" if d.isolated else "",
            )
        return False

    def _judge_alone(
        self,
        server: _Server,
        conn: _Connection,
        d: _Delivery,
        exc: BaseException,
        sent_at: float,
    ) -> str | None:
        """A failure of ``d`` alone on ``conn`` (or an unacked chunk among acked ones): the
        reason to charge it as a reject, or None when the downstream itself looks broken."""
        timeout = isinstance(exc, TimeoutError)
        last_ack = server.last_ack_at if d.isolated else conn.last_ack_at
        evidence = last_ack > (sent_at if timeout else d.since)
        if timeout and not evidence:
            self._mark_failed(server, conn, exc)  # the downstream stopped acking altogether
            return None
        self._grow_delay(d)
        if evidence:
            if timeout:
                return "no ack within ack_timeout while the downstream acked other chunks"
            return f"the downstream closed the connection on it ({_describe(exc)})"
        self._mark_failed(server, conn, exc)
        if d.tries >= max(self.config.max_rejects, 1) and not d.stuck_logged:
            d.stuck_logged = True
            log.warning(
                "forward: %s failed alone %d times (%s) while %s acked nothing else: "
                "not counted as rejects (a broken downstream is not the chunk's fault); "
                "retrying with growing delay",
                d.label,
                d.tries,
                _describe(exc),
                server,
            )
        return None

    def _grow_delay(self, d: _Delivery) -> None:
        """Count a try of ``d`` alone and set its next try: exponential, jitter, capped."""
        d.tries += 1
        cfg = self.config
        delay = min(cfg.retry_backoff_max, cfg.retry_backoff_base * 2 ** (d.tries - 1))
        d.not_before = time.monotonic() + delay / 2 + random.uniform(0, delay / 2)

    async def _maybe_dead_letter(self, server: _Server, d: _Delivery, reason: str) -> bool:
        """Set ``d`` aside once it reached ``max_rejects``; True when its file is durable."""
        limit = self.config.max_rejects
        if d.rejects < limit:
            return False
        if limit == 0:
            if d.rejects == 1:
                log.warning(
                    "forward: %s is rejected by the downstream; dead letters are off "
                    "(forward.max_rejects: 0): retrying with growing delay",
                    d.label,
                )
            return False
        why = f"rejected {d.rejects} times by {server}; last: {reason}"
        try:
            path = await asyncio.to_thread(
                deadletter.write,
                self.dead_letter_path,
                d.chunk,
                d.chunk_id,
                reason=why,
                tries=d.attempts,
                downstream=server.name,
            )
        except OSError as exc:
            if d.rejects == limit:
                log.error(
                    "forward: %s: cannot write a dead letter in %s (%s); it is kept and "
                    "retried with growing delay",
                    d.label,
                    self.dead_letter_path,
                    exc,
                )
            return False
        self.dead_letters += 1
        log.warning("forward: %s set aside as dead letter %s: %s", d.label, path, why)
        return True

    def _mark_failed(self, server: _Server, conn: _Connection | None, exc: BaseException) -> None:
        """Back ``server`` off after a failed send; drop ``conn``, the connection that failed.

        Only that connection is dropped: by now ``server.conn`` may be a newer connection
        that another chunk opened after the failure, which must not be torn down.
        """
        now = time.monotonic()
        if conn is not None and (conn.closed or isinstance(exc, TimeoutError)):
            if server.conn is conn:
                server.conn = None
            conn._fail(_Stalled(_describe(exc)) if isinstance(exc, TimeoutError) else exc)
        if server.failures and now < server.retry_at:
            return  # already backing off: chunks failing together count as one failure
        server.failures += 1
        cfg = self.config
        delay = min(cfg.retry_backoff_max, cfg.retry_backoff_base * 2 ** (server.failures - 1))
        delay = delay / 2 + random.uniform(0, delay / 2)
        server.retry_at = now + delay
        if isinstance(exc, AuthenticationError):
            log.error(
                "%s refused our handshake (check shared_key, username, password and "
                "self_hostname): %s",
                server,
                exc,
            )
        elif server.failures == 1:
            log.warning("%s marked down: %s", server, _describe(exc))

    # -- connections -----------------------------------------------------------------------

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

    async def _connection(self, server: _Server) -> _Connection:
        """The server's keepalive connection (opened if needed), or a fresh one without
        keepalive."""
        if not self.config.keepalive:
            return await self._connect(server)
        async with server.lock:
            if server.conn is None or server.conn.closed:
                server.conn = None
                server.conn = await self._reconnect(server)
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
        server.answered(time.monotonic(), ack=False)
        log.info("%s: connected to %s:%d", server, server.host, server.port)
        return conn

    async def _open(self, server: _Server) -> _Connection:
        reader, writer = await asyncio.open_connection(
            server.host,
            server.port,
            ssl=server.ssl_context,
            server_hostname=(server.server_hostname or server.host) if server.ssl_context else None,
            limit=_READ_SIZE * 4,
        )
        client = protocol.ClientConnection(
            shared_key=server.shared_key,
            username=server.username,
            password=server.password,
            hostname=self.config.self_hostname,
        )
        try:
            while not client.ready:
                data = await reader.read(_READ_SIZE)
                client.receive_data(data)
                while (event := client.next_event()) is not protocol.NEED_DATA:
                    if isinstance(event, ConnectionClosed):
                        break
                out = client.data_to_send()
                if out:
                    await _write(writer, out)
                if not data and not client.ready:
                    raise ConnectionResetError("downstream closed during the handshake")
        except BaseException:
            writer.close()
            raise
        return _Connection(server, reader, writer, client)
