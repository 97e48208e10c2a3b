"""Fuzzing the sans-IO codec with hypothesis: hostile bytes only ever raise RemoteProtocolError.

Inputs are forward-protocol-shaped messages built from arbitrary msgpack values (every mode,
odd times, odd options, gzip payloads, handshakes), then mutated (byte flips, cuts, inserts,
duplicated spans) and fed in random splits. For every input the codec must either produce
events or raise ``RemoteProtocolError`` (or its subclass ``AuthenticationError``): never
another exception, and never loop (the number of events is bounded by the bytes fed).

The fast suite runs a few hundred examples; the ``slow`` suite runs at least 10^5 inputs
(each hypothesis example is fed in several mutated variants) and reports how many it ran.
"""

from __future__ import annotations

import gzip
import random
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ruletag.errors import RemoteProtocolError
from ruletag.protocol import (
    NEED_DATA,
    Chunk,
    ClientConnection,
    ConnectionClosed,
    ServerConnection,
    encode_chunk,
)
from support.codec import pack
from support.reliability import report
from support.strategies import values

MAX_FRAME = 64 * 1024
MAX_INFLATE = 64 * 1024
SLOW_TARGET = 100_000

# -- strategies ---------------------------------------------------------------------------------

_event_time = st.builds(
    lambda s, n: msgpack.ExtType(0, s.to_bytes(4, "big") + n.to_bytes(4, "big")),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
)
_times = st.one_of(st.integers(-(2**63), 2**64 - 1), st.floats(), _event_time, values)
_records = st.one_of(st.dictionaries(st.text(max_size=8), values, max_size=5), values)
_entries = st.lists(
    st.one_of(
        st.tuples(_times, _records).map(list),
        st.tuples(st.tuples(_times, values).map(list), _records).map(list),  # v2 shape
        values,
    ),
    max_size=4,
)
_options = st.one_of(
    st.none(),
    st.fixed_dictionaries(
        {},
        optional={
            "chunk": st.one_of(st.text(max_size=24), values),
            "size": st.one_of(st.integers(0, 10), values),
            "compressed": st.one_of(st.sampled_from(["gzip", "text", "", "zstd"]), values),
            "fluent_signal": st.one_of(st.integers(-1, 3), values),
            "metadata": values,
        },
    ),
    values,
)
_tags = st.one_of(st.text(max_size=12), values)


def _packed_entries(entries: list[Any]) -> bytes:
    return b"".join(pack(e) for e in entries)


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    """One top-level forward message (valid or not), as bytes."""
    tag = draw(_tags)
    option = draw(_options)
    mode = draw(st.sampled_from(["message", "forward", "packed", "gzip", "any", "heartbeat"]))
    if mode == "heartbeat":
        return b"\xc0"
    if mode == "any":
        return pack(draw(values))
    if mode == "message":
        msg: list[Any] = [tag, draw(_times), draw(_records)]
    elif mode == "forward":
        msg = [tag, draw(_entries)]
    else:
        payload = _packed_entries(draw(_entries))
        if mode == "gzip":
            payload = gzip.compress(payload, mtime=0) * draw(st.integers(1, 2))
        msg = [tag, payload]
    if option is not None or draw(st.booleans()):
        msg.append(option)
    return pack(msg)


_mutation = st.tuples(
    st.sampled_from(["flip", "cut", "insert", "dup", "none"]),
    st.integers(0, 1 << 16),
    st.binary(min_size=1, max_size=4),
)


def mutate(data: bytes, ops: list[tuple[str, int, bytes]]) -> bytes:
    """Apply byte-level mutations (positions wrap around the current length)."""
    buf = bytearray(data)
    for op, pos, blob in ops:
        if not buf or op == "none":
            continue
        i = pos % len(buf)
        if op == "flip":
            buf[i] = blob[0]
        elif op == "cut":
            del buf[i:]
        elif op == "insert":
            buf[i:i] = blob
        elif op == "dup":
            buf[i:i] = buf[i : i + 1 + blob[0] % 16]
    return bytes(buf)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return [p for p in out if p]


# -- the properties -------------------------------------------------------------------------------


def feed_server(pieces: list[bytes], *, shared_key: bytes | None = None) -> int:
    """Feed ``pieces`` then EOF; return the events seen. Only RemoteProtocolError may escape
    (swallowed here); every other exception fails the test. Bounded: at most one event per
    byte plus the closing one, else the decoder is looping."""
    server = ServerConnection(
        shared_key=shared_key, max_frame_size=MAX_FRAME, max_inflate_size=MAX_INFLATE
    )
    server.initial_bytes()
    total = sum(len(p) for p in pieces)
    events = 0
    try:
        for piece in [*pieces, b""]:
            server.receive_data(piece)
            while (event := server.next_event()) is not NEED_DATA:
                events += 1
                assert events <= total + 1, "decoder produced more events than bytes: a loop"
                server.data_to_send()
                if isinstance(event, Chunk) and event.chunk_id is not None:
                    server.ack(event.chunk_id)
                if isinstance(event, ConnectionClosed):
                    return events
    except RemoteProtocolError:
        with pytest.raises(RemoteProtocolError):  # a failed connection stays failed
            server.next_event()
    return events


def feed_client(pieces: list[bytes], *, shared_key: bytes | None) -> None:
    """The forwarder's side against a hostile downstream: same rule."""
    client = ClientConnection(shared_key=shared_key, hostname="fuzz-client")
    total = sum(len(p) for p in pieces)
    events = 0
    try:
        for piece in [*pieces, b""]:
            client.receive_data(piece)
            while (event := client.next_event()) is not NEED_DATA:
                events += 1
                assert events <= total + 1, "client decoder loops"
                client.data_to_send()
                if isinstance(event, ConnectionClosed):
                    return
    except RemoteProtocolError:
        pass


@st.composite
def server_inputs(draw: st.DrawFn) -> tuple[bytes, list[int], bool]:
    data = b"".join(draw(st.lists(messages(), min_size=1, max_size=3)))
    data = mutate(data, draw(st.lists(_mutation, max_size=3)))
    cuts = draw(st.lists(st.integers(0, 1 << 16), max_size=4))
    return data, cuts, draw(st.booleans())


@st.composite
def client_inputs(draw: st.DrawFn) -> tuple[bytes, list[int], bool]:
    helo = pack(
        [
            "HELO",
            {
                "nonce": draw(st.binary(max_size=20)),
                "auth": draw(st.one_of(st.binary(max_size=20), values)),
                "keepalive": draw(values),
            },
        ]
    )
    pong = pack(["PONG", draw(values), draw(values), draw(values), draw(values)])
    acks = [pack({"ack": draw(st.one_of(st.text(max_size=24), values))}) for _ in range(2)]
    data = mutate(
        helo + pong + b"".join(acks) + pack(draw(values)), draw(st.lists(_mutation, max_size=3))
    )
    return data, draw(st.lists(st.integers(0, 1 << 16), max_size=3)), draw(st.booleans())


_SETTINGS = {
    "deadline": None,
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}


def _variants(data: bytes, seed: int, n: int) -> list[bytes]:
    """``n`` extra cheap mutations of ``data`` (a seeded PRNG, so failures reproduce)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ops = [
            (
                rng.choice(("flip", "cut", "insert", "dup")),
                rng.randrange(1 << 16),
                bytes([rng.randrange(256)]),
            )
            for _ in range(rng.randint(1, 3))
        ]
        out.append(mutate(data, ops))
    return out


def run_server_fuzz(examples: int, variants: int) -> int:
    """Run ``examples`` hypothesis examples, each fed as-is and in ``variants`` mutations."""
    count = 0

    @settings(max_examples=examples, **_SETTINGS)  # type: ignore[arg-type]
    @given(server_inputs(), st.integers(0, 2**32))
    def prop(case: tuple[bytes, list[int], bool], seed: int) -> None:
        nonlocal count
        data, cuts, keyed = case
        key = b"k" if keyed else None
        for blob in [data, *_variants(data, seed, variants)]:
            feed_server(split(blob, cuts), shared_key=key)
            count += 1

    prop()
    return count


def run_client_fuzz(examples: int) -> int:
    count = 0

    @settings(max_examples=examples, **_SETTINGS)  # type: ignore[arg-type]
    @given(client_inputs())
    def prop(case: tuple[bytes, list[int], bool]) -> None:
        nonlocal count
        data, cuts, keyed = case
        feed_client(split(data, cuts), shared_key=b"k" if keyed else None)
        count += 1

    prop()
    return count


# -- fast suite -----------------------------------------------------------------------------------


def test_fuzz_server_fast(tmp_path: Path) -> None:
    n = run_server_fuzz(examples=150, variants=3)
    assert n == 600
    report(tmp_path, "fuzz_server_fast", cases=n)


def test_fuzz_client_fast(tmp_path: Path) -> None:
    n = run_client_fuzz(examples=150)
    assert n == 150
    report(tmp_path, "fuzz_client_fast", cases=n)


def test_generated_valid_messages_are_decoded() -> None:
    """Guard against a fuzzer that only ever produces garbage: well-formed generated Forward
    messages decode to the records they carry."""

    ints = st.integers(-(2**63), 2**64 - 1)

    @settings(max_examples=100, **_SETTINGS)  # type: ignore[arg-type]
    @given(st.lists(st.dictionaries(st.text(max_size=8), ints, max_size=4), min_size=1, max_size=4))
    def prop(records: list[dict[str, int]]) -> None:
        data = pack(["tag", [[1, r] for r in records], {"chunk": "abc"}])
        server = ServerConnection()
        server.receive_data(data)
        event = server.next_event()
        assert isinstance(event, Chunk) and event.count == len(records)
        assert event.chunk_id == b"abc"

    prop()


def test_mutation_helpers() -> None:
    assert mutate(b"abcdef", [("flip", 1, b"X")]) == b"aXcdef"
    assert mutate(b"abcdef", [("cut", 3, b"X")]) == b"abc"
    assert mutate(b"abcdef", [("insert", 0, b"XY")]) == b"XYabcdef"
    assert split(b"abcdef", [2, 4, 100]) == [b"ab", b"cd", b"ef"] or split(
        b"abcdef", [2, 4, 100]
    ) == [b"ab", b"cd", b"e", b"f"]
    assert b"".join(split(b"abcdef", [5, 1])) == b"abcdef"


def test_hostile_shapes_are_protocol_errors() -> None:
    """Specific hostile inputs, each a clean RemoteProtocolError, and never a hang."""
    cases = {
        "deep nesting": b"\x93\xa1t\x91\x92\x01\x81\xa1a" + b"\x91" * 100_000 + b"\xc0",
        "huge map header": b"\x93\xa1t\x91\x92\x01\xdf\xff\xff\xff\xff",
        "huge array header": b"\x92\xa1t\xdd\xff\xff\xff\xff",
        "invalid utf-8 tag": b"\x93\xa2\xff\xfe\x01\x80",
        "oversized bin": b"\x93\xa1t\xc6\x7f\xff\xff\xff" + b"\x00" * 100,
        "gzip bomb": pack(["t", gzip.compress(b"\x00" * (8 * MAX_INFLATE)), {}]),
        "gzip of garbage": pack(["t", b"\x1f\x8b" + b"\x00" * 30, {"compressed": "gzip"}]),
    }
    for name, data in cases.items():
        server = ServerConnection(max_frame_size=MAX_FRAME, max_inflate_size=MAX_INFLATE)
        server.receive_data(data)
        server.receive_data(b"")
        with pytest.raises(RemoteProtocolError):
            while server.next_event() is not NEED_DATA:
                pass
            pytest.fail(f"{name}: accepted")


def test_huge_valid_map_is_accepted_within_frame_limit() -> None:
    """A record with many keys (a "huge map" that fits the frame limit) is not an error."""
    record = {f"k{i}": i for i in range(5000)}
    server = ServerConnection(max_frame_size=MAX_FRAME)
    server.receive_data(pack(["t", 1, record]))
    event = server.next_event()
    assert isinstance(event, Chunk) and event.count == 1


# -- slow suite -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_fuzz_server_slow(tmp_path: Path) -> None:
    n = run_server_fuzz(examples=2_000, variants=50)
    assert n >= SLOW_TARGET
    report(tmp_path, "fuzz_server_slow", hypothesis_examples=2_000, cases=n)


@pytest.mark.slow
def test_fuzz_client_slow(tmp_path: Path) -> None:
    n = run_client_fuzz(examples=1_000)
    assert n == 1_000
    report(tmp_path, "fuzz_client_slow", cases=n)


def test_encode_chunk_frames_survive_mutation() -> None:
    """Our own PackedForward output, gzip'ed, mutated at every byte: only protocol errors."""
    entries = _packed_entries([[1, {"a": "b"}], [msgpack.ExtType(0, b"\x00" * 8), {"c": 1}]])
    frame = encode_chunk("tag", entries, 2, chunk_id=b"id", compress=True)
    for i in range(len(frame)):
        for value in (0x00, 0xFF, frame[i] ^ 0x01):
            data = bytearray(frame)
            data[i] = value
            feed_server([bytes(data)])
