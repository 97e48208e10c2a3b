"""The slow, obviously correct reference evaluator of the IR: the oracle of differential tests.

A plain recursive walk over :mod:`ruletag.rules.ir` nodes, reading field values through a
:class:`~ruletag.rules.fields.RecordView`. Semantics, leaf by leaf (any value of a
multi-valued field may satisfy a leaf; missing-or-null satisfies only ``IsNull``):

* ``Match``: each value's canonical text (maps never match) must fully match the pattern
  (``*`` any run, ``?`` one character, DOTALL); ``cased=False`` lower-cases both sides.
  ``field=None`` tests every scalar of the record.
* ``Regex``: RE2 unanchored search with the ``i``/``m``/``s`` flags.
* ``Cidr``: the value's text is an IP address inside one of the networks.
* ``Compare``/``Equals``: ints and floats, or strings that are a plain decimal number
  (``[+-]digits`` or a float literal, no spaces); bools are not numbers. ``Equals`` with a
  bool matches a bool or the text ``"true"``/``"false"``.
* ``FieldRef``: some value of ``other`` appears (eq/startswith/endswith/contains) in some
  value of ``field``, as text.
* ``Predicate``: every combination of the operands' values (a missing field is null) is tried;
  true when any combination is. ``== null`` / ``!= null`` (a ``Literal_(None)`` right side)
  test for missing-or-null / present; otherwise a null operand makes any comparison false
  (``f != "x"`` is false when ``f`` is missing, as in EQL's three-valued logic). ``:`` is
  case-insensitive wildcard equality, ``like`` wildcard equality (cased unless
  ``cased=False``), ``regex`` an anchored RE2 full match (``.`` matches newlines, as in
  Lucene), ``in`` membership; text comparisons lower-case both sides when ``cased=False``.
  Numbers compare numerically, other values through their text.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from typing import Any

import re2

from ruletag.rules import functions
from ruletag.rules.algebra import (
    as_text,
    equals_value,
    number_of,
    re2_search,
    wildcard_match,
    wildcard_tokens,
)
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
    Leaf,
    Literal_,
    Match,
    Node,
    Not,
    Or,
    Predicate,
    Regex,
    Rule,
    ValueExpr,
)
from ruletag.rules.regex import compile_re2

_MAX_COMBINATIONS = 4096


def _like(text: str, pattern: str, cased: bool) -> bool:
    return wildcard_match(text, wildcard_tokens(pattern), cased)


@lru_cache(maxsize=4096)
def _re2(pattern: str, flags: str, anchored: bool = False) -> re2._Regexp:
    prefix = f"(?{''.join(sorted(set(flags)))})" if flags else ""
    body = f"^(?:{pattern})$" if anchored else pattern
    return compile_re2(prefix + body)


def _in_cidr(value: object, networks: tuple[str, ...]) -> bool:
    return functions.cidrmatch(value, *networks) is True


def _texts(view: RecordView, field: str | None) -> list[str]:
    if field is None:
        return view.strings()
    return [t for t in map(as_text, view.values(field)) if t is not None]


def _compare(a: int | float, op: str, b: int | float) -> bool:
    if op == "<":
        return a < b
    if op == "<=":
        return a <= b
    if op == ">":
        return a > b
    if op == ">=":
        return a >= b
    raise ValueError(f"unknown comparison {op!r}")


def _fieldref(node: FieldRef, view: RecordView) -> bool:
    mine = _texts(view, node.field)
    others = _texts(view, node.other)
    for a in mine:
        for b in others:
            x, y = (a, b) if node.cased else (a.lower(), b.lower())
            if (
                (node.op == "eq" and x == y)
                or (node.op == "startswith" and x.startswith(y))
                or (node.op == "endswith" and x.endswith(y))
                or (node.op == "contains" and y in x)
            ):
                return True
    return False


# --------------------------------------------------------------------------- predicates


def values_of(expr: ValueExpr, view: RecordView) -> list[object]:
    """Every value an expression can take for this record (``[None]`` when null/missing)."""
    if isinstance(expr, Literal_):
        return [expr.value]
    if isinstance(expr, FieldValue):
        return list(view.values(expr.field)) or [None]
    if isinstance(expr, Call):
        arg_values = [values_of(a, view) for a in expr.args]
        out: list[object] = []
        for n, combo in enumerate(itertools.product(*arg_values)):
            if n >= _MAX_COMBINATIONS:
                break
            out.append(functions.call(expr.name, combo, cased=expr.cased))
        return out or [None]
    raise TypeError(f"not a value expression: {expr!r}")


def _scalar_eq(a: object, b: object, cased: bool) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return as_text(a) == as_text(b)
    if isinstance(a, int | float) or isinstance(b, int | float):
        na, nb = number_of(a), number_of(b)
        if na is not None and nb is not None:
            return na == nb
    ta, tb = as_text(a), as_text(b)
    if ta is None or tb is None:
        return False
    return ta == tb if cased else ta.lower() == tb.lower()


def _binary(op: str, a: object, b: object, cased: bool) -> bool:
    if a is None or b is None:
        return False
    if op == "==":
        return _scalar_eq(a, b, cased)
    if op == "!=":
        return not _scalar_eq(a, b, cased)
    if op in ("<", "<=", ">", ">="):
        na, nb = number_of(a), number_of(b)
        if na is not None and nb is not None:
            return _compare(na, op, nb)
        ta, tb = as_text(a), as_text(b)
        if isinstance(a, str) and isinstance(b, str) and ta is not None and tb is not None:
            x, y = (ta, tb) if cased else (ta.lower(), tb.lower())
            return (x < y, x <= y, x > y, x >= y)[("<", "<=", ">", ">=").index(op)]
        return False
    ta, tb = as_text(a), as_text(b)
    if ta is None or tb is None:
        return False
    if op == ":":
        return _like(ta, tb, False)
    if op == "like":
        return _like(ta, tb, cased)
    if op == "regex":
        return re2_search(_re2(tb, "s" if cased else "is", anchored=True), ta)
    if op == "in":
        return _scalar_eq(a, b, cased)
    raise ValueError(f"unknown predicate operator {op!r}")


def _predicate(node: Predicate, view: RecordView) -> bool:
    lefts = values_of(node.left, view)
    if node.op in ("==", "!=") and node.right == Literal_(None):
        is_null = all(v is None for v in lefts)
        return is_null if node.op == "==" else not is_null
    rights_exprs = node.right if isinstance(node.right, tuple) else (node.right,)
    rights: list[object] = []
    for r in rights_exprs:
        rights.extend(values_of(r, view))
    return any(_binary(node.op, a, b, node.cased) for a in lefts for b in rights)


# --------------------------------------------------------------------------- leaves


def _match(node: Match, view: RecordView) -> bool:
    return any(wildcard_match(t, node.pattern, node.cased) for t in _texts(view, node.field))


def _regex(node: Regex, view: RecordView) -> bool:
    rx = _re2(node.pattern, node.flags)
    return any(re2_search(rx, t) for t in _texts(view, node.field))


def _cidr(node: Cidr, view: RecordView) -> bool:
    return any(_in_cidr(v, node.networks) for v in view.values(node.field))


def _compare_leaf(node: Compare, view: RecordView) -> bool:
    nums = (number_of(v) for v in view.values(node.field))
    return any(n is not None and _compare(n, node.op, node.value) for n in nums)


def _equals(node: Equals, view: RecordView) -> bool:
    return any(equals_value(v, node.value) for v in view.values(node.field))


def _is_null(node: IsNull, view: RecordView) -> bool:
    return not view.values(node.field)


def _exists(node: Exists, view: RecordView) -> bool:
    return bool(view.values(node.field))


#: The evaluator of each leaf kind (shared by :func:`evaluate` and the ``explain`` tracer).
_LEAVES: dict[type, Callable[[Any, RecordView], bool]] = {
    Match: _match,
    Regex: _regex,
    Cidr: _cidr,
    Compare: _compare_leaf,
    Equals: _equals,
    IsNull: _is_null,
    Exists: _exists,
    FieldRef: _fieldref,
    Predicate: _predicate,
}


def evaluate_leaf(leaf: Leaf, view: RecordView) -> bool:
    """Whether the record behind ``view`` satisfies the leaf ``leaf``."""
    fn = _LEAVES.get(type(leaf))
    if fn is None:
        raise TypeError(f"not an IR leaf: {leaf!r}")
    return fn(leaf, view)


# --------------------------------------------------------------------------- evaluation


def evaluate(node: Node, view: RecordView) -> bool:
    """Whether the record behind ``view`` satisfies ``node``."""
    if isinstance(node, And):
        return all(evaluate(a, view) for a in node.args)
    if isinstance(node, Or):
        return any(evaluate(a, view) for a in node.args)
    if isinstance(node, Not):
        return not evaluate(node.arg, view)
    if isinstance(node, Const):
        return node.value
    return evaluate_leaf(node, view)


def rule_condition(rule: Rule, fieldmap: FieldMap) -> Node:
    """A rule's condition ANDed with its logsource condition (when it has one)."""
    ls = fieldmap.logsource_condition(rule.logsource)
    return rule.condition if ls is None else And((ls, rule.condition))


def reference_match(
    rules: Sequence[Rule], record: Mapping[str, object], fieldmap: FieldMap
) -> list[str]:
    """Ids of the rules ``record`` matches, in rule order, logsource conditions honoured."""
    view = fieldmap.view(record)
    return [r.id for r in rules if evaluate(rule_condition(r, fieldmap), view)]
