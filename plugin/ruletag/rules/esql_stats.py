"""Aggregating ES|QL queries (``FROM ... | WHERE ... | STATS aggs BY keys | WHERE ...``) to IR.

:func:`parse_esql_aggregation` returns None for a query without ``STATS`` (``esql.py`` handles
those) and otherwise an :class:`~ruletag.rules.ir.Aggregation`:

* The commands before ``STATS`` run as in a single-event query (``esql.run_commands``): their
  ``WHERE``s are the base condition, their ``EVAL``/``DISSECT``/``GROK`` columns are
  substituted into the aggregates and keys.
* ``STATS`` items ``[name =] AGG(value)``; ``AGG`` is ``COUNT`` (``COUNT(*)``/``COUNT()``: rows),
  ``COUNT_DISTINCT`` (exact), ``VALUES``, ``MIN``, ``MAX``, ``SUM`` or ``AVG``. An aggregate
  inside scalar functions (``MV_SLICE(VALUES(x), 0, 9)``, ``ROUND(AVG(x))``) is computed under
  the column's name and the functions apply after ``STATS``. A value may be a ``CASE``.
  ``BY`` keys are fields or named expressions; an unnamed one is named by its text.
* The commands after ``STATS`` run over the aggregated row, whose only columns are the keys and
  the aggregates: their ``WHERE``s are the group's firing condition (``having``); ``EVAL``,
  ``KEEP``, ``DROP``, ``RENAME``, ``SORT`` and ``LIMIT`` as in a single-event query.
* An aggregate that ruletag does not evaluate (its function, or a function its value uses) is
  left out (and named in ``omitted``) when no condition reads it; otherwise the rule is
  unsupported with that reason.

* ``MV_EXPAND field`` before ``STATS`` makes one row per value of the field (null: one row):
  ``WHERE`` parts (top-level ``AND`` operands) after it that read an expanded field are tested
  per row (``row_condition``), the others on the record; keys and aggregates are per row.
* ``AGG(x) WHERE cond`` counts only the rows satisfying ``cond``.

Refused with a reason: a ``STATS`` with no ``WHERE`` before it (only the ``FROM`` index
pattern, which ruletag does not evaluate, selects its records), ``INLINE STATS``, ``LOOKUP
JOIN``, ``ENRICH``, ``FORK``, ``CHANGE_POINT`` (``esql.py``'s reasons), ``STATS`` after
``STATS``, ``MV_EXPAND`` of a column an earlier ``EVAL`` computes or reads, other aggregate
functions (``TOP``, ``FIRST``, ``LAST``, ``MEDIAN``, ...) where a condition reads them, and
commands after ``STATS`` that are not single-event ones (``COMPLETION``, ...).

Semantics from the ES|QL ``STATS`` reference: null values are skipped by the aggregates; a
row whose key is multi-valued is in every group of its values; rows whose key is null form a
group of their own (the reference's ``COUNT(...) BY languages`` example shows a ``null`` row).
"""

from __future__ import annotations

import re
from typing import Any

from ruletag.errors import InvalidRule, UnsupportedRule
from ruletag.rules.algebra import and_
from ruletag.rules.esql import (
    _IGNORED,
    _STATEFUL,
    _Command,
    _Compiler,
    _Env,
    _Field,
    _Fn,
    _Lit,
    _Op,
    _parse,
    run_commands,
    source_indices,
    split_commands,
)
from ruletag.rules.ir import (
    NOW_FIELD,
    Aggregate,
    Aggregation,
    AggValue,
    And,
    Case,
    Cidr,
    Compare,
    Const,
    Equals,
    FieldRef,
    Literal_,
    Match,
    Node,
    Or,
    Predicate,
    Regex,
    fields_of,
)

__all__ = ["AGGREGATES", "NOW_FIELD", "fires_early", "parse_esql_aggregation"]


#: ES|QL aggregate name -> IR function name, for the aggregates evaluated here.
AGGREGATES = {
    "COUNT": "count",
    "COUNT_DISTINCT": "count_distinct",
    "VALUES": "values",
    "MIN": "min",
    "MAX": "max",
    "SUM": "sum",
    "AVG": "avg",
}
#: Every other aggregate function ES|QL has (refused by name).
_OTHER_AGGREGATES = {
    "MEDIAN",
    "MEDIAN_ABSOLUTE_DEVIATION",
    "PERCENTILE",
    "STD_DEV",
    "TOP",
    "WEIGHTED_AVG",
    "FIRST",
    "LAST",
    "SAMPLE",
    "ST_CENTROID_AGG",
    "ST_EXTENT_AGG",
    "ABSENT",
    "PRESENT",
    "RATE",
}


def parse_esql_aggregation(query: str) -> Aggregation | None:
    """The aggregation of an ES|QL query with ``STATS``; None when it has none.

    Raises UnsupportedRule naming what is not evaluated (see the module docstring) and
    InvalidRule for syntax errors. ``window`` and ``timestamp_field`` are left at their
    defaults: the rule file sets them.
    """
    commands = split_commands(query)
    at = [i for i, c in enumerate(commands) if c.name == "STATS"]
    if not at:
        return None
    for cmd in commands:
        if cmd.name in _STATEFUL and cmd.name != "STATS":
            raise UnsupportedRule(_STATEFUL[cmd.name], line=cmd.line)
    if len(at) > 1:
        raise UnsupportedRule(
            "ES|QL STATS after STATS (aggregating aggregated rows) is not supported",
            line=commands[at[1]].line,
        )
    k = at[0]
    source_indices(commands)
    env = _Env()
    table_parts, row_parts, expand = _before_stats(commands[1:k], env, query)
    if and_(*table_parts, *row_parts) == Const(True):
        raise UnsupportedRule(
            "ES|QL STATS over every record (no WHERE before STATS): the FROM index pattern, "
            "which selects the records, is not evaluated",
            line=commands[k].line,
        )
    base = and_(*table_parts, *row_parts)
    if _holds_without_fields(base) or not _tests_a_value(base):
        raise UnsupportedRule(
            "ES|QL STATS over nearly every record (the WHERE before STATS tests no field "
            "value, only negations, nulls or field presence): the FROM index pattern, which "
            "selects the records, is not evaluated",
            line=commands[k].line,
        )
    stats = commands[k]
    items, by = _split_stats(stats)
    compiler = _Compiler()

    keys: list[tuple[str, AggValue]] = []
    for text in by:
        name, expr = _item(text, stats, query)
        expr = env.resolve(expr)
        keys.append((name, _agg_value(compiler, expr)))

    aggregates: list[Aggregate] = []
    failed: list[tuple[tuple[str, ...], UnsupportedRule]] = []
    row = _Env()
    columns: list[str] = [name for name, _ in keys]
    for text, filter_text in items:
        name, expr = _item(text, stats, query)
        where: Node = Const(True)
        if filter_text is not None:
            where = compiler.true(env.resolve(_parse("where_cmd", filter_text, stats.line, query)))
        found: list[tuple[str, _Fn]] = []
        try:
            shaped = _lift(expr, name, found, stats.line)
        except UnsupportedRule as exc:  # an aggregate function not evaluated here
            failed.append(((name,), exc))
            columns.append(name)
            continue
        hidden = tuple(n for n, _ in found)
        if not found:
            raise UnsupportedRule(
                f"ES|QL STATS column {name} holds no aggregate function", line=stats.line
            )
        try:
            made = [_aggregate(compiler, n, call, env, where) for n, call in found]
        except UnsupportedRule as exc:
            failed.append((hidden, exc))
            made = []
        aggregates.extend(made)
        columns.extend(hidden)
        if not (isinstance(shaped, _Field) and shaped.name == name):
            row.define(name, shaped)
    names = set(columns) | {n for n, _ in keys}
    row.filters.append(("KEEP", [re.compile(re.escape(n)) for n in names]))
    after = run_commands(commands[k + 1 :], row, query, now_field=NOW_FIELD)
    having = and_(*after)
    read = fields_of(having)
    omitted: list[str] = []
    for hidden, error in failed:
        if read.intersection(hidden):
            raise error
        omitted.extend(hidden)
    return Aggregation(
        condition=and_(*table_parts),
        keys=tuple(keys),
        aggregates=tuple(aggregates),
        having=having,
        omitted=tuple(omitted),
        expand=expand,
        row_condition=and_(*row_parts),
    )


def _before_stats(
    commands: list[_Command], env: _Env, query: str
) -> tuple[list[Node], list[Node], tuple[str, ...]]:
    """Run the commands before ``STATS``: (conditions on the record, conditions per
    ``MV_EXPAND`` row, the expanded fields). A ``WHERE`` after an ``MV_EXPAND`` is split at
    its top-level ``AND``s: the parts that read an expanded field are tested per row."""
    table: list[Node] = []
    rows: list[Node] = []
    expand: list[str] = []
    segment: list[_Command] = []

    def flush() -> None:
        for cond in run_commands(segment, env, query):
            for part in cond.args if isinstance(cond, And) else (cond,):
                (rows if fields_of(part).intersection(expand) else table).append(part)
        segment.clear()

    for cmd in commands:
        if cmd.name != "MV_EXPAND":
            segment.append(cmd)
            continue
        flush()
        field = _strip_comments(cmd.body).strip()
        if field == "_ignored":
            raise UnsupportedRule(_IGNORED, line=cmd.line)
        if not _NAME.fullmatch(field):
            raise UnsupportedRule(f"ES|QL MV_EXPAND of {field!r} is not supported", line=cmd.line)
        field = field.replace("`", "")
        if field in env.computed or any(
            field in _ast_fields(expr) for expr in env.computed.values()
        ):
            raise UnsupportedRule(
                "ES|QL MV_EXPAND of a column an earlier EVAL computes or reads is not supported",
                line=cmd.line,
            )
        env.lookup(field, cmd.line)  # still visible (KEEP/DROP)
        expand.append(field)
    flush()
    return table, rows, tuple(expand)


_PART = r"(?:[A-Za-z_@][A-Za-z0-9_@]*|`[^`]+`)"
_NAME = re.compile(rf"{_PART}(?:\.{_PART})*")


def _ast_fields(expr: Any) -> set[str]:
    """Every source field an expression of ``esql.py``'s AST reads."""
    if isinstance(expr, _Field):
        return {expr.name}
    if isinstance(expr, _Fn | _Op):
        return set().union(*(_ast_fields(a) for a in expr.args))
    if isinstance(expr, tuple):
        return set().union(*(_ast_fields(a) for a in expr))
    return set()


# --------------------------------------------------------------------------- STATS body


def _split_stats(cmd: _Command) -> tuple[list[tuple[str, str | None]], list[str]]:
    """The aggregate items (text, ``WHERE`` filter text or None) and the ``BY`` items of a
    ``STATS`` body."""
    body = cmd.body
    cuts = _top_level(body)
    by_at = next((i for i, word in cuts if word == "by"), None)
    head, tail = (body, "") if by_at is None else (body[:by_at], body[by_at + 2 :])
    items: list[tuple[str, str | None]] = []
    for text in _commas(head):
        where_at = next((i for i, word in _top_level(text) if word == "where"), None)
        if where_at is None:
            items.append((text, None))
        else:
            items.append((text[:where_at], text[where_at + 5 :]))
    if not items:
        raise UnsupportedRule("ES|QL STATS without an aggregate is not supported", line=cmd.line)
    return items, _commas(tail) if by_at is not None else []


def _commas(text: str) -> list[str]:
    parts: list[str] = []
    start = 0
    for i, word in _top_level(text):
        if word == ",":
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if _strip_comments(p).strip()]


_SKIP = re.compile(
    r'"""[\s\S]*?"""(?!")|"(?:\\.|[^"\\\r\n])*"|`(?:[^`]|``)*`|//[^\n]*|/\*[\s\S]*?\*/'
)
_WORD = re.compile(r"[A-Za-z_@][A-Za-z0-9_@.]*")


def _top_level(text: str) -> list[tuple[int, str]]:
    """Offsets of top-level commas (``","``) and of the words ``by`` / ``where`` (lower-case)
    outside brackets, strings, quoted names and comments."""
    out: list[tuple[int, str]] = []
    depth = 0
    i, n = 0, len(text)
    while i < n:
        m = _SKIP.match(text, i)
        if m is not None:
            i = m.end()
            continue
        ch = text[i]
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append((i, ","))
        else:
            w = _WORD.match(text, i)
            if w is not None:
                if depth == 0 and w.group(0).lower() in ("by", "where"):
                    out.append((i, w.group(0).lower()))
                i = w.end()
                continue
        i += 1
    return out


def _strip_comments(text: str) -> str:
    return re.sub(r"//[^\n]*|/\*[\s\S]*?\*/", " ", text)


def _item(text: str, cmd: _Command, query: str) -> tuple[str, Any]:
    """(column name, expression) of one ``[name =] expr`` item."""
    ((name, expr),) = _parse("eval_cmd", text, cmd.line, query)
    if name == "\0unnamed":
        name = _field_name(expr) or re.sub(r"\s+", " ", _strip_comments(text)).strip()
    return name, expr


def _field_name(expr: Any) -> str | None:
    return expr.name if isinstance(expr, _Field) else None


def _lift(expr: Any, name: str, found: list[tuple[str, _Fn]], line: int) -> Any:
    """``expr`` with every aggregate call replaced by a column holding it: the call itself
    is column ``name``, nested ones ``name`` then ``name#2``, ... ; ``found`` gets them."""
    if isinstance(expr, _Fn):
        if expr.name in AGGREGATES:
            for a in expr.args:
                if isinstance(a, _Fn) and (a.name in AGGREGATES or a.name in _OTHER_AGGREGATES):
                    raise InvalidRule(  # Elasticsearch rejects the query
                        f"ES|QL STATS: {expr.name} of an aggregate function", line=line
                    )
            col = name if not found else f"{name}#{len(found) + 1}"
            found.append((col, expr))
            return _Field(col)
        if expr.name in _OTHER_AGGREGATES:
            raise UnsupportedRule(
                f"ES|QL STATS aggregate function {expr.name} is not supported", line=expr.line
            )
        return _Fn(expr.name, tuple(_lift(a, name, found, line) for a in expr.args), expr.line)
    if isinstance(expr, tuple):
        return tuple(_lift(a, name, found, line) for a in expr)
    if isinstance(expr, _Op):
        return _Op(expr.kind, tuple(_lift(a, name, found, line) for a in expr.args), expr.line)
    return expr


def _aggregate(compiler: _Compiler, name: str, call: _Fn, env: _Env, where: Node) -> Aggregate:
    fn = AGGREGATES[call.name]
    args = call.args
    if fn == "count" and (not args or (len(args) == 1 and args[0] == _Lit("*"))):
        return Aggregate(name, fn, None, where)
    limit = 2 if fn == "count_distinct" else 1  # COUNT_DISTINCT(x, precision)
    if not 1 <= len(args) <= limit:
        raise UnsupportedRule(
            f"ES|QL STATS {call.name} with {len(args)} arguments is not supported", line=call.line
        )
    return Aggregate(name, fn, _agg_value(compiler, env.resolve(args[0])), where)


def _agg_value(compiler: _Compiler, expr: Any) -> AggValue:
    """A per-record value: an IR value expression, or a :class:`Case` of them."""
    if isinstance(expr, _Fn) and expr.name == "CASE":
        args = expr.args
        if len(args) < 2:
            raise UnsupportedRule("ES|QL CASE needs a condition and a value", line=expr.line)
        branches = tuple(
            (compiler.true(args[i]), _agg_value(compiler, args[i + 1]))
            for i in range(0, len(args) - 1, 2)
        )
        default = _agg_value(compiler, args[-1]) if len(args) % 2 else Literal_(None)
        return Case(branches, default)
    return compiler.value(expr)


# --------------------------------------------------------------------------- diagnostics

#: aggregates that never decrease as rows enter the window, and those that never increase
_GROWING = {"count", "count_distinct", "max"}
_SHRINKING = {"min"}


def fires_early(agg: Aggregation) -> bool:
    """Whether the condition after ``STATS`` may hold on a prefix of a group's rows and not
    on all of them (``count < 3``, ``count_distinct(x) == 1``, ``min(x) > 5``, anything with
    ``NOW()``): evaluated on arrival (the engine's way), such a rule fires where
    Elasticsearch, which tests the whole look-back, may not. A conservative syntactic test:
    True unless every leaf is a lower bound on a growing aggregate, an upper bound on a
    shrinking one or a test of the group's keys, under ``AND``/``OR`` only."""
    functions = {a.name: a.function for a in agg.aggregates}
    keys = {name for name, _ in agg.keys}

    def safe(node: Node) -> bool:
        if isinstance(node, And | Or):
            return all(safe(a) for a in node.args)
        if isinstance(node, Const) or fields_of(node) <= keys:
            return True  # constants and the group's own keys do not change
        if isinstance(node, Compare):
            fn = functions.get(node.field)
            if fn in _GROWING:
                return node.op in (">", ">=")
            if fn in _SHRINKING:
                return node.op in ("<", "<=")
        return False

    return not safe(agg.having)


def _holds_without_fields(condition: Node) -> bool:
    """Whether ``condition`` accepts a record that has none of its fields (so it would pass
    nearly every record of a stream: e.g. ``NOT KQL("tags : x")`` alone)."""
    from ruletag.rules.fields import FieldMap
    from ruletag.rules.reference import evaluate

    try:
        return evaluate(condition, FieldMap.default().view({}))
    except Exception:  # a computed value it cannot take from an empty record: not that case
        return False


def _tests_a_value(node: Node) -> bool:
    """Whether every record ``node`` accepts must have some field value tested positively
    (a pattern with a literal, a number, a regex, a network): not only presence (``IS NOT
    NULL``, ``field : *``), absence or negations, which a stream's records meet in bulk."""
    if isinstance(node, And):
        return any(_tests_a_value(a) for a in node.args)
    if isinstance(node, Or):
        return all(_tests_a_value(a) for a in node.args)
    if isinstance(node, Match):
        return any(isinstance(t, str) and t for t in node.pattern)
    if isinstance(node, Predicate):  # a computed value: compared with something but "not"
        return node.op != "!="
    return isinstance(node, Regex | Cidr | Compare | Equals | FieldRef)
