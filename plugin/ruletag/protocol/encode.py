"""Encoders: outgoing PackedForward chunks, ack replies and fresh chunk ids."""

from __future__ import annotations

import base64
import os

import msgpack

from ruletag.protocol.compression import gzip


def _sized_header(n: int, codes: bytes) -> bytes:
    """A msgpack str/bin header: ``codes[i]`` then ``n`` in 1, 2 or 4 big-endian bytes."""
    i = 0 if n < 0x100 else 1 if n < 0x10000 else 2
    return codes[i : i + 1] + n.to_bytes(1 << i, "big")


def _str_header(n: int) -> bytes:
    return bytes((0xA0 | n,)) if n < 32 else _sized_header(n, b"\xd9\xda\xdb")


def _bin_header(n: int) -> bytes:
    return _sized_header(n, b"\xc4\xc5\xc6")


def encode_ack(chunk_id: bytes) -> bytes:
    """``{"ack": chunk_id}`` with the id as msgpack str, bytes echoed exactly."""
    return b"\x81\xa3ack" + _str_header(len(chunk_id)) + chunk_id


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
        entries = gzip(entries)
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


def new_chunk_id() -> bytes:
    """A fresh random chunk id: base64 of 16 random bytes (24 ASCII bytes)."""
    return base64.b64encode(os.urandom(16))
