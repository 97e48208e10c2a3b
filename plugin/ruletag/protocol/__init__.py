"""The Fluent forward protocol without I/O (like h11): bytes in, typed events out.

Other layers use only what is exported here: the two connection ends, the events, the
encoders and the entry helpers. Modules: ``events`` (the typed events), ``framing`` (frame
reader), ``peek`` (msgpack header peeks), ``entries`` (entry scanning, v2 -> v1, float time),
``compression`` (gzip), ``connection`` (``ServerConnection``, ``ClientConnection``, handshake
state), ``encode`` (outgoing chunks, acks, chunk ids).
"""

from ruletag.config.model import (
    DEFAULT_MAX_FRAME_SIZE,
    DEFAULT_MAX_INFLATE_MEMBERS,
    DEFAULT_MAX_INFLATE_SIZE,
)
from ruletag.protocol.connection import NEED_DATA, ClientConnection, Handshake, ServerConnection
from ruletag.protocol.encode import encode_ack, encode_chunk, new_chunk_id
from ruletag.protocol.entries import entries_to_v1, iter_entries
from ruletag.protocol.events import (
    Ack,
    Authenticated,
    Chunk,
    ConnectionClosed,
    Event,
    EventTime,
    Heartbeat,
    Helo,
)

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "DEFAULT_MAX_INFLATE_MEMBERS",
    "DEFAULT_MAX_INFLATE_SIZE",
    "NEED_DATA",
    "Ack",
    "Authenticated",
    "Chunk",
    "ClientConnection",
    "ConnectionClosed",
    "Event",
    "EventTime",
    "Handshake",
    "Heartbeat",
    "Helo",
    "ServerConnection",
    "encode_ack",
    "encode_chunk",
    "entries_to_v1",
    "iter_entries",
    "new_chunk_id",
]
