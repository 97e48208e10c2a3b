"""Sigma front-end: YAML snippets on disk -> exact IR, errors with reasons and lines, corpus."""

from __future__ import annotations

import base64
import collections
import textwrap
import uuid
from pathlib import Path

import pytest

from ruletag.errors import InvalidRule, RuleError, UnsupportedRule
from ruletag.rules import attack
from ruletag.rules.ir import (
    And,
    Attack,
    Cidr,
    Compare,
    Equals,
    Exists,
    FieldRef,
    IsNull,
    Logsource,
    Match,
    Node,
    Not,
    Or,
    Regex,
    Wild,
)
from ruletag.rules.sigma import load_sigma_file
from support.paths import SIGMA_SEED, corpus, needs_corpus
from support.seeds import SIGMA_ID, SIGMA_NAME, sigma_seed_condition

SEED = SIGMA_SEED

ANY, ONE = Wild.ANY, Wild.ONE
ID1 = "00000000-0000-0000-0000-000000000001"
ID2 = "00000000-0000-0000-0000-000000000002"
HEADER = """\
title: Test rule
id: 11111111-2222-3333-4444-555555555555
logsource:
    product: windows
    category: process_creation
detection:
"""


def write(tmp_path: Path, text: str, name: str = "rule.yml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def condition(
    tmp_path: Path, detection: str, variables: dict[str, list[str]] | None = None
) -> Node:
    """Load a rule whose detection block is ``detection`` and return its condition."""
    body = textwrap.indent(textwrap.dedent(detection), "    ")
    rules = load_sigma_file(write(tmp_path, HEADER + body), variables)
    assert len(rules) == 1
    return rules[0].condition


def contains(field: str | None, text: str, cased: bool = False) -> Match:
    return Match(field, (ANY, text, ANY), cased)


# --------------------------------------------------------------------------- the seed


def test_seed_rule_exact_ir() -> None:
    (rule,) = load_sigma_file(SEED)
    assert rule.condition == sigma_seed_condition()
    assert (rule.id, rule.name) == (SIGMA_ID, SIGMA_NAME)
    assert (rule.source, rule.path, rule.line) == ("sigma", str(SEED), 1)
    assert (rule.severity, rule.risk_score) == ("medium", 47)
    assert rule.author == ("Roberto Rodriguez (Cyb3rWard0g)", "OTR (Open Threat Research)")
    assert rule.modified == "2024-03-12"
    assert rule.logsource == Logsource("windows", "network_connection", None)
    assert rule.tags == ("attack.stealth", "attack.t1218")
    assert [t.id for t in rule.techniques] == ["T1218"]
    assert rule.techniques == (attack.technique("T1218") or Attack("T1218", "T1218"),)
    assert rule.tactics == (attack.tactic_by_shortname("stealth") or Attack("", "stealth"),)


# --------------------------------------------------------------------------- modifiers


def test_string_modifiers_and_all(tmp_path: Path) -> None:
    cond = condition(
        tmp_path,
        """
        sel:
            A|contains: 'x'
            B|startswith: 'y'
            C|endswith: 'z'
            D|contains|all: ['p', 'q']
            E: ['one', 'two']
            F: 'a?b*c\\\\*'
        condition: sel
        """,
    )
    assert cond == And(
        (
            contains("A", "x"),
            Match("B", ("y", ANY)),
            Match("C", (ANY, "z")),
            contains("D", "p"),
            contains("D", "q"),
            Or((Match("E", ("one",)), Match("E", ("two",)))),
            Match("F", ("a", ONE, "b", ANY, "c\\", ANY)),
        )
    )


def test_cased_modifier(tmp_path: Path) -> None:
    cond = condition(tmp_path, "sel:\n    A|cased|contains: 'AbC'\ncondition: sel\n")
    assert cond == Match("A", (ANY, "AbC", ANY), cased=True)


def test_windash_expands_every_dash_form(tmp_path: Path) -> None:
    cond = condition(tmp_path, "sel:\n    CommandLine|windash|contains: ' -enc '\ncondition: sel\n")
    dashes = ["-", "/", "\u2013", "\u2014", "\u2015"]
    assert cond == Or(tuple(contains("CommandLine", f" {d}enc ") for d in dashes))


def test_regex_flags_and_contains(tmp_path: Path) -> None:
    cond = condition(
        tmp_path,
        """
        sel:
            A|re: '^C:\\\\Users\\\\[^\\\\]+$'
            B|re|i|m|s: 'a.b'
            C|re|contains: 'x|y'
        condition: sel
        """,
    )
    assert cond == And(
        (
            Regex("A", "^C:\\\\Users\\\\[^\\\\]+$"),
            Regex("B", "a.b", "ims"),
            Regex("C", ".*(?:x|y).*"),
        )
    )


def test_regex_not_supported_by_re2(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedRule) as info:
        condition(tmp_path, "sel:\n    A: 'x'\n    B|re: 'a(?=b)'\ncondition: sel\n")
    assert info.value.reason == "regex not supported by RE2: invalid perl operator: (?="
    assert info.value.line == 9
    assert info.value.path == str(tmp_path / "rule.yml")


def test_invalid_regex(tmp_path: Path) -> None:
    with pytest.raises(InvalidRule) as info:
        condition(tmp_path, "sel:\n    A: 'x'\n    B|re: 'a(b'\ncondition: sel\n")
    assert info.value.reason.startswith("invalid regex: missing )")
    assert info.value.line == 9


def test_cidr_ipv4_and_ipv6_merge_into_one_leaf(tmp_path: Path) -> None:
    cond = condition(
        tmp_path,
        """
        sel:
            DestinationIp|cidr:
                - '10.0.0.0/8'
                - 'fe80::/10'
        other:
            DestinationIp|cidr: '192.168.0.0/16'
        condition: sel or other
        """,
    )
    assert cond == Cidr("DestinationIp", ("10.0.0.0/8", "fe80::/10", "192.168.0.0/16"))


def test_encoding_modifiers(tmp_path: Path) -> None:
    cond = condition(
        tmp_path,
        """
        b64:
            A|base64: 'ab'
        b64off:
            B|base64offset|contains: 'abc'
        wide:
            C|wide|contains: 'ab'
        u16:
            D|utf16|base64: 'ab'
        u16be:
            E|utf16be: 'ab'
        condition: all of them
        """,
    )
    b64 = base64.b64encode
    assert cond == And(
        (
            Match("A", (b64(b"ab").decode(),)),
            # "abc" at the three byte offsets: YWJj, (IG)FiY(w==), (ICB)hYm(M=)
            Or((contains("B", "YWJj"), contains("B", "FiY"), contains("B", "hYm"))),
            contains("C", "a\x00b\x00"),
            Match("D", (b64(b"\xff\xfea\x00b\x00").decode(),)),
            Match("E", ("\x00a\x00b",)),
        )
    )


def test_fieldref_exists_compare_null_numbers_bools(tmp_path: Path) -> None:
    cond = condition(
        tmp_path,
        """
        sel:
            A|fieldref: B
            C|fieldref|startswith: D
            E|fieldref|endswith: F
            G|fieldref|contains: H
            I|exists: true
            J|exists: false
            K|gt: 5
            L|gte: 5
            M|lt: 2.5
            N|lte: -1
            EventID: 4688
            Flag: true
            Gone: null
            Empty: ''
        condition: sel
        """,
    )
    assert cond == And(
        (
            FieldRef("A", "B", "eq"),
            FieldRef("C", "D", "startswith"),
            FieldRef("E", "F", "endswith"),
            FieldRef("G", "H", "contains"),
            Exists("I"),
            IsNull("J"),
            Compare("K", ">", 5),
            Compare("L", ">=", 5),
            Compare("M", "<", 2.5),
            Compare("N", "<=", -1),
            Equals("EventID", 4688),
            Equals("Flag", True),
            IsNull("Gone"),
            Match("Empty", ()),
        )
    )


def test_keywords(tmp_path: Path) -> None:
    cond = condition(
        tmp_path,
        """
        keywords:
            - 'evil*thing'
            - 42
        strict:
            '|all':
                - 'a'
                - 'b'
        condition: keywords and not strict
        """,
    )
    assert cond == And(
        (
            Or((Match(None, ("evil", ANY, "thing")), Match(None, ("42",)))),
            Not(And((Match(None, ("a",)), Match(None, ("b",))))),
        )
    )


def test_selectors_with_wildcards_and_them(tmp_path: Path) -> None:
    cond = condition(
        tmp_path,
        """
        selection_a:
            X: 'a'
        selection_b:
            Y: 'b'
        filter_one:
            Z: 'z'
        condition: (1 of selection_* or all of them) and not all of filter_*
        """,
    )
    a, b, z = Match("X", ("a",)), Match("Y", ("b",)), Match("Z", ("z",))
    assert cond == And((Or((a, b, And((a, b, z)))), Not(z)))


def test_double_negation_and_nesting_simplified(tmp_path: Path) -> None:
    cond = condition(
        tmp_path,
        "a:\n    X: 1\nb:\n    Y: 2\nc:\n    Z: 3\ncondition: not (not a) and (b and (c))\n",
    )
    assert cond == And((Equals("X", 1), Equals("Y", 2), Equals("Z", 3)))


def test_expand_with_variables(tmp_path: Path) -> None:
    cond = condition(
        tmp_path,
        """
        sel:
            User|expand: '%domain%\\%admins%'
            Pattern|re|expand: '^%domain%$'
        condition: sel
        """,
        {"domain": ["CORP", "LAB"], "admins": ["adm*"], "unused": []},
    )
    assert cond == And(
        (
            Or(
                (
                    Match("User", ("CORP\\adm", ANY)),
                    Match("User", ("LAB\\adm", ANY)),
                )
            ),
            Or((Regex("Pattern", "^CORP$"), Regex("Pattern", "^LAB$"))),
        )
    )


def test_unset_placeholder_is_unsupported_with_line(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedRule) as info:
        condition(
            tmp_path,
            "sel:\n    A: 'x'\n    User|expand: '%Admins%'\ncondition: sel\n",
            {"Other": ["y"]},
        )
    assert info.value.reason == "unset placeholder: %Admins%"
    assert info.value.line == 9
    assert info.value.kind == "unsupported"


# --------------------------------------------------------------------------- metadata


def test_metadata_defaults_and_attack(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        title: Meta
        id: 0f7d1a6e-1111-2222-3333-444444444444
        author: Jane Doe, John Roe
        date: 2021-02-03
        tags:
            - attack.execution
            - attack.defense-evasion
            - attack.stealth
            - attack.t1059.001
            - attack.T1059.001
            - attack.g0016
            - attack.no-such-tactic
            - cve.2021-44228
        logsource:
            service: sysmon
        detection:
            sel:
                X: 1
            condition: sel
        """,
    )
    (rule,) = load_sigma_file(path)
    assert (rule.severity, rule.risk_score) == ("medium", 47)
    assert rule.author == ("Jane Doe", "John Roe")
    assert rule.modified == "2021-02-03"
    assert rule.logsource == Logsource(None, None, "sysmon")
    assert rule.tags[-2:] == ("attack.no-such-tactic", "cve.2021-44228")
    assert len(rule.tags) == 8
    assert [t.id for t in rule.techniques] == ["T1059.001"]
    tactic_ids = [t.id for t in rule.tactics]
    assert tactic_ids == ["TA0002", "TA0005", ""]
    assert rule.tactics[-1] == Attack("", "no-such-tactic")


@pytest.mark.parametrize(
    ("level", "score"),
    [("informational", 21), ("low", 21), ("high", 73), ("critical", 99)],
)
def test_levels_give_risk_scores(tmp_path: Path, level: str, score: int) -> None:
    text = f"title: L\nid: {ID1}\nlevel: {level}\nauthor: Solo, Author\nmodified: 2022-01-01\n"
    text += "date: 2020-01-01\nlogsource:\n    product: linux\ndetection:\n"
    text += "    sel:\n        X: 1\n    condition: sel\n"
    (rule,) = load_sigma_file(write(tmp_path, text))
    assert (rule.severity, rule.risk_score) == (level, score)
    assert rule.modified == "2022-01-01"
    assert rule.author == ("Solo", "Author")
    assert rule.id == ID1


def test_single_author_kept_intact_and_missing_id_is_stable(tmp_path: Path) -> None:
    text = "title: NoId\nauthor: Jane Doe,Jr\nlogsource:\n    product: linux\n"
    text += "detection:\n    sel:\n        X: 1\n    condition: sel\n"
    path = write(tmp_path, text)
    (rule,) = load_sigma_file(path)
    assert rule.author == ("Jane Doe,Jr",)
    assert rule.id == str(uuid.uuid5(uuid.NAMESPACE_URL, f"sigma:{path}#0"))
    assert load_sigma_file(path)[0].id == rule.id


def test_multi_document_file(tmp_path: Path) -> None:
    doc = "title: {t}\nid: {i}\nlogsource:\n    product: linux\ndetection:\n"
    doc += "    sel:\n        X: {x}\n    condition: sel\n"
    one, two = doc.format(t="One", i=ID1, x=1), doc.format(t="Two", i=ID2, x=2)
    path = write(tmp_path, one + "---\n" + two)
    rules = load_sigma_file(path)
    assert [(r.name, r.line, r.condition) for r in rules] == [
        ("One", 1, Equals("X", 1)),
        ("Two", 10, Equals("X", 2)),
    ]


def test_action_global_collection(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        action: global
        title: Shared
        logsource:
            product: linux
        detection:
            condition: sel
        ---
        id: 00000000-0000-0000-0000-000000000001
        detection:
            sel:
                X: 1
        ---
        id: 00000000-0000-0000-0000-000000000002
        detection:
            sel:
                X: 2
        """,
    )
    rules = load_sigma_file(path)
    assert [(r.id, r.name, r.condition) for r in rules] == [
        (ID1, "Shared", Equals("X", 1)),
        (ID2, "Shared", Equals("X", 2)),
    ]


# --------------------------------------------------------------------------- errors


def error_of(path: Path) -> RuleError:
    with pytest.raises(RuleError) as info:
        load_sigma_file(path)
    assert info.value.path == str(path)
    return info.value


def test_bad_yaml_has_line(tmp_path: Path) -> None:
    err = error_of(write(tmp_path, "title: x\ndetection:\n  sel: [unclosed\n  condition: sel\n"))
    assert isinstance(err, InvalidRule)
    assert err.reason.startswith("bad YAML")
    assert err.line is not None and err.line >= 3


def test_duplicate_key_has_line(tmp_path: Path) -> None:
    text = HEADER + "    sel:\n        X: 1\n        X: 2\n    condition: sel\n"
    err = error_of(write(tmp_path, text))
    assert isinstance(err, InvalidRule)
    assert err.reason == "duplicate YAML key: 'X'"
    assert err.line == 9


def test_unknown_and_unsupported_modifiers(tmp_path: Path) -> None:
    err = error_of(write(tmp_path, HEADER + "    sel:\n        X|bogus: 1\n    condition: sel\n"))
    assert (type(err), err.reason, err.line) == (InvalidRule, "unknown modifier: bogus", 8)
    err = error_of(write(tmp_path, HEADER + "    sel:\n        X|hour: 1\n    condition: sel\n"))
    assert (type(err), err.reason, err.line) == (UnsupportedRule, "unsupported modifier: hour", 8)


def test_undefined_detection_in_condition(tmp_path: Path) -> None:
    text = HEADER + "    sel:\n        X: 1\n    condition: sel and nope\n"
    err = error_of(write(tmp_path, text))
    assert isinstance(err, InvalidRule)
    assert "nope" in err.reason
    assert err.line == 9


def test_correlation_rules_are_checked_and_filter_rules_are_unsupported(tmp_path: Path) -> None:
    corr = "title: C\ncorrelation:\n    type: event_count\n    rules: [x]\n"
    err = error_of(write(tmp_path, corr))  # correlations: tests/test_correlation.py
    why = "correlation: 'timespan' must be a positive number with a unit s, m, h, d, w, M or y"
    assert (type(err), err.reason) == (InvalidRule, why)
    filt = "title: F\nlogsource:\n    product: windows\nfilter:\n    rules: [x]\n"
    err = error_of(write(tmp_path, filt))
    assert (type(err), err.reason) == (UnsupportedRule, "filter rules are not supported yet")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "no rule in file"),
        ("- just\n- a list\n", "rule is not a YAML mapping"),
    ],
)
def test_empty_and_non_mapping_files(tmp_path: Path, text: str, reason: str) -> None:
    err = error_of(write(tmp_path, text))
    assert (type(err), err.reason, err.line) == (InvalidRule, reason, 1)


def test_bad_ids(tmp_path: Path) -> None:
    text = "title: x\nid: {}\nlogsource:\n    product: a\ndetection:\n"
    text += "    sel:\n        X: 1\n    condition: sel\n"
    err = error_of(write(tmp_path, text.format(7)))
    assert (type(err), err.reason, err.line) == (InvalidRule, "rule id is not a string", 2)
    err = error_of(write(tmp_path, text.format("not-a-uuid")))
    assert (type(err), err.reason, err.line) == (
        InvalidRule,
        "Sigma rule identifier must be an UUID",
        2,
    )


def test_missing_detection_and_bad_structures(tmp_path: Path) -> None:
    err = error_of(write(tmp_path, "title: x\nlogsource:\n    product: a\n"))
    assert isinstance(err, InvalidRule)
    err = error_of(write(tmp_path, "title: x\nlogsource:\n    product: a\ndetection: [1, 2]\n"))
    assert isinstance(err, InvalidRule)
    err = error_of(write(tmp_path, "title: x\nlogsource: 7\ndetection:\n  condition: s\n"))
    assert isinstance(err, InvalidRule)


@pytest.mark.parametrize(
    ("detection", "reason", "line"),
    [
        ("sel:\n    X: 1\ncondition: 5\n", "condition is not a string", 9),
        ("sel:\n    1: 1\ncondition: sel\n", "detection key is not a string", 6),
        ("sel:\n    X: 1\ncondition: sel |\n", None, 9),
        ("sel:\n    X: 1\ncondition: (sel\n", None, 9),
        ("sel:\n    X|base64: 'a*'\ncondition: sel\n", None, 6),
        ("sel:\n    X|windash: '-a -b -c -d'\ncondition: sel\n", None, 8),
        ("sel:\n    X|gt: 'a'\ncondition: sel\n", None, 6),
        ("sel:\n    X: [[1]]\ncondition: sel\n", None, 6),
        ("sel: []\ncondition: sel\n", None, 8),
        ("keywords:\n    '|exists': true\ncondition: keywords\n", None, 6),
    ],
)
def test_malformed_detections_are_invalid(
    tmp_path: Path, detection: str, reason: str | None, line: int
) -> None:
    body = textwrap.indent(detection, "    ")
    err = error_of(write(tmp_path, HEADER + body))
    assert isinstance(err, InvalidRule)
    assert reason is None or err.reason == reason
    assert err.line == line


def test_unreadable_file(tmp_path: Path) -> None:
    err = error_of(tmp_path / "missing.yml")
    assert isinstance(err, InvalidRule)
    assert err.reason == "cannot read rule file: FileNotFoundError"


# --------------------------------------------------------------------------- corpus


@pytest.mark.slow  # ~5 s of CPU, well over that on a busy machine
@needs_corpus
def test_sigma_corpus_loads() -> None:
    files = sorted(corpus("sigma").rglob("*.yml"))
    assert len(files) > 3000
    loaded = 0
    reasons: collections.Counter[tuple[str, str]] = collections.Counter()
    for path in files:
        try:
            rules = load_sigma_file(path)
        except RuleError as e:  # any other exception fails the test
            assert isinstance(e, InvalidRule | UnsupportedRule)
            assert e.path == str(path) and e.line is not None and e.line >= 1
            reasons[(e.kind, e.reason)] += 1
            continue
        assert rules and all(r.source == "sigma" and r.id for r in rules)
        loaded += 1
    print(f"\nsigma corpus: {loaded}/{len(files)} loaded")
    for (kind, reason), count in reasons.most_common():
        print(f"{count:5d}  {kind:11s}  {reason}")
    assert loaded / len(files) >= 0.99
