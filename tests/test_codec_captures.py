"""Replay every recorded Fluent Bit stream (v4.2.8 and v5.1.1) through the codec."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ruletag.errors import AuthenticationError, RemoteProtocolError
from ruletag.protocol import (
    Ack,
    Authenticated,
    Chunk,
    ClientConnection,
    ConnectionClosed,
    Heartbeat,
    Helo,
    ServerConnection,
)
from support.codec import (
    CAPTURES,
    SHARED_KEY,
    Capture,
    chunks,
    drain,
    feed_all,
    in_forward_cases,
    iter_entries,
    out_forward_captures,
    records,
)

CAPTURE_LIST = out_forward_captures()
IN_FORWARD = in_forward_cases()


def test_all_captures_found() -> None:
    assert len(CAPTURE_LIST) == 40
    assert len(IN_FORWARD) == 56


def _data_messages(conn: dict[str, Any]) -> list[dict[str, Any]]:
    return [m for m in conn["messages"] if m["direction"] == "client->server" and m.get("mode")]


def _pong_and_acks(capture: Capture, conn: dict[str, Any], reply: bytes) -> bytes:
    """The recorded reply without the HELO (kept only when our HELO bytes can match)."""
    if "--helo-bytes-as" in capture.meta["capture_server"]["args"]:
        helo = next(m for m in conn["messages"] if m.get("what") == "HELO")
        return reply[len(bytes.fromhex(helo["hex"])) :]
    return reply


@pytest.mark.parametrize("capture", CAPTURE_LIST, ids=lambda c: c.id)
def test_out_forward_capture_replays(capture: Capture) -> None:
    total = 0
    for conn in capture.meta["connections"]:
        server = capture.server_for(conn)
        events, sent = feed_all(server, [capture.connection_bytes(conn)])
        assert isinstance(events[-1], ConnectionClosed)
        got = chunks(events)
        expected = _data_messages(conn)
        assert [c.tag for c in got] == [m["tag"] for m in expected]
        assert [c.chunk_id for c in got] == [
            (m.get("options") or {}).get("chunk", "").encode() or None for m in expected
        ]
        for chunk, message in zip(got, expected, strict=True):
            assert chunk.wire_size == message["length"]
            options = message.get("options") or {}
            assert chunk.signal == options.get("fluent_signal", 0)
            if chunk.signal == 0:
                assert chunk.count == message["entry_count"]
                shapes = message["entries"]["entry_shapes"]
                metadata_option = message["mode"] == "Message" and "metadata" in options
                assert chunk.v2 == ("[[time, metadata], record]" in shapes or metadata_option)
                assert len(iter_entries(chunk.entries)) == chunk.count
            total += chunk.count
        if conn["handshake"]:
            assert isinstance(events[0], Authenticated)
            assert events[0].hostname == conn["handshake"]["ping"]["client_hostname"]
        reply = capture.reply_bytes(conn)
        if capture.meta["capture_server"]["acks_sent_when_chunk_present"]:
            assert sent.endswith(_pong_and_acks(capture, conn, reply))
            assert sent == reply or "--helo-bytes-as" in capture.meta["capture_server"]["args"]
        else:
            assert reply == b""
            assert all(c.chunk_id for c in got)  # we would ack them; the recorder did not
    assert total == capture.meta["records_received"] or capture.meta["records_expected"] is None


def _windows_lines() -> list[dict[str, Any]]:
    lines = (CAPTURES / "windows-events.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _from_dummy_input(record: dict[str, Any]) -> bool:
    return str(record.get("message", "")).startswith("heartbeat")


@pytest.mark.parametrize(
    "capture",
    [c for c in CAPTURE_LIST if c.meta["input_records"].get("tail")],
    ids=lambda c: c.id,
)
def test_capture_records_equal_the_jsonl_lines(capture: Capture) -> None:
    expected = _windows_lines()
    large = [json.loads((CAPTURES / "windows-events-large.jsonl").read_text())]
    got: list[Any] = []
    for conn in capture.meta["connections"]:
        events, _ = feed_all(capture.server_for(conn), [capture.connection_bytes(conn)])
        for chunk in chunks(events):
            got += [r for r in records(chunk) if not _from_dummy_input(r)]
    if len(got) == len(expected) + 1:
        expected = expected + large
    assert sorted(got, key=json.dumps) == sorted(expected, key=json.dumps)


# --- in_forward cases: what we sent to Fluent Bit, decoded by our own server ---------------------

#: Cases where Fluent Bit lost the data on purpose but ruletag accepts it (documented choices).
_WE_ACCEPT = {
    "fb-in-forward-message-float-time",  # float time -> converted to EventTime
    "fb-in-forward-fluent-logger-float",
    "fb-in-forward-nil-heartbeat",  # nil -> Heartbeat, connection continues
}


def _case(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _handshake_prefix(meta: dict[str, Any]) -> bytes:
    hs = meta.get("handshake") or {}
    out = bytes.fromhex(hs.get("helo_raw_hex", ""))
    return out + bytes.fromhex(hs.get("pong_raw_hex") or "")


@pytest.mark.parametrize("path", IN_FORWARD, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_in_forward_sent_stream_decodes(path: Path) -> None:
    meta = _case(path)
    name = path.stem
    sent = path.with_name(name + ".sent.bin").read_bytes()
    reply = path.with_name(name + ".reply.bin").read_bytes()
    prefix = "fromfwd." if name.endswith("tag-prefix") else ""
    server = ServerConnection(tag_prefix=prefix)
    if name.endswith("chunk-as-bin"):
        with pytest.raises(RemoteProtocolError, match="chunk"):
            feed_all(server, [sent])
        return
    events, acks = feed_all(server, [sent])
    got = chunks(events)
    assert got, "every case sends at least one message"
    assert all(c.tag.startswith(prefix) for c in got)
    sent_messages = meta["sent_decoded"]
    assert len(got) == len([m for m in sent_messages if m is not None])
    if name in _WE_ACCEPT:
        assert reply == b""
        if name.endswith("nil-heartbeat"):
            assert isinstance(events[0], Heartbeat)
        return
    # Fluent Bit accepted: our acks are byte-for-byte its acks.
    assert acks == reply[len(_handshake_prefix(meta)) :] or meta["connection_closed_by_fluent_bit"]
    stored = meta.get("fluent_bit_internal_chunk_records(out_file Format msgpack)") or []
    if not meta["connection_closed_by_fluent_bit"]:
        assert sum(c.count for c in got) == len(stored)
        for chunk, expected in zip(
            [r for c in got for r in records(c)], [s["decoded"][1] for s in stored], strict=True
        ):
            assert chunk == expected


@pytest.mark.parametrize(
    "path",
    [p for p in IN_FORWARD if p.with_name(p.stem + ".reforwarded.bin").exists()],
    ids=lambda p: f"{p.parent.name}/{p.stem}",
)
def test_reforwarded_streams_decode(path: Path) -> None:
    data = path.with_name(path.stem + ".reforwarded.bin").read_bytes()
    meta = _case(path)
    expected = meta["fluent_bit_reforwarded(out_forward Retain_Metadata_In_Forward_Mode on)"]
    events, _ = feed_all(ServerConnection(), [data])
    got = chunks(events)
    assert [c.tag for c in got] == [m["tag"] for m in expected]
    assert [c.count for c in got] == [m["entry_count"] for m in expected]


def test_float_time_becomes_event_time() -> None:
    sent = (CAPTURES / "fb-in-forward-message-float-time.sent.bin").read_bytes()
    (chunk,) = chunks(feed_all(ServerConnection(), [sent])[0])
    entry = msgpack.unpackb(chunk.entries, raw=False)
    assert entry[0] == msgpack.ExtType(0, bytes.fromhex("66322ec0") + (500_000_000).to_bytes(4))
    sent = (CAPTURES / "fb-in-forward-forward-float-time.sent.bin").read_bytes()
    (chunk,) = chunks(feed_all(ServerConnection(), [sent])[0])
    assert b"\xcb" not in {chunk.entries[s + 1 : s + 2] for s, _ in iter_entries(chunk.entries)}
    assert all(
        isinstance(msgpack.unpackb(chunk.entries[s:e])[0], msgpack.ExtType)
        for s, e in iter_entries(chunk.entries)
    )


def test_ext8_event_time_and_metadata_option_kept() -> None:
    sent = (CAPTURES / "fb-in-forward-message-eventtime-ext8-chunk.sent.bin").read_bytes()
    (chunk,) = chunks(feed_all(ServerConnection(), [sent])[0])
    assert chunk.entries.startswith(b"\x92\xc7\x08\x00")
    sent = (CAPTURES / "fb-in-forward-message-metadata-option.sent.bin").read_bytes()
    (chunk,) = chunks(feed_all(ServerConnection(), [sent])[0])
    assert chunk.v2
    entry = msgpack.unpackb(chunk.entries, raw=False)
    assert entry[0][1] == chunk.options["metadata"]
    assert isinstance(entry[1], dict)


def test_multimember_gzip_gives_both_records() -> None:
    path = CAPTURES / "fb-in-forward-compressedpackedforward-multimember.sent.bin"
    (chunk,) = chunks(feed_all(ServerConnection(), [path.read_bytes()])[0])
    assert chunk.count == 2
    assert chunk.options["compressed"] == "gzip"


# --- client side: replay what Fluent Bit in_forward answered -------------------------------------


def _client_for(meta: dict[str, Any], password: str = "edr-pass-456") -> ClientConnection:
    ping = msgpack.unpackb(bytes.fromhex(meta["handshake"]["ping_sent"]["hex"]), raw=True)
    return ClientConnection(
        shared_key=SHARED_KEY,
        username=ping[4].decode(),
        password=password if ping[4] else "",
        hostname=ping[1].decode(),
        salt=bytes.fromhex(meta["handshake"]["ping_sent"]["client_salt_hex"]),
    )


@pytest.mark.parametrize("case", ["handshake-shared-key", "handshake-userpass"])
def test_client_handshake_replay(case: str) -> None:
    path = CAPTURES / f"fb-in-forward-{case}.json"
    meta = _case(path)
    client = _client_for(meta)
    assert not client.ready
    client.receive_data(path.with_name(path.stem + ".reply.bin").read_bytes())
    events = drain(client)
    assert isinstance(events[0], Helo)
    assert events[0].nonce == bytes.fromhex(meta["handshake"]["helo"][1]["nonce"]["_hex"])
    ours = msgpack.unpackb(client.data_to_send(), raw=True)
    recorded = msgpack.unpackb(bytes.fromhex(meta["handshake"]["ping_sent"]["hex"]), raw=True)
    assert ours[:5] == recorded[:5]
    if ours[4]:  # the recording client sent "" as password digest when it had no user
        assert ours[5] == recorded[5]
    assert isinstance(events[1], Authenticated)
    assert events[1].hostname == "fb-receiver.example"
    assert client.ready
    assert events[2:] == [Ack(chunk_id=meta["reply_decoded"][-1]["ack"].encode())]


@pytest.mark.parametrize(
    "case", ["handshake-bad-key", "handshake-bad-password", "handshake-salt-bin"]
)
def test_client_handshake_failures_replay(case: str) -> None:
    path = CAPTURES / f"fb-in-forward-{case}.json"
    meta = _case(path)
    client = _client_for(meta, password="wrong")
    client.receive_data(path.with_name(path.stem + ".reply.bin").read_bytes())
    client.receive_data(b"")
    with pytest.raises(AuthenticationError):
        drain(client)
    assert not client.ready


# --- splitting: the same events whatever the read boundaries ------------------------------------


def _pipelined() -> bytes:
    return (CAPTURES / "fb-in-forward-pipelined-3-messages.sent.bin").read_bytes()


def test_split_at_every_offset() -> None:
    data = _pipelined()
    whole, whole_acks = feed_all(ServerConnection(), [data])
    assert len(chunks(whole)) == 3
    for cut in range(len(data) + 1):
        events, acks = feed_all(ServerConnection(), [data[:cut], data[cut:]])
        assert events == whole and acks == whole_acks, cut


def test_one_byte_at_a_time() -> None:
    data = _pipelined()
    whole, _ = feed_all(ServerConnection(), [data])
    events, _ = feed_all(ServerConnection(), [data[i : i + 1] for i in range(len(data))])
    assert events == whole


def test_handshake_capture_split_at_every_offset() -> None:
    capture = next(c for c in CAPTURE_LIST if c.id == "captures/shared-key")
    conn = capture.meta["connections"][1]
    data = capture.connection_bytes(conn)
    whole = feed_all(capture.server_for(conn), [data])
    assert isinstance(whole[0][0], Authenticated)
    for cut in range(0, len(data) + 1, 3):
        assert feed_all(capture.server_for(conn), [data[:cut], data[cut:]]) == whole


_GZIP_ACK = next(c for c in CAPTURE_LIST if c.id == "fluent-bit-5.1.1/compress-gzip-ack")
_GZIP_DATA = _GZIP_ACK.connection_bytes(_GZIP_ACK.meta["connections"][0])
_GZIP_WHOLE = feed_all(ServerConnection(), [_GZIP_DATA])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(min_value=0, max_value=len(_GZIP_DATA)), max_size=30))
def test_random_chunking(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(_GZIP_DATA)]
    pieces = [_GZIP_DATA[a:b] for a, b in itertools.pairwise(bounds)]
    assert feed_all(ServerConnection(), pieces) == _GZIP_WHOLE


def test_gzip_capture_chunk_is_acked_with_its_id() -> None:
    events, acks = _GZIP_WHOLE
    (chunk,) = chunks(events)
    assert chunk.count == 52 and chunk.v2
    assert acks == b"\x81\xa3ack\xb8" + chunk.chunk_id
    assert isinstance(chunk, Chunk)
