"""gzip for CompressedPackedForward: a bounded, linear inflate and a reproducible deflate."""

from __future__ import annotations

import zlib
from typing import Final

from ruletag.errors import RemoteProtocolError

_INFLATE_STEP: Final = 256 * 1024  # largest output piece per zlib call
_INFLATE_WINDOW_MIN: Final = 64  # first input window per gzip member
_INFLATE_WINDOW_MAX: Final = 64 * 1024


def inflate(data: bytes, limit: int, max_members: int) -> bytes:
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


def gzip(data: bytes) -> bytes:
    """One gzip member (mtime 0, so equal input gives equal bytes)."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
    return compressor.compress(data) + compressor.flush()
