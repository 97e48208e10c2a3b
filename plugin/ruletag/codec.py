"""Sans-IO Fluent forward-protocol codec: bytes in, typed events out. No sockets, no asyncio.

CONTRACT STUB — the public names and signatures below are fixed; bodies are being written.
"""

from __future__ import annotations

from typing import Final

from ruletag.events import Event

#: Returned by ``next_event`` when more bytes are needed.
NEED_DATA: Final = object()

#: Default largest frame (one msgpack message) we accept: fluentd's 8 MiB chunks plus slack.
DEFAULT_MAX_FRAME_SIZE: Final = 16 * 1024 * 1024
#: Default largest decompressed CompressedPackedForward payload (gzip-bomb cap).
DEFAULT_MAX_INFLATE_SIZE: Final = 64 * 1024 * 1024


class ServerConnection:
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
        nonce: bytes | None = None,
        auth_salt: bytes | None = None,
    ) -> None:
        raise NotImplementedError

    def initial_bytes(self) -> bytes:
        raise NotImplementedError

    def receive_data(self, data: bytes) -> None:
        raise NotImplementedError

    def next_event(self) -> Event | object:
        raise NotImplementedError

    def data_to_send(self) -> bytes:
        raise NotImplementedError

    def ack(self, chunk_id: bytes) -> bytes:
        raise NotImplementedError


class ClientConnection:
    """Client (forwarder) side: handshake, then chunks out and acks in."""

    def __init__(
        self,
        *,
        shared_key: bytes | None = None,
        username: str = "",
        password: str = "",
        hostname: str = "ruletag",
    ) -> None:
        raise NotImplementedError

    def receive_data(self, data: bytes) -> None:
        raise NotImplementedError

    def next_event(self) -> Event | object:
        """``Helo`` (PING queued), ``Authenticated``, ``Ack`` or ``NEED_DATA``."""
        raise NotImplementedError

    def data_to_send(self) -> bytes:
        raise NotImplementedError

    @property
    def ready(self) -> bool:
        """True once chunks may be sent (no handshake needed, or it succeeded)."""
        raise NotImplementedError


def encode_chunk(
    tag: str,
    entries: bytes,
    count: int,
    *,
    chunk_id: bytes | None = None,
    compress: bool = False,
    signal: int = 0,
) -> bytes:
    """PackedForward (bin payload) ``[tag, entries, {size, chunk?, compressed?, fluent_signal?}]``."""
    raise NotImplementedError


def new_chunk_id() -> bytes:
    """A fresh random chunk id: base64 of 16 random bytes (24 ASCII bytes)."""
    raise NotImplementedError


def entries_to_v1(entries: bytes) -> bytes:
    """Rewrite ``[[time, meta], record]`` entries as ``[time, record]``; others unchanged."""
    raise NotImplementedError


def iter_entries(entries: bytes) -> list[tuple[int, int]]:
    """Byte spans ``(start, end)`` of each entry in a packed entries buffer."""
    raise NotImplementedError
