"""The entry scanner's C walk (``ruletag.protocol._wire``) against its pure-Python reference.

``scan_entries`` hands Fluent Bit's two entry shapes (and fluent-logger's integer times) to
the C walk and everything else, one entry at a time, to the Python loop. With the walk and
without it, every input (generated entries of every shape, then cut and mutated) must give
the same result, or the same error.
"""

from __future__ import annotations

import os
import random
import shutil
import sysconfig
import types
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ruletag.errors import RemoteProtocolError
from ruletag.protocol import entries as entries_mod
from ruletag.protocol.entries import scan_entries
from support.strategies import values

WALK = entries_mod._WALK

needs_walk = pytest.mark.skipif(
    WALK is None,
    reason="ruletag.protocol._wire is not built (no C compiler, or RULETAG_PURE_PYTHON is set); "
    "the pure-Python scanner runs instead",
)


def test_the_walk_is_built_wherever_a_compiler_is() -> None:
    """`make setup` with a C compiler must build the walk (else the relay silently slows)."""
    if os.environ.get("RULETAG_PURE_PYTHON", "") not in ("", "0"):
        assert WALK is None
        return
    compiler = sysconfig.get_config_var("CC") or "cc"
    if shutil.which(compiler.split()[0]) is None:
        pytest.skip(f"no C compiler ({compiler}) on this machine: the reference path runs")
    assert WALK is not None, "a C compiler is here but ruletag.protocol._wire is not built"


def test_an_older_walk_is_not_used(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A walk built from older sources (another ABI) is never called: the reference loop
    runs, and the log says how to rebuild."""
    import ruletag.protocol

    monkeypatch.delenv("RULETAG_PURE_PYTHON", raising=False)
    old = types.SimpleNamespace(ABI=entries_mod.WIRE_ABI - 1, entry_ends=None)
    monkeypatch.setattr(ruletag.protocol, "_wire", old, False)
    with caplog.at_level("WARNING", logger="ruletag.protocol.entries"):
        assert entries_mod._walker() is None
    warned = [r.getMessage() for r in caplog.records if r.name == "ruletag.protocol.entries"]
    assert len(warned) == 1 and "make setup" in warned[0]
    current = types.SimpleNamespace(ABI=entries_mod.WIRE_ABI, entry_ends=len)
    monkeypatch.setattr(ruletag.protocol, "_wire", current, False)
    assert entries_mod._walker() is len


def _event_time(s: int, ns: int = 0) -> msgpack.ExtType:
    return msgpack.ExtType(0, s.to_bytes(4, "big") + ns.to_bytes(4, "big"))


def _both(buf: bytes, start: int, end: int, count: int | None, convert: bool) -> tuple[Any, Any]:
    """(with the walk, reference): each a result or (exception type, message)."""

    def run() -> Any:
        try:
            return scan_entries(buf, start, end, count, convert_float=convert)
        except RemoteProtocolError as exc:
            return (type(exc), str(exc))
        except Exception as exc:
            return (type(exc), str(exc))

    fast = run()
    entries_mod._WALK = None
    try:
        ref = run()
    finally:
        entries_mod._WALK = WALK
    return fast, ref


_times = st.one_of(
    st.builds(_event_time, st.integers(0, 2**32 - 1), st.integers(0, 10**9 - 1)),
    st.integers(0, 2**32 - 1),
    st.floats(0, 2**31, allow_nan=False),
)


@st.composite
def _entry(draw: Callable[..., Any]) -> bytes:
    time = draw(_times)
    record = draw(st.one_of(st.dictionaries(st.text(max_size=6), values, max_size=5), values))
    if draw(st.booleans()):
        meta = draw(st.one_of(st.dictionaries(st.text(max_size=4), values, max_size=2), values))
        return msgpack.packb([[time, meta], record], use_bin_type=True)
    return msgpack.packb([time, record], use_bin_type=True)


@needs_walk
@settings(max_examples=400, deadline=None)
@given(
    st.lists(_entry(), max_size=8),
    st.integers(0, 2**32),
    st.sampled_from(["as-is", "cut", "flip", "count+1", "count-1", "prefix"]),
)
def test_scan_with_the_walk_is_the_reference(parts: list[bytes], seed: int, how: str) -> None:
    rng = random.Random(seed)
    body = b"".join(parts)
    count: int | None = len(parts)
    if how == "cut" and body:
        body = body[: rng.randrange(len(body))]
    elif how == "flip" and body:
        at = rng.randrange(len(body))
        body = body[:at] + bytes([rng.randrange(256)]) + body[at + 1 :]
    elif how == "count+1":
        count = len(parts) + 1
    elif how == "count-1":
        count = max(len(parts) - 1, 0)
    prefix = b"\x93\xa3tag" if how == "prefix" else b""  # entries inside a larger frame
    buf = prefix + body + b"\xc0"
    for c in (count, None):
        end = len(buf) - 1
        for convert in (True, False):
            fast, ref = _both(buf, len(prefix), end, c, convert)
            assert fast == ref


def _fluent_bit_entries(n: int, v2_every: int = 0) -> list[bytes]:
    out = []
    for i in range(n):
        record = {"log": f"line {i}", "n": i, "nested": {"a": [1, {"b": b"x" * i}]}}
        t = _event_time(1_700_000_000 + i, i)
        if v2_every and i % v2_every == 0:
            out.append(msgpack.packb([[t, {"m": i}], record], use_bin_type=True))
        else:
            out.append(msgpack.packb([t, record], use_bin_type=True))
    return out


@needs_walk
@pytest.mark.parametrize("odd", [None, "array16", "float-time", "not-a-map", "deep", "ext"])
def test_a_shape_the_walk_leaves_is_scanned_in_python_and_the_walk_resumes(
    odd: str | None,
) -> None:
    """One odd entry in the middle of Fluent Bit's shapes: the walk stops before it, Python
    scans it (rewriting a float time, or raising), and the walk takes the rest."""
    parts = _fluent_bit_entries(40, v2_every=7)
    if odd == "array16":  # [time, record] with an array16 header, as some encoders write it
        parts[20] = b"\xdc\x00\x02" + msgpack.packb(1_700_000_000) + msgpack.packb({"a": 1})
    elif odd == "float-time":
        parts[20] = msgpack.packb([1_700_000_000.5, {"a": 1}])
    elif odd == "not-a-map":
        parts[20] = msgpack.packb([_event_time(1), [1, 2]])
    elif odd == "deep":  # deeper than the walk follows, within msgpack's limit
        deep: Any = 1
        for _ in range(200):
            deep = [deep]
        parts[20] = msgpack.packb([_event_time(1), {"d": deep}])
    elif odd == "ext":
        parts[20] = msgpack.packb([_event_time(1), {"e": msgpack.ExtType(5, b"\x00" * 300)}])
    buf = b"".join(parts)
    for convert in (True, False):
        fast, ref = _both(buf, 0, len(buf), len(parts), convert)
        assert fast == ref
    if odd == "not-a-map":
        assert fast == (RemoteProtocolError, "entry 20: record is not a map")
    else:
        assert fast[0] == 40 and fast[1] is True
        spans = fast[3] if fast[2] is None else None
        if spans is not None:
            assert spans[-1][1] == len(buf) and len(spans) == 40


@needs_walk
def test_the_walk_itself_stops_at_what_it_does_not_know() -> None:
    assert WALK is not None
    parts = _fluent_bit_entries(5)
    parts[1] = msgpack.packb([1_700_000_000, {"a": 1}])  # fluent-logger's integer time: walked
    odd = msgpack.packb([1.5, {"a": 1}])  # a float time: rewritten in Python
    buf = b"".join(parts[:3]) + odd + b"".join(parts[3:])
    ends, pos, v2 = WALK(buf, 0, 0, len(buf), 100)
    third = sum(len(p) for p in parts[:3])
    assert ends == [sum(len(p) for p in parts[: i + 1]) for i in range(3)] and pos == third
    assert v2 is False
    ends, pos, _ = WALK(buf, 0, third + len(odd), len(buf), 1)  # limit: one entry
    assert ends == [third + len(odd) + len(parts[3])] and pos == ends[0]
    cut = buf[: third - 1]  # the third entry cut short: stops before it
    ends, pos, _ = WALK(cut, 0, 0, len(cut), 100)
    assert len(ends) == 2 and pos == ends[-1]
    with pytest.raises(ValueError):
        WALK(buf, 0, 0, len(buf) + 1, 10)


@needs_walk
@pytest.mark.parametrize(
    "odd",
    [
        b"\x92\x01\xdd\x00\x00\x01\x00" + b"\x01" * 10,  # array32 of 256 items, 10 there
        b"\x92\x01\xde\x01\x2c\xa1k\x01",  # map16 of 300 pairs, 1 there
        b"\x92\x01\xc9\x00\x00\x01\x00\x05" + b"a" * 10,  # ext32 of 256 bytes, 10 there
    ],
)
def test_a_cut_entry_after_the_walk_fails_as_in_the_reference(odd: bytes) -> None:
    """After the walk, Python restarts its unpacker at the odd entry, over fewer bytes than
    the reference's: a header claiming more than is left must still fail the same way."""
    parts = _fluent_bit_entries(30)
    buf = b"".join(parts) + odd
    fast, ref = _both(buf, 0, len(buf), 31, True)
    assert fast == ref and isinstance(fast, tuple) and isinstance(fast[0], type)
