"""The two ends of a forward connection, sans IO: bytes in, typed events out.

``ServerConnection`` (the listener's side: HELO, PING check, PONG, every message mode, acks)
and ``ClientConnection`` (the forwarder's side: PING, PONG check, acks in). No sockets, no
asyncio; the handshake state of each is a :class:`Handshake`. Each complete frame is read
structurally: headers are peeked from the bytes, objects are skipped in C, and the entries are
sliced out of the frame, never unpacked into Python objects. Str and bin stay distinct because
record bytes are never re-encoded.
"""

from __future__ import annotations

import enum
import hashlib
import os
from typing import Final, TypedDict

import msgpack

from ruletag.config.model import (
    DEFAULT_MAX_FRAME_SIZE,
    DEFAULT_MAX_INFLATE_MEMBERS,
    DEFAULT_MAX_INFLATE_SIZE,
)
from ruletag.errors import AuthenticationError, LocalProtocolError, RemoteProtocolError
from ruletag.protocol.compression import inflate
from ruletag.protocol.encode import encode_ack
from ruletag.protocol.entries import check_msgpack_sequence, float_to_event_time, scan_entries
from ruletag.protocol.events import (
    Ack,
    Authenticated,
    Chunk,
    ConnectionClosed,
    Event,
    Heartbeat,
    Helo,
)
from ruletag.protocol.framing import FrameReader
from ruletag.protocol.peek import (
    DECODE_ERRORS,
    FLOAT_TYPES,
    array_header,
    is_array,
    is_bin,
    is_map,
    is_str,
    raw_span,
    sub_unpacker,
    time_size,
)

#: Returned by ``next_event`` when more bytes are needed.
NEED_DATA: Final = object()

_SIGNALS: Final = frozenset({0, 1, 2})  # logs, metrics, traces (what Fluent Bit in_forward takes)
_PONG_SHARED_KEY_MISMATCH: Final = "shared_key mismatch"
_PONG_USER_MISMATCH: Final = "username/password mismatch"
_PONG_SAME_HOST: Final = "same hostname between input and output: invalid configuration"


class Handshake(enum.Enum):
    """Where a connection is in the shared-key handshake."""

    AWAIT_PING = "ping"  # server: HELO sent, the client's PING not yet checked
    AWAIT_HELO = "helo"  # client: the server's HELO not yet received
    AWAIT_PONG = "pong"  # client: PING sent, the server's PONG not yet checked
    READY = "ready"  # no shared key, or the handshake passed: chunks and acks flow


def _sha512_hex(*parts: bytes) -> str:
    h = hashlib.sha512()
    for part in parts:
        h.update(part)
    return h.hexdigest()


class _Connection:
    """What both sides share: the frame reader, the queue of bytes to send, a latched error."""

    def __init__(self, max_frame_size: int) -> None:
        self._reader = FrameReader(max_frame_size)
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
        except DECODE_ERRORS as exc:
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
        self._state = Handshake.AWAIT_PING if shared_key is not None else Handshake.READY

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
        if self._state is not Handshake.READY:
            return self._handle_ping(frame)
        return self._decode(frame)

    @property
    def buffered_bytes(self) -> int:
        """Bytes received and not yet returned as a frame (a partial or undecoded frame)."""
        reader = self._reader
        return reader._base + len(reader._buf) - reader._frame_start

    def ack(self, chunk_id: bytes) -> bytes:
        """``{"ack": chunk_id}`` with the id as msgpack str, bytes echoed exactly."""
        return encode_ack(chunk_id)

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
        self._state = Handshake.READY
        user = username.decode("utf-8", "replace") if self._users else ""
        return Authenticated(hostname=hostname, username=user)

    # -- messages -----------------------------------------------------------------------------

    def _decode(self, frame: bytes) -> Event:
        first = frame[0]
        if first == 0xC0:
            return Heartbeat()
        if not is_array(first):
            raise RemoteProtocolError(f"message is not an array (type byte 0x{first:02x})")
        u = sub_unpacker(frame)
        length = u.read_array_header()
        if length < 2:
            raise RemoteProtocolError("message array has fewer than 2 elements")
        pos = u.tell()
        if not is_str(frame[pos]):
            raise RemoteProtocolError("tag is not a str")
        tag = self._tag_prefix + u.unpack().decode("utf-8")
        second = u.tell()
        kind = frame[second]
        if is_array(kind):
            mode = "forward"
        elif is_str(kind) or is_bin(kind):
            mode = "packed"
        else:
            mode = "message"
            time_size(frame, second)  # validates int / EventTime / float
        if mode == "message":
            if length not in (3, 4):
                raise RemoteProtocolError("Message mode needs 3 or 4 elements")
            u.skip()
            record_at = u.tell()
            if not is_map(frame[record_at]):
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
            count, header = array_header(frame, second)
            start = second + header
            if signal:
                return Chunk(tag=tag, entries=frame[start:record_at], count=count, **common)
            count, v2, rewritten, spans_ = scan_entries(
                frame, start, record_at, count, convert_float=True
            )
            entries = rewritten if rewritten is not None else frame[start:record_at]
            return Chunk(tag=tag, entries=entries, count=count, v2=v2, spans=spans_, **common)
        lo, hi = raw_span(frame, second)
        payload = frame[lo:hi]
        if options.get("compressed") == "gzip" or payload[:2] == b"\x1f\x8b":
            payload = inflate(payload, self._max_inflate, self._max_members)
            common["size"] = len(frame) - (hi - lo) + len(payload)
        if signal:
            check_msgpack_sequence(payload, signal)
            return Chunk(tag=tag, entries=payload, count=1, **common)
        count, v2, _, spans_ = scan_entries(payload, 0, len(payload), None, convert_float=False)
        return Chunk(tag=tag, entries=payload, count=count, v2=v2, spans=spans_, **common)

    def _options(
        self, frame: bytes, u: msgpack.Unpacker
    ) -> tuple[dict[str, object], bytes | None, dict[str, tuple[int, int]]]:
        """Parse the option map: (options for logging, chunk id, raw value spans by key)."""
        pos = u.tell()
        if frame[pos] == 0xC0:
            return {}, None, {}
        if not is_map(frame[pos]):
            raise RemoteProtocolError("option is not a map")
        options: dict[str, object] = {}
        spans: dict[str, tuple[int, int]] = {}
        chunk_id: bytes | None = None
        for _ in range(u.read_map_header()):
            key_at = u.tell()
            if is_str(frame[key_at]):
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
                if not is_str(frame[value_at]):
                    raise RemoteProtocolError("option 'chunk' must be a str")
                lo, hi = raw_span(frame, value_at)
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
            if key == "metadata" and not is_map(frame[value_at]):
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
        if frame[time_at] in FLOAT_TYPES:
            time_bytes, _ = float_to_event_time(frame, time_at)
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
        self._state = Handshake.AWAIT_HELO if shared_key is not None else Handshake.READY
        self._nonce = b""

    @property
    def ready(self) -> bool:
        """True once chunks may be sent (no handshake needed, or it succeeded)."""
        return self._state is Handshake.READY and self._error is None

    def _next_event(self) -> Event | object:
        """``Helo`` (PING queued), ``Authenticated``, ``Ack``, ``ConnectionClosed`` or
        ``NEED_DATA``."""
        frame = self._reader.next_frame()
        if frame is None:
            if not self._reader.eof:
                return NEED_DATA
            if self._state is Handshake.AWAIT_PONG:
                raise AuthenticationError("server closed the connection instead of a PONG")
            return ConnectionClosed()
        message = msgpack.unpackb(frame, raw=True, strict_map_key=False)
        if self._state is Handshake.AWAIT_HELO:
            return self._on_helo(message)
        if self._state is Handshake.AWAIT_PONG:
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
        self._state = Handshake.AWAIT_PONG
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
        self._state = Handshake.READY
        return Authenticated(
            hostname=server_host.decode("utf-8", "replace"),
            username=self._username.decode(),
        )

    @staticmethod
    def _on_ack(message: object) -> Event:
        if not isinstance(message, dict) or not isinstance(message.get(b"ack"), bytes):
            raise RemoteProtocolError("expected {'ack': <chunk id>} from the server")
        return Ack(chunk_id=message[b"ack"])
