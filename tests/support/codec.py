"""Helpers for the codec tests: capture loading, replay, and an in-memory client/server link."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from ruletag.protocol import (
    NEED_DATA,
    Chunk,
    ClientConnection,
    ConnectionClosed,
    Event,
    ServerConnection,
    iter_entries,
)
from support.paths import CAPTURE_DIRS
from support.paths import CAPTURES as CAPTURES

SHARED_KEY = b"fwd-secret-123"
USERS = {b"edr-user": b"edr-pass-456"}


@dataclass(frozen=True)
class Capture:
    """One out_forward capture: its metadata and raw bytes."""

    path: Path  # the .json file
    meta: dict[str, Any]
    data: bytes
    reply: bytes

    @property
    def id(self) -> str:
        return f"{self.path.parent.name}/{self.path.stem}"

    def connection_bytes(self, conn: dict[str, Any]) -> bytes:
        rng = conn["client_to_server"]
        return self.data[rng["offset"] : rng["offset"] + rng["length"]]

    def reply_bytes(self, conn: dict[str, Any]) -> bytes:
        rng = conn.get("server_to_client") or {"offset": 0, "length": 0}
        return self.reply[rng["offset"] : rng["offset"] + rng["length"]]

    def server_for(self, conn: dict[str, Any]) -> ServerConnection:
        """A ServerConnection configured like the capture server was for ``conn``."""
        args = self.meta["capture_server"]["args"]
        if "--shared-key" not in args:
            return ServerConnection()
        helo = conn["handshake"]["helo"]
        salt = helo.get("auth_salt_hex")
        return ServerConnection(
            shared_key=SHARED_KEY,
            users=USERS if "--users" in args else None,
            hostname=args[args.index("--self-hostname") + 1],
            nonce=bytes.fromhex(helo["nonce_hex"]),
            auth_salt=bytes.fromhex(salt) if salt else None,
        )


def pack(obj: Any) -> bytes:
    """``obj`` as msgpack, str and bin kept apart (as Fluent Bit sends them)."""
    return msgpack.packb(obj, use_bin_type=True)


def joined(entries: Iterable[bytes]) -> tuple[bytes, list[tuple[int, int]]]:
    """Packed entries as one buffer, with each entry's ``(start, end)`` in it."""
    buf = bytearray()
    spans = []
    for entry in entries:
        spans.append((len(buf), len(buf) + len(entry)))
        buf += entry
    return bytes(buf), spans


def pack_records(records: Iterable[Any], *, time: int = 0) -> tuple[bytes, list[tuple[int, int]]]:
    """``[time, record]`` entries of ``records`` joined, with their spans (``match_entries``
    input)."""
    return joined(msgpack.packb([time, rec]) for rec in records)


def out_forward_captures() -> list[Capture]:
    """Every Fluent Bit out_forward capture (v4.2.8 and v5.1.1)."""
    found = []
    for folder in CAPTURE_DIRS:
        for path in sorted(folder.glob("*.json")):
            if path.name.startswith("fb-in-forward-") or path.name.endswith(".expected.json"):
                continue
            reply = path.with_name(path.stem + ".reply.bin")
            found.append(
                Capture(
                    path=path,
                    meta=json.loads(path.read_text()),
                    data=path.with_name(path.stem + ".bin").read_bytes(),
                    reply=reply.read_bytes() if reply.exists() else b"",
                )
            )
    return found


def in_forward_cases() -> list[Path]:
    """Every ``fb-in-forward-<case>.json`` (v4.2.8 and v5.1.1)."""
    return [p for folder in CAPTURE_DIRS for p in sorted(folder.glob("fb-in-forward-*.json"))]


def drain(conn: ServerConnection | ClientConnection) -> list[Event]:
    """Every event available now (stops at NEED_DATA or ConnectionClosed)."""
    events: list[Event] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            return events
        events.append(event)  # type: ignore[arg-type]
        if isinstance(event, ConnectionClosed):
            return events


def feed_all(
    conn: ServerConnection, pieces: Iterable[bytes], *, eof: bool = True
) -> tuple[list[Event], bytes]:
    """Feed ``pieces`` one by one; return the events and every byte the server would send
    (initial bytes, handshake replies and an ack for each chunk that asked for one)."""
    out = bytearray(conn.initial_bytes())
    events: list[Event] = []

    def pump() -> None:
        for event in drain(conn):
            events.append(event)
            out.extend(conn.data_to_send())
            if isinstance(event, Chunk) and event.chunk_id is not None:
                out.extend(conn.ack(event.chunk_id))

    for piece in pieces:
        if piece:  # b"" would mean EOF
            conn.receive_data(piece)
            pump()
    if eof:
        conn.receive_data(b"")
        pump()
    return events, bytes(out)


def chunks(events: Iterable[Event]) -> list[Chunk]:
    return [e for e in events if isinstance(e, Chunk)]


def records(chunk: Chunk) -> list[Any]:
    """The records of a log chunk, decoded (for assertions only)."""
    out = []
    for start, end in iter_entries(chunk.entries):
        entry = msgpack.unpackb(chunk.entries[start:end], raw=False, strict_map_key=False)
        out.append(entry[1])
    return out


def link(client: ClientConnection, server: ServerConnection) -> tuple[list[Event], list[Event]]:
    """Run a handshake in memory: shuttle bytes both ways until neither side has any."""
    client_events: list[Event] = []
    server_events: list[Event] = []
    to_client = server.initial_bytes()
    for _ in range(10):
        if to_client:
            client.receive_data(to_client)
        client_events += drain(client)
        to_server = client.data_to_send()
        if to_server:
            server.receive_data(to_server)
        server_events += drain(server)
        to_client = server.data_to_send()
        if not to_client and not to_server:
            break
    return client_events, server_events
