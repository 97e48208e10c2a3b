"""Unit tests for the sans-IO codec: modes, byte preservation, round trips, handshake, bad input."""

from __future__ import annotations

import base64
import gzip
import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ruletag.errors import AuthenticationError, LocalProtocolError, RemoteProtocolError
from ruletag.protocol import (
    NEED_DATA,
    Ack,
    Authenticated,
    Chunk,
    ClientConnection,
    ConnectionClosed,
    Heartbeat,
    Helo,
    ServerConnection,
    encode_chunk,
    entries_to_v1,
    iter_entries,
    new_chunk_id,
)
from support.codec import chunks, drain, feed_all, link, pack

ET = b"\xd7\x00" + struct.pack(">II", 1714564800, 7)  # EventTime fixext8
# A record with a non-minimal map32 header, a str value and a bin value.
RECORD = b"\xdf\x00\x00\x00\x02\xa3msg\xa2hi\xa3raw\xc4\x02\x00\xff"


def decode_one(frame: bytes, **kwargs: object) -> Chunk:
    (chunk,) = chunks(feed_all(ServerConnection(**kwargs), [frame])[0])  # type: ignore[arg-type]
    return chunk


def test_message_mode_keeps_record_bytes() -> None:
    frame = b"\x94\xa3app" + ET + RECORD + pack({"chunk": "abc="})
    chunk = decode_one(frame)
    assert chunk.entries == b"\x92" + ET + RECORD
    assert (chunk.tag, chunk.count, chunk.chunk_id, chunk.v2) == ("app", 1, b"abc=", False)
    assert chunk.size == len(frame)
    record = msgpack.unpackb(chunk.entries, raw=False)[1]
    assert record == {"msg": "hi", "raw": b"\x00\xff"}  # str stays str, bin stays bin


def test_message_mode_time_as_int_and_metadata_option() -> None:
    frame = b"\x94\xa1t\xd2\x00\x00\x00\x05" + RECORD + pack({"metadata": {"k": "v"}})
    chunk = decode_one(frame)
    assert chunk.v2
    assert chunk.entries == b"\x92\x92\xd2\x00\x00\x00\x05\x81\xa1k\xa1v" + RECORD
    assert chunk.options == {"metadata": {"k": "v"}}


def test_forward_mode_slices_entries() -> None:
    entries = b"\x92" + ET + RECORD + b"\xdd\x00\x00\x00\x02\x05" + RECORD
    frame = b"\x93\xa1t\xdc\x00\x02" + entries + pack({"size": 2, "chunk": "x\n"})
    chunk = decode_one(frame)
    assert chunk.entries == entries
    assert chunk.count == 2 and chunk.chunk_id == b"x\n"
    assert iter_entries(chunk.entries) == [(0, 11 + len(RECORD)), (11 + len(RECORD), len(entries))]


def test_forward_mode_float_time_converted_and_v2_detected() -> None:
    v2 = b"\x92\x92" + ET + b"\x80" + RECORD
    float_entry = b"\x92\xcb" + struct.pack(">d", 1714564800.25) + RECORD
    frame = b"\x92\xa1t\x92" + v2 + float_entry
    chunk = decode_one(frame)
    assert chunk.v2 and chunk.count == 2
    converted = b"\x92\xd7\x00" + struct.pack(">II", 1714564800, 250_000_000) + RECORD
    assert chunk.entries == v2 + converted


@pytest.mark.parametrize("as_str", [False, True])
def test_packed_forward_str_or_bin(as_str: bool) -> None:
    entries = (b"\x92" + ET + RECORD) * 3
    header = (b"\xdb" if as_str else b"\xc6") + struct.pack(">I", len(entries))
    chunk = decode_one(b"\x93\xa1t" + header + entries + pack({"compressed": "text"}))
    assert chunk.entries == entries and chunk.count == 3 and not chunk.v2


def test_compressed_multi_member() -> None:
    one = b"\x92" + ET + RECORD
    payload = gzip.compress(one) + gzip.compress(one + one)
    frame = pack(["t", payload, {"compressed": "gzip", "chunk": "c"}])
    chunk = decode_one(frame)
    assert chunk.entries == one * 3 and chunk.count == 3


def test_metrics_pass_through() -> None:
    blob = pack({"meta": {}, "metrics": [1, 2]})
    chunk = decode_one(pack(["fb.metrics", blob, {"fluent_signal": 1}]))
    assert (chunk.signal, chunk.entries) == (1, blob)
    chunk = decode_one(
        pack(["fb.tr", gzip.compress(blob), {"compressed": "gzip", "fluent_signal": 2}])
    )
    assert (chunk.signal, chunk.entries) == (2, blob)


def test_heartbeat_and_empty_connection() -> None:
    events, _ = feed_all(ServerConnection(), [b"\xc0", pack(["t", 1, {"a": 1}])])
    assert isinstance(events[0], Heartbeat) and isinstance(events[1], Chunk)
    assert isinstance(events[2], ConnectionClosed)
    assert feed_all(ServerConnection(), []) == ([ConnectionClosed()], b"")


def test_need_data_and_tag_prefix() -> None:
    server = ServerConnection(tag_prefix="fromfwd.")
    frame = pack(["win", 1, {"a": 1}])
    server.receive_data(frame[:5])
    assert server.next_event() is NEED_DATA
    server.receive_data(frame[5:])
    assert server.next_event().tag == "fromfwd.win"  # type: ignore[attr-defined]


def test_ack_bytes() -> None:
    server = ServerConnection()
    assert server.ack(b"c1==") == bytes.fromhex("81a361636ba463313d3d")
    assert server.ack(b"Zg0icCscoNYamEXU4RUslA==\n") == b"\x81\xa3ack\xb9Zg0icCscoNYamEXU4RUslA==\n"
    assert msgpack.unpackb(server.ack(b"x" * 40), raw=False) == {"ack": "x" * 40}


# --- encoding -------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
def test_encode_chunk_round_trip(compress: bool) -> None:
    entries = (b"\x92" + ET + RECORD) * 4
    cid = new_chunk_id()
    frame = encode_chunk("a.b", entries, 4, chunk_id=cid, compress=compress)
    assert frame[5] in (0xC4, 0xC5, 0xC6)  # bin payload
    chunk = decode_one(frame)
    assert (chunk.tag, chunk.entries, chunk.count, chunk.chunk_id) == ("a.b", entries, 4, cid)
    assert chunk.options["size"] == 4 and chunk.options["fluent_signal"] == 0
    assert ("compressed" in chunk.options) == compress


def test_encode_chunk_signal_and_no_chunk() -> None:
    frame = encode_chunk("m", b"\x81\xa1a\x01", 1, signal=1)
    assert msgpack.unpackb(frame, raw=False) == [
        "m",
        b"\x81\xa1a\x01",
        {"size": 1, "fluent_signal": 1},
    ]


def test_new_chunk_id() -> None:
    ids = {new_chunk_id() for _ in range(50)}
    assert len(ids) == 50
    assert all(len(i) == 24 and len(base64.b64decode(i)) == 16 for i in ids)


def test_entries_to_v1() -> None:
    v1 = b"\x92" + ET + RECORD
    v2 = b"\xdd\x00\x00\x00\x02\x92" + ET + b"\x81\xa1k\xa1v" + RECORD
    assert entries_to_v1(v1 + v2 + v1) == v1 * 3
    assert entries_to_v1(v1) is v1 or entries_to_v1(v1) == v1


_FB5_META = b"\xdf\x00\x00\x00\x00"  # Fluent Bit 5 packs empty metadata as map32
# Ways an entry can be written: (v2?, encoder from (time bytes, metadata bytes, record bytes)).
_SHAPES = [
    (False, lambda t, m, r: b"\x92" + t + r),
    (False, lambda t, m, r: b"\xdd\x00\x00\x00\x02" + t + r),
    (True, lambda t, m, r: b"\x92\x92" + t + _FB5_META + r),  # Fluent Bit 5 default
    (True, lambda t, m, r: b"\x92\x92" + t + b"\x80" + r),
    (True, lambda t, m, r: b"\x92\x92" + t + m + r),
    (True, lambda t, m, r: b"\xdd\x00\x00\x00\x02\xdc\x00\x02" + t + m + r),
]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(range(len(_SHAPES))),
            st.sampled_from([ET, b"\xce\x66\x32\x7a\x80", b"\x07"]),
            st.dictionaries(st.text(max_size=3), st.integers(-(2**63), 2**64 - 1), max_size=2),
            st.dictionaries(st.text(max_size=4), st.binary(max_size=6), max_size=3),
        ),
        max_size=8,
    )
)
def test_entries_to_v1_property(items: list[tuple[int, bytes, dict, dict]]) -> None:
    """With or without the decoder's spans, the rewrite equals unpack-and-repack of v2 entries."""
    entries = b""
    expected = b""
    for shape, t, meta, record in items:
        is_v2, encode = _SHAPES[shape]
        r = pack(record)
        entry = encode(t, pack(meta), r)
        entries += entry
        expected += b"\x92" + t + r if is_v2 else entry
    assert entries_to_v1(entries) == expected
    assert entries_to_v1(entries, iter_entries(entries)) == expected
    if entries:
        chunk = decode_one(encode_chunk("t", entries, len(items)))
        assert chunk.spans is not None and chunk.count == len(items)
        assert chunk.v2 == any(_SHAPES[shape][0] for shape, *_ in items)
        assert entries_to_v1(chunk.entries, chunk.spans) == expected


def test_entries_to_v1_malformed_is_a_protocol_error() -> None:
    v2 = b"\x92\x92" + ET + b"\x81\xa1k" + RECORD  # metadata map is cut short
    with pytest.raises(RemoteProtocolError):
        entries_to_v1(v2)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=2**32 - 1),
            st.dictionaries(
                st.text(max_size=5),
                st.one_of(st.text(), st.binary(), st.integers(-(2**63), 2**64 - 1)),
            ),
        ),
        max_size=8,
    )
)
def test_encode_decode_property(items: list[tuple[int, dict[str, object]]]) -> None:
    entries = b"".join(pack([t, r]) for t, r in items)
    chunk = decode_one(encode_chunk("p", entries, len(items)))
    assert chunk.entries == entries and chunk.count == len(items)
    assert [msgpack.unpackb(chunk.entries[s:e], raw=False) for s, e in iter_entries(entries)] == [
        [t, r] for t, r in items
    ]


# --- handshake ------------------------------------------------------------------------------------


def test_handshake_shared_key() -> None:
    client = ClientConnection(shared_key=b"k", hostname="fwd-out")
    server = ServerConnection(shared_key=b"k", hostname="ruletag-in")
    assert server.initial_bytes()[:6] == b"\x92\xa4HELO"
    client_events, server_events = link(client, server)
    assert isinstance(client_events[0], Helo) and client_events[0].keepalive
    assert client_events[1] == Authenticated(hostname="ruletag-in")
    assert server_events == [Authenticated(hostname="fwd-out")]
    assert client.ready
    frame = encode_chunk("t", b"\x92\x01\x80", 1, chunk_id=b"id")
    server.receive_data(frame)
    (chunk,) = drain(server)
    client.receive_data(server.ack(chunk.chunk_id))  # type: ignore[union-attr]
    assert drain(client) == [Ack(chunk_id=b"id")]


def test_handshake_with_users() -> None:
    client = ClientConnection(shared_key=b"k", username="u", password="p", hostname="a")
    server = ServerConnection(shared_key=b"k", users={b"u": b"p"}, hostname="b")
    _, server_events = link(client, server)
    assert server_events == [Authenticated(hostname="a", username="u")]
    assert client.ready


@pytest.mark.parametrize(
    ("client_kwargs", "reason"),
    [
        ({"shared_key": b"wrong", "username": "u", "password": "p"}, "shared_key mismatch"),
        ({"shared_key": b"k", "username": "u", "password": "bad"}, "username/password mismatch"),
        ({"shared_key": b"k", "username": "nobody", "password": "p"}, "username/password"),
    ],
)
def test_handshake_refused(client_kwargs: dict[str, object], reason: str) -> None:
    client = ClientConnection(hostname="a", **client_kwargs)  # type: ignore[arg-type]
    server = ServerConnection(shared_key=b"k", users={b"u": b"p"}, hostname="b")
    client.receive_data(server.initial_bytes())
    drain(client)
    server.receive_data(client.data_to_send())
    with pytest.raises(AuthenticationError, match=reason):
        server.next_event()
    pong = server.data_to_send()
    decoded = msgpack.unpackb(pong, raw=False)
    assert decoded[:2] == ["PONG", False] and reason in decoded[2] and decoded[3:] == ["", ""]
    with pytest.raises(RemoteProtocolError):  # the connection stays failed
        server.next_event()
    client.receive_data(pong)
    with pytest.raises(AuthenticationError):
        drain(client)


def test_client_refuses_same_hostname_and_bad_pong_digest() -> None:
    client = ClientConnection(shared_key=b"k", hostname="same")
    server = ServerConnection(shared_key=b"k", hostname="same")
    client.receive_data(server.initial_bytes())
    drain(client)
    server.receive_data(client.data_to_send())
    with pytest.raises(AuthenticationError, match="same hostname"):
        server.next_event()
    # A server that does not know the key cannot produce a valid PONG digest.
    client = ClientConnection(shared_key=b"k", hostname="c")
    client.receive_data(pack(["HELO", {"nonce": b"n" * 16, "auth": b"", "keepalive": True}]))
    drain(client)
    client.receive_data(pack(["PONG", True, "", "srv", "0" * 128]))
    with pytest.raises(AuthenticationError, match="digest"):
        drain(client)


def test_server_accepts_bin_ping_fields_and_client_sends_str() -> None:
    client = ClientConnection(shared_key=b"k", hostname="c")
    server = ServerConnection(shared_key=b"k", hostname="s", nonce=b"N" * 16)
    client.receive_data(server.initial_bytes())
    drain(client)
    ping = client.data_to_send()
    fields = msgpack.unpackb(ping, raw=True)
    assert ping[1:2] == b"\xa4" and len(fields[2]) == 32  # str "PING", 32-hex-char salt
    as_bin = pack([f.decode() if i == 0 else f for i, f in enumerate(fields)])
    server.receive_data(as_bin)
    assert server.next_event() == Authenticated(hostname="c")


def test_data_before_ping_is_refused() -> None:
    server = ServerConnection(shared_key=b"k")
    server.receive_data(pack(["t", 1, {"a": 1}]))
    with pytest.raises(RemoteProtocolError, match="PING"):
        server.next_event()


# --- bad input and limits -------------------------------------------------------------------------

BAD_FRAMES = {
    "0xc1": b"\xc1",
    "top-level map": pack({"a": 1}),
    "top-level int": b"\x05",
    "short array": pack(["t"]),
    "non-str tag": pack([1, 1, {"a": 1}]),
    "chunk as bin": pack(["t", 1, {"a": 1}, {"chunk": b"abc"}]),
    "bad fluent_signal": pack(["t", 1, {"a": 1}, {"fluent_signal": 9}]),
    "str fluent_signal": pack(["t", 1, {"a": 1}, {"fluent_signal": "1"}]),
    "message record not a map": pack(["t", 1, "text"]),
    "float time as record": pack(["t", 1.5]),
    "bad time ext": pack(["t", msgpack.ExtType(1, b"12345678"), {"a": 1}]),
    "entry not a pair": pack(["t", [[1, {"a": 1}, 3]]]),
    "entry record not a map": pack(["t", [[1, "x"]]]),
    "packed garbage": pack(["t", b"\x92\x01", {}]),
    "option not a map": pack(["t", [[1, {}]], [1]]),
    "zstd": pack(["t", b"\x28\xb5\x2f\xfd", {"compressed": "zstd"}]),
    "truncated gzip": pack(["t", gzip.compress(b"\x92\x01\x80")[:-9], {"compressed": "gzip"}]),
    "too many elements": pack(["t", [[1, {}]], {}, {}]),
    "deep nesting": b"\x92\xa1t\x91\x92\x01\x81\xa1a" + b"\x91" * 5000 + b"\xc0",
    "invalid utf-8 tag": b"\x93\xa2\xff\xfe\x01\x80",
}


@pytest.mark.parametrize("name", list(BAD_FRAMES))
def test_bad_input_is_a_remote_protocol_error(name: str) -> None:
    server = ServerConnection()
    server.receive_data(BAD_FRAMES[name])
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        drain(server)
    with pytest.raises(RemoteProtocolError, match="already failed"):
        server.next_event()


def test_eof_mid_message() -> None:
    server = ServerConnection()
    server.receive_data(pack(["t", 1, {"a": 1}])[:-1])
    assert server.next_event() is NEED_DATA
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle"):
        server.next_event()
    with pytest.raises(LocalProtocolError):
        server.receive_data(b"more")


def test_oversized_frame_fails_before_it_is_complete() -> None:
    server = ServerConnection(max_frame_size=1000)
    frame = pack(["t", b"\x00" * 5000, {}])
    server.receive_data(frame[:1500])  # the frame is not complete yet
    with pytest.raises(RemoteProtocolError, match=r"max_frame_size|exceeds"):
        server.next_event()
    # A frame of exactly the limit is fine; many pipelined small frames are fine.
    exact = pack(["t", [[1, {"a": "x" * (1000 - 12)}]]])
    assert len(exact) == 1000
    frames = exact * 5
    events, _ = feed_all(ServerConnection(max_frame_size=1000), [frames])
    assert len(chunks(events)) == 5


def test_gzip_bomb() -> None:
    bomb = gzip.compress(b"\x00" * (4 * 1024 * 1024))
    assert len(bomb) < 10_000
    server = ServerConnection(max_inflate_size=1024 * 1024)
    server.receive_data(pack(["t", bomb, {"compressed": "gzip"}]))
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        server.next_event()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_only_raise_remote_protocol_error(data: bytes) -> None:
    server = ServerConnection(max_frame_size=4096, max_inflate_size=4096)
    try:
        feed_all(server, [data])
    except RemoteProtocolError:
        pass


_VALID = pack(["t", [[1, {"a": "b"}], [2, {"c": b"d"}]], {"chunk": "x"}]) + encode_chunk(
    "p", pack([1, {"k": 1}]), 1, compress=True
)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(_VALID) - 1), st.integers(0, 255))
def test_mutated_frames_only_raise_remote_protocol_error(pos: int, value: int) -> None:
    data = bytearray(_VALID)
    data[pos] = value
    try:
        feed_all(ServerConnection(max_frame_size=4096), [bytes(data)])
    except RemoteProtocolError:
        pass


def test_client_errors() -> None:
    client = ClientConnection()
    assert client.ready
    client.receive_data(pack({"ack": "abc"}) + pack(["HELO", {}]))
    assert client.next_event() == Ack(chunk_id=b"abc")
    with pytest.raises(RemoteProtocolError):
        client.next_event()
    assert not client.ready
    client = ClientConnection(shared_key=b"k")
    client.receive_data(b"")
    assert client.next_event() == ConnectionClosed()
