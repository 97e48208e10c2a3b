"""The annotation a matched rule adds to a record (``ruletag match`` and the filter).

Sigma's Detection Rule License asks that messages produced from matches keep the rule's
``author``, so every annotation carries it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ruletag.rules.ir import Attack, Rule


def _attack(items: Iterable[Attack]) -> list[dict[str, str]]:
    return [{"id": a.id, "name": a.name} for a in items]


def detection(rule: Rule) -> dict[str, Any]:
    """One rule as a JSON-ready dict: id, name, source, severity, risk, author, ATT&CK, and
    ``building_block: true`` for an Elastic building-block rule (absent otherwise)."""
    d: dict[str, Any] = {
        "rule_id": rule.id,
        "name": rule.name,
        "source": rule.source,
        "severity": rule.severity,
        "risk_score": rule.risk_score,
        "author": list(rule.author),
        "tactics": _attack(rule.tactics),
        "techniques": _attack(rule.techniques),
    }
    if rule.building_block:
        d["building_block"] = True
    return d


def sequence_detection(
    rule: Rule, keys: Iterable[str], events: Iterable[Mapping[str, Any]]
) -> dict[str, Any]:
    """A completed sequence: :func:`detection` plus ``sequence``: the join-key values and a
    reference (``timestamp``, ``id``) of every event of the sequence, in order."""
    d = detection(rule)
    d["sequence"] = {"keys": list(keys), "events": [dict(e) for e in events]}
    return d


def threshold_detection(
    rule: Rule,
    terms: Iterable[tuple[str, str]],
    count: int,
    cardinality: tuple[str, int] | None,
    window: tuple[str, str],
) -> dict[str, Any]:
    """A threshold reached: :func:`detection` plus ``threshold``: the group's ``terms``
    (``field``, ``value``), the ``count`` of records, the ``cardinality`` (``field``, distinct
    ``value``) for a rule with a distinct-count condition, and the ``window`` (``start``,
    ``end``) counted, as Kibana's ``threshold_result`` names them."""
    d = detection(rule)
    block: dict[str, Any] = {
        "terms": [{"field": f, "value": v} for f, v in terms],
        "count": count,
    }
    if cardinality is not None:
        block["cardinality"] = [{"field": cardinality[0], "value": cardinality[1]}]
    block["window"] = {"start": window[0], "end": window[1]}
    d["threshold"] = block
    return d


def new_terms_detection(
    rule: Rule,
    terms: Iterable[tuple[str, str]],
    window: tuple[str, str],
    last_seen: str | None = None,
) -> dict[str, Any]:
    """A first-seen combination: :func:`detection` plus ``new_terms``: the ``terms``
    (``field``, ``value``) of the combination, the ``history_window`` (``start``, ``end``: the
    record's event time) it was not seen in, and ``last_seen`` when it was seen before that."""
    d = detection(rule)
    block: dict[str, Any] = {
        "terms": [{"field": f, "value": v} for f, v in terms],
        "history_window": {"start": window[0], "end": window[1]},
    }
    if last_seen is not None:
        block["last_seen"] = last_seen
    d["new_terms"] = block
    return d


def correlation_detection(
    rule: Rule,
    type_: str,
    group: Iterable[tuple[str, str]],
    value: float,
    window: tuple[str, str],
    events: Iterable[Mapping[str, Any]],
) -> dict[str, Any]:
    """A Sigma correlation that fired: :func:`detection` plus ``correlation``: its ``type``,
    the ``group`` (``field``, ``value`` per group-by field), the aggregate ``value`` compared
    with the condition (an integer for counts), the event-time ``window`` (first and last
    event counted) and a reference (``timestamp``, ``id``) of the events counted."""
    d = detection(rule)
    d["correlation"] = {
        "type": type_,
        "group": [{"field": f, "value": v} for f, v in group],
        "value": int(value) if float(value).is_integer() else value,
        "window": {"start": window[0], "end": window[1]},
        "events": [dict(e) for e in events],
    }
    return d


def aggregation_detection(
    rule: Rule,
    keys: Iterable[tuple[str, object]],
    values: Iterable[tuple[str, object]],
    count: int,
    window: tuple[str, str],
) -> dict[str, Any]:
    """An aggregating ES|QL rule fired: :func:`detection` plus ``aggregation``: the group's
    ``keys`` (``field``, ``value``) per ``BY`` column, the aggregate ``values`` (column ->
    value), the ``count`` of records in the group and the ``window`` (``start``, ``end``)."""
    d = detection(rule)
    d["aggregation"] = {
        "keys": [{"field": f, "value": v} for f, v in keys],
        "values": dict(values),
        "count": count,
        "window": {"start": window[0], "end": window[1]},
    }
    return d


def sample_detection(
    rule: Rule, keys: Iterable[str], events: Iterable[Mapping[str, Any]]
) -> dict[str, Any]:
    """A completed EQL sample: :func:`detection` plus ``sample``: the join-key values and a
    reference (``timestamp``, ``id``) of every record of the sample, in filter order."""
    d = detection(rule)
    d["sample"] = {"keys": list(keys), "events": [dict(e) for e in events]}
    return d


def stateful_detection(result: object) -> dict[str, Any]:
    """What a stateful engine returned (:mod:`ruletag.rules.stateful`) as an annotation."""
    from ruletag.rules.stateful.sequence import Completion
    from ruletag.rules.stateful.threshold import Alert, iso_time

    if isinstance(result, Completion):
        return sequence_detection(result.rule, result.keys, result.events)
    if isinstance(result, Alert):
        window = (iso_time(result.start), iso_time(result.end))
        return threshold_detection(
            result.rule, result.terms, result.count, result.cardinality, window
        )
    from ruletag.rules.stateful.newterms import NewTerm

    if isinstance(result, NewTerm):
        seen = None if result.last_seen is None else iso_time(result.last_seen)
        window = (iso_time(result.time - result.history), iso_time(result.time))
        return new_terms_detection(result.rule, result.terms, window, seen)

    from ruletag.rules.stateful.correlation import Fire

    if isinstance(result, Fire):
        window = (iso_time(result.start), iso_time(result.end))
        return correlation_detection(
            result.rule, result.type, result.group, result.value, window, result.events
        )

    from ruletag.rules.stateful.sample import SampleResult

    if isinstance(result, SampleResult):
        return sample_detection(result.rule, result.keys, result.events)

    from ruletag.rules.stateful.aggregation import AggregateAlert

    if isinstance(result, AggregateAlert):
        window = (iso_time(result.start), iso_time(result.end))
        return aggregation_detection(result.rule, result.keys, result.values, result.count, window)
    raise TypeError(f"no annotation for a stateful result of type {type(result).__name__}")
