"""``json_entry`` (C, ``_jsonpack.c``): a JSON object line straight to its msgpack entry.

``ruletag match`` packs each JSON-lines record as ``[0, record]`` in C instead of parsing it
with ujson and packing the result; the text it takes on must give exactly the bytes of
``msgpack.packb([0, ujson.loads(text)])``, and whatever it leaves (None) is parsed by ujson as
before, so errors and odd inputs (floats, duplicate keys, lone surrogates, bad UTF-8) keep
ujson's behaviour. Generated JSON texts, mutated ones and the bench's Sysmon records are
run through both.
"""

from __future__ import annotations

import io
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
from ruletag.rules.native import native_module
from support.paths import REPO

_NATIVE = native_module()
json_entry = None if _NATIVE is None else _NATIVE.json_entry
needs_native = pytest.mark.skipif(
    json_entry is None,
    reason="the C helpers are not built here (no C compiler when ruletag was installed, or "
    "RULETAG_PURE_PYTHON is set); every JSON line is parsed with ujson instead",
)

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


@needs_native
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


@needs_native
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


@needs_native
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


@needs_native
@pytest.mark.parametrize("n", EDGES)
def test_integers_at_the_size_limits(n: int) -> None:
    text = json.dumps({"n": n, "in": [n]}).encode()
    got = _agrees(text)
    assert (got is None) == (not -(2**63) <= n < 2**64)


@needs_native
def test_more_keys_than_compared_pairwise_are_left_to_ujson() -> None:
    assert json_entry is not None
    assert _agrees(json.dumps({f"k{i}": i for i in range(256)}).encode()) is not None
    assert json_entry(json.dumps({f"k{i}": i for i in range(257)}).encode()) is None


@needs_native
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


def _by_line(data: bytes) -> list[tuple[object, bytes | None]]:
    """(record, the line it was alone on) as ``ruletag match`` read JSON lines before: each
    line stripped and parsed with ujson."""
    out: list[tuple[object, bytes | None]] = []
    for n, line in enumerate(data.split(b"\n"), 1):
        if n == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
        text = line.strip()
        if not text:
            continue
        obj = ujson.loads(text)
        if isinstance(obj, dict):
            out.append((obj, text))
        else:
            out.extend((rec, None) for rec in match_mod.records_of(obj))
    return out


def _read(data: bytes, size: int) -> list[match_mod.Batch]:
    return list(match_mod.read_batches(io.BufferedReader(io.BytesIO(data)), size=size))


MIXED = b"\n".join(
    [
        b'\xef\xbb\xbf {"bom": "first line"}',
        b'{"a": 1, "b": "C:\\\\Windows\\\\x.exe"}',
        b"",
        b"  \t ",
        b'\x0b{"c": [1, {"d": null}]}\x0c\r',
        b'{"float": 1.5}',  # left to ujson, packed by msgpack
        b'[1714564800, {"entry": true}]',  # an entry: not a line record
        b'["tag", [[1714564800, {"fwd": 1}], [1714564801, {"fwd": 2}]]]',
        b'{"dup": 1, "dup": 2}',
        b'{"long": "' + b"x" * 5000 + b'"}',
        *[json.dumps({"n": i, "s": "\u00e9" * (i % 40)}).encode() for i in range(60)],
        b'{"last": "no newline"}',
    ]
)


@pytest.mark.parametrize("block", [7, 64, 1000, 1 << 20])
@pytest.mark.parametrize("native", [True, False])
def test_json_lines_read_in_blocks_give_what_line_by_line_parsing_gave(
    block: int, native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks that cut lines anywhere (a line longer than a block too), blank and
    whitespace-only lines, a BOM, lines left to ujson among the ones packed in C, batches of
    5: the same records and lines, in order, as parsing every line; the records packed in C
    have the entries msgpack gives them."""
    monkeypatch.setattr(match_mod, "_BLOCK", block)
    if native and match_mod.json_block is None:
        pytest.skip("the C helpers are not built here: the ujson path is the one tested")
    if not native:
        monkeypatch.setattr(match_mod, "json_block", None)
    batches = _read(MIXED, 5)
    assert [len(b) for b in batches[:-1]] == [5] * (len(batches) - 1)
    got = [(b.record(i), b.lines[i]) for b in batches for i in range(len(b))]
    assert got == _by_line(MIXED)
    runs = [run for b in batches for run in b.packed]
    assert bool(runs) == native
    for b in batches:
        joined = b"".join(run[1] for run in b.packed)
        for first, _, spans in b.packed:
            for k, (s, e) in enumerate(spans):
                assert joined[s:e] == _pack([0, ujson.loads(b.lines[first + k] or b"")])


def test_a_bad_line_ends_the_input_after_the_records_before_it() -> None:
    data = b"\n".join([b'{"a": 1}'] * 7 + [b'{"a": nope}'] + [b'{"a": 2}'] * 3) + b"\n"
    batches = []
    with pytest.raises(ValueError, match="line 8: not JSON"):
        for b in match_mod.read_batches(io.BufferedReader(io.BytesIO(data)), size=5):
            batches.append(b)
    assert [len(b) for b in batches] == [5, 2]
    assert [b.record(i) for b in batches for i in range(len(b))] == [{"a": 1}] * 7
