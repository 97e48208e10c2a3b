"""The rule intermediate form (IR): what every rule front-end produces.

Sigma (``sigma.py``) and Elastic (``elastic.py``, with the EQL, KQL and ES|QL front-ends)
translate rules into these frozen dataclasses; one compiler (``compiler/``) turns a list of
:class:`Rule` into the pattern table, and ``reference.py`` evaluates the same IR slowly and
obviously.

Semantics (shared by every evaluator):

* Field names are written as the rule writes them (``Image``, ``process.name``). The field
  mapping (``fields.py``) resolves a name to the record paths that can supply it, so a rule
  written for one record shape fires on another.
* A field holding a list matches a leaf when *any* element matches; a missing field (or
  ``None``) matches no leaf except :class:`IsNull`. ``Not`` is plain two-valued negation: a
  front-end that needs "field present and not equal" writes ``And(Exists(f), Not(...))``.
* String leaves compare against ``str`` values; ints, floats and bools are compared through
  their canonical text (``"4688"``, ``"true"``); ``bytes`` values are decoded as UTF-8 with
  surrogateescape. Maps never match a string leaf.
* ``cased=False`` means Unicode case-insensitive comparison (``str.casefold``-free: both sides
  are lower-cased with ``str.lower``).

Rules are single-event (``Rule.kind == "event"``), EQL sequences (``Rule.kind ==
"sequence"``), Elastic thresholds (``Rule.kind == "threshold"``) or Sigma correlations
(``Rule.kind == "correlation"``, the referenced rules' conditions linked into its
:class:`Correlation` by the loader): a :class:`Sequence` holds
ordinary single-event conditions as its steps (and its ``until``) plus the join keys and time
bounds, a :class:`Threshold` one base condition plus its group fields, counts and window; the
engines in ``rules/stateful/`` match those conditions and keep the state. Aggregating ES|QL
rules (``Rule.kind == "aggregation"``) carry an :class:`Aggregation`: a base condition, group
keys, aggregates and the condition on the aggregated row. A stateful rule's own
``condition`` is ``Const(False)``, so the single-event table never fires it.

Elastic ``new_terms`` rules (``Rule.kind == "new_terms"``) are stateful the same way: a
:class:`NewTerms` holds one condition plus the term fields and the history window.

An EQL ``sample`` is ``Rule.kind == "sample"`` with a :class:`Sample`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, is_dataclass
from enum import Enum
from typing import Literal


class Wild(Enum):
    """Wildcard tokens inside a :class:`Match` pattern."""

    ANY = "*"  # any run of characters, possibly empty
    ONE = "?"  # exactly one character


Token = str | Wild


class _Hashed:
    """Base of the IR dataclasses: the slot where a value keeps its hash once taken (see
    :func:`_cached_hash`)."""

    __slots__ = ("_hash",)
    _hash: int


# --------------------------------------------------------------------------- leaves


@dataclass(frozen=True, slots=True)
class Match(_Hashed):
    """String pattern on a field: literal text and wildcards, whole-value anchored.

    ``("abc",)`` is equality, ``(Wild.ANY, "abc")`` ends-with, ``(Wild.ANY, "abc", Wild.ANY)``
    contains. ``field=None`` is a Sigma keyword: any string value anywhere in the record.
    Adjacent literal tokens are merged and the empty string is ``()``.
    """

    field: str | None
    pattern: tuple[Token, ...]
    cased: bool = False


@dataclass(frozen=True, slots=True)
class Regex(_Hashed):
    """RE2-syntax regular expression, unanchored search. ``flags`` is a subset of ``"ims"``."""

    field: str | None
    pattern: str
    flags: str = ""


@dataclass(frozen=True, slots=True)
class Cidr(_Hashed):
    """The field holds an IP address inside one of ``networks`` (IPv4 or IPv6 text)."""

    field: str
    networks: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Compare(_Hashed):
    """Numeric comparison; numeric strings are parsed. ``op`` in ``< <= > >=``."""

    field: str
    op: Literal["<", "<=", ">", ">="]
    value: int | float


@dataclass(frozen=True, slots=True)
class Equals(_Hashed):
    """Typed equality with a number or bool (``EventID: 4688``); numeric strings compare too."""

    field: str
    value: int | float | bool


@dataclass(frozen=True, slots=True)
class IsNull(_Hashed):
    """The field is missing or null (Sigma ``field: null``, EQL ``field == null``)."""

    field: str


@dataclass(frozen=True, slots=True)
class Exists(_Hashed):
    """The field is present and not null."""

    field: str


@dataclass(frozen=True, slots=True)
class FieldRef(_Hashed):
    """Compare two fields of the same record (Sigma ``fieldref``).

    ``op`` says where the other field's value must appear in this field's value.
    """

    field: str
    other: str
    op: Literal["eq", "startswith", "endswith", "contains"] = "eq"
    cased: bool = False


# Value expressions, only for the slow generic :class:`Call` leaf.


@dataclass(frozen=True, slots=True)
class FieldValue(_Hashed):
    """The value(s) of a field, as an argument of a function call."""

    field: str


@dataclass(frozen=True, slots=True)
class Literal_(_Hashed):
    """A constant argument."""

    value: str | int | float | bool | None


@dataclass(frozen=True, slots=True)
class Call(_Hashed):
    """A function result, as an argument of another call or of :class:`Predicate`."""

    name: str  # EQL function name, lower-case, without the ``~``
    args: tuple[FieldValue | Literal_ | Call, ...]
    cased: bool = True


ValueExpr = FieldValue | Literal_ | Call


@dataclass(frozen=True, slots=True)
class Predicate(_Hashed):
    """Generic comparison ``left <op> right`` on computed values (slow path, few rules).

    ``op`` is one of ``== != < <= > >= : like regex in``; ``right`` is a tuple for ``in``
    and for the list forms of ``:``/``like``/``regex``. ``cased=False`` for ``~`` variants
    and ``:``. A bare boolean call (``startsWith(...)``) is ``Predicate(call, "==", True)``.
    """

    left: ValueExpr
    op: str
    right: ValueExpr | tuple[ValueExpr, ...]
    cased: bool = True


# --------------------------------------------------------------------------- logic


@dataclass(frozen=True, slots=True)
class And(_Hashed):
    args: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Or(_Hashed):
    args: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Not(_Hashed):
    arg: Node


@dataclass(frozen=True, slots=True)
class Const(_Hashed):
    value: bool


Leaf = Match | Regex | Cidr | Compare | Equals | IsNull | Exists | FieldRef | Predicate
Node = Leaf | And | Or | Not | Const

#: The row column ``NOW()`` reads after an ES|QL ``STATS``: the event time of the record that is
#: being aggregated (the watermark), where Elasticsearch has the time of the rule's run. Here
#: (not in :mod:`ruletag.rules.esql_stats`) so the aggregation engine does not import the
#: ES|QL front-end and its parser.
NOW_FIELD = "\0now"

LEAF_TYPES = (Match, Regex, Cidr, Compare, Equals, IsNull, Exists, FieldRef, Predicate)


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True, slots=True)
class Attack(_Hashed):
    """One ATT&CK tactic or technique (sub-techniques use ``T1218.011``)."""

    id: str
    name: str


@dataclass(frozen=True, slots=True)
class Logsource(_Hashed):
    """Sigma logsource; the field mapping turns it into a condition at compile time."""

    product: str | None = None
    category: str | None = None
    service: str | None = None


@dataclass(frozen=True, slots=True)
class Step(_Hashed):
    """One step of a :class:`Sequence`: a single-event condition and its join-key fields
    (the sequence's shared ``by`` fields first, then the step's own), lined up by position."""

    condition: Node
    keys: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class MissingStep(_Hashed):
    """A missing-event clause ``![...]`` of a :class:`Sequence`: ``position`` is the number of
    positive steps before it (0: leading, ``len(steps)``: trailing, else between two)."""

    position: int
    step: Step


@dataclass(frozen=True, slots=True)
class Sequence(_Hashed):
    """An EQL ``sequence``: ``steps`` in order (``with runs=N`` already expanded into N steps),
    ``maxspan`` in seconds (inclusive, from the first event; None: no bound), ``until`` (an
    expiry step keyed like the others), and where event time comes from."""

    steps: tuple[Step, ...]
    maxspan: float | None = None
    until: Step | None = None
    timestamp_field: str = "@timestamp"
    tiebreaker_field: str | None = None
    #: seconds a partial may live when ``maxspan`` is None (the rule's look-back)
    ttl: float = 540.0
    #: missing-event clauses ``![...]``, which are not in ``steps`` (``maxspan`` is then set)
    missing: tuple[MissingStep, ...] = ()


@dataclass(frozen=True, slots=True)
class Threshold(_Hashed):
    """An Elastic ``threshold`` rule: records matching ``condition``, grouped by the values of
    ``fields`` (none: one group), fire when at least ``value`` of them fall within ``window``
    seconds of event time (and, with ``cardinality_field``, they hold at least
    ``cardinality_value`` distinct values of that field)."""

    condition: Node
    fields: tuple[str, ...] = ()
    value: int = 1
    cardinality_field: str | None = None
    cardinality_value: int = 0
    window: float = 540.0
    timestamp_field: str = "@timestamp"


@dataclass(frozen=True, slots=True)
class NewTerms(_Hashed):
    """An Elastic ``new_terms`` rule: a record matching ``condition`` fires for each
    combination of its ``fields`` values (the cartesian product of multi-valued fields; none
    when a field is missing) not seen in the ``history`` seconds of event time before it.
    Event time is ``timestamp_field``, else ``timestamp_fallback`` when that is missing (Kibana's
    ``timestamp_override`` with its ``@timestamp`` fallback)."""

    condition: Node
    fields: tuple[str, ...]
    history: float
    timestamp_field: str = "@timestamp"
    timestamp_fallback: str | None = None


@dataclass(frozen=True, slots=True)
class CorrelationInput(_Hashed):
    """One rule a Sigma correlation refers to, once linked: the reference as written, the
    rule's id, its condition and logsource (None when the rule is itself a correlation: a
    chain, whose linked ``Rule`` is then ``rule``) and, per ``group-by`` entry of the
    correlation, the field to read (an alias resolved)."""

    ref: str
    rule_id: str
    condition: Node | None = None
    fields: tuple[str, ...] = ()
    logsource: Logsource | None = None
    rule: Rule | None = None


@dataclass(frozen=True, slots=True)
class Correlation(_Hashed):
    """A Sigma correlation: ``type`` (``event_count``, ``value_count``, ``temporal``,
    ``temporal_ordered``, ``value_sum``, ``value_avg``, ``value_percentile``,
    ``value_median``) over the rules ``refs`` (ids or names), grouped by ``group_by``, within
    ``timespan`` seconds, when every ``(operator, value)`` of ``condition`` holds (ANDed);
    ``field`` holds the condition's field(s), ``aliases`` maps alias -> ((rule name, field),
    ...). ``inputs`` is empty until the loader links the references; ``emit`` is False for an
    inner correlation of a chain whose outer rules all say ``generate: false``."""

    type: str
    refs: tuple[str, ...]
    timespan: float
    group_by: tuple[str, ...] = ()
    condition: tuple[tuple[str, float], ...] = ()
    field: tuple[str, ...] = ()
    percentile: float | None = None
    aliases: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()
    generate: bool = False
    inputs: tuple[CorrelationInput, ...] = ()
    emit: bool = True
    timestamp_field: str = "@timestamp"


@dataclass(frozen=True, slots=True)
class Sample(_Hashed):
    """An EQL ``sample by``: one distinct record per step, all with the same join-key values
    (the steps' ``keys`` line up by position), in any order, within ``ttl`` seconds (the
    rule's look-back) of the key's first record."""

    steps: tuple[Step, ...]
    ttl: float = 540.0
    timestamp_field: str = "@timestamp"


@dataclass(frozen=True, slots=True)
class Case(_Hashed):
    """ES|QL ``CASE`` as a value: the value of the first branch whose condition holds, else
    ``default`` (``Literal_(None)`` when the query gives none)."""

    branches: tuple[tuple[Node, AggValue], ...]
    default: AggValue


AggValue = ValueExpr | Case


@dataclass(frozen=True, slots=True)
class Aggregate(_Hashed):
    """One aggregate column of an :class:`Aggregation`: ``function`` (``count``,
    ``count_distinct``, ``values``, ``min``, ``max``, ``sum``, ``avg``) over ``value``, computed
    per record (None: ``COUNT(*)``, every record) that satisfies ``filter`` (``STATS ... WHERE``).
    Null values are skipped."""

    name: str
    function: str
    value: AggValue | None = None
    filter: Node = Const(True)


@dataclass(frozen=True, slots=True)
class Aggregation(_Hashed):
    """An aggregating ES|QL rule (``... | STATS aggs BY keys | WHERE ...``).

    Records matching ``condition`` (every ``WHERE`` before ``STATS``) are grouped by the values
    of ``keys`` (column name, per-record value; a multi-valued key puts the record in every
    group, a null key in the null group), ``aggregates`` are computed over each group's records
    in the event-time ``window`` (the rule's look-back, seconds) and the group fires when
    ``having`` (the commands after ``STATS``, over the columns of the aggregated row) holds.
    ``omitted`` names the aggregate columns that are not computed: no condition reads them and
    their inputs use functions ruletag does not evaluate."""

    condition: Node
    keys: tuple[tuple[str, AggValue], ...] = ()
    aggregates: tuple[Aggregate, ...] = ()
    having: Node = Const(True)
    omitted: tuple[str, ...] = ()
    window: float = 360.0
    #: ``MV_EXPAND`` fields: a record is one row per combination of their values, and
    #: ``row_condition`` (the ``WHERE`` parts that read them) is tested per row
    expand: tuple[str, ...] = ()
    row_condition: Node = Const(True)
    timestamp_field: str = "@timestamp"


Severity = Literal["informational", "low", "medium", "high", "critical"]

#: Risk score given to rules that carry none (Sigma), by severity; Elastic's own convention.
DEFAULT_RISK_SCORE: dict[str, int] = {
    "informational": 21,
    "low": 21,
    "medium": 47,
    "high": 73,
    "critical": 99,
}


@dataclass(frozen=True, slots=True)
class Rule(_Hashed):
    """One detection rule in IR form, with the metadata its annotations carry."""

    id: str
    name: str
    source: Literal["sigma", "elastic"]
    condition: Node
    path: str = ""
    line: int = 1
    severity: str = "medium"
    risk_score: int = 47
    author: tuple[str, ...] = ()
    tactics: tuple[Attack, ...] = ()
    techniques: tuple[Attack, ...] = ()
    logsource: Logsource | None = None
    modified: str = ""  # ISO date of the last change; the newest copy of a duplicate id wins
    kind: Literal[
        "event", "sequence", "threshold", "new_terms", "correlation", "sample", "aggregation"
    ] = "event"
    tags: tuple[str, ...] = field(default=())
    building_block: bool = False  # Elastic ``building_block_type``: an input to other rules
    status: str = ""  # Sigma ``status`` / Elastic ``metadata.maturity``, as the file says it
    rule_type: str = ""  # Elastic rule ``type`` (query, eql, esql, ...); "" for Sigma
    sequence: Sequence | None = None  # set when ``kind == "sequence"``
    threshold: Threshold | None = None  # set when ``kind == "threshold"``
    new_terms: NewTerms | None = None  # set when ``kind == "new_terms"``
    correlation: Correlation | None = None  # set when ``kind == "correlation"``
    ref_name: str = ""  # Sigma ``name``: how correlation rules may refer to the rule
    sample: Sample | None = None  # set when ``kind == "sample"``
    aggregation: Aggregation | None = None  # set when ``kind == "aggregation"``


def value_fields(v: ValueExpr | tuple[ValueExpr, ...]) -> tuple[str, ...]:
    """The fields a value expression (or a tuple of them) reads, in order, each once."""
    out: dict[str, None] = {}

    def walk(x: ValueExpr | tuple[ValueExpr, ...]) -> None:
        if isinstance(x, tuple):
            for y in x:
                walk(y)
        elif isinstance(x, FieldValue):
            out[x.field] = None
        elif isinstance(x, Call):
            for a in x.args:
                walk(a)

    walk(v)
    return tuple(out)


def leaf_fields(leaf: Leaf) -> tuple[str, ...]:
    """The fields a leaf reads, in order (none for a keyword :class:`Match`)."""
    if isinstance(leaf, Predicate):
        right = leaf.right if isinstance(leaf.right, tuple) else (leaf.right,)
        return value_fields((leaf.left, *right))
    if isinstance(leaf, FieldRef):
        return (leaf.field, leaf.other)
    return () if leaf.field is None else (leaf.field,)


def fields_of(node: Node) -> set[str]:
    """Every field name a condition reads (``None`` keyword fields excluded)."""
    if isinstance(node, And | Or):
        return set().union(*(fields_of(a) for a in node.args))
    if isinstance(node, Not):
        return fields_of(node.arg)
    if isinstance(node, Const):
        return set()
    return set(leaf_fields(node))


def _unguarded_repr(cls: type) -> None:
    """Drop the recursion guard ``dataclasses`` wraps ``__repr__`` in (the same text).

    IR values are built bottom-up and frozen, so they hold no cycles to guard against; the
    guard took 40% of ``repr``, and the stateful rules' step-table keys and state digests are
    the ``repr`` of their conditions (~0.1 s of each start with every rule)."""
    inner = getattr(cls.__repr__, "__wrapped__", None)
    if inner is not None:
        cls.__repr__ = inner  # type: ignore[method-assign]


def _cached_hash(cls: type) -> None:
    """Make ``cls`` keep its hash once taken (the same value).

    The generated hash hashes the tuple of the fields, so hashing a condition hashes its
    whole tree again, each time: building the stateful engines of every corpus rule took
    142,737 hashes for 1,944 dictionary lookups. Values are frozen, so the hash never
    changes; copies and pickles carry only the fields."""
    inner: Callable[[object], int] = cls.__hash__  # type: ignore[assignment]

    def __hash__(self: _Hashed) -> int:
        try:
            return self._hash
        except AttributeError:
            h = inner(self)
            object.__setattr__(self, "_hash", h)
            return h

    cls.__hash__ = __hash__  # type: ignore[method-assign,assignment]


for _cls in list(globals().values()):
    if isinstance(_cls, type) and is_dataclass(_cls) and _cls.__module__ == __name__:
        _unguarded_repr(_cls)
        _cached_hash(_cls)
del _cls
