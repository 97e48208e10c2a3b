"""Field mapping: path resolution, aliases, derivations, raw keys, logsource conditions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ruletag.errors import ConfigError
from ruletag.rules.fields import (
    FieldMap,
    PyRecordView,
    RecordView,
    as_text,
    basename,
    flatten_record,
    resolve,
)
from ruletag.rules.ir import And, Equals, Exists, Logsource, Match, Node, Not, Or
from ruletag.rules.reference import evaluate
from support.paths import CAPTURES

DATA = Path(__file__).resolve().parent / "data"
SYSMON = "Microsoft-Windows-Sysmon/Operational"


def test_dotted_names_resolve_nested_dotted_and_mixed(fm: FieldMap) -> None:
    shapes = [
        {"process": {"parent": {"name": "x.exe"}}},
        {"process.parent.name": "x.exe"},
        {"process": {"parent.name": "x.exe"}},
        {"process.parent": {"name": "x.exe"}},
    ]
    for rec in shapes:
        assert fm.view(rec).values("process.parent.name") == ["x.exe"], rec
    both = {"process.parent.name": "a", "process": {"parent": {"name": "b"}}}
    assert sorted(fm.view(both).values("process.parent.name")) == ["a", "b"]


def test_lists_are_flattened_and_nulls_dropped(fm: FieldMap) -> None:
    rec = {"event": {"type": ["start", None, ["change"]]}, "x": [{"y": 1}, {"y": [2, None]}]}
    view = fm.view(rec)
    assert view.values("event.type") == ["start", "change"]
    assert view.values("x.y") == [1, 2]
    assert view.values("x.z") == []
    assert fm.view({"a": None}).values("a") == []


def test_sysmon_names_read_ecs_records_and_back(fm: FieldMap) -> None:
    ecs = json.loads((DATA / "fields_sysmon_as_ecs.json").read_text())
    view = fm.view(ecs)
    assert view.values("Image") == ["C:\\Windows\\System32\\wuauclt.exe"]
    assert view.values("DestinationIp") == ["93.184.216.34"]
    assert view.values("CommandLine")[0].endswith("/RunHandlerComServer")
    sysmon = json.loads((DATA / "fields_ecs_as_sysmon.json").read_text())
    view = fm.view(sysmon)
    assert view.values("process.executable") == [sysmon["Image"]]
    assert view.values("process.name") == ["PsExec64.exe"]
    assert view.values("process.parent.name") == ["wuauclt.exe"]
    assert view.values("process.pe.original_file_name") == ["psexec.c"]
    assert view.values("event.category") == ["process"]
    assert view.values("event.type") == ["start"]
    assert view.values("host.os.type") == ["windows"]


def test_winlogbeat_shape(fm: FieldMap) -> None:
    rec = json.loads((DATA / "fields_ecs_as_winlogbeat.json").read_text())
    view = fm.view(rec)
    assert view.values("Image") == [rec["winlog"]["event_data"]["Image"]]
    assert view.values("process.name") == ["PsExec64.exe"]
    assert view.values("EventID") == ["1"]
    assert view.values("Channel") == [SYSMON]
    assert view.values("event.category") == ["process"]
    # an unmapped Sysmon name is read from winlog.event_data too
    assert fm.view({"winlog": {"event_data": {"Hashes": "SHA256=AB"}}}).values("Hashes") == [
        "SHA256=AB"
    ]


def test_direct_values_win_over_derivations(fm: FieldMap) -> None:
    rec = {"process": {"name": "renamed.exe", "executable": "C:\\x\\orig.exe"}}
    assert fm.view(rec).values("process.name") == ["renamed.exe"]
    rec = {"event": {"category": ["network"]}, "EventID": 1, "Channel": SYSMON}
    assert fm.view(rec).values("event.category") == ["network"]
    # host.os.type "Windows" given by the record stays as is (EQL == is case-sensitive)
    assert fm.view({"host": {"os": {"type": "Windows"}}}).values("host.os.type") == ["Windows"]


def test_windows_event_lookup_is_case_insensitive_on_channel(fm: FieldMap) -> None:
    rec = {"EventID": "3", "Channel": SYSMON.upper()}
    assert fm.view(rec).values("event.category") == ["network"]
    assert fm.view({"EventID": 3}).values("event.category") == []
    assert fm.view({"EventID": 99999, "Channel": SYSMON}).values("event.category") == []
    assert fm.view({"EventID": 4688, "Channel": "Security"}).values("event.type") == ["start"]


@pytest.mark.parametrize("view", [PyRecordView, RecordView], ids=["reference", "native"])
def test_windows_event_ids_are_read_as_int_reads_them(fm: FieldMap, view: type) -> None:
    """An event id text is a number where ``int()`` reads it (padded, other scripts' digits);
    a digit ``int()`` refuses (superscript two) is no event id, and the record's other
    fields still resolve (it used to raise ValueError out of the record's evaluation)."""
    sysmon = {"Channel": SYSMON}
    assert view(fm, {**sysmon, "EventID": " 3 "}).values("event.category") == ["network"]
    assert view(fm, {**sysmon, "EventID": "\u0663"}).values("event.category") == ["network"]
    assert view(fm, {**sysmon, "EventID": b"3"}).values("event.category") == ["network"]
    odd = view(fm, {**sysmon, "EventID": "\u00b2", "Image": "C:\\x\\a.exe"})
    assert odd.values("event.category") == []
    assert odd.values("event.type") == []
    assert odd.values("process.name") == ["a.exe"]
    assert view(fm, {**sysmon, "EventID": True}).values("event.category") == []


def test_basename_and_text() -> None:
    assert basename("C:\\a\\b.exe") == "b.exe"
    assert basename("/usr/bin/curl") == "curl"
    assert basename("plain.exe") == "plain.exe"
    assert as_text(True) == "true"
    assert as_text(4688) == "4688"
    assert as_text(1.0) == "1.0"
    assert as_text(b"\xffab") == "\udcffab"
    assert as_text({"a": 1}) is None
    assert as_text(None) is None


def test_strings_for_keywords(fm: FieldMap) -> None:
    rec = {"a": ["x", {"b": 5}], "c": None, "d": {"e": False}, "f": b"bin"}
    assert sorted(fm.view(rec).strings()) == ["5", "bin", "false", "x"]


def test_raw_keys_cover_every_supplier(fm: FieldMap) -> None:
    assert {"name", "executable", "Image"} <= fm.raw_keys("process.name")
    assert {"Image", "executable"} <= fm.raw_keys("Image")
    assert fm.raw_keys("DestinationIp") == fm.raw_keys("destination.ip")
    assert "channel" in fm.raw_keys("event.category")
    assert "Channel" in fm.raw_keys("host.os.type")
    assert fm.raw_keys("custom.thing") == frozenset({"thing"})
    assert fm.raw_keys("Custom") == frozenset({"Custom"})


def test_raw_keys_are_necessary_for_a_value(fm: FieldMap) -> None:
    """For every record of the captures and every field the seeds use: a value implies that
    one of the raw keys appears among the record's keys (at any depth, inside dotted keys)."""
    lines = CAPTURES / "windows-events.jsonl"
    fields = [
        "process.name",
        "process.parent.name",
        "process.executable",
        "event.category",
        "event.type",
        "host.os.type",
        "Image",
        "CommandLine",
        "DestinationIp",
        "winlog.event_id",
        "process.pe.original_file_name",
    ]

    def keys(obj: object, out: set[str]) -> set[str]:
        if isinstance(obj, dict):
            for k, v in obj.items():
                out.add(k)
                keys(v, out)
        elif isinstance(obj, list):
            for v in obj:
                keys(v, out)
        return out

    for line in lines.read_text().splitlines():
        rec = json.loads(line)
        present = keys(rec, set())
        view = fm.view(rec)
        for f in fields:
            if view.values(f):
                assert any(rk in k for rk in fm.raw_keys(f) for k in present), (f, rec)


def test_verbatim(fm: FieldMap) -> None:
    assert fm.verbatim("Image")
    assert fm.verbatim("process.name")  # basename of a verbatim path
    assert fm.verbatim("process.parent.name")
    assert fm.verbatim("some.unknown.field")
    assert not fm.verbatim("event.category")
    assert not fm.verbatim("event.type")
    assert not fm.verbatim("host.os.type")


def test_version_is_a_content_hash(tmp_path: Path) -> None:
    text = (Path(__file__).resolve().parents[1] / "plugin/ruletag/data/fields.yaml").read_bytes()
    a = tmp_path / "a.yaml"
    a.write_bytes(text)
    b = tmp_path / "b.yaml"
    b.write_bytes(text + b"\n# edited\n")
    assert FieldMap.load(a).version == FieldMap.default().version
    assert FieldMap.load(b).version != FieldMap.default().version
    assert len(FieldMap.default().version) == 16


def test_custom_mapping_file(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(
        "fields:\n"
        "  proc.exe: {aliases: [Exe], paths: [data.exe_path]}\n"
        "  proc.base: {derive: [{basename: proc.exe}]}\n"
        "  flag: {derive: [{when_present: Exe, value: 'yes'}]}\n"
    )
    fm = FieldMap.load(path)
    view = fm.view({"data": {"exe_path": "/bin/sh"}})
    assert view.values("Exe") == ["/bin/sh"]
    assert view.values("proc.base") == ["sh"]
    assert view.values("flag") == ["yes"]
    assert fm.raw_keys("proc.base") == {"base", "exe", "Exe", "exe_path"}
    assert fm.logsource_condition(Logsource("windows", "process_creation")) is None


@pytest.mark.parametrize(
    "text",
    [
        "fields: [1, 2]",
        "fields:\n  a: {aliases: [b]}\n  c: {aliases: [b]}\n",
        "fields:\n  a: {derive: [{basename: b}]}\n  b: {derive: [{basename: a}]}\n",
        "fields:\n  a: {derive: [{frobnicate: b}]}\n",
        "fields:\n  a: {colour: red}\n",
        "fields:\n  a: {derive: [{copy: b, only: [1]}]}\n",
        "fields:\n  a: {derive: [{copy: b, only: [x], caseless: maybe}]}\n",
        "fields:\n  a: {derive: [{copy: b, unless: [c]}]}\n",
        "windows_events: [{channel: X, id: one}]",
        "products: {windows: {f: [null]}}",
        "fields: {a: [unclosed",
    ],
)
def test_bad_mapping_files_raise_config_error(text: str) -> None:
    with pytest.raises(ConfigError):
        FieldMap.from_bytes(text.encode())


# --------------------------------------------------------------------------- logsources


def in_logsource(fm: FieldMap, ls: Logsource, record: dict) -> bool:
    cond = fm.logsource_condition(ls)
    assert cond is not None
    return evaluate(cond, fm.view(record))


NET = Logsource("windows", "network_connection")
PROC = Logsource("windows", "process_creation")


def test_sysmon_event_ids_select_categories(fm: FieldMap) -> None:
    eid3 = {"EventID": 3, "Channel": SYSMON}
    eid1 = {"EventID": 1, "Channel": SYSMON}
    assert in_logsource(fm, NET, eid3)
    assert not in_logsource(fm, NET, eid1)
    assert in_logsource(fm, PROC, eid1)
    assert not in_logsource(fm, PROC, eid3)
    assert in_logsource(fm, PROC, {"EventID": "4688", "Channel": "Security"})
    # the event id alone, without a channel, is not enough
    assert not in_logsource(fm, PROC, {"EventID": 1})
    # Winlogbeat shape, string event id
    wlb = {"winlog": {"channel": SYSMON, "event_id": "3"}}
    assert in_logsource(fm, NET, wlb)
    assert not in_logsource(fm, PROC, wlb)
    # registry: EID 13 is registry_set and registry_event, not registry_add
    eid13 = {"EventID": 13, "Channel": SYSMON}
    assert in_logsource(fm, Logsource("windows", "registry_set"), eid13)
    assert in_logsource(fm, Logsource("windows", "registry_event"), eid13)
    assert not in_logsource(fm, Logsource("windows", "registry_add"), eid13)


def test_ecs_categories(fm: FieldMap) -> None:
    proc = {
        "event": {"category": ["process"], "type": ["start"]},
        "host": {"os": {"type": "windows"}},
    }
    net = {
        "event": {"category": ["network"], "type": ["connection", "start"]},
        "host": {"os": {"type": "windows"}},
    }
    assert in_logsource(fm, PROC, proc)
    assert not in_logsource(fm, NET, proc)
    assert in_logsource(fm, NET, net)
    assert not in_logsource(fm, PROC, net)
    linux = {"event": {"category": "process", "type": "start"}, "host": {"os": {"type": "linux"}}}
    assert not in_logsource(fm, PROC, linux)
    assert in_logsource(fm, Logsource("linux", "process_creation"), linux)
    # a record with a channel is judged by its event id, not by a conflicting ECS category
    mixed = {"EventID": 1, "Channel": SYSMON, "event": {"category": "network", "type": "start"}}
    assert not in_logsource(fm, NET, mixed)


def test_services(fm: FieldMap) -> None:
    sec = {"EventID": 4624, "Channel": "Security"}
    assert in_logsource(fm, Logsource("windows", service="security"), sec)
    assert not in_logsource(fm, Logsource("windows", service="system"), sec)
    ps = {"EventID": 4104, "Channel": "Microsoft-Windows-PowerShell/Operational"}
    assert in_logsource(fm, Logsource("windows", "ps_script"), ps)
    assert in_logsource(fm, Logsource("windows", service="powershell"), ps)
    assert not in_logsource(fm, Logsource("windows", "ps_module"), ps)
    mit = {"EventID": 1, "Channel": "Microsoft-Windows-Security-Mitigations/KernelMode"}
    assert in_logsource(fm, Logsource("windows", service="security-mitigations"), mit)
    rdp = Logsource("zeek", service="rdp")
    assert in_logsource(fm, rdp, {"_path": "rdp", "id.orig_h": "1.2.3.4"})
    assert in_logsource(fm, rdp, {"event": {"dataset": "zeek.rdp"}})
    assert not in_logsource(fm, rdp, {"EventID": 3, "Channel": SYSMON})


def test_unknown_logsources_are_unrestricted(fm: FieldMap) -> None:
    assert fm.logsource_condition(Logsource()) is None
    assert fm.logsource_condition(Logsource("gcp", None, "gcp.audit")) is None
    assert fm.logsource_condition(Logsource(None, "webserver")) is None
    # a known product still restricts when its category is unknown
    cond = fm.logsource_condition(Logsource("windows", "no_such_category"))
    assert cond == Match("host.os.type", ("windows",), cased=False)


def _leaf_types(node: Node) -> set[type]:
    if isinstance(node, And | Or):
        return set().union(*(_leaf_types(a) for a in node.args))
    if isinstance(node, Not):
        return _leaf_types(node.arg)
    return {type(node)}


# The most used Windows logsources of the Sigma corpus (counted in the SigmaHQ corpus).
CORPUS_WINDOWS = [
    ("process_creation", None),
    ("registry_set", None),
    ("file_event", None),
    ("ps_script", None),
    (None, "security"),
    ("image_load", None),
    (None, "system"),
    ("network_connection", None),
    ("registry_event", None),
    ("ps_module", None),
    (None, "application"),
    ("dns_query", None),
    ("process_access", None),
    ("pipe_created", None),
    (None, "windefend"),
    ("create_remote_thread", None),
    ("file_delete", None),
    ("ps_classic_start", None),
    (None, "appxdeployment-server"),
    (None, "codeintegrity-operational"),
    ("driver_load", None),
    ("registry_delete", None),
    (None, "firewall-as"),
    ("create_stream_hash", None),
    (None, "msexchange-management"),
    (None, "bits-client"),
    (None, "dns-client"),
    (None, "taskscheduler"),
    (None, "sysmon"),
]


@pytest.mark.parametrize(("category", "service"), CORPUS_WINDOWS)
def test_corpus_windows_logsources_are_mapped(
    fm: FieldMap, category: str | None, service: str | None
) -> None:
    cond = fm.logsource_condition(Logsource("windows", category, service))
    assert cond is not None
    assert cond != Match("host.os.type", ("windows",), cased=False)  # more than the product
    assert _leaf_types(cond) <= {Match, Equals, Exists}


_keys = st.sampled_from(["a", "b", "a.b", "b.c", "a.b.c", "c", ""])
_scalars = st.one_of(st.none(), st.integers(-3, 3), st.text("xy", max_size=2), st.booleans())
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_keys, inner, max_size=3)),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(_keys, _values, max_size=4))
def test_flatten_record_finds_what_resolve_finds(record: dict) -> None:
    """The one-walk flattening agrees with path-by-path resolution (as multisets)."""
    flat = flatten_record(record)
    for path in ["a", "b", "c", "a.b", "b.c", "a.b.c", "a.b.c.a", ""]:
        want: list[object] = []
        resolve(record, path.split("."), want)
        got = flat.get(path, [])
        assert sorted(map(repr, got)) == sorted(map(repr, want)), path


# --------------------------------------------------------------------------- sources' own shapes

SOURCES = DATA / "fields"  # upstream rule copies (licenses beside them)
_EQL_RULES = {
    "okta-session-start-test": """
any where data_stream.dataset == "okta.system" and event.action == "user.session.start"
  and okta.outcome.result == "SUCCESS" and cidrMatch(source.ip, "203.0.113.0/24")
  and okta.actor.alternate_id : "*@example.com" and user_agent.original : "*firefox*"
""",
    "azure-keyvault-secret-write-test": """
any where event.dataset == "azure.activitylogs"
  and event.action == "MICROSOFT.KEYVAULT/VAULTS/SECRETS/WRITE"
  and azure.activitylogs.category == "Administrative"
  and azure.activitylogs.identity.authorization.evidence.principal_type == "User"
  and cidrMatch(source.ip, "203.0.113.0/24")
""",
}


def _source_rules(tmp_path: Path) -> list:
    from ruletag.rules.loader import load_rules

    for rule_id, query in _EQL_RULES.items():
        (tmp_path / f"{rule_id}.toml").write_text(
            f'[metadata]\ncreation_date = "2026/08/01"\n\n[rule]\nrule_id = "{rule_id}"\n'
            f'name = "{rule_id}"\ntype = "eql"\nlanguage = "eql"\nquery = """{query}"""\n'
        )
    result = load_rules([SOURCES, tmp_path])
    assert not result.problems, result.problems
    return result.rules


def test_cloud_and_defender_rules_fire_in_every_shape(fm: FieldMap, tmp_path: Path) -> None:
    import msgpack

    from ruletag.rules.compiler import build
    from ruletag.rules.matcher import Matcher
    from ruletag.rules.reference import reference_match

    rules = _source_rules(tmp_path)
    table = Matcher(build(rules, fm))
    key = {r.id: r.id if r.id in _EQL_RULES else Path(r.path).name for r in rules}
    cases = json.loads((DATA / "fields_sources.json").read_text())
    cases.pop("_about")
    assert set(cases) == set(key.values())
    records, want = [], []
    for name, items in cases.items():
        for case in items:
            records.append(case["record"])
            want.append((name, case["shape"], case["fire"]))
    buf = bytearray()
    spans = []
    for n, rec in enumerate(records):
        start = len(buf)
        buf += msgpack.packb([1700000000 + n, rec])
        spans.append((start, len(buf)))
    raw = table.match_entries(bytes(buf), spans)
    for n, (record, (name, shape, fire)) in enumerate(zip(records, want, strict=True)):
        got = {key[table.table.rules[i].id] for i in table.match(record)}
        ref = {key[rule_id] for rule_id in reference_match(rules, record, fm)}
        pre = {key[table.table.rules[i].id] for i in raw.get(n, [])}
        assert got == ref == pre, (name, shape)
        assert (name in got) is fire, (name, shape, sorted(got))


def test_windows_names_with_spaces_join_the_sigma_spelling(fm: FieldMap) -> None:
    assert fm.paths("ThreatName") == (
        "ThreatName",
        "Threat Name",
        "winlog.event_data.ThreatName",
        "winlog.event_data.Threat Name",
    )
    assert set(fm.paths("Threat Name")) == set(fm.paths("ThreatName"))
    assert {"Feature Name", "Feature_Name", "FeatureName"} <= set(fm.paths("Feature_Name"))
    assert "winlog.event_data.Process Name" in fm.paths("ProcessName")
    assert "winlog.user_data.Address" in fm.paths("Address")  # TerminalServices UserData
    # a name of no channel's table is unchanged
    assert fm.paths("CommandLine") == (
        "CommandLine",
        "process.command_line",
        "winlog.event_data.CommandLine",
    )
    wlb = {"winlog": {"user_data": {"Address": "10.0.0.1"}}}
    assert fm.view(wlb).values("Address") == ["10.0.0.1"]
    with pytest.raises(ConfigError, match="two field groups"):
        FieldMap(
            {
                "fields": {"a": {"aliases": ["b"]}, "c": {"aliases": ["d"]}},
                "windows_channels": {"X": {"names": {"a": "d"}}},
            }
        )


def test_cloud_mapping_both_directions(fm: FieldMap) -> None:
    raw = {
        "eventVersion": "1.08",
        "eventSource": "s3.amazonaws.com",
        "eventName": "PutBucketPolicy",
        "requestParameters": {"bucketName": "b1"},
        "userIdentity": {"type": "Root"},
    }
    v = fm.view(raw)
    assert v.values("event.action") == ["PutBucketPolicy"]
    assert v.values("event.provider") == ["s3.amazonaws.com"]
    assert v.values("data_stream.dataset") == ["aws.cloudtrail"]
    assert v.values("event.outcome") == ["success"]
    assert v.values("aws.cloudtrail.user_identity.type") == ["Root"]
    assert v.values("aws.cloudtrail.flattened.request_parameters.bucketName") == ["b1"]
    assert fm.view({**raw, "errorCode": "AccessDenied"}).values("event.outcome") == ["failure"]
    ecs = {
        "event": {"action": "PutBucketPolicy", "provider": "s3.amazonaws.com"},
        "aws": {"cloudtrail": {"flattened": {"request_parameters": {"bucketName": "b1"}}}},
    }
    v = fm.view(ecs)
    assert v.values("eventName") == ["PutBucketPolicy"]
    assert v.values("eventSource") == ["s3.amazonaws.com"]
    assert v.values("requestParameters.bucketName") == ["b1"]
    assert v.values("event.outcome") == []  # not CloudTrail-shaped: nothing derived
    okta = {
        "eventType": "user.session.start",
        "authenticationContext": {"issuer": None},
        "client": {"ipAddress": "203.0.113.5"},
    }
    v = fm.view(okta)
    assert v.values("event.action") == ["user.session.start"]
    assert v.values("event.dataset") == ["okta.system"]
    assert v.values("source.ip") == ["203.0.113.5"] == v.values("okta.client.ip")
    # CloudTrail's own eventType is not an action
    ct = {"eventVersion": "1.08", "eventName": "GetObject", "eventType": "AwsApiCall"}
    assert fm.view(ct).values("event.action") == ["GetObject"]
    assert fm.view(ct).values("aws.cloudtrail.event_type") == ["AwsApiCall"]
    az = {"operationName": "MICROSOFT.COMPUTE/VIRTUALMACHINES/WRITE", "identity": {"claims": {}}}
    assert fm.view(az).values("event.action") == [az["operationName"]]
    assert fm.view(az).values("event.dataset") == ["azure.activitylogs"]
    ecs_az = {"azure": {"activitylogs": {"operation_name": "X/WRITE"}}}
    assert fm.view(ecs_az).values("operationName") == ["X/WRITE"]


def test_azure_activity_outcome_is_copied_only_for_an_outcome(fm: FieldMap) -> None:
    """The activity-log pipeline copies resultType to event.outcome when it is success or
    failure in any case, else properties.result when it is exactly success/failure/unknown."""
    az = {"operationName": "X/DELETE", "identity": {"claims": {}}}

    def outcome(**extra: object) -> list[object]:
        return fm.view({**az, **extra}).values("event.outcome")

    assert outcome(resultType="Success") == ["Success"]
    assert outcome(resultType="FAILURE") == ["FAILURE"]
    assert outcome(resultType="Start") == []
    assert outcome(resultType="Start", properties={"result": "failure"}) == ["failure"]
    assert outcome(properties={"result": "Failure"}) == []
    assert outcome(resultType="Accept", event={"outcome": "unknown"}) == ["unknown"]
