"""The compiled pattern table: every rule's IR compiled into one precompiled matcher.

Per record the work is a handful of Hyperscan scans (one per present field, in C) plus the
boolean formulas of the rules that one of those scans *triggered*; no per-rule Python loop.

* String atoms (:class:`~ruletag.rules.ir.Match`, :class:`~ruletag.rules.ir.Regex`) of every
  rule are grouped by field (fields with the same paths and derivations, such as ``Image`` and
  ``process.executable``, share a group); each group gets one Hyperscan database (cased,
  caseless and regex atoms, per-pattern flags) scanned once per value. A record is flattened
  once (``RecordView.flat``); groups whose paths the record lacks are skipped. Regexes
  Hyperscan rejects, or whose semantics could differ from RE2 on a given value (non-ASCII
  text, a trailing newline), are run by RE2 (linear time).
* Other leaves are evaluated lazily, only for candidate rules, with a per-record cache.
* Each rule gets a *trigger* set (And -> its most selective child, Or -> every child, Not ->
  none): atoms one of which must hit for the rule to be true. Only rules whose trigger atom hit
  are evaluated; rules without a trigger ("always" rules) are listed in ``stats``. Leaves that
  only need their field to exist trigger through the record's key names (``raw_keys``).
* Each rule formula is compiled once into Python code (``marshal``-ed in the table file).
* :meth:`CompiledTable.match_entries` pre-filters raw msgpack bytes (``prefilter.py``: each
  rule's raw requirement, checked with Hyperscan scans of the chunk and of triggered entries),
  decodes only the entries that meet some rule's requirement and evaluates only those rules
  (:meth:`CompiledTable.match_subset`).
"""

from __future__ import annotations

import bisect
import dataclasses
import gc
import hashlib
import io
import logging
import marshal
import math
import pickle
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import CodeType
from typing import Any

import hyperscan as hs
import msgpack
import re2

from ruletag.errors import RuletagError
from ruletag.rules import prefilter
from ruletag.rules.algebra import (
    as_text,
    equals_value,
    ip_of,
    network_of,
    number_of,
    re2_search,
    simplify,
)
from ruletag.rules.fields import FieldMap, RecordView
from ruletag.rules.ir import (
    And,
    Cidr,
    Compare,
    Const,
    Equals,
    Exists,
    FieldRef,
    IsNull,
    Match,
    Node,
    Not,
    Or,
    Predicate,
    Regex,
    Rule,
    Wild,
)
from ruletag.rules.prefilter import compile_db, encode, hs_escape, load_db

log = logging.getLogger(__name__)

__all__ = ["CompiledTable"]

#: Values up to this many characters have their scan results cached (per table) ...
_CACHE_TEXT = 256
#: ... in at most this many (group, value) entries; the cache is emptied when full.
_CACHE_ENTRIES = 1 << 16
_MAGIC = b"RULETAG-TABLE\x00v4\n"  # v4: the pre-filter keeps its plan for re-tuning
#: One UTF-8 encoded character (values are encoded with ``surrogatepass``, so well formed).
_ONE_CHAR = (
    rb"(?:[\x00-\x7f]|[\xc0-\xdf][\x80-\xbf]"
    rb"|[\xe0-\xef][\x80-\xbf]{2}|[\xf0-\xf7][\x80-\xbf]{3})"
)

Hits = set[int]
Formula = Callable[[Hits, Callable[[int], bool]], bool]
Lazy = Callable[[RecordView, dict[int, Any]], bool]
#: The small table of often-passed rules: (table, rule -> its index there, index -> rule).
HotTable = tuple["CompiledTable", dict[int, int], tuple[int, ...]]


class TableError(RuletagError):
    """A table file is unreadable or was written by an incompatible version."""


# --------------------------------------------------------------------------- values


def _match_regex(m: Match) -> bytes:
    """Hyperscan pattern (bytes mode, DOTALL) for a Match atom; lower-cased if caseless.

    A leading/trailing ``*`` drops the anchor instead of becoming ``.*``, so contains,
    startswith and endswith stay plain literal searches for Hyperscan.
    """
    toks = list(m.pattern)
    head = rb"\A"
    tail = rb"\z"
    if toks and toks[0] is Wild.ANY:
        head = b""
        while toks and toks[0] is Wild.ANY:
            toks.pop(0)
    if toks and toks[-1] is Wild.ANY:
        tail = b""
        while toks and toks[-1] is Wild.ANY:
            toks.pop()
    parts = [head]
    for tok in toks:
        if tok is Wild.ANY:
            parts.append(rb".*")
        elif tok is Wild.ONE:
            parts.append(_ONE_CHAR)
        else:
            parts.append(hs_escape(encode(tok if m.cased else tok.lower())))
    parts.append(tail)
    out = b"".join(parts)
    return out or rb"\A"  # "*" alone: any value (ALLOWEMPTY makes the empty match count)


def _longest_literal(m: Match) -> str:
    lits = [t for t in m.pattern if isinstance(t, str)]
    return max(lits, key=len) if lits else ""


# --------------------------------------------------------------------------- normalisation


def _leaves(n: Node, out: dict[Node, int]) -> None:
    if isinstance(n, And | Or):
        for a in n.args:
            _leaves(a, out)
    elif isinstance(n, Not):
        _leaves(n.arg, out)
    elif not isinstance(n, Const) and n not in out:
        out[n] = len(out)


def _trigger(
    n: Node, leaf: Callable[[Node], frozenset[int] | None], cost: Callable[[int], float]
) -> frozenset[int] | None:
    """Atoms one of which must hit for ``n`` to be true; None = can be true without a hit."""
    if isinstance(n, Const):
        return None if n.value else frozenset()
    if isinstance(n, Not):
        return None
    if isinstance(n, Or):
        acc: set[int] = set()
        for a in n.args:
            t = _trigger(a, leaf, cost)
            if t is None:
                return None
            acc |= t
        return frozenset(acc)
    if isinstance(n, And):
        best: frozenset[int] | None = None
        best_cost = math.inf
        for a in n.args:
            t = _trigger(a, leaf, cost)
            if t is None:
                continue
            c = sum(cost(x) for x in t)
            if c < best_cost:
                best, best_cost = t, c
        return best
    return leaf(n)


# --------------------------------------------------------------------------- scanning


def _hs_try(patterns: Sequence[tuple[int, bytes, int]]) -> Any:
    """One Hyperscan database of (id, pattern, flags), or None if Hyperscan rejects one."""
    try:
        return compile_db(patterns)
    except hs.error:
        return None


def _hs_compile(
    patterns: Sequence[tuple[int, bytes, int]],
) -> tuple[hs.Database | None, list[int]]:
    """Compile (id, pattern, flags); returns the database (None if Hyperscan rejected every
    pattern) and the ids Hyperscan rejected."""
    rejected: list[int] = []
    todo = list(patterns)
    while True:
        db = _hs_try(todo)
        if db is not None:
            return db, rejected
        # Find the offending pattern(s) one by one; happens rarely (regex atoms only).
        good = []
        for item in todo:
            if _hs_try([item]) is not None:
                good.append(item)
            else:
                rejected.append(item[0])
        todo = good
        if not todo:
            return None, rejected


@dataclass(slots=True)
class _Group:
    """The string atoms of one field (``None`` = keywords) and their one database.

    Cased, caseless and regex atoms share one Hyperscan database (per-pattern flags), so an
    ASCII value costs one scan. Non-ASCII values are scanned as is for the cased atoms and
    lower-cased for the caseless ones, and their regexes run by RE2 (as do values ending in a
    newline, where ``$`` semantics could differ).
    """

    field: str | None
    cased: list[tuple[int, bytes]]
    caseless: list[tuple[int, bytes]]
    regex: list[tuple[int, str, str]]  # id, pattern, flags
    db: Any = None
    hs_regex: tuple[int, ...] = ()  # regex atoms compiled into ``db``
    re2_all: tuple[tuple[int, Any], ...] = ()  # every regex atom, compiled by RE2
    re2_only: tuple[tuple[int, Any], ...] = ()  # regex atoms Hyperscan cannot take
    cased_ids: frozenset[int] = frozenset()
    caseless_ids: frozenset[int] = frozenset()

    def compile(self) -> None:
        fl = hs.HS_FLAG_SINGLEMATCH | hs.HS_FLAG_ALLOWEMPTY | hs.HS_FLAG_DOTALL
        lits = [(i, p, fl) for i, p in self.cased]
        lits += [(i, p, fl | hs.HS_FLAG_CASELESS) for i, p in self.caseless]
        regex = self._hs_regex_patterns()
        bad: set[int] = set()
        if lits or regex:
            self.db = _hs_try([*lits, *regex])
            if self.db is None:
                # find the regexes Hyperscan rejects among the regexes alone (cheap), then
                # compile the rest (probing everything only if that still fails)
                bad.update(_hs_compile(regex)[1] if regex else ())
                self.db, more = _hs_compile([x for x in (*lits, *regex) if x[0] not in bad])
                bad.update(more)
        self.hs_regex = tuple(i for i, _, _ in regex if i not in bad)
        self._init_runtime()

    def _hs_regex_patterns(self) -> list[tuple[int, bytes, int]]:
        out: list[tuple[int, bytes, int]] = []
        for i, pat, flags in self.regex:
            if not pat.isascii():
                continue
            f = hs.HS_FLAG_SINGLEMATCH | hs.HS_FLAG_ALLOWEMPTY | hs.HS_FLAG_UTF8
            f |= hs.HS_FLAG_CASELESS if "i" in flags else 0
            f |= hs.HS_FLAG_MULTILINE if "m" in flags else 0
            f |= hs.HS_FLAG_DOTALL if "s" in flags else 0
            out.append((i, pat.encode(), f))
        return out

    def _init_runtime(self) -> None:
        """RE2 programs and id sets (rebuilt after loading, never stored)."""
        r2: list[tuple[int, Any]] = []
        for i, pat, flags in self.regex:
            try:
                prefix = f"(?{''.join(sorted(set(flags)))})" if flags else ""
                r2.append((i, re2.compile(prefix + pat)))
            except re2.error:
                continue  # invalid: never matches (front-ends reject these)
        in_db = set(self.hs_regex) if self.db is not None else set()
        self.re2_all = tuple(r2)
        self.re2_only = tuple(x for x in r2 if x[0] not in in_db)
        self.cased_ids = frozenset(i for i, _ in self.cased)
        self.caseless_ids = frozenset(i for i, _ in self.caseless)

    def scan(
        self,
        values: Iterable[object],
        hits: Hits,
        on_match: Callable[..., None] | None = None,
        cache: dict[tuple[int, str], tuple[int, ...]] | None = None,
    ) -> None:
        """Add the atoms ``values`` hit to ``hits`` (``on_match``: a handler adding to it).

        With ``cache``, the atoms a short value hits are remembered per (group, value): log
        values repeat (images, users, channels), and a repeated one costs a dict lookup
        instead of a Hyperscan scan and its callbacks."""
        for v in values:
            s = as_text(v)
            if s is None:
                continue
            if cache is None or len(s) > _CACHE_TEXT:
                self._scan_value(s, hits, on_match)
                continue
            key = (id(self), s)
            got = cache.get(key)
            if got is None:
                mine: Hits = set()
                self._scan_value(s, mine, None)
                got = tuple(mine)
                if len(cache) >= _CACHE_ENTRIES:
                    cache.clear()
                cache[key] = got
            hits.update(got)

    def _scan_value(self, s: str, hits: Hits, on_match: Callable[..., None] | None) -> None:
        """Add the atoms the text ``s`` hits to ``hits`` (``on_match``: a handler adding
        to it, or None)."""
        add = hits.add
        if on_match is None:

            def on_match(i: int, _f: int, _t: int, _fl: int, _c: object) -> None:
                add(i)

        db = self.db
        rest = self.re2_all
        if s.isascii():
            if db is not None:
                if rest and s.endswith("\n"):
                    self._scan_only(s.encode(), self.cased_ids | self.caseless_ids, add)
                else:
                    db.scan(s.encode(), match_event_handler=on_match)
                    rest = self.re2_only
        elif db is not None:
            if self.cased_ids:
                self._scan_only(encode(s), self.cased_ids, add)
            if self.caseless_ids:
                self._scan_only(encode(s.lower()), self.caseless_ids, add)
        for i, rx in rest:
            if i not in hits and re2_search(rx, s):
                add(i)

    def _scan_only(self, data: bytes, ids: frozenset[int], add: Callable[[int], None]) -> None:
        """Scan ``data``, keeping only the hits of ``ids``."""

        def on_match(i: int, _f: int, _t: int, _fl: int, _c: object) -> None:
            if i in ids:
                add(i)

        self.db.scan(data, match_event_handler=on_match)

    def __getstate__(self) -> dict[str, Any]:
        return {
            "field": self.field,
            "cased": self.cased,
            "caseless": self.caseless,
            "regex": self.regex,
            "db": hs.dumpb(self.db) if self.db is not None else None,
            "hs_regex": self.hs_regex,
        }

    def __setstate__(self, st: dict[str, Any]) -> None:
        self.field, self.cased, self.caseless, self.regex = (
            st["field"],
            st["cased"],
            st["caseless"],
            st["regex"],
        )
        self.db = _load_db(st["db"])
        self.hs_regex = st["hs_regex"]
        self._init_runtime()


def _load_db(blob: bytes | None) -> Any:
    return None if blob is None else load_db(blob)


# --------------------------------------------------------------------------- lazy leaves


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


def _lazy_fn(leaf: Node, kw: Callable[[RecordView, dict[int, Any]], Hits], atom: int) -> Lazy:
    """A function ``(view, per-record cache) -> bool`` for one lazily evaluated leaf."""
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
        return lambda view, _c: any(equals_value(v, want) for v in view.values(f))
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
            xs = [s for s in map(as_text, view.values(f)) if s is not None]
            ys = [s for s in map(as_text, view.values(g)) if s is not None]
            if not cased:
                xs = [s.lower() for s in xs]
                ys = [s.lower() for s in ys]
            return any(_fieldref(x, y, how) for x in xs for y in ys)

        return ref
    if isinstance(leaf, Predicate):
        # Generic computed comparison (few EQL rules): the function semantics live in one
        # place, the reference evaluator, which implements them with functions.py.
        from ruletag.rules.reference import evaluate

        return lambda view, _c: bool(evaluate(leaf, view))
    raise TypeError(f"unknown leaf {leaf!r}")


# --------------------------------------------------------------------------- code generation


class _CodeGen:
    """Turns rule formulas into one Python module of ``def _r<N>(h, L): return ...``."""

    def __init__(self, atom_of: Mapping[Node, int], eager: frozenset[int]) -> None:
        self.atom_of = atom_of
        self.eager = eager
        self.consts: list[frozenset[int]] = []

    def _set(self, ids: Iterable[int]) -> str:
        self.consts.append(frozenset(ids))
        return f"_S[{len(self.consts) - 1}]"

    def expr(self, n: Node) -> str:
        if isinstance(n, Const):
            return "True" if n.value else "False"
        if isinstance(n, Not):
            return f"(not {self.expr(n.arg)})"
        if isinstance(n, And | Or):
            atoms = [self.atom_of[a] for a in n.args if self._is_eager(a)]
            rest = [self.expr(a) for a in n.args if not self._is_eager(a)]
            parts: list[str] = []
            if len(atoms) == 1:
                parts.append(f"({atoms[0]} in h)")
            elif atoms:
                s = self._set(atoms)
                parts.append(f"({s} <= h)" if isinstance(n, And) else f"(not h.isdisjoint({s}))")
            parts.extend(rest)
            return "(" + (" and " if isinstance(n, And) else " or ").join(parts) + ")"
        i = self.atom_of[n]
        return f"({i} in h)" if i in self.eager else f"L({i})"

    def _is_eager(self, n: Node) -> bool:
        return not isinstance(n, And | Or | Not | Const) and self.atom_of[n] in self.eager

    def module(self, formulas: Sequence[Node]) -> str:
        lines = [f"def _r{k}(h, L):\n    return {self.expr(f)}" for k, f in enumerate(formulas)]
        lines.append(f"_RULES = ({''.join(f'_r{k}, ' for k in range(len(formulas)))})")
        return "\n".join(lines) + "\n"


def _exec_module(code: Any, consts: Sequence[frozenset[int]]) -> tuple[Formula, ...]:
    ns: dict[str, Any] = {"_S": tuple(consts)}
    old = sys.getrecursionlimit()
    exec(code, ns)
    sys.setrecursionlimit(old)
    return ns["_RULES"]


def _record_keys(obj: Mapping[Any, object], out: set[str]) -> None:
    """Every key name at any depth (dotted keys also split into their parts)."""
    for k, v in obj.items():
        if isinstance(k, str):
            out.add(k)
            if "." in k:
                out.update(k.split("."))
        if isinstance(v, dict):
            _record_keys(v, out)
        elif isinstance(v, list):
            for x in v:
                if isinstance(x, dict):
                    _record_keys(x, out)


# --------------------------------------------------------------------------- the table


class CompiledTable:
    """Every rule compiled into one matcher; rule numbers are indexes into :attr:`rules`."""

    rules: tuple[Rule, ...]
    version: str
    stats: dict[str, Any]
    fieldmap: FieldMap

    # Instance state, set by ``_build`` or ``_from_state`` (``_STATE_KEYS`` are saved).
    #: the field groups (field not None), scanned eagerly; the keyword group (field None)
    _groups: tuple[_Group, ...]
    _kw_group: _Group | None
    #: atom -> its leaf; after loading, eager atoms (scanned, never evaluated) are None
    _leaves: tuple[Node | None, ...]
    _key_atom: dict[str, int]  # key name -> its pseudo atom
    _key_groups: dict[str, tuple[int, ...]]  # key name -> the field groups it can supply
    _scan_always: tuple[int, ...]  # field groups without key names: always scanned
    _trig: dict[int, tuple[int, ...]]  # atom -> the rules it triggers
    _always: tuple[int, ...]  # rules without a trigger
    _kw_eager: bool  # a keyword atom is a trigger: scan every string of every record
    _source: str
    _consts: tuple[frozenset[int], ...]
    _code: CodeType
    _formulas: tuple[Formula, ...]
    _eager: frozenset[int]
    _rule_groups: tuple[tuple[int, ...], ...]  # rule -> the field groups it reads
    _raw_db: prefilter.RawFilter | None
    _raw_forced: tuple[int, ...]  # rules the pre-filter cannot restrict
    #: per field group: its direct record paths, None if the field is derived
    _group_paths: tuple[frozenset[str] | None, ...]
    _lazy: dict[int, Lazy]
    #: (group, short value) -> the atoms it hits (see :meth:`_Group.scan`)
    _value_cache: dict[tuple[int, str], tuple[int, ...]]
    _hot: HotTable | None
    _next_hot: HotTable | None

    # ------------------------------------------------------------------ build

    @classmethod
    def build(
        cls, rules: Sequence[Rule], fieldmap: FieldMap | None = None, version: str = ""
    ) -> CompiledTable:
        """Compile ``rules`` (logsource conditions included) with ``fieldmap``."""
        return cls._build(rules, fieldmap or FieldMap.default(), version, raw=True)

    @classmethod
    def _build(cls, rules: Sequence[Rule], fm: FieldMap, version: str, raw: bool) -> CompiledTable:
        t0 = time.perf_counter()
        self = cls.__new__(cls)
        self.rules = tuple(rules)
        self.version = version
        self.fieldmap = fm
        formulas: list[Node] = []
        for r in self.rules:
            cond: Node = r.condition
            ls = fm.logsource_condition(r.logsource) if r.logsource is not None else None
            if ls is not None:
                cond = And((ls, cond))
            formulas.append(simplify(cond))

        atom_of: dict[Node, int] = {}
        shared: dict[int, int] = {}  # atom -> how many rules use it (logsource atoms: many)
        for f in formulas:
            mine: dict[Node, int] = {}
            _leaves(f, mine)
            for n in mine:
                a = atom_of.setdefault(n, len(atom_of))
                shared[a] = shared.get(a, 0) + 1
        leaves = list(atom_of)
        raw_keys_cache: dict[str, frozenset[str]] = {}

        def raw_keys(field: str) -> frozenset[str]:
            if field not in raw_keys_cache:
                raw_keys_cache[field] = frozenset(fm.raw_keys(field))
            return raw_keys_cache[field]

        # String atoms on a field are scanned eagerly; keyword atoms (field None) lazily.
        # Fields that read the same paths with the same derivations (a Sigma name and its ECS
        # alias: Image / process.executable) have the same values: one group scans them once.
        same_values: dict[object, str] = {}

        def group_key(field: str | None) -> str | None:
            if field is None:
                return None
            sig = (frozenset(fm.paths(field)), fm.derivations(field))
            return same_values.setdefault(sig, field)

        groups: dict[str | None, _Group] = {}
        eager: set[int] = set()
        for leaf, i in atom_of.items():
            if isinstance(leaf, Match | Regex):
                gk = group_key(leaf.field)
                g = groups.get(gk)
                if g is None:
                    g = groups[gk] = _Group(gk, [], [], [])
                if isinstance(leaf, Match):
                    (g.cased if leaf.cased else g.caseless).append((i, _match_regex(leaf)))
                else:
                    g.regex.append((i, leaf.pattern, leaf.flags))
                if leaf.field is not None:
                    eager.add(i)

        # Key-name pseudo atoms: a leaf that needs its field present triggers on its keys.
        key_atom: dict[str, int] = {}

        def keys_trigger(fields: Iterable[str]) -> frozenset[int] | None:
            ids: set[int] = set()
            for f in fields:
                ks = raw_keys(f)
                if not ks:
                    return None
                for k in ks:
                    ids.add(key_atom.setdefault(k, len(leaves) + len(key_atom)))
            return frozenset(ids)

        def leaf_trigger(n: Node) -> frozenset[int] | None:
            i = atom_of[n]
            if i in eager:
                return frozenset((i,))
            if isinstance(n, Match | Regex):  # keyword atom: a costly trigger, scanned lazily
                return frozenset((i,))
            if isinstance(n, Equals | Compare | Cidr | Exists):
                return keys_trigger((n.field,))
            if isinstance(n, FieldRef):
                return keys_trigger((n.field,))
            return None

        def cost(a: int) -> float:
            if a >= len(leaves):
                return 1.0
            n = leaves[a]
            if a not in eager:
                return 5.0  # keyword atom: scanning every string of every record
            # an atom many rules share (a logsource test) is likely frequent in the data
            spread = 1.0 + shared.get(a, 1) / 4
            if isinstance(n, Match):
                lit = _longest_literal(n)
                anchored = 0.5 if n.pattern and isinstance(n.pattern[0], str) else 1.0
                return spread * anchored / (1 + len(lit))
            return spread * 0.3

        trig: dict[int, list[int]] = {}
        always: list[int] = []
        never: list[int] = []
        for k, f in enumerate(formulas):
            t = _trigger(f, leaf_trigger, cost)
            if t is None:
                always.append(k)
            elif not t:
                never.append(k)
            else:
                for a in t:
                    trig.setdefault(a, []).append(k)

        for g in groups.values():
            g.compile()
        self._groups = tuple(g for g in groups.values() if g.field is not None)
        self._kw_group = groups.get(None)
        self._leaves = tuple(leaves)
        self._key_atom = key_atom
        # key name -> indexes of the field groups it can supply
        key_groups: dict[str, list[int]] = {}
        scan_always: list[int] = []
        for gi, g in enumerate(self._groups):
            assert g.field is not None
            ks = raw_keys(g.field)
            if not ks:
                scan_always.append(gi)
            for key in ks:
                key_groups.setdefault(key, []).append(gi)
        self._key_groups = {k: tuple(v) for k, v in key_groups.items()}
        self._scan_always = tuple(scan_always)
        self._trig = {a: tuple(v) for a, v in trig.items()}
        self._always = tuple(always)
        self._kw_eager = any(a < len(leaves) and a not in eager for a in trig)

        gen = _CodeGen(atom_of, frozenset(eager))
        self._source = gen.module(formulas)
        self._consts = tuple(gen.consts)
        self._code = compile(self._source, "<ruletag-table>", "exec")
        self._formulas = _exec_module(self._code, self._consts)
        self._eager = frozenset(eager)
        self._init_lazy()

        self.stats = {
            "rules": len(self.rules),
            "atoms": len(leaves),
            "string_atoms": sum(
                len(g.cased) + len(g.caseless) + len(g.regex) for g in groups.values()
            ),
            "fields": len(self._groups),
            "databases": sum(g.db is not None for g in groups.values()),
            "regex_re2_only": sum(len(g.re2_only) for g in groups.values()),
            "rules_without_literal": [self.rules[k].id for k in always],
            "rules_never_matching": [self.rules[k].id for k in never],
        }
        group_of = {g.field: gi for gi, g in enumerate(self._groups)}
        rule_groups: list[tuple[int, ...]] = []
        for f in formulas:
            mine = {}
            _leaves(f, mine)
            gis = {
                group_of[group_key(n.field)]
                for n in mine
                if isinstance(n, Match | Regex) and n.field
            }
            rule_groups.append(tuple(sorted(gis)))
        self._rule_groups = tuple(rule_groups)
        self._raw_db = None
        self._raw_forced = ()
        if raw:
            self._build_raw(formulas, fm)
        self._init_tuning()
        self.stats["compile_seconds"] = round(time.perf_counter() - t0, 3)
        return self

    def _build_raw(self, formulas: Sequence[Node], fm: FieldMap) -> None:
        """The raw-bytes pre-filter (``prefilter.py``); rules it cannot restrict are
        evaluated on every entry."""
        self._raw_db, forced, raw_stats = prefilter.build_raw_filter(formulas, fm)
        self._raw_forced = tuple(forced)
        self.stats.update(raw_stats)
        self.stats["rules_without_raw_literal"] = [self.rules[k].id for k in forced]

    def _init_lazy(self) -> None:
        group = self._kw_group
        fm = self.fieldmap
        # per field group: its direct record paths when it has no derivation (a record with
        # none of them has no value for it, so the group is skipped without resolving it)
        self._group_paths = tuple(
            None if fm.derived(g.field) else frozenset(fm.paths(g.field))  # type: ignore[arg-type]
            for g in self._groups
        )

        def kw(view: RecordView, cache: dict[int, Any]) -> Hits:
            st = cache.get(-1)
            if st is None:
                st = cache[-1] = set()
                if group is not None:
                    group.scan(view.strings(), st, None, self._value_cache)
            return st

        lazy: dict[int, Lazy] = {}
        for i, leaf in enumerate(self._leaves):
            if i not in self._eager:
                assert leaf is not None  # a saved table drops only the eager atoms' leaves
                lazy[i] = _lazy_fn(leaf, kw, i)
        self._lazy = lazy

    # ------------------------------------------------------------------ matching

    def match(self, record: Mapping[str, object]) -> list[int]:
        """Indexes (ascending) of the rules that match ``record``."""
        view = self.fieldmap.view(record)
        keys: set[str] = set()
        _record_keys(record, keys)
        hits: Hits = set()
        key_atom = self._key_atom
        key_groups = self._key_groups
        todo: set[int] = set(self._scan_always)
        for k in keys:
            a = key_atom.get(k)
            if a is not None:
                hits.add(a)
            g = key_groups.get(k)
            if g is not None:
                todo.update(g)
        self._scan_groups(view, todo, hits)
        cache: dict[int, Any] = {}
        if self._kw_eager:
            self._kw_group.scan(  # type: ignore[union-attr]
                view.strings(), hits, None, self._value_cache
            )
            cache[-1] = hits
        cand: set[int] = set(self._always)
        trig = self._trig
        for a in hits:
            r = trig.get(a)
            if r is not None:
                cand.update(r)
        if not cand:
            return []
        return self._holding(sorted(cand), view, hits, cache)

    def _holding(
        self, rules: Iterable[int], view: RecordView, hits: Hits, cache: dict[int, Any]
    ) -> list[int]:
        """Those of ``rules`` whose formula holds: the scanned atoms that hit are ``hits``, the
        lazy leaves are evaluated on ``view`` when a formula asks (each once: ``cache``)."""
        lazy = self._lazy

        def L(i: int) -> bool:  # the name the generated code calls
            r = cache.get(i)
            if r is None:
                r = cache[i] = lazy[i](view, cache)
            return r

        f = self._formulas
        return [k for k in rules if f[k](hits, L)]

    def _scan_groups(self, view: RecordView, todo: Iterable[int], hits: Hits) -> None:
        """Scan the values of the field groups ``todo`` that the record has."""
        groups = self._groups
        group_paths = self._group_paths
        flat = view.flat()
        add = hits.add
        cache = self._value_cache

        def on_match(i: int, _f: int, _t: int, _fl: int, _c: object) -> None:
            add(i)

        for gi in todo:
            paths = group_paths[gi]
            if paths is not None and flat.keys().isdisjoint(paths):
                continue
            g = groups[gi]
            vals = view.values(g.field)  # type: ignore[arg-type]
            if vals:
                g.scan(vals, hits, on_match, cache)

    def match_subset(self, record: Mapping[str, object], rules: Iterable[int]) -> list[int]:
        """Which of ``rules`` (indexes) match ``record``, scanning only the fields they read."""
        rules = sorted(rules)
        view = self.fieldmap.view(record)
        hits: Hits = set()
        rule_groups = self._rule_groups
        todo: set[int] = set()
        for k in rules:
            todo.update(rule_groups[k])
        self._scan_groups(view, todo, hits)
        return self._holding(rules, view, hits, {})

    def match_entries(
        self, entries: bytes, spans: Sequence[tuple[int, int]]
    ) -> dict[int, list[int]]:
        """Entry index -> matching rule indexes, for entries with at least one match.

        Only entries that meet some rule's raw requirement are decoded, and only the rules
        whose requirement they meet (plus the rules without one) are evaluated.
        """
        out: dict[int, list[int]] = {}
        if not spans:
            return out
        raw = self._raw_db
        cands = raw.candidates(entries, spans) if raw is not None else {}
        if raw is not None and raw.tune_error is not None:
            log.warning("pre-filter re-tuning failed (compiled triggers kept): %s", raw.tune_error)
            raw.tune_error = None
        if raw is not None and raw.tuned is not None:  # re-tuned on the traffic seen so far
            self._raw_db = raw.tuned
            self._hot = self._next_hot
            self.stats["raw_tuned_on_records"] = raw.tuned.tuned_on
            self.stats["raw_triggers"] = len(raw.tuned.trig_rules) - 1
            self.stats["hot_rules"] = len(self._hot[1]) if self._hot else 0
            log.info(
                "pre-filter re-tuned on %d records: %d triggers, %d often-passed rules in "
                "their own table",
                raw.tuned.tuned_on,
                self.stats["raw_triggers"],
                self.stats["hot_rules"],
            )
        forced = self._raw_forced
        view = memoryview(entries)
        todo: Iterable[int] = range(len(spans)) if forced else sorted(cands)
        hot = self._hot
        for k in todo:
            rules: Iterable[int] = cands.get(k, ())
            if forced:
                rules = set(rules).union(forced)
            s, e = spans[k]
            record = _record_of(view[s:e])
            if record is None:
                continue
            if hot is None:
                m = self.match_subset(record, rules)
            else:
                m = self._match_hot(record, rules, hot)
            if m:
                out[k] = m
        return out

    def _match_hot(
        self,
        record: Mapping[str, object],
        rules: Iterable[int],
        hot: HotTable,
    ) -> list[int]:
        """``match_subset`` with the often-candidate rules evaluated by the small table."""
        sub, pos, back = hot
        mine = [pos[r] for r in rules if r in pos]
        rest = [r for r in rules if r not in pos]
        got = [back[i] for i in sub.match_subset(record, mine)] if mine else []
        if rest:
            got = sorted(got + self.match_subset(record, rest))
        return got

    #: a rule whose trigger fires on more than this share of the records is evaluated by
    #: a table of such rules only (its field databases are a fraction of the full ones)
    HOT_SHARE = 0.01

    def _build_hot(self, tuned: prefilter.RawFilter) -> None:
        """On the tuning thread: the small table of the rules the tuned filter often passes."""
        hot = sorted(k for k, c in tuned.rates.items() if c > self.HOT_SHARE)
        if not hot:
            self._next_hot = None
            return
        sub = CompiledTable._build([self.rules[k] for k in hot], self.fieldmap, "", raw=False)
        self._next_hot = (sub, {k: i for i, k in enumerate(hot)}, tuple(hot))

    # ------------------------------------------------------------------ persistence

    def save(self, path: Path) -> None:
        """Write the table (Hyperscan databases serialised, formulas as marshalled code)."""
        buf = io.BytesIO()
        _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(self._state())
        blob = buf.getvalue()
        digest = hashlib.sha256(blob).digest()
        tmp = Path(path).with_name(Path(path).name + ".tmp")
        tmp.write_bytes(_MAGIC + digest + blob)
        tmp.replace(path)

    def _state(self) -> dict[str, Any]:
        st = {k: getattr(self, k) for k in _STATE_KEYS}
        # only lazily evaluated leaves are needed after loading
        st["_leaves"] = tuple(None if i in self._eager else n for i, n in enumerate(self._leaves))
        st["_code"] = marshal.dumps(self._code)
        st["_pyver"] = sys.version_info[:2]
        st["_raw_db"] = prefilter.dump(self._raw_db)
        return st

    @classmethod
    def load(cls, path: Path) -> CompiledTable:
        """Read a table written by :meth:`save` (no rule parsing, no Hyperscan compile)."""
        data = Path(path).read_bytes()
        head = len(_MAGIC)
        if not data.startswith(_MAGIC):
            raise TableError(f"{path}: not a ruletag table file")
        body = memoryview(data)[head + 32 :]
        if hashlib.sha256(body).digest() != data[head : head + 32]:
            raise TableError(f"{path}: table file is corrupt")
        gc_was_on = gc.isenabled()
        # hundreds of thousands of new objects, none of them garbage: each collection the
        # allocations would trigger walks them all (0.17 s of a 0.45 s load with every rule)
        gc.disable()
        try:
            try:
                st = pickle.loads(body)
            except Exception as exc:  # pragma: no cover - depends on the damage
                raise TableError(f"{path}: cannot read table: {exc}") from exc
            return cls._from_state(st)
        finally:
            if gc_was_on:
                gc.enable()

    @classmethod
    def _from_state(cls, st: dict[str, Any]) -> CompiledTable:
        self = cls.__new__(cls)
        for k in _STATE_KEYS:
            setattr(self, k, st[k])
        if st["_pyver"] == sys.version_info[:2]:
            self._code = marshal.loads(st["_code"])
        else:
            self._code = compile(self._source, "<ruletag-table>", "exec")
        self._formulas = _exec_module(self._code, self._consts)
        self._raw_db = prefilter.load(st["_raw_db"])
        self._init_lazy()
        self._init_tuning()
        return self

    def set_tune_after(self, records: int) -> None:
        """Let the pre-filter re-tune itself after ``records`` records (0: never)."""
        if self._raw_db is not None:
            self._raw_db.set_tune_after(records)

    def _init_tuning(self) -> None:
        self._value_cache = {}
        self._hot = None
        self._next_hot = None
        if self._raw_db is not None:
            self._raw_db.after_tune = self._build_hot


_STATE_KEYS = (
    "rules",
    "version",
    "fieldmap",
    "stats",
    "_groups",
    "_kw_group",
    "_leaves",
    "_key_atom",
    "_key_groups",
    "_scan_always",
    "_trig",
    "_always",
    "_source",
    "_consts",
    "_eager",
    "_raw_forced",
    "_rule_groups",
    "_kw_eager",
)


class _Pickler(pickle.Pickler):
    """Pickles frozen dataclasses (the IR) as constructor calls: much faster to load."""

    def reducer_override(self, obj: Any) -> Any:
        cls = type(obj)
        names = _DATACLASS_FIELDS.get(cls)
        if names is None:
            if not dataclasses.is_dataclass(cls) or cls.__module__ != Rule.__module__:
                return NotImplemented
            names = _DATACLASS_FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls))
        return cls, tuple(getattr(obj, n) for n in names)


_DATACLASS_FIELDS: dict[type, tuple[str, ...]] = {}


def _record_of(buf: memoryview) -> Mapping[str, object] | None:
    """The record map of one packed entry ``[time, record]``, or None if it has none."""
    try:
        entry = msgpack.unpackb(
            buf, raw=False, unicode_errors="surrogateescape", strict_map_key=False
        )
    except Exception:
        return None
    if isinstance(entry, list | tuple) and len(entry) >= 2 and isinstance(entry[1], dict):
        return entry[1]
    return None
