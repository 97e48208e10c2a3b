"""Why a rule did or did not match a record: the reference evaluator, tracing every node.

:func:`explain` walks a rule's condition like :func:`ruletag.rules.reference.evaluate`, with
the same leaf evaluation (:func:`~ruletag.rules.reference.evaluate_leaf`), but visits every
child instead of short-circuiting and records, per leaf, the field it reads, the record paths
that supplied the values (after the field mapping, or the derivation used), the values read
and the result. The Sigma logsource condition is traced on its own, so an explanation says
whether the record was out of the rule's logsource or failed the detection itself.

It is separate from the reference evaluator so the oracle of the differential tests stays a
plain, fast walk; the verdict it reports is the reference verdict.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ruletag.rules.fields import FieldMap, RecordView
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
    Rule,
    ValueExpr,
    Wild,
    leaf_fields,
)
from ruletag.rules.reference import evaluate_leaf, values_of

#: Values shown per leaf (the rest is counted).
MAX_VALUES = 5
#: Characters shown of one value.
MAX_TEXT = 200


@dataclass
class Trace:
    """One node of an explained condition."""

    node: str  # "and", "or", "not", "const" or the leaf type ("match", "regex", ...)
    result: bool
    text: str = ""  # the leaf in words: field, operator, pattern
    fields: list[dict[str, Any]] = field(default_factory=list)  # per field read: see _field
    children: list[Trace] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"node": self.node, "result": self.result}
        if self.text:
            d["text"] = self.text
        if self.fields:
            d["fields"] = self.fields
        if self.children:
            d["children"] = [c.to_json() for c in self.children]
        return d

    def leaves(self) -> list[Trace]:
        if not self.children:
            return [self]
        return [leaf for c in self.children for leaf in c.leaves()]


@dataclass
class Explanation:
    """A rule against one record: logsource part, condition part, verdict."""

    rule: Rule
    logsource: Trace | None  # None: the rule has no logsource restriction
    condition: Trace
    verdict: bool

    def to_json(self) -> dict[str, Any]:
        r = self.rule
        ls = r.logsource
        return {
            "rule": {
                "id": r.id,
                "name": r.name,
                "source": r.source,
                "path": r.path,
                "line": r.line,
                "logsource": (
                    {"product": ls.product, "category": ls.category, "service": ls.service}
                    if ls is not None
                    else None
                ),
            },
            "logsource": self.logsource.to_json() if self.logsource is not None else None,
            "condition": self.condition.to_json(),
            "verdict": self.verdict,
        }


# --------------------------------------------------------------------------- leaf text


def _pattern(tokens: tuple[str | Wild, ...]) -> str:
    out = []
    for t in tokens:
        if isinstance(t, Wild):
            out.append(t.value)
        else:
            out.append(t.replace("*", "\\*").replace("?", "\\?"))
    return "".join(out)


def _q(v: object) -> str:
    """A value for reading: text in single quotes as is (no escapes doubled), else repr."""
    return f"'{v}'" if isinstance(v, str) else repr(v)


def _value_text(v: ValueExpr) -> str:
    if isinstance(v, FieldValue):
        return v.field
    if isinstance(v, Literal_):
        return "null" if v.value is None else _q(v.value)
    return f"{v.name}({', '.join(_value_text(a) for a in v.args)})"


def describe(node: Node) -> str:
    """A leaf in words (``Image matches '*\\\\wuauclt.exe' (any case)``)."""
    case = "" if getattr(node, "cased", True) else " (any case)"
    if isinstance(node, Match):
        where = node.field if node.field is not None else "any value (keyword)"
        return f"{where} matches {_q(_pattern(node.pattern))}{case}"
    if isinstance(node, Regex):
        flags = f" /{node.flags}" if node.flags else ""
        return f"{node.field or 'any value'} regex {_q(node.pattern)}{flags}"
    if isinstance(node, Cidr):
        return f"{node.field} in cidr {', '.join(node.networks)}"
    if isinstance(node, Compare):
        return f"{node.field} {node.op} {node.value!r}"
    if isinstance(node, Equals):
        return f"{node.field} == {node.value!r}"
    if isinstance(node, IsNull):
        return f"{node.field} is missing or null"
    if isinstance(node, Exists):
        return f"{node.field} exists"
    if isinstance(node, FieldRef):
        return f"{node.field} {node.op} field {node.other}{case}"
    if isinstance(node, Predicate):
        right = (
            "(" + ", ".join(_value_text(r) for r in node.right) + ")"
            if isinstance(node.right, tuple)
            else _value_text(node.right)
        )
        return f"{_value_text(node.left)} {node.op} {right}{case}"
    if isinstance(node, Const):
        return "always" if node.value else "never"
    return type(node).__name__


# --------------------------------------------------------------------------- field reads


def _short(v: object) -> object:
    if isinstance(v, str) and len(v) > MAX_TEXT:
        return v[:MAX_TEXT] + f"... ({len(v)} chars)"
    if isinstance(v, bytes):
        return _short(v.decode("utf-8", "replace"))
    if isinstance(v, int | float | bool | str) or v is None:
        return v
    return repr(v)[:MAX_TEXT]


def _field(view: RecordView, fmap: FieldMap, name: str) -> dict[str, Any]:
    """What the record supplied for ``name``: the paths read, or the derivation, and values."""
    values = view.values(name)
    flat = view.flat()
    paths = [p for p in fmap.paths(name) if flat.get(p)]
    if paths:
        source = paths
    elif values:
        kinds = [
            f"{kind} of {src}" if kind != "when_present" else f"{val!r} when {src} is present"
            for kind, src, val in fmap.derivations(name)
        ]
        source = [f"derived: {' or '.join(kinds)}"] if kinds else []
    else:
        source = []
    out: dict[str, Any] = {"field": name, "from": source}
    out["values"] = [_short(v) for v in values[:MAX_VALUES]]
    if len(values) > MAX_VALUES:
        out["more_values"] = len(values) - MAX_VALUES
    if not values:
        out["missing"] = True
    return out


# --------------------------------------------------------------------------- tracing


def trace(node: Node, view: RecordView, fmap: FieldMap) -> Trace:
    """Every node of ``node`` evaluated against ``view`` (no short-circuit)."""
    if isinstance(node, And | Or):
        kids = [trace(a, view, fmap) for a in node.args]
        agg = all if isinstance(node, And) else any
        return Trace(
            "and" if isinstance(node, And) else "or", agg(k.result for k in kids), children=kids
        )
    if isinstance(node, Not):
        kid = trace(node.arg, view, fmap)
        return Trace("not", not kid.result, children=[kid])
    if isinstance(node, Const):
        return Trace("const", node.value, describe(node))
    result = evaluate_leaf(node, view)
    leaf = Trace(type(node).__name__.lower(), result, describe(node))
    leaf.fields = [_field(view, fmap, f) for f in leaf_fields(node)]
    if isinstance(node, Match) and node.field is None:
        leaf.fields = [{"field": None, "from": ["every value of the record"]}]
    if isinstance(node, Predicate) and isinstance(node.left, Call):
        leaf.fields.append(
            {"expression": _value_text(node.left), "values": values_of(node.left, view)[:5]}
        )
    return leaf


def explain(rule: Rule, record: Mapping[str, object], fmap: FieldMap) -> Explanation:
    """Trace ``rule`` on ``record``; the verdict is logsource AND condition."""
    view = fmap.view(record)
    ls_node = fmap.logsource_condition(rule.logsource)
    ls = trace(ls_node, view, fmap) if ls_node is not None else None
    cond = trace(rule.condition, view, fmap)
    verdict = cond.result and (ls is None or ls.result)
    return Explanation(rule, ls, cond, verdict)


# --------------------------------------------------------------------------- text


def _fmt_fields(fields: list[dict[str, Any]]) -> str:
    parts = []
    for f in fields:
        if "expression" in f:
            parts.append(f"{f['expression']} = {', '.join(_q(v) for v in f['values'])}")
            continue
        name = f.get("field")
        if name is None:
            continue
        if f.get("missing"):
            parts.append(f"{name}: missing")
            continue
        src = ", ".join(f.get("from", []))
        vals = ", ".join(_q(v) for v in f.get("values", []))
        more = f" (+{f['more_values']} more)" if f.get("more_values") else ""
        via = f" <- {src}" if src and src != name else ""
        parts.append(f"{name}{via} = {vals}{more}")
    return "; ".join(parts)


def _lines(t: Trace, depth: int, out: list[str]) -> None:
    pad = "  " * depth
    mark = "true " if t.result else "false"
    if t.children:
        out.append(f"{pad}[{mark}] {t.node.upper()}")
        for c in t.children:
            _lines(c, depth + 1, out)
        return
    read = _fmt_fields(t.fields)
    out.append(f"{pad}[{mark}] {t.text}" + (f"    | {read}" if read else ""))


def to_text(e: Explanation) -> str:
    """The explanation as an indented tree for a terminal."""
    r = e.rule
    out = [f"rule {r.id} {r.name!r} ({r.source}, {r.path}:{r.line})"]
    if r.logsource is not None:
        ls = r.logsource
        spec = " ".join(
            f"{k}={v}"
            for k, v in (
                ("product", ls.product),
                ("category", ls.category),
                ("service", ls.service),
            )
            if v
        )
        if e.logsource is None:
            out.append(f"logsource {spec}: no restriction in the field mapping")
        else:
            out.append(f"logsource {spec}: {'in' if e.logsource.result else 'NOT in'} it")
            _lines(e.logsource, 1, out)
    else:
        out.append(
            "logsource: none (index patterns are not used: the event category is part of the "
            "condition)"
            if r.source == "elastic"
            else "logsource: none"
        )
    out.append(f"condition: {'true' if e.condition.result else 'false'}")
    _lines(e.condition, 1, out)
    out.append(f"verdict: {'MATCH' if e.verdict else 'no match'}")
    return "\n".join(out)
