"""Packed entries: validate and scan them, find each entry's bytes, rewrite v2 as v1.

An entry is ``[time, record]`` or, from Fluent Bit 5 and fluentd with metadata,
``[[time, metadata], record]``. Float times (old fluent-logger clients) become EventTime.
"""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Callable
from typing import Final

import msgpack

from ruletag.errors import RemoteProtocolError
from ruletag.extensions import extension
from ruletag.protocol.peek import (
    DECODE_ERRORS,
    MAP_BYTES,
    pair_header,
    sub_unpacker,
    time_size,
)

#: the C walk's interface version this code calls (``WIRE_ABI`` in ``_wire.c``)
WIRE_ABI: Final = 1


def _walker() -> Callable[[bytes, int, int, int, int], tuple[list[int], int, bool]] | None:
    """The C walk of the usual entry shapes (``_wire.c``), or None: not built, another
    build's (warned), or ``RULETAG_PURE_PYTHON`` set (the loop in :func:`scan_entries` is the
    reference)."""
    log = logging.getLogger(__name__)
    wire = extension("ruletag.protocol", "_wire", WIRE_ABI, "entry walk", log, [])
    return None if wire is None else wire.entry_ends


_WALK: Final = _walker()

#: Metrics/traces payloads are a few cmetrics/ctraces contexts; this bounds the Python loop.
_MAX_SIGNAL_OBJECTS: Final = 1_000_000


def float_to_event_time(buf: bytes, pos: int) -> tuple[bytes, int]:
    """Re-encode the float time at ``pos`` as fixext8 EventTime; returns (bytes, float size)."""
    if buf[pos] == 0xCA:
        (value,) = struct.unpack_from(">f", buf, pos + 1)
        size = 5
    else:
        (value,) = struct.unpack_from(">d", buf, pos + 1)
        size = 9
    if not math.isfinite(value) or not 0 <= value < 2**32:
        raise RemoteProtocolError(f"float event time out of range: {value!r}")
    seconds = int(value)
    nanos = min(round((value - seconds) * 1e9), 999_999_999)
    return b"\xd7\x00" + struct.pack(">II", seconds, nanos), size


def scan_entries(
    buf: bytes, start: int, end: int, count: int | None, *, convert_float: bool
) -> tuple[int, bool, bytes | None, list[tuple[int, int]] | None]:
    """Validate the packed entries ``buf[start:end]``.

    Returns (count, v2, rewritten, spans) where ``rewritten`` is None when the bytes can be
    used as they are, else the entries with float times turned into EventTime
    (``convert_float``). ``spans`` are the entries' ``(start, end)`` relative to ``start``
    (what :func:`iter_entries` would return), None when rewritten. ``count`` None means
    "until ``end``".
    """
    pieces: list[bytes] | None = None
    last = start
    v2 = False
    n = 0
    pos = start
    limit = count if count is not None else end - start  # an entry takes >= 3 bytes
    ends: list[int] = []
    add_end = ends.append
    walk = _WALK
    base = -1  # where the unpacker below starts (-1: none yet)
    while n < limit and pos < end:
        if walk is not None:  # the usual shapes in C; anything else below, one entry
            got, pos, seen_v2 = walk(buf, start, pos, end, limit - n)
            if got:
                ends += got
                n += len(got)
                v2 = v2 or seen_v2
                base = -1
                continue
        if base < 0:  # (re)start the unpacker at pos: skip/tell are relative to pos
            base = pos
            unpacker = sub_unpacker(memoryview(buf)[pos:end])
            skip = unpacker.skip
            tell = unpacker.tell
        # Fast path: fixarray(2) + fixext8 EventTime + map record, Fluent Bit's v1 shape.
        if buf[pos] == 0x92 and buf[pos + 1] == 0xD7 and buf[pos + 2] == 0:
            skip()
            entry_end = tell() + base
            add_end(entry_end - start)
            if not MAP_BYTES[buf[pos + 11]]:
                raise RemoteProtocolError(f"entry {n}: record is not a map")
            pos = entry_end
            n += 1
            continue
        if buf[pos] == 0x92 and buf[pos + 1] == 0x92 and buf[pos + 2] == 0xD7 and not buf[pos + 3]:
            # Fluent Bit 5's default: [[EventTime, metadata], record] (no float to convert).
            v2 = True
            skip()
            pos = tell() + base
            add_end(pos - start)
            n += 1
            continue
        header = pair_header(buf, pos)
        if not header:
            raise RemoteProtocolError(f"entry {n} is not a [time, record] array")
        t = pos + header
        inner = pair_header(buf, t)
        if inner:  # [[time, metadata], record]
            v2 = True
            t += inner
        size, is_float = time_size(buf, t)
        skip()
        entry_end = tell() + base
        add_end(entry_end - start)
        if not inner and not MAP_BYTES[buf[t + size]]:
            raise RemoteProtocolError(f"entry {n}: record is not a map")
        if is_float and convert_float:
            event_time, _ = float_to_event_time(buf, t)
            prefix = b"\x92\x92" if inner else b"\x92"
            if pieces is None:
                pieces = []
            pieces += (buf[last:pos], prefix, event_time, buf[t + size : entry_end])
            last = entry_end
        pos = entry_end
        n += 1
    if count is not None and n != count:
        raise RemoteProtocolError("fewer entries than the array header says")
    if pos != end:
        raise RemoteProtocolError("entries do not end where their container ends")
    if pieces is None:
        return n, v2, None, list(zip([0, *ends], ends, strict=False))
    pieces.append(buf[last:end])
    return n, v2, b"".join(pieces), None


def iter_entries(entries: bytes) -> list[tuple[int, int]]:
    """Byte spans ``(start, end)`` of each entry in a packed entries buffer."""
    spans: list[tuple[int, int]] = []
    try:
        unpacker = sub_unpacker(entries)
        start = 0
        total = len(entries)
        while start < total:
            unpacker.skip()
            end = unpacker.tell()
            spans.append((start, end))
            start = end
    except DECODE_ERRORS as exc:
        raise RemoteProtocolError(f"malformed entries: {exc!r}") from exc
    return spans


def entries_to_v1(entries: bytes, spans: list[tuple[int, int]] | None = None) -> bytes:
    """Rewrite ``[[time, meta], record]`` entries as ``[time, record]``; others unchanged.

    ``spans`` are the entries' ``(start, end)`` when already known (``Chunk.spans``). With
    them, the shape Fluent Bit 5 sends (fixarrays, EventTime, empty metadata) is rewritten by
    peeking bytes; the first entry of any other shape hands the rest to a msgpack walk.
    """
    pieces: list[bytes] = []
    try:
        pos, last = _peek_to_v1(entries, spans, pieces) if spans is not None else (0, 0)
        _v2_to_v1_from(entries, pos, pieces, last)
    except DECODE_ERRORS as exc:
        raise RemoteProtocolError(f"malformed entries: {exc!r}") from exc
    if not pieces:
        return entries
    return b"".join(pieces)


def _peek_to_v1(
    entries: bytes, spans: list[tuple[int, int]], pieces: list[bytes]
) -> tuple[int, int]:
    """Rewrite Fluent Bit 5's v2 shape by byte peeks, appending to ``pieces``.

    Returns ``(pos, last)``: where the first entry of another shape starts (the end when
    there is none), and where the bytes not yet in ``pieces`` start.
    """
    last = 0
    for start, _end in spans:
        head = entries[start : start + 3]
        if head == b"\x92\x92\xd7":  # [[EventTime, meta], record]
            meta = start + 12
            if entries[meta] == 0x80:
                record = meta + 1
            elif entries[meta : meta + 5] == b"\xdf\x00\x00\x00\x00":  # empty map32
                record = meta + 5
            else:
                return start, last
            pieces += (entries[last : start + 1], entries[start + 2 : meta])
            last = record
        elif head[:2] != b"\x92\xd7":  # not [EventTime, record] either
            return start, last
    return len(entries), last


def _v2_to_v1_from(entries: bytes, pos: int, pieces: list[bytes], last: int) -> None:
    """Walk ``entries[pos:]`` with msgpack, appending the v1 rewrite to ``pieces``.

    ``last`` is where the bytes not yet in ``pieces`` start. Appends the tail only when
    something was rewritten (``pieces`` stays empty for an all-v1 buffer).
    """
    if 0 < pos < len(entries):  # walk a copy of the rest: offsets then start at 0
        pieces.append(entries[last:pos])
        entries, pos, last = entries[pos:], 0, 0
    total = len(entries)
    unpacker = sub_unpacker(entries) if pos < total else None
    while pos < total:
        assert unpacker is not None
        header = pair_header(entries, pos)
        inner = pair_header(entries, pos + header) if header else 0
        if not inner:
            unpacker.skip()
            pos = unpacker.tell()
            continue
        unpacker.read_array_header()
        unpacker.read_array_header()
        time_start = unpacker.tell()
        unpacker.skip()  # time
        time_end = unpacker.tell()
        unpacker.skip()  # metadata
        record_start = unpacker.tell()
        unpacker.skip()  # record
        entry_end = unpacker.tell()
        pieces += (
            entries[last:pos],
            b"\x92",
            entries[time_start:time_end],
            entries[record_start:entry_end],
        )
        last = pos = entry_end
    if pieces:
        pieces.append(entries[last:])


def check_msgpack_sequence(payload: bytes, signal: int) -> None:
    """Raise unless ``payload`` is a sequence of complete msgpack objects (skipped in C)."""
    unpacker = sub_unpacker(payload)
    skip = unpacker.skip
    tell = unpacker.tell
    total = len(payload)
    try:
        for _ in range(_MAX_SIGNAL_OBJECTS):
            if tell() >= total:
                return
            skip()
    except msgpack.OutOfData:
        raise RemoteProtocolError(
            f"fluent_signal {signal} payload ends inside a msgpack object"
        ) from None
    except (msgpack.UnpackException, ValueError) as exc:
        raise RemoteProtocolError(
            f"fluent_signal {signal} payload is not msgpack: {exc!r}"
        ) from None
    if tell() < total:
        raise RemoteProtocolError(
            f"fluent_signal {signal} payload has more than {_MAX_SIGNAL_OBJECTS} msgpack objects"
        )
