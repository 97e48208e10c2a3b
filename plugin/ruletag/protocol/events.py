"""Typed events the sans-IO codec produces and consumes (frozen, slotted dataclasses)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class EventTime:
    """Fluent EventTime (msgpack ext type 0): seconds and nanoseconds."""

    seconds: int
    nanoseconds: int = 0


@dataclass(frozen=True, slots=True)
class Chunk:
    """One forward-protocol message, whatever mode it arrived in.

    ``entries`` is the packed msgpack of the chunk's entries, back to back, exactly as a
    PackedForward payload would carry them (decompressed). Entries are ``[time, record]``
    unless ``v2`` says some are ``[[time, metadata], record]``. Record bytes are kept as they
    came, so an unchanged record can leave byte for byte. For ``signal`` 1 (metrics) and
    2 (traces) ``entries`` is the payload (checked to be complete msgpack objects), forwarded
    untouched.
    """

    tag: str
    entries: bytes
    count: int
    chunk_id: bytes | None = None  # the ``chunk`` option's raw str bytes; echoed in the ack
    signal: int = 0
    v2: bool = False
    options: dict[str, object] = field(default_factory=dict)  # other options, for logging
    #: Bytes this chunk holds in memory: the message size, with a compressed payload counted
    #: decompressed (what the in-flight limits count).
    size: int = 0
    wire_size: int = 0  # bytes of this message as received (0: not from the wire)
    #: Each entry's ``(start, end)`` in ``entries`` when the decoder already knows them (it
    #: validated every entry); None = compute with ``protocol.iter_entries``. Derived data: not
    #: compared, and must be reset (None) by whoever builds a chunk with other entries.
    spans: list[tuple[int, int]] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """A ``nil`` message: no events."""


@dataclass(frozen=True, slots=True)
class Authenticated:
    """The peer passed the shared-key handshake (server side) or we did (client side)."""

    hostname: str
    username: str = ""


@dataclass(frozen=True, slots=True)
class Helo:
    """Client side: the server's HELO arrived (the PING is already queued to send)."""

    nonce: bytes
    auth: bytes
    keepalive: bool = True


@dataclass(frozen=True, slots=True)
class Ack:
    """Client side: the downstream acknowledged ``chunk_id``."""

    chunk_id: bytes


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed the stream (``receive_data(b"")``) at a message boundary."""


Event = Chunk | Heartbeat | Authenticated | Helo | Ack | ConnectionClosed
