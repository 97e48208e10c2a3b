"""Elastic detection-rules TOML files to ruletag IR.

One file holds one rule: ``[metadata]`` and ``[rule]`` tables. EQL rules are translated by
``eql.py`` (an EQL ``sequence`` becomes a ``kind="sequence"`` rule whose steps get the rule's
filters, ``event_category_override``, ``timestamp_field``, ``tiebreaker_field`` and look-back
``from``), ES|QL rules by ``esql.py``, KQL (``kuery``) rules and their ``[[rule.filters]]``
by ``kql.py``. A ``threshold`` rule (KQL only) becomes a ``kind="threshold"`` rule: its query
and filters are the base condition, ``[rule.threshold]`` gives the group fields, the count and
the optional distinct count, and its window is the rule's look-back ``from`` (Kibana counts
each run over ``[now - from, now]``; see docs/rules.md "Thresholds"). A ``new_terms`` rule
(KQL only, as Kibana allows KQL and Lucene) becomes a ``kind="new_terms"`` rule: its query and
filters are the condition, ``[rule.new_terms]`` gives the term fields and the history window
(``history_window_start``, ``now-7d``), ``timestamp_override`` the event time (with Kibana's
``@timestamp`` fallback unless ``timestamp_override_fallback_disabled``). Other query
languages, other rule types and deprecated rules raise UnsupportedRule with a short reason
that groups well in load reports.
An EQL ``sample`` becomes a ``kind="sample"`` rule (its filters get the rule's filters, time
field and look-back).
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

from ruletag.errors import InvalidRule, RuleError, UnsupportedRule
from ruletag.rules.algebra import and_
from ruletag.rules.eql import CATEGORY_FIELD, parse_eql_query
from ruletag.rules.esql import parse_esql
from ruletag.rules.esql_stats import parse_esql_aggregation
from ruletag.rules.ir import (
    DEFAULT_RISK_SCORE,
    Aggregation,
    Attack,
    Const,
    NewTerms,
    Node,
    Rule,
    Sample,
    Sequence,
    Step,
    Threshold,
)
from ruletag.rules.kql import filters_condition, parse_kql

#: Rule types whose ``language`` decides whether we can evaluate them.
_QUERY_TYPES = {"eql", "query", "esql", "threshold", "new_terms"}
#: Rule types that need state across events (or an ML job), by the reason they are refused.
_STATEFUL_TYPES = {
    "threat_match": "elastic rule type threat_match: indicator-match rules not supported yet",
    "machine_learning": "elastic rule type machine_learning: needs an Elastic ML job",
}
_SEVERITIES = {"informational", "low", "medium", "high", "critical"}
_QUERY_LINE = re.compile(r"^\s*query\s*=\s*(.*)$")
_DATE = re.compile(r"^(\d{4})[/-](\d{2})[/-](\d{2})$")
_LOOKBACK = re.compile(r"^now-(\d+)([smhd])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
#: Kibana's default rule look-back (``from``).
DEFAULT_LOOKBACK = 360.0


def load_elastic_file(path: Path) -> list[Rule]:
    """Load one Elastic rule file; raises InvalidRule / UnsupportedRule with file and line."""
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRule(f"not UTF-8 text: {exc}", where) from None
    except OSError as exc:
        raise InvalidRule(f"cannot read rule file: {type(exc).__name__}", where, 1) from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        raise InvalidRule(f"invalid TOML: {exc}", where, int(m.group(1)) if m else None) from None

    rule = doc.get("rule")
    meta = doc.get("metadata") or {}
    if not isinstance(rule, dict) or not isinstance(meta, dict):
        raise InvalidRule("missing [rule] table", where)
    query_line, query_start = _query_position(text)

    if meta.get("maturity") == "deprecated" or "_deprecated" in path.parts:
        raise UnsupportedRule("deprecated rule", where, query_line)
    rtype = rule.get("type")
    if rtype in _STATEFUL_TYPES:
        raise UnsupportedRule(_STATEFUL_TYPES[str(rtype)], where, query_line)
    if rtype not in _QUERY_TYPES:
        raise UnsupportedRule(f"elastic rule type {rtype} is not supported", where, query_line)
    language = rule.get("language")
    if language not in ("eql", "esql", "kuery"):
        raise UnsupportedRule(f"query language {language} is not supported", where, query_line)
    if rtype in ("threshold", "new_terms") and language != "kuery":
        raise UnsupportedRule(
            f"elastic rule type {rtype}: query language {language} is not supported",
            where,
            query_line,
        )

    query = rule.get("query")
    rule_id = rule.get("rule_id")
    name = rule.get("name")
    for key, value in (("query", query), ("rule_id", rule_id), ("name", name)):
        if not isinstance(value, str) or not value.strip():
            raise InvalidRule(f"rule.{key} is missing or not a string", where, query_line)
    assert isinstance(query, str) and isinstance(rule_id, str) and isinstance(name, str)

    sequence: Sequence | None = None
    sample: Sample | None = None
    aggregation: Aggregation | None = None
    condition: Node
    try:
        # The index patterns (``index``, ES|QL's FROM) are not used yet.
        if language == "eql":
            category = rule.get("event_category_override") or CATEGORY_FIELD
            parsed = parse_eql_query(query, str(category))
            if isinstance(parsed, Sequence):
                sequence, condition = parsed, Const(True)
            elif isinstance(parsed, Sample):
                sample, condition = parsed, Const(True)
            else:
                condition = parsed
        elif language == "esql":
            aggregation = parse_esql_aggregation(query)
            condition = Const(False) if aggregation is not None else parse_esql(query).condition
        else:
            condition = parse_kql(query)
    except RuleError as exc:
        line = query_start + (exc.line or 1) - 1
        raise type(exc)(exc.reason, where, line) from None
    if language != "esql":  # Kibana applies a rule's filters to KQL and EQL queries
        try:
            condition = and_(condition, filters_condition(rule.get("filters"), query_line))
        except RuleError as exc:
            raise type(exc)(exc.reason, where, exc.line) from None
    if sequence is not None:
        sequence = _sequence_of_rule(sequence, condition, rule)
        condition = Const(False)  # the single-event table never fires a sequence rule
    if sample is not None:
        sample = _sample_of_rule(sample, condition, rule)
        condition = Const(False)  # the sample engine joins it, the table never fires it
    threshold: Threshold | None = None
    if rtype == "threshold":
        threshold = _threshold_of_rule(condition, rule, where, query_line)
        condition = Const(False)  # the threshold engine counts it, the table never fires it
    new_terms: NewTerms | None = None
    if rtype == "new_terms":
        new_terms = _new_terms_of_rule(condition, rule, where, query_line)
        condition = Const(False)  # the new-terms engine runs it, the table never fires it

    if aggregation is not None:  # the aggregation engine groups it, the table never fires it
        aggregation = dataclasses.replace(
            aggregation,
            window=_lookback(rule),
            timestamp_field=str(rule.get("timestamp_field") or "@timestamp"),
        )
    severity = str(rule.get("severity", "medium")).lower()
    if severity not in _SEVERITIES:
        raise InvalidRule(f"rule.severity {severity!r} is not a known severity", where)
    risk = rule.get("risk_score", DEFAULT_RISK_SCORE[severity])
    if not isinstance(risk, int) or isinstance(risk, bool):
        raise InvalidRule("rule.risk_score must be an integer", where)
    tactics, techniques = _threats(rule.get("threat") or [], where)
    return [
        Rule(
            id=rule_id,
            name=name,
            source="elastic",
            condition=condition,
            path=where,
            line=query_line,
            severity=severity,
            risk_score=risk,
            author=tuple(str(a) for a in rule.get("author") or ()),
            tactics=tactics,
            techniques=techniques,
            modified=_iso_date(meta.get("updated_date") or meta.get("creation_date")),
            tags=tuple(str(t) for t in rule.get("tags") or ()),
            building_block=bool(rule.get("building_block_type")),
            status=str(meta.get("maturity") or ""),
            rule_type=str(rtype),
            kind=(
                "sequence"
                if sequence is not None
                else "sample"
                if sample is not None
                else "threshold"
                if threshold is not None
                else "new_terms"
                if new_terms is not None
                else "aggregation"
                if aggregation is not None
                else "event"
            ),
            sequence=sequence,
            threshold=threshold,
            new_terms=new_terms,
            sample=sample,
            aggregation=aggregation,
        )
    ]


def _sequence_of_rule(seq: Sequence, filters: Node, rule: dict[str, Any]) -> Sequence:
    """``seq`` with the rule's filters on every step and its time settings."""

    def step(s: Step) -> Step:
        return Step(and_(s.condition, filters), s.keys)

    return dataclasses.replace(
        seq,
        steps=tuple(step(s) for s in seq.steps),
        until=step(seq.until) if seq.until is not None else None,
        missing=tuple(dataclasses.replace(m, step=step(m.step)) for m in seq.missing),
        timestamp_field=str(rule.get("timestamp_field") or "@timestamp"),
        tiebreaker_field=str(rule["tiebreaker_field"]) if rule.get("tiebreaker_field") else None,
        ttl=_lookback(rule),
    )


def _sample_of_rule(sample: Sample, filters: Node, rule: dict[str, Any]) -> Sample:
    """``sample`` with the rule's filters on every filter, its time field and look-back."""
    return Sample(
        steps=tuple(Step(and_(s.condition, filters), s.keys) for s in sample.steps),
        ttl=_lookback(rule),
        timestamp_field=str(rule.get("timestamp_field") or "@timestamp"),
    )


def _lookback(rule: dict[str, Any]) -> float:
    """Seconds of the rule's look-back ``from`` (``now-9m``); Kibana's default if unset."""
    m = _LOOKBACK.match(str(rule.get("from") or ""))
    if m is None:
        return DEFAULT_LOOKBACK
    return float(int(m.group(1)) * _SECONDS[m.group(2)])


def _positive_int(value: Any, what: str, where: str, line: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidRule(f"{what} must be a positive integer", where, line)
    return value


def _threshold_of_rule(base: Node, rule: dict[str, Any], where: str, line: int) -> Threshold:
    """The ``[rule.threshold]`` table over the base condition ``base``."""
    table = rule.get("threshold")
    if not isinstance(table, dict):
        raise InvalidRule("rule.threshold is missing or not a table", where, line)
    raw_fields = table.get("field") or []
    if isinstance(raw_fields, str):
        raw_fields = [raw_fields]
    if not isinstance(raw_fields, list) or not all(
        isinstance(f, str) and f.strip() for f in raw_fields
    ):
        raise InvalidRule(
            "rule.threshold.field must be a field name or a list of them", where, line
        )
    value = _positive_int(table.get("value"), "rule.threshold.value", where, line)
    card_field: str | None = None
    card_value = 0
    cards = table.get("cardinality") or []
    if not isinstance(cards, list) or not all(isinstance(c, dict) for c in cards):
        raise InvalidRule("rule.threshold.cardinality must be an array of tables", where, line)
    if len(cards) > 1:  # Kibana's schema allows one
        raise UnsupportedRule("threshold with more than one cardinality condition", where, line)
    if cards:
        card_field = cards[0].get("field")
        if not isinstance(card_field, str) or not card_field.strip():
            raise InvalidRule("rule.threshold.cardinality.field is missing", where, line)
        card_value = _positive_int(
            cards[0].get("value"), "rule.threshold.cardinality.value", where, line
        )
    return Threshold(
        condition=base,
        fields=tuple(dict.fromkeys(raw_fields)),
        value=value,
        cardinality_field=card_field,
        cardinality_value=card_value,
        window=_lookback(rule),
        timestamp_field=str(rule.get("timestamp_field") or "@timestamp"),
    )


#: Kibana date math ``now-<n><unit>`` as new_terms ``history_window_start`` writes it.
_HISTORY = re.compile(r"^now-(\d+)([smhHdw])$")
_HISTORY_SECONDS = {"s": 1, "m": 60, "h": 3600, "H": 3600, "d": 86400, "w": 7 * 86400}
#: Kibana's limit on ``new_terms_fields``.
MAX_NEW_TERMS_FIELDS = 3


def _new_terms_of_rule(base: Node, rule: dict[str, Any], where: str, line: int) -> NewTerms:
    """The ``[rule.new_terms]`` table (``field = "new_terms_fields"``, ``value = [...]``, and
    ``[[rule.new_terms.history_window_start]]``) over the condition ``base``."""
    table = rule.get("new_terms")
    if not isinstance(table, dict):
        raise InvalidRule("rule.new_terms is missing or not a table", where, line)
    if table.get("field", "new_terms_fields") != "new_terms_fields":
        raise InvalidRule('rule.new_terms.field must be "new_terms_fields"', where, line)
    raw_fields = table.get("value")
    if isinstance(raw_fields, str):
        raw_fields = [raw_fields]
    if (
        not isinstance(raw_fields, list)
        or not raw_fields
        or not all(isinstance(f, str) and f.strip() for f in raw_fields)
    ):
        raise InvalidRule("rule.new_terms.value must be a non-empty list of fields", where, line)
    fields = tuple(dict.fromkeys(f.strip() for f in raw_fields))
    if len(fields) > MAX_NEW_TERMS_FIELDS:
        raise InvalidRule(
            f"rule.new_terms.value: more than {MAX_NEW_TERMS_FIELDS} fields", where, line
        )
    windows = table.get("history_window_start")
    if isinstance(windows, dict):
        windows = [windows]
    if not isinstance(windows, list) or len(windows) != 1 or not isinstance(windows[0], dict):
        raise InvalidRule("rule.new_terms.history_window_start must be one table", where, line)
    start = windows[0].get("value")
    m = _HISTORY.match(str(start).strip()) if isinstance(start, str) else None
    if m is None:
        raise UnsupportedRule(
            f"new_terms history_window_start {start!r} is not now-<n><s|m|h|d|w>", where, line
        )
    history = float(int(m.group(1)) * _HISTORY_SECONDS[m.group(2)])
    if history <= 0:
        raise InvalidRule("rule.new_terms.history_window_start must be before now", where, line)
    override = rule.get("timestamp_override")
    if override is not None and (not isinstance(override, str) or not override.strip()):
        raise InvalidRule("rule.timestamp_override must be a field name", where, line)
    fallback: str | None = None
    if override and not rule.get("timestamp_override_fallback_disabled"):
        fallback = "@timestamp"
    return NewTerms(
        condition=base,
        fields=fields,
        history=history,
        timestamp_field=override.strip() if override else "@timestamp",
        timestamp_fallback=fallback,
    )


def _query_position(text: str) -> tuple[int, int]:
    """(line of ``query =``, line where the query text itself starts); 1-based."""
    for number, line in enumerate(text.splitlines(), start=1):
        m = _QUERY_LINE.match(line)
        if m is None:
            continue
        rest = m.group(1).strip()
        # TOML drops a newline right after an opening ''' or """.
        return number, number + 1 if rest in ("'''", '"""') else number
    return 1, 1


def _threats(threats: Any, where: str) -> tuple[tuple[Attack, ...], tuple[Attack, ...]]:
    """ATT&CK tactics and techniques (sub-techniques included) from ``[[rule.threat]]``."""
    tactics: dict[str, Attack] = {}
    techniques: dict[str, Attack] = {}
    if not isinstance(threats, list):
        raise InvalidRule("rule.threat must be an array of tables", where)
    for threat in threats:
        if not isinstance(threat, dict) or threat.get("framework", "MITRE ATT&CK") != (
            "MITRE ATT&CK"
        ):
            continue
        tactic = threat.get("tactic")
        if isinstance(tactic, dict) and tactic.get("id"):
            tactics.setdefault(tactic["id"], Attack(tactic["id"], str(tactic.get("name", ""))))
        for tech in threat.get("technique") or ():
            if not isinstance(tech, dict) or not tech.get("id"):
                continue
            techniques.setdefault(tech["id"], Attack(tech["id"], str(tech.get("name", ""))))
            for sub in tech.get("subtechnique") or ():
                if isinstance(sub, dict) and sub.get("id"):
                    techniques.setdefault(sub["id"], Attack(sub["id"], str(sub.get("name", ""))))
    return tuple(tactics.values()), tuple(techniques.values())


def _iso_date(value: Any) -> str:
    """``"2024/10/15"`` -> ``"2024-10-15"``; anything unparseable -> ``""``."""
    m = _DATE.match(str(value or "").strip())
    return f"{m.group(1)}-{m.group(2)}-{m.group(3)}" if m else ""
