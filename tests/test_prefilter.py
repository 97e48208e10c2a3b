"""The raw-bytes pre-filter: sound on every msgpack encoding a record can use, and selective."""

from __future__ import annotations

import struct
from collections.abc import Sequence

import hyperscan as hs
import msgpack
import pytest

from ruletag.rules.compiler import CompiledTable, build
from ruletag.rules.compiler.hyperscan import compile_db, hs_escape
from ruletag.rules.compiler.prefilter import _alts, _key, _loose_head, int_encodings, text_headers
from ruletag.rules.fields import FieldMap
from ruletag.rules.ir import (
    And,
    Call,
    Equals,
    FieldValue,
    Literal_,
    Logsource,
    Match,
    Node,
    Predicate,
    Regex,
    Rule,
    Wild,
)
from ruletag.rules.matcher import Matcher
from ruletag.rules.matcher.prefilter import RawMatcher
from support.codec import joined

A = Wild.ANY


def rule(rid: str, cond: Node, ls: Logsource | None = None) -> Rule:
    return Rule(id=rid, name=rid, source="sigma", condition=cond, logsource=ls)


def s(text: str, head: bytes | None = None) -> bytes:
    """A msgpack str, with a chosen (possibly non-canonical) header."""
    raw = text.encode()
    if head is None:
        return msgpack.packb(text)
    return head + raw


def entry(pairs: Sequence[tuple[bytes, bytes]]) -> bytes:
    """A packed ``[0, {k: v, ...}]`` entry from already encoded keys and values."""
    body = b"".join(k + v for k, v in pairs)
    return b"\x92\x00" + bytes((0x80 | len(pairs),)) + body


def agree(t: CompiledTable, entries: Sequence[bytes]) -> dict[int, list[int]]:
    """match_entries must give exactly what match() gives on the decoded records."""
    buf, spans = joined(entries)
    m = Matcher(t)
    want = {}
    for k, e in enumerate(entries):
        rec = msgpack.unpackb(e, raw=False, strict_map_key=False)[1]
        got = m.match(rec)
        if got:
            want[k] = got
    assert m.match_entries(buf, spans) == want
    return want


def candidates(t: CompiledTable, buf: bytes, spans: list[tuple[int, int]]) -> dict[int, list[int]]:
    """What the table's compiled pre-filter lets through (no re-tuning)."""
    assert t.raw is not None
    got = RawMatcher(t.raw, 0).candidates(buf, spans)
    return {k: list(v) for k, v in got.items()}


def test_encodings_decode_to_the_value() -> None:
    for v in (0, 3, 127, 128, 255, 4624, 70000, -1, -33, -200, 2**40):
        encs = int_encodings(v)
        assert encs and all(msgpack.unpackb(e) == v for e in encs)
    assert len(int_encodings(3)) == 9  # fixint, uint8..64, int8..64
    for n in (0, 5, 31, 32, 300, 70000):
        for h in text_headers(n):
            got = msgpack.unpackb(h + b"x" * n, raw=False)
            assert got in ("x" * n, b"x" * n)


def test_numbers_in_any_encoding_and_numeric_strings(fm: FieldMap) -> None:
    t = build([rule("eid", Equals("EventID", 4624))], fm)
    key = s("EventID")
    entries = [
        entry([(key, b"\xcd\x12\x10")]),  # canonical uint16
        entry([(key, b"\xce\x00\x00\x12\x10")]),  # uint32
        entry([(key, b"\xd3" + struct.pack(">q", 4624))]),  # int64
        entry([(key, b"\xcb" + struct.pack(">d", 4624.0))]),  # float64
        entry([(key, s("4624"))]),
        entry([(key, s("04624", b"\xd9\x05"))]),  # str8 for a short string
        entry([(key, b"\x92\x01\xcd\x12\x10")]),  # a list holding it
        entry([(key, b"\xcd\x12\x11")]),  # 4625: no match
        entry([(s("Other"), b"\xcd\x12\x10")]),
    ]
    assert set(agree(t, entries)) == {0, 1, 2, 3, 4, 5, 6}


def test_exact_values_with_any_header_bin_and_case(fm: FieldMap) -> None:
    t = build([rule("nc", Match("Image", ("nc",), cased=False))], fm)
    img = s("Image")
    entries = [
        entry([(img, s("nc"))]),
        entry([(img, s("NC", b"\xd9\x02"))]),  # str8 header
        entry([(img, b"\xc4\x02nc")]),  # bin
        entry([(img, s("ncat"))]),
        entry([(img, s("x")), (s("note"), s("nc"))]),  # the value under another key
    ]
    assert set(agree(t, entries)) == {0, 1, 2}


def test_nested_and_dotted_keys(fm: FieldMap) -> None:
    t = build([rule("e", Equals("winlog.event_id", 4688))], fm)
    records = [
        {"winlog": {"event_id": 4688}},
        {"winlog.event_id": 4688},
        {"winlog": {"event_id": "4688"}},
        {"winlog": [{"event_id": 4688}]},
        {"winlog": {"event_id": 4689}},
    ]
    entries = [msgpack.packb([0, r]) for r in records]
    assert set(agree(t, entries)) == {0, 1, 2, 3}


def test_derived_category_and_logsource(fm: FieldMap) -> None:
    ls = Logsource(product="windows", category="process_creation")
    rules = [
        rule("cat", Match("event.category", ("process",), cased=False)),
        rule("ls", Match("Image", (A, "\\evil.exe")), ls),
    ]
    t = build(rules, fm)
    sysmon = {"Channel": "Microsoft-Windows-Sysmon/Operational", "Image": "C:\\evil.exe"}
    records = [
        {**sysmon, "EventID": 1},  # derived category "process"; process creation
        {**sysmon, "EventID": 3},
        {"event": {"category": ["process"], "type": ["start"]}, "process": {"executable": "x"}},
        {"event": {"category": "network"}, "Image": "C:\\evil.exe"},
    ]
    entries = [msgpack.packb([0, r]) for r in records]
    got = agree(t, entries)
    assert got[0] == [0, 1] and 1 not in got and got[2] == [0] and 3 not in got


def test_regex_literals_and_caseless_unicode(fm: FieldMap) -> None:
    rules = [
        rule("re", Regex("CommandLine", r"ping\s+-n.{2,8}echo", "i")),
        rule("dash", Match("CommandLine", (A, ' \u2013i "lsass', A), cased=False)),
        rule("disk", Regex("CommandLine", r"diskpart", "i")),
    ]
    t = build(rules, fm)
    records = [
        {"CommandLine": "PING  -N 3 x & ECHO hi"},
        {"CommandLine": "ping -c 3"},
        {"CommandLine": 'findstr \u2013I "LSASS'},
        {"CommandLine": "di\u017fkpart /s"},  # RE2 folds the long s to s caselessly
        {"CommandLine": "nothing"},
    ]
    entries = [msgpack.packb([0, r]) for r in records]
    got = agree(t, entries)
    assert got[0] == [0] and got[2] == [1] and 1 not in got and 4 not in got
    assert 3 in got  # the RE2 fold is honoured by both paths


def test_prefilter_rejects_records_without_the_literals(fm: FieldMap) -> None:
    t = build(
        [rule("a", Match("CommandLine", (A, "mimikatz", A))), rule("b", Equals("EventID", 7))],
        fm,
    )
    assert t.raw is not None
    records = [{"CommandLine": "notepad.exe", "EventID": 1}, {"EventID": 8, "x": "mimi"}]
    buf, spans = joined([msgpack.packb([0, r]) for r in records])
    assert candidates(t, buf, spans) == {}
    buf, spans = joined([msgpack.packb([0, {"EventID": 7}])])
    assert candidates(t, buf, spans) == {0: [1]}


def test_key_patterns_are_whole_keys_or_dotted_ends(fm: FieldMap) -> None:
    """``port`` must not be found inside ``transport``; a dotted literal key still counts."""
    t = build([rule("p", Equals("DestinationPort", 80))], fm)
    assert t.raw is not None
    near = [
        msgpack.packb([0, {"transport": "tcp", "Port": 80, "xDestinationPort": 80}]),
        msgpack.packb([0, {"DestinationPortName": 80}]),
    ]
    buf, spans = joined(near)
    assert candidates(t, buf, spans) == {}
    hits = [
        msgpack.packb([0, {"DestinationPort": 80}]),
        msgpack.packb([0, {"event.DestinationPort": 80}]),  # a dotted literal key
        entry([(b"\xd9\x0fDestinationPort", b"\xcc\x50")]),  # str8 key, uint8 value
        entry([(b"\xc4\x0fDestinationPort", b"\x50")]),  # bin key
    ]
    for e in hits:
        buf, spans = joined([e])
        assert candidates(t, buf, spans) == {0: [0]}, e
    agree(t, near + hits)


def test_numbers_as_strings_in_any_form_still_pass(fm: FieldMap) -> None:
    t = build([rule("lt", Equals("LogonType", 10))], fm)
    forms = ["10", "+10", "010", "10.0", "1e1", ".1e2", "10."]
    entries = [msgpack.packb([0, {"LogonType": f}]) for f in forms]
    entries += [entry([(s("LogonType"), b"\xd9\x02" + b"10")])]  # str8 header
    want = agree(t, entries)
    assert sorted(want) == list(range(len(entries)))
    # text that cannot be a number is not even decoded
    assert t.raw is not None
    buf, spans = joined([msgpack.packb([0, {"LogonType": "RemoteInteractive"}])])
    assert candidates(t, buf, spans) == {}


def test_predicates_false_without_their_fields_need_a_key(fm: FieldMap) -> None:
    """``length(CallTrace) > 0`` cannot hold without ``CallTrace``: other records are not
    decoded; ``CallTrace == null`` holds without it, so it gives no requirement."""
    length = Call("length", (FieldValue("CallTrace"),))
    t = build(
        [
            rule("len", And((Equals("EventID", 10), Predicate(length, ">", Literal_(0))))),
            rule("null", Predicate(FieldValue("CallTrace"), "==", Literal_(None))),
        ],
        fm,
    )
    assert t.raw is not None and t.raw_forced == (1,)
    records = [
        {"EventID": 10, "TargetImage": "C:\\x.exe"},  # no CallTrace: only rule "null"
        {"EventID": 10, "CallTrace": "C:\\Windows\\SYSTEM32\\ntdll.dll+9d1e4"},
        {"EventID": 10, "CallTrace": ""},
    ]
    entries = [msgpack.packb([0, r]) for r in records]
    buf, spans = joined(entries)
    assert candidates(t, buf, spans) == {1: [0], 2: [0]}
    assert agree(t, entries) == {0: [1], 1: [0]}


def test_memos_of_trigger_sets_and_rule_lists_stay_bounded_and_exact(
    fm: FieldMap, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Traffic with more distinct trigger pattern sets (and so rule lists) than the memos
    hold: the memos stop growing at their bound, and every chunk still matches exactly as
    the records decoded one by one."""
    import ruletag.rules.matcher.prefilter as pf
    import ruletag.rules.matcher.table as tb

    monkeypatch.setattr(pf, "MAX_TRIGGERED", 4)
    monkeypatch.setattr(tb, "MEMO_LISTS", 4)
    words = [f"tok{i}zq" for i in range(8)]
    t = build([rule(f"r{i}", Match("CommandLine", (A, w, A))) for i, w in enumerate(words)], fm)
    records = [
        {"CommandLine": f"run {a} then {b}"} for n, a in enumerate(words) for b in words[n + 1 :]
    ]
    entries = [msgpack.packb([0, r]) for r in records]
    m = Matcher(t, 0)
    want = {k: Matcher(t, 0).match(r) for k, r in enumerate(records)}
    buf, spans = joined(entries)
    for _ in range(2):  # the second pass runs on full memos
        assert m.match_entries(buf, spans) == want
    assert m.raw is not None
    assert len(m.raw._triggered) == 4
    assert len(m._groups_of) == 4
    assert len(want) == len(records) == 28 and all(len(v) == 2 for v in want.values())


@pytest.mark.parametrize(
    "when",
    [
        msgpack.ExtType(0, struct.pack(">II", 1700000000, 5)),  # EventTime
        1700000000,
        0,
        -5,
        -200,
        -40000,
        -(2**40),
        2**40,
        2**63 + 1,
        200,
        40000,
        1.5,
        [msgpack.ExtType(0, b"\0" * 8), {"meta": 1}],  # the v2 entry form
        "not a time",
        None,
    ],
)
def test_an_entry_s_record_is_read_past_any_time_form(when: object) -> None:
    """The record of ``[time, record]`` is decoded alone past every time encoding, and any
    other entry shape still gives what decoding the whole entry gives."""
    from ruletag.rules.matcher.table import _record_of

    record = {"EventID": 1, "Image": "C:\\x.exe", "n": [1, {"a": b"\xff"}]}
    entry = msgpack.packb([when, record], use_bin_type=True)
    assert _record_of(memoryview(entry)) == record
    assert _record_of(memoryview(msgpack.packb([when, [1, 2]]))) is None
    three = msgpack.packb([when, record, {"x": 1}])
    assert _record_of(memoryview(three)) == record  # the general path
    assert _record_of(memoryview(entry[:-1])) is None  # damaged: no record, no exception


def fired(db: object, data: bytes) -> set[int]:
    """The pattern ids a Hyperscan database finds in ``data``."""
    hits: set[int] = set()
    db.scan(data, lambda i, *_: hits.add(i))  # type: ignore[attr-defined]
    return hits


@pytest.mark.parametrize("n", [0, 1, 5, 31, 32, 65, 200, 255, 256, 300, 4000])
def test_a_trigger_s_header_is_loosened_to_a_superset(n: int) -> None:
    """A trigger pattern fires wherever its exact pattern would: its str/bin header
    alternatives become the length bytes they share, for a key and for a value, whatever the
    header's width; the bytes after the header still decide."""
    text = (b"Ab9_" * (n // 4 + 1))[:n]
    value = _alts(text_headers(n)) + hs_escape(text)
    key = _key(text.decode())
    for exact in (value, key):
        loose = _loose_head(exact)
        assert loose != exact and b"\\xd9" not in loose and b"\\xdb" not in loose
        db = compile_db([(0, exact, hs.HS_FLAG_SINGLEMATCH), (1, loose, hs.HS_FLAG_SINGLEMATCH)])
        for h in [*text_headers(n), *([b"."] if exact is key else [])]:
            assert fired(db, b"\x81\xa1x" + h + text + b"\xc0") == {0, 1}, (n, h)
        # another length's header, or none: neither fires (with n > 0 the text decides)
        if n:
            for h in (text_headers(n + 1)[0], b"z"):
                assert fired(db, b"\x81" + h + text[:-1] + b"Q") == set()


def test_patterns_without_a_header_are_triggers_as_they_are() -> None:
    for pat in (b"\\x2fdontlog", b"graphsteel", b"(?:abc|def)", b"(?:\\xc0|\\xc2)x", b""):
        assert _loose_head(pat) == pat


def test_a_text_of_64_kib_or_more_keeps_its_last_two_length_bytes() -> None:
    """Only 32-bit headers can carry 70,000 bytes: they end with 00 01 11 70 (too long a
    pattern to compile here, so the pattern's text is checked)."""
    text = b"q" * 70000
    assert _loose_head(_alts(text_headers(70000)) + hs_escape(text)) == b"\\x11p" + text
