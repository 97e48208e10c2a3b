"""Encoders: outgoing PackedForward chunks, ack replies and fresh chunk ids."""

from __future__ import annotations

import base64
import os

import msgpack

from ruletag.protocol.compression import gzip


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
