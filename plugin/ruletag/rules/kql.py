"""Kibana Query Language (KQL) to ruletag IR, with Elasticsearch's field-type semantics.

``parse_kql('process.name: "cmd.exe" and not user.name: SYSTEM')`` returns the condition.
The grammar is ``kql.lark`` (Kibana's ``kbn-es-query``): ``field: value``, value lists
``field: (a or b and not c)``, quoted phrases, ``*`` wildcards in unquoted values (``?`` is a
plain character in KQL), ``field: *`` (the field exists), ranges ``< <= > >=``, ``not`` /
``and`` / ``or`` (any case; precedence not > and > or) with parentheses, nested
``field: { sub: value }`` (read as ``field.sub``), escapes and free text (a value without a
field: any field of the record); a ``*`` segment in a field name
stands for the positions of an array (:func:`field_names`).

Kibana builds the Elasticsearch query from the index mapping, so a value means what the field's
type (``fieldtypes.py``) says:

* ``keyword``, ``constant_keyword``, ``wildcard``, ``flattened`` and unknown fields: exact,
  case-sensitive :class:`Match`; an unquoted value with ``*`` is a case-sensitive wildcard
  pattern.
* ``text``, ``match_only_text``: analyzed by the standard analyzer. A quoted value is a
  phrase (its tokens, consecutive, in order); an unquoted one is a ``match`` query (any of its
  tokens); an unquoted wildcard value matches one token. Case-insensitive. Compiled to
  :class:`Regex` over token boundaries (letters, digits and ``_`` form words; ``. ' :``
  between letters and ``. , ;`` between digits join words into one token, as the standard
  tokenizer does; the regexes treat every non-ASCII character as a word character).
* numbers: :class:`Equals` and, for ranges, :class:`Compare`; ``boolean``: ``true`` /
  ``false``; ``ip``: :class:`Cidr` (an address or a CIDR network).
* A multi-field (``process.command_line.text``) reads its parent's value with its own type.
* Ranges on keyword and unknown fields with a number become :class:`Compare`; ranges on dates,
  text and ips, and values of ``date``, ``geo_point``, ``nested`` and ``object`` fields raise
  UnsupportedRule.

Free text matches a whole string value exactly (keywords) or as tokens (text), anywhere in
the record. Other wildcards in field names (``process.*: x``) raise UnsupportedRule.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedInput, VisitError

from ruletag.errors import InvalidRule, RuleError, UnsupportedRule
from ruletag.rules import fieldtypes
from ruletag.rules.algebra import and_, not_, or_, tokens
from ruletag.rules.grammar import error_line, syntax_message
from ruletag.rules.ir import (
    Cidr,
    Compare,
    Const,
    Equals,
    Exists,
    Match,
    Node,
    Or,
    Regex,
    Wild,
)


@cache
def _parser() -> Lark:
    grammar = resources.files("ruletag.rules").joinpath("kql.lark").read_text(encoding="utf-8")
    return Lark(grammar, parser="lalr", propagate_positions=True)


def parse_kql(query: str) -> Node:
    """Translate one KQL query into an IR condition (an empty query matches everything).

    Raises InvalidRule for syntax errors and values the field's type rejects (``line`` is
    the line inside ``query``), UnsupportedRule for what ruletag cannot evaluate.
    """
    try:
        tree = _parser().parse(query)
    except UnexpectedInput as exc:
        raise InvalidRule(syntax_message("KQL", exc), line=error_line(exc, query)) from None
    if not tree.children:
        return Const(True)
    try:
        ast = _Ast().transform(tree.children[0])  # type: ignore[arg-type]
    except VisitError as exc:
        if isinstance(exc.orig_exc, RuleError):
            raise exc.orig_exc from None
        raise
    return _compile(ast, "")


# --------------------------------------------------------------------------- literals


@dataclass(frozen=True, slots=True)
class Lit:
    """A KQL value: its text as tokens (``Wild.ANY`` for an unescaped ``*``), quoted or not."""

    parts: tuple[str | Wild, ...]
    quoted: bool
    line: int = 1

    @property
    def text(self) -> str:
        return "".join(p if isinstance(p, str) else p.value for p in self.parts)

    @property
    def wild(self) -> bool:
        return Wild.ANY in self.parts


_WS_ESCAPES = {"t": "\t", "r": "\r", "n": "\n"}


def _quoted(tok: Token) -> Lit:
    body = str(tok)[1:-1]
    out: list[str] = []
    i = 0
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body):
            nxt = body[i + 1]
            if nxt in '\\"':
                out.append(nxt)
                i += 2
                continue
            if nxt in _WS_ESCAPES:
                out.append(_WS_ESCAPES[nxt])
                i += 2
                continue
        out.append(ch)
        i += 1
    return Lit(tokens("".join(out)), quoted=True, line=tok.line or 1)


_KEYWORD_ESCAPE = re.compile(r"(?i)or|and|not")


def _unquoted(tok: Token) -> Lit:
    s = str(tok)
    parts: list[str | Wild] = []
    i = 0
    while i < len(s):
        ch = s[i]
        if ch == "*":
            parts.append(Wild.ANY)
            i += 1
            continue
        if ch != "\\":
            parts.append(ch)
            i += 1
            continue
        nxt = s[i + 1]
        if nxt in _WS_ESCAPES:
            parts.append(_WS_ESCAPES[nxt])
            i += 2
        elif nxt == "u" and re.fullmatch(r"[0-9A-Fa-f]{4}", s[i + 2 : i + 6]):
            parts.append(chr(int(s[i + 2 : i + 6], 16)))
            i += 6
        elif (m := _KEYWORD_ESCAPE.match(s, i + 1)) is not None and nxt not in '\\():<>"*{}':
            parts.append(m.group(0))
            i = m.end()
        else:
            parts.append(nxt)
            i += 2
    # Kibana trims the value (escaped whitespace included).
    while parts and isinstance(parts[0], str) and parts[0].isspace():
        parts.pop(0)
    while parts and isinstance(parts[-1], str) and parts[-1].isspace():
        parts.pop()
    return Lit(tokens(*parts), quoted=False, line=tok.line or 1)


# --------------------------------------------------------------------------- syntax tree


@v_args(inline=True)
class _Ast(Transformer):
    """Parse tree -> nested tuples: ``("or"|"and", [..])``, ``("not", x)``, ``("nested", f,
    q)``, ``("range", f, op, Lit)``, ``("field", f, values)``, ``("free", Lit)``; a value list
    is ``("vor"|"vand", [..])``, ``("vnot", v)`` or a :class:`Lit`."""

    def value(self, tok: Token) -> Lit:
        return _quoted(tok) if tok.type == "QUOTED" else _unquoted(tok)

    def literal(self, tok: Token) -> Lit:
        return self.value(tok)

    def or_query(self, *xs: Any) -> Any:
        return ("or", [x for x in xs if not isinstance(x, Token)])

    def and_query(self, *xs: Any) -> Any:
        return ("and", [x for x in xs if not isinstance(x, Token)])

    def not_(self, _tok: Token, x: Any) -> Any:
        return ("not", x)

    def nested(self, field: Lit, q: Any) -> Any:
        return ("nested", _field_name(field), q)

    def range(self, field: Lit, op: Token, value: Lit) -> Any:
        return ("range", _field_name(field), str(op), value)

    def field_value(self, field: Lit, values: Any) -> Any:
        return ("field", _field_name(field), values)

    def free_text(self, value: Lit) -> Any:
        return ("free", value)

    def or_values(self, *xs: Any) -> Any:
        items = [x for x in xs if not isinstance(x, Token)]
        return items[0] if len(items) == 1 else ("vor", items)

    def and_values(self, *xs: Any) -> Any:
        items = [x for x in xs if not isinstance(x, Token)]
        return items[0] if len(items) == 1 else ("vand", items)

    def not_values(self, _tok: Token, x: Any) -> Any:
        return ("vnot", x)


#: How many positions a ``*`` segment of a field name stands for (see :func:`field_names`).
STAR_POSITIONS = 5


def _field_name(lit: Lit) -> str:
    if lit.wild:
        segments = lit.text.split(".")
        inner = segments[1:-1]
        if any("*" in s for s in segments if s not in inner) or any(
            "*" in s and s != "*" for s in inner
        ):
            raise UnsupportedRule(f"KQL: wildcard field name {lit.text!r}", line=lit.line)
    return lit.text


def field_names(field: str) -> list[str]:
    """The record fields a KQL field name stands for.

    Kibana expands a wildcard field name over the index mapping. The corpus uses it for
    arrays of objects that integrations index by position (``target_resources.*.type``,
    mapped as ``target_resources.0.type``, ``target_resources.1.type`` ...): a ``*`` segment
    stands for the array itself (searched element-wise, the shape of the source log) and for
    positions ``0`` .. ``STAR_POSITIONS - 1``.
    """
    if "*" not in field:
        return [field]
    out = [""]
    for seg in field.split("."):
        options = ["", *map(str, range(STAR_POSITIONS))] if seg == "*" else [seg]
        out = [f"{o}.{x}" if o and x else o or x for o in out for x in options]
    return out


# --------------------------------------------------------------------------- compiling


def _compile(ast: Any, prefix: str) -> Node:
    kind = ast[0]
    if kind == "or":
        return or_(*(_compile(a, prefix) for a in ast[1]))
    if kind == "and":
        return and_(*(_compile(a, prefix) for a in ast[1]))
    if kind == "not":
        return not_(_compile(ast[1], prefix))
    if kind == "nested":
        return _compile(ast[2], prefix + ast[1] + ".")
    if kind == "range":
        return or_(*(range_leaf(f, ast[2], ast[3]) for f in field_names(prefix + ast[1])))
    if kind == "field":
        return or_(*(_values(f, ast[2]) for f in field_names(prefix + ast[1])))
    assert kind == "free"
    return free_text(ast[1])


def _values(field: str, v: Any) -> Node:
    if isinstance(v, Lit):
        return value_leaf(field, v)
    kind, arg = v
    if kind == "vor":
        return _merge_cidrs(or_(*(_values(field, a) for a in arg)))
    if kind == "vand":
        return and_(*(_values(field, a) for a in arg))
    assert kind == "vnot"
    return not_(_values(field, arg))


def _merge_cidrs(node: Node) -> Node:
    """``Or`` of several :class:`Cidr` leaves of one field as one leaf (one range lookup)."""
    if not isinstance(node, Or):
        return node
    nets: dict[str, list[str]] = {}
    rest: list[Node] = []
    for a in node.args:
        if isinstance(a, Cidr):
            nets.setdefault(a.field, []).extend(a.networks)
        else:
            rest.append(a)
    return or_(*rest, *(Cidr(f, tuple(n)) for f, n in nets.items()))


_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def _number(text: str) -> int | float | None:
    text = text.strip()
    if not _NUMBER.fullmatch(text):
        return None
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    return float(text)


def value_leaf(field: str, v: Lit) -> Node:
    """``field: value`` by the field's Elasticsearch type."""
    ftype = fieldtypes.type_of(field)
    field = fieldtypes.source_of(field)
    if not v.quoted and v.parts == (Wild.ANY,):
        return Exists(field)
    if ftype in fieldtypes.TEXT_TYPES:
        return text_leaf(field, v)
    if ftype in fieldtypes.NUMBER_TYPES:
        n = None if v.wild and not v.quoted else _number(v.text)
        if n is None:
            raise InvalidRule(
                f"KQL: {field} is a {ftype} field, {v.text!r} is not a number", line=v.line
            )
        return Equals(field, n)
    if ftype == "boolean":
        if v.text not in ("true", "false"):
            raise InvalidRule(f"KQL: {field} is a boolean field, {v.text!r} is not", line=v.line)
        return Equals(field, v.text == "true")
    if ftype == "ip":
        if v.wild and not v.quoted:
            raise UnsupportedRule(f"KQL: wildcard value on ip field {field}", line=v.line)
        try:
            ipaddress.ip_network(v.text, strict=False)
        except ValueError:
            raise InvalidRule(
                f"KQL: {field} is an ip field, {v.text!r} is not", line=v.line
            ) from None
        return Cidr(field, (v.text,))
    if ftype not in fieldtypes.KEYWORD_TYPES:
        raise UnsupportedRule(
            f"KQL: values of {ftype} fields ({field}) are not supported", line=v.line
        )
    if v.quoted:
        return Match(field, tokens(v.text), cased=True)
    return Match(field, v.parts, cased=True)


def range_leaf(field: str, op: str, v: Lit) -> Node:
    """``field < value`` and friends: numeric comparisons only."""
    ftype = fieldtypes.type_of(field)
    field = fieldtypes.source_of(field)
    n = None if v.wild and not v.quoted else _number(v.text)
    numeric = ftype in fieldtypes.NUMBER_TYPES or ftype in fieldtypes.KEYWORD_TYPES
    if not numeric:
        raise UnsupportedRule(f"KQL: range on {ftype} field {field}", line=v.line)
    if n is None:
        if ftype in fieldtypes.NUMBER_TYPES:
            raise InvalidRule(
                f"KQL: {field} is a {ftype} field, {v.text!r} is not a number", line=v.line
            )
        raise UnsupportedRule(f"KQL: range on {ftype} field {field} with a string", line=v.line)
    return Compare(field, op, n)  # type: ignore[arg-type]


def free_text(v: Lit) -> Node:
    """A value without a field: some string of the record matches it as a keyword or as text."""
    if not v.quoted and v.parts == (Wild.ANY,):
        return Const(True)
    exact = Match(None, tokens(v.text) if v.quoted else v.parts, cased=True)
    return or_(exact, _text_node(None, v))


# --------------------------------------------------------------------------- analyzed text

#: Character classes of the token-boundary regexes, written with ASCII ranges only: Hyperscan
#: compiles Unicode property classes (``\pL``) orders of magnitude slower. Non-word characters
#: are the ASCII ones other than letters, digits and ``_`` (every non-ASCII character counts as
#: a word character, right for letters); joiners ``' , . : ;`` make one token of the words
#: around them; hard separators are the other non-word characters.
_N = r"[\x00-\x2f\x3a-\x40\x5b-\x5e\x60\x7b-\x7f]"
_JOIN = r"[\x27\x2c\x2e\x3a\x3b]"
_H = r"[\x00-\x26\x28-\x2b\x2d\x2f\x3c-\x40\x5b-\x5e\x60\x7b-\x7f]"
_PRE = rf"(?:^{_JOIN}?|{_H}|{_N}{_N})"
_POST = rf"(?:{_JOIN}?$|{_H}|{_N}{_N})"
_SEP = rf"(?:{_N}{_N}+|{_H})"
_TOKEN_CHARS = r"[^\x00-\x26\x28-\x2b\x2d\x2f\x3c-\x40\x5b-\x5e\x60\x7b-\x7f]"
_TOKEN = re.compile(r"\w+(?:(?:(?<=[^\W\d_])[:.'](?=[^\W\d_])|(?<=\d)[.,;'](?=\d))\w+)*")
_RE2_PUNCT = set(r"\.+*?()|[]{}^$-#&~/")


def analyze(text: str) -> list[str]:
    """The tokens the standard analyzer makes of ``text`` (lower-cased)."""
    return [m.group(0).lower() for m in _TOKEN.finditer(text)]


def _esc(s: str) -> str:
    return "".join("\\" + c if c in _RE2_PUNCT else c for c in s)


def phrase_regex(words: list[str]) -> str:
    """RE2 pattern (flags ``is``): the token sequence ``words`` appears in the value."""
    return _PRE + _SEP.join(_esc(w) for w in words) + _POST


#: The most alternatives a fuzzy term may expand to before it is refused.
MAX_FUZZY_VARIANTS = 4096


def _edits(
    term: tuple[str | None, ...], prefix: int, transpositions: bool
) -> Iterator[tuple[str | None, ...]]:
    """Every token sequence one edit from ``term`` (None: any one character), the first
    ``prefix`` characters kept."""
    n = len(term)
    for i in range(prefix, n):
        yield (*term[:i], None, *term[i + 1 :])  # substitution
        yield term[:i] + term[i + 1 :]  # deletion
    for i in range(prefix, n + 1):
        yield (*term[:i], None, *term[i:])  # insertion
    if transpositions:
        for i in range(prefix, n - 1):
            if term[i] != term[i + 1]:
                yield (*term[:i], term[i + 1], term[i], *term[i + 2 :])


def fuzzy_regex(
    term: str, edits: int, *, prefix: int = 0, transpositions: bool = True, any_char: str = "."
) -> str | None:
    """RE2 alternation (unanchored, no flags of its own) of every string within ``edits``
    insertions, deletions, substitutions and (``transpositions``) swaps of adjacent
    characters of ``term``, as Lucene's fuzzy query counts them; ``any_char``: the class a
    changed character may take. None when the alternatives would be more than
    :data:`MAX_FUZZY_VARIANTS`."""
    found: set[tuple[str | None, ...]] = {tuple(term)}
    frontier = set(found)
    for _ in range(edits):
        nxt: set[tuple[str | None, ...]] = set()
        for t in frontier:
            nxt.update(_edits(t, prefix, transpositions))
        nxt -= found
        found |= nxt
        frontier = nxt
        if len(found) > MAX_FUZZY_VARIANTS:
            return None
    alts = sorted("".join(any_char if c is None else _esc(c) for c in t) for t in found)
    return "(?:" + "|".join(alts) + ")"


def fuzzy_text_regex(
    word: str, edits: int, *, prefix: int = 0, transpositions: bool = True
) -> str | None:
    """RE2 pattern (flags ``is``): one token of the value is within ``edits`` of ``word``."""
    body = fuzzy_regex(
        word, edits, prefix=prefix, transpositions=transpositions, any_char=_TOKEN_CHARS
    )
    return None if body is None else _PRE + body + _POST


def text_leaf(field: str, v: Lit) -> Node:
    """``field: value`` on an analyzed (``text``) field."""
    return _text_node(fieldtypes.source_of(field), v)


def _text_node(field: str | None, v: Lit) -> Node:
    if v.quoted or not v.wild:
        words = analyze(v.text)
        if not words:
            return Const(False)
        if v.quoted:
            return Regex(field, phrase_regex(words), "is")
        return or_(*(Regex(field, phrase_regex([w]), "is") for w in words))
    # A wildcard term matches single tokens, its text lower-cased, never analyzed further.
    body = "".join(_esc(p.lower()) if isinstance(p, str) else f"{_TOKEN_CHARS}*" for p in v.parts)
    return Regex(field, _PRE + body + _POST, "is")


# --------------------------------------------------------------------------- rule filters


def filters_condition(filters: object, line: int | None = None) -> Node:
    """The conjunction of a rule's ``[[rule.filters]]`` (Kibana filter objects).

    Each filter is ``{"meta": {...}, "query": <Elasticsearch query DSL>}`` (or the DSL at top
    level, as older exports write ``exists``/``range``); ``meta.negate`` negates it and
    ``meta.disabled`` drops it. The DSL queries understood are ``bool`` (``must``, ``filter``,
    ``should`` with ``minimum_should_match`` 0 or 1, ``must_not``), ``match_phrase``,
    ``match``, ``term``, ``terms``, ``wildcard`` (``*``, ``?``, ``\\`` escapes,
    ``case_insensitive``), ``prefix``, ``exists``, ``range`` and ``match_all``; any other
    raises UnsupportedRule naming it.
    """
    if filters is None:
        return Const(True)
    if not isinstance(filters, list):
        raise InvalidRule("rule.filters must be an array of tables", line=line)
    out: list[Node] = []
    for f in filters:
        if not isinstance(f, dict):
            raise InvalidRule("rule.filters: each filter must be a table", line=line)
        meta = f.get("meta") or {}
        if not isinstance(meta, dict):
            raise InvalidRule("rule.filters: meta must be a table", line=line)
        if meta.get("disabled") is True:
            continue
        dsl = f.get("query") if "query" in f else {k: v for k, v in f.items() if k != "meta"}
        node = dsl_node(dsl, line)
        out.append(not_(node) if meta.get("negate") is True else node)
    return and_(*out)


def _one(kind: str, body: object, line: int | None) -> tuple[str, Any]:
    if not isinstance(body, dict) or len(body) != 1:
        raise UnsupportedRule(f"rule filter: {kind} query must name one field", line=line)
    ((field, spec),) = body.items()
    return str(field), spec


def dsl_node(dsl: object, line: int | None = None) -> Node:
    """One Elasticsearch query DSL object (the subset filters use) as an IR condition."""
    if not isinstance(dsl, dict) or len(dsl) != 1:
        raise UnsupportedRule("rule filter: query must be one DSL clause", line=line)
    ((kind, body),) = dsl.items()
    if kind == "match_all":
        return Const(True)
    if kind == "bool":
        return _bool_node(body, line)
    if kind == "exists":
        if not isinstance(body, dict) or not isinstance(body.get("field"), str):
            raise InvalidRule("rule filter: exists needs a field", line=line)
        return Exists(body["field"])
    if kind in ("match_phrase", "match", "term"):
        field, spec = _one(kind, body, line)
        key = "value" if kind == "term" else "query"
        value = spec.get(key) if isinstance(spec, dict) else spec
        cased = not (isinstance(spec, dict) and spec.get("case_insensitive") is True)
        return _dsl_value(kind, field, value, cased, line)
    if kind == "terms":
        if not isinstance(body, dict):
            raise InvalidRule("rule filter: terms must be a table", line=line)
        fields = [(k, v) for k, v in body.items() if k != "boost"]
        if len(fields) != 1 or not isinstance(fields[0][1], list):
            raise UnsupportedRule("rule filter: terms must name one field and a list", line=line)
        field, values = fields[0]
        return or_(*(_dsl_value("term", field, v, True, line) for v in values))
    if kind in ("wildcard", "prefix"):
        field, spec = _one(kind, body, line)
        value = spec.get("value", spec.get("wildcard")) if isinstance(spec, dict) else spec
        if not isinstance(value, str):
            raise InvalidRule(f"rule filter: {kind} value must be a string", line=line)
        cased = not (isinstance(spec, dict) and spec.get("case_insensitive") is True)
        parts = _es_wildcard(value) if kind == "wildcard" else (value, Wild.ANY)
        return Match(field, tokens(*parts), cased=cased)
    if kind == "range":
        field, spec = _one(kind, body, line)
        ops = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
        if not isinstance(spec, dict) or not spec or any(k not in ops for k in spec):
            raise UnsupportedRule("rule filter: range supports gt, gte, lt, lte only", line=line)
        leaves: list[Node] = []
        for k, v in spec.items():
            n = v if isinstance(v, int | float) and not isinstance(v, bool) else _number(str(v))
            if n is None:
                raise UnsupportedRule(f"rule filter: non-numeric range on {field}", line=line)
            leaves.append(Compare(field, ops[k], n))  # type: ignore[arg-type]
        return and_(*leaves)
    raise UnsupportedRule(f"rule filter: {kind} query is not supported", line=line)


def _bool_node(body: object, line: int | None) -> Node:
    if not isinstance(body, dict):
        raise InvalidRule("rule filter: bool must be a table", line=line)
    known = {"must", "filter", "should", "must_not", "minimum_should_match", "boost"}
    if extra := set(body) - known:
        raise UnsupportedRule(f"rule filter: bool {sorted(extra)[0]} is not supported", line=line)

    def clauses(key: str) -> list[Node]:
        v = body.get(key)
        items = v if isinstance(v, list) else [] if v is None else [v]
        return [dsl_node(x, line) for x in items]

    must = clauses("must") + clauses("filter")
    should = clauses("should")
    msm = body.get("minimum_should_match", 0 if must else 1)
    if msm not in (0, 1, "0", "1"):
        raise UnsupportedRule("rule filter: bool minimum_should_match above 1", line=line)
    parts = list(must)
    if should and str(msm) == "1":
        parts.append(or_(*should))
    parts.extend(not_(x) for x in clauses("must_not"))
    return and_(*parts)


def _dsl_value(kind: str, field: str, value: object, cased: bool, line: int | None) -> Node:
    if isinstance(value, bool) or (isinstance(value, int | float) and kind != "match_phrase"):
        if fieldtypes.type_of(field) in fieldtypes.KEYWORD_TYPES:
            text = str(value).lower() if isinstance(value, bool) else str(value)
            return Match(field, tokens(text), cased=True)
        return Equals(field, value)
    if not isinstance(value, str | int | float):
        raise UnsupportedRule(f"rule filter: {kind} on {field} needs a scalar", line=line)
    text = str(value)
    if kind != "term" and fieldtypes.type_of(field) in fieldtypes.TEXT_TYPES:
        lit = Lit(tokens(text), quoted=kind == "match_phrase", line=line or 1)
        return text_leaf(field, lit)
    if not cased:
        return Match(field, tokens(text), cased=False)
    return value_leaf(field, Lit(tokens(text), quoted=True, line=line or 1))


def _es_wildcard(value: str) -> list[str | Wild]:
    """An Elasticsearch ``wildcard`` query value: ``*``, ``?`` and ``\\`` escapes."""
    parts: list[str | Wild] = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "\\" and i + 1 < len(value):
            parts.append(value[i + 1])
            i += 2
            continue
        parts.append(Wild.ANY if ch == "*" else Wild.ONE if ch == "?" else ch)
        i += 1
    return parts
