"""Lazily evaluated leaves: the IR leaves a rule formula asks about only for candidate rules.

Each leaf becomes a function ``(record view, per-record cache) -> bool``; keyword atoms share
one scan of every string of the record (the ``kw`` function the matcher passes in). When the
C helpers are built, ``Exists``, ``IsNull``, ``Equals``, ``Compare`` and ``FieldRef`` leaves
are C objects (``_native.LazyLeaf``) with the semantics of :func:`py_lazy_fn`'s functions,
the reference.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from typing import Any

from ruletag.rules.algebra import as_text, equals_value, ip_of, network_of, number_of
from ruletag.rules.fields import RecordView
from ruletag.rules.ir import (
    Cidr,
    Compare,
    Equals,
    Exists,
    FieldRef,
    IsNull,
    Match,
    Node,
    Predicate,
    Regex,
)
from ruletag.rules.native import native_module

__all__ = ["Lazy", "lazy_fn", "py_lazy_fn"]

Hits = set[int]
Lazy = Callable[[RecordView, dict[int, Any]], bool]


def _cidr_ranges(networks: Sequence[str]) -> tuple[list[int], list[int]]:
    """Sorted, merged [start, end] ranges; IPv6 shifted above 2**32 to share one list."""
    spans: list[tuple[int, int]] = []
    for net in networks:
        n = network_of(net)
        if n is None:
            continue
        off = 0 if n.version == 4 else 1 << 32
        spans.append((int(n.network_address) + off, int(n.broadcast_address) + off))
    spans.sort()
    starts: list[int] = []
    ends: list[int] = []
    for a, b in spans:
        if ends and a <= ends[-1] + 1:
            ends[-1] = max(ends[-1], b)
        else:
            starts.append(a)
            ends.append(b)
    return starts, ends


def _ip_int(v: object) -> int | None:
    ip = ip_of(v)
    return None if ip is None else int(ip) + (0 if ip.version == 4 else 1 << 32)


_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


def _fieldref(a: str, b: str, op: str) -> bool:
    if op == "eq":
        return a == b
    if op == "startswith":
        return a.startswith(b)
    if op == "endswith":
        return a.endswith(b)
    return b in a


def _texts(values: list[object], cased: bool) -> set[str]:
    """The texts of ``values`` (:func:`as_text`; maps and lists have none), lower-cased unless
    ``cased``."""
    out = {s for s in map(as_text, values) if s is not None}
    return out if cased else {s.lower() for s in out}


_LazyLeaf: Any = getattr(native_module(), "LazyLeaf", None)
#: the kinds of ``_native.LazyLeaf``
_EXISTS, _ISNULL, _EQUALS, _EQUALS_BOOL, _COMPARE, _FIELDREF, _CIDR = range(7)


def lazy_fn(leaf: Node, kw: Callable[[RecordView, dict[int, Any]], Hits], atom: int) -> Lazy:
    """A function ``(view, per-record cache) -> bool`` for one lazily evaluated leaf: in C
    for the kinds ``_native.LazyLeaf`` has, else :func:`py_lazy_fn`'s."""
    if _LazyLeaf is not None:
        if isinstance(leaf, Exists):
            return _LazyLeaf(_EXISTS, leaf.field)
        if isinstance(leaf, IsNull):
            return _LazyLeaf(_ISNULL, leaf.field)
        if isinstance(leaf, Equals):
            want = leaf.value
            if isinstance(want, bool):
                return _LazyLeaf(_EQUALS_BOOL, leaf.field, want)
            return _LazyLeaf(_EQUALS, leaf.field, want, None, equals_value)
        if isinstance(leaf, Compare):
            return _LazyLeaf(_COMPARE, leaf.field, leaf.value, leaf.op, number_of)
        if isinstance(leaf, FieldRef):  # one text a side in C, anything else in Python
            ref = py_lazy_fn(leaf, kw, atom)
            return _LazyLeaf(_FIELDREF, leaf.field, leaf.other, leaf.op, ref, leaf.cased)
        if isinstance(leaf, Cidr):  # dotted-quad texts in C, anything else through _ip_int
            starts, ends = _cidr_ranges(leaf.networks)
            return _LazyLeaf(_CIDR, leaf.field, (tuple(starts), tuple(ends)), None, _ip_int)
    return py_lazy_fn(leaf, kw, atom)


def py_lazy_fn(leaf: Node, kw: Callable[[RecordView, dict[int, Any]], Hits], atom: int) -> Lazy:
    """A function ``(view, per-record cache) -> bool`` for one lazily evaluated leaf, in
    Python (the reference)."""
    if isinstance(leaf, Match | Regex):  # keyword atoms: one shared scan of every string
        return lambda view, cache: atom in kw(view, cache)
    if isinstance(leaf, Exists):
        f = leaf.field
        return lambda view, _c: bool(view.values(f))
    if isinstance(leaf, IsNull):
        f = leaf.field
        return lambda view, _c: not view.values(f)
    if isinstance(leaf, Equals):
        f, want = leaf.field, leaf.value
        if isinstance(want, bool):
            return lambda view, _c: any(equals_value(v, want) for v in view.values(f))

        def equals(view: RecordView, _c: object) -> bool:
            for v in view.values(f):
                # an int is its own number (number_of); anything else is read as one
                if v == want if type(v) is int else equals_value(v, want):
                    return True
            return False

        return equals
    if isinstance(leaf, Compare):
        f, op, num = leaf.field, _OPS[leaf.op], leaf.value

        def cmp(view: RecordView, _c: object) -> bool:
            for v in view.values(f):
                x = number_of(v)
                if x is not None and op(x, num):
                    return True
            return False

        return cmp
    if isinstance(leaf, Cidr):
        f = leaf.field
        starts, ends = _cidr_ranges(leaf.networks)

        def in_cidr(view: RecordView, _c: object) -> bool:
            for v in view.values(f):
                ip = _ip_int(v)
                if ip is not None:
                    k = bisect.bisect_right(starts, ip) - 1
                    if k >= 0 and ip <= ends[k]:
                        return True
            return False

        return in_cidr
    if isinstance(leaf, FieldRef):
        f, g, how, cased = leaf.field, leaf.other, leaf.op, leaf.cased

        def ref(view: RecordView, _c: object) -> bool:
            fv = view.values(f)
            gv = view.values(g) if fv else fv
            if not gv:  # one side has no value: nothing to compare (the common case)
                return False
            if len(fv) == 1 and len(gv) == 1:  # one text each (the next most common)
                x, y = fv[0], gv[0]
                if type(x) is str and type(y) is str:
                    return _fieldref(x, y, how) if cased else _fieldref(x.lower(), y.lower(), how)
            xs = _texts(fv, cased)
            ys = _texts(gv, cased)
            if how == "eq":
                return not xs.isdisjoint(ys)
            return any(_fieldref(x, y, how) for x in xs for y in ys)

        return ref
    if isinstance(leaf, Predicate):
        # Generic computed comparison (few EQL rules): the function semantics live in one
        # place, the reference evaluator, which implements them with functions.py.
        from ruletag.rules.reference import evaluate

        return lambda view, _c: bool(evaluate(leaf, view))
    raise TypeError(f"unknown leaf {leaf!r}")
