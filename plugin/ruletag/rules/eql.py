"""Elasticsearch EQL (single-event queries and sequences) to ruletag IR.

``parse_eql("process where process.name : \\"cmd.exe\\"")`` returns the condition;
:func:`parse_eql_query` also accepts ``sequence`` queries and returns an IR
:class:`~ruletag.rules.ir.Sequence` for them (shared ``by`` keys prepended to every step's own,
``with runs=N`` expanded into N steps, ``maxspan`` in seconds, missing-event clauses
``![...]`` in ``Sequence.missing``) and an IR :class:`~ruletag.rules.ir.Sample` for ``sample
by`` queries. Joins and pipes raise UnsupportedRule. The grammar is ``eql.lark``; the
semantics are Elasticsearch's (not the ``eql`` package's):

* ``<category> where <cond>`` adds ``Match("event.category", (category,), cased=True)``;
  ``any where`` adds nothing.
* ``==`` is case-sensitive and literal (``*`` is just a character); ``!=`` is
  ``And(Exists(f), Not(...))`` (a missing field does not satisfy ``!=``); ``f == null`` is
  ``IsNull(f)`` and ``f != null`` is ``Exists(f)``; numbers and booleans give :class:`Equals`,
  ``< <= > >=`` with a number give :class:`Compare`.
* ``:`` is case-insensitive with ``*``/``?`` wildcards (backslash is a plain character, as in
  ES, where wildcards cannot be escaped); ``like``/``like~`` are wildcard matches, case-sensitive
  / insensitive; list forms become an ``Or``. ``in``/``in~`` are an ``Or`` of literal equalities;
  ``f not in (...)`` is ``And(Exists(f), Not(Or(...)))``, like ``!=``. ``not <cond>`` is
  ``Not``, simplified (``algebra.not_``). And/Or are built by ``algebra.and_``/``or_``.
* ``regex``/``regex~`` use Lucene regular expressions, which are anchored to the whole value.
  They become :class:`Regex` with the pattern translated to RE2 and wrapped as
  ``^(?:...)$``, flags ``"s"`` (Lucene's ``.`` matches newlines) plus ``"i"`` for ``~``.
  Lucene operators RE2 lacks (``~ & # <n-m>``) raise UnsupportedRule.
* Field types (``fieldtypes.py``): equality (``==``, ``:``, ``in``) of an ``ip`` field with an
  IP address is :class:`Cidr` (addresses compare as addresses, whatever their spelling).
* ``?field`` (optional field) reads the field normally: a missing field matches no leaf.
* Strings: ``"..."`` with escapes ``\\t \\b \\f \\n \\r \\" \\' \\\\ \\u{XXXX}``; raw
  ``\"\"\"...\"\"\"``. Single-quoted and ``?"..."`` strings are rejected, as ES does.

Functions. With a plain field as first argument and literal arguments, ``cidrMatch`` becomes
:class:`Cidr` and ``stringContains``/``startsWith``/``endsWith`` (``~`` = case-insensitive)
become :class:`Match`. Everything else is the generic slow path: :class:`Predicate` over
:class:`Call` values. Conventions for the evaluator of ``Call``/``Predicate``:

* ``Call.name`` is the lower-case ES function name; ``Call.cased`` is False for the ``~`` form.
  Arguments are ``FieldValue``/``Literal_``/``Call`` in the ES order. Names emitted:
  ``add subtract multiply divide modulo`` (arithmetic operators too; unary minus on a
  non-literal is ``subtract(0, x)``; integer division truncates), ``between(source, left,
  right[, greedy])``, ``cidrmatch(ip, cidr...)``, ``concat(v...)``, ``endswith(s, suffix)``,
  ``indexof(s, sub[, start])``, ``length(s)``, ``number(s[, base])``, ``startswith(s, prefix)``,
  ``string(v)``, ``stringcontains(s, sub)``, ``substring(s, start[, end])`` (negative indexes
  count from the end).
* A boolean call used as a condition is ``Predicate(call, "==", Literal_(True))``.
* ``Predicate.op`` is ``== != < <= > >=`` (right: one value), ``in`` (right: tuple, exact or
  case-insensitive by ``cased``), ``:``/``like`` (right: tuple of wildcard pattern strings,
  ``*``/``?``), ``regex`` (right: tuple of RE2 patterns already translated and anchored; ``s``
  semantics, ``cased=False`` adds ``i``).
"""

from __future__ import annotations

import ipaddress
import re
from functools import cache
from importlib import resources
from typing import Any

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedInput, VisitError

from ruletag.errors import InvalidRule, RuleError, UnsupportedRule
from ruletag.rules import fieldtypes, functions
from ruletag.rules.algebra import and_, not_, or_, tokens, wildcard_tokens
from ruletag.rules.grammar import error_line, syntax_message
from ruletag.rules.ir import (
    And,
    Call,
    Cidr,
    Compare,
    Const,
    Equals,
    Exists,
    FieldValue,
    IsNull,
    Literal_,
    Match,
    MissingStep,
    Node,
    Not,
    Predicate,
    Regex,
    Sample,
    Sequence,
    Step,
    ValueExpr,
    Wild,
)
from ruletag.rules.regex import compile_re2

CATEGORY_FIELD = "event.category"

#: ES EQL functions (``functions.py`` evaluates them): lower-case name -> (min args, max args
#: or None, accepts ``~``).
FUNCTIONS: dict[str, tuple[int, int | None, bool]] = {
    name: (lo, hi, name in functions.CASE_INSENSITIVE_VARIANTS)
    for name, (lo, hi) in functions.ARITY.items()
}

_ARITH = {"+": "add", "-": "subtract", "*": "multiply", "/": "divide", "%": "modulo"}
_FLIP = {"==": "==", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}
_ESCAPES = {"t": "\t", "b": "\b", "f": "\f", "n": "\n", "r": "\r", '"': '"', "'": "'", "\\": "\\"}
_UNICODE_ESCAPE = re.compile(r"u\{([0-9A-Fa-f]{2,8})\}")
_STATEFUL = {
    "sequence": "EQL sequence: not a single-event query",
    "sample": "EQL sample: not a single-event query",
    "join": "EQL join is not supported",
}


@cache
def _parser() -> Lark:
    grammar = resources.files("ruletag.rules").joinpath("eql.lark").read_text(encoding="utf-8")
    return Lark(grammar, parser="lalr", lexer="contextual", propagate_positions=True)


def parse_eql(query: str, category_field: str = CATEGORY_FIELD) -> Node:
    """Translate one single-event EQL query into an IR condition.

    Raises InvalidRule for syntax errors (``line`` is the line inside ``query``) and
    UnsupportedRule for sequences, samples, joins, pipes and unknown functions.
    """
    result = parse_eql_query(query, category_field, sequences=False)
    assert not isinstance(result, Sequence | Sample)
    return result


def parse_eql_query(
    query: str, category_field: str = CATEGORY_FIELD, *, sequences: bool = True
) -> Node | Sequence | Sample:
    """An IR condition for a single-event query, an IR :class:`Sequence` for a sequence, an IR
    :class:`Sample` for a sample.

    ``category_field``: the field ``<category> where`` tests (the rule's
    ``event_category_override``). The sequence's time fields are the defaults; the caller
    replaces them from the rule.
    """
    try:
        tree = _parser().parse(query)
    except UnexpectedInput as exc:
        raise InvalidRule(syntax_message("EQL", exc), line=error_line(exc, query)) from None
    query_node = tree.children[0]
    assert isinstance(query_node, Tree)
    stateful = query_node.data in _STATEFUL
    if stateful and not (sequences and query_node.data in ("sequence", "sample")):
        raise UnsupportedRule(_STATEFUL[query_node.data], line=_line_of(query_node))
    pipes = tree.children[1:]
    if pipes:
        first = pipes[0]
        assert isinstance(first, Tree)
        raise UnsupportedRule(
            f"EQL pipe '{first.children[0]}' is not supported", line=_line_of(first)
        )
    if stateful and query_node.data == "sample":
        return _sample(query_node, category_field)
    if stateful:
        return _sequence(query_node, category_field)
    return _condition(query_node, category_field)


def _condition(node: Tree, category_field: str) -> Node:
    try:
        result = _Builder(category_field).transform(node)
    except VisitError as exc:
        if isinstance(exc.orig_exc, RuleError):
            raise exc.orig_exc from None
        raise
    assert not isinstance(result, FieldValue | Literal_ | Call)
    return result


#: ``with maxspan`` units, in seconds.
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _sequence(node: Tree, category_field: str) -> Sequence:
    """``sequence [by k..] [with maxspan=N<unit>] [step] [by f..] [with runs=N] ... [until]``."""
    shared: tuple[str, ...] = ()
    maxspan: float | None = None
    steps: list[Step] = []
    missing: list[MissingStep] = []
    until: Step | None = None
    for child in node.children:
        if not isinstance(child, Tree):
            continue
        if child.data == "seq_params":
            first = child.children[0]
            if isinstance(first, Tree) and first.data == "maxspan" and len(child.children) > 1:
                raise InvalidRule(
                    "EQL sequence: 'by' must come before 'with maxspan'", line=_line_of(child)
                )
            for part in child.children:
                if isinstance(part, Tree) and part.data == "join_keys":
                    shared = _join_keys(part)
                elif isinstance(part, Tree) and part.data == "maxspan":
                    maxspan = _maxspan(part)
        elif child.data == "seq_term":
            absent = any(isinstance(c, Token) and c.type == "MISSING" for c in child.children)
            cond, keys, runs = _term(child, category_field)
            if absent:
                if any(isinstance(c, Tree) and c.data == "runs" for c in child.children):
                    raise InvalidRule(
                        "EQL sequence: a missing event ![...] cannot have runs",
                        line=_line_of(child),
                    )
                missing.append(MissingStep(len(steps), Step(cond, shared + keys)))
            else:
                steps.extend([Step(cond, shared + keys)] * runs)
        elif child.data == "until_clause":
            cond, keys, _ = _term(child, category_field)
            until = Step(cond, shared + keys)
    line = _line_of(node)
    if missing and not steps:
        raise InvalidRule("EQL sequence: a sequence needs a positive (not missing) step", line=line)
    if missing and maxspan is None:
        raise InvalidRule(
            "EQL sequence: a sequence with missing events ![...] needs 'with maxspan'", line=line
        )
    if len(steps) + len(missing) < 2:
        raise InvalidRule("EQL sequence: a sequence needs at least two steps", line=line)
    widths = {len(s.keys) for s in steps} | {len(m.step.keys) for m in missing}
    widths |= {len(until.keys)} if until else set()
    if len(widths) > 1:
        raise InvalidRule("EQL sequence: inconsistent number of join keys specified", line=line)
    return Sequence(tuple(steps), maxspan, until, missing=tuple(missing))


def _sample(node: Tree, category_field: str) -> Sample:
    """``sample [by k..] [filter] [by f..] ...``: shared keys first, as for sequences."""
    shared: tuple[str, ...] = ()
    steps: list[Step] = []
    children = [c for c in node.children if isinstance(c, Tree)]
    i = 0
    if children and children[0].data == "join_keys":
        shared = _join_keys(children[0])
        i = 1
    while i < len(children):
        sub = children[i]
        assert sub.data == "subquery"
        inner = sub.children[0]
        assert isinstance(inner, Tree)
        keys: tuple[str, ...] = ()
        if i + 1 < len(children) and children[i + 1].data == "join_keys":
            keys = _join_keys(children[i + 1])
            i += 1
        steps.append(Step(_condition(inner, category_field), shared + keys))
        i += 1
    line = _line_of(node)
    if len(steps) < 2:
        raise InvalidRule("EQL sample: a sample needs at least two filters", line=line)
    if len({len(s.keys) for s in steps}) > 1:
        raise InvalidRule("EQL sample: inconsistent number of join keys specified", line=line)
    return Sample(tuple(steps))


def _term(node: Tree, category_field: str) -> tuple[Node, tuple[str, ...], int]:
    """(condition, own join keys, runs) of a ``seq_term`` or ``until_clause``."""
    cond: Node | None = None
    keys: tuple[str, ...] = ()
    runs = 1
    for part in node.children:
        if not isinstance(part, Tree):
            continue
        if part.data == "subquery":
            inner = part.children[0]
            assert isinstance(inner, Tree)
            cond = _condition(inner, category_field)
        elif part.data == "join_keys":
            keys = _join_keys(part)
        elif part.data == "runs":
            text = str(part.children[0])
            if not text.isdigit() or not 1 <= int(text) <= 100:
                raise InvalidRule(
                    f"EQL sequence: runs must be an integer from 1 to 100, not {text}",
                    line=_line_of(part),
                )
            runs = int(text)
    assert cond is not None
    return cond, keys, runs


def _join_keys(node: Tree) -> tuple[str, ...]:
    """The field names of a ``by`` list; only plain (non-optional) fields are supported."""
    out: list[str] = []
    for expr in node.children:
        if not (isinstance(expr, Tree) and expr.data == "field"):
            raise UnsupportedRule("EQL sequence: join keys must be fields", line=_line_of(node))
        if any(isinstance(c, Token) and c.type == "OPTIONAL" for c in expr.children):
            raise UnsupportedRule(
                "EQL sequence: optional join keys (?field) not supported yet",
                line=_line_of(node),
            )
        qname = expr.children[-1]
        assert isinstance(qname, Tree)
        out.append(_Builder._qname_text(qname.children))
    return tuple(out)


def _maxspan(node: Tree) -> float:
    number = str(node.children[0])
    unit = str(node.children[1]) if len(node.children) > 1 else ""
    if not number.isdigit() or int(number) <= 0:
        raise InvalidRule(
            f"EQL sequence: maxspan must be a positive integer, not {number}",
            line=_line_of(node),
        )
    if unit not in _UNITS:
        raise InvalidRule(
            f"EQL sequence: maxspan unit must be one of ms, s, m, h, d, not {unit!r}",
            line=_line_of(node),
        )
    return int(number) * _UNITS[unit]


def _line_of(node: Tree) -> int:
    return getattr(node.meta, "line", 1) if not node.meta.empty else 1


# --------------------------------------------------------------------------- strings


def decode_string(text: str, line: int | None = None) -> str:
    """The value of an EQL string token (quotes included in ``text``)."""
    if text.startswith('"""'):
        return text[3:-3]
    if text.startswith("?"):
        raise InvalidRule(
            'Use triple double quotes ["""] to define unescaped string literals, not [?]',
            line=line,
        )
    if text.startswith("'"):
        raise InvalidRule(
            "Use double quotes [\"] to define string literals, not single quotes [']", line=line
        )
    body = text[1:-1]
    if "\\" not in body:
        return body
    out: list[str] = []
    i = 0
    while i < len(body):
        ch = body[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        nxt = body[i + 1]
        if nxt in _ESCAPES:
            out.append(_ESCAPES[nxt])
            i += 2
            continue
        m = _UNICODE_ESCAPE.match(body, i + 1)
        if m is None:
            raise InvalidRule(f"EQL string: invalid escape sequence \\{nxt}", line=line)
        code = int(m.group(1), 16)
        if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
            raise InvalidRule(f"EQL string: invalid unicode escape \\{m.group(0)}", line=line)
        out.append(chr(code))
        i = m.end()
    return "".join(out)


# --------------------------------------------------------------------------- regex


_RE2_SPECIAL = set("\\.+*?()|[]{}^$")


def _esc(ch: str) -> str:
    return "\\" + ch if ch in _RE2_SPECIAL else ch


def lucene_to_re2(src: str) -> str:
    """Translate a Lucene regular expression body to RE2 syntax (not yet anchored)."""
    out: list[str] = []
    i, n = 0, len(src)
    while i < n:
        ch = src[i]
        if ch == "\\":
            if i + 1 >= n:
                raise InvalidRule("regex: trailing backslash")
            nxt = src[i + 1]
            out.append("\\" + nxt if nxt in "dDsSwW" else _esc(nxt))
            i += 2
        elif ch == "[":
            j = i + 1
            parts = ["["]
            if j < n and src[j] == "^":
                parts.append("^")
                j += 1
            while j < n and src[j] != "]":
                c = src[j]
                if c == "\\" and j + 1 < n:
                    nxt = src[j + 1]
                    # \d-style classes stay; any other escaped character is literal.
                    literal = nxt.isalnum() and nxt not in "dDsSwW"
                    parts.append(nxt if literal else "\\" + nxt)
                    j += 2
                    continue
                parts.append("\\[" if c == "[" else c)
                j += 1
            if j >= n:
                raise InvalidRule("regex: unterminated character class")
            parts.append("]")
            out.append("".join(parts))
            i = j + 1
        elif ch == '"':
            end = src.find('"', i + 1)
            if end < 0:
                raise InvalidRule("regex: unterminated quoted string")
            out.append("".join(_esc(c) for c in src[i + 1 : end]))
            i = end + 1
        elif ch == "{":
            m = re.match(r"\{(\d+)(,(\d*))?\}", src[i:])
            if m is None:
                raise InvalidRule("regex: malformed repetition")
            out.append(m.group(0))
            i += m.end()
        elif ch == "@":
            out.append(".*")
            i += 1
        elif ch in "~&#<":
            raise UnsupportedRule(f"Lucene regex operator {ch!r} is not supported")
        elif ch in ".()|*+?":
            out.append(ch)
            i += 1
        else:
            out.append(_esc(ch))
            i += 1
    return "".join(out)


def _regex(pattern: str, cased: bool) -> tuple[str, str]:
    """(anchored RE2 pattern, flags) for an EQL regex literal; checks that RE2 compiles it."""
    body = lucene_to_re2(pattern)
    anchored = f"^(?:{body})$"
    flags = "s" if cased else "is"
    try:
        compile_re2(f"(?{flags}){anchored}")
    except Exception as exc:  # re2.error and friends
        raise UnsupportedRule(f"regex not supported by RE2: {pattern!r} ({exc})") from None
    return anchored, flags


# --------------------------------------------------------------------------- IR builder


def _is_value(x: Any) -> bool:
    return isinstance(x, FieldValue | Literal_ | Call)


def _text(v: Literal_) -> str:
    """Canonical text of a literal, as the IR compares non-strings."""
    if isinstance(v.value, bool):
        return "true" if v.value else "false"
    return str(v.value)


def _ip_equal(f: str, text: str) -> Node | None:
    """``Cidr(f, (text,))`` when ``f`` is mapped as ``ip`` and ``text`` an IP address: ES
    compares ip fields as addresses (``::FFFF:1.2.3.4`` equals ``1.2.3.4``), not as text."""
    if fieldtypes.type_of(f) != "ip":
        return None
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return None
    return Cidr(f, (text,))


def _equal_leaf(f: str, v: Literal_, cased: bool) -> Node:
    if v.value is None:
        return IsNull(f)
    if isinstance(v.value, str):
        return _ip_equal(f, v.value) or Match(f, tokens(v.value), cased=cased)
    return Equals(f, v.value)


@v_args(inline=True, meta=True)
class _Builder(Transformer):
    """Bottom-up: value rules return FieldValue/Literal_/Call, boolean rules return Nodes."""

    def __init__(self, category_field: str = CATEGORY_FIELD) -> None:
        super().__init__()
        self.category_field = category_field

    # ---- values

    def string(self, meta: Any, tok: Token) -> Literal_:
        return Literal_(decode_string(str(tok), tok.line))

    def number(self, meta: Any, tok: Token) -> Literal_:
        text = str(tok)
        if re.fullmatch(r"\d+", text):
            return Literal_(int(text))
        return Literal_(float(text))

    def true(self, meta: Any, tok: Token) -> Literal_:
        return Literal_(True)

    def false(self, meta: Any, tok: Token) -> Literal_:
        return Literal_(False)

    def null(self, meta: Any, tok: Token) -> Literal_:
        return Literal_(None)

    def qname(self, meta: Any, *parts: Token) -> str:
        return self._qname_text(parts)

    @staticmethod
    def _qname_text(parts: Any) -> str:
        names = []
        for p in parts:
            s = str(p)
            names.append(s[1:-1].replace("``", "`") if p.type == "QUOTED_NAME" else s)
        return ".".join(names)

    def field(self, meta: Any, *children: Any) -> FieldValue:
        return FieldValue(children[-1])

    def func(self, meta: Any, name: Token, *rest: Any) -> Call:
        insensitive = bool(rest) and isinstance(rest[0], Token) and rest[0].type == "TILDE"
        args = rest[1:] if insensitive else rest
        key = str(name).lower()
        if key not in FUNCTIONS:
            raise UnsupportedRule(f"EQL function {name} is not supported", line=meta.line)
        lo, hi, tilde_ok = FUNCTIONS[key]
        if insensitive and not tilde_ok:
            raise InvalidRule(f"EQL function {name} has no case-insensitive form", line=meta.line)
        if len(args) < lo or (hi is not None and len(args) > hi):
            raise InvalidRule(f"EQL function {name}: wrong number of arguments", line=meta.line)
        for a in args:
            if not _is_value(a):
                raise UnsupportedRule(
                    f"EQL function {name}: boolean arguments are not supported", line=meta.line
                )
        return Call(key, tuple(args), cased=not insensitive)

    def sign(self, meta: Any, op: Token, v: Any) -> ValueExpr:
        v = self._value(v, meta)
        if str(op) == "+":
            return v
        if (
            isinstance(v, Literal_)
            and isinstance(v.value, int | float)
            and not isinstance(v.value, bool)
        ):
            return Literal_(-v.value)
        return Call("subtract", (Literal_(0), v))

    def arith(self, meta: Any, left: Any, op: Token, right: Any) -> Call:
        return Call(_ARITH[str(op)], (self._value(left, meta), self._value(right, meta)))

    def items(self, meta: Any, *xs: Any) -> tuple[ValueExpr, ...]:
        return tuple(self._value(x, meta) for x in xs)

    # ---- conditions

    def compare(self, meta: Any, left: Any, op: Token, right: Any) -> Node:
        lhs, rhs, o = self._value(left, meta), self._value(right, meta), str(op)
        if isinstance(lhs, Literal_) and isinstance(rhs, FieldValue):
            lhs, rhs, o = rhs, lhs, _FLIP[o]
        if not (isinstance(lhs, FieldValue) and isinstance(rhs, Literal_)):
            return Predicate(lhs, o, rhs)
        f, v = lhs.field, rhs.value
        if o in ("==", "!="):
            leaf = _equal_leaf(f, rhs, cased=True)
            if o == "==":
                return leaf
            return Exists(f) if v is None else And((Exists(f), Not(leaf)))
        if v is None:
            return Const(False)
        if isinstance(v, int | float) and not isinstance(v, bool):
            return Compare(f, o, v)  # type: ignore[arg-type]
        return Predicate(lhs, o, rhs)

    def in_(self, meta: Any, left: Any, *rest: Any) -> Node:
        toks = [t for t in rest if isinstance(t, Token)]
        kinds = {t.type for t in toks}
        negated, cased = "NOT" in kinds, "TILDE" not in kinds
        values = [self._value(x, meta) for x in rest if not isinstance(x, Token)]
        lhs = self._value(left, meta)
        if isinstance(lhs, FieldValue) and all(isinstance(v, Literal_) for v in values):
            node = or_(*(_equal_leaf(lhs.field, v, cased) for v in values))  # type: ignore[arg-type]
            return And((Exists(lhs.field), Not(node))) if negated else node
        pred = Predicate(lhs, "in", tuple(values), cased=cased)
        return Not(pred) if negated else pred

    def pattern_op(self, meta: Any, left: Any, *rest: Any) -> Node:
        op = rest[0]
        insensitive = len(rest) == 3
        rhs = rest[-1]
        lhs = self._value(left, meta)
        kind = {"SEQ": ":", "LIKE": "like", "REGEX": "regex"}[op.type]
        cased = kind != ":" and not insensitive
        values = rhs if isinstance(rhs, tuple) else (self._value(rhs, meta),)
        for v in values:
            if not isinstance(v, Literal_):
                raise InvalidRule(f"EQL: the right side of {kind} must be literals", meta.line)
        if kind == "regex":
            pats = []
            for v in values:
                if not isinstance(v.value, str):
                    raise InvalidRule("EQL: regex patterns must be strings", line=meta.line)
                try:
                    pats.append(_regex(v.value, cased))
                except RuleError as exc:
                    exc.line = meta.line
                    raise
            if isinstance(lhs, FieldValue):
                return or_(*(Regex(lhs.field, p, flags) for p, flags in pats))
            return Predicate(lhs, "regex", tuple(Literal_(p) for p, _ in pats), cased=cased)
        texts = [
            v.value if isinstance(v.value, str) else None if v.value is None else _text(v)
            for v in values
        ]
        if isinstance(lhs, FieldValue):
            return or_(
                *(
                    IsNull(lhs.field)
                    if t is None
                    else _ip_equal(lhs.field, t)
                    or Match(lhs.field, wildcard_tokens(t), cased=cased)
                    for t in texts
                )
            )
        return Predicate(lhs, kind, tuple(Literal_(t) for t in texts), cased=cased)

    def not_(self, meta: Any, _tok: Token, arg: Any) -> Node:
        return not_(self._cond(arg, meta))

    def and_test(self, meta: Any, *args: Any) -> Node:
        return and_(*(self._cond(a, meta) for a in args))

    def or_test(self, meta: Any, *args: Any) -> Node:
        return or_(*(self._cond(a, meta) for a in args))

    def category(self, meta: Any, tok: Any) -> str | None:
        if isinstance(tok, Token) and tok.type == "ANY":
            return None
        if isinstance(tok, Token) and tok.type == "STRING":
            return decode_string(str(tok), tok.line)
        return str(tok)

    def event_filter(self, meta: Any, category: str | None, cond: Any) -> Node:
        node = self._cond(cond, meta)
        if category is None:
            return node
        return and_(Match(self.category_field, tokens(category), cased=True), node)

    # ---- helpers

    @staticmethod
    def _value(x: Any, meta: Any) -> ValueExpr:
        if _is_value(x):
            return x
        raise UnsupportedRule(
            "EQL: a boolean condition used as a value is not supported", line=meta.line
        )

    @staticmethod
    def _cond(x: Any, meta: Any) -> Node:
        if not _is_value(x):
            return x
        if isinstance(x, Literal_):
            if isinstance(x.value, bool):
                return Const(x.value)
            if x.value is None:
                return Const(False)
            raise InvalidRule(f"EQL: {x.value!r} is not a condition", line=meta.line)
        if isinstance(x, FieldValue):
            return Equals(x.field, True)
        return _call_condition(x, meta.line)


def _call_condition(call: Call, line: int) -> Node:
    """A boolean function call as a condition: a specialized leaf when possible."""
    args = call.args
    first = args[0] if args else None
    lits = [a.value for a in args[1:] if isinstance(a, Literal_) and isinstance(a.value, str)]
    if isinstance(first, FieldValue) and len(lits) == len(args) - 1:
        field = first.field
        if call.name == "cidrmatch":
            for net in lits:
                try:
                    ipaddress.ip_network(net, strict=False)
                except ValueError:
                    raise InvalidRule(f"cidrMatch: invalid network {net!r}", line=line) from None
            return Cidr(field, tuple(lits))
        if call.name in ("stringcontains", "startswith", "endswith"):
            text = lits[0]
            parts = {
                "stringcontains": (Wild.ANY, text, Wild.ANY),
                "startswith": (text, Wild.ANY),
                "endswith": (Wild.ANY, text),
            }[call.name]
            return Match(field, tokens(*parts), cased=call.cased)
    return Predicate(call, "==", Literal_(True))
