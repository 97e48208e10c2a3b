"""ES|QL front-end: per construct fire / stay quiet (reference evaluator and compiled table
agree), ES|QL's three-valued logic, every refusal reason, and corpus sample rules with a
record that fires and a near miss."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest

from ruletag.errors import InvalidRule, UnsupportedRule
from ruletag.rules.compiler import build
from ruletag.rules.elastic import load_elastic_file
from ruletag.rules.esql import parse_esql, split_commands
from ruletag.rules.fields import FieldMap
from ruletag.rules.functions import call
from ruletag.rules.ir import Const, Rule
from ruletag.rules.javaregex import compile_java, dissect, grok_to_python
from ruletag.rules.matcher import Matcher
from ruletag.rules.reference import evaluate, reference_match
from support.paths import SAMPLE

FM = FieldMap.default()


def fires(query: str, record: dict) -> bool:
    """Whether ``record`` passes ``query``; the compiled table must agree with the reference."""
    cond = parse_esql(query).condition
    want = evaluate(cond, FM.view(record))
    rule = Rule(id="r", name="r", source="elastic", condition=cond)
    table = Matcher(build([rule], FM))
    assert bool(table.match(record)) == want, (query, record)
    return want


_SVC = 'match(process.name, "svchost.exe", { "fuzziness": 1, "max_expansions": 10 })'


def q(where: str, prefix: str = "") -> str:
    return f"from logs-* metadata _id {prefix}| where {where}"


# --------------------------------------------------------------------------- constructs

CASES: list[tuple[str, dict, bool]] = [
    # == is case-sensitive and literal; a missing field is null
    (q('a == "X*"'), {"a": "X*"}, True),
    (q('a == "X*"'), {"a": "Xy"}, False),
    (q('a == "X"'), {"a": "x"}, False),
    (q('a == "X"'), {}, False),
    (q('"X" == a'), {"a": "X"}, True),
    # != and NOT: null stays null
    (q('a != "X"'), {"a": "Y"}, True),
    (q('a != "X"'), {"a": "X"}, False),
    (q('a != "X"'), {}, False),
    (q('not a == "X"'), {}, False),
    (q('not a == "X"'), {"a": "Y"}, True),
    (q('NOT (a == "X" AND b == "Y")'), {"b": "Z"}, True),  # null AND false = false
    (q('NOT (a == "X" AND b == "Y")'), {"b": "Y"}, False),  # null AND true = null
    (q('NOT (a == "X" OR b == "Y")'), {"b": "Z"}, False),  # null OR false = null
    (q('a == "X" or b == "Y"'), {"b": "Y"}, True),
    # IS [NOT] NULL
    (q("a is null"), {}, True),
    (q("a is null"), {"a": None}, True),
    (q("a IS NOT NULL"), {"a": ""}, True),
    (q("not a is null"), {}, False),
    # numbers
    (q("p > 1024"), {"p": 8080}, True),
    (q("p > 1024"), {"p": "80"}, False),
    (q("not p > 1024"), {}, False),
    (q("p in (53, 80)"), {"p": 80}, True),
    (q("p in (53, 80)"), {"p": 81}, False),
    (q("p == 1.5"), {"p": 1.5}, True),
    (q("flag"), {"flag": True}, True),
    (q("not flag"), {"flag": False}, True),
    (q("not flag"), {}, False),
    (q("true and a is null"), {}, True),
    (q("null or false"), {}, False),
    # IN / NOT IN, null in the list
    (q('a in ("x", "y")'), {"a": "y"}, True),
    (q('a in ("x", "y")'), {"a": "Y"}, False),
    (q('a not in ("x", "y")'), {"a": "z"}, True),
    (q('a not in ("x", "y")'), {}, False),
    (q('not a in ("x", null)'), {"a": "z"}, False),
    (q('a in ("x", null)'), {"a": "x"}, True),
    (q("a in (b, c)"), {"a": "x", "c": "x"}, True),
    (q("a not in (b, c)"), {"a": "x", "b": "y"}, False),  # c null
    # LIKE: * and ?, backslash escapes, case-sensitive, whole value, lists
    (q('a like "*.exe"'), {"a": "C:\\x.exe"}, True),
    (q('a like "*.exe"'), {"a": "C:\\x.EXE"}, False),
    (q('a like "a?c"'), {"a": "abc"}, True),
    (q('a like "a?c"'), {"a": "abbc"}, False),
    (q('a like "a\\\\*b"'), {"a": "a*b"}, True),
    (q('a like "a\\\\*b"'), {"a": "axb"}, False),
    (q('a like """C:\\\\Windows\\\\*"""'), {"a": "C:\\Windows\\x"}, True),
    (q('a like ("x*", "y*")'), {"a": "yes"}, True),
    (q('a not like ("x*", "y*")'), {"a": "no"}, True),
    (q('a not like "x*"'), {}, False),
    (q('a not like "x*" or a is null'), {}, True),
    # RLIKE: Lucene regex on the whole value, case-sensitive
    (q('a rlike "ab"'), {"a": "ab"}, True),
    (q('a rlike "ab"'), {"a": "xab"}, False),
    (q('a rlike ".*ab.*"'), {"a": "xaby"}, True),
    (q('a rlike ".*AB.*"'), {"a": "xaby"}, False),
    (q('a rlike """[0-9]{2}\\.x"""'), {"a": "12.x"}, True),
    (q('a not rlike "a.*"'), {"a": "ba"}, True),
    # TO_LOWER / TO_UPPER
    (q('to_lower(a) like "*cmd*"'), {"a": "C:\\CMD.EXE"}, True),
    (q('to_lower(a) like "*CMD*"'), {"a": "CMD"}, False),
    (q('to_lower(a) == "cmd"'), {"a": "Cmd"}, True),
    (q('to_lower(a) != "cmd"'), {"a": "Cmd"}, False),
    (q('to_lower(a) in ("x", "cmd")'), {"a": "CMD"}, True),
    (q('to_upper(a) rlike ".*SELECT.*"'), {"a": "select 1"}, True),
    (q('to_upper(a) == "ß"'), {"a": "ß"}, False),
    # EVAL substitution, chains, shadowing
    (q('x == "abc"', "| eval x = to_lower(a) "), {"a": "ABC"}, True),
    (q('a == "v"', '| eval a = concat(a, "v") '), {"a": ""}, True),
    (
        'from l | eval t = replace(a, "[0-9]", "#")'
        ' | eval n = length(t) - length(replace(t, "#", "")) | where n >= 2',
        {"a": "a1b2"},
        True,
    ),
    (
        'from l | eval t = replace(a, "[0-9]", "#")'
        ' | eval n = length(t) - length(replace(t, "#", "")) | where n >= 2',
        {"a": "a1b"},
        False,
    ),
    (q("locate(a, space(3)) > 0"), {"a": "x   y"}, True),
    (q("locate(a, space(3)) > 0"), {"a": "x  y"}, False),
    (q('locate(a, "b") == 2'), {"a": "abc"}, True),
    (q('locate(a, "z") == 0'), {"a": "abc"}, True),
    (q('substring(a, 2, 3) == "bcd"'), {"a": "abcde"}, True),
    (q('substring(a, -2) == "de"'), {"a": "abcde"}, True),
    (q('starts_with(a, "ab")'), {"a": "abc"}, True),
    (q('ends_with(a, "AB")'), {"a": "xab"}, False),
    (q('not ends_with(a, "x")'), {}, False),
    (q('coalesce(a, b) == "y"'), {"b": "y"}, True),
    (q('cidr_match(ip, "10.0.0.0/8")'), {"ip": "10.1.2.3"}, True),
    (q('cidr_match(ip, "10.0.0.0/8")'), {"ip": "11.1.2.3"}, False),
    (q('concat(a, "-", b) == "x-y"'), {"a": "x", "b": "y"}, True),
    # casts and arithmetic; division by zero is null
    (q("a::double / b::double > 0.5"), {"a": 3, "b": 4}, True),
    (q("a::double / b::double > 0.5"), {"a": 1, "b": 4}, False),
    (q("not a / b > 0"), {"a": 1, "b": 0}, False),
    (q("to_double(a) == 2"), {"a": "2"}, True),
    (q("-a < 0"), {"a": 2}, True),
    # CASE: first true branch, null conditions skipped, no default is null
    (
        q('k == "two"', '| eval k = case(a == "x", "one", a == "y", "two", "other") '),
        {"a": "y"},
        True,
    ),
    (
        q('k == "two"', '| eval k = case(a == "x", "one", a == "y", "two", "other") '),
        {"a": "x"},
        False,
    ),
    (q('k == "other"', '| eval k = case(a == "x", "one", a == "y", "two", "other") '), {}, True),
    (q("k is null", '| eval k = case(a == "x", "one") '), {"a": "y"}, True),
    (q("k is null", '| eval k = case(a == "x", "one") '), {"a": "x"}, False),
    (q('k != "one"', '| eval k = case(a == "x", "one") '), {"a": "y"}, False),
    (q('case(a == "x", b == "1", true)'), {"a": "x", "b": "1"}, True),
    (q('case(a == "x", b == "1", true)'), {"a": "x", "b": "2"}, False),
    (q('case(a == "x", b == "1", true)'), {"a": "z"}, True),
    # a boolean EVAL column
    (q("b", '| eval b = a like "x*" '), {"a": "xy"}, True),
    (q("not b", '| eval b = a like "x*" '), {"a": "y"}, True),
    (q("not b", '| eval b = a like "x*" '), {}, False),
    (q("b is null", '| eval b = a like "x*" '), {}, True),
    (q("b == false", '| eval b = a like "x*" '), {"a": "y"}, True),
    # two fields
    (q("a != b"), {"a": "x", "b": "y"}, True),
    (q("a != b"), {"a": "x", "b": "x"}, False),
    (q("a != b"), {"a": "x"}, False),
    (q("a == b"), {"a": 1, "b": "1"}, True),
    # RENAME, KEEP, DROP, SORT, LIMIT, comments, pipes inside strings
    (q('c == "x"', "| rename a as c "), {"a": "x"}, True),
    (q('c == "x"', "| rename c = a "), {"a": "x"}, True),
    (q('ab == "x"', "| keep a*, b "), {"ab": "x"}, True),
    (q('a == "x"', "| sort a desc nulls last | limit 5 "), {"a": "x"}, True),
    ('from l // c | x\n| where a == "a|b" /* | */ | keep *', {"a": "a|b"}, True),
    ('from l | where a == """a "b" \\ c"""', {"a": 'a "b" \\ c'}, True),
    ('from l | where a == "t\\tn\\n"', {"a": "t\tn\n"}, True),
    ('from l | where `a.b` == "x"', {"a": {"b": "x"}}, True),
    # DISSECT and GROK: columns are null when the pattern does not match
    (q('y == "b"', '| dissect a "%{x} %{y}" '), {"a": "a b"}, True),
    (q('y == "b"', '| dissect a "%{x} %{y}" '), {"a": "ab"}, False),
    (q("y is null", '| dissect a "%{x} %{y}" '), {"a": "ab"}, True),
    (q('x == "a"', '| dissect a "[%{x}]" '), {"a": "[a]tail"}, True),
    (q('x == "p"', '| grok a "%{DATA:x}/exec%{GREEDYDATA}" '), {"a": "p/exec/q"}, True),
    (q('x == "p"', '| grok a "%{DATA:x}/exec%{GREEDYDATA}" '), {"a": "p/run"}, False),
    (q('`e.x` == "v"', '| grok a """k=(?<e.x>[a-z]+)$""" '), {"a": "k=v"}, True),
    (q('`e.x` == "v"', '| grok a """k=(?<e.x>[a-z]+)$""" '), {"a": "k=v1"}, False),
    # URL_DECODE, FROM_BASE64, JSON_EXTRACT(_source)
    (q('url_decode(a) == "a b/é"'), {"a": "a+b%2F%C3%A9"}, True),
    (q("url_decode(a) is null"), {"a": "%zz"}, True),
    (q('from_base64(a) == "hi"'), {"a": "aGk="}, True),
    (q('from_base64(a) == "hi"'), {"a": "aGk"}, True),
    (q("from_base64(a) is null"), {"a": "a"}, True),
    (q('json_extract(_source, "$.a.b") == "x"'), {"a": {"b": "x"}}, True),
    # multi-valued fields: any value (documented choice)
    (q('a == "x"'), {"a": ["x", "y"]}, True),
    (q('a != "x"'), {"a": ["x", "y"]}, False),
    # LIMIT 0
    (q('a == "x"', "| limit 0 "), {"a": "x"}, False),
    # RLIKE A&B over the whole pattern: the value fully matches both
    (q('a rlike ".*x.*&.*y.*"'), {"a": "1x2y3"}, True),
    (q('a rlike ".*x.*&.*y.*"'), {"a": "1x2"}, False),
    (q('a rlike "[a&]+&.*b"'), {"a": "a&b"}, False),  # & inside a class is a character
    (q('a rlike "[a&]+&.*\\\\&"'), {"a": "a&"}, True),  # \\& is a character
    (q('not a rlike "x&y"'), {"a": "x"}, True),
    (q('not a rlike "x&y"'), {}, False),
    # & elsewhere with a literal operand: that literal when the other operands fully match
    # it, else nothing (Lucene reads a | or ) right after & as a character)
    (q('a rlike "x|ab&\\"ab\\""'), {"a": "ab"}, True),
    (q('a rlike "x|ab&\\"ab\\""'), {"a": "x"}, True),
    (q('a rlike "x|a.&ab"'), {"a": "ab"}, True),
    (q('a rlike "x|a.&ab"'), {"a": "ac"}, False),
    (q('a rlike "(a&b)c"'), {"a": "bc"}, False),  # empty: never true
    (q('not a rlike "(a&b)c"'), {"a": "bc"}, True),
    (q('a rlike ".*(k>&|0>&1|z).*"'), {"a": "0>&1"}, False),  # k> & |0> & 1: empty
    (q('a rlike ".*(k>&|0>&1|z).*"'), {"a": "xzy"}, True),
    (q('a rlike "(x&x)+y"'), {"a": "xxy"}, True),
    # MATCH / ":" on a keyword field: one exact, case-sensitive term
    (q('match(process.name, "cmd.exe")'), {"process": {"name": "cmd.exe"}}, True),
    (q('match(process.name, "cmd.exe")'), {"process": {"name": "CMD.EXE"}}, False),
    (q('process.name : "cmd.exe"'), {"process": {"name": "x cmd.exe"}}, False),
    (q("process.pid : 4"), {"process": {"pid": 4}}, True),
    (q('source.ip : "10.0.0.0/8"'), {"source": {"ip": "10.1.2.3"}}, True),
    # on a text field: analyzed, any token (operator AND: every token), case-insensitive
    (q('message : "Failed LOGON"'), {"message": "an account failed to log on"}, True),
    (q('message : "Failed LOGON"'), {"message": "logon ok"}, True),
    (q('message : "Failed LOGON"'), {"message": "logons"}, False),
    (q('match(message, "failed logon", {"operator": "AND"})'), {"message": "logon failed"}, True),
    (q('match(message, "failed logon", {"operator": "AND"})'), {"message": "failed"}, False),
    (q('match(message, "x", {"boost": 2.0})'), {"message": "a x"}, True),
    (q('message : "rahc|metsys"'), {"message": "[metsys]"}, True),
    (q('match(message::STRING, "metsys")'), {"message": "Metsys"}, True),
    (
        q('process.command_line.text : "whoami"'),
        {"process": {"command_line": "c:\\whoami /all"}},
        True,
    ),
    (q('message : "..."'), {"message": "..."}, False),  # no tokens: matches nothing
    # fuzziness: within N edits (insert, delete, substitute, swap), as Lucene's fuzzy query;
    # keyword: the whole value, case-sensitive; text: any analyzed token
    (q(_SVC), {"process": {"name": "svchost.exe"}}, True),
    (q(_SVC), {"process": {"name": "svch0st.exe"}}, True),
    (q(_SVC), {"process": {"name": "scvhost.exe"}}, True),  # a swap is one edit
    (q(_SVC), {"process": {"name": "svchosts.exe"}}, True),
    (q(_SVC), {"process": {"name": "svchst.exe"}}, True),
    (q(_SVC), {"process": {"name": "svch0st.ex"}}, False),  # two edits
    (q(_SVC), {"process": {"name": "SVCHOST.EXE"}}, False),  # keyword: case-sensitive
    (q(_SVC), {"process": {"name": "xsvchost.exe "}}, False),
    (q(_SVC), {}, False),
    (
        q(_SVC.replace("1,", '1, "fuzzy_transpositions": false,')),
        {"process": {"name": "scvhost.exe"}},
        False,
    ),
    (q(_SVC.replace("1,", '1, "prefix_length": 2,')), {"process": {"name": "svhhost.exe"}}, True),
    (q(_SVC.replace("1,", '1, "prefix_length": 2,')), {"process": {"name": "sbchost.exe"}}, False),
    (
        q('match(message, "mimikatz", {"fuzziness": "AUTO"})'),
        {"message": "ran MimiKats today"},
        True,
    ),
    (q('match(message, "mimikatz", {"fuzziness": "AUTO"})'), {"message": "ran mimi-katz"}, False),
    (q('match(message, "net", {"fuzziness": "AUTO"})'), {"message": "nat user"}, True),
    (q('match(message, "ab", {"fuzziness": "AUTO"})'), {"message": "ac"}, False),  # < 3: exact
    (q('match(message, "ab", {"fuzziness": 1})'), {"message": "x ac y"}, True),
    # never null: NOT of a full-text match is true on a record without the field
    (q('not message : "x"'), {}, True),
    (q('not message : "x"'), {"message": "x y"}, False),
    (q('not match(process.name, "x")'), {"process": {"name": "y"}}, True),
    # KQL(): the embedded query with KQL semantics; never null either
    (q('kql("""a: (x or y) and not b: z""")'), {"a": "y"}, True),
    (q('kql("""a: (x or y) and not b: z""")'), {"a": "y", "b": "z"}, False),
    (q('kql("""a: x*""")'), {"a": "xa"}, True),
    (q('kql("""message: "log on" """)'), {"message": "Log On now"}, True),
    (q('kql("""message: "log on" """)'), {"message": "on log"}, False),
    (q('not kql("a: x")'), {}, True),
    (q('c == 1 and kql("a: x")'), {"c": 1, "a": "x"}, True),
]


@pytest.mark.parametrize(("query", "record", "want"), CASES)
def test_construct(query: str, record: dict, want: bool) -> None:
    assert fires(query, record) is want


def test_indices_and_limit_zero() -> None:
    parsed = parse_esql('FROM logs-a-*, "b", c METADATA _id, _index | WHERE a == 1 | LIMIT 0')
    assert parsed.indices == ("logs-a-*", "b", "c")
    assert parsed.condition == Const(False)


def test_commands_split_outside_strings_and_comments() -> None:
    cmds = split_commands('from x\n| where a == "|" // |\n| inline  stats n = count() by a')
    assert [(c.name, c.line) for c in cmds] == [("FROM", 1), ("WHERE", 2), ("INLINE STATS", 3)]


# --------------------------------------------------------------------------- refusals

REFUSED: list[tuple[str, str]] = [
    ("from l | stats n = count(*) by a", "ES|QL STATS aggregates over many events (stateful)"),
    (
        "from l | where a == 1 | inline stats n = count(*) by a",
        "ES|QL INLINE STATS aggregates over many events (stateful)",
    ),
    (
        "from l | inlinestats n = count(*)",
        "ES|QL INLINE STATS aggregates over many events (stateful)",
    ),
    ("from l | lookup join t on a", "ES|QL LOOKUP JOIN reads another index (stateful)"),
    ("from l | enrich p on a", "ES|QL ENRICH reads an enrich index (stateful)"),
    (
        'from l | dissect a "%{x}" | stats c = count(*)',
        "ES|QL STATS aggregates over many events (stateful)",
    ),
    ("from l | mv_expand a | where a == 1", "ES|QL MV_EXPAND is not supported"),
    (
        'from l metadata _ignored | mv_expand _ignored | where _ignored == "a"',
        "ES|QL MV_EXPAND _ignored: index-time metadata that stream records do not have",
    ),
    ("row a = 1 | where a == 1", "ES|QL source command ROW is not supported"),
    (
        q('match(event.duration, "5", {"fuzziness": 1})'),
        "ES|QL MATCH fuzziness on a long field",
    ),
    (
        q('match(a, "x", {"analyzer": "whitespace"})'),
        "ES|QL MATCH option analyzer is not supported",
    ),
    (q('match(to_lower(a), "x")'), "ES|QL MATCH on a computed value (not a field)"),
    (q("match(a, b)"), "ES|QL MATCH with a query that is not a literal"),
    (q('length(kql("a:x")) > 1'), "ES|QL function KQL used as a value (not a WHERE condition)"),
    (q('kql("a:x", {"case_insensitive": true})'), "ES|QL KQL with options is not supported"),
    (
        q('kql("a > 2024-01-01 and @timestamp < now")'),
        "ES|QL KQL(): KQL: range on keyword field a with a string",
    ),
    (
        q('qstr("x")'),
        "ES|QL function QSTR needs the field's analyzer (full-text search is not supported)",
    ),
    (q("mv_count(a) > 1"), "ES|QL function MV_COUNT is not supported"),
    (
        q('to_lower(case(a == "x", "A", "B")) == "a"'),
        "ES|QL CASE inside a function call is not supported",
    ),
    (
        q('a rlike "(a.*&.*b)c"'),
        "ES|QL RLIKE: Lucene & between operands that are not literal text, inside a pattern "
        "(only A&B over the whole pattern)",
    ),
    (q('a rlike "x|a&~b"'), "ES|QL RLIKE: Lucene regex operator '~' is not supported"),
    (
        q('replace(a, "\\\\p{Alpha}", "") == ""'),
        "ES|QL REPLACE regex: Java regex \\p{...} classes not supported",
    ),
    (q('replace(a, b, "") == ""'), "ES|QL REPLACE with a computed regex"),
    (q("a like b"), "ES|QL LIKE with a pattern that is not a string literal"),
    (q("a::long > 1"), "ES|QL cast ::LONG is not supported"),
    (q("length(space(n)) > 1"), "ES|QL SPACE with a computed count"),
    (
        q('json_extract(a, "$.b") == "x"'),
        "ES|QL function JSON_EXTRACT is supported on _source with a $.a.b path only",
    ),
    ('from l | grok a "%{IP:x}" | where x == "1"', "ES|QL GROK pattern %{IP} not supported"),
    ('from l | grok a "(?x)(?<x>a)" | where x == "1"', "ES|QL GROK regex flag (?x) not supported"),
    (
        'from l | grok a """(?<x>\\d+)""" | where x == "1"',
        "ES|QL GROK regex escape \\d not supported",
    ),
    (
        'from l | grok a "(?i)(?<x>[a-z]+)" | where x == "1"',
        "ES|QL GROK (?i) with letters in a character class not supported",
    ),
    (
        'from l | grok a "%{DATA:x:int}" | where x == 1',
        "ES|QL GROK typed captures (%{NAME:field:type}) not supported",
    ),
    (
        'from l | dissect a "%{+x} %{x}" | where x == "1"',
        "ES|QL DISSECT key modifier in %{+x} not supported",
    ),
    (
        'from l | dissect a "%{x}" append_separator = "," | where x == "1"',
        "ES|QL DISSECT option append_separator is not supported",
    ),
    (q("(a == 1) > b"), "ES|QL: booleans compared with >"),
]


@pytest.mark.parametrize(("query", "reason"), REFUSED)
def test_refused(query: str, reason: str) -> None:
    with pytest.raises(UnsupportedRule) as info:
        parse_esql(query)
    assert info.value.reason == reason


def test_unused_eval_columns_are_not_evaluated() -> None:
    # MV_COUNT is unsupported, but no WHERE reads the column
    assert fires('from l | eval n = mv_count(a) | where a == "x"', {"a": "x"})


INVALID: list[tuple[str, str, int]] = [
    (
        q('match(a, "x", {"fuzziness": 3})'),
        "ES|QL MATCH fuzziness 3: Lucene allows 0, 1, 2 or AUTO",
        1,
    ),
    ("from l | where a ==", "ES|QL syntax error: unexpected end of command", 1),
    (
        "from l\n| where a == == 1",
        "ES|QL syntax error at column 7: unexpected Token('COMPOP', '==')",
        2,
    ),
    ("where a == 1", "ES|QL query must start with FROM, not WHERE", 1),
    (
        "from l | keep a | where b == 1",
        "ES|QL: unknown column [b] (removed by KEEP/DROP/RENAME)",
        1,
    ),
    (
        "from l | drop b* | where bc == 1",
        "ES|QL: unknown column [bc] (removed by KEEP/DROP/RENAME)",
        1,
    ),
    (
        "from l | rename a as c | where a == 1",
        "ES|QL: unknown column [a] (removed by KEEP/DROP/RENAME)",
        1,
    ),
    ('from l | where a == "\\q"', "ES|QL string: invalid escape sequence \\q", 1),
    ('from l | where "x"', "ES|QL: 'x' is not a condition", 1),
    (
        'from l | where a like "a\\\\q"',
        "ES|QL: invalid pattern for LIKE [a\\q]: escape character is not followed by special "
        "wildcard char",
        1,
    ),
    (
        'from l | where a like """a\\"""',
        "ES|QL: invalid pattern for LIKE [a\\]: escape character is not followed by special "
        "wildcard char",
        1,
    ),
]


@pytest.mark.parametrize(("query", "reason", "line"), INVALID)
def test_invalid(query: str, reason: str, line: int) -> None:
    with pytest.raises(InvalidRule) as info:
        parse_esql(query)
    assert info.value.reason == reason
    assert (info.value.line or 1) == line


def test_loader_reports_file_lines(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text(
        '[metadata]\ncreation_date = "2024/01/01"\n\n[rule]\nauthor = ["A"]\n'
        'description = "d"\nname = "n"\nrisk_score = 47\nrule_id = "id-1"\n'
        'severity = "medium"\ntype = "esql"\nlanguage = "esql"\n'
        "query = '''\nfrom logs-*\n| where a == 1\n| mv_expand a\n'''\n",
        encoding="utf-8",
    )
    with pytest.raises(UnsupportedRule) as info:
        load_elastic_file(path)
    assert (info.value.reason, info.value.line) == ("ES|QL MV_EXPAND is not supported", 16)


# --------------------------------------------------------------------------- helpers


def test_java_regex_translation() -> None:
    assert compile_java("a.b").fullmatch("a\rb") is None  # . excludes line terminators
    assert compile_java("(?s)a.b").fullmatch("a\rb")
    assert compile_java("ab$").search("xab\n")
    assert compile_java("ab$").search("xab\nc") is None
    assert compile_java("(?i)é").search("É") is None  # ASCII-only case folding
    assert compile_java("\\w+").fullmatch("é") is None
    assert compile_java("\\w++x").search("aax") is None  # possessive
    assert compile_java("(?<n>a)\\0101").fullmatch("aA")
    with pytest.raises(ValueError, match="nested character classes"):
        compile_java("[a[b]]")
    with pytest.raises(ValueError, match="flag"):
        compile_java("(?m)a")
    assert call("replace", ["a1b22", "(\\d)", "<$1>"]) == "a<1>b<2><2>"
    assert call("replace", ["ab", "(?<x>a)", "${x}\\$"]) == "a$b"


def test_dissect_like_elasticsearch() -> None:
    assert dissect("foo bar baz", "%{a} %{?b} %{c}") == {"a": "foo", "c": "baz"}
    assert dissect("foo,,,", "%{a},%{b},%{c},%{d}") == {"a": "foo", "b": "", "c": "", "d": ""}
    assert dissect("foo,,,,bar", "%{a->},%{b}") == {"a": "foo", "b": "bar"}
    assert dissect("foo bar", "%{a},%{b}") is None
    assert dissect("x", "x%{a}") is None  # the input must be longer than the leading text
    assert dissect("{k=v}", "{%{?key}=%{v}}") == {"v": "v"}


def test_grok_caseless_and_line_anchors_follow_oniguruma() -> None:
    python, _ = grok_to_python("(?i)^fi(?<x>k)$")
    rx = re.compile(python)
    assert rx.search("a\nFI\u212a\nb").group("g0") == "\u212a"  # Kelvin sign folds to k
    assert rx.search("\ufb01k")  # the fi ligature folds to "fi"
    assert rx.search("\u0131k") is None  # dotless i does not fold to i
    assert re.compile(grok_to_python("(?<x>a)^")[0]).search("a\n") is None  # not after a final \n
    assert call("trim", ["\u2003 x\t\n"]) == "x"
    assert call("trim", ["\xa0x"]) == "\xa0x"  # non-breaking space is not white space in Java


def test_grok_translation() -> None:
    python, columns = grok_to_python("%{DATA}/exec\\?%{DATA:raw}&(?:a|b)=%{GREEDYDATA}")
    assert columns == {"raw": "g0"}
    assert python == "(?:.*?)/exec\\?(?P<g0>.*?)\\&(?:a|b)=(?:.*)"


def test_url_decode_and_base64() -> None:
    assert call("url_decode", ["%2b%+f%"]) is None
    assert call("url_decode", ["%+f"]) == "\x0f"  # Integer.parseInt accepts a sign
    assert call("url_decode", ["%C3"]) == "\ufffd"
    assert call("from_base64", ["aGk=x"]) is None
    assert call("from_base64", ["aG=="]) == "h"
    assert call("from_base64", ["aGk=="]) is None


# --------------------------------------------------------------------------- corpus samples


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _csr(der: bytes) -> str:
    pem = (
        "-----BEGIN CERTIFICATE REQUEST-----\r\n"
        + _b64(der)
        + "\r\n-----END CERTIFICATE REQUEST-----\n"
    )
    return _b64(pem.encode())


_FORMAT_SCRIPT = '"{0}{1}" -f "a","b"; ' * 6 + "x" * 500
_CLOUDTRAIL = {"data_stream": {"dataset": "aws.cloudtrail"}, "event": {"outcome": "success"}}
_S3 = {
    **_CLOUDTRAIL,
    "event": {"provider": "s3.amazonaws.com", "action": "PutObject", "outcome": "success"},
    "aws": {
        "cloudtrail": {
            "user_identity": {"type": "IAMUser"},
            "request_parameters": "{bucketName=b, Host=h, key=static/js/main.js}",
        }
    },
}
_K8S = {
    "kubernetes": {
        "audit": {
            "objectRef": {"subresource": "exec"},
            "requestURI": "/api/v1/namespaces/d/pods/p/exec?command=cat&command=%2Fetc%2Fshadow"
            "&container=c&stdout=true",
        }
    }
}
_GKE = {
    "data_stream": {"dataset": "gcp.audit"},
    "service": {"name": "k8s.io"},
    "event": {
        "outcome": "success",
        "action": "io.k8s.certificates.v1.certificatesigningrequests.create",
    },
}


def _adcs(rmd: str) -> dict:
    return {
        "event": {"code": "4887"},
        "winlog": {
            "event_data": {
                "Requester": "CORP\\WS01$",
                "Attributes": "CertificateTemplate:Machine\r\nSAN:dns=dc01.corp.local\r\n"
                f"rmd:{rmd}\r\n",
            }
        },
    }


def _k8s_exec(query: str) -> dict:
    uri = f"/api/v1/namespaces/d/pods/p/exec?{query}&container=c&stdin=true&stdout=true"
    return {"kubernetes": {"audit": {"objectRef": {"subresource": "exec"}, "requestURI": uri}}}


def _rbac(verb: str, rules: dict, where: str = "requestObject") -> dict:
    return {
        "user": {"name": "alice"},
        "event": {"action": verb},
        "kubernetes": {
            "audit": {
                "objectRef": {"resource": "clusterroles", "name": "ops"},
                "verb": verb,
                "annotations": {"authorization_k8s_io/decision": "allow"},
                "level": "RequestResponse",
                "stage": "ResponseComplete",
                "sourceIPs": ["10.0.0.5"],
                where: {"rules": [{"verbs": ["list"], "resources": ["pods"]}, rules]},
            }
        },
    }


_GITHUB = {
    "data_stream": {"dataset": "github.audit"},
    "event": {"action": "protected_branch.rejected_ref_update"},
}


def _github(code: str) -> dict:
    message = (
        "refusing to allow a GitHub App to create or update workflow "
        "`.github/workflows/ci.yml` without `workflows` permission"
    )
    return {
        **_GITHUB,
        "github": {"category": "protected_branch", "reasons": [{"code": code, "message": message}]},
    }


SAMPLES: list[tuple[str, dict, dict]] = [
    (
        "network/command_and_control_fin7_c2_behavior.toml",
        {"data_stream": {"dataset": "network_traffic.tls"}, "destination": {"domain": "abcd.top"}},
        {"data_stream": {"dataset": "network_traffic.tls"}, "destination": {"domain": "zoom.us"}},
    ),
    (
        "windows/defense_evasion_posh_obfuscation_string_format.toml",
        {"event": {"code": "4104"}, "powershell": {"file": {"script_block_text": _FORMAT_SCRIPT}}},
        {
            "event": {"code": "4104"},
            "powershell": {"file": {"script_block_text": _FORMAT_SCRIPT}},
            "file": {
                "directory": "C:\\Program Files\\WindowsPowerShell\\Modules\\"
                "icinga-powershell-framework\\cache"
            },
        },
    ),
    (
        "integrations/aws/impact_s3_static_site_js_file_uploaded.toml",
        {**_S3, "user_agent": {"original": "aws-cli/2.0"}},
        {**_S3},  # no user agent: NOT (null LIKE ...) is null, the row is dropped
    ),
    (
        "integrations/kubernetes/credential_access_kubernetes_pod_exec_sensitive_file_access.toml",
        _K8S,
        {
            "kubernetes": {
                "audit": {
                    "objectRef": {"subresource": "exec"},
                    "requestURI": "/api/v1/namespaces/d/pods/p/exec?command=cat"
                    "&command=%2Fetc%2Fresolv.conf&container=c",
                }
            }
        },
    ),
    (
        "integrations/azure/discovery_aad_graph_suspicious_user_agent.toml",
        {
            "data_stream": {"dataset": "azure.aadgraphactivitylogs"},
            "azure.aadgraphactivitylogs.properties.actor_type": "User",
            "user_agent": {"original": "Python-urllib/3.11"},
        },
        {
            "data_stream": {"dataset": "azure.aadgraphactivitylogs"},
            "azure.aadgraphactivitylogs.properties.actor_type": "User",
            "user_agent": {"original": "Mozilla/5.0 (Windows NT 10.0)"},
        },
    ),
    (
        "cross-platform/defense_evasion_whitespace_padding_command_line.toml",
        {
            "event": {"category": "process", "type": "start", "action": "exec"},
            "process": {"command_line": "cmd" + " " * 100 + "/c whoami"},
        },
        {  # no event.action: event.action != "fork" is null
            "event": {"category": "process", "type": "start"},
            "process": {"command_line": "cmd" + " " * 100 + "/c whoami"},
        },
    ),
    (
        "windows/initial_access_mssql_potential_sql_injection.toml",
        {
            "host": {"os": {"type": "windows"}},
            "winlog": {"provider_name": "MSSQLSERVER"},
            "event": {"code": "33205"},
            "message": "statement: select 1; waitfor delay '0:0:5'--",
        },
        {
            "host": {"os": {"type": "windows"}},
            "winlog": {"provider_name": "MSSQLSERVER"},
            "event": {"code": "33205"},
            "message": "statement: select 1; waitfor delay '0:0:x'--",
        },
    ),
    (
        "integrations/aws/persistence_iam_user_created_access_keys_for_another_user.toml",
        {
            **_CLOUDTRAIL,
            "event": {
                "provider": "iam.amazonaws.com",
                "action": "CreateAccessKey",
                "outcome": "success",
            },
            "user": {"name": "alice", "target": {"name": "bob"}},
        },
        {
            **_CLOUDTRAIL,
            "event": {
                "provider": "iam.amazonaws.com",
                "action": "CreateAccessKey",
                "outcome": "success",
            },
            "user": {"name": "alice", "target": {"name": "alice"}},
        },
    ),
    (  # RLIKE with & inside an alternation: the intersections are empty, the rest matches
        "integrations/kubernetes/execution_kubernetes_pod_exec_potential_reverse_shell.toml",
        _k8s_exec("command=sh&command=-c&command=mkfifo%20%2Ftmp%2Ff"),
        _k8s_exec("command=sh&command=-c&command=0%3E%261"),
    ),
    (  # the match operator on a text field: any token of the query
        "windows/defense_evasion_posh_obfuscation_reverse_keyword.toml",
        {
            "event": {"code": "4104"},
            "powershell": {"file": {"script_block_text": "$t = 'metsys.O.I' ; $n = 'tcejbo-wen'"}},
        },
        {  # one reversed keyword: the count stays below two
            "event": {"code": "4104"},
            "powershell": {"file": {"script_block_text": "$t = 'metsys.O.I' ; $n = 'x'"}},
        },
    ),
    (  # MATCH on a text field cast to STRING (the query runs on the indexed field)
        "integrations/github/initial_access_github_actions_workflow_injection_blocked.toml",
        _github("workflow_updates"),
        _github("required_status_checks"),
    ),
    (  # KQL() in an OR: keyword values, arrays of objects
        "integrations/kubernetes/persistence_sensitive_role_creation_or_modification.toml",
        _rbac("create", {"verbs": ["get", "list"], "resources": ["secrets"]}),
        _rbac("create", {"verbs": ["get", "list"], "resources": ["configmaps"]}),
    ),
    (  # KQL() with a quoted "*": the literal value, not a wildcard
        "integrations/kubernetes/privilege_escalation_role_patch_wildcard_verbs_resources_response.toml",
        _rbac("patch", {"verbs": ["*"], "resources": ["*"]}, "responseObject"),
        _rbac("patch", {"verbs": ["*"], "resources": ["roles"]}, "responseObject"),
    ),
    (
        "integrations/gcp/privilege_escalation_gcp_gke_certificate_signing_request_privileged_identity_requested.toml",
        {
            **_GKE,
            "gcp": {
                "audit": {
                    "request": {"spec": {"request": _csr(b"\x30\x82O=system:masters\x00\xff")}}
                }
            },
        },
        {
            **_GKE,
            "gcp": {
                "audit": {"request": {"spec": {"request": _csr(b"\x30\x82O=system:nodes\x00\xff")}}}
            },
        },
    ),
    (  # MATCH with fuzziness 1: a one-letter lookalike of svchost.exe outside System32
        "windows/defense_evasion_masquerading_as_svchost.toml",
        {
            "event": {"category": ["process"], "type": ["start"]},
            "process": {"name": "svch0st.exe", "executable": "C:\\Users\\Public\\svch0st.exe"},
        },
        {
            "event": {"category": ["process"], "type": ["start"]},
            "process": {
                "name": "svchost.exe",
                "executable": "C:\\Windows\\System32\\svchost.exe",
            },
        },
    ),
]


@pytest.mark.parametrize(
    ("rel", "fire", "quiet"), SAMPLES, ids=[s[0].split("/")[-1] for s in SAMPLES]
)
def test_corpus_sample_rule_fires_and_near_miss_stays_quiet(
    rel: str, fire: dict, quiet: dict
) -> None:
    (rule,) = load_elastic_file(SAMPLE / "elastic" / "rules" / rel)
    table = Matcher(build([rule], FM))
    assert reference_match([rule], fire, FM) == [rule.id]
    assert [table.table.rules[i].id for i in table.match(fire)] == [rule.id]
    assert reference_match([rule], quiet, FM) == []
    assert table.match(quiet) == []
