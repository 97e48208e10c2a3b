"""Disk mode of the pipeline: the ack point is "written and fsync'ed to the disk buffer".

``DurablePipeline.submit(chunk)`` runs the transform (the rule filter), appends every resulting
chunk to the :class:`~.buffer.DiskBuffer` on a single worker thread (fsync blocks; the
buffer is not thread-safe, so every buffer call goes through that one thread) and returns: the
server then acks upstream. Delivery tasks (bounded concurrency) send buffered chunks downstream
through the forwarder and ack them in the buffer once the downstream acked. On ``start()``,
every chunk left unacked on disk by a previous run is queued first.

Never drop:

- buffer full: ``submit`` waits (no upstream ack) until delivered chunks free space; meanwhile
  the server's in-flight limit pauses reading that connection, so the backpressure reaches the
  sender. A chunk larger than the whole buffer can never fit: ``submit`` raises (no ack).
- write errors (ENOSPC, EIO): nothing was stored (the buffer cuts partial records), so no ack
  is sent; the error is logged once per episode and the write retried with backoff (sooner
  when a delivery frees space) until it succeeds or the server gives up at shutdown.
- ``stats.full`` is true while a chunk waits for space (``max_size`` reached or the disk is
  full): metrics export it and ``/health`` says so.
- a resend (same upstream ``chunk`` id and same content as a chunk still buffered) is stored
  once and counted in ``stats.duplicates_dropped``; the same id with other content is stored.
- a forwarder that gives up (``retry_limit``) leaves the chunk in the buffer; it is retried.

Gauges for metrics (plain attributes of ``stats``): buffer bytes, chunks, oldest chunk age.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from ruletag.config.model import BufferConfig
from ruletag.delivery.buffer import DiskBuffer, RecoveryReport, content_digest, is_space_error
from ruletag.delivery.pipeline import Pace, Sender, Transform, apply_transform
from ruletag.errors import BufferFullError, RuletagError
from ruletag.protocol import Chunk

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Buffered chunks being delivered downstream at the same time.
DELIVERY_CONCURRENCY = 32
#: Freshly written chunks kept in memory for delivery (beyond this, they are read back).
HOT_CACHE_BYTES = 32 * 1024 * 1024
#: First and largest wait between retries of a failed buffer write / a given-up delivery.
RETRY_MIN = 0.5
RETRY_MAX = 10.0


@dataclass
class BufferStats:
    """Live numbers of the disk buffer (the metrics module reads them)."""

    bytes: int = 0  # segment bytes on disk
    chunks: int = 0  # chunks stored, not yet acked downstream
    oldest_stored_at: float = 0.0  # time.time() of the oldest unacked chunk (0: none)
    appended: int = 0
    delivered: int = 0
    duplicates_dropped: int = 0  # resends (same upstream chunk id and content) still buffered
    full_waits: int = 0  # times submit waited for space
    write_errors: int = 0  # failed appends (ENOSPC...), each retried
    full: bool = False  # a chunk is waiting for space (max_size reached or disk full)
    lost_on_recovery: int = 0  # chunk records in damaged spans skipped on start

    @property
    def oldest_age(self) -> float:
        """Seconds since the oldest unacked chunk was stored (0 when empty)."""
        if not self.chunks or not self.oldest_stored_at:
            return 0.0
        return max(0.0, time.time() - self.oldest_stored_at)


class DurablePipeline:
    """``submit(chunk)`` returns once the (transformed) chunk is safe in the disk buffer."""

    def __init__(
        self,
        forwarder: Sender,
        buffer: DiskBuffer,
        transform: Transform | None = None,
        *,
        concurrency: int = DELIVERY_CONCURRENCY,
        retry_min: float = RETRY_MIN,
        retry_max: float = RETRY_MAX,
    ) -> None:
        self.forwarder = forwarder
        self.buffer = buffer
        self.transform = transform
        self.pace = Pace()
        self.concurrency = concurrency
        self.retry_min = retry_min
        self.retry_max = retry_max
        self.chunks_in = 0
        self.chunks_out = 0
        self.stats = BufferStats()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ruletag-buffer")
        self._queue: asyncio.Queue[int] = asyncio.Queue()
        self._queued: set[int] = set()  # ids queued or being delivered
        self._hot: dict[int, Chunk] = {}
        self._hot_bytes = 0
        self._space = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        self._closing = False
        self._full_logged = False
        self._space_waiters = 0  # chunks waiting for buffer or disk space
        self._error_logged = False

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> RecoveryReport:
        """Open (recover) the buffer, queue what it holds, start the delivery tasks."""
        report = await self._call(self.buffer.open)
        for problem in report.problems:
            log.warning("disk buffer %s: %s", self.buffer.path, problem)
        if report.damaged:
            self.stats.lost_on_recovery = report.lost_chunks
            log.error(
                "disk buffer %s: %d damaged span(s) skipped on replay, %d chunk "
                "record(s) lost (each listed above with its segment and offset)",
                self.buffer.path,
                report.damaged,
                report.lost_chunks,
            )
        ids = await self._call(self.buffer.pending_ids)
        for rec_id in ids:
            self._enqueue(rec_id, None)
        if ids:
            log.info(
                "disk buffer %s: replaying %d unacked chunk(s) from a previous run",
                self.buffer.path,
                len(ids),
            )
        loop = asyncio.get_running_loop()
        self._workers = [loop.create_task(self._deliver_loop()) for _ in range(self.concurrency)]
        return report

    async def close(self, timeout: float = 2.0) -> None:
        """Give delivery up to ``timeout`` s to drain, then stop; unacked chunks stay on disk."""
        deadline = time.monotonic() + timeout
        while self._queued and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self._closing = True
        self._space.set()
        for task in self._workers:
            task.cancel()
        for task in self._workers:
            with contextlib.suppress(BaseException):
                await task
        self._workers = []
        with contextlib.suppress(Exception):
            await self._call(self.buffer.close)
        self._executor.shutdown(wait=True)
        if self.stats.chunks:
            log.info(
                "disk buffer %s: %d chunk(s) kept for the next start",
                self.buffer.path,
                self.stats.chunks,
            )

    def describe(self) -> str:
        """A fragment for the ready log line."""
        return f", disk buffer {self.buffer.path} (ack on fsync={self.buffer.fsync})"

    # -- the ack point ----------------------------------------------------------------------

    async def submit(self, chunk: Chunk) -> None:
        """Transform ``chunk`` and store the result durably; return = safe to ack upstream."""
        self.chunks_in += 1
        out = await apply_transform(self.transform, chunk, self.pace)
        digest = content_digest(chunk)  # of the upstream chunk: the resend test
        if chunk.chunk_id is not None:
            out = _with_buffer_ids(out, chunk.chunk_id)
        for part in out:
            await self._store(part, digest)
        self.chunks_out += len(out)

    async def _store(self, chunk: Chunk, digest: bytes) -> None:
        rec_id = await self._append_retrying(chunk, digest)
        if self._full_logged or self._error_logged:
            log.info("disk buffer %s: writing again", self.buffer.path)
            self._full_logged = self._error_logged = False
        if rec_id in self._queued:
            self.stats.duplicates_dropped += 1
            log.debug(
                "disk buffer: chunk id %r with the same content is still buffered "
                "(chunk %d): resend stored once (%d duplicates dropped)",
                chunk.chunk_id,
                rec_id,
                self.stats.duplicates_dropped,
            )
        else:
            self.stats.appended += 1
            self._enqueue(rec_id, chunk)

    async def _append_retrying(self, chunk: Chunk, digest: bytes) -> int:
        """Append ``chunk`` to the buffer, waiting and retrying while there is no space or
        the write fails; the buffer's id of the chunk."""
        delay = self.retry_min
        no_space = False  # this chunk is one of the _space_waiters (stats.full)
        try:
            while True:
                if self._closing:
                    raise RuletagError("disk buffer is closing; chunk not stored (not acked)")
                freed = self.stats.delivered  # to notice space freed while we were writing
                try:
                    return await self._call(self._append, chunk, digest)
                except BufferFullError as exc:
                    if len(chunk.entries) + 1024 > self.buffer.max_bytes:
                        log.error(
                            "chunk of %d bytes can never fit the disk buffer (max_size %d)",
                            len(chunk.entries),
                            self.buffer.max_bytes,
                        )
                        raise
                    self.stats.full_waits += 1
                    no_space = no_space or self._add_space_waiter()
                    if not self._full_logged:
                        self._full_logged = True
                        log.warning(
                            "%s: holding acks (senders are paused) until downstream "
                            "delivery frees space",
                            exc,
                        )
                    await self._wait_for_space(freed, self.retry_max)
                except OSError as exc:
                    self.stats.write_errors += 1
                    if is_space_error(exc):
                        no_space = no_space or self._add_space_waiter()
                    if not self._error_logged:
                        self._error_logged = True
                        name = errno.errorcode.get(exc.errno or 0, "error")
                        log.error(
                            "disk buffer %s: cannot write a chunk (%s: %s); it is NOT "
                            "acked upstream; retrying until the write succeeds",
                            self.buffer.path,
                            name,
                            exc.strerror or exc,
                        )
                    await self._wait_for_space(freed, delay)
                    delay = min(delay * 2, self.retry_max)
        finally:
            if no_space:
                self._space_waiters -= 1
            self.stats.full = self._space_waiters > 0

    def _add_space_waiter(self) -> bool:
        self._space_waiters += 1
        self.stats.full = True
        return True

    async def _wait_for_space(self, freed: int, timeout: float) -> None:
        """Wait up to ``timeout`` s, or less if a delivery frees space (``freed``: the
        delivered count before the failed write)."""
        if self.stats.delivered != freed:
            return  # space was freed while the write was failing: retry now
        self._space.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._space.wait(), timeout)

    # -- delivery ---------------------------------------------------------------------------

    def _enqueue(self, rec_id: int, chunk: Chunk | None) -> None:
        self._queued.add(rec_id)
        if chunk is not None and self._hot_bytes + len(chunk.entries) <= HOT_CACHE_BYTES:
            self._hot[rec_id] = chunk
            self._hot_bytes += len(chunk.entries)
        self._queue.put_nowait(rec_id)

    async def _deliver_loop(self) -> None:
        while True:
            rec_id = await self._queue.get()
            chunk = self._hot.pop(rec_id, None)
            if chunk is not None:
                self._hot_bytes -= len(chunk.entries)
            try:
                if chunk is None:
                    chunk = await self._call(self.buffer.get, rec_id)
                if chunk is not None:
                    await self._send(chunk)
                    await self._call(self._ack, rec_id)
                    self.stats.delivered += 1
            except Exception as exc:  # unreadable segment, failing output...: keep it, retry
                log.error(
                    "disk buffer: chunk %d could not be delivered (%s); retrying in %.1f s",
                    rec_id,
                    exc,
                    self.retry_max,
                )
                await asyncio.sleep(self.retry_max)
                self._queue.put_nowait(rec_id)
                continue
            self._queued.discard(rec_id)
            self._space.set()

    async def _send(self, chunk: Chunk) -> None:
        delay = self.retry_min
        while True:
            try:
                await self.forwarder.send(chunk)
                return
            except RuletagError as exc:  # retry_limit reached: keep the chunk, try later
                if self._closing:
                    raise
                log.warning(
                    "delivery of a buffered chunk failed (%s); it stays in the disk "
                    "buffer and is retried in %.1f s",
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max)

    # -- buffer calls (on the buffer thread) -----------------------------------------------

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _append(self, chunk: Chunk, digest: bytes) -> int:
        try:
            return self.buffer.append(chunk, digest)
        finally:
            self._snapshot()

    def _ack(self, rec_id: int) -> None:
        try:
            self.buffer.ack(rec_id)
        finally:
            self._snapshot()

    def _snapshot(self) -> None:
        buf = self.buffer
        self.stats.bytes = buf.bytes_used
        self.stats.chunks = buf.chunks
        self.stats.oldest_stored_at = (time.time() - buf.oldest_age()) if buf.chunks else 0.0


def _with_buffer_ids(out: list[Chunk], upstream_id: bytes) -> list[Chunk]:
    """Give each transformed chunk a buffer dedupe key derived from the upstream chunk id (the
    buffer pairs it with the upstream content digest), so a resend of the same upstream chunk
    is not stored twice (invariant 5 of the buffer)."""
    if len(out) == 1:
        return [out[0] if out[0].chunk_id == upstream_id else replace(out[0], chunk_id=upstream_id)]
    return [replace(c, chunk_id=upstream_id + b"#" + str(i).encode()) for i, c in enumerate(out)]


async def start_durable(
    config: BufferConfig, forwarder: Sender, transform: Transform | None = None
) -> DurablePipeline:
    """Open the disk buffer of ``config`` and start delivering what it holds."""
    assert config.path is not None, "buffer.path is required in disk mode"
    buffer = DiskBuffer(
        config.path,
        max_bytes=config.max_size,
        segment_bytes=config.segment_size,
        fsync="never" if config.fsync == "never" else "always",
    )
    pipeline = DurablePipeline(forwarder, buffer, transform)
    await pipeline.start()
    return pipeline
