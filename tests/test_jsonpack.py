"""``json_entry`` (C, ``_jsonpack.c``): a JSON object line straight to its msgpack entry.

``ruletag match`` packs each JSON-lines record as ``[0, record]`` in C instead of parsing it
with ujson and packing the result; the text it takes on must give exactly the bytes of
``msgpack.packb([0, ujson.loads(text)])``, and whatever it leaves (None) is parsed by ujson as
before, so errors and odd inputs (floats, duplicate keys, lone surrogates, bad UTF-8) keep
ujson's behaviour. Generated JSON texts, mutated ones and the bench's Sysmon records are
run through both.
"""

from __future__ import annotations

import json
import random
import sys
from typing import Any

import msgpack
import pytest
import ujson
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ruletag.commands import match as match_mod
from support.paths import REPO

json_entry = match_mod.json_entry
needs_native = pytest.mark.skipif(
    json_entry is None,
    reason="the C helpers are not built here (no C compiler when ruletag was installed, or "
    "RULETAG_PURE_PYTHON is set); every JSON line is parsed with ujson instead",
)
pytestmark = needs_native

_pack = msgpack.Packer(use_bin_type=True).pack

#: integers at msgpack's (and ujson's) size limits, and beyond
EDGES = [
    0, 1, 31, 32, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, 2**63,
    2**64 - 1, 2**64, -1, -32, -33, -128, -129, -32768, -32769, -(2**31), -(2**31) - 1,
    -(2**63), -(2**63) - 1,
]  # fmt: skip


def _reference(text: bytes) -> bytes | None:
    """What ``ruletag match`` did before: ujson, then msgpack (None: not a packable map)."""
    try:
        obj = ujson.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    try:
        return _pack([0, obj])
    except (OverflowError, ValueError, TypeError):
        return None


def _agrees(text: bytes) -> bytes | None:
    """json_entry(text), checked against the reference where it takes the text on."""
    assert json_entry is not None
    got = json_entry(text)
    if got is not None:
        assert got == _reference(text), text
    return got


texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=40) | st.text(
    st.sampled_from('a\\"/\b\f\n\r\t\x00\x1f\u00e9\u20ac\U0001f600'), max_size=300
)
plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.sampled_from([e for e in EDGES if -(2**63) <= e < 2**64])
    | texts,
    lambda kids: st.lists(kids, max_size=20) | st.dictionaries(texts, kids, max_size=20),
    max_leaves=60,
)


def _dumps(obj: Any, rnd: random.Random) -> bytes:
    """JSON text of ``obj`` in one of the spellings encoders write."""
    ascii_ = rnd.random() < 0.5
    seps = rnd.choice([(",", ":"), (", ", ": "), (" ,\t", " :\r\n")])
    indent = rnd.choice([None, None, 2])
    text = json.dumps(obj, ensure_ascii=ascii_, separators=seps, indent=indent)
    if rnd.random() < 0.3:
        text = text.replace("/", "\\/")
    return text.encode("utf-8")


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(texts, plain, max_size=30), st.integers(0, 2**32))
@example({"a": [1, {"b": "\u00e9" * 40}], "c": 2**64 - 1, "d": -(2**63)}, 0)
@example({"a": list(range(70_000)), "b": "x" * 70_000}, 1)  # array32, str32
def test_plain_json_objects_are_packed_in_c_as_msgpack_packs_them(
    obj: dict[str, Any], seed: int
) -> None:
    rnd = random.Random(seed)
    text = _dumps(obj, rnd)
    got = _agrees(text)
    assert got is not None, text[:200]  # plain JSON: nothing is left to ujson
    assert msgpack.unpackb(got, raw=False, strict_map_key=False) == [0, obj]


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(texts, plain, min_size=1, max_size=8), st.integers(0, 2**32))
def test_damaged_texts_are_never_packed_differently(obj: dict[str, Any], seed: int) -> None:
    """Bytes cut, dropped, doubled or replaced: either left to ujson or the same bytes."""
    rnd = random.Random(seed)
    text = bytearray(_dumps(obj, rnd))
    for _ in range(rnd.randint(1, 3)):
        at = rnd.randrange(len(text))
        how = rnd.randrange(4)
        if how == 0:
            del text[at:]
        elif how == 1:
            del text[at]
        elif how == 2:
            text.insert(at, text[at])
        else:
            text[at] = rnd.choice(b'{}[]",:\\u0123456789.eE-+ \t\xc3\xa9\xed\xa0\x80\xff')
        if not text:
            break
    _agrees(bytes(text))


@pytest.mark.parametrize(
    "text",
    [
        b'{"a":1.5}',  # floats: ujson's own conversion
        b'{"a":1e3}',
        b'{"a":-0.0}',
        b'{"a":1,"a":2}',  # duplicate keys: ujson keeps the last value
        b'{"a":{"b":1,"b":1}}',
        b'{"a":18446744073709551616}',  # beyond 64 bits
        b'{"a":-9223372036854775809}',
        b'{"a":"\\ud83d"}',  # lone surrogates
        b'{"a":"\\ude00x"}',
        b'{"a":"\xed\xa0\x80"}',  # an encoded surrogate (ujson reads it as one)
        b'{"a":"\xff"}',  # not UTF-8
        b'{"a":"\xc0\xaf"}',  # overlong
        b'{"a":"x\ty"}',  # a raw control character (ujson takes it)
        b'{"a":01}',  # a leading zero (ujson reads 1)
        b'{"a":tru}',
        b'{"a":"\\x"}',
        b'{"a":1} x',  # trailing data
        b'{"a":1}{"b":2}',
        b"[1,2]",  # not an object: forward-protocol messages and entries
        b'"a"',
        b"{" * 70 + b"}" * 70,  # deeper than the C side goes
        b"",
        b"{",
        b'{"a"',
        b'{"a":',
        b'{"a":1,}',
        b"{,}",
    ],
)
def test_what_is_left_to_ujson(text: bytes) -> None:
    assert json_entry is not None
    assert json_entry(text) is None


@pytest.mark.parametrize("n", EDGES)
def test_integers_at_the_size_limits(n: int) -> None:
    text = json.dumps({"n": n, "in": [n]}).encode()
    got = _agrees(text)
    assert (got is None) == (not -(2**63) <= n < 2**64)


def test_more_keys_than_compared_pairwise_are_left_to_ujson() -> None:
    assert json_entry is not None
    assert _agrees(json.dumps({f"k{i}": i for i in range(256)}).encode()) is not None
    assert json_entry(json.dumps({f"k{i}": i for i in range(257)}).encode()) is None


def test_the_bench_sysmon_records_are_packed_in_c() -> None:
    """Flat Sysmon events as ``bench/bench_cli_match.py`` writes them (Windows paths: many
    escapes), positives included: every one taken on, with the reference's bytes."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import gen_traffic
    finally:
        sys.path.remove(str(REPO / "bench"))
    rnd = random.Random(7)
    kinds = (gen_traffic.sysmon_process, gen_traffic.sysmon_network, gen_traffic.sysmon_file)
    recs = [rnd.choice(kinds)(rnd, seq) for seq in range(500)] + gen_traffic.positives()
    for rec in recs:
        for ascii_ in (True, False):
            text = json.dumps(rec, ensure_ascii=ascii_).encode()
            assert _agrees(text) is not None
