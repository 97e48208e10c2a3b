"""Durable disk buffer: chunks are safe here before the upstream ack, until downstream acks.

Invariants (each is checked by tests/test_buffer.py):

1. ``append()`` returns only after the chunk's record is written and, with the default
   ``fsync="always"`` policy, fsync'ed. The upstream ack is sent after ``append()`` returns, so
   an acked chunk survives ``kill -9`` and power loss (``fsync="never"`` trades that for speed:
   it survives a process crash, not a machine crash).
2. A record is framed as ``MAGIC | kind | length | crc32 | payload``. On open, every segment is
   read front to back; a torn or corrupt record ends that segment's replay, is reported, and
   the torn tail of the active segment is truncated. Open never raises on bad data.
3. ``ack(id)`` appends an ACK record (not fsync'ed: losing it only causes a resend, i.e. a
   duplicate, never a loss). A segment file is deleted only when every chunk in it is acked and
   it is not the segment being written.
4. The buffer never holds more than ``max_bytes`` of segment files: ``append()`` raises
   :class:`BufferFullError` instead, writing nothing; the caller withholds the upstream ack
   and stops reading, so the sender keeps its data. Nothing is ever dropped.
5. A chunk whose upstream ``chunk`` id is already buffered and not yet acked downstream is not
   stored twice: ``append()`` returns the existing id (fluentd resends the same id on timeout).
6. Chunks are replayed in append order; ids are monotonic across restarts.
7. Only an index of the pending chunks is kept in memory (segment, offset, length): ``get()``
   reads a chunk back from its segment file, so memory stays small however full the buffer is.
8. A full buffer whose active segment holds no unacked chunk rolls to a new segment, so the
   acked space can be reclaimed (a buffer can never be "full of acked data").
9. Failing to write an ACK record (e.g. ENOSPC) still forgets the chunk in memory, so space is
   reclaimed: the worst case after a restart is a duplicate delivery, never a loss.

The class is not thread-safe: callers run every method on one thread (the disk pipeline uses a
single-thread executor, so fsync never blocks the event loop).
"""

from __future__ import annotations

import io
import logging
import os
import struct
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import msgpack

from ruletag.errors import BufferFullError
from ruletag.events import Chunk

log = logging.getLogger(__name__)

FsyncPolicy = Literal["always", "never"]

_MAGIC = b"RTB1"
_HEADER = struct.Struct(">4sBII")  # magic, kind, payload length, crc32
_KIND_CHUNK = 1
_KIND_ACK = 2
_MAX_RECORD = 1 << 31


@dataclass
class RecoveryReport:
    """What ``open()`` found on disk."""

    pending: int = 0
    segments: int = 0
    problems: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Entry:
    """Where a pending chunk lives on disk (the chunk itself is not kept in memory)."""

    seg_no: int
    offset: int  # of the record header in the segment file
    length: int  # payload length
    stored_at: float
    chunk_id: bytes | None


@dataclass
class _Segment:
    number: int
    path: Path
    size: int = 0
    live: set[int] = field(default_factory=set)  # chunk ids stored here, not yet acked


def _encode_chunk(rec_id: int, chunk: Chunk, stored_at: float) -> bytes:
    return msgpack.packb(
        [rec_id, chunk.tag, chunk.entries, chunk.count, chunk.chunk_id, chunk.signal,
         chunk.v2, stored_at],
        use_bin_type=True,
    )


def _decode_chunk(payload: bytes) -> tuple[int, Chunk, float]:
    rec_id, tag, entries, count, chunk_id, signal, v2, stored_at = msgpack.unpackb(
        payload, raw=False
    )
    return rec_id, Chunk(tag=tag, entries=entries, count=count, chunk_id=chunk_id,
                         signal=signal, v2=v2), stored_at


def _open_segment(path: Path) -> io.FileIO:
    return open(path, "ab", buffering=0)  # kept open while it is active


class DiskBuffer:
    """Append-only segment files with checksums; see the module docstring for invariants."""

    def __init__(
        self,
        path: str | Path,
        *,
        max_bytes: int = 1 << 30,
        segment_bytes: int = 64 << 20,
        fsync: FsyncPolicy = "always",
    ) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self._segments: OrderedDict[int, _Segment] = OrderedDict()
        self._pending: OrderedDict[int, _Entry] = OrderedDict()
        self._by_chunk_id: dict[bytes, int] = {}
        self._next_id = 1
        self._used = 0
        self.ack_write_errors = 0
        self._fh: io.FileIO | None = None  # unbuffered: a failed write leaves nothing behind
        self._active: _Segment | None = None

    # ------------------------------------------------------------------ recovery

    def open(self) -> RecoveryReport:
        """Create the folder or replay what is in it. Never raises on corrupt data."""
        self.path.mkdir(parents=True, exist_ok=True)
        report = RecoveryReport()
        acked: set[int] = set()
        numbers = sorted(
            int(p.stem.split("-")[1]) for p in self.path.glob("segment-*.log")
            if p.stem.split("-")[1].isdigit()
        )
        last_good: dict[int, int] = {}
        for n in numbers:
            seg = _Segment(n, self._segment_path(n))
            good = self._replay(seg, acked, report)
            last_good[n] = good
            self._segments[n] = seg
        for rec_id in acked:
            self._forget(rec_id)
        report.segments = len(self._segments)
        if numbers:
            last = numbers[-1]
            seg = self._segments[last]
            if seg.path.stat().st_size != last_good[last]:
                with open(seg.path, "r+b") as fh:
                    fh.truncate(last_good[last])
                seg.size = last_good[last]
        self._drop_empty_segments()
        self._open_active()
        self._used = sum(s.size for s in self._segments.values())
        report.pending = len(self._pending)
        return report

    def _replay(self, seg: _Segment, acked: set[int], report: RecoveryReport) -> int:
        data = seg.path.read_bytes()
        pos = 0
        while pos < len(data):
            if len(data) - pos < _HEADER.size:
                report.problems.append(f"{seg.path.name}: torn record header at byte {pos}")
                break
            magic, kind, length, crc = _HEADER.unpack_from(data, pos)
            body = data[pos + _HEADER.size : pos + _HEADER.size + length]
            if magic != _MAGIC or len(body) != length or zlib.crc32(body) != crc:
                report.problems.append(
                    f"{seg.path.name}: torn or corrupt record at byte {pos}; "
                    "rest of segment skipped"
                )
                break
            try:
                if kind == _KIND_CHUNK:
                    rec_id, chunk, stored_at = _decode_chunk(body)
                    entry = _Entry(seg.number, pos, length, stored_at, chunk.chunk_id)
                    self._remember(rec_id, entry, seg)
                    self._next_id = max(self._next_id, rec_id + 1)
                elif kind == _KIND_ACK:
                    for rec_id in msgpack.unpackb(body):
                        acked.add(rec_id)
            except (ValueError, TypeError, msgpack.UnpackException) as exc:
                report.problems.append(f"{seg.path.name}: undecodable record at byte {pos}: {exc}")
                break
            pos += _HEADER.size + length
        seg.size = pos
        return pos

    # ------------------------------------------------------------------ writing

    def _segment_path(self, n: int) -> Path:
        return self.path / f"segment-{n:012d}.log"

    def _open_active(self) -> None:
        if self._segments:
            last = next(reversed(self._segments.values()))
            if last.size < self.segment_bytes:
                self._active = last
                self._fh = _open_segment(last.path)
                return
        self._roll()

    def _roll(self) -> None:
        if self._fh is not None:
            self._fh.close()
        n = (next(reversed(self._segments)) + 1) if self._segments else 1
        seg = _Segment(n, self._segment_path(n))
        self._segments[n] = seg
        self._active = seg
        self._fh = _open_segment(seg.path)
        if self.fsync == "always":
            dir_fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def _write(self, kind: int, payload: bytes, *, sync: bool) -> None:
        record = _HEADER.pack(_MAGIC, kind, len(payload), zlib.crc32(payload)) + payload
        fh = self._fh
        assert fh is not None and self._active is not None, "buffer is not open"
        try:
            view = memoryview(record)
            while view:  # an unbuffered write may be short
                view = view[fh.write(view) :]
            if sync:
                os.fsync(fh.fileno())
        except OSError:
            # e.g. ENOSPC: cut what was partly written so the segment stays readable (the
            # file is unbuffered, so no stale bytes wait in a buffer to be written later).
            try:
                fh.truncate(self._active.size)
            except OSError:
                self._roll()  # the torn tail ends that segment's replay; write elsewhere
            raise
        self._active.size += len(record)
        self._used += len(record)

    @property
    def bytes_used(self) -> int:
        """Bytes of segment files on disk (what ``max_bytes`` limits)."""
        return self._used

    def append(self, chunk: Chunk) -> int:
        """Store ``chunk`` durably and return its id. Raises BufferFullError or OSError."""
        if chunk.chunk_id is not None and chunk.chunk_id in self._by_chunk_id:
            return self._by_chunk_id[chunk.chunk_id]
        rec_id = self._next_id
        stored_at = time.time()
        payload = _encode_chunk(rec_id, chunk, stored_at)
        if len(payload) >= _MAX_RECORD:
            raise BufferFullError("chunk too large for one buffer record")
        need = len(payload) + _HEADER.size
        assert self._active is not None
        if self._used + need > self.max_bytes and self._active.size and not self._active.live:
            self._roll()  # invariant 8: let the acked active segment be deleted
            self._drop_empty_segments()
        if self._used + need > self.max_bytes:
            raise BufferFullError(
                f"disk buffer full ({self._used} of {self.max_bytes} bytes used)"
            )
        if self._active.size and self._active.size + len(payload) > self.segment_bytes:
            self._roll()
        offset = self._active.size
        self._write(_KIND_CHUNK, payload, sync=self.fsync == "always")
        self._next_id += 1
        entry = _Entry(self._active.number, offset, len(payload), stored_at, chunk.chunk_id)
        self._remember(rec_id, entry, self._active)
        return rec_id

    def _remember(self, rec_id: int, entry: _Entry, seg: _Segment) -> None:
        self._pending[rec_id] = entry
        seg.live.add(rec_id)
        if entry.chunk_id is not None:
            self._by_chunk_id[entry.chunk_id] = rec_id

    def _forget(self, rec_id: int) -> None:
        entry = self._pending.pop(rec_id, None)
        if entry is None:
            return
        if entry.chunk_id is not None and self._by_chunk_id.get(entry.chunk_id) == rec_id:
            del self._by_chunk_id[entry.chunk_id]
        seg = self._segments.get(entry.seg_no)
        if seg is not None:
            seg.live.discard(rec_id)

    def ack(self, rec_id: int) -> None:
        """Downstream acknowledged ``rec_id``: forget it, delete fully acked segments.

        If the ACK record cannot be written (ENOSPC...), the chunk is still forgotten
        (invariant 9): a restart may deliver it again, which is a duplicate, not a loss.
        """
        if rec_id not in self._pending:
            return
        try:
            self._write(_KIND_ACK, msgpack.packb([rec_id]), sync=False)
        except OSError as exc:
            self.ack_write_errors += 1
            log.warning("disk buffer: cannot record the ack of chunk %d (%s); it may be "
                        "delivered again after a restart", rec_id, exc)
        self._forget(rec_id)
        self._drop_empty_segments()

    def _drop_empty_segments(self) -> None:
        for n, seg in list(self._segments.items()):
            if seg is self._active or seg.live:
                continue
            # An older segment may still hold ACK records for live chunks of newer segments:
            # harmless, as acks only ever refer to ids <= those of the segment's own chunks.
            if any(other.live for m, other in self._segments.items() if m < n):
                continue
            seg.path.unlink(missing_ok=True)
            self._used -= seg.size
            del self._segments[n]

    # ------------------------------------------------------------------ reading

    def pending_ids(self) -> list[int]:
        """Ids of every stored, unacked chunk, in append order."""
        return list(self._pending)

    def pending(self) -> list[tuple[int, Chunk]]:
        """Every stored, unacked chunk, in append order (read back from disk)."""
        return [(rec_id, chunk) for rec_id in self._pending if (chunk := self.get(rec_id))]

    def get(self, rec_id: int) -> Chunk | None:
        """Read chunk ``rec_id`` back from its segment file (None if acked or unknown)."""
        entry = self._pending.get(rec_id)
        if entry is None:
            return None
        seg = self._segments[entry.seg_no]
        with open(seg.path, "rb") as fh:
            fh.seek(entry.offset + _HEADER.size)
            payload = fh.read(entry.length)
        return _decode_chunk(payload)[1]

    @property
    def chunks(self) -> int:
        return len(self._pending)

    def oldest_age(self, now: float | None = None) -> float:
        """Seconds since the oldest unacked chunk was stored (0 when empty)."""
        if not self._pending:
            return 0.0
        entry = next(iter(self._pending.values()))
        return max(0.0, (now or time.time()) - entry.stored_at)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
