"""Elasticsearch ES|QL single-event queries to ruletag IR.

``parse_esql(query)`` returns an :class:`EsqlQuery`: the condition (the conjunction of every
``WHERE``) and the ``FROM`` index patterns. The query is split into commands at top-level
pipes; ``esql.lark`` parses the commands this module evaluates:

* ``FROM`` (index patterns kept; ``METADATA`` ignored), ``WHERE``, ``EVAL`` (the computed
  column is substituted into later commands), ``RENAME``, ``KEEP``/``DROP`` (a later use of a
  removed column is an error, as in ES), ``SORT`` (no effect on one event), ``LIMIT n``
  (``LIMIT 0`` never fires; any other limit keeps the one event).
* ``DISSECT`` (Elasticsearch's delimiter algorithm, ``javaregex.dissect``; no ``+ / * &``
  modifiers, no ``APPEND_SEPARATOR``) and ``GROK`` (the patterns ``javaregex.grok_to_python``
  translates exactly): each column they define is a :class:`Call` (``dissect``/``grok``), null
  when the pattern does not match, like ES.
* Commands that aggregate or read other data raise UnsupportedRule naming the command
  (``STATS``, ``INLINE STATS``, ``LOOKUP JOIN``, ``ENRICH`` are "stateful"); so do the
  other commands (``MV_EXPAND``, ...), by name. ``esql_stats.py`` turns ``STATS`` queries into
  aggregations, running the commands around ``STATS`` with :func:`run_commands`.
* Time-span literals (``5 minutes``) are text values for ``DATE_TRUNC``; ``NOW()`` is refused
  here (it is the time of the query) and read from a row column after ``STATS``.

Three-valued logic. ES|QL keeps a row when the ``WHERE`` condition is true; a comparison with
a null operand (a missing field) is null, ``NOT null`` is null, ``null AND false`` is false,
``null OR true`` is true. Every boolean expression is compiled to a pair of IR conditions
``(is true, is false)``, so ``NOT (x == "a")`` is "x present and not "a"" and a missing
``x`` matches neither. Multi-valued fields: ES|QL makes a comparison on one null (with a
warning); here a leaf is true when any value satisfies it and false when the field is present
and none does (the EQL and KQL reading), so a rule can fire on a multi-valued record that
ES|QL would drop.

Leaves. ``==``/``!=``/``IN`` on a field and literals are :class:`Match` (case-sensitive) or
:class:`Equals`; ``< <= > >=`` with a number :class:`Compare`; ``LIKE`` (``*``/``?``, ``\\``
escapes ``*``, ``?`` or itself, case-sensitive, whole value) :class:`Match`; ``RLIKE`` (Lucene
regex, whole value) :class:`Regex`, translated as EQL's ``regex`` (a top-level intersection
``A&B`` is two regexes ANDed; a nested one with a literal operand is that literal or
nothing); ``IS [NOT] NULL``
:class:`IsNull`/:class:`Exists`; ``CIDR_MATCH`` :class:`Cidr`; ``STARTS_WITH``/``ENDS_WITH``
:class:`Match`. ``TO_LOWER(f)`` compared with lower-case literals is a case-insensitive
:class:`Match`. Anything else computed is a :class:`Predicate` over :class:`Call` values
(``functions.py``: ``length``, ``locate``, ``esql_substring``, ``replace``, ``to_lower``,
``to_upper``, ``concat``, ``coalesce``, ``trim``, ``to_double``, ``to_ip``, ``url_decode``,
``from_base64``, ``date_trunc``, ``date_diff``, arithmetic; ``JSON_EXTRACT(_source,
"$.a.b")`` reads the field ``a.b``, so an object value is null here where ES gives its JSON
text). ``CASE`` in a
comparison or as a condition is expanded branch by branch (a null condition takes the next
branch).
Full text: ``field : "text"`` and ``MATCH(field, "text")`` are Elasticsearch's ``match``
query by the field's type (``fieldtypes``: analyzed tokens on text fields, one exact term
otherwise, as KQL builds its leaves); ``KQL("...")`` is compiled by ``kql.py``. A Lucene query
is never null, so their false branch is the plain negation.
Functions, operators and types outside this list raise UnsupportedRule with their name; an
``EVAL`` column no ``WHERE`` reads is never evaluated, so its functions do not matter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import re2
from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedInput, VisitError

from ruletag.errors import InvalidRule, RuleError, UnsupportedRule
from ruletag.rules import fieldtypes
from ruletag.rules.algebra import and_, not_, or_, tokens
from ruletag.rules.eql import _regex as lucene_regex
from ruletag.rules.grammar import syntax_message
from ruletag.rules.ir import (
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
    Node,
    Predicate,
    Regex,
    ValueExpr,
    Wild,
)
from ruletag.rules.ir import (
    Token as PatternToken,
)
from ruletag.rules.javaregex import compile_java, dissect_spec, grok_to_python, java_replacement
from ruletag.rules.kql import (
    Lit,
    analyze,
    fuzzy_regex,
    fuzzy_text_regex,
    parse_kql,
    phrase_regex,
    value_leaf,
)

_STATEFUL = {
    "STATS": "ES|QL STATS aggregates over many events (stateful)",
    "INLINESTATS": "ES|QL INLINE STATS aggregates over many events (stateful)",
    "INLINE STATS": "ES|QL INLINE STATS aggregates over many events (stateful)",
    "LOOKUP JOIN": "ES|QL LOOKUP JOIN reads another index (stateful)",
    "ENRICH": "ES|QL ENRICH reads an enrich index (stateful)",
    "FORK": "ES|QL FORK runs several pipelines (stateful)",
    "CHANGE_POINT": "ES|QL CHANGE_POINT compares many events (stateful)",
}
_SOURCES = {"FROM", "ROW", "SHOW", "TS"}
_COMMANDS = {"WHERE", "EVAL", "KEEP", "DROP", "LIMIT", "SORT", "RENAME", "DISSECT", "GROK"}
_FULL_TEXT = "needs the field's analyzer (full-text search is not supported)"
#: ``_ignored`` lists the fields Elasticsearch dropped while indexing (``ignore_above``,
#: malformed values): index-time metadata that records on a stream never carry.
_IGNORED = "ES|QL MV_EXPAND _ignored: index-time metadata that stream records do not have"


@dataclass(frozen=True, slots=True)
class EsqlQuery:
    """A translated single-event ES|QL query."""

    condition: Node
    indices: tuple[str, ...]


@cache
def _parser() -> Lark:
    grammar = resources.files("ruletag.rules").joinpath("esql.lark").read_text(encoding="utf-8")
    return Lark(
        grammar,
        parser="lalr",
        lexer="contextual",
        propagate_positions=True,
        start=[
            "where_cmd",
            "eval_cmd",
            "names_cmd",
            "rename_cmd",
            "limit_cmd",
            "sort_cmd",
            "dissect_cmd",
            "grok_cmd",
        ],
    )


# --------------------------------------------------------------------------- pipes


@dataclass(frozen=True, slots=True)
class _Command:
    name: str  # upper case, "INLINE STATS" / "LOOKUP JOIN" with one space
    body: str  # text after the command word(s)
    line: int  # 1-based line of the command word in the query


def split_commands(query: str) -> list[_Command]:
    """The query's commands, split at pipes outside strings, quoted names and comments."""
    pieces: list[tuple[str, int]] = []
    start, i, n = 0, 0, len(query)
    while i < n:
        if query.startswith('"""', i):
            end = query.find('"""', i + 3)
            if end < 0:
                raise InvalidRule("ES|QL syntax error: unterminated string", line=_line(query, i))
            i = end + 3
            while i < n and query[i] == '"':
                i += 1
        elif query[i] == '"':
            m = re.compile(r'"(?:\\.|[^"\\\r\n])*"').match(query, i)
            if m is None:
                raise InvalidRule("ES|QL syntax error: unterminated string", line=_line(query, i))
            i = m.end()
        elif query[i] == "`":
            end = query.find("`", i + 1)
            while end >= 0 and query.startswith("``", end):
                end = query.find("`", end + 2)
            if end < 0:
                raise InvalidRule(
                    "ES|QL syntax error: unterminated quoted name", line=_line(query, i)
                )
            i = end + 1
        elif query.startswith("//", i):
            end = query.find("\n", i)
            i = n if end < 0 else end
        elif query.startswith("/*", i):
            end = query.find("*/", i + 2)
            if end < 0:
                raise InvalidRule("ES|QL syntax error: unterminated comment", line=_line(query, i))
            i = end + 2
        elif query[i] == "|":
            pieces.append((query[start:i], start))
            i += 1
            start = i
        else:
            i += 1
    pieces.append((query[start:], start))
    out: list[_Command] = []
    for text, offset in pieces:
        skip = _skip_blank(text)
        m = re.match(r"(?i)(inline\s+stats|lookup\s+join|[a-z_]+)", text[skip:])
        if m is None:
            raise InvalidRule("ES|QL syntax error: empty command", line=_line(query, offset))
        name = re.sub(r"\s+", " ", m.group(1)).upper()
        body = text[skip + m.end() :]
        out.append(_Command(name, body, _line(query, offset + skip)))
    return out


def _skip_blank(text: str) -> int:
    """Index of the first character that is not white space or a comment."""
    m = re.match(r"(?:\s+|//[^\n]*|/\*[\s\S]*?\*/)*", text)
    return m.end() if m else 0


def _line(query: str, offset: int) -> int:
    return query.count("\n", 0, offset) + 1


def _from_indices(body: str, line: int) -> tuple[str, ...]:
    text = re.sub(r"//[^\n]*|/\*[\s\S]*?\*/", " ", body)
    text = re.split(r"(?i)\bmetadata\b", text, maxsplit=1)[0]
    names = tuple(p.strip().strip('"') for p in text.split(",") if p.strip())
    if not names:
        raise InvalidRule("ES|QL FROM needs an index pattern", line=line)
    return names


# --------------------------------------------------------------------------- AST


@dataclass(frozen=True, slots=True)
class _Field:
    name: str


@dataclass(frozen=True, slots=True)
class _Lit:
    value: str | int | float | bool | None


@dataclass(frozen=True, slots=True)
class _Fn:
    name: str  # upper case ES|QL name, or an operator / cast spelled like one
    args: tuple[Any, ...]
    line: int


@dataclass(frozen=True, slots=True)
class _Op:
    """A boolean expression: kind in and, or, not, cmp, in, like, rlike, isnull, match."""

    kind: str
    args: tuple[Any, ...]
    line: int


_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", '"': '"', "\\": "\\"}


def decode_string(text: str, line: int | None = None) -> str:
    """The value of an ES|QL string token (quotes included)."""
    if text.startswith('"""'):
        return text[3:-3]
    body = text[1:-1]
    out: list[str] = []
    i = 0
    while i < len(body):
        ch = body[i]
        if ch == "\\":
            nxt = body[i + 1]
            if nxt not in _ESCAPES:
                raise InvalidRule(f"ES|QL string: invalid escape sequence \\{nxt}", line=line)
            out.append(_ESCAPES[nxt])
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _unquote(name: str) -> str:
    if name.startswith("`"):
        return name[1:-1].replace("``", "`")
    return name


@v_args(inline=True, meta=True)
class _Ast(Transformer):
    def string(self, meta: Any, tok: Token) -> _Lit:
        return _Lit(decode_string(str(tok), tok.line))

    def integer(self, meta: Any, tok: Token) -> _Lit:
        return _Lit(int(str(tok)))

    def timespan(self, meta: Any, tok: Token, unit: Token) -> _Fn:
        return _Fn("\0SPAN", (_Lit(int(str(tok))), _Lit(str(unit).lower())), meta.line)

    def decimal(self, meta: Any, tok: Token) -> _Lit:
        return _Lit(float(str(tok)))

    def true(self, meta: Any, tok: Token) -> _Lit:
        return _Lit(True)

    def false(self, meta: Any, tok: Token) -> _Lit:
        return _Lit(False)

    def null(self, meta: Any, tok: Token) -> _Lit:
        return _Lit(None)

    def qname(self, meta: Any, *parts: Token) -> str:
        return ".".join(_unquote(str(p)) for p in parts)

    def field(self, meta: Any, name: str) -> _Field:
        return _Field(name)

    def star(self, meta: Any, tok: Token) -> _Lit:
        return _Lit("*")

    def func(self, meta: Any, name: Token, *args: Any) -> _Fn:
        return _Fn(str(name).upper(), args, meta.line)

    def mapping(self, meta: Any, *entries: Any) -> _Fn:
        return _Fn("{map}", entries, meta.line)

    def entry(self, meta: Any, key: Token, value: Any) -> tuple[str, Any]:
        return (decode_string(str(key)), value)

    def array(self, meta: Any, *items: Any) -> _Fn:
        return _Fn("[array]", items, meta.line)

    def sign(self, meta: Any, op: Token, v: Any) -> Any:
        if str(op) == "+":
            return v
        if (
            isinstance(v, _Lit)
            and isinstance(v.value, int | float)
            and not isinstance(v.value, bool)
        ):
            return _Lit(-v.value)
        return _Fn("-", (_Lit(0), v), meta.line)

    def arith(self, meta: Any, left: Any, op: Token, right: Any) -> _Fn:
        return _Fn(str(op), (left, right), meta.line)

    def cast(self, meta: Any, v: Any, type_: Token) -> _Fn:
        return _Fn("::" + str(type_).upper(), (v,), meta.line)

    def items(self, meta: Any, *xs: Any) -> tuple[Any, ...]:
        return xs

    def compare(self, meta: Any, left: Any, op: Token, right: Any) -> _Op:
        return _Op("cmp", (str(op), left, right), meta.line)

    def in_(self, meta: Any, left: Any, *rest: Any) -> _Op:
        negated = bool(rest) and isinstance(rest[0], Token) and rest[0].type == "NOT"
        values = tuple(x for x in rest if not (isinstance(x, Token) and x.type in ("NOT", "IN")))
        op = _Op("in", (left, values), meta.line)
        return _Op("not", (op,), meta.line) if negated else op

    def _pattern(self, kind: str, meta: Any, left: Any, rest: tuple[Any, ...]) -> _Op:
        negated = any(isinstance(x, Token) and x.type == "NOT" for x in rest)
        rhs = rest[-1]
        pats = rhs if isinstance(rhs, tuple) else (rhs,)
        op = _Op(kind, (left, pats), meta.line)
        return _Op("not", (op,), meta.line) if negated else op

    def like(self, meta: Any, left: Any, *rest: Any) -> _Op:
        return self._pattern("like", meta, left, rest)

    def rlike(self, meta: Any, left: Any, *rest: Any) -> _Op:
        return self._pattern("rlike", meta, left, rest)

    def is_null(self, meta: Any, value: Any, *toks: Token) -> _Op:
        op = _Op("isnull", (value,), meta.line)
        if any(t.type == "NOT" for t in toks):
            return _Op("not", (op,), meta.line)
        return op

    def match_op(self, meta: Any, left: Any, right: Any) -> _Op:
        return _Op("match", (left, right), meta.line)

    def not_(self, meta: Any, _tok: Token, arg: Any) -> _Op:
        return _Op("not", (arg,), meta.line)

    def and_test(self, meta: Any, *args: Any) -> _Op:
        return _Op("and", tuple(a for a in args if not isinstance(a, Token)), meta.line)

    def or_test(self, meta: Any, *args: Any) -> _Op:
        return _Op("or", tuple(a for a in args if not isinstance(a, Token)), meta.line)

    # ---- commands

    def where_cmd(self, meta: Any, expr: Any) -> Any:
        return expr

    def eval_cmd(self, meta: Any, *assigns: Any) -> list[tuple[str, Any]]:
        return list(assigns)

    def assign(self, meta: Any, name: str, expr: Any) -> tuple[str, Any]:
        return (name, expr)

    def assign_unnamed(self, meta: Any, expr: Any) -> tuple[str, Any]:
        # ES names the column after the expression's text; no later command can name it
        # in a way we would resolve, so it is kept under a name nothing refers to.
        return ("\0unnamed", expr)

    def names_cmd(self, meta: Any, *names: str) -> list[str]:
        return list(names)

    def name_pattern(self, meta: Any, tok: Token) -> str:
        return ".".join(_unquote(p) for p in re.findall(r"`(?:[^`]|``)*`|[^.`]+", str(tok)))

    def rename_cmd(self, meta: Any, *pairs: Any) -> list[tuple[str, str]]:
        return list(pairs)

    def rename(self, meta: Any, old: str, _as: Token, new: str) -> tuple[str, str]:
        return (old, new)

    def rename_assign(self, meta: Any, new: str, old: str) -> tuple[str, str]:
        return (old, new)

    def limit_cmd(self, meta: Any, tok: Token) -> int:
        return int(str(tok))

    def sort_cmd(self, meta: Any, *keys: Any) -> None:
        return None

    def sort_key(self, meta: Any, *args: Any) -> None:
        return None

    def dissect_cmd(self, meta: Any, source: Any, pattern: Token, *option: Token) -> Any:
        if option:
            raise UnsupportedRule(f"ES|QL DISSECT option {option[0]} is not supported", meta.line)
        return source, decode_string(str(pattern), pattern.line)

    def grok_cmd(self, meta: Any, source: Any, pattern: Token) -> Any:
        return source, decode_string(str(pattern), pattern.line)


def _parse(start: str, body: str, line: int, query: str) -> Any:
    try:
        tree = _parser().parse(body, start=start)
    except UnexpectedInput as exc:
        raise InvalidRule(
            syntax_message("ES|QL", exc, "command"),
            line=line + max(getattr(exc, "line", 1) or 1, 1) - 1,
        ) from None
    try:
        return _Ast().transform(tree)
    except VisitError as exc:
        if isinstance(exc.orig_exc, RuleError):
            raise exc.orig_exc from None
        raise


# --------------------------------------------------------------------------- pipeline


def parse_esql(query: str) -> EsqlQuery:
    """Translate one ES|QL query into an IR condition and its index patterns.

    Raises InvalidRule for syntax errors (``line`` is the line inside ``query``) and
    UnsupportedRule for aggregations, other commands and unknown functions.
    """
    commands = split_commands(query)
    for cmd in commands:  # an aggregation decides the reason, wherever it is
        if cmd.name in _STATEFUL:
            raise UnsupportedRule(_STATEFUL[cmd.name], line=cmd.line)
    indices = source_indices(commands)
    env = _Env()
    return EsqlQuery(and_(*run_commands(commands[1:], env, query)), indices)


def source_indices(commands: list[_Command]) -> tuple[str, ...]:
    """The index patterns of the query's ``FROM`` (the first command)."""
    first = commands[0]
    if first.name != "FROM":
        if first.name in _SOURCES:
            raise UnsupportedRule(f"ES|QL source command {first.name} is not supported", line=1)
        raise InvalidRule(f"ES|QL query must start with FROM, not {first.name}", line=1)
    return _from_indices(first.body, first.line)


def run_commands(
    commands: list[_Command], env: _Env, query: str, now_field: str | None = None
) -> list[Node]:
    """Run single-event ``commands`` over the columns of ``env`` (updated in place): the
    conditions of their ``WHERE``s (and ``LIMIT 0``), in order. ``now_field``: see
    :class:`_Compiler`."""
    conditions: list[Node] = []
    for cmd in commands:
        if cmd.name == "MV_EXPAND" and cmd.body.strip() == "_ignored":
            raise UnsupportedRule(_IGNORED, line=cmd.line)
        if cmd.name not in _COMMANDS:
            raise UnsupportedRule(f"ES|QL {cmd.name} is not supported", line=cmd.line)
        if cmd.name == "WHERE":
            expr = env.resolve(_parse("where_cmd", cmd.body, cmd.line, query))
            conditions.append(_Compiler(now_field).true(expr))
        elif cmd.name == "EVAL":
            for name, expr in _parse("eval_cmd", cmd.body, cmd.line, query):
                env.define(name, env.resolve(expr))
        elif cmd.name in ("KEEP", "DROP"):
            env.filter(cmd.name, _parse("names_cmd", cmd.body, cmd.line, query), cmd.line)
        elif cmd.name == "RENAME":
            for old, new in _parse("rename_cmd", cmd.body, cmd.line, query):
                env.rename(old, new, cmd.line)
        elif cmd.name == "DISSECT":
            source, pattern = _parse("dissect_cmd", cmd.body, cmd.line, query)
            try:
                _, pairs = dissect_spec(pattern)
            except ValueError as exc:
                raise UnsupportedRule(f"ES|QL {exc}", line=cmd.line) from None
            source = env.resolve(source)
            for column, _, _ in pairs:
                if column is not None:
                    env.define(column, _Fn("\0DISSECT", (source, _Lit(pattern), _Lit(column)), 0))
        elif cmd.name == "GROK":
            source, pattern = _parse("grok_cmd", cmd.body, cmd.line, query)
            try:
                python, columns = grok_to_python(pattern)
            except ValueError as exc:
                raise UnsupportedRule(f"ES|QL {exc}", line=cmd.line) from None
            source = env.resolve(source)
            for column, group in columns.items():
                env.define(column, _Fn("\0GROK", (source, _Lit(python), _Lit(group)), 0))
        elif cmd.name == "LIMIT":
            if _parse("limit_cmd", cmd.body, cmd.line, query) == 0:
                conditions.append(Const(False))
        else:  # SORT
            _parse("sort_cmd", cmd.body, cmd.line, query)
    return conditions


def _glob(pattern: str) -> re.Pattern[str]:
    return re.compile(".*".join(map(re.escape, pattern.split("*"))), re.DOTALL)


class _Env:
    """The columns a command sees: computed ones (EVAL, RENAME) and the source fields that
    KEEP/DROP left visible."""

    def __init__(self) -> None:
        self.computed: dict[str, Any] = {}
        self.filters: list[tuple[str, list[re.Pattern[str]]]] = []  # on source fields
        self.removed: dict[str, int] = {}  # name -> line of the command that removed it

    def define(self, name: str, expr: Any) -> None:
        self.computed[name] = expr
        self.removed.pop(name, None)

    def _source_visible(self, name: str) -> bool:
        for kind, pats in self.filters:
            hit = any(p.fullmatch(name) for p in pats)
            if hit != (kind == "KEEP"):
                return False
        return True

    def filter(self, kind: str, patterns: list[str], line: int) -> None:
        pats = [_glob(p) for p in patterns]
        for name in list(self.computed):
            hit = any(p.fullmatch(name) for p in pats)
            if hit != (kind == "KEEP"):
                del self.computed[name]
                self.removed[name] = line
        self.filters.append((kind, pats))

    def rename(self, old: str, new: str, line: int) -> None:
        value = self.lookup(old, line)
        self.computed.pop(old, None)
        self.removed[old] = line
        self.define(new, value)

    def lookup(self, name: str, line: int) -> Any:
        if name in self.computed:
            return self.computed[name]
        if name in self.removed or not self._source_visible(name):
            raise InvalidRule(
                f"ES|QL: unknown column [{name}] (removed by KEEP/DROP/RENAME)", line=line
            )
        return _Field(name)

    def resolve(self, expr: Any) -> Any:
        """``expr`` with every column replaced by its definition."""
        if isinstance(expr, _Field):
            return self.lookup(expr.name, 1)
        if isinstance(expr, _Fn):
            return _Fn(expr.name, tuple(self.resolve(a) for a in expr.args), expr.line)
        if isinstance(expr, _Op):
            return _Op(expr.kind, tuple(self.resolve(a) for a in expr.args), expr.line)
        if isinstance(expr, tuple):
            return tuple(self.resolve(a) for a in expr)
        return expr


# --------------------------------------------------------------------------- to IR

_NEG = {"==": "!=", "!=": "==", "<": ">=", "<=": ">", ">": "<=", ">=": "<"}
_FLIP = {"==": "==", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}
_ARITH = {"+": "add", "-": "subtract", "*": "multiply", "/": "divide", "%": "modulo"}
_CASTS = {
    "::DOUBLE": "to_double",
    "::STRING": "string",
    "::KEYWORD": "string",
    "::TEXT": "string",
}
_CONVERSIONS = {"TO_DOUBLE": "to_double", "TO_STRING": "string", "TO_IP": "to_ip"}
#: ES|QL name -> (IR call name, min args, max args).
_CALLS: dict[str, tuple[str, int, int | None]] = {
    "TO_LOWER": ("to_lower", 1, 1),
    "TO_UPPER": ("to_upper", 1, 1),
    "LENGTH": ("length", 1, 1),
    "LOCATE": ("locate", 2, 2),
    "SUBSTRING": ("esql_substring", 2, 3),
    "REPLACE": ("replace", 3, 3),
    "CONCAT": ("concat", 2, None),
    "COALESCE": ("coalesce", 1, None),
    "TRIM": ("trim", 1, 1),
    "LTRIM": ("ltrim", 1, 1),
    "RTRIM": ("rtrim", 1, 1),
    "STARTS_WITH": ("startswith", 2, 2),
    "ENDS_WITH": ("endswith", 2, 2),
    "CIDR_MATCH": ("cidrmatch", 2, None),
    "URL_DECODE": ("url_decode", 1, 1),
    "FROM_BASE64": ("from_base64", 1, 1),
    "DATE_TRUNC": ("date_trunc", 2, 2),
    "DATE_DIFF": ("date_diff", 3, 3),
    "\0DISSECT": ("dissect", 3, 3),
    "\0GROK": ("grok", 3, 3),
}
_FULL_TEXT_FUNCTIONS = {"QSTR", "MATCH_PHRASE", "MULTI_MATCH"}
#: MATCH options that do not change which records match one event.
_NEUTRAL_OPTIONS = {"boost", "auto_generate_synonyms_phrase_query", "lenient"}
#: ``max_expansions`` caps how many terms of the index's term dictionary a fuzzy term
#: expands to; a record in the stream is matched as if it were alone in its index, where its
#: own terms are the only candidates, so the cap never leaves one out.
_FUZZY_OPTIONS = {"fuzziness", "max_expansions", "prefix_length", "fuzzy_transpositions"}


def _fuzziness(value: Any, term: str, line: int) -> int:
    """Edits allowed for ``term``: 0, 1, 2, or ``AUTO[:low,high]`` by its length (Lucene's
    default ``AUTO:3,6``: shorter than 3 exact, shorter than 6 one edit, else two)."""
    text = str(value).strip().upper()
    if text.startswith("AUTO"):
        low, high = 3, 6
        if text != "AUTO":
            m = re.fullmatch(r"AUTO:(\d+),(\d+)", text)
            if m is None:
                raise InvalidRule(f"ES|QL MATCH fuzziness {value!r} is not valid", line=line)
            low, high = int(m.group(1)), int(m.group(2))
        n = len(term)
        return 0 if n < low else 1 if n < high else 2
    if text in ("0", "1", "2"):
        return int(text)
    raise InvalidRule(f"ES|QL MATCH fuzziness {value!r}: Lucene allows 0, 1, 2 or AUTO", line=line)


def _is_span(e: Any) -> bool:
    return isinstance(e, _Fn) and e.name == "\0SPAN"


def _notnull(v: ValueExpr) -> Node:
    """The IR condition "``v`` is not null"."""
    if isinstance(v, FieldValue):
        return Exists(v.field)
    if isinstance(v, Literal_):
        return Const(v.value is not None)
    return not_(Predicate(v, "==", Literal_(None)))


def _like_tokens(pattern: str, line: int | None = None) -> tuple[PatternToken, ...]:
    """An ES|QL LIKE pattern as Match tokens: ``*``, ``?``; ``\\`` escapes ``*``, ``?`` or
    itself, any other use is an error (as Elasticsearch reports it)."""
    parts: list[PatternToken] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            if i + 1 >= len(pattern) or pattern[i + 1] not in "*?\\":
                raise InvalidRule(
                    f"ES|QL: invalid pattern for LIKE [{pattern}]: escape character is not "
                    "followed by special wildcard char",
                    line=line,
                )
            parts.append(pattern[i + 1])
            i += 2
            continue
        parts.append(Wild.ANY if c == "*" else Wild.ONE if c == "?" else c)
        i += 1
    return tokens(*parts)


def _tokens_regex(toks: tuple[PatternToken, ...]) -> str:
    body = "".join(
        ".*" if t is Wild.ANY else "." if t is Wild.ONE else re.escape(str(t)) for t in toks
    )
    return f"^(?:{body})$"


def _has_intersection(pattern: str) -> bool:
    """An unescaped ``&`` outside classes and quoted strings."""
    return "&" in _strip_literals(pattern)


def _strip_literals(pattern: str) -> str:
    return re.sub(r'\\.|\[(?:\\.|[^\]\\])*\]?|"[^"]*"?', "", pattern, flags=re.DOTALL)


def _intersection(pattern: str) -> list[str]:
    """The operands of a Lucene regex that is an intersection ``A&B...`` at top level (no
    top-level ``|``, which binds looser than ``&``): the value must fully match each one.
    Any other pattern is returned whole."""
    parts: list[str] = []
    depth = 0
    start = 0
    union = False
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "[":
            i += 1
            while i < n and pattern[i] != "]":
                i += 2 if pattern[i] == "\\" else 1
            i += 1
            continue
        if ch == '"':
            end = pattern.find('"', i + 1)
            i = n if end < 0 else end + 1
            continue
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif depth == 0 and ch == "|":
            union = True
        elif depth == 0 and ch == "&":
            parts.append(pattern[start:i])
            start = i + 1
        i += 1
    if not parts or union:
        return [pattern]
    parts.append(pattern[start:])
    if any(not p for p in parts):
        raise InvalidRule(f"ES|QL RLIKE: empty operand of & in {pattern!r}")
    return parts


_LUCENE_SPECIAL = set('\\.?+*|{}[]()"&~#@<>')


class _LuceneIntersections:
    """Lucene regex syntax (``RegExp`` with every flag) parsed as Lucene parses it, to remove
    intersections one operand of which is a literal string: ``A&"lit"`` is ``"lit"`` when A
    fully matches it and the empty language otherwise. Nodes: ``("lit", text)``, ``("raw",
    lucene)`` (``.``, ``@``, a class), ``("cat", [..])``, ``("alt", [..])``, ``("rep", node,
    suffix)``, ``("inter", [..])``, ``("nothing",)`` (``#``). :meth:`emit` gives Lucene text
    without ``&``, or None for the empty language."""

    def __init__(self, pattern: str) -> None:
        self.src = pattern
        self.pos = 0

    def parse(self) -> Any:
        if not self.src:
            return ("lit", "")
        node = self.union()
        if self.pos < len(self.src):
            raise InvalidRule(f"ES|QL RLIKE: end of pattern expected in {self.src!r}")
        return node

    def _more(self) -> bool:
        return self.pos < len(self.src)

    def _peek(self, chars: str) -> bool:
        return self._more() and self.src[self.pos] in chars

    def _match(self, ch: str) -> bool:
        if self._peek(ch):
            self.pos += 1
            return True
        return False

    def _next(self) -> str:
        if not self._more():
            raise InvalidRule(f"ES|QL RLIKE: unexpected end of pattern {self.src!r}")
        self.pos += 1
        return self.src[self.pos - 1]

    def union(self) -> Any:
        alts = [self.inter()]
        while self._match("|"):
            alts.append(self.inter())
        return alts[0] if len(alts) == 1 else ("alt", alts)

    def inter(self) -> Any:
        ops = [self.concat()]
        while self._match("&"):
            ops.append(self.concat())
        return ops[0] if len(ops) == 1 else ("inter", ops)

    def concat(self) -> Any:
        items = [self.repeat()]  # the first item is parsed whatever comes: `&|` is `|` literal
        while self._more() and not self._peek(")|&"):
            items.append(self.repeat())
        merged: list[Any] = []
        for it in items:
            if it[0] == "lit" and merged and merged[-1][0] == "lit":
                merged[-1] = ("lit", merged[-1][1] + it[1])
            else:
                merged.append(it)
        return merged[0] if len(merged) == 1 else ("cat", merged)

    def repeat(self) -> Any:
        node = self.simple()
        while self._peek("?*+{"):
            if self.src[self.pos] == "{":
                m = re.compile(r"\{\d+(?:,\d*)?\}").match(self.src, self.pos)
                if m is None:
                    raise InvalidRule(f"ES|QL RLIKE: malformed repetition in {self.src!r}")
                suffix = m.group(0)
                self.pos = m.end()
            else:
                suffix = self._next()
            node = ("rep", node, suffix)
        return node

    def simple(self) -> Any:
        ch = self._next()
        if ch in "~<":
            raise UnsupportedRule(f"ES|QL RLIKE: Lucene regex operator {ch!r} is not supported")
        if ch == "#":
            return ("nothing",)
        if ch in ".@":
            return ("raw", ch)
        if ch == "[":
            start = self.pos - 1
            self._match("^")
            while self._more() and self.src[self.pos] != "]":
                self.pos += 2 if self.src[self.pos] == "\\" else 1
            if not self._match("]"):
                raise InvalidRule(f"ES|QL RLIKE: unterminated character class in {self.src!r}")
            return ("raw", self.src[start : self.pos])
        if ch == '"':
            end = self.src.find('"', self.pos)
            if end < 0:
                raise InvalidRule(f"ES|QL RLIKE: unterminated quoted string in {self.src!r}")
            text = self.src[self.pos : end]
            self.pos = end + 1
            return ("lit", text)
        if ch == "(":
            if self._match(")"):
                return ("lit", "")
            node = self.union()
            if not self._match(")"):
                raise InvalidRule(f"ES|QL RLIKE: missing ) in {self.src!r}")
            return node
        if ch == "\\":
            nxt = self._next()
            return ("raw", "\\" + nxt) if nxt in "dDsSwW" else ("lit", nxt)
        return ("lit", ch)

    @classmethod
    def emit(cls, node: Any) -> str | None:
        kind = node[0]
        if kind == "lit":
            return "".join("\\" + c if c in _LUCENE_SPECIAL else c for c in node[1])
        if kind == "raw":
            return str(node[1])
        if kind == "nothing":
            return None
        if kind == "cat":
            parts = [cls.emit(n) for n in node[1]]
            return None if any(p is None for p in parts) else "".join(map(str, parts))
        if kind == "alt":
            alts = [a for a in (cls.emit(n) for n in node[1]) if a is not None]
            return f"({'|'.join(alts)})" if alts else None
        if kind == "rep":
            inner = cls.emit(node[1])
            if inner is None:
                return "()" if node[2] in "*?" or node[2].startswith("{0") else None
            return f"({inner}){node[2]}"
        assert kind == "inter"
        ops = [cls.emit(n) for n in node[1]]
        if any(o is None for o in ops):
            return None
        literals = [n[1] for n in node[1] if n[0] == "lit"]
        if not literals:
            raise UnsupportedRule(
                "ES|QL RLIKE: Lucene & between operands that are not literal text, "
                "inside a pattern (only A&B over the whole pattern)"
            )
        value = literals[0]
        for op in ops:
            pattern, flags = lucene_regex(str(op), True)
            if re2.search(f"(?{flags}){pattern}", value) is None:
                return None
        return cls.emit(("lit", value))


class _Compiler:
    """Boolean expressions to ``(is true, is false)`` IR pairs, values to IR values.
    ``now_field``: the field ``NOW()`` reads (rows after ``STATS``); None: unsupported."""

    def __init__(self, now_field: str | None = None) -> None:
        self.now_field = now_field

    def true(self, e: Any) -> Node:
        return self.cond(e)[0]

    def cond(self, e: Any) -> tuple[Node, Node]:
        if isinstance(e, _Lit):
            if e.value is None:
                return Const(False), Const(False)
            if isinstance(e.value, bool):
                return Const(e.value), Const(not e.value)
            raise InvalidRule(f"ES|QL: {e.value!r} is not a condition")
        if isinstance(e, _Field):
            return Equals(e.name, True), Equals(e.name, False)
        if isinstance(e, _Fn):
            return self._bool_fn(e)
        assert isinstance(e, _Op)
        k = e.kind
        if k == "and":
            pairs = [self.cond(a) for a in e.args]
            return and_(*(t for t, _ in pairs)), or_(*(f for _, f in pairs))
        if k == "or":
            pairs = [self.cond(a) for a in e.args]
            return or_(*(t for t, _ in pairs)), and_(*(f for _, f in pairs))
        if k == "not":
            t, f = self.cond(e.args[0])
            return f, t
        if k == "match":
            return self._match(e.args[0], e.args[1], None, e.line)
        if k == "isnull":
            return self._case(e, 0, lambda v: self._isnull(v))
        if k == "cmp":
            op, left, right = e.args
            return self._case2(e, left, right, lambda lv, rv: self._compare(op, lv, rv, e.line))
        if k == "in":
            return self._case(e, 0, lambda v: self._in(v, e.args[1], e.line))
        if k in ("like", "rlike"):
            return self._case(e, 0, lambda v: self._pattern(k, v, e.args[1], e.line))
        raise AssertionError(k)

    # ---- CASE expansion: a comparison on CASE(...) is the OR of its branches

    def _case(self, e: _Op, index: int, leaf: Any) -> tuple[Node, Node]:
        operand = e.args[index]
        if isinstance(operand, _Fn) and operand.name == "CASE":
            return self._branches(operand, lambda v: self._case_sub(e, index, v, leaf))
        return leaf(operand)

    def _case_sub(self, e: _Op, index: int, v: Any, leaf: Any) -> tuple[Node, Node]:
        args = list(e.args)
        args[index] = v
        return self._case(_Op(e.kind, tuple(args), e.line), index, leaf)

    def _case2(self, e: _Op, left: Any, right: Any, leaf: Any) -> tuple[Node, Node]:
        if isinstance(left, _Fn) and left.name == "CASE":
            return self._branches(left, lambda v: self._case2(e, v, right, leaf))
        if isinstance(right, _Fn) and right.name == "CASE":
            return self._branches(right, lambda v: self._case2(e, left, v, leaf))
        return leaf(left, right)

    def _branches(self, case: _Fn, leaf: Any) -> tuple[Node, Node]:
        args = case.args
        if len(args) < 2:
            raise InvalidRule("ES|QL CASE needs a condition and a value", line=case.line)
        ts: list[Node] = []
        fs: list[Node] = []
        earlier: list[Node] = []  # no earlier condition was true
        for i in range(0, len(args) - 1, 2):
            taken = self.true(args[i])
            t, f = leaf(args[i + 1])
            ts.append(and_(*earlier, taken, t))
            fs.append(and_(*earlier, taken, f))
            earlier.append(not_(taken))
        t, f = leaf(args[-1] if len(args) % 2 else _Lit(None))  # no default: null
        ts.append(and_(*earlier, t))
        fs.append(and_(*earlier, f))
        return or_(*ts), or_(*fs)

    # ---- leaves

    def _isnull(self, v: Any) -> tuple[Node, Node]:
        if isinstance(v, _Op):  # a boolean expression is null when neither true nor false
            t, f = self.cond(v)
            return and_(not_(t), not_(f)), or_(t, f)
        value = self.value(v)
        if isinstance(value, FieldValue):
            return IsNull(value.field), Exists(value.field)
        present = _notnull(value)
        return not_(present), present

    def _compare(self, op: str, left: Any, right: Any, line: int) -> tuple[Node, Node]:
        if isinstance(left, _Op) or isinstance(right, _Op):
            return self._bool_compare(op, left, right, line)
        lv, rv = self.value(left), self.value(right)
        if self._is_date(lv) or self._is_date(rv):
            # dates compare as instants: ``l op r`` is ``date_diff(ms, r, l) op 0``
            diff = Call("date_diff", (Literal_("millisecond"), rv, lv))
            later = Predicate(diff, op, Literal_(0))
            return later, and_(_notnull(diff), not_(later))
        if isinstance(lv, Literal_) and not isinstance(rv, Literal_):
            lv, rv, op = rv, lv, _FLIP[op]
        if isinstance(rv, Literal_) and rv.value is None:
            return Const(False), Const(False)
        if isinstance(lv, FieldValue) and isinstance(rv, Literal_):
            t = self._field_leaf(op, lv.field, rv.value)
            if t is not None:
                return t, and_(Exists(lv.field), not_(t))
        contains = self._locate(op, lv, rv)
        if contains is not None:
            return contains, and_(Exists(contains.field), not_(contains))  # type: ignore[arg-type]
        lowered = self._lowered(lv, rv)
        if lowered is not None and op in ("==", "!="):
            eq = Match(lowered[0], tokens(lowered[1]), cased=False)
            present = Exists(lowered[0])
            ne = and_(present, not_(eq))
            return (eq, ne) if op == "==" else (ne, eq)
        t = Predicate(lv, op, rv)
        return t, and_(_notnull(lv), _notnull(rv), not_(t))

    def _field_leaf(self, op: str, field: str, value: object) -> Node | None:
        if op in ("==", "!="):
            if isinstance(value, str):
                eq: Node = Match(field, tokens(value), cased=True)
            elif isinstance(value, int | float | bool):
                eq = Equals(field, value)
            else:
                return None
            return eq if op == "==" else and_(Exists(field), not_(eq))
        if isinstance(value, int | float) and not isinstance(value, bool):
            return Compare(field, op, value)  # type: ignore[arg-type]
        return None

    def _bool_compare(self, op: str, left: Any, right: Any, line: int) -> tuple[Node, Node]:
        if op not in ("==", "!="):
            raise UnsupportedRule(f"ES|QL: booleans compared with {op}", line=line)
        lt, lf = self.cond(left)
        rt, rf = self.cond(right)
        same = or_(and_(lt, rt), and_(lf, rf))
        differ = or_(and_(lt, rf), and_(lf, rt))
        return (same, differ) if op == "==" else (differ, same)

    @staticmethod
    def _locate(op: str, lv: ValueExpr, rv: ValueExpr) -> Match | None:
        """``LOCATE(field, "text") > 0`` (or ``>= 1``) as "field contains text"."""
        if not (
            isinstance(lv, Call)
            and lv.name == "locate"
            and isinstance(lv.args[0], FieldValue)
            and isinstance(lv.args[1], Literal_)
            and isinstance(lv.args[1].value, str)
            and (op, rv) in ((">", Literal_(0)), (">=", Literal_(1)))
        ):
            return None
        return Match(lv.args[0].field, tokens(Wild.ANY, lv.args[1].value, Wild.ANY), cased=True)

    @staticmethod
    def _lowered(lv: ValueExpr, rv: ValueExpr) -> tuple[str, str] | None:
        """(field, text) when ``lv`` is ``TO_LOWER(field)`` and ``rv`` lower-case text."""
        if (
            isinstance(lv, Call)
            and lv.name == "to_lower"
            and isinstance(lv.args[0], FieldValue)
            and isinstance(rv, Literal_)
            and isinstance(rv.value, str)
            and rv.value == rv.value.lower()
        ):
            return lv.args[0].field, rv.value
        return None

    def _in(self, left: Any, items: tuple[Any, ...], line: int) -> tuple[Node, Node]:
        lv = self.value(left)
        values = [self.value(x) for x in items]
        has_null = any(isinstance(v, Literal_) and v.value is None for v in values)
        values = [v for v in values if not (isinstance(v, Literal_) and v.value is None)]
        ts: list[Node] = []
        for v in values:
            if isinstance(v, Literal_):
                ts.append(self._compare("==", left, _Lit(v.value), line)[0])
            else:
                ts.append(Predicate(lv, "==", v))
        t_all = or_(*ts)
        if has_null:
            return t_all, Const(False)
        others = [_notnull(v) for v in values if not isinstance(v, Literal_)]
        return t_all, and_(_notnull(lv), *others, not_(t_all))

    def _pattern(self, kind: str, left: Any, pats: tuple[Any, ...], line: int) -> tuple[Node, Node]:
        lv = self.value(left)
        texts: list[str] = []
        for p in pats:
            pv = self.value(p)
            if not (isinstance(pv, Literal_) and isinstance(pv.value, str)):
                raise UnsupportedRule(
                    f"ES|QL {kind.upper()} with a pattern that is not a string literal", line=line
                )
            texts.append(pv.value)
        ts: list[Node] = []
        for text in texts:
            if kind == "like":
                ts.append(self._like(lv, _like_tokens(text, line)))
            else:
                ts.append(and_(*(self._rlike(lv, part, line) for part in _intersection(text))))
        t = or_(*ts)
        return t, and_(_notnull(lv), not_(t))

    @staticmethod
    def _rlike(lv: ValueExpr, text: str, line: int) -> Node:
        try:
            if _has_intersection(text):
                reduced = _LuceneIntersections.emit(_LuceneIntersections(text).parse())
                if reduced is None:  # the empty language
                    return Const(False)
                text = reduced
            pattern, flags = lucene_regex(text, True)
        except RuleError as exc:
            reason = exc.reason.removeprefix("ES|QL RLIKE: ")
            raise type(exc)(f"ES|QL RLIKE: {reason}", line=line) from None
        if isinstance(lv, FieldValue):
            return Regex(lv.field, pattern, flags)
        return Predicate(lv, "regex", (Literal_(pattern),))

    @staticmethod
    def _like(lv: ValueExpr, toks: tuple[PatternToken, ...]) -> Node:
        if isinstance(lv, FieldValue):
            return Match(lv.field, toks, cased=True)
        text_parts = [t for t in toks if isinstance(t, str)]
        if (
            isinstance(lv, Call)
            and lv.name == "to_lower"
            and isinstance(lv.args[0], FieldValue)
            and all(t == t.lower() for t in text_parts)
        ):
            return Match(lv.args[0].field, toks, cased=False)
        if any(c in t for t in text_parts for c in "*?"):
            return Predicate(lv, "regex", (Literal_(_tokens_regex(toks)),))
        pattern = "".join("*" if t is Wild.ANY else "?" if t is Wild.ONE else str(t) for t in toks)
        return Predicate(lv, "like", (Literal_(pattern),))

    def _bool_fn(self, e: _Fn) -> tuple[Node, Node]:
        if e.name == "CASE":
            return self._branches(e, self.cond)
        if e.name == "MATCH":
            self._arity(e, 2, 3)
            return self._match(e.args[0], e.args[1], e.args[2] if len(e.args) > 2 else None, e.line)
        if e.name == "KQL":
            return self._kql(e)
        if e.name in ("STARTS_WITH", "ENDS_WITH"):
            self._arity(e, 2, 2)
            s, x = self.value(e.args[0]), self.value(e.args[1])
            if isinstance(s, FieldValue) and isinstance(x, Literal_) and isinstance(x.value, str):
                parts = (x.value, Wild.ANY) if e.name == "STARTS_WITH" else (Wild.ANY, x.value)
                t: Node = Match(s.field, tokens(*parts), cased=True)
                return t, and_(Exists(s.field), not_(t))
        if e.name == "CIDR_MATCH":
            self._arity(e, 2, None)
            ip = self.value(e.args[0])
            nets = [self.value(a) for a in e.args[1:]]
            if isinstance(ip, FieldValue) and all(
                isinstance(n, Literal_) and isinstance(n.value, str) for n in nets
            ):
                t = Cidr(ip.field, tuple(str(n.value) for n in nets if isinstance(n, Literal_)))
                return t, and_(Exists(ip.field), not_(t))
        call = self.value(e)
        t = Predicate(call, "==", Literal_(True))
        return t, Predicate(call, "==", Literal_(False))

    # ---- full text: MATCH, the ``:`` operator, KQL()

    def _match(self, field: Any, query: Any, options: Any, line: int) -> tuple[Node, Node]:
        """``MATCH(field, "text")`` / ``field : "text"``: Elasticsearch's ``match`` query.

        On a ``text`` field the query text is analyzed and any token matches (``operator":
        "AND"``: every token); on other fields it is one term (keyword: exact and
        case-sensitive). A Lucene query matches a document or not, never null, so the false
        branch is the plain negation (a record without the field is false).
        """
        if isinstance(field, _Fn) and field.name in ("::STRING", "::KEYWORD", "::TEXT"):
            field = field.args[0]  # the query runs on the indexed field, as mapped
        if not isinstance(field, _Field):
            raise UnsupportedRule("ES|QL MATCH on a computed value (not a field)", line=line)
        if not isinstance(query, _Lit) or query.value is None:
            raise UnsupportedRule("ES|QL MATCH with a query that is not a literal", line=line)
        operator = "or"
        fuzzy: dict[str, Any] = {}
        for key, value in self._options(options, line):
            if key in _FUZZY_OPTIONS:
                fuzzy[key] = value
            elif key == "operator" and isinstance(value, str) and value.lower() in ("and", "or"):
                operator = value.lower()
            elif key not in _NEUTRAL_OPTIONS:
                raise UnsupportedRule(f"ES|QL MATCH option {key} is not supported", line=line)
        text = query.value
        if isinstance(text, bool):
            text = "true" if text else "false"
        text = str(text)
        name = field.name
        if "fuzziness" in fuzzy:
            t = self._fuzzy(name, text, fuzzy, operator, line)
        elif fieldtypes.is_text(name):
            words = analyze(text)
            source = fieldtypes.source_of(name)
            leaves = [Regex(source, phrase_regex([w]), "is") for w in words]
            t = (and_ if operator == "and" else or_)(*leaves) if words else Const(False)
        else:
            try:
                t = value_leaf(name, Lit(tokens(text), quoted=True, line=line))
            except RuleError as exc:
                raise type(exc)(f"ES|QL MATCH: {exc.reason}", line=line) from None
        return t, not_(t)

    @staticmethod
    def _fuzzy(name: str, text: str, opts: dict[str, Any], operator: str, line: int) -> Node:
        """``MATCH`` with ``fuzziness``: each term (the analyzed tokens of a text field, else
        the whole value, case-sensitive) matches a value term within that many edits
        (insert, delete, substitute, swap adjacent unless ``fuzzy_transpositions`` is
        false), its first ``prefix_length`` characters exact, as Lucene's fuzzy query."""
        prefix = opts.get("prefix_length", 0)
        if isinstance(prefix, bool) or not isinstance(prefix, int) or prefix < 0:
            raise InvalidRule("ES|QL MATCH prefix_length must be a whole number", line=line)
        swaps = opts.get("fuzzy_transpositions", True) is not False
        source = fieldtypes.source_of(name)
        ftype = fieldtypes.type_of(name)
        if fieldtypes.is_text(name):
            leaves: list[Node] = []
            for w in analyze(text):
                edits = _fuzziness(opts["fuzziness"], w, line)
                pat = fuzzy_text_regex(w, edits, prefix=prefix, transpositions=swaps)
                if pat is None:
                    raise UnsupportedRule("ES|QL MATCH fuzziness: too many variants", line=line)
                leaves.append(Regex(source, pat, "is"))
            return (and_ if operator == "and" else or_)(*leaves) if leaves else Const(False)
        if ftype not in fieldtypes.KEYWORD_TYPES:
            raise UnsupportedRule(f"ES|QL MATCH fuzziness on a {ftype} field", line=line)
        edits = _fuzziness(opts["fuzziness"], text, line)
        body = fuzzy_regex(text, edits, prefix=prefix, transpositions=swaps)
        if body is None:
            raise UnsupportedRule("ES|QL MATCH fuzziness: too many variants", line=line)
        return Regex(source, "^" + body + "$", "s")

    @staticmethod
    def _options(options: Any, line: int) -> list[tuple[str, Any]]:
        if options is None:
            return []
        if not (isinstance(options, _Fn) and options.name == "{map}"):
            raise InvalidRule("ES|QL MATCH options must be a map literal", line=line)
        out: list[tuple[str, Any]] = []
        for key, value in options.args:
            if not isinstance(value, _Lit):
                raise InvalidRule(f"ES|QL MATCH option {key} must be a literal", line=line)
            out.append((key, value.value))
        return out

    def _kql(self, e: _Fn) -> tuple[Node, Node]:
        """``KQL("...")``: the embedded query with KQL's own semantics (``kql.py``). A
        Lucene query is never null, so false is the plain negation."""
        if len(e.args) != 1:
            raise UnsupportedRule("ES|QL KQL with options is not supported", line=e.line)
        arg = e.args[0]
        if not (isinstance(arg, _Lit) and isinstance(arg.value, str)):
            raise InvalidRule("ES|QL KQL needs a string literal query", line=e.line)
        try:
            t = parse_kql(arg.value)
        except RuleError as exc:
            raise type(exc)(f"ES|QL KQL(): {exc.reason}", line=e.line) from None
        return t, not_(t)

    # ---- values

    @staticmethod
    def _arity(e: _Fn, lo: int, hi: int | None) -> None:
        if len(e.args) < lo or (hi is not None and len(e.args) > hi):
            raise InvalidRule(f"ES|QL function {e.name}: wrong number of arguments", line=e.line)

    def value(self, e: Any) -> ValueExpr:
        if isinstance(e, _Lit):
            return Literal_(e.value)
        if isinstance(e, _Field):
            return FieldValue(e.name)
        if isinstance(e, _Op):
            raise UnsupportedRule(
                "ES|QL: a condition used as a value is not supported", line=e.line
            )
        assert isinstance(e, _Fn), e
        name = e.name
        if name in ("+", "-") and any(_is_span(a) for a in e.args):
            return self._date_arith(e)
        if name in _ARITH:
            return Call(_ARITH[name], (self.value(e.args[0]), self.value(e.args[1])))
        if name in _CASTS or name in _CONVERSIONS:
            self._arity(e, 1, 1)
            return Call(_CASTS.get(name) or _CONVERSIONS[name], (self.value(e.args[0]),))
        if name.startswith("::"):
            raise UnsupportedRule(f"ES|QL cast {name} is not supported", line=e.line)
        if name == "\0SPAN":  # a time span literal, as text: ``5 minutes``
            return Literal_(f"{e.args[0].value} {e.args[1].value}")
        if name == "NOW":
            if self.now_field is None:
                raise UnsupportedRule(
                    "ES|QL NOW() on single events (the time of the query) is not supported",
                    line=e.line,
                )
            self._arity(e, 0, 0)
            return FieldValue(self.now_field)
        if name == "SPACE":
            self._arity(e, 1, 1)
            n = self.value(e.args[0])
            if isinstance(n, Literal_) and isinstance(n.value, int) and 0 <= n.value <= 1 << 20:
                return Literal_(" " * n.value)
            raise UnsupportedRule("ES|QL SPACE with a computed count", line=e.line)
        if name in ("KQL", "MATCH"):
            raise UnsupportedRule(
                f"ES|QL function {name} used as a value (not a WHERE condition)", line=e.line
            )
        if name in _FULL_TEXT_FUNCTIONS:
            raise UnsupportedRule(f"ES|QL function {name} {_FULL_TEXT}", line=e.line)
        if name == "CASE":
            raise UnsupportedRule("ES|QL CASE inside a function call is not supported", line=e.line)
        if name == "JSON_EXTRACT":
            return self._json_extract(e)
        if name not in _CALLS:
            raise UnsupportedRule(f"ES|QL function {name} is not supported", line=e.line)
        ir_name, lo, hi = _CALLS[name]
        self._arity(e, lo, hi)
        args = tuple(self.value(a) for a in e.args)
        if name == "REPLACE":
            self._check_replace(args, e.line)
        return Call(ir_name, args)

    def _is_date(self, v: ValueExpr) -> bool:
        """A value known to be a date: ``NOW()``, date arithmetic, ``DATE_TRUNC``."""
        if isinstance(v, FieldValue):
            return self.now_field is not None and v.field == self.now_field
        return isinstance(v, Call) and v.name in ("date_add", "date_trunc")

    def _date_arith(self, e: _Fn) -> ValueExpr:
        """``date + span``, ``span + date``, ``date - span``: a date (``date_add``)."""
        a, b = e.args
        if _is_span(a) and e.name == "+":
            a, b = b, a
        if _is_span(a) or not _is_span(b):
            raise UnsupportedRule(f"ES|QL: time span arithmetic {e.name} on spans", line=e.line)
        sign = 1 if e.name == "+" else -1
        return Call("date_add", (self.value(a), self.value(b), Literal_(sign)))

    def _json_extract(self, e: _Fn) -> ValueExpr:
        """``JSON_EXTRACT(_source, "$.a.b")``: the field ``a.b`` of the record."""
        self._arity(e, 2, 2)
        src, path = e.args
        if (
            isinstance(src, _Field)
            and src.name == "_source"
            and isinstance(path, _Lit)
            and isinstance(path.value, str)
            and re.fullmatch(r"\$(\.[A-Za-z_@][A-Za-z0-9_@-]*)+", path.value)
        ):
            return FieldValue(path.value[2:])
        raise UnsupportedRule(
            "ES|QL function JSON_EXTRACT is supported on _source with a $.a.b path only",
            line=e.line,
        )

    @staticmethod
    def _check_replace(args: tuple[ValueExpr, ...], line: int) -> None:
        regex, repl = args[1], args[2]
        if not (isinstance(regex, Literal_) and isinstance(regex.value, str)):
            raise UnsupportedRule("ES|QL REPLACE with a computed regex", line=line)
        try:
            compile_java(regex.value)
            if isinstance(repl, Literal_) and isinstance(repl.value, str):
                java_replacement(repl.value)
        except ValueError as exc:
            raise UnsupportedRule(f"ES|QL REPLACE regex: {exc}", line=line) from None


__all__ = ["EsqlQuery", "parse_esql", "split_commands"]
