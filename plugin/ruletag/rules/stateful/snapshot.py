"""JSON-ready snapshots of stateful engines: the helpers their ``snapshot``/``restore`` share.

An engine's snapshot is ``{"arrival": n, "rules": {rule id: {"digest": ..., ...}}}``; a rule's
state is restored only into a rule with the same id and the same :func:`rule_digest` (its
stateful definition), so an edited rule starts afresh while the others keep their state.
Infinite times (nothing seen yet) are written as None.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any

from ruletag.rules.ir import Rule

__all__ = ["DigestCache", "from_time", "json_value", "restorable", "rule_digest", "to_time"]


def rule_digest(rule: Rule) -> str:
    """A stable digest of what a stateful rule's state depends on (its kind and stateful
    definition: sequence, threshold, new terms, correlation, sample or aggregation)."""
    text = repr(
        (
            rule.kind,
            rule.sequence,
            rule.threshold,
            rule.new_terms,
            rule.correlation,
            rule.sample,
            rule.aggregation,
        )
    )
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:24]


class DigestCache:
    """:func:`rule_digest` per rule id, computed once (an engine's rules do not change, and a
    digest walks the whole rule: too slow for every checkpoint)."""

    def __init__(self) -> None:
        self._by_id: dict[str, str] = {}

    def __call__(self, rule: Rule) -> str:
        d = self._by_id.get(rule.id)
        if d is None:
            d = self._by_id[rule.id] = rule_digest(rule)
        return d


def to_time(value: float) -> float | None:
    """A time for JSON: None for -inf/+inf."""
    return None if math.isinf(value) else value


def from_time(value: object) -> float:
    """A time back from :func:`to_time` (None: -inf)."""
    return -math.inf if value is None else float(value)  # type: ignore[arg-type]


def json_value(value: object) -> object:
    """``value`` if JSON can hold it as is, else its text."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def restorable(
    snap: Mapping[str, Any], rule: Rule, digest: str | None = None
) -> Mapping[str, Any] | None:
    """The saved state of ``rule`` in an engine snapshot, if its definition is unchanged
    (``digest``: its :func:`rule_digest` when already known)."""
    rules = snap.get("rules")
    if not isinstance(rules, Mapping):
        return None
    saved = rules.get(rule.id)
    if digest is None:
        digest = rule_digest(rule)
    if not isinstance(saved, Mapping) or saved.get("digest") != digest:
        return None
    return saved
