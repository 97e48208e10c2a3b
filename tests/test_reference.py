"""Reference evaluator and EQL functions: seed rules on the capture records, leaf semantics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ruletag.rules import functions
from ruletag.rules.fields import FieldMap
from ruletag.rules.ir import (
    And,
    Call,
    Cidr,
    Compare,
    Const,
    Equals,
    Exists,
    FieldRef,
    FieldValue,
    IsNull,
    Literal_,
    Match,
    Node,
    Not,
    Or,
    Predicate,
    Regex,
    Wild,
)
from ruletag.rules.reference import evaluate, reference_match
from support.paths import CAPTURES
from support.seeds import EQL_ID, SIGMA_ID, eql_seed, sigma_seed

DATA = Path(__file__).resolve().parent / "data"

ANY, ONE = Wild.ANY, Wild.ONE


RULES = (eql_seed(), sigma_seed())


def capture_cases() -> list[tuple[int, dict, list[str], list[str]]]:
    records = [json.loads(x) for x in (CAPTURES / "windows-events.jsonl").read_text().splitlines()]
    expected = json.loads((CAPTURES / "windows-events.expected.json").read_text())["records"]
    cases = []
    for exp in expected:
        ids = exp["expected_rule_ids"]
        must = [i for i in ids if not i.startswith("logsource-dependent:")]
        must_not = [i.split(":", 1)[1] for i in ids if i.startswith("logsource-dependent:")]
        cases.append((exp["line"], records[exp["line"] - 1], must, must_not))
    return cases


@pytest.mark.parametrize(("line", "record", "must", "must_not"), capture_cases())
def test_seed_rules_on_capture_records(
    fm: FieldMap, line: int, record: dict, must: list[str], must_not: list[str]
) -> None:
    got = reference_match(RULES, record, fm)
    assert sorted(got) == sorted(must), f"line {line}"
    assert not set(got) & set(must_not)


def test_logsource_is_what_excludes_the_process_creation_record(fm: FieldMap) -> None:
    record = capture_cases()[44][1]  # line 45: Sysmon EID 1 with the network fields
    assert record["EventID"] == 1
    assert reference_match([sigma_seed()], record, fm) == []
    assert evaluate(sigma_seed().condition, fm.view(record))


def test_yaml_contains_all_reading_differs_on_winsxs_lines(fm: FieldMap) -> None:
    """seeds/README: the YAML's ``contains|all`` is stricter than the rendered seed, so the
    line 38 near-miss (only ``:\\Windows\\WinSxS\\``) matches under the YAML reading; line 39
    is filtered either way (its command line also hits the UUS filter)."""
    cases = capture_cases()
    assert reference_match([sigma_seed()], cases[37][1], fm) == []
    assert reference_match([sigma_seed(winsxs_all=True)], cases[37][1], fm) == [SIGMA_ID]
    assert reference_match([sigma_seed(winsxs_all=True)], cases[38][1], fm) == []


def load(name: str) -> dict:
    return json.loads((DATA / name).read_text())


def test_sigma_seed_fires_on_ecs_shaped_network_event(fm: FieldMap) -> None:
    record = load("fields_sysmon_as_ecs.json")
    assert reference_match(RULES, record, fm) == [SIGMA_ID]
    record["destination"]["ip"] = "10.1.2.3"
    assert reference_match(RULES, record, fm) == []


def test_eql_seed_fires_on_sysmon_and_winlogbeat_process_events(fm: FieldMap) -> None:
    for name in ("fields_ecs_as_sysmon.json", "fields_ecs_as_winlogbeat.json"):
        record = load(name)
        assert reference_match(RULES, record, fm) == [EQL_ID], name


def test_eql_seed_sysmon_near_misses(fm: FieldMap) -> None:
    record = load("fields_ecs_as_sysmon.json")
    wrong_parent = dict(record, ParentImage="C:\\Windows\\explorer.exe")
    network = dict(record, EventID=3)
    renamed = dict(record, Image=record["Image"].replace("PsExec64", "x"), OriginalFileName="x")
    for r in (wrong_parent, network, renamed):
        assert reference_match(RULES, r, fm) == []


# --------------------------------------------------------------------------- leaf semantics


def ev(node: Node, record: dict, fm: FieldMap) -> bool:
    return evaluate(node, fm.view(record))


def test_arrays_any_element(fm: FieldMap) -> None:
    rec = {"a": ["x", "needle", 3], "n": [1, 50]}
    assert ev(Match("a", ("needle",)), rec, fm)
    assert not ev(Match("a", ("nope",)), rec, fm)
    assert ev(Equals("a", 3), rec, fm)
    assert ev(Compare("n", ">", 10), rec, fm)
    assert not ev(Compare("n", ">", 100), rec, fm)


def test_numbers_versus_numeric_strings(fm: FieldMap) -> None:
    assert ev(Equals("EventID", 4688), {"EventID": "4688"}, fm)
    assert ev(Equals("EventID", 4688), {"EventID": 4688.0}, fm)
    assert not ev(Equals("EventID", 4688), {"EventID": "4688x"}, fm)
    assert ev(Match("EventID", ("4688",)), {"EventID": 4688}, fm)
    assert ev(Match("f", ("true",)), {"f": True}, fm)
    assert ev(Equals("f", True), {"f": "true"}, fm)
    assert not ev(Equals("f", 1), {"f": True}, fm)
    assert ev(Compare("p", ">=", 443), {"p": "443"}, fm)
    assert ev(Compare("p", "<", 1), {"p": "-7.5e0"}, fm)
    assert not ev(Compare("p", "<", 1), {"p": "low"}, fm)


def test_missing_versus_null_versus_empty(fm: FieldMap) -> None:
    for rec in ({}, {"c": None}, {"c": []}, {"c": [None]}):
        assert ev(IsNull("c"), rec, fm)
        assert not ev(Exists("c"), rec, fm)
        assert not ev(Match("c", ()), rec, fm)
        assert not ev(Match("c", (ANY,)), rec, fm)
    assert ev(Match("c", ()), {"c": ""}, fm)
    assert ev(Exists("c"), {"c": ""}, fm)
    assert ev(Exists("c"), {"c": {}}, fm)
    assert not ev(Match("c", (ANY,)), {"c": {"k": "v"}}, fm)  # maps never match strings


def test_bytes_values(fm: FieldMap) -> None:
    rec = {"b": b"wuauclt.exe", "bad": b"\xffabc"}
    assert ev(Match("b", (ANY, "WUAUCLT", ANY)), rec, fm)
    assert ev(Match("bad", (ANY, "abc")), rec, fm)
    assert ev(Regex("bad", "abc$"), rec, fm)


def test_unicode_case_insensitivity(fm: FieldMap) -> None:
    rec = {"u": "C:\\Users\\JÜRGEN\\Документы\\Ǆ.dll"}
    assert ev(Match("u", (ANY, "\\jürgen\\документы\\ǆ.DLL")), rec, fm)
    assert not ev(Match("u", (ANY, "\\jürgen\\", ANY), cased=True), rec, fm)
    assert ev(Regex("u", "jürgen", "i"), rec, fm)
    assert not ev(Regex("u", "jürgen"), rec, fm)


def test_wildcards_cross_backslashes_and_newlines(fm: FieldMap) -> None:
    rec = {"p": "D:\\Windows\\a\\b\\c.exe", "m": "line1\nline2"}
    assert ev(Match("p", (ONE, ":\\windows\\", ANY, ".exe")), rec, fm)
    assert ev(Match("p", (ANY, "\\a\\", ONE, "\\c.exe")), rec, fm)
    assert not ev(Match("p", (ONE, ONE, ":\\windows\\", ANY)), rec, fm)
    assert ev(Match("m", ("line1", ONE, "line2")), rec, fm)
    assert ev(Match("m", (ANY, "1", ANY, "2")), rec, fm)
    # regex metacharacters in literals stay literal
    assert not ev(Match("p", ("D:.Windows", ANY)), rec, fm)


def test_keywords_search_every_scalar(fm: FieldMap) -> None:
    rec = {"a": {"b": ["x", {"c": "Mimikatz here"}]}, "n": 4624}
    assert ev(Match(None, (ANY, "mimikatz", ANY)), rec, fm)
    assert ev(Match(None, ("4624",)), rec, fm)
    assert ev(Regex(None, "Mimi"), rec, fm)
    assert not ev(Match(None, ("b",)), rec, fm)  # keys are not values


def test_cidr_and_regex_flags(fm: FieldMap) -> None:
    assert ev(Cidr("ip", ("10.0.0.0/8",)), {"ip": "10.255.0.1"}, fm)
    assert not ev(Cidr("ip", ("10.0.0.0/8",)), {"ip": "11.0.0.1"}, fm)
    assert not ev(Cidr("ip", ("10.0.0.0/8",)), {"ip": "not an ip"}, fm)
    assert ev(Cidr("ip", ("fc00::/7",)), {"ip": ["1.2.3.4", "fd00::1"]}, fm)
    assert not ev(Cidr("ip", ("::/0",)), {"ip": "1.2.3.4"}, fm)
    assert ev(Regex("t", "^b", "m"), {"t": "a\nb"}, fm)
    assert not ev(Regex("t", "^b"), {"t": "a\nb"}, fm)
    assert ev(Regex("t", "a.b", "s"), {"t": "a\nb"}, fm)


def test_fieldref(fm: FieldMap) -> None:
    rec = {"a": "C:\\Tools\\Foo.exe", "b": "foo.exe", "c": "C:\\TOOLS"}
    assert ev(FieldRef("a", "b", "endswith"), rec, fm)
    assert not ev(FieldRef("a", "b", "endswith", cased=True), rec, fm)
    assert ev(FieldRef("a", "c", "startswith"), rec, fm)
    assert not ev(FieldRef("a", "b", "eq"), rec, fm)
    assert not ev(FieldRef("a", "missing", "contains"), rec, fm)


def test_logic_and_constants(fm: FieldMap) -> None:
    assert ev(Or((Const(False), Not(Const(False)))), {}, fm)
    assert not ev(And((Const(True), Const(False))), {}, fm)
    assert ev(And(()), {}, fm)
    assert not ev(Or(()), {}, fm)


def test_predicates(fm: FieldMap) -> None:
    rec = {"name": "PsExec64.exe", "cmd": "a /x b", "pid": 42, "tags": ["x", "y"]}
    length = Call("length", (FieldValue("name"),))
    assert ev(Predicate(length, "==", Literal_(12)), rec, fm)
    assert ev(Predicate(length, ">", Literal_(5)), rec, fm)
    call = Call("startswith", (FieldValue("name"), Literal_("psexec")), cased=False)
    assert ev(Predicate(call, "==", Literal_(True)), rec, fm)
    call = Call("startswith", (FieldValue("name"), Literal_("psexec")))
    assert not ev(Predicate(call, "==", Literal_(True)), rec, fm)
    assert ev(Predicate(FieldValue("name"), ":", Literal_("psexec*")), rec, fm)
    assert not ev(Predicate(FieldValue("name"), "like", Literal_("psexec*")), rec, fm)
    assert ev(Predicate(FieldValue("name"), "like", Literal_("psexec*"), cased=False), rec, fm)
    assert ev(Predicate(FieldValue("name"), "regex", Literal_("Ps.*exe")), rec, fm)
    assert not ev(Predicate(FieldValue("name"), "regex", Literal_("Ps")), rec, fm)  # anchored
    assert ev(
        Predicate(FieldValue("cmd"), "regex", (Literal_("z"), Literal_("A.*B")), False), rec, fm
    )
    pred = Predicate(FieldValue("name"), "in", (Literal_("a"), Literal_("psexec64.EXE")), False)
    assert ev(pred, rec, fm)
    assert ev(Predicate(FieldValue("pid"), "==", Literal_("42")), rec, fm)
    assert ev(Predicate(FieldValue("tags"), "==", Literal_("y")), rec, fm)
    assert ev(Predicate(FieldValue("gone"), "==", Literal_(None)), rec, fm)
    assert not ev(Predicate(FieldValue("gone"), "!=", Literal_("x")), rec, fm)
    assert ev(Predicate(FieldValue("name"), "!=", Literal_(None)), rec, fm)
    summed = Call("add", (FieldValue("pid"), Literal_(8)))
    assert ev(Predicate(summed, "==", Literal_(50)), rec, fm)
    assert not ev(
        Predicate(Call("add", (FieldValue("gone"), Literal_(1))), ">", Literal_(0)), rec, fm
    )


# --------------------------------------------------------------------------- functions


@pytest.mark.parametrize(
    ("name", "args", "cased", "want"),
    [
        ("add", (2, 3), True, 5),
        ("add", (None, 3), True, None),
        ("subtract", (2, 3.5), True, -1.5),
        ("multiply", (4, 2), True, 8),
        ("divide", (7, 2), True, 3),
        ("divide", (-7, 2), True, -3),
        ("divide", (7.0, 2), True, 3.5),
        ("divide", (1, 0), True, None),
        ("modulo", (-7, 3), True, -1),
        ("modulo", (7, 3), True, 1),
        ("between", ("a[b]c[d]e", "[", "]"), True, "b"),
        ("between", ("a[b]c[d]e", "[", "]", True), True, "b]c[d"),
        ("between", ("aXbYc", "x", "y"), False, "b"),
        ("between", ("aXbYc", "x", "y"), True, ""),
        ("cidrmatch", ("10.1.2.3", "192.168.0.0/16", "10.0.0.0/8"), True, True),
        ("cidrmatch", ("8.8.8.8", "10.0.0.0/8"), True, False),
        ("cidrmatch", (None, "10.0.0.0/8"), True, None),
        ("concat", ("a", 1, True), True, "a1true"),
        ("concat", ("a", None), True, None),
        ("endswith", ("File.EXE", ".exe"), True, False),
        ("endswith", ("File.EXE", ".exe"), False, True),
        ("indexof", ("abcabc", "c"), True, 2),
        ("indexof", ("abcabc", "c", 3), True, 5),
        ("indexof", ("abcabc", "C", -5), False, 2),
        ("indexof", ("abc", "z"), True, None),
        ("length", ("Jürgen",), True, 6),
        ("length", (None,), True, None),
        ("number", ("42",), True, 42),
        ("number", ("-1.5e3",), True, -1500.0),
        ("number", ("0xff", 16), True, 255),
        ("number", ("zz",), True, None),
        ("startswith", ("Cmd.exe", "cmd"), False, True),
        ("startswith", ("Cmd.exe", "cmd"), True, False),
        ("string", (42,), True, "42"),
        ("string", (False,), True, "false"),
        ("stringcontains", ("a /RunHandler b", "/runhandler"), False, True),
        ("stringcontains", ("a /RunHandler b", "/runhandler"), True, False),
        ("substring", ("start regsvr32.exe", -4), True, ".exe"),
        ("substring", ("start regsvr32.exe", 0, 5), True, "start"),
    ],
)
def test_functions(name: str, args: tuple, cased: bool, want: object) -> None:
    assert functions.call(name, args, cased=cased) == want


def test_function_errors() -> None:
    with pytest.raises(KeyError):
        functions.call("nosuch", ())
    with pytest.raises(TypeError):
        functions.call("length", ("a", "b"))


INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("modulo", (INF, 2)),
        ("multiply", (10**400, 1.5)),
        ("add", (10**400, 0.5)),
        ("indexof", ("abc", "b", INF)),
        ("indexof", ("abc", "b", NAN)),
        ("substring", ("abc", NAN)),
        ("substring", ("abc", 0, -INF)),
    ],
)
def test_functions_never_raise_on_hostile_numbers(name: str, args: tuple) -> None:
    """A record value (msgpack carries inf, NaN and huge ints) gives None, never an error:
    an exception here would fail the whole chunk, and its resends, forever."""
    assert functions.call(name, args) is None


def test_predicate_on_an_infinite_field_is_false(fm: FieldMap) -> None:
    pred = Predicate(Call("modulo", (FieldValue("n"), Literal_(2))), "==", Literal_(0))
    assert not ev(pred, {"n": INF}, fm)
    assert ev(pred, {"n": 4}, fm)
