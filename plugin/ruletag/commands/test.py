"""``ruletag test PIPELINE.yaml...``: run the ``tests:`` block of pipeline configs.

In the spirit of ``vector test``: each test feeds records through the pipeline's real rule
filter (the rules and enrich settings of the config, built by the same code as ``serve``),
in-process and without sockets, and checks every output record. ::

    tests:
      - name: WSUS abuse, ECS shape
        inputs:                          # or `input:` with one item
          - tag: windows.events          # default tag: "test"
            record: {process: {...}}     # one record (a YAML map)
          - tag: windows.events
            records_file: events/x.jsonl # JSON lines, relative to the config file
            time: 1714564800             # optional, seconds (sent as EventTime)
        expect:                          # applies to every output record ...
          rule_ids: [8e2485b6-...]       # exactly these rules matched (any order)
          tag: alert.windows.events      # the record's output tag
          fields: {detections.0.severity: medium}   # dotted path (list index) -> value
      - name: an EQL sequence (stateful rules start empty in each test)
        inputs: [{record: {...}}, {record: {...}}]  # in order, event time from the records
        outputs: [{no_detection: true}, {fields: {detections.0.sequence.keys.0: p1}}]
      - name: near miss
        input: {tag: windows.events, record: {...}}
        outputs:                         # ... or one expectation per record, in order
          - no_detection: true           # no rule matched: the record left byte for byte

Output: one ``PASS name`` / ``FAIL name: reason`` line per test and a summary per config.
Exit status: 0 all passed, 1 a test failed, 2 a config (or its tests block) is invalid.
"""

from __future__ import annotations

import argparse
import struct
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import ujson

from ruletag.config.load import load_config
from ruletag.config.model import Config
from ruletag.delivery.pipeline import Transform
from ruletag.enrich.filter import RuleFilter
from ruletag.errors import ConfigError
from ruletag.protocol import Chunk, iter_entries
from ruletag.rules.loader import LoadResult

DEFAULT_TAG = "test"
DEFAULT_TIME = 1714564800
_EXPECT_KEYS = frozenset({"rule_ids", "no_detection", "fields", "tag"})
_TEST_KEYS = frozenset({"name", "input", "inputs", "expect", "outputs"})
_INPUT_KEYS = frozenset({"tag", "record", "records_file", "time"})


# ------------------------------------------------------------------------------ the tests block


@dataclass(frozen=True, slots=True)
class TestRecord:
    """One input record and where it was written (for messages)."""

    tag: str
    record: dict[str, Any]
    time: int
    where: str


@dataclass(frozen=True, slots=True)
class Expectation:
    """What one output record must look like; unset parts are not checked."""

    rule_ids: frozenset[str] | None = None
    no_detection: bool = False
    fields: Mapping[str, Any] = field(default_factory=dict)
    tag: str | None = None


@dataclass(frozen=True, slots=True)
class PipelineTest:
    """A named test: its input records and one expectation for all, or one per record."""

    name: str
    records: tuple[TestRecord, ...]
    expectations: tuple[Expectation, ...]
    per_record: bool


def _err(path: str, message: str) -> ConfigError:
    return ConfigError(f"{path}: {message}")


def _mapping(value: object, path: str) -> dict[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise _err(path, "must be a mapping with string keys")
    return dict(value)


def _no_unknown(data: Mapping[str, Any], allowed: frozenset[str], path: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise _err(f"{path}.{unknown[0]}", "unknown key")


def _read_records_file(path: Path, where: str) -> list[tuple[dict[str, Any], str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise _err(where, f"cannot read {path}: {exc.strerror or exc}") from exc
    out: list[tuple[dict[str, Any], str]] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = ujson.loads(line)
        except ValueError as exc:
            raise _err(f"{path}:{n}", f"invalid JSON: {exc}") from exc
        if not isinstance(obj, dict):
            raise _err(f"{path}:{n}", "each line must be a JSON object")
        out.append((obj, f"{path.name}:{n}"))
    if not out:
        raise _err(where, f"{path} holds no records")
    return out


def _inputs(data: object, path: str, base: Path) -> list[TestRecord]:
    item = _mapping(data, path)
    _no_unknown(item, _INPUT_KEYS, path)
    tag = item.get("tag", DEFAULT_TAG)
    if not isinstance(tag, str) or not tag:
        raise _err(f"{path}.tag", "must be a non-empty string")
    t = item.get("time", DEFAULT_TIME)
    if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < 2**32:
        raise _err(f"{path}.time", "must be an int of seconds")
    has_record, has_file = "record" in item, "records_file" in item
    if has_record == has_file:
        raise _err(path, "needs exactly one of record or records_file")
    if has_record:
        return [TestRecord(tag, _mapping(item["record"], f"{path}.record"), t, path)]
    name = item["records_file"]
    if not isinstance(name, str) or not name:
        raise _err(f"{path}.records_file", "must be a file name")
    file = Path(name) if Path(name).is_absolute() else base / name
    return [
        TestRecord(tag, rec, t, where)
        for rec, where in _read_records_file(file, f"{path}.records_file")
    ]


def _expectation(data: object, path: str) -> Expectation:
    item = _mapping(data, path)
    _no_unknown(item, _EXPECT_KEYS, path)
    if not item:
        raise _err(path, f"needs at least one of {', '.join(sorted(_EXPECT_KEYS))}")
    rule_ids = item.get("rule_ids")
    if rule_ids is not None:
        if not isinstance(rule_ids, list) or not all(isinstance(r, str) for r in rule_ids):
            raise _err(f"{path}.rule_ids", "must be a list of rule id strings")
        rule_ids = frozenset(rule_ids)
    no_det = item.get("no_detection", False)
    if not isinstance(no_det, bool):
        raise _err(f"{path}.no_detection", "must be true or false")
    if no_det and rule_ids:
        raise _err(path, "no_detection: true contradicts a non-empty rule_ids")
    fields = _mapping(item.get("fields") or {}, f"{path}.fields")
    tag = item.get("tag")
    if tag is not None and (not isinstance(tag, str) or not tag):
        raise _err(f"{path}.tag", "must be a non-empty string")
    return Expectation(rule_ids, no_det, fields, tag)


def parse_tests(raw: object, base_dir: str | Path) -> list[PipelineTest]:
    """Validate a config's ``tests:`` block; ``records_file`` paths are relative to base_dir."""
    base = Path(base_dir)
    if not isinstance(raw, list) or not raw:
        raise _err("tests", "must be a non-empty list of tests")
    tests: list[PipelineTest] = []
    names: set[str] = set()
    for i, data in enumerate(raw):
        path = f"tests[{i}]"
        item = _mapping(data, path)
        _no_unknown(item, _TEST_KEYS, path)
        name = item.get("name")
        if not isinstance(name, str) or not name.strip():
            raise _err(f"{path}.name", "is required (a non-empty string)")
        if name in names:
            raise _err(f"{path}.name", f"duplicate test name {name!r}")
        names.add(name)
        if ("input" in item) == ("inputs" in item):
            raise _err(path, "needs exactly one of input or inputs")
        if "input" in item:
            records = _inputs(item["input"], f"{path}.input", base)
        else:
            raw_inputs = item["inputs"]
            if not isinstance(raw_inputs, list) or not raw_inputs:
                raise _err(f"{path}.inputs", "must be a non-empty list")
            records = [
                r for k, x in enumerate(raw_inputs) for r in _inputs(x, f"{path}.inputs[{k}]", base)
            ]
        if ("expect" in item) == ("outputs" in item):
            raise _err(path, "needs exactly one of expect or outputs")
        expectations: tuple[Expectation, ...]
        if "expect" in item:
            expectations = (_expectation(item["expect"], f"{path}.expect"),)
            per_record = False
        else:
            outs = item["outputs"]
            if not isinstance(outs, list):
                raise _err(f"{path}.outputs", "must be a list (one item per input record)")
            if len(outs) != len(records):
                raise _err(
                    f"{path}.outputs", f"has {len(outs)} items for {len(records)} input records"
                )
            expectations = tuple(
                _expectation(x, f"{path}.outputs[{k}]") for k, x in enumerate(outs)
            )
            per_record = True
        tests.append(PipelineTest(name, tuple(records), expectations, per_record))
    return tests


# ------------------------------------------------------------------------------------- running


@dataclass(frozen=True, slots=True)
class Output:
    """One record as it left the filter."""

    tag: str
    raw: bytes  # the packed entry
    record: Any


def _event_time(seconds: int) -> msgpack.ExtType:
    return msgpack.ExtType(0, struct.pack(">II", seconds, 0))


def _pack_entry(rec: TestRecord) -> bytes:
    return msgpack.packb([_event_time(rec.time), rec.record], use_bin_type=True)


def run_records(transform: Transform | None, records: Sequence[TestRecord]) -> list[Output]:
    """Send the records through ``transform`` (runs of one tag become one chunk)."""
    packed = [_pack_entry(r) for r in records]
    outputs: list[Output] = []
    i = 0
    while i < len(records):
        j = i
        while j < len(records) and records[j].tag == records[i].tag:
            j += 1
        chunk = Chunk(tag=records[i].tag, entries=b"".join(packed[i:j]), count=j - i)
        produced = [chunk] if transform is None else transform(chunk)
        for out in produced:
            for start, end in iter_entries(out.entries):
                raw = out.entries[start:end]
                entry = msgpack.unpackb(
                    raw, raw=False, unicode_errors="surrogateescape", strict_map_key=False
                )
                outputs.append(Output(out.tag, raw, entry[1]))
        i = j
    return outputs


def lookup(record: Any, dotted: str) -> tuple[bool, Any]:
    """``(found, value)`` of a dotted path: nested maps, literal dotted keys, list indexes."""
    parts = dotted.split(".")

    def walk(obj: Any, k: int) -> tuple[bool, Any]:
        if k == len(parts):
            return True, obj
        if isinstance(obj, dict):
            for n in range(len(parts), k, -1):  # longest literal (dotted) key first
                key = ".".join(parts[k:n])
                if key in obj:
                    found, value = walk(obj[key], n)
                    if found:
                        return found, value
            return False, None
        if isinstance(obj, list) and parts[k].lstrip("-").isdigit():
            idx = int(parts[k])
            if -len(obj) <= idx < len(obj):
                return walk(obj[idx], k + 1)
        return False, None

    return walk(record, 0)


@dataclass(frozen=True, slots=True)
class Annotation:
    """Where the filter writes its detections (``style`` ruletag: a list under ``key``)."""

    style: str = "ruletag"
    key: str = "detections"

    def rule_ids(self, out: Output, unchanged: bool) -> set[str]:
        """Ids of the rules that matched, read back from the output record."""
        if unchanged or not isinstance(out.record, dict):
            return set()
        if self.style == "ecs":
            found, ids = lookup(out.record, "rule.id")
            return {str(x) for x in ids} if found and isinstance(ids, list) else set()
        items = out.record.get(self.key)
        if not isinstance(items, list):
            return set()
        return {str(d.get("rule_id")) for d in items if isinstance(d, dict)}


def check(exp: Expectation, rec: TestRecord, out: Output, ann: Annotation) -> list[str]:
    """Reasons ``out`` does not meet ``exp`` (empty when it does)."""
    unchanged = out.raw == _pack_entry(rec)
    got = ann.rule_ids(out, unchanged)
    why: list[str] = []
    if exp.no_detection:
        if got:
            why.append(f"expected no detection, got rule_ids {sorted(got)}")
        elif not unchanged:
            why.append("expected the record unchanged, but its bytes changed")
    if exp.rule_ids is not None and got != exp.rule_ids:
        why.append(f"rule_ids {sorted(got)} != expected {sorted(exp.rule_ids)}")
    if exp.tag is not None and out.tag != exp.tag:
        why.append(f"tag {out.tag!r} != expected {exp.tag!r}")
    for path, want in exp.fields.items():
        found, value = lookup(out.record, path)
        if not found:
            why.append(f"field {path} missing (expected {want!r})")
        elif value != want:
            why.append(f"field {path} = {value!r} != expected {want!r}")
    return why


def run_test(test: PipelineTest, transform: Transform | None, ann: Annotation) -> list[str]:
    """Failures of one test (``record N (where): reason``); empty when it passes."""
    outputs = run_records(transform, test.records)
    if len(outputs) != len(test.records):
        return [f"{len(test.records)} records in, {len(outputs)} out"]
    failures: list[str] = []
    for n, (rec, out) in enumerate(zip(test.records, outputs, strict=True)):
        exp = test.expectations[n] if test.per_record else test.expectations[0]
        failures.extend(f"record {n + 1} ({rec.where}): {why}" for why in check(exp, rec, out, ann))
    return failures


# ------------------------------------------------------------------------------------ the filter


def load_rule_filter(config: Config) -> tuple[RuleFilter | None, LoadResult | None]:
    """The config's rule filter and load report, built by ``serve``'s own code (first load).

    ``(None, None)`` when the config has no ``rules``. Raises ``ConfigError`` when the rules
    cannot be used at all (a rule path is missing, or not one rule could be loaded).
    """
    from ruletag.rules.loader import rule_files
    from ruletag.runtime.relay import filter_factory, rule_loader
    from ruletag.runtime.reload import refusal

    if config.rules is None:
        return None, None
    _, missing = rule_files(config.rules.paths)
    if missing:
        raise ConfigError(f"rules: rule path missing: {', '.join(str(p.path) for p in missing)}")
    try:
        table, result = rule_loader(config)()
    except Exception as exc:  # a compiler failure is reported like a bad config, not a trace
        raise ConfigError(f"rules: cannot compile: {type(exc).__name__}: {exc}") from exc
    why = refusal(result)
    if why is not None:
        raise ConfigError(f"rules: {why}")
    return filter_factory(config)(table), result


def build_filter(config: Config) -> tuple[Transform | None, Annotation, list[str]]:
    """The config's rule filter (same code as ``serve``), how it annotates, and notes to print.

    Raises ``ConfigError`` when the rules cannot be used at all.
    """
    from ruletag.runtime.reload import problem_summary

    rule_filter, result = load_rule_filter(config)
    if rule_filter is None or result is None:
        return None, Annotation(), ["no rules: section, records pass through unchanged"]
    notes = [f"{len(rule_filter.table.rules)} rules loaded, version {rule_filter.table.version}"]
    if result.problems or result.duplicates:
        notes.append(problem_summary(result))
    return rule_filter, Annotation(rule_filter.style, rule_filter.key), notes


def _fresh_state(transform: Transform | None, config: Config) -> Transform | None:
    """``transform`` with empty stateful rules (sequences, thresholds...): each test starts
    from nothing, whatever the tests before it left in their partial matches and counts."""
    from ruletag.runtime.relay import filter_factory

    if isinstance(transform, RuleFilter) and transform.stateful is not None:
        return filter_factory(config)(transform.table)
    return transform


# ---------------------------------------------------------------------------------------- main


def _run_config(path: str, out: Callable[[str], None]) -> int:
    """Run one config's tests; 0 passed, 1 failed, 2 invalid."""
    try:
        config = load_config(path)
        if config.tests is None:
            out(f"{path}: no tests: block")
            return 0
        tests = parse_tests(config.tests.raw, Path(path).resolve().parent)
        transform, ann, notes = build_filter(config)
    except ConfigError as exc:
        where = "" if str(exc).startswith(path) else f"{path}: "
        out(f"INVALID {where}{exc}")
        return 2
    for note in notes:
        out(f"note: {note}")
    failed = 0
    for test in tests:
        try:
            failures = run_test(test, _fresh_state(transform, config), ann)
        except Exception as exc:  # a crash in the filter is a failed test, not a traceback
            failures = [f"error: {type(exc).__name__}: {exc}"]
        if failures:
            failed += 1
            out(f"FAIL {test.name}: {failures[0]}")
            for more in failures[1:]:
                out(f"     {more}")
        else:
            out(f"PASS {test.name}")
    passed = len(tests) - failed
    out(f"{path}: {passed} passed, {failed} failed")
    return 1 if failed else 0


def main_test(ns: argparse.Namespace) -> int:
    """Entry point of ``ruletag test``; returns the exit status."""
    worst = 0
    for path in ns.configs:
        worst = max(worst, _run_config(path, print))
        sys.stdout.flush()
    return worst
