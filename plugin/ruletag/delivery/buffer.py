"""Durable disk buffer: chunks are safe here before the upstream ack, until downstream acks.

Invariants (each is checked by tests/test_buffer.py and tests/test_buffer_hostile.py):

1. ``append()`` returns only after the chunk's record is written and, with the default
   ``fsync="always"`` policy, fsync'ed (and the folder entry of a new segment too). The
   upstream ack is sent after ``append()`` returns, so an acked chunk survives ``kill -9`` and
   power loss (``fsync="never"`` trades that for speed: it survives a process crash, not a
   machine crash).
2. A segment file starts with a header ``RTBS | format version | 0`` (written with its first
   record) and holds records framed as ``RTB2 | kind | length | crc32(payload) |
   crc32(header)``. On open every segment is read front to back; a damaged record is skipped
   alone: a record whose header verifies is skipped by its length, otherwise the reader scans
   forward for the next marker whose record verifies. Every damaged span is reported with its
   segment, byte range and what it held (chunk ids when readable). The torn tail of the last
   segment is truncated. Open never raises on bad data. Segments of format 1 (no header,
   ``RTB1`` records with a payload-only checksum) are replayed; a newer format is refused and
   left untouched.
3. ``ack(id)`` appends an ACK record (not fsync'ed: losing it only causes a resend, i.e. a
   duplicate, never a loss). A segment file is deleted when every chunk in it is acked and it
   is not the segment being written (and no older segment still holds unacked chunks).
4. The buffer never holds more than ``max_bytes`` of segment files: ``append()`` raises
   :class:`BufferFullError` instead, writing nothing; the caller withholds the upstream ack
   and stops reading, so the sender keeps its data. Nothing is ever dropped.
5. A chunk is a resend, stored once (``append()`` returns the existing id), only if its
   upstream ``chunk`` id AND its content digest match a chunk buffered and not yet acked
   downstream. The same id with other content is a new chunk.
6. Chunks are replayed in append order; ids are monotonic across restarts.
7. Only an index of the pending chunks is kept in memory (segment, offset, length, digest):
   ``get()`` reads a chunk back from its segment file, so memory stays small however full the
   buffer is.
8. The segment being written is reclaimed too: the buffer rolls to a new segment when the
   active one holds no unacked chunk and is large, when ``max_bytes`` is reached, and when a
   write fails for lack of space (ENOSPC, EDQUOT, EFBIG), so delivered space always comes back.
9. Failing to write an ACK record (e.g. ENOSPC) still forgets the chunk in memory, so space is
   reclaimed: the worst case after a restart is a duplicate delivery, never a loss.

The class is not thread-safe: callers run every method on one thread (the disk pipeline uses a
single-thread executor, so fsync never blocks the event loop).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import logging
import os
import struct
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgpack

from ruletag.errors import BufferFullError
from ruletag.protocol import Chunk

log = logging.getLogger(__name__)

FsyncPolicy = Literal["always", "never"]

#: The segment format written by this version (format 1 had no segment header).
FORMAT_VERSION = 2
_FILE_MAGIC = b"RTBS"
_FILE_HEADER = struct.Struct(">4sHH")  # magic, format version, reserved (0)
_V1_MAGIC = b"RTB1"
_V1_HEADER = struct.Struct(">4sBII")  # magic, kind, payload length, crc32(payload)
_V2_MAGIC = b"RTB2"
_V2_PREFIX = struct.Struct(">4sBII")  # magic, kind, payload length, crc32(payload)
_V2_HEADER = struct.Struct(">4sBIII")  # the prefix, then crc32(prefix)
_RECORD_MAGIC = {1: _V1_MAGIC, 2: _V2_MAGIC}
_RECORD_HEADER = {1: _V1_HEADER.size, 2: _V2_HEADER.size}
_KIND_CHUNK = 1
_KIND_ACK = 2
_MAX_RECORD = 1 << 31
#: A fully delivered active segment at least this large (or ``segment_bytes``) is rolled.
RECLAIM_BYTES = 1 << 20
_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def is_space_error(exc: OSError) -> bool:
    """True for write errors that mean "no room": ENOSPC, EDQUOT, EFBIG."""
    return exc.errno in _SPACE_ERRNOS


def content_digest(chunk: Chunk) -> bytes:
    """A 16-byte digest of what a chunk carries (tag, signal, entries): the resend test."""
    h = hashlib.blake2b(digest_size=16)
    h.update(chunk.tag.encode("utf-8", "surrogateescape"))
    h.update(b"\0%d\0" % chunk.signal)
    h.update(chunk.entries)
    return h.digest()


@dataclass
class RecoveryReport:
    """What ``open()`` found on disk."""

    pending: int = 0
    segments: int = 0
    problems: list[str] = field(default_factory=list)
    damaged: int = 0  # damaged spans skipped
    lost_chunks: int = 0  # chunk records in damaged spans not known to be delivered
    refused: list[str] = field(default_factory=list)  # segment files of an unknown format


@dataclass(slots=True)
class _Entry:
    """Where a pending chunk lives on disk (the chunk itself is not kept in memory)."""

    seg_no: int
    offset: int  # of the record header in the segment file
    length: int  # payload length
    stored_at: float
    chunk_id: bytes | None
    digest: bytes


@dataclass
class _Segment:
    number: int
    path: Path
    version: int = FORMAT_VERSION
    size: int = 0
    live: set[int] = field(default_factory=set)  # chunk ids stored here, not yet acked
    dir_synced: bool = False  # its folder entry is known to be on disk


@dataclass(slots=True)
class _Frame:
    """A record found at some offset of a segment."""

    kind: int
    body: int  # offset of the payload
    end: int  # offset just past the record
    intact: bool  # the payload checksum matches


@dataclass(slots=True)
class _LostRecord:
    """What could be read of one record inside a damaged span."""

    kind: int | None
    rec_id: int | None = None
    chunk_id: bytes | None = None
    count: int | None = None


@dataclass
class _Damage:
    """A damaged span of a segment, and what it held as far as it can be read."""

    segment: str
    start: int
    end: int
    records: list[_LostRecord]
    reason: str


def _encode_chunk(rec_id: int, chunk: Chunk, stored_at: float, digest: bytes) -> bytes:
    return msgpack.packb(
        [
            rec_id,
            chunk.tag,
            chunk.entries,
            chunk.count,
            chunk.chunk_id,
            chunk.signal,
            chunk.v2,
            stored_at,
            digest,
        ],
        use_bin_type=True,
    )


def _decode_chunk(payload: bytes | memoryview) -> tuple[int, Chunk, float, bytes]:
    """A chunk record's payload: format 2 carries the dedupe digest, format 1 does not."""
    fields = msgpack.unpackb(payload, raw=False)
    rec_id, tag, entries, count, chunk_id, signal, v2, stored_at = fields[:8]
    chunk = Chunk(tag=tag, entries=entries, count=count, chunk_id=chunk_id, signal=signal, v2=v2)
    digest = fields[8] if len(fields) > 8 else content_digest(chunk)
    if not isinstance(rec_id, int) or not isinstance(digest, bytes):
        raise ValueError("malformed chunk record")
    return rec_id, chunk, stored_at, digest


def _frame_record(kind: int, payload: bytes) -> bytes:
    prefix = _V2_PREFIX.pack(_V2_MAGIC, kind, len(payload), zlib.crc32(payload))
    return prefix + struct.pack(">I", zlib.crc32(prefix)) + payload


def _frame_at(data: memoryview, pos: int, version: int) -> _Frame | None:
    """The record at ``pos`` if its header is credible (format 2: its checksum verifies;
    format 1 has none, so only a fully intact record counts), else None."""
    size = len(data)
    if version == 1:
        if size - pos < _V1_HEADER.size or data[pos : pos + 4] != _V1_MAGIC:
            return None
        _, kind, length, crc = _V1_HEADER.unpack_from(data, pos)
        body, end = pos + _V1_HEADER.size, pos + _V1_HEADER.size + length
        if end > size or zlib.crc32(data[body:end]) != crc:
            return None
        return _Frame(kind, body, end, True)
    if size - pos < _V2_HEADER.size or data[pos : pos + 4] != _V2_MAGIC:
        return None
    _, kind, length, crc, head_crc = _V2_HEADER.unpack_from(data, pos)
    if zlib.crc32(data[pos : pos + _V2_PREFIX.size]) != head_crc:
        return None
    body, end = pos + _V2_HEADER.size, pos + _V2_HEADER.size + length
    if end > size:
        return None
    return _Frame(kind, body, end, zlib.crc32(data[body:end]) == crc)


def _resync(data: memoryview, pos: int, version: int, raw: bytes) -> int:
    """Offset of the next credible record at or after ``pos`` (``len(data)`` if none)."""
    magic = _RECORD_MAGIC[version]
    while (pos := raw.find(magic, pos)) >= 0:
        if _frame_at(data, pos, version) is not None:
            return pos
        pos += 1
    return len(data)


def _peek_chunk(payload: bytes) -> _LostRecord:
    """Best effort: the id, upstream chunk id and record count of a damaged chunk payload."""
    lost = _LostRecord(_KIND_CHUNK)
    unpacker = msgpack.Unpacker(raw=False, unicode_errors="replace", max_buffer_size=0)
    unpacker.feed(payload)
    try:
        if unpacker.read_array_header() < 5:
            return lost
        values: list[Any] = [unpacker.unpack() for _ in range(5)]
    except Exception:  # whatever the damage did to the msgpack, describe what was read
        return lost
    rec_id, _tag, _entries, count, chunk_id = values
    lost.rec_id = rec_id if isinstance(rec_id, int) else None
    lost.count = count if isinstance(count, int) else None
    lost.chunk_id = chunk_id if isinstance(chunk_id, bytes) else None
    return lost


def _describe_span(raw: bytes, start: int, end: int, version: int) -> list[_LostRecord]:
    """What the records that started inside ``raw[start:end]`` were, as far as readable."""
    magic = _RECORD_MAGIC[version]
    head = _RECORD_HEADER[version]
    starts = [start]
    pos = start
    while (pos := raw.find(magic, pos + 1, end)) >= 0:
        starts.append(pos)
    found: list[_LostRecord] = []
    for p in starts:
        if raw[p : p + 4] != magic or end - p < head:
            if p == start:
                found.append(_LostRecord(None))  # unreadable bytes: at least one record
            continue
        kind, length = struct.unpack_from(">BI", raw, p + 4)
        peek = _peek_chunk(raw[p + head : min(p + head + length, end)])
        # the kind byte may be the damaged part: a payload that reads as a chunk is one
        found.append(peek if peek.rec_id is not None or kind != _KIND_ACK else _LostRecord(kind))
    return found


def _damage_message(dmg: _Damage, delivered: set[int]) -> tuple[str, int]:
    """The log line of one damaged span and the number of chunks it lost."""
    chunks = [r for r in dmg.records if r.kind in (_KIND_CHUNK, None)]
    acks = sum(1 for r in dmg.records if r.kind == _KIND_ACK)
    lost = [r for r in chunks if r.rec_id is None or r.rec_id not in delivered]
    named = []
    for r in lost:
        if r.rec_id is None and r.chunk_id is None:
            continue
        what = f"chunk {r.rec_id}" if r.rec_id is not None else "a chunk"
        if r.chunk_id is not None:
            what += f" (upstream chunk id {r.chunk_id.decode('utf-8', 'replace')!r})"
        if r.count is not None:
            what += f" of {r.count} record(s)"
        named.append(what)
    unnamed = len(lost) - len(named)
    parts = [f"{len(lost)} chunk record(s) lost"]
    if named:
        parts.append("lost: " + ", ".join(named))
    if unnamed:
        parts.append(f"{unnamed} unreadable (bytes {dmg.start}-{dmg.end})")
    if len(chunks) > len(lost):
        parts.append(f"{len(chunks) - len(lost)} already delivered")
    if acks:
        parts.append(f"{acks} ack record(s) lost (may cause duplicate deliveries)")
    msg = (
        f"{dmg.segment}: torn or corrupt record(s) at bytes {dmg.start}-{dmg.end} "
        f"({dmg.reason}), skipped alone: " + "; ".join(parts)
    )
    return msg, len(lost)


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
        self.reclaim_bytes = min(segment_bytes, RECLAIM_BYTES)
        self._segments: OrderedDict[int, _Segment] = OrderedDict()
        self._pending: OrderedDict[int, _Entry] = OrderedDict()
        self._by_key: dict[tuple[bytes, bytes], int] = {}
        self._next_id = 1
        self._last_number = 0  # highest segment number seen, refused ones included
        self._used = 0
        self.ack_write_errors = 0
        self._ack_failing = False
        self.duplicates = 0
        self._fh: io.FileIO | None = None  # unbuffered: a failed write leaves nothing behind
        self._active: _Segment | None = None

    # ------------------------------------------------------------------ recovery

    def open(self) -> RecoveryReport:
        """Create the folder or replay what is in it. Never raises on corrupt data."""
        self.path.mkdir(parents=True, exist_ok=True)
        report = RecoveryReport()
        acked: set[int] = set()
        damage: list[_Damage] = []
        numbers = sorted(
            int(p.stem.split("-")[1])
            for p in self.path.glob("segment-*.log")
            if p.stem.split("-")[1].isdigit()
        )
        reusable = False
        for n in numbers:
            self._last_number = n
            seg = _Segment(n, self._segment_path(n))
            found = len(damage)
            clean_end = self._replay(seg, acked, damage, report)
            if clean_end is None:
                continue  # refused: left untouched, not counted
            self._segments[n] = seg
            if n == numbers[-1]:
                reusable = self._cut_torn_tail(seg, clean_end, damage[found:])
        for rec_id in acked:
            self._forget(rec_id)
        for dmg in damage:
            msg, lost = _damage_message(dmg, acked)
            report.problems.append(msg)
            report.lost_chunks += lost
        report.damaged = len(damage)
        report.segments = len(self._segments)
        self._drop_empty_segments()
        self._open_active(reusable)
        self._used = sum(s.size for s in self._segments.values())
        report.pending = len(self._pending)
        return report

    def _segment_format(
        self, seg: _Segment, raw: bytes, report: RecoveryReport
    ) -> tuple[int, int] | None:
        """``(format version, header size)`` of a segment's bytes; None = refuse it."""
        if not raw or raw.startswith(_V1_MAGIC):
            return (FORMAT_VERSION if not raw else 1), 0
        if raw.startswith(_FILE_MAGIC) and len(raw) >= _FILE_HEADER.size:
            version = _FILE_HEADER.unpack_from(raw)[1]
            if version == FORMAT_VERSION:
                return version, _FILE_HEADER.size
            report.refused.append(seg.path.name)
            report.problems.append(
                f"{seg.path.name}: segment format version {version} is not one this ruletag "
                f"reads (1-{FORMAT_VERSION}); the file is left untouched and NOT replayed: "
                "run the ruletag that wrote it to deliver it, or move it away"
            )
            return None
        if _FILE_MAGIC.startswith(raw[:4]) and len(raw) < _FILE_HEADER.size:
            return FORMAT_VERSION, len(raw)  # a torn header: the segment holds nothing
        # A damaged header: read the records of whichever format they are in.
        return (FORMAT_VERSION, _FILE_HEADER.size) if _V2_MAGIC in raw else (1, 0)

    def _replay(
        self, seg: _Segment, acked: set[int], damage: list[_Damage], report: RecoveryReport
    ) -> int | None:
        """Index the segment's records; the end of its last intact record (None: refused)."""
        raw = seg.path.read_bytes()
        fmt = self._segment_format(seg, raw, report)
        if fmt is None:
            return None
        seg.version, pos = fmt
        seg.dir_synced = True
        data = memoryview(raw)
        whole_header = len(raw) >= _FILE_HEADER.size and raw.startswith(_FILE_MAGIC)
        clean_end = pos if whole_header else 0
        if pos == len(raw) and 0 < pos < _FILE_HEADER.size:
            damage.append(_Damage(seg.path.name, 0, pos, [], "torn segment header"))
        elif pos and not whole_header:
            damage.append(_Damage(seg.path.name, 0, pos, [], "damaged segment header"))
        while pos < len(raw):
            frame = _frame_at(data, pos, seg.version)
            if frame is None or not frame.intact:
                end = frame.end if frame is not None else _resync(data, pos + 1, seg.version, raw)
                records = _describe_span(raw, pos, end, seg.version)
                reason = "checksum mismatch" if frame is not None else "bad or torn frame"
                damage.append(_Damage(seg.path.name, pos, end, records, reason))
                pos = end
                continue
            try:
                self._apply(seg, pos, frame, data, acked)
            except (ValueError, TypeError, msgpack.UnpackException) as exc:
                records = _describe_span(raw, pos, frame.end, seg.version)
                damage.append(
                    _Damage(seg.path.name, pos, frame.end, records, f"undecodable: {exc}")
                )
            pos = clean_end = frame.end
        seg.size = len(raw)
        return clean_end

    def _apply(
        self, seg: _Segment, pos: int, frame: _Frame, data: memoryview, acked: set[int]
    ) -> None:
        """Take an intact record into the index."""
        body = data[frame.body : frame.end]
        if frame.kind == _KIND_CHUNK:
            rec_id, chunk, stored_at, digest = _decode_chunk(body)
            entry = _Entry(
                seg.number, pos, frame.end - frame.body, stored_at, chunk.chunk_id, digest
            )
            self._remember(rec_id, entry, seg)
            self._next_id = max(self._next_id, rec_id + 1)
        elif frame.kind == _KIND_ACK:
            acked.update(i for i in msgpack.unpackb(body) if isinstance(i, int))

    def _cut_torn_tail(self, seg: _Segment, clean_end: int, damage: list[_Damage]) -> bool:
        """Truncate the torn tail of the last segment; True if it can be written to again."""
        if seg.size != clean_end:
            try:
                with open(seg.path, "r+b") as fh:
                    fh.truncate(clean_end)
                seg.size = clean_end
            except OSError as exc:
                log.warning(
                    "disk buffer: cannot truncate the torn tail of %s (%s)", seg.path.name, exc
                )
                return False
        intact = all(d.start >= clean_end for d in damage)  # damage only in the cut tail
        return seg.version == FORMAT_VERSION and intact and seg.size < self.segment_bytes

    # ------------------------------------------------------------------ writing

    def _segment_path(self, n: int) -> Path:
        return self.path / f"segment-{n:012d}.log"

    def _open_active(self, reuse_last: bool) -> None:
        if reuse_last and self._segments:
            last = next(reversed(self._segments.values()))
            if last.number == self._last_number:
                self._active = last
                self._fh = _open_segment(last.path)
                return
        self._roll()

    def _roll(self) -> None:
        """Start a new, empty segment (its header is written with its first record). If the
        new file cannot be created, the active segment stays as it was."""
        number = self._last_number + 1
        seg = _Segment(number, self._segment_path(number))
        fh = _open_segment(seg.path)
        self._last_number = number
        if self._fh is not None:
            self._fh.close()
        self._fh = fh
        self._segments[seg.number] = seg
        self._active = seg

    def _sync_dir(self) -> None:
        dir_fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _write(self, kind: int, payload: bytes, *, sync: bool) -> int:
        """Append one record to the active segment; return its offset. All or nothing."""
        fh, seg = self._fh, self._active
        assert fh is not None and seg is not None, "buffer is not open"
        record = _frame_record(kind, payload)
        head = b"" if seg.size else _FILE_HEADER.pack(_FILE_MAGIC, FORMAT_VERSION, 0)
        try:
            view = memoryview(head + record)
            while view:  # an unbuffered write may be short
                view = view[fh.write(view) :]
            if sync:
                os.fsync(fh.fileno())
                if not seg.dir_synced:
                    self._sync_dir()
                    seg.dir_synced = True
        except OSError:
            self._cut_failed_write(fh, seg)
            raise
        offset = seg.size + len(head)
        seg.size += len(head) + len(record)
        self._used += len(head) + len(record)
        return offset

    def _cut_failed_write(self, fh: io.FileIO, seg: _Segment) -> None:
        """Remove what a failed write (e.g. ENOSPC) left, so the segment stays readable (the
        file is unbuffered: no stale bytes wait to be written later). If that fails too, count
        the torn bytes (replay skips them as a damaged span) and write elsewhere."""
        try:
            fh.truncate(seg.size)
            return
        except OSError:
            pass
        with contextlib.suppress(OSError):
            torn = os.fstat(fh.fileno()).st_size - seg.size
            seg.size += torn
            self._used += torn
        with contextlib.suppress(OSError):
            self._roll()

    @property
    def bytes_used(self) -> int:
        """Bytes of segment files on disk (what ``max_bytes`` limits)."""
        return self._used

    def append(self, chunk: Chunk, digest: bytes | None = None) -> int:
        """Store ``chunk`` durably and return its id. Raises BufferFullError or OSError.

        ``digest`` identifies the content for the resend test (default: ``content_digest``).
        """
        digest = digest if digest is not None else content_digest(chunk)
        if chunk.chunk_id is not None:
            existing = self._by_key.get((chunk.chunk_id, digest))
            if existing is not None:
                self.duplicates += 1
                return existing
        rec_id = self._next_id
        stored_at = time.time()
        payload = _encode_chunk(rec_id, chunk, stored_at, digest)
        if len(payload) >= _MAX_RECORD:
            raise BufferFullError("chunk too large for one buffer record")
        self._make_room(len(payload) + _V2_HEADER.size + _FILE_HEADER.size)
        sync = self.fsync == "always"
        try:
            offset = self._write(_KIND_CHUNK, payload, sync=sync)
        except OSError as exc:
            if not is_space_error(exc) or not self._roll_for_space():
                raise
            offset = self._write(_KIND_CHUNK, payload, sync=sync)  # space was freed
        self._next_id += 1
        assert self._active is not None
        entry = _Entry(self._active.number, offset, len(payload), stored_at, chunk.chunk_id, digest)
        self._remember(rec_id, entry, self._active)
        return rec_id

    def _make_room(self, need: int) -> None:
        """Roll or raise BufferFullError so that ``need`` more bytes fit the limits."""
        active = self._active
        assert active is not None
        if self._used + need > self.max_bytes and active.size and not active.live:
            self._roll()  # invariant 8: let the acked active segment be deleted
            self._drop_empty_segments()
        if self._used + need > self.max_bytes:
            raise BufferFullError(f"disk buffer full ({self._used} of {self.max_bytes} bytes used)")
        assert self._active is not None
        if self._active.size and self._active.size + need > self.segment_bytes:
            self._roll()

    def _roll_for_space(self) -> bool:
        """After a failed write for lack of space: roll, so that the segment that was being
        written can be deleted once delivered. True if that freed bytes right away."""
        assert self._active is not None
        if not self._active.size:
            return False  # already a fresh segment: nothing to gain
        before = self._used
        self._roll()
        self._drop_empty_segments()
        return self._used < before

    def _remember(self, rec_id: int, entry: _Entry, seg: _Segment) -> None:
        self._pending[rec_id] = entry
        seg.live.add(rec_id)
        if entry.chunk_id is not None:
            self._by_key[(entry.chunk_id, entry.digest)] = rec_id

    def _forget(self, rec_id: int) -> None:
        entry = self._pending.pop(rec_id, None)
        if entry is None:
            return
        if entry.chunk_id is not None:
            key = (entry.chunk_id, entry.digest)
            if self._by_key.get(key) == rec_id:
                del self._by_key[key]
        seg = self._segments.get(entry.seg_no)
        if seg is not None:
            seg.live.discard(rec_id)

    def ack(self, rec_id: int) -> None:
        """Downstream acknowledged ``rec_id``: forget it, reclaim fully acked segments.

        If the ACK record cannot be written (ENOSPC...), the chunk is still forgotten
        (invariant 9): a restart may deliver it again, which is a duplicate, not a loss.
        """
        if rec_id not in self._pending:
            return
        try:
            self._write(_KIND_ACK, msgpack.packb([rec_id]), sync=False)
            self._ack_failing = False
        except OSError as exc:
            self.ack_write_errors += 1
            level = logging.DEBUG if self._ack_failing else logging.WARNING
            self._ack_failing = True  # one warning per episode, not one per chunk
            log.log(
                level,
                "disk buffer: cannot record the ack of chunk %d (%s); it may be "
                "delivered again after a restart",
                rec_id,
                exc,
            )
        self._forget(rec_id)
        active = self._active
        if active is not None and not active.live and active.size >= self.reclaim_bytes:
            with contextlib.suppress(OSError):  # no new file now: the next append rolls
                self._roll()  # invariant 8: the delivered active segment can go too
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
            fh.seek(entry.offset + _RECORD_HEADER[seg.version])
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
