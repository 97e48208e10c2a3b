"""Byte-level msgpack peeks on complete buffers: type-byte tests, header sizes, sub-unpackers.

Shared by the entry scanner and the connections, so that headers are read from the bytes and
objects skipped in C, never unpacked into Python objects.
"""

from __future__ import annotations

import struct
import zlib
from typing import Final

import msgpack

from ruletag.errors import RemoteProtocolError

# Everything msgpack, zlib and our byte peeks may raise on hostile input.
DECODE_ERRORS: Final = (
    msgpack.UnpackException,  # OutOfData, BufferFull, FormatError, StackError, ExtraData
    ValueError,  # UnicodeDecodeError, limit errors, bad ext payloads
    IndexError,  # a header peek past the end of a truncated payload
    TypeError,
    OverflowError,
    KeyError,
    struct.error,
    zlib.error,
)

_STR_LEN_BYTES: Final = {0xD9: 1, 0xDA: 2, 0xDB: 4}
_BIN_LEN_BYTES: Final = {0xC4: 1, 0xC5: 2, 0xC6: 4}
FLOAT_TYPES: Final = frozenset({0xCA, 0xCB})


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


def is_str(b: int) -> bool:
    return 0xA0 <= b <= 0xBF or b in _STR_LEN_BYTES


def is_bin(b: int) -> bool:
    return b in _BIN_LEN_BYTES


def is_map(b: int) -> bool:
    return 0x80 <= b <= 0x8F or b in (0xDE, 0xDF)


MAP_BYTES: Final = tuple(is_map(b) for b in range(256))


def is_array(b: int) -> bool:
    return 0x90 <= b <= 0x9F or b in (0xDC, 0xDD)


def raw_span(buf: bytes, pos: int) -> tuple[int, int]:
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


def pair_header(buf: bytes, pos: int) -> int:
    """Size of a 2-element array header at ``pos`` (0 if it is not one)."""
    b = buf[pos]
    if b == 0x92:
        return 1
    if b == 0xDC and buf[pos + 1 : pos + 3] == b"\x00\x02":
        return 3
    if b == 0xDD and buf[pos + 1 : pos + 5] == b"\x00\x00\x00\x02":
        return 5
    return 0


def time_size(buf: bytes, pos: int) -> tuple[int, bool]:
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


def array_header(buf: bytes, pos: int) -> tuple[int, int]:
    """(element count, header size) of the array header at ``pos``."""
    b = buf[pos]
    if 0x90 <= b <= 0x9F:
        return b & 0x0F, 1
    if b == 0xDC:
        return int.from_bytes(buf[pos + 1 : pos + 3], "big"), 3
    if b == 0xDD:
        return int.from_bytes(buf[pos + 1 : pos + 5], "big"), 5
    raise RemoteProtocolError(f"expected an array, got type byte 0x{b:02x}")


def sub_unpacker(buf: bytes | memoryview) -> msgpack.Unpacker:
    """A non-streaming unpacker over one complete buffer, limits sized to it."""
    unpacker = msgpack.Unpacker(raw=True, max_buffer_size=max(len(buf), 64))
    unpacker.feed(buf)
    return unpacker
