"""Sans-IO Fluent forward-protocol codec: bytes in, typed events out. No sockets, no asyncio.

One streaming ``msgpack.Unpacker`` per connection finds frame boundaries with ``skip()`` (in C,
resumable across reads, bounded by ``max_frame_size`` while buffering). Each complete frame is
then read structurally: headers are peeked from the bytes, objects are skipped in C, and the
entries are sliced out of the frame, never unpacked into Python objects. Str and bin stay
distinct because record bytes are never re-encoded.
"""

from __future__ import annotations

import base64
import hashlib
import math
import os
import struct
import zlib
from typing import Final, TypedDict

import msgpack

from ruletag.errors import AuthenticationError, LocalProtocolError, RemoteProtocolError
from ruletag.events import (
    Ack,
    Authenticated,
    Chunk,
    ConnectionClosed,
    Event,
    Heartbeat,
    Helo,
)

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "DEFAULT_MAX_INFLATE_MEMBERS",
    "DEFAULT_MAX_INFLATE_SIZE",
    "NEED_DATA",
    "ClientConnection",
    "ServerConnection",
    "encode_chunk",
    "entries_to_v1",
    "iter_entries",
    "new_chunk_id",
]

#: Returned by ``next_event`` when more bytes are needed.
NEED_DATA: Final = object()

#: Default largest frame (one msgpack message) we accept: fluentd's 8 MiB chunks plus slack.
DEFAULT_MAX_FRAME_SIZE: Final = 16 * 1024 * 1024
#: Default largest decompressed CompressedPackedForward payload (gzip-bomb cap).
DEFAULT_MAX_INFLATE_SIZE: Final = 64 * 1024 * 1024
#: Default most gzip members in one CompressedPackedForward payload (Fluent Bit sends 1).
DEFAULT_MAX_INFLATE_MEMBERS: Final = 1024

_FEED_STEP: Final = 256 * 1024  # bytes handed to the streaming unpacker at a time
_COMPACT_AT: Final = 1024 * 1024  # drop consumed bytes from the receive buffer past this
_INFLATE_STEP: Final = 256 * 1024  # largest output piece per zlib call
_INFLATE_WINDOW_MIN: Final = 64  # first input window per gzip member
_INFLATE_WINDOW_MAX: Final = 64 * 1024
#: Metrics/traces payloads are a few cmetrics/ctraces contexts; this bounds the Python loop.
_MAX_SIGNAL_OBJECTS: Final = 1_000_000
_SIGNALS: Final = frozenset({0, 1, 2})  # logs, metrics, traces (what Fluent Bit in_forward takes)
_PONG_SHARED_KEY_MISMATCH: Final = "shared_key mismatch"
_PONG_USER_MISMATCH: Final = "username/password mismatch"
_PONG_SAME_HOST: Final = "same hostname between input and output: invalid configuration"

# Everything msgpack, zlib and our byte peeks may raise on hostile input.
_DECODE_ERRORS: Final = (
    msgpack.UnpackException,  # OutOfData, BufferFull, FormatError, StackError, ExtraData
    ValueError,  # UnicodeDecodeError, limit errors, bad ext payloads
    IndexError,  # a header peek past the end of a truncated payload
    TypeError,
    OverflowError,
    KeyError,
    struct.error,
    zlib.error,
)

# ---------------------------------------------------------------------------------------------
# Byte-level helpers (header peeks on complete buffers)

_STR_LEN_BYTES: Final = {0xD9: 1, 0xDA: 2, 0xDB: 4}
_BIN_LEN_BYTES: Final = {0xC4: 1, 0xC5: 2, 0xC6: 4}
_FLOAT_TYPES: Final = frozenset({0xCA, 0xCB})


def _time_sizes() -> tuple[int, ...]:
    """Encoded size of a plain-int time by first byte (0: not a plain int)."""
    sizes = [0] * 256
    for b in range(0x00, 0x80):
        sizes[b] = 1
    for b in range(0xE0, 0x100):
        sizes[b] = 1
    for b, n in {0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9, 0xD0: 2, 0xD1: 3, 0xD2: 5, 0xD3: 9}.items():
        sizes[b] = n
    return tuple(sizes)


_INT_SIZE: Final = _time_sizes()


def _is_str(b: int) -> bool:
    return 0xA0 <= b <= 0xBF or b in _STR_LEN_BYTES


def _is_bin(b: int) -> bool:
    return b in _BIN_LEN_BYTES


def _is_map(b: int) -> bool:
    return 0x80 <= b <= 0x8F or b in (0xDE, 0xDF)


_MAP_BYTES: Final = tuple(_is_map(b) for b in range(256))


def _is_array(b: int) -> bool:
    return 0x90 <= b <= 0x9F or b in (0xDC, 0xDD)


def _raw_span(buf: bytes, pos: int) -> tuple[int, int]:
    """(start, end) of the payload of the str or bin object at ``pos``."""
    b = buf[pos]
    if 0xA0 <= b <= 0xBF:
        return pos + 1, pos + 1 + (b & 0x1F)
    width = _STR_LEN_BYTES.get(b) or _BIN_LEN_BYTES.get(b)
    if width is None:
        raise RemoteProtocolError(f"expected str or bin, got type byte 0x{b:02x}")
    start = pos + 1 + width
    end = start + int.from_bytes(buf[pos + 1 : start], "big")
    if end > len(buf) or start > len(buf):
        raise RemoteProtocolError("str/bin runs past the end of its container")
    return start, end


def _pair_header(buf: bytes, pos: int) -> int:
    """Size of a 2-element array header at ``pos`` (0 if it is not one)."""
    b = buf[pos]
    if b == 0x92:
        return 1
    if b == 0xDC and buf[pos + 1 : pos + 3] == b"\x00\x02":
        return 3
    if b == 0xDD and buf[pos + 1 : pos + 5] == b"\x00\x00\x00\x02":
        return 5
    return 0


def _time_size(buf: bytes, pos: int) -> tuple[int, bool]:
    """(size, is_float) of the time object at ``pos``: int, EventTime or float; else error."""
    b = buf[pos]
    size = _INT_SIZE[b]
    if size:
        return size, False
    if b == 0xD7 and buf[pos + 1] == 0:
        return 10, False
    if b == 0xC7 and buf[pos + 1] == 8 and buf[pos + 2] == 0:
        return 11, False
    if b == 0xCA:
        return 5, True
    if b == 0xCB:
        return 9, True
    raise RemoteProtocolError(f"invalid event time (type byte 0x{b:02x})")


def _array_header(buf: bytes, pos: int) -> tuple[int, int]:
    """(element count, header size) of the array header at ``pos``."""
    b = buf[pos]
    if 0x90 <= b <= 0x9F:
        return b & 0x0F, 1
    if b == 0xDC:
        return int.from_bytes(buf[pos + 1 : pos + 3], "big"), 3
    if b == 0xDD:
        return int.from_bytes(buf[pos + 1 : pos + 5], "big"), 5
    raise RemoteProtocolError(f"expected an array, got type byte 0x{b:02x}")


def _float_to_event_time(buf: bytes, pos: int) -> tuple[bytes, int]:
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


def _str_header(n: int) -> bytes:
    if n < 32:
        return bytes((0xA0 | n,))
    if n < 0x100:
        return b"\xd9" + bytes((n,))
    if n < 0x10000:
        return b"\xda" + n.to_bytes(2, "big")
    return b"\xdb" + n.to_bytes(4, "big")


def _bin_header(n: int) -> bytes:
    if n < 0x100:
        return b"\xc4" + bytes((n,))
    if n < 0x10000:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def _sub_unpacker(buf: bytes | memoryview) -> msgpack.Unpacker:
    """A non-streaming unpacker over one complete buffer, limits sized to it."""
    unpacker = msgpack.Unpacker(raw=True, max_buffer_size=max(len(buf), 64))
    unpacker.feed(buf)
    return unpacker


def _sha512_hex(*parts: bytes) -> str:
    h = hashlib.sha512()
    for part in parts:
        h.update(part)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Entries


def _scan_entries(
    buf: bytes, start: int, end: int, count: int | None, *, convert_float: bool
) -> tuple[int, bool, bytes | None, list[tuple[int, int]] | None]:
    """Validate the packed entries ``buf[start:end]``.

    Returns (count, v2, rewritten, spans) where ``rewritten`` is None when the bytes can be
    used as they are, else the entries with float times turned into EventTime
    (``convert_float``). ``spans`` are the entries' ``(start, end)`` relative to ``start``
    (what :func:`iter_entries` would return), None when rewritten. ``count`` None means
    "until ``end``".
    """
    unpacker = _sub_unpacker(memoryview(buf)[start:end])
    pieces: list[bytes] | None = None
    last = start
    v2 = False
    n = 0
    pos = start
    limit = count if count is not None else end - start  # an entry takes >= 3 bytes
    skip = unpacker.skip
    tell = unpacker.tell
    ends: list[int] = []
    add_end = ends.append
    while n < limit and pos < end:
        # Fast path: fixarray(2) + fixext8 EventTime + map record, Fluent Bit's v1 shape.
        if buf[pos] == 0x92 and buf[pos + 1] == 0xD7 and buf[pos + 2] == 0:
            skip()
            entry_end = tell()
            add_end(entry_end)
            entry_end += start
            if not _MAP_BYTES[buf[pos + 11]]:
                raise RemoteProtocolError(f"entry {n}: record is not a map")
            pos = entry_end
            n += 1
            continue
        if buf[pos] == 0x92 and buf[pos + 1] == 0x92 and buf[pos + 2] == 0xD7 and not buf[pos + 3]:
            # Fluent Bit 5's default: [[EventTime, metadata], record] (no float to convert).
            v2 = True
            skip()
            entry_end = tell()
            add_end(entry_end)
            pos = entry_end + start
            n += 1
            continue
        header = _pair_header(buf, pos)
        if not header:
            raise RemoteProtocolError(f"entry {n} is not a [time, record] array")
        t = pos + header
        inner = _pair_header(buf, t)
        if inner:  # [[time, metadata], record]
            v2 = True
            t += inner
        size, is_float = _time_size(buf, t)
        skip()
        entry_end = tell()
        add_end(entry_end)
        entry_end += start
        if not inner and not _MAP_BYTES[buf[t + size]]:
            raise RemoteProtocolError(f"entry {n}: record is not a map")
        if is_float and convert_float:
            event_time, _ = _float_to_event_time(buf, t)
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
        unpacker = _sub_unpacker(entries)
        start = 0
        total = len(entries)
        while start < total:
            unpacker.skip()
            end = unpacker.tell()
            spans.append((start, end))
            start = end
    except _DECODE_ERRORS as exc:
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
    except _DECODE_ERRORS as exc:
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
    unpacker = _sub_unpacker(entries) if pos < total else None
    while pos < total:
        assert unpacker is not None
        header = _pair_header(entries, pos)
        inner = _pair_header(entries, pos + header) if header else 0
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


def _inflate(data: bytes, limit: int, max_members: int) -> bytes:
    """Gunzip ``data`` (one or more members) in one pass, linear in input plus output.

    Refuses more than ``limit`` output bytes or more than ``max_members`` members. Zero
    padding after the last member is accepted.
    """
    view = memoryview(data)
    total = len(data)
    out: list[bytes] = []
    pos = produced = members = 0
    while pos < total:
        if members and data[pos] == 0 and data.count(0, pos) == total - pos:
            break  # zero padding after the last member
        members += 1
        if members > max_members:
            raise RemoteProtocolError(f"gzip payload has more than {max_members} members")
        pos, produced = _inflate_member(view, pos, out, produced, limit)
    return b"".join(out)


def _inflate_member(
    view: memoryview, pos: int, out: list[bytes], produced: int, limit: int
) -> tuple[int, int]:
    """Inflate the gzip member at ``view[pos:]`` into ``out``.

    Returns (where the member ends, total bytes produced so far). Input goes in through
    windows that start small and double up to ``_INFLATE_WINDOW_MAX``, so zlib's copies of
    input it did not use stay proportional to the member's size.
    """
    d = zlib.decompressobj(wbits=31)
    total = len(view)
    window = _INFLATE_WINDOW_MIN
    while True:
        piece = view[pos : pos + window]
        chunk = d.decompress(piece, max(1, min(_INFLATE_STEP, limit - produced + 1)))
        produced += len(chunk)
        if produced > limit:
            raise RemoteProtocolError(f"decompressed payload exceeds {limit} bytes")
        if chunk:
            out.append(chunk)
        if d.eof:
            return pos + len(piece) - len(d.unused_data), produced
        consumed = len(piece) - len(d.unconsumed_tail)
        pos += consumed
        if not chunk and not consumed and (pos >= total or window == _INFLATE_WINDOW_MAX):
            raise RemoteProtocolError("truncated gzip payload")
        window = min(window * 2, _INFLATE_WINDOW_MAX)


def _check_msgpack_sequence(payload: bytes, signal: int) -> None:
    """Raise unless ``payload`` is a sequence of complete msgpack objects (skipped in C)."""
    unpacker = _sub_unpacker(payload)
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


# ---------------------------------------------------------------------------------------------
# Framing


class _FrameReader:
    """Split a byte stream into complete top-level msgpack objects, bounded in size."""

    def __init__(self, max_frame_size: int) -> None:
        self._max = max_frame_size
        self._unpacker = msgpack.Unpacker(raw=True, max_buffer_size=max_frame_size)
        self._buf = bytearray()
        self._base = 0  # stream offset of self._buf[0]
        self._fed = 0  # stream offset up to which bytes went to the unpacker
        self._frame_start = 0  # stream offset of the current frame
        self.eof = False

    def receive(self, data: bytes) -> None:
        if self.eof:
            raise LocalProtocolError("receive_data() after EOF")
        if data:
            self._buf += data
        else:
            self.eof = True

    def next_frame(self) -> bytes | None:
        """The next complete frame, or None when more bytes are needed (or at a clean EOF)."""
        while True:
            try:
                self._unpacker.skip()
            except msgpack.OutOfData:
                if self._feed():
                    continue
                if self.eof and self._fed > self._frame_start:
                    raise RemoteProtocolError(
                        "connection closed in the middle of a message"
                    ) from None
                return None
            end = self._unpacker.tell()
            lo = self._frame_start - self._base
            frame = bytes(self._buf[lo : end - self._base])
            self._frame_start = end
            consumed = end - self._base
            if consumed >= _COMPACT_AT or consumed == len(self._buf):
                del self._buf[:consumed]
                self._base = end
            return frame

    def _feed(self) -> bool:
        available = self._base + len(self._buf) - self._fed
        if not available:
            return False
        room = self._max - (self._fed - self._frame_start)
        if room <= 0:
            raise RemoteProtocolError(f"message larger than max_frame_size ({self._max} bytes)")
        step = min(available, room, _FEED_STEP)
        lo = self._fed - self._base
        self._unpacker.feed(memoryview(self._buf)[lo : lo + step])
        self._fed += step
        return True


class _Connection:
    """What both sides share: the frame reader, the queue of bytes to send, a latched error."""

    def __init__(self, max_frame_size: int) -> None:
        self._reader = _FrameReader(max_frame_size)
        self._out = bytearray()
        self._error: RemoteProtocolError | None = None

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the peer; ``b""`` means the peer closed its side."""
        self._reader.receive(data)

    def data_to_send(self) -> bytes:
        """Bytes queued for the peer (PING or PONG); empties the queue."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def next_event(self) -> Event | object:
        """The next event, ``NEED_DATA``, or raise ``RemoteProtocolError`` (then always)."""
        if self._error is not None:
            raise RemoteProtocolError(f"connection already failed: {self._error}")
        try:
            return self._next_event()
        except RemoteProtocolError as exc:
            self._error = exc
            raise
        except _DECODE_ERRORS as exc:
            self._error = RemoteProtocolError(f"malformed message: {exc!r}")
            raise self._error from exc

    def _next_event(self) -> Event | object:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# Server side


class _ChunkCommon(TypedDict):
    """The ``Chunk`` fields every message mode fills the same way."""

    chunk_id: bytes | None
    options: dict[str, object]
    size: int
    wire_size: int
    signal: int


class ServerConnection(_Connection):
    """Server side of one forward connection.

    Usage: send ``initial_bytes()`` on connect (HELO when a shared key is set); for each read
    call ``receive_data(data)`` (``b""`` at EOF), then call ``next_event()`` until it returns
    ``NEED_DATA``; after each event write ``data_to_send()`` (PONG bytes, ...). Acks are built
    with ``ack(chunk_id)``. Bad input raises ``RemoteProtocolError`` (close this connection);
    a failed handshake raises ``AuthenticationError`` after queuing the PONG-false reply when
    the peer is owed one.
    """

    def __init__(
        self,
        *,
        shared_key: bytes | None = None,
        users: dict[bytes, bytes] | None = None,
        hostname: str = "ruletag",
        tag_prefix: str = "",
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        max_inflate_size: int = DEFAULT_MAX_INFLATE_SIZE,
        max_inflate_members: int = DEFAULT_MAX_INFLATE_MEMBERS,
        nonce: bytes | None = None,
        auth_salt: bytes | None = None,
    ) -> None:
        if users and shared_key is None:
            raise LocalProtocolError("users need a shared_key (as in Fluent Bit and fluentd)")
        super().__init__(max_frame_size)
        self._shared_key = shared_key
        self._users = dict(users or {})
        self._hostname = hostname
        self._tag_prefix = tag_prefix
        self._max_inflate = max_inflate_size
        self._max_members = max_inflate_members
        self._nonce = nonce if nonce is not None else os.urandom(16)
        if auth_salt is None:
            auth_salt = os.urandom(16) if self._users else b""
        self._auth_salt = auth_salt
        self._authenticated = shared_key is None

    def initial_bytes(self) -> bytes:
        """HELO (nonce and auth as bin, keepalive true) when a shared key is set, else b""."""
        if self._shared_key is None:
            return b""
        helo = {"nonce": self._nonce, "auth": self._auth_salt, "keepalive": True}
        return msgpack.packb(["HELO", helo], use_bin_type=True)

    def _next_event(self) -> Event | object:
        frame = self._reader.next_frame()
        if frame is None:
            return ConnectionClosed() if self._reader.eof else NEED_DATA
        if not self._authenticated:
            return self._handle_ping(frame)
        return self._decode(frame)

    @property
    def buffered_bytes(self) -> int:
        """Bytes received and not yet returned as a frame (a partial or undecoded frame)."""
        reader = self._reader
        return reader._base + len(reader._buf) - reader._frame_start

    def ack(self, chunk_id: bytes) -> bytes:
        """``{"ack": chunk_id}`` with the id as msgpack str, bytes echoed exactly."""
        return b"\x81\xa3ack" + _str_header(len(chunk_id)) + chunk_id

    # -- handshake ----------------------------------------------------------------------------

    def _handle_ping(self, frame: bytes) -> Event:
        ping = msgpack.unpackb(frame, raw=True)
        if (
            not isinstance(ping, list)
            or len(ping) != 6
            or ping[0] != b"PING"
            or not all(isinstance(x, bytes) for x in ping[1:])
        ):
            raise RemoteProtocolError("expected PING before any data")
        _, host, salt, digest, username, password_digest = ping
        hostname = host.decode("utf-8", "replace")
        assert self._shared_key is not None
        reason = ""
        if hostname == self._hostname:
            reason = _PONG_SAME_HOST
        elif digest != _sha512_hex(salt, host, self._nonce, self._shared_key).encode():
            reason = _PONG_SHARED_KEY_MISMATCH
        elif self._users:
            password = self._users.get(username)
            expected = _sha512_hex(self._auth_salt, username, password or b"").encode()
            if password is None or password_digest != expected:
                reason = _PONG_USER_MISMATCH
        if reason:
            self._out += msgpack.packb(["PONG", False, reason, "", ""], use_bin_type=True)
            raise AuthenticationError(reason)
        server_digest = _sha512_hex(salt, self._hostname.encode(), self._nonce, self._shared_key)
        self._out += msgpack.packb(
            ["PONG", True, "", self._hostname, server_digest], use_bin_type=True
        )
        self._authenticated = True
        user = username.decode("utf-8", "replace") if self._users else ""
        return Authenticated(hostname=hostname, username=user)

    # -- messages -----------------------------------------------------------------------------

    def _decode(self, frame: bytes) -> Event:
        first = frame[0]
        if first == 0xC0:
            return Heartbeat()
        if not _is_array(first):
            raise RemoteProtocolError(f"message is not an array (type byte 0x{first:02x})")
        u = _sub_unpacker(frame)
        length = u.read_array_header()
        if length < 2:
            raise RemoteProtocolError("message array has fewer than 2 elements")
        pos = u.tell()
        if not _is_str(frame[pos]):
            raise RemoteProtocolError("tag is not a str")
        tag = self._tag_prefix + u.unpack().decode("utf-8")
        second = u.tell()
        kind = frame[second]
        if _is_array(kind):
            mode = "forward"
        elif _is_str(kind) or _is_bin(kind):
            mode = "packed"
        else:
            mode = "message"
            _time_size(frame, second)  # validates int / EventTime / float
        if mode == "message":
            if length not in (3, 4):
                raise RemoteProtocolError("Message mode needs 3 or 4 elements")
            u.skip()
            record_at = u.tell()
            if not _is_map(frame[record_at]):
                raise RemoteProtocolError("Message mode record is not a map")
            u.skip()
            record_end = u.tell()
        else:
            if length > 3:
                raise RemoteProtocolError("Forward/PackedForward message has more than 3 elements")
            u.skip()
            record_at = record_end = u.tell()
        has_options = length == (4 if mode == "message" else 3)
        options, chunk_id, spans = self._options(frame, u) if has_options else ({}, None, {})
        signal = options.get("fluent_signal", 0)
        assert isinstance(signal, int)  # _options checked it
        common: _ChunkCommon = {
            "chunk_id": chunk_id,
            "options": options,
            "size": len(frame),
            "wire_size": len(frame),
            "signal": signal,
        }
        if mode == "message":
            entry = self._message_entry(frame, second, record_at, record_end, spans)
            return Chunk(tag=tag, entries=entry, count=1, v2="metadata" in spans, **common)
        if mode == "forward":
            count, header = _array_header(frame, second)
            start = second + header
            if signal:
                return Chunk(tag=tag, entries=frame[start:record_at], count=count, **common)
            count, v2, rewritten, spans_ = _scan_entries(
                frame, start, record_at, count, convert_float=True
            )
            entries = rewritten if rewritten is not None else frame[start:record_at]
            return Chunk(tag=tag, entries=entries, count=count, v2=v2, spans=spans_, **common)
        lo, hi = _raw_span(frame, second)
        payload = frame[lo:hi]
        if options.get("compressed") == "gzip" or payload[:2] == b"\x1f\x8b":
            payload = _inflate(payload, self._max_inflate, self._max_members)
            common["size"] = len(frame) - (hi - lo) + len(payload)
        if signal:
            _check_msgpack_sequence(payload, signal)
            return Chunk(tag=tag, entries=payload, count=1, **common)
        count, v2, _, spans_ = _scan_entries(payload, 0, len(payload), None, convert_float=False)
        return Chunk(tag=tag, entries=payload, count=count, v2=v2, spans=spans_, **common)

    def _options(
        self, frame: bytes, u: msgpack.Unpacker
    ) -> tuple[dict[str, object], bytes | None, dict[str, tuple[int, int]]]:
        """Parse the option map: (options for logging, chunk id, raw value spans by key)."""
        pos = u.tell()
        if frame[pos] == 0xC0:
            return {}, None, {}
        if not _is_map(frame[pos]):
            raise RemoteProtocolError("option is not a map")
        options: dict[str, object] = {}
        spans: dict[str, tuple[int, int]] = {}
        chunk_id: bytes | None = None
        for _ in range(u.read_map_header()):
            key_at = u.tell()
            if _is_str(frame[key_at]):
                key = u.unpack().decode("utf-8", "replace")
            else:
                u.skip()
                key = ""
            value_at = u.tell()
            u.skip()
            value_end = u.tell()
            if not key:
                continue
            spans[key] = (value_at, value_end)
            raw = frame[value_at:value_end]
            if key == "chunk":
                if not _is_str(frame[value_at]):
                    raise RemoteProtocolError("option 'chunk' must be a str")
                lo, hi = _raw_span(frame, value_at)
                chunk_id = frame[lo:hi]
                continue
            try:
                value = msgpack.unpackb(raw, raw=False, strict_map_key=False)
            except UnicodeDecodeError:
                value = msgpack.unpackb(raw, raw=True, strict_map_key=False)
            if key == "fluent_signal" and (type(value) is not int or value not in _SIGNALS):
                raise RemoteProtocolError(f"bad fluent_signal {value!r}")
            if key == "compressed" and value not in ("gzip", "text", ""):
                raise RemoteProtocolError(f"unsupported compression {value!r}")
            if key == "metadata" and not _is_map(frame[value_at]):
                raise RemoteProtocolError("option 'metadata' must be a map")
            options[key] = value
        if u.tell() != len(frame):
            raise RemoteProtocolError("trailing bytes after the option map")
        return options, chunk_id, spans

    @staticmethod
    def _message_entry(
        frame: bytes,
        time_at: int,
        record_at: int,
        record_end: int,
        spans: dict[str, tuple[int, int]],
    ) -> bytes:
        """Build ``[time, record]`` (or ``[[time, metadata], record]``) from frame slices."""
        if frame[time_at] in _FLOAT_TYPES:
            time_bytes, _ = _float_to_event_time(frame, time_at)
        else:
            time_bytes = frame[time_at:record_at]
        record = frame[record_at:record_end]
        meta = spans.get("metadata")
        if meta is None:
            return b"\x92" + time_bytes + record
        return b"\x92\x92" + time_bytes + frame[meta[0] : meta[1]] + record


# ---------------------------------------------------------------------------------------------
# Client side


class ClientConnection(_Connection):
    """Client (forwarder) side: handshake, then chunks out and acks in."""

    def __init__(
        self,
        *,
        shared_key: bytes | None = None,
        username: str = "",
        password: str = "",
        hostname: str = "ruletag",
        max_frame_size: int = 1024 * 1024,
        salt: bytes | None = None,
    ) -> None:
        super().__init__(max_frame_size)
        self._shared_key = shared_key
        self._username = username.encode()
        self._password = password.encode()
        self._hostname = hostname
        self._salt = salt if salt is not None else os.urandom(16).hex().encode()
        self._state = "helo" if shared_key is not None else "ready"
        self._nonce = b""

    @property
    def ready(self) -> bool:
        """True once chunks may be sent (no handshake needed, or it succeeded)."""
        return self._state == "ready" and self._error is None

    def _next_event(self) -> Event | object:
        """``Helo`` (PING queued), ``Authenticated``, ``Ack``, ``ConnectionClosed`` or
        ``NEED_DATA``."""
        frame = self._reader.next_frame()
        if frame is None:
            if not self._reader.eof:
                return NEED_DATA
            if self._state == "pong":
                raise AuthenticationError("server closed the connection instead of a PONG")
            return ConnectionClosed()
        message = msgpack.unpackb(frame, raw=True, strict_map_key=False)
        if self._state == "helo":
            return self._on_helo(message)
        if self._state == "pong":
            return self._on_pong(message)
        return self._on_ack(message)

    def _on_helo(self, message: object) -> Event:
        if not (
            isinstance(message, list)
            and len(message) == 2
            and message[0] == b"HELO"
            and isinstance(message[1], dict)
        ):
            raise RemoteProtocolError("expected HELO from the server")
        opts = message[1]
        nonce = opts.get(b"nonce")
        auth = opts.get(b"auth")
        if not isinstance(nonce, bytes) or not isinstance(auth, bytes | None):
            raise RemoteProtocolError("HELO nonce/auth must be str or bin")
        keepalive = opts.get(b"keepalive", True)
        assert self._shared_key is not None
        self._nonce = nonce
        host = self._hostname.encode()
        digest = _sha512_hex(self._salt, host, nonce, self._shared_key)
        # fluentd's rule (forward-protocol.md 1.6): a digest only when HELO carries an auth salt.
        password_digest = _sha512_hex(auth, self._username, self._password) if auth else ""
        self._out += msgpack.packb(
            ["PING", host, self._salt, digest, self._username, password_digest],
            use_bin_type=False,  # every PING field as msgpack str (Fluent Bit refuses bin)
        )
        self._state = "pong"
        return Helo(nonce=nonce, auth=auth or b"", keepalive=bool(keepalive))

    def _on_pong(self, message: object) -> Event:
        if not (isinstance(message, list) and len(message) == 5 and message[0] == b"PONG"):
            raise RemoteProtocolError("expected PONG from the server")
        _, ok, reason, server_host, digest = message
        if ok is not True:
            text = reason.decode("utf-8", "replace") if isinstance(reason, bytes) else reason
            raise AuthenticationError(f"server refused the handshake: {text}")
        if not isinstance(server_host, bytes) or not isinstance(digest, bytes):
            raise RemoteProtocolError("malformed PONG")
        if server_host == self._hostname.encode():
            raise AuthenticationError("same hostname between input and output")
        assert self._shared_key is not None
        expected = _sha512_hex(self._salt, server_host, self._nonce, self._shared_key)
        if digest != expected.encode():
            raise AuthenticationError("PONG digest mismatch: the server does not know the key")
        self._state = "ready"
        return Authenticated(
            hostname=server_host.decode("utf-8", "replace"),
            username=self._username.decode(),
        )

    @staticmethod
    def _on_ack(message: object) -> Event:
        if not isinstance(message, dict) or not isinstance(message.get(b"ack"), bytes):
            raise RemoteProtocolError("expected {'ack': <chunk id>} from the server")
        return Ack(chunk_id=message[b"ack"])


# ---------------------------------------------------------------------------------------------
# Encoding


def encode_chunk(
    tag: str,
    entries: bytes,
    count: int,
    *,
    chunk_id: bytes | None = None,
    compress: bool = False,
    signal: int = 0,
) -> bytes:
    """PackedForward with a bin payload: ``[tag, entries, {size, chunk?, compressed?,
    fluent_signal}]``. ``compress`` gzips the entries (one member)."""
    if compress:
        entries = _gzip(entries)
    tag_bytes = tag.encode("utf-8")
    keys = 2 + (chunk_id is not None) + compress
    parts = [
        b"\x93",
        _str_header(len(tag_bytes)),
        tag_bytes,
        _bin_header(len(entries)),
        entries,
        bytes((0x80 | keys,)),
        b"\xa4size",
        msgpack.packb(count),
    ]
    if chunk_id is not None:
        parts += (b"\xa5chunk", _str_header(len(chunk_id)), chunk_id)
    if compress:
        parts.append(b"\xaacompressed\xa4gzip")
    parts += (b"\xadfluent_signal", msgpack.packb(signal))
    return b"".join(parts)


def _gzip(data: bytes) -> bytes:
    """One gzip member (mtime 0, so equal input gives equal bytes)."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
    return compressor.compress(data) + compressor.flush()


def new_chunk_id() -> bytes:
    """A fresh random chunk id: base64 of 16 random bytes (24 ASCII bytes)."""
    return base64.b64encode(os.urandom(16))
