"""KQL front-end: syntax, field-type semantics, rule filters and corpus rule fixtures.

Each matching case runs through the compiled table and the reference evaluator, which must
agree. Field types come from the shipped ``field_types.json``: ``process.name`` is keyword,
``process.command_line`` wildcard, ``process.command_line.text`` match_only_text,
``powershell.file.script_block_text`` text, ``source.ip`` ip, ``destination.port`` long,
``process.code_signature.trusted`` boolean, ``data_stream.dataset`` constant_keyword; a field
in neither source (``custom.thing``) is keyword.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest

from ruletag.errors import InvalidRule, RuleError, UnsupportedRule
from ruletag.rules import fieldtypes
from ruletag.rules.compiler import build
from ruletag.rules.elastic import load_elastic_file
from ruletag.rules.fields import FieldMap
from ruletag.rules.ir import (
    And,
    Cidr,
    Compare,
    Const,
    Equals,
    Exists,
    Match,
    Not,
    Or,
    Regex,
    Rule,
    Wild,
)
from ruletag.rules.kql import analyze, field_names, filters_condition, parse_kql
from ruletag.rules.matcher import Matcher
from ruletag.rules.reference import evaluate
from support.paths import SAMPLE

ANY = Wild.ANY
FM = FieldMap.default()


# --------------------------------------------------------------------------- field types


def test_field_types_table() -> None:
    assert fieldtypes.type_of("process.name") == "keyword"
    assert fieldtypes.type_of("process.command_line") == "wildcard"
    assert fieldtypes.type_of("process.command_line.text") == "match_only_text"
    assert fieldtypes.type_of("powershell.file.script_block_text") == "text"
    assert fieldtypes.type_of("source.ip") == "ip"
    assert fieldtypes.type_of("destination.port") == "long"
    assert fieldtypes.type_of("data_stream.dataset") == "constant_keyword"
    assert fieldtypes.type_of("custom.thing") == "keyword"
    assert fieldtypes.is_text("message") and not fieldtypes.is_text("process.name")
    assert fieldtypes.is_number("process.pid")


# --------------------------------------------------------------------------- syntax -> IR


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("process.name: cmd.exe", Match("process.name", ("cmd.exe",), cased=True)),
        ("process.name:cmd.exe", Match("process.name", ("cmd.exe",), cased=True)),
        ('process.name: "cmd.exe"', Match("process.name", ("cmd.exe",), cased=True)),
        ("process.name : *cmd*", Match("process.name", (ANY, "cmd", ANY), cased=True)),
        ('process.name: "*cmd*"', Match("process.name", ("*cmd*",), cased=True)),
        (r"process.name: \*cmd", Match("process.name", ("*cmd",), cased=True)),
        ("process.name: a?c", Match("process.name", ("a?c",), cased=True)),
        ("process.name: *", Exists("process.name")),
        ('process.name: "*"', Match("process.name", ("*",), cased=True)),
        ("custom.thing: two words", Match("custom.thing", ("two words",), cased=True)),
        ("custom.thing:   padded   ", Match("custom.thing", ("padded",), cased=True)),
        (r"custom.thing: C\:\\Windows", Match("custom.thing", ("C:\\Windows",), cased=True)),
        (r'custom.thing: "C:\Windows\\x"', Match("custom.thing", ("C:\\Windows\\x",), cased=True)),
        (r'custom.thing: "say \"hi\""', Match("custom.thing", ('say "hi"',), cased=True)),
        (r"custom.thing: a\tb", Match("custom.thing", ("a\tb",), cased=True)),
        (r'custom.thing: "a\nb"', Match("custom.thing", ("a\nb",), cased=True)),
        (r"custom.thing: \(x\)", Match("custom.thing", ("(x)",), cased=True)),
        (r"custom.thing: \u0041", Match("custom.thing", ("A",), cased=True)),
        (r"custom.thing: \or", Match("custom.thing", ("or",), cased=True)),
        (r"custom.thing: x \and y", Match("custom.thing", ("x and y",), cased=True)),
        ("custom.thing: oracle", Match("custom.thing", ("oracle",), cased=True)),
        ("custom.thing: notepad", Match("custom.thing", ("notepad",), cased=True)),
        ('"custom.thing": x', Match("custom.thing", ("x",), cased=True)),
        ("destination.port: 443", Equals("destination.port", 443)),
        ("destination.port > 1024", Compare("destination.port", ">", 1024)),
        ("destination.port <= 10", Compare("destination.port", "<=", 10)),
        ("custom.score >= 5.5", Compare("custom.score", ">=", 5.5)),
        ("process.code_signature.trusted: false", Equals("process.code_signature.trusted", False)),
        ("source.ip: 10.0.0.0/8", Cidr("source.ip", ("10.0.0.0/8",))),
        ('source.ip: "::1"', Cidr("source.ip", ("::1",))),
        (
            "source.ip: (10.0.0.0/8 or 192.168.0.0/16)",
            Cidr("source.ip", ("10.0.0.0/8", "192.168.0.0/16")),
        ),
        ("", Const(True)),
        ("   ", Const(True)),
    ],
)
def test_translation(query: str, expected: object) -> None:
    assert parse_kql(query) == expected


A = Match("a", ("1",), cased=True)
B = Match("b", ("2",), cased=True)
C = Match("c", ("3",), cased=True)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("a:1 and b:2", And((A, B))),
        ("a:1 AND b:2", And((A, B))),
        ("a:1 or b:2", Or((A, B))),
        ("a:1 Or b:2", Or((A, B))),
        ("not a:1", Not(A)),
        ("NOT a:1", Not(A)),
        ("not not a:1", A),
        ("a:1 or b:2 and c:3", Or((A, And((B, C))))),
        ("a:1 and b:2 or c:3", Or((And((A, B)), C))),
        ("(a:1 or b:2) and c:3", And((Or((A, B)), C))),
        ("not a:1 and b:2", And((Not(A), B))),
        ("not (a:1 and b:2)", Not(And((A, B)))),
        ("a:1\nand\nb:2", And((A, B))),
        (
            "a:(1 or 2 or 3)",
            Or(tuple(Match("a", (v,), cased=True) for v in "123")),
        ),
        ("a:(1 and not 2)", And((A, Not(Match("a", ("2",), cased=True))))),
        ("a:(* and not 1)", And((Exists("a"), Not(A)))),
        ("a:(1 or (2 and 3))", Or((A, And(tuple(Match("a", (v,), cased=True) for v in "23"))))),
        (
            "x: { a: 1 and b: 2 }",
            And((Match("x.a", ("1",), cased=True), Match("x.b", ("2",), cased=True))),
        ),
        ("x: { y: { a: 1 } }", Match("x.y.a", ("1",), cased=True)),
    ],
)
def test_boolean_structure(query: str, expected: object) -> None:
    assert parse_kql(query) == expected


def test_wildcard_field_names_stand_for_array_positions() -> None:
    assert field_names("a.*.b") == ["a.b", "a.0.b", "a.1.b", "a.2.b", "a.3.b", "a.4.b"]
    node = parse_kql("a.*.b: x")
    assert isinstance(node, Or) and len(node.args) == 6
    with pytest.raises(UnsupportedRule, match="wildcard field name"):
        parse_kql("process.*: x")
    with pytest.raises(UnsupportedRule, match="wildcard field name"):
        parse_kql("*: x")


@pytest.mark.parametrize(
    ("query", "error"),
    [
        ("a:", InvalidRule),
        ("a: (1 or", InvalidRule),
        ("a: 1 and ", InvalidRule),
        ("(a: 1", InvalidRule),
        ('a: "open', InvalidRule),
        ("a: x y: z", InvalidRule),
        ("a < ", InvalidRule),
        ("destination.port: abc", InvalidRule),
        ("destination.port: 44*", InvalidRule),
        ("destination.port > abc", InvalidRule),
        ("process.code_signature.trusted: yes", InvalidRule),
        ("source.ip: not-an-ip", InvalidRule),
        ("source.ip: 10.*", UnsupportedRule),
        ("source.ip > 10.0.0.1", UnsupportedRule),
        ("@timestamp > now-1d", UnsupportedRule),
        ("@timestamp: 2024-01-01", UnsupportedRule),
        ("message > 5", UnsupportedRule),
        ("custom.thing > abc", UnsupportedRule),
    ],
)
def test_errors(query: str, error: type[RuleError]) -> None:
    with pytest.raises(error):
        parse_kql(query)


def test_syntax_error_line() -> None:
    with pytest.raises(InvalidRule) as info:
        parse_kql("a: 1 and\nb: (2 or\n")
    assert info.value.line == 2
    assert "KQL syntax error" in info.value.reason


def test_standard_analyzer_tokens() -> None:
    assert analyze("Invoke-Mimikatz -DumpCreds") == ["invoke", "mimikatz", "dumpcreds"]
    assert analyze("C:\\Windows\\cmd.exe /c") == ["c", "windows", "cmd.exe", "c"]
    assert analyze("foo_bar don't 1,000.5 v1.2") == ["foo_bar", "don't", "1,000.5", "v1.2"]
    assert analyze("[CVE-2020-0601]") == ["cve", "2020", "0601"]
    assert analyze("a,b") == ["a", "b"]


def test_multi_fields_read_their_parent() -> None:
    node = parse_kql("process.command_line.text: x")
    assert isinstance(node, Regex) and node.field == "process.command_line"
    assert parse_kql("process.command_line.text: *") == Exists("process.command_line")
    assert fieldtypes.source_of("process.command_line.text") == "process.command_line"
    assert fieldtypes.source_of("process.command_line") == "process.command_line"
    assert fieldtypes.source_of("process.name") == "process.name"


def test_text_fields_compile_to_token_regexes() -> None:
    node = parse_kql('message: "Access denied"')
    assert isinstance(node, Regex) and node.field == "message" and node.flags == "is"
    node = parse_kql("message: access denied")  # match query: either token
    assert isinstance(node, Or) and all(isinstance(a, Regex) for a in node.args)
    assert parse_kql('message: "---"') == Const(False)  # no token: matches nothing


# --------------------------------------------------------------------------- matching

CASES: list[tuple[str, dict, bool]] = [
    # keyword: exact, case-sensitive
    ("process.name: cmd.exe", {"process": {"name": "cmd.exe"}}, True),
    ("process.name: cmd.exe", {"process": {"name": "CMD.EXE"}}, False),
    ("process.name: cmd.exe", {"process": {"name": "xcmd.exe"}}, False),
    ("process.name: cmd.exe", {"process": {"name": ["a", "cmd.exe"]}}, True),
    ("process.name: cmd.exe", {}, False),
    ("process.name: *.exe", {"process": {"name": "cmd.exe"}}, True),
    ("process.name: *.exe", {"process": {"name": "cmd.EXE"}}, False),
    ("process.name: c*d.exe", {"process": {"name": "cmd.exe"}}, True),
    ("process.name: c?d.exe", {"process": {"name": "cmd.exe"}}, False),
    ("process.name: c?d.exe", {"process": {"name": "c?d.exe"}}, True),
    ('process.name: "*.exe"', {"process": {"name": "cmd.exe"}}, False),
    ('process.name: "*.exe"', {"process": {"name": "*.exe"}}, True),
    ("data_stream.dataset: okta.system", {"data_stream": {"dataset": "okta.system"}}, True),
    ("data_stream.dataset: okta.system", {"data_stream": {"dataset": "Okta.System"}}, False),
    ("custom.thing: two words", {"custom": {"thing": "two words"}}, True),
    ("custom.thing: two words", {"custom": {"thing": "two"}}, False),
    ("a: 1 and", {"a": "1 and"}, True),
    ("event.code: 4688", {"event": {"code": "4688"}}, True),
    ("event.code: 4688", {"event": {"code": 4688}}, True),
    ("event.code: 4688", {"event": {"code": "4689"}}, False),
    # wildcard type: like keyword
    ("process.command_line: *-enc*", {"process": {"command_line": "ps -enc AAA"}}, True),
    ("process.command_line: *-enc*", {"process": {"command_line": "ps -ENC AAA"}}, False),
    # match_only_text / text: tokens, case-insensitive
    ("process.command_line.text: mimikatz", {"process": {"command_line": "x Mimikatz.exe"}}, False),
    (
        "process.command_line.text: mimikatz",
        {"process": {"command_line": "run MIMIKATZ now"}},
        True,
    ),
    ('message: "access denied"', {"message": "Error: ACCESS DENIED (5)"}, True),
    ('message: "access denied"', {"message": "denied access"}, False),
    ('message: "access denied"', {"message": "access-denied"}, True),
    ('message: "access denied"', {"message": "noaccess denied"}, False),
    ('message: "access denied"', {"message": "access.denied"}, False),
    ("message: access denied", {"message": "access granted"}, True),
    ("message: access denied", {"message": "nothing here"}, False),
    ("message: acc*", {"message": "the Access was"}, True),
    ("message: acc*", {"message": "xaccess"}, False),
    ("message: *ccess", {"message": "the Access was"}, True),
    (
        'powershell.file.script_block_text: "Invoke-Mimikatz"',
        {"powershell": {"file": {"script_block_text": "IEX; invoke-mimikatz -x"}}},
        True,
    ),
    (
        'powershell.file.script_block_text: "Invoke-Mimikatz"',
        {"powershell": {"file": {"script_block_text": "Invoke-MimikatzX"}}},
        False,
    ),
    (
        "powershell.file.script_block_text: MiniDumpWriteDump",
        {"powershell": {"file": {"script_block_text": "[x]::MiniDumpWriteDump($h)"}}},
        True,
    ),
    (
        "powershell.file.script_block_text: MiniDumpWriteDump",
        {"powershell": {"file": {"script_block_text": "MiniDumpWriteDumpEx"}}},
        False,
    ),
    ('message: "[CVE-2020-0601]"', {"message": "event [CVE-2020-0601] seen"}, True),
    ('message: "[CVE-2020-0601]"', {"message": "CVE 2020 0602"}, False),
    ('message: "café"', {"message": "Le CAFÉ ouvert"}, True),
    # numbers
    ("destination.port: 443", {"destination": {"port": 443}}, True),
    ("destination.port: 443", {"destination": {"port": "443"}}, True),
    ("destination.port: 443", {"destination": {"port": 8443}}, False),
    ("destination.port > 1024", {"destination": {"port": 8080}}, True),
    ("destination.port > 1024", {"destination": {"port": 1024}}, False),
    ("destination.port >= 1024", {"destination": {"port": 1024}}, True),
    ("destination.port < 1024", {"destination": {"port": 22}}, True),
    ("destination.port <= 22", {"destination": {"port": 23}}, False),
    ("custom.score >= 5.5", {"custom": {"score": 5.6}}, True),
    ("custom.score >= 5.5", {"custom": {"score": "5.4"}}, False),
    # boolean
    (
        "process.code_signature.trusted: false",
        {"process": {"code_signature": {"trusted": False}}},
        True,
    ),
    (
        "process.code_signature.trusted: false",
        {"process": {"code_signature": {"trusted": True}}},
        False,
    ),
    (
        "process.code_signature.trusted: true",
        {"process": {"code_signature": {"trusted": "true"}}},
        True,
    ),
    # ip
    ("source.ip: 10.0.0.0/8", {"source": {"ip": "10.1.2.3"}}, True),
    ("source.ip: 10.0.0.0/8", {"source": {"ip": "11.1.2.3"}}, False),
    ('source.ip: "10.1.2.3"', {"source": {"ip": "10.1.2.3"}}, True),
    ('source.ip: "fe80::/10"', {"source": {"ip": "FE80::1"}}, True),
    ("source.ip: 127.0.0.1", {"source": {"ip": "::ffff:127.0.0.1"}}, False),
    (
        "source.ip: (10.0.0.0/8 or 192.168.0.0/16)",
        {"source": {"ip": ["8.8.8.8", "192.168.1.1"]}},
        True,
    ),
    # exists, not, missing fields
    ("process.name: *", {"process": {"name": ""}}, True),
    ("process.name: *", {"process": {}}, False),
    ("process.name: *", {"process": {"name": None}}, False),
    ("not process.name: cmd.exe", {}, True),
    ("not process.name: cmd.exe", {"process": {"name": "cmd.exe"}}, False),
    ("user.id: (* and not 0)", {"user": {"id": "1000"}}, True),
    ("user.id: (* and not 0)", {"user": {"id": "0"}}, False),
    ("user.id: (* and not 0)", {}, False),
    # boolean structure
    ("a: 1 or b: 2 and c: 3", {"a": "1"}, True),
    ("a: 1 or b: 2 and c: 3", {"b": "2"}, False),
    ("(a: 1 or b: 2) and c: 3", {"b": "2", "c": "3"}, True),
    ("(a: 1 or b: 2) and c: 3", {"b": "2"}, False),
    ("a: (1 or 2) and not b: (x or y)", {"a": "2", "b": "z"}, True),
    ("a: (1 or 2) and not b: (x or y)", {"a": "2", "b": "y"}, False),
    # nested
    ("x: { a: 1 and b: 2 }", {"x": {"a": "1", "b": "2"}}, True),
    ("x: { a: 1 and b: 2 }", {"x": {"a": "1"}}, False),
    # array positions in field names
    ("t.*.name: admin", {"t": [{"name": "user"}, {"name": "admin"}]}, True),
    ("t.*.name: admin", {"t": {"0": {"name": "user"}, "1": {"name": "admin"}}}, True),
    ("t.*.name: admin", {"t": {"0": {"name": "user"}}}, False),
    # free text
    ("cmd.exe", {"process": {"name": "cmd.exe"}}, True),
    ("cmd.exe", {"process": {"name": "xcmd.exe"}}, False),
    ("cmd.exe", {"deep": {"list": [1, {"x": "cmd.exe"}]}}, True),
    ('"access denied"', {"message": "ACCESS denied!"}, True),
    ("*.exe", {"file": {"name": "a.exe"}}, True),
]


def _id(case: tuple[str, dict, bool]) -> str:
    return f"{case[0]} | {json.dumps(case[1])} -> {case[2]}"


@cache
def _table() -> Matcher:
    rules = [
        Rule(id=str(i), name=q, source="elastic", condition=parse_kql(q))
        for i, (q, _, _) in enumerate(CASES)
    ]
    return Matcher(build(rules, FM))


@pytest.mark.parametrize("index", range(len(CASES)), ids=[_id(c) for c in CASES])
def test_matching(index: int) -> None:
    query, record, want = CASES[index]
    node = parse_kql(query)
    assert evaluate(node, FM.view(record)) is want, "reference"
    table = _table()
    assert (index in table.match_subset(record, [index])) is want, "table"
    assert (index in table.match(record)) is want, "table, all rules"


# --------------------------------------------------------------------------- filters


def _filter_match(filters: list, record: dict) -> bool:
    return evaluate(filters_condition(filters), FM.view(record))


def test_filters_wildcard_negated_case_insensitive() -> None:
    f = [
        {
            "meta": {"negate": True},
            "query": {
                "wildcard": {
                    "file.path": {"case_insensitive": True, "value": "?:\\\\ProgramData\\\\*"}
                }
            },
        }
    ]
    assert filters_condition(f) == Not(
        Match("file.path", (Wild.ONE, ":\\ProgramData\\", ANY), cased=False)
    )
    assert not _filter_match(f, {"file": {"path": "c:\\programdata\\x.ps1"}})
    assert _filter_match(f, {"file": {"path": "C:\\Users\\x.ps1"}})
    assert _filter_match(f, {})


def test_filters_dsl_shapes() -> None:
    phrase = {"query": {"match_phrase": {"process.name": "cmd.exe"}}, "meta": {}}
    assert filters_condition([phrase]) == Match("process.name", ("cmd.exe",), cased=True)
    text = {"query": {"match_phrase": {"message": {"query": "access denied"}}}}
    assert isinstance(filters_condition([text]), Regex)
    exists = {"exists": {"field": "user.name"}, "meta": {"negate": True}}
    assert filters_condition([exists]) == Not(Exists("user.name"))
    disabled = {"meta": {"disabled": True}, "query": {"unknown_query": {}}}
    assert filters_condition([disabled]) == Const(True)
    should = {
        "query": {
            "bool": {
                "should": [
                    {"match_phrase": {"a": "1"}},
                    {"match_phrase": {"b": "2"}},
                ],
                "minimum_should_match": 1,
            }
        }
    }
    assert filters_condition([should]) == Or((A, B))
    must = {"query": {"bool": {"filter": [{"term": {"a": "1"}}], "must_not": {"term": {"b": 2}}}}}
    assert filters_condition([must]) == And((A, Not(B)))
    rng = {"query": {"range": {"destination.port": {"gte": 10, "lt": "20"}}}}
    assert filters_condition([rng]) == And(
        (Compare("destination.port", ">=", 10), Compare("destination.port", "<", 20))
    )
    terms = {"query": {"terms": {"a": ["1", "2"]}}}
    assert filters_condition([terms]) == Or((A, Match("a", ("2",), cased=True)))
    assert filters_condition([phrase, exists]) == And(
        (Match("process.name", ("cmd.exe",), cased=True), Not(Exists("user.name")))
    )
    assert filters_condition(None) == Const(True)


@pytest.mark.parametrize(
    "bad",
    [
        {"query": {"geo_distance": {"distance": "1km"}}},
        {"query": {"bool": {"should": [], "minimum_should_match": 2}}},
        {"query": {"range": {"@timestamp": {"gte": "now-1d"}}}},
        {"query": {"match_phrase": {"a": "1", "b": "2"}}},
    ],
)
def test_unsupported_filters(bad: dict) -> None:
    with pytest.raises(UnsupportedRule, match="rule filter"):
        filters_condition([bad])


def test_rule_file_with_filters(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text(
        """[metadata]
creation_date = "2024/01/01"

[rule]
author = ["Elastic"]
description = "d"
index = ["logs-*"]
language = "kuery"
name = "KQL rule"
risk_score = 47
rule_id = "11111111-2222-3333-4444-555555555555"
severity = "medium"
type = "query"
query = '''
process.name: cmd.exe
'''

[[rule.filters]]
[rule.filters.meta]
negate = true
[rule.filters.query.wildcard."process.parent.name"]
value = "explorer*"
""",
        encoding="utf-8",
    )
    (rule,) = load_elastic_file(path)
    assert rule.condition == And(
        (
            Match("process.name", ("cmd.exe",), cased=True),
            Not(Match("process.parent.name", ("explorer", ANY), cased=True)),
        )
    )
    assert rule.line == 14


def test_rule_file_errors_carry_the_query_line(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text(
        '[rule]\nname = "n"\nrule_id = "x"\ntype = "query"\nlanguage = "kuery"\n'
        "query = '''\nprocess.name: a and\n  (b: c\n'''\n",
        encoding="utf-8",
    )
    with pytest.raises(InvalidRule) as info:
        load_elastic_file(path)
    assert info.value.line == 8 and info.value.path == str(path)


# --------------------------------------------------------------------------- corpus rules

_NDR_SCRIPT = (
    "$p = $k::GetProcAddress($h, 'NdrClientCall3'); "
    "$f = [Runtime.InteropServices.Marshal]::GetDelegateForFunctionPointer($p, $t)"
)


def _ecs_cloudtrail(provider: str, action: str, identity: str, key: str | None = None) -> dict:
    record: dict = {
        "data_stream": {"dataset": "aws.cloudtrail"},
        "event": {"provider": provider, "action": action, "outcome": "success"},
        "aws": {"cloudtrail": {"user_identity": {"type": identity}}},
    }
    if key is not None:
        record["aws"]["cloudtrail"]["flattened"] = {"request_parameters": {"key": key}}
    return record


def _ecs_activity(operation: str, outcome: str) -> dict:
    return {
        "data_stream": {"dataset": "azure.activitylogs"},
        "azure": {"activitylogs": {"operation_name": operation}},
        "event": {"action": operation, "outcome": outcome},
    }


def _winlog(channel: str, event_id: object, **data: str) -> dict:
    """A Winlogbeat ``winlog`` object without the ECS fields Beats add."""
    return {
        "winlog": {
            "channel": channel,
            "event_id": event_id,
            "provider_name": "Microsoft-Windows-Security-Auditing",
            "computer_name": "dc01.corp.local",
            "record_id": 81233,
            "event_data": {"SubjectUserName": "admin", "SubjectDomainName": "CORP", **data},
        }
    }


def _flat_4104(script: str) -> dict:
    """A PowerShell script-block event as a flat event-log record (EventID, Channel, data)."""
    return {
        "EventID": 4104,
        "Channel": "Microsoft-Windows-PowerShell/Operational",
        "Provider_Name": "Microsoft-Windows-PowerShell",
        "Computer": "ws01.corp.local",
        "MessageNumber": 1,
        "MessageTotal": 1,
        "ScriptBlockText": script,
        "ScriptBlockId": "0b6f3c1e-7d4e-4a53-9a57-2d2c9c0e8f10",
        "Path": "",
    }


def _cloudtrail(source: str, name: str, identity: str = "IAMUser", **extra: object) -> dict:
    """A CloudTrail record as the CloudTrail API / S3 delivery has it."""
    arn = "arn:aws:iam::111122223333:" + ("root" if identity == "Root" else "user/alice")
    return {
        "eventVersion": "1.09",
        "userIdentity": {
            "type": identity,
            "principalId": "111122223333" if identity == "Root" else "AIDAEXAMPLE",
            "arn": arn,
            "accountId": "111122223333",
            **({} if identity == "Root" else {"userName": "alice"}),
        },
        "eventTime": "2025-05-01T12:00:00Z",
        "eventSource": source,
        "eventName": name,
        "awsRegion": "us-east-1",
        "sourceIPAddress": "203.0.113.7",
        "userAgent": "aws-cli/2.15.0",
        "requestID": "5f8e1b2c-0000-4c1d-9a3e-000000000001",
        "eventID": "a1b2c3d4-0000-4e5f-8a9b-000000000002",
        "readOnly": False,
        "eventType": "AwsConsoleSignIn" if name == "ConsoleLogin" else "AwsApiCall",
        "managementEvent": True,
        "recipientAccountId": "111122223333",
        "eventCategory": "Management",
        **extra,
    }


def _s3(key: str) -> dict:
    return {"bucketName": "corp-backups", "Host": "corp-backups.s3.amazonaws.com", "key": key}


def _okta(event_type: str) -> dict:
    """An Okta System Log event as the /api/v1/logs API returns it."""
    return {
        "uuid": "2f4b7c1a-0000-11ef-9a3e-000000000003",
        "published": "2025-05-01T12:00:00.000Z",
        "eventType": event_type,
        "version": "0",
        "severity": "INFO",
        "legacyEventType": event_type,
        "displayMessage": event_type,
        "actor": {
            "id": "00u1abcd",
            "type": "User",
            "alternateId": "admin@example.com",
            "displayName": "Admin",
        },
        "client": {
            "userAgent": {"rawUserAgent": "Mozilla/5.0", "os": "Mac OS X", "browser": "CHROME"},
            "zone": "null",
            "device": "Computer",
            "ipAddress": "198.51.100.7",
        },
        "outcome": {"result": "SUCCESS"},
        "target": [{"id": "nzo1abcd", "type": "NetworkZone", "displayName": "Corp"}],
        "transaction": {"type": "WEB", "id": "YAbcd"},
        "debugContext": {"debugData": {"requestId": "YAbcd", "requestUri": "/api/v1/zones"}},
        "authenticationContext": {"authenticationStep": 0, "externalSessionId": "102abcd"},
        "securityContext": {},
        "request": {"ipChain": [{"ip": "198.51.100.7"}]},
    }


def _activity(operation: str, result: str) -> dict:
    """An Azure activity-log record as Azure Monitor exports it."""
    return {
        "time": "2025-05-01T12:00:00.0000000Z",
        "resourceId": "/SUBSCRIPTIONS/0000/RESOURCEGROUPS/RG1/PROVIDERS/"
        + operation.rsplit("/", 1)[0],
        "operationName": operation,
        "category": "Administrative",
        "resultType": result,
        "resultSignature": "Succeeded." if result == "Success" else "Started.",
        "durationMs": "512",
        "callerIpAddress": "203.0.113.9",
        "correlationId": "7e3a0c11-0000-4f2e-8d1c-000000000004",
        "identity": {
            "authorization": {
                "scope": "/subscriptions/0000/resourceGroups/rg1",
                "action": operation.lower(),
                "evidence": {"role": "Owner", "principalType": "User"},
            },
            "claims": {"name": "alice@example.com", "ipaddr": "203.0.113.9"},
        },
        "level": "Information",
        "location": "global",
        "properties": {"statusCode": "OK", "eventCategory": "Administrative"},
    }


#: Corpus KQL rules copied into the pinned sample: a record that fires and a near miss, ECS.
FIXTURES: dict[str, tuple[dict, dict]] = {
    "elastic/rules/windows/persistence_ad_adminsdholder.toml": (
        {
            "event": {"code": "5136"},
            "host": {"os": {"type": "windows"}},
            "winlog": {"event_data": {"ObjectDN": "CN=AdminSDHolder,CN=System,DC=corp"}},
        },
        {
            "event": {"code": "5136"},
            "host": {"os": {"type": "windows"}},
            "winlog": {"event_data": {"ObjectDN": "cn=adminsdholder,cn=system,DC=corp"}},
        },
    ),
    "elastic/rules/windows/credential_access_posh_minidump.toml": (
        {
            "event": {"category": "process"},
            "host": {"os": {"type": "windows"}},
            "powershell": {"file": {"script_block_text": "$r = [Dbg]::MINIDUMPWRITEDUMP($h)"}},
        },
        {
            "event": {"category": "process"},
            "host": {"os": {"type": "windows"}},
            "powershell": {"file": {"script_block_text": "Get-MiniDumpWriteDumpHelp"}},
        },
    ),
    "elastic/rules/windows/defense_evasion_cve_2020_0601.toml": (
        {
            "event": {"provider": "Microsoft-Windows-Audit-CVE"},
            "host": {"os": {"type": "windows"}},
            "message": "[CVE-2020-0601] cert validation",
        },
        {
            "event": {"provider": "Microsoft-Windows-Audit-CVE"},
            "host": {"os": {"type": "windows"}},
            "message": "CVE-2020-06010 cert validation",
        },
    ),
    "elastic/rules/windows/defense_evasion_posh_high_entropy.toml": (
        {
            "event": {"category": "process"},
            "host": {"os": {"type": "windows"}},
            "powershell": {
                "file": {
                    "script_block_length": 5000,
                    "script_block_entropy_bits": 5.9,
                    "script_block_surprisal_stdev": 0.9,
                }
            },
            "file": {"path": "C:\\Users\\bob\\x.ps1", "directory": "C:\\Users\\bob"},
        },
        {
            "event": {"category": "process"},
            "host": {"os": {"type": "windows"}},
            "powershell": {
                "file": {
                    "script_block_length": 5000,
                    "script_block_entropy_bits": 5.9,
                    "script_block_surprisal_stdev": 0.9,
                }
            },
            "file": {
                "path": "c:\\programdata\\microsoft\\windows defender advanced threat "
                "protection\\x.ps1",
            },
        },
    ),
    "elastic/rules/linux/privilege_escalation_container_runc_init_effective_root_auditd.toml": (
        {
            "host": {"os": {"type": "linux"}},
            "event": {"category": "process", "action": "executed"},
            "process": {"title": "runc init"},
            "user": {"id": "1000", "effective": {"id": "0"}},
        },
        {
            "host": {"os": {"type": "linux"}},
            "event": {"category": "process", "action": "executed"},
            "process": {"title": "runc init"},
            "user": {"id": "0", "effective": {"id": "0"}},
        },
    ),
    "elastic/rules/linux/persistence_rc_local_error_via_syslog.toml": (
        {
            "host": {"os": {"type": "linux"}},
            "data_stream": {"dataset": "system.syslog"},
            "process": {"name": "rc.local"},
            "message": "/etc/rc.local: line 3: /opt/x: No such file or directory",
        },
        {
            "host": {"os": {"type": "linux"}},
            "data_stream": {"dataset": "system.syslog"},
            "process": {"name": "rc.local"},
            "message": "/etc/rc.local: started",
        },
    ),
    "elastic/rules/network/credential_access_icmp_redirect_message_observed.toml": (
        {
            "data_stream": {"dataset": "network_traffic.icmp"},
            "icmp": {"request": {"type": 5}},
            "source": {"ip": "192.168.1.1"},
        },
        {
            "data_stream": {"dataset": "network_traffic.icmp"},
            "icmp": {"request": {"type": 5}},
            "source": {"ip": "8.8.8.8"},
        },
    ),
    "elastic/rules/integrations/aws/defense_evasion_ec2_flow_log_deletion.toml": (
        {
            "data_stream": {"dataset": "aws.cloudtrail"},
            "event": {
                "provider": "ec2.amazonaws.com",
                "action": "DeleteFlowLogs",
                "outcome": "success",
            },
        },
        {
            "data_stream": {"dataset": "aws.cloudtrail"},
            "event": {
                "provider": "ec2.amazonaws.com",
                "action": "DeleteFlowLogs",
                "outcome": "failure",
            },
        },
    ),
    "elastic/rules/integrations/okta/defense_evasion_attempt_to_delete_okta_network_zone.toml": (
        {"data_stream": {"dataset": "okta.system"}, "event": {"action": "zone.delete"}},
        {"data_stream": {"dataset": "okta.system"}, "event": {"action": "zone.update"}},
    ),
    "elastic/rules/integrations/azure/initial_access_entra_id_kali365_user_agent.toml": (
        {
            "data_stream": {"dataset": "azure.signinlogs"},
            "user_agent": {"original": "kali365-live/1.2"},
        },
        {
            "data_stream": {"dataset": "azure.signinlogs"},
            "user_agent": {"original": "Kali365-Live/1.2"},
        },
    ),
    "elastic/rules/integrations/azure/persistence_entra_id_pim_user_added_global_admin.toml": (
        {
            "data_stream": {"dataset": "azure.auditlogs"},
            "azure": {
                "auditlogs": {
                    "operation_name": "Add member to role in PIM completed (timebound)",
                    "properties": {
                        "category": "RoleManagement",
                        "target_resources": {
                            "0": {"display_name": "alice"},
                            "1": {"display_name": "Global Administrator"},
                        },
                    },
                }
            },
            "event": {"outcome": "Success"},
        },
        {
            "data_stream": {"dataset": "azure.auditlogs"},
            "azure": {
                "auditlogs": {
                    "operation_name": "Add member to role in PIM completed (timebound)",
                    "properties": {
                        "category": "RoleManagement",
                        "target_resources": {"0": {"display_name": "Global Reader"}},
                    },
                }
            },
            "event": {"outcome": "Success"},
        },
    ),
    "elastic/rules/windows/credential_access_seenabledelegationprivilege_assigned_to_user.toml": (
        {
            "event": {"code": "4704"},
            "host": {"os": {"type": "windows"}},
            "winlog": {"event_data": {"PrivilegeList": "SeEnableDelegationPrivilege"}},
        },
        {
            "event": {"code": "4704"},
            "host": {"os": {"type": "windows"}},
            "winlog": {"event_data": {"PrivilegeList": "SeBackupPrivilege"}},
        },
    ),
    "elastic/rules/windows/defense_evasion_amsi_bypass_rpc_ndrclientcall.toml": (
        {
            "event": {"code": "4104"},
            "host": {"os": {"type": "windows"}},
            "powershell": {"file": {"script_block_text": _NDR_SCRIPT}},
        },
        {
            "event": {"code": "4104"},
            "host": {"os": {"type": "windows"}},
            "powershell": {"file": {"script_block_text": "NdrClientCall2 # no resolver"}},
        },
    ),
    "elastic/rules/integrations/aws/initial_access_console_login_root.toml": (
        _ecs_cloudtrail("signin.amazonaws.com", "ConsoleLogin", "Root"),
        _ecs_cloudtrail("signin.amazonaws.com", "ConsoleLogin", "IAMUser"),
    ),
    "elastic/rules/integrations/aws/credential_access_credentials_in_s3_bucket.toml": (
        _ecs_cloudtrail("s3.amazonaws.com", "GetObject", "IAMUser", key="u/.aws/credentials"),
        _ecs_cloudtrail("s3.amazonaws.com", "GetObject", "IAMUser", key="u/.aws/notes.txt"),
    ),
    "elastic/rules/integrations/okta/credential_access_attempted_bypass_of_okta_mfa.toml": (
        {"data_stream": {"dataset": "okta.system"}, "event": {"action": "user.mfa.attempt_bypass"}},
        {"data_stream": {"dataset": "okta.system"}, "event": {"action": "user.mfa.factor.reset"}},
    ),
    "elastic/rules/integrations/azure/defense_evasion_event_hub_deletion.toml": (
        _ecs_activity("MICROSOFT.EVENTHUB/NAMESPACES/EVENTHUBS/DELETE", "Success"),
        _ecs_activity("MICROSOFT.EVENTHUB/NAMESPACES/EVENTHUBS/DELETE", "Failure"),
    ),
    "elastic/rules/integrations/azure/impact_resources_resource_group_deletion.toml": (
        _ecs_activity("MICROSOFT.RESOURCES/SUBSCRIPTIONS/RESOURCEGROUPS/DELETE", "success"),
        _ecs_activity("MICROSOFT.RESOURCES/SUBSCRIPTIONS/RESOURCEGROUPS/WRITE", "success"),
    ),
}

#: The same rules on records in their source's own shape, as the source's API or agent emits
#: them without Elastic's ingest pipelines (raw CloudTrail, Okta System Log and Azure activity
#: log JSON; Windows event-log records flat or in Winlogbeat's ``winlog`` object without the
#: ECS fields Beats add). The field mapping (``data/fields.yaml``) makes the ECS rule read them.
SOURCE_SHAPE: dict[str, tuple[dict, dict]] = {
    # Winlogbeat's winlog object only. A flat ``ObjectDN`` is not read for
    # ``winlog.event_data.ObjectDN`` (un-dotted names are read below winlog.event_data, not the
    # other way round), so the flat shape does not apply to this rule.
    "elastic/rules/windows/persistence_ad_adminsdholder.toml": (
        _winlog("Security", "5136", ObjectDN="CN=AdminSDHolder,CN=System,DC=corp,DC=local"),
        _winlog("Security", "5137", ObjectDN="CN=AdminSDHolder,CN=System,DC=corp,DC=local"),
    ),
    "elastic/rules/windows/credential_access_seenabledelegationprivilege_assigned_to_user.toml": (
        _winlog("Security", 4704, PrivilegeList="SeEnableDelegationPrivilege"),
        _winlog("Security", 4705, PrivilegeList="SeEnableDelegationPrivilege"),  # removed
    ),
    # Flat event-log records (EventID, Channel, event data at top level): event.category comes
    # from the (channel, event id) table, host.os.type from the channel.
    "elastic/rules/windows/credential_access_posh_minidump.toml": (
        _flat_4104("$r = [Dbg]::MiniDumpWriteDump($h, $id, $f, 2)"),
        _flat_4104("Get-MiniDumpWriteDumpHelp"),
    ),
    "elastic/rules/windows/defense_evasion_amsi_bypass_rpc_ndrclientcall.toml": (
        _flat_4104(_NDR_SCRIPT),
        _flat_4104("NdrClientCall2 # no resolver"),
    ),
    # Raw CloudTrail: event.dataset from eventVersion, event.outcome success unless errorCode /
    # errorMessage, requestParameters read for aws.cloudtrail.flattened.request_parameters.
    "elastic/rules/integrations/aws/defense_evasion_ec2_flow_log_deletion.toml": (
        _cloudtrail("ec2.amazonaws.com", "DeleteFlowLogs"),
        _cloudtrail(
            "ec2.amazonaws.com",
            "DeleteFlowLogs",
            errorCode="Client.UnauthorizedOperation",
            errorMessage="You are not authorized to perform this operation.",
        ),
    ),
    "elastic/rules/integrations/aws/initial_access_console_login_root.toml": (
        _cloudtrail("signin.amazonaws.com", "ConsoleLogin", "Root"),
        _cloudtrail(
            "signin.amazonaws.com",
            "ConsoleLogin",
            "Root",
            errorMessage="Failed authentication",
            responseElements={"ConsoleLogin": "Failure"},
        ),
    ),
    "elastic/rules/integrations/aws/credential_access_credentials_in_s3_bucket.toml": (
        _cloudtrail("s3.amazonaws.com", "GetObject", requestParameters=_s3("u/.aws/credentials")),
        _cloudtrail("s3.amazonaws.com", "GetObject", requestParameters=_s3("u/.aws/notes.txt")),
    ),
    # Raw Okta System Log: event.dataset from authenticationContext / debugContext, event.action
    # from eventType.
    "elastic/rules/integrations/okta/defense_evasion_attempt_to_delete_okta_network_zone.toml": (
        _okta("zone.delete"),
        _okta("zone.update"),
    ),
    "elastic/rules/integrations/okta/credential_access_attempted_bypass_of_okta_mfa.toml": (
        _okta("user.mfa.attempt_bypass"),
        _okta("user.mfa.factor.reset"),
    ),
    # Raw Azure activity log (the records of an Event Hub / storage export): event.dataset from
    # identity.claims, event.action from operationName, event.outcome from resultType when it
    # is success or failure. The Entra ID fixtures above (sign-in and audit logs) have no
    # source-shape twin: those records share keys with the activity log and nothing in their
    # shape names their dataset; these activity-log rules stand in for them.
    "elastic/rules/integrations/azure/defense_evasion_event_hub_deletion.toml": (
        _activity("MICROSOFT.EVENTHUB/NAMESPACES/EVENTHUBS/DELETE", "Success"),
        _activity("MICROSOFT.EVENTHUB/NAMESPACES/EVENTHUBS/DELETE", "Start"),  # not an outcome
    ),
    "elastic/rules/integrations/azure/impact_resources_resource_group_deletion.toml": (
        _activity("MICROSOFT.RESOURCES/SUBSCRIPTIONS/RESOURCEGROUPS/DELETE", "Success"),
        _activity("MICROSOFT.RESOURCES/SUBSCRIPTIONS/RESOURCEGROUPS/DELETE", "Failure"),
    ),
}

#: ECS fixtures without a source-shape twin, and why.
ECS_ONLY: dict[str, str] = {
    "elastic/rules/windows/defense_evasion_cve_2020_0601.toml": (
        "event.provider and message are what Winlogbeat renders; a flat record has "
        "Provider_Name and no rendered message the mapping reads"
    ),
    "elastic/rules/windows/defense_evasion_posh_high_entropy.toml": (
        "script_block_length / entropy_bits / surprisal_stdev are computed by Elastic's "
        "PowerShell pipeline, no source field holds them"
    ),
    "elastic/rules/linux/privilege_escalation_container_runc_init_effective_root_auditd.toml": (
        "process.title and user.effective.id are Auditbeat's parse of auditd PROCTITLE / "
        "SYSCALL records; the mapping has no raw auditd shape"
    ),
    "elastic/rules/linux/persistence_rc_local_error_via_syslog.toml": (
        "data_stream.dataset system.syslog and process.name come from the syslog "
        "integration's parse of the line; the mapping has no raw syslog shape"
    ),
    "elastic/rules/network/credential_access_icmp_redirect_message_observed.toml": (
        "network_traffic.* / icmp.* are Packetbeat's own decoding, there is no other shape"
    ),
    "elastic/rules/integrations/azure/initial_access_entra_id_kali365_user_agent.toml": (
        "azure.signinlogs: a raw sign-in record's shape does not name its dataset"
    ),
    "elastic/rules/integrations/azure/persistence_entra_id_pim_user_added_global_admin.toml": (
        "azure.auditlogs: a raw audit record's shape does not name its dataset"
    ),
}


@cache
def _fixture_table() -> tuple[Matcher, dict[str, int]]:
    rules: list[Rule] = []
    index: dict[str, int] = {}
    for rel in FIXTURES:
        (rule,) = load_elastic_file(SAMPLE / rel)
        index[rel] = len(rules)
        rules.append(rule)
    return Matcher(build(rules, FM)), index


def test_fixtures_cover_windows_linux_and_cloud() -> None:
    assert len(FIXTURES) >= 10
    for part in ("/windows/", "/linux/", "/aws/", "/okta/", "/azure/"):
        assert any(part in rel for rel in FIXTURES), part
    # both shapes for at least ten rules, every cloud source and Windows among them
    assert len(SOURCE_SHAPE) >= 10 and set(SOURCE_SHAPE) <= set(FIXTURES)
    for part in ("/windows/", "/aws/", "/okta/", "/azure/"):
        assert any(part in rel for rel in SOURCE_SHAPE), part
    assert set(FIXTURES) == set(SOURCE_SHAPE) | set(ECS_ONLY)
    assert not set(SOURCE_SHAPE) & set(ECS_ONLY)


@pytest.mark.parametrize("rel", sorted(FIXTURES))
def test_corpus_rule_fixture(rel: str) -> None:
    table, index = _fixture_table()
    rule = table.rules[index[rel]]
    fire, quiet = FIXTURES[rel]
    assert evaluate(rule.condition, FM.view(fire)), "reference: fire"
    assert not evaluate(rule.condition, FM.view(quiet)), "reference: quiet"
    assert index[rel] in table.match(fire)
    assert index[rel] not in table.match(quiet)


@pytest.mark.parametrize("rel", sorted(SOURCE_SHAPE))
def test_corpus_rule_fixture_in_source_shape(rel: str) -> None:
    table, index = _fixture_table()
    rule = table.rules[index[rel]]
    fire, quiet = SOURCE_SHAPE[rel]
    assert evaluate(rule.condition, FM.view(fire)), "reference: fire"
    assert not evaluate(rule.condition, FM.view(quiet)), "reference: quiet"
    assert index[rel] in table.match(fire)
    assert index[rel] not in table.match(quiet)


def test_raw_prefilter_path_agrees() -> None:
    """The pre-filtered msgpack path (``match_entries``) agrees with ``match`` and the
    reference on every matching case and every fixture record."""
    from test_differential import _check

    _check(_table(), FM, [record for _, record, _ in CASES])
    table, _ = _fixture_table()
    _check(table, FM, [r for pair in FIXTURES.values() for r in pair])
    _check(table, FM, [r for pair in SOURCE_SHAPE.values() for r in pair])
