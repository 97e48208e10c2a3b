"""The forward-protocol input: an asyncio server with one sans-IO codec per connection.

Each accepted connection gets a :class:`ForwardProtocol` holding a ``codec.ServerConnection``.
For every decoded ``Chunk`` the injected ``submit(chunk)`` coroutine (the pipeline) runs as a
task; an ack-writer per connection awaits those tasks in arrival order and writes
``{"ack": id}`` after each returns, so acks leave in order and only after ``submit`` is done.
If ``submit`` raises, no ack is sent and the connection is closed (the sender retries).

Limits (``ListenConfig``): connections beyond ``max_connections`` are closed at accept;
reading pauses while the bytes submitted-but-not-done on a connection exceed
``max_in_flight_bytes`` (or, over all connections, ``max_total_in_flight_bytes``) and resumes
below; ``idle_timeout`` closes silent connections with nothing in flight; frames larger than
``max_frame_size`` are a protocol error. A protocol error closes that connection only.

Graceful shutdown (``stop``): close the listeners, stop reading, wait up to the timeout for
in-flight chunks to be acked, then close every connection and cancel what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import stat
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from ruletag import codec
from ruletag.config import ListenConfig, ListenTLS
from ruletag.errors import AuthenticationError, RemoteProtocolError
from ruletag.events import Authenticated, Chunk, ConnectionClosed, Heartbeat

log = logging.getLogger(__name__)

Submit = Callable[[Chunk], Awaitable[None]]

#: Log refused connections at most once per this many seconds (one line per burst).
REFUSE_LOG_INTERVAL = 10.0


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
        self.conn: codec.ServerConnection | None = None
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

    # -- asyncio callbacks ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop: not a subclass
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
            self.conn = codec.ServerConnection(
                shared_key=cfg.shared_key.encode() if cfg.shared_key is not None else None,
                users={u.username.encode(): u.password.encode() for u in cfg.users} or None,
                hostname=cfg.self_hostname,
                tag_prefix=cfg.tag_prefix,
                max_frame_size=cfg.max_frame_size,
                max_inflate_size=cfg.max_inflate_size,
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
        self.ack_task = asyncio.get_running_loop().create_task(self._ack_loop())
        srv.working.add(self)
        if cfg.idle_timeout > 0:
            self._schedule_idle(cfg.idle_timeout)
        log.debug("connection from %s", self.peer)

    def data_received(self, data: bytes) -> None:
        if self.closing or self.conn is None:
            return
        self.bytes_in += len(data)
        self.server.stats.bytes_in += len(data)
        self.last_activity = time.monotonic()
        self._feed(data)

    def eof_received(self) -> bool | None:
        self.eof = True
        if not self.closing and self.conn is not None:
            self._feed(b"")
            self._maybe_finish()
        if self.closing:
            return None
        # Keep the write side open until the pending acks are written (not possible on TLS).
        return self.transport is not None and self.transport.get_extra_info("sslcontext") is None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self.idle_handle is not None:
            self.idle_handle.cancel()
        if self.refused:
            return
        self.wakeup.set()
        if self.read_paused:
            self.server.paused.discard(self)
        self.server.connections.discard(self)
        reason = self.close_reason or (f"connection lost: {exc}" if exc else "closed by peer")
        extra = {"event": "connection_closed", "peer": self.peer, "reason": reason,
                 "bytes_in": self.bytes_in, "chunks": self.chunks}
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
        self._process()
        if hook is not None:
            hook(time.perf_counter() - start)

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
                event = conn.next_event()
                if event is codec.NEED_DATA:
                    break
                if isinstance(event, Chunk):
                    self._on_chunk(event)
                elif isinstance(event, ConnectionClosed):
                    self.eof = True
                    self._flush(conn)
                    self._maybe_finish()
                    return
                elif isinstance(event, Authenticated):
                    log.debug("%s authenticated as %r (%s)", self.peer, event.hostname,
                              event.username or "no user")
                elif isinstance(event, Heartbeat):
                    pass
                self._flush(conn)
            self._flush(conn)
        except Exception as exc:
            self._on_error(exc)

    def _on_error(self, exc: Exception) -> None:
        conn = self.conn
        assert conn is not None
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
            log.error("unexpected error on connection from %s, closing", self.peer,
                      exc_info=exc)
            self._close(abort=True, reason=f"internal error: {type(exc).__name__}: {exc}")

    def _flush(self, conn: codec.ServerConnection) -> None:
        out = conn.data_to_send()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)

    def _on_chunk(self, chunk: Chunk) -> None:
        srv = self.server
        srv.stats.chunks += 1
        srv.stats.records += chunk.count
        self.chunks += 1
        size = chunk.size or len(chunk.entries)
        task = asyncio.get_running_loop().create_task(srv.submit(chunk))
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
                    log.error("chunk from %s not delivered, closing without ack: %s",
                              self.peer, exc)
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
                item.task.add_done_callback(lambda _t, it=item: self._release(it))

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
        if self.eof and not self.pending and not self.backlog and not self.closing:
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
            self.transport.pause_reading()
        elif not over and self.read_paused:
            self.read_paused = False
            srv.paused.discard(self)
            if self.backlog:
                # Decode what is already buffered before reading more: resuming the socket
                # now would read a whole socket buffer per chunk submitted, and the codec
                # buffer would grow without bound while the pipeline is slow.
                asyncio.get_running_loop().call_soon(self._process_then_resume)
            else:
                self.transport.resume_reading()

    def _process_then_resume(self) -> None:
        """Work off the backlog; resume reading only if that did not pause us again."""
        self._process()
        if self.transport is not None and not self.closing and not self.read_paused:
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
        if self.idle_handle is not None:
            self.idle_handle.cancel()
        if self.read_paused:
            self.read_paused = False
            self.server.paused.discard(self)
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()


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
        self._servers: list[asyncio.AbstractServer] = []
        self._refused_unlogged = 0
        self._last_refuse_log = -REFUSE_LOG_INTERVAL * 2

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
                lambda: ForwardProtocol(self), cfg.host, cfg.port, ssl=self.ssl_context,
                backlog=backlog, reuse_address=True, reuse_port=cfg.reuse_port or None,
            )
        self._servers.append(srv)

    def note_refused(self, peer: str) -> None:
        """Count a refused connection; log once per burst."""
        self.stats.connections_refused += 1
        self._refused_unlogged += 1
        now = time.monotonic()
        if now - self._last_refuse_log >= REFUSE_LOG_INTERVAL:
            reason = "shutting down" if self.closing else (
                f"max_connections {self.config.max_connections} reached"
            )
            log.warning("refusing connections (%s): %d refused, latest from %s",
                        reason, self._refused_unlogged, peer)
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
            log.info("shutdown: waiting up to %.0f s for %d in-flight chunks",
                     timeout, self.pending_chunks)
            try:
                await asyncio.wait_for(self.idle.wait(), timeout)
            except TimeoutError:
                log.warning("shutdown: %d chunks still in flight after %.0f s, closing",
                            self.pending_chunks, timeout)
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
