"""The forward-protocol input: an asyncio server with one sans-IO codec per connection.

Each accepted connection gets a :class:`ForwardProtocol` holding a ``protocol.ServerConnection``.
For every decoded ``Chunk`` the injected ``submit(chunk)`` coroutine (the pipeline) runs as a
task; an ack-writer per connection awaits those tasks in arrival order and writes
``{"ack": id}`` after each returns, so acks leave in order and only after ``submit`` is done.
If ``submit`` raises, no ack is sent and the connection is closed (the sender retries).

Limits (``ListenConfig``): connections beyond ``max_connections`` are closed at accept;
reading pauses while the bytes submitted-but-not-done on a connection exceed
``max_in_flight_bytes`` (or, over all connections, ``max_total_in_flight_bytes``) and resumes
below; ``idle_timeout`` closes silent connections with nothing in flight; frames larger than
``max_frame_size`` are a protocol error. A protocol error closes that connection only.

Slow and unauthenticated peers: with a shared key, a connection must pass the handshake
within ``handshake_timeout`` and may buffer at most ``max_unauthenticated_bytes`` before it
does. Once a message has started, it must be complete within ``frame_timeout`` plus one
second per ``min_frame_rate`` bytes received (the allowance of Apache's mod_reqtimeout
``MinRate``), so a peer dripping bytes loses its slot while a large message on a slow link
still completes; time spent paused by backpressure does not count. A message of
``DECODE_OFF_LOOP_BYTES`` or more is decoded in a worker thread (reading paused meanwhile),
so one huge chunk does not stall the other connections. When a connection that buffered a
large message closes, its codec is dropped and freed heap is handed back to the OS
(``malloc_trim``, glibc only, at most once per ``TRIM_INTERVAL``).

Graceful shutdown (``stop``): close the listeners, stop reading, wait up to the timeout for
in-flight chunks to be acked, then close every connection and cancel what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import ssl
import stat
import time
import traceback
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, cast

from ruletag import protocol
from ruletag.config.model import ListenConfig, ListenTLS
from ruletag.errors import AuthenticationError, RemoteProtocolError
from ruletag.heap import malloc_trim
from ruletag.protocol import Authenticated, Chunk, ConnectionClosed, Heartbeat

log = logging.getLogger(__name__)

Submit = Callable[[Chunk], Awaitable[None]]

#: Log refused connections at most once per this many seconds (one line per burst).
REFUSE_LOG_INTERVAL = 10.0
#: A connection holding this many undecoded bytes decodes in a worker thread.
DECODE_OFF_LOOP_BYTES = 512 * 1024
#: Hand freed heap back to the OS after a connection that buffered this much closes.
TRIM_AFTER_BYTES = 1024 * 1024
#: At most one ``malloc_trim`` per this many seconds.
TRIM_INTERVAL = 1.0


def build_server_ssl_context(tls: ListenTLS) -> ssl.SSLContext:
    """Server TLS context: our cert/key; verify client certs against ``ca_file`` if given."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.ca_file:
        ctx.load_verify_locations(cafile=tls.ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.client_cert_required else ssl.CERT_OPTIONAL
    return ctx


class ServerStats:
    """Plain counters (the metrics issue exports them)."""

    def __init__(self) -> None:
        self.connections_accepted = 0
        self.connections_refused = 0
        self.chunks = 0
        self.records = 0
        self.bytes_in = 0
        self.acks_sent = 0
        self.protocol_errors = 0
        self.auth_failures = 0
        self.submit_errors = 0
        self.idle_closed = 0
        self.handshake_timeouts = 0  # closed: no handshake within listen.handshake_timeout
        self.unauthenticated_overflows = 0  # closed: over listen.max_unauthenticated_bytes
        self.slow_frames = 0  # closed: a message arrived slower than listen.min_frame_rate
        self.decodes_off_loop = 0  # decode steps run in the worker thread
        self.memory_trims = 0  # malloc_trim calls after large connections closed


class _Pending:
    """One chunk submitted but not yet acked."""

    __slots__ = ("chunk_id", "size", "task")

    def __init__(self, task: asyncio.Task[None], chunk_id: bytes | None, size: int) -> None:
        self.task = task
        self.chunk_id = chunk_id
        self.size = size


class ForwardProtocol(asyncio.Protocol):
    """One forward-protocol connection: codec in, pipeline submits, ordered acks out."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.conn: protocol.ServerConnection | None = None
        self.peer = "?"
        self.refused = False
        self.closing = False
        self.read_paused = False
        self.eof = False
        self.backlog = False
        self.bytes_in = 0
        self.in_flight = 0
        self.pending: deque[_Pending] = deque()
        self.wakeup = asyncio.Event()
        self.ack_task: asyncio.Task[None] | None = None
        self.last_activity = time.monotonic()
        self.idle_handle: asyncio.TimerHandle | None = None
        self.close_reason: str | None = None  # why we closed it (None: the peer did)
        self.chunks = 0
        self.authenticated = server.config.shared_key is None
        self.handshake_handle: asyncio.TimerHandle | None = None
        self.frames = 0  # events the codec returned (frames complete)
        self.frame_start: float | None = None  # when the message in progress started
        self.frame_bytes = 0  # its bytes received so far
        self.frame_frames = 0  # ``frames`` when it started
        self.frame_handle: asyncio.TimerHandle | None = None
        self.peak_buffered = 0
        self.decoding = False  # a worker thread owns the codec
        self.held: list[bytes] = []  # bytes received while it does (b"": EOF)

    # -- asyncio callbacks ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, but have its methods.
        self.transport = cast(asyncio.Transport, transport)
        transport = self.transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peer = f"{peer[0]}:{peer[1]}"
        elif peer:
            self.peer = str(peer)
        else:
            self.peer = "unix"
        srv = self.server
        if srv.closing or len(srv.connections) >= srv.config.max_connections:
            self.refused = True
            srv.note_refused(self.peer)
            transport.abort()
            return
        srv.connections.add(self)
        srv.stats.connections_accepted += 1
        cfg = srv.config
        try:
            self.conn = protocol.ServerConnection(
                shared_key=cfg.shared_key.encode() if cfg.shared_key is not None else None,
                users={u.username.encode(): u.password.encode() for u in cfg.users} or None,
                hostname=cfg.self_hostname,
                tag_prefix=cfg.tag_prefix,
                max_frame_size=cfg.max_frame_size,
                max_inflate_size=cfg.max_inflate_size,
                max_inflate_members=cfg.max_inflate_members,
                nonce=srv.nonce,
                auth_salt=srv.auth_salt,
            )
            first = self.conn.initial_bytes()
        except Exception:
            log.exception("cannot set up connection from %s", self.peer)
            self._close(abort=True, reason="connection setup failed")
            return
        if first:
            transport.write(first)
        loop = asyncio.get_running_loop()
        self.ack_task = loop.create_task(self._ack_loop())
        srv.working.add(self)
        if cfg.idle_timeout > 0:
            self._schedule_idle(cfg.idle_timeout)
        if not self.authenticated and cfg.handshake_timeout > 0:
            self.handshake_handle = loop.call_later(cfg.handshake_timeout, self._handshake_expired)
        log.debug("connection from %s", self.peer)

    def data_received(self, data: bytes) -> None:
        if self.closing or self.conn is None:
            return
        self.bytes_in += len(data)
        self.server.stats.bytes_in += len(data)
        self.last_activity = time.monotonic()
        if self.decoding:
            self.held.append(data)
            return
        self._feed(data)
        self._track_frame(len(data))

    def eof_received(self) -> bool | None:
        self.eof = True
        if self.decoding:
            self.held.append(b"")
        elif not self.closing and self.conn is not None:
            self._feed(b"")
            self._maybe_finish()
        if self.closing:
            return None
        # Keep the write side open until the pending acks are written (not possible on TLS).
        return self.transport is not None and self.transport.get_extra_info("sslcontext") is None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self._cancel_timers()
        if self.refused:
            return
        self._release_codec()
        self.wakeup.set()
        if self.read_paused:
            self.server.paused.discard(self)
        self.server.connections.discard(self)
        reason = self.close_reason or (f"connection lost: {exc}" if exc else "closed by peer")
        extra = {
            "event": "connection_closed",
            "peer": self.peer,
            "reason": reason,
            "bytes_in": self.bytes_in,
            "chunks": self.chunks,
        }
        if self.bytes_in == 0 and self.close_reason is None and exc is None:
            log.debug("empty connection from %s closed (heartbeat)", self.peer, extra=extra)
        else:
            log.info("connection from %s closed: %s", self.peer, reason, extra=extra)
        # Chunks already submitted keep going (they were accepted); the ack loop ends when
        # they are done and releases their in-flight bytes.

    # -- input --------------------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        assert self.conn is not None
        hook = self.server.on_decode
        start = time.perf_counter() if hook is not None else 0.0
        try:
            self.conn.receive_data(data)
        except Exception as exc:
            self._on_error(exc)
            return
        self.peak_buffered = max(self.peak_buffered, self.conn.buffered_bytes)
        if not self.authenticated and self._over_unauthenticated_limit(self.conn):
            return
        self._process()
        if hook is not None:
            hook(time.perf_counter() - start)

    def _over_unauthenticated_limit(self, conn: protocol.ServerConnection) -> bool:
        """Close (and return True) when a peer not yet authenticated buffers too much."""
        limit = self.server.config.max_unauthenticated_bytes
        buffered = conn.buffered_bytes
        if buffered <= limit:
            return False
        self.server.stats.unauthenticated_overflows += 1
        log.warning(
            "closing connection from %s: %d bytes before the handshake "
            "(listen.max_unauthenticated_bytes %d)",
            self.peer,
            buffered,
            limit,
        )
        self._close(
            abort=True,
            reason=f"{buffered} bytes before the handshake (listen.max_unauthenticated_bytes)",
        )
        return True

    def _process(self) -> None:
        """Pull events from the codec; stop early while reading is paused (backpressure)."""
        conn = self.conn
        if conn is None or self.closing:
            return
        self.backlog = False
        try:
            while True:
                if self.read_paused and not self.server.closing:
                    self.backlog = True  # bytes stay in the codec until we resume
                    break
                if self.authenticated and conn.buffered_bytes >= DECODE_OFF_LOOP_BYTES:
                    self._decode_off_loop(conn)
                    return
                event = conn.next_event()
                if event is protocol.NEED_DATA:
                    break
                if not self._on_event(conn, event):
                    return
            self._flush(conn)
        except Exception as exc:
            self._on_error(exc)

    def _on_event(self, conn: protocol.ServerConnection, event: object) -> bool:
        """Act on one codec event; False when the stream ended (stop processing)."""
        self.frames += 1
        if isinstance(event, Chunk):
            self._on_chunk(event)
        elif isinstance(event, ConnectionClosed):
            self.eof = True
            self._flush(conn)
            self._maybe_finish()
            return False
        elif isinstance(event, Authenticated):
            self.authenticated = True
            if self.handshake_handle is not None:
                self.handshake_handle.cancel()
                self.handshake_handle = None
            log.debug(
                "%s authenticated as %r (%s)",
                self.peer,
                event.hostname,
                event.username or "no user",
            )
        elif isinstance(event, Heartbeat):
            pass
        self._flush(conn)
        return True

    # -- large messages: decode in a worker thread -------------------------------------------

    def _decode_off_loop(self, conn: protocol.ServerConnection) -> None:
        """Run one ``next_event`` in the server's decode thread; reading pauses meanwhile."""
        assert self.transport is not None
        self.decoding = True
        self.server.stats.decodes_off_loop += 1
        if not self.read_paused:
            self.transport.pause_reading()
        future = self.server.decoder().submit(_timed_next_event, conn)
        loop = asyncio.get_running_loop()
        future.add_done_callback(lambda f: _call_soon(loop, self._decoded, conn, f))

    def _decoded(
        self, conn: protocol.ServerConnection, future: Future[tuple[object, float]]
    ) -> None:
        """Back on the loop: act on the decoded event, then on what arrived meanwhile."""
        self.decoding = False
        if self.closing or self.conn is not conn:
            self.held.clear()
            return
        try:
            event, seconds = future.result()
        except Exception as exc:
            self._on_error(exc)
            return
        if self.server.on_decode is not None:
            self.server.on_decode(seconds)
        if self.transport is not None and not self.read_paused:
            self.transport.resume_reading()
        if event is not protocol.NEED_DATA:
            if not self._on_event(conn, event):
                return
            self._process()
        else:
            self._flush(conn)
        received = 0
        while self.held and not self.decoding and not self.closing:
            data = self.held.pop(0)
            received += len(data)
            self._feed(data)
            if not data:
                self._maybe_finish()
        self._track_frame(received)

    # -- slow peers ---------------------------------------------------------------------------

    def _handshake_expired(self) -> None:
        self.handshake_handle = None
        if self.closing or self.authenticated:
            return
        timeout = self.server.config.handshake_timeout
        self.server.stats.handshake_timeouts += 1
        log.warning("closing connection from %s: no handshake within %g s", self.peer, timeout)
        self._close(reason=f"no handshake within {timeout:g} s (listen.handshake_timeout)")

    def _track_frame(self, received: int) -> None:
        """Start, extend or stop the deadline of the message in progress after a read."""
        conn = self.conn
        cfg = self.server.config
        if conn is None or self.closing or not self.authenticated or cfg.frame_timeout <= 0:
            return
        if self.decoding:
            if self.frame_start is not None:
                self.frame_bytes += received
            return
        if self.read_paused or self.backlog:  # we stopped reading, not the peer
            self.frame_start = None
            return
        buffered = conn.buffered_bytes
        if buffered == 0:
            self.frame_start = None
            return
        if self.frame_start is None or self.frames != self.frame_frames:
            self.frame_start = time.monotonic()
            self.frame_bytes = buffered
            self.frame_frames = self.frames
        else:
            self.frame_bytes += received
        if self.frame_handle is None:
            self._schedule_frame_check()

    def _frame_deadline(self) -> float:
        assert self.frame_start is not None
        cfg = self.server.config
        return self.frame_start + cfg.frame_timeout + self.frame_bytes / cfg.min_frame_rate

    def _schedule_frame_check(self) -> None:
        delay = self._frame_deadline() - time.monotonic()
        loop = asyncio.get_running_loop()
        self.frame_handle = loop.call_later(max(delay, 0.05), self._frame_check)

    def _frame_check(self) -> None:
        self.frame_handle = None
        if self.closing or self.frame_start is None:
            return
        if self.read_paused or self.backlog:
            self.frame_start = None
            return
        if self.decoding or time.monotonic() < self._frame_deadline():
            self._schedule_frame_check()  # a decode in progress: check again after it
            return
        cfg = self.server.config
        took = time.monotonic() - self.frame_start
        self.server.stats.slow_frames += 1
        log.warning(
            "closing connection from %s: %d bytes of a message in %.1f s (below "
            "listen.min_frame_rate %d B/s after listen.frame_timeout %g s)",
            self.peer,
            self.frame_bytes,
            took,
            cfg.min_frame_rate,
            cfg.frame_timeout,
        )
        self._close(
            abort=True,
            reason=f"message too slow: {self.frame_bytes} bytes in "
            f"{took:.1f} s (listen.min_frame_rate)",
        )

    def _on_error(self, exc: Exception) -> None:
        conn = self.conn
        assert conn is not None
        asyncio.get_running_loop().call_soon(_forget_frames, exc)  # once its frames returned
        if isinstance(exc, AuthenticationError):
            self.server.stats.auth_failures += 1
            log.warning("authentication failed from %s: %s", self.peer, exc)
            self._flush(conn)
            self._close(reason=f"authentication failed: {exc}")
        elif isinstance(exc, RemoteProtocolError):
            self.server.stats.protocol_errors += 1
            log.warning("protocol error from %s, closing: %s", self.peer, exc)
            self._flush(conn)
            self._close(reason=f"protocol error: {exc}")
        else:
            self.server.stats.protocol_errors += 1
            log.error("unexpected error on connection from %s, closing", self.peer, exc_info=exc)
            self._close(abort=True, reason=f"internal error: {type(exc).__name__}: {exc}")

    def _flush(self, conn: protocol.ServerConnection) -> None:
        out = conn.data_to_send()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)

    def _on_chunk(self, chunk: Chunk) -> None:
        srv = self.server
        srv.stats.chunks += 1
        srv.stats.records += chunk.count
        self.chunks += 1
        size = chunk.size or len(chunk.entries)
        task: asyncio.Task[None] = asyncio.ensure_future(srv.submit(chunk))
        self.pending.append(_Pending(task, chunk.chunk_id, size))
        self.in_flight += size
        srv.in_flight += size
        srv.pending_chunks += 1
        srv.idle.clear()
        self.wakeup.set()
        self.update_flow()
        if srv.in_flight > srv.config.max_total_in_flight_bytes:
            srv.update_all_flow()

    # -- acks ---------------------------------------------------------------------------------

    async def _ack_loop(self) -> None:
        """Await submits in arrival order; write each ack after its submit returned."""
        srv = self.server
        try:
            while True:
                while not self.pending:
                    if self.closing or self._maybe_finish():
                        return
                    self.wakeup.clear()
                    await self.wakeup.wait()
                item = self.pending[0]
                failed = False
                try:
                    await asyncio.shield(item.task)
                except asyncio.CancelledError:
                    if not item.task.cancelled():
                        raise
                    failed = True
                except Exception as exc:
                    failed = True
                    srv.stats.submit_errors += 1
                    log.error(
                        "chunk from %s not delivered, closing without ack: %s", self.peer, exc
                    )
                self.pending.popleft()
                self._release(item)
                if failed:
                    self._close(reason="a chunk could not be delivered (not acked)")
                    self._drain_failed()
                    return
                if item.chunk_id is not None and not self.closing and self.conn is not None:
                    assert self.transport is not None
                    self.transport.write(self.conn.ack(item.chunk_id))
                    srv.stats.acks_sent += 1
        finally:
            self._drain_failed()
            srv.working.discard(self)

    def _drain_failed(self) -> None:
        """Release what is left when the ack loop ends (tasks keep running on their own)."""
        while self.pending:
            item = self.pending.popleft()
            if item.task.done():
                self._release(item)
            else:
                item.task.add_done_callback(functools.partial(self._release_done, item))

    def _release_done(self, item: _Pending, _task: asyncio.Task[None]) -> None:
        self._release(item)

    def _release(self, item: _Pending) -> None:
        if item.size < 0:
            return
        srv = self.server
        self.in_flight -= item.size
        srv.in_flight -= item.size
        item.size = -1
        srv.pending_chunks -= 1
        if srv.pending_chunks == 0:
            srv.idle.set()
        if not item.task.cancelled() and item.task.done():
            item.task.exception()  # mark retrieved
        self.update_flow()
        for proto in list(srv.paused):
            proto.update_flow()

    def _maybe_finish(self) -> bool:
        """After EOF with nothing pending, close; return True when closed."""
        if (
            self.eof
            and not self.pending
            and not self.backlog
            and not self.decoding
            and not self.held
            and not self.closing
        ):
            self._close(reason=None)  # the peer ended the stream: "closed by peer"
            return True
        return False

    # -- flow control, idle, close ----------------------------------------------------------

    def update_flow(self) -> None:
        """Pause reading while in-flight bytes exceed the limits; resume below them."""
        if self.transport is None or self.closing:
            return
        srv = self.server
        over = (
            self.in_flight > srv.config.max_in_flight_bytes
            or srv.in_flight > srv.config.max_total_in_flight_bytes
            or srv.closing
        )
        if over and not self.read_paused:
            self.read_paused = True
            srv.paused.add(self)
            if not self.decoding:
                self.transport.pause_reading()
        elif not over and self.read_paused:
            self.read_paused = False
            srv.paused.discard(self)
            if self.decoding:
                pass  # the decode thread's callback resumes reading
            elif self.backlog:
                # Decode what is already buffered before reading more: resuming the socket
                # now would read a whole socket buffer per chunk submitted, and the codec
                # buffer would grow without bound while the pipeline is slow.
                asyncio.get_running_loop().call_soon(self._process_then_resume)
            else:
                self.transport.resume_reading()

    def _process_then_resume(self) -> None:
        """Work off the backlog; resume reading only if that did not pause us again."""
        self._process()
        if (
            self.transport is not None
            and not self.closing
            and not self.read_paused
            and not self.decoding
        ):
            self.transport.resume_reading()

    def _schedule_idle(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        self.idle_handle = loop.call_later(max(delay, 0.01), self._idle_check)

    def _idle_check(self) -> None:
        if self.closing:
            return
        timeout = self.server.config.idle_timeout
        quiet = time.monotonic() - self.last_activity
        if quiet >= timeout and not self.pending:
            self.server.stats.idle_closed += 1
            log.info("closing idle connection from %s after %.0f s", self.peer, quiet)
            self._close(reason=f"idle for {quiet:.0f} s (listen.idle_timeout)")
            return
        self._schedule_idle(timeout - quiet if quiet < timeout else timeout)

    def _close(self, *, abort: bool = False, reason: str | None = None) -> None:
        if self.closing:
            return
        self.closing = True
        self.close_reason = reason
        self.wakeup.set()
        self._cancel_timers()
        if self.read_paused:
            self.read_paused = False
            self.server.paused.discard(self)
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()

    def _cancel_timers(self) -> None:
        for handle in (self.idle_handle, self.handshake_handle, self.frame_handle):
            if handle is not None:
                handle.cancel()
        self.handshake_handle = self.frame_handle = None

    def _release_codec(self) -> None:
        """Drop the codec and its buffers; trim the heap after a large one."""
        conn, self.conn = self.conn, None
        self.held.clear()
        if conn is not None:
            self.peak_buffered = max(self.peak_buffered, conn.buffered_bytes)
        if self.peak_buffered >= TRIM_AFTER_BYTES:
            self.server.trim_memory_soon()


def _forget_frames(exc: BaseException) -> None:
    """Clear the finished frames of ``exc`` and its causes: the codec keeps its error, and
    the frames' locals would keep the codec (and its buffers) alive in a reference cycle."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if e.__traceback__ is not None:
            traceback.clear_frames(e.__traceback__)
        todo += (e.__cause__, e.__context__)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    """``call_soon_threadsafe`` that does nothing once the loop is closed (at shutdown)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


def _timed_next_event(conn: protocol.ServerConnection) -> tuple[object, float]:
    """``conn.next_event()`` and the seconds it took (runs in the decode thread)."""
    start = time.perf_counter()
    event = conn.next_event()
    return event, time.perf_counter() - start


class Server:
    """Listens for forward-protocol input and hands every chunk to ``submit``.

    ``nonce``/``auth_salt`` fix the HELO values (tests replaying recorded handshakes only).
    """

    def __init__(
        self,
        config: ListenConfig,
        submit: Submit,
        *,
        ssl_context: ssl.SSLContext | None = None,
        nonce: bytes | None = None,
        auth_salt: bytes | None = None,
    ) -> None:
        self.config = config
        self.submit = submit
        self.ssl_context = ssl_context
        if ssl_context is None and config.tls is not None:
            self.ssl_context = build_server_ssl_context(config.tls)
        self.nonce = nonce
        self.auth_salt = auth_salt
        self.stats = ServerStats()
        #: Called with the seconds spent decoding each read (metrics' ``decode`` stage).
        self.on_decode: Callable[[float], None] | None = None
        self.connections: set[ForwardProtocol] = set()
        #: Connections whose ack loop still runs: open ones, and closed ones with chunks in
        #: flight (their submits keep going; shutdown must cancel them too).
        self.working: set[ForwardProtocol] = set()
        self.paused: set[ForwardProtocol] = set()
        self.in_flight = 0
        self.pending_chunks = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.closing = False
        self._servers: list[asyncio.Server] = []
        self._refused_unlogged = 0
        self._last_refuse_log = -REFUSE_LOG_INTERVAL * 2
        self._decoder: ThreadPoolExecutor | None = None
        self._trim_handle: asyncio.TimerHandle | None = None
        self._last_trim = -TRIM_INTERVAL

    def decoder(self) -> ThreadPoolExecutor:
        """The worker threads that decode large messages (started on first use)."""
        if self._decoder is None:
            self._decoder = ThreadPoolExecutor(2, thread_name_prefix="ruletag-decode")
        return self._decoder

    def trim_memory_soon(self) -> None:
        """Schedule one ``malloc_trim`` (at most one per ``TRIM_INTERVAL``)."""
        if self._trim_handle is not None:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, self._last_trim + TRIM_INTERVAL - time.monotonic())
        self._trim_handle = loop.call_later(delay, self._trim_memory)

    def _trim_memory(self) -> None:
        self._trim_handle = None
        self._last_trim = time.monotonic()
        if malloc_trim():
            self.stats.memory_trims += 1

    @property
    def address(self) -> str:
        """The bound address (``HOST:PORT`` with the real port, or ``unix:PATH``)."""
        if self.config.path:
            return f"unix:{self.config.path}"
        host, port = self.bound[0] if self.bound else (self.config.host, self.config.port)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def bound(self) -> list[tuple[str, int]]:
        """``(host, port)`` of every bound TCP socket."""
        out = []
        for srv in self._servers:
            for sock in srv.sockets:
                name = sock.getsockname()
                if isinstance(name, tuple):
                    out.append((str(name[0]), int(name[1])))
        return out

    @property
    def listening(self) -> bool:
        """True while bound and accepting (not yet stopping): the health check's listener bit."""
        return bool(self._servers) and not self.closing

    @property
    def port(self) -> int:
        """The bound TCP port (useful with port 0)."""
        return self.bound[0][1] if self.bound else self.config.port

    async def start(self) -> None:
        """Bind and start accepting."""
        loop = asyncio.get_running_loop()
        cfg = self.config
        backlog = min(max(cfg.max_connections, 100), 4096)
        if cfg.path:
            _remove_stale_socket(cfg.path)
            srv = await loop.create_unix_server(
                lambda: ForwardProtocol(self), cfg.path, ssl=self.ssl_context, backlog=backlog
            )
        else:
            srv = await loop.create_server(
                lambda: ForwardProtocol(self),
                cfg.host,
                cfg.port,
                ssl=self.ssl_context,
                backlog=backlog,
                reuse_address=True,
                reuse_port=cfg.reuse_port or None,
            )
        self._servers.append(srv)

    def note_refused(self, peer: str) -> None:
        """Count a refused connection; log once per burst."""
        self.stats.connections_refused += 1
        self._refused_unlogged += 1
        now = time.monotonic()
        if now - self._last_refuse_log >= REFUSE_LOG_INTERVAL:
            reason = (
                "shutting down"
                if self.closing
                else (f"max_connections {self.config.max_connections} reached")
            )
            log.warning(
                "refusing connections (%s): %d refused, latest from %s",
                reason,
                self._refused_unlogged,
                peer,
            )
            self._refused_unlogged = 0
            self._last_refuse_log = now

    def update_all_flow(self) -> None:
        """Re-check pausing on every connection (after the global in-flight total moved)."""
        for proto in list(self.connections):
            proto.update_flow()

    async def stop(self, timeout: float | None = None) -> None:
        """Graceful shutdown: stop accepting, drain in-flight chunks (bounded), close."""
        if timeout is None:
            timeout = self.config.shutdown_timeout
        self.closing = True
        for srv in self._servers:
            srv.close()
        self.update_all_flow()  # closing => every connection stops reading
        if self.pending_chunks:
            log.info(
                "shutdown: waiting up to %.0f s for %d in-flight chunks",
                timeout,
                self.pending_chunks,
            )
            try:
                await asyncio.wait_for(self.idle.wait(), timeout)
            except TimeoutError:
                log.warning(
                    "shutdown: %d chunks still in flight after %.0f s, closing",
                    self.pending_chunks,
                    timeout,
                )
        # Let ack loops write the last acks before closing.
        await asyncio.sleep(0)
        tasks = []
        for proto in list(self.working):
            for item in proto.pending:
                item.task.cancel()
                tasks.append(item.task)
            if proto.ack_task is not None:
                tasks.append(proto.ack_task)
            proto._close(reason="ruletag shutting down")
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        for srv in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 1.0)
        if self.config.path:
            _remove_stale_socket(self.config.path)
        self._servers.clear()
        if self._trim_handle is not None:
            self._trim_handle.cancel()
            self._trim_handle = None
        if self._decoder is not None:
            self._decoder.shutdown(wait=False, cancel_futures=True)
            self._decoder = None


def _remove_stale_socket(path: str) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if stat.S_ISSOCK(st.st_mode):
        os.unlink(path)


def describe(server: Server) -> dict[str, Any]:
    """A small status snapshot (for logs and tests)."""
    return {
        "address": server.address,
        "connections": len(server.connections),
        "in_flight_bytes": server.in_flight,
        "pending_chunks": server.pending_chunks,
    }
