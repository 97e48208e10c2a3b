"""The rule compiler's table builder: every rule's IR compiled into one immutable table.

Per record the matcher (``rules/matcher/``) does a handful of Hyperscan scans (one per present
field, in C) plus the boolean formulas of the rules that one of those scans *triggered*; no
per-rule Python loop. What :func:`build` prepares for it:

* String atoms (:class:`~ruletag.rules.ir.Match`, :class:`~ruletag.rules.ir.Regex`) of every
  rule are grouped by field (fields with the same paths and derivations, such as ``Image`` and
  ``process.executable``, share a group); each group gets one Hyperscan database (cased,
  caseless and regex atoms, per-pattern flags; ``hyperscan.py``) scanned once per value.
  Regexes Hyperscan rejects, or whose semantics could differ from RE2 on a given value
  (non-ASCII text, a trailing newline), are run by RE2 (linear time).
* Other leaves are evaluated lazily, only for candidate rules (``rules/matcher/leaves.py``).
* Each rule gets a *trigger* set (And -> its most selective child, Or -> every child, Not ->
  none): atoms one of which must hit for the rule to be true. Only rules whose trigger atom hit
  are evaluated; rules without a trigger ("always" rules) are listed in ``stats``. Leaves that
  only need their field to exist trigger through the record's key names (``raw_keys``).
* Each rule formula is compiled once into Python code (``codegen.py``; ``marshal``-ed in the
  table file, ``store.py``).
* The raw-bytes pre-filter (``prefilter.py``): each rule's raw requirement, compiled into
  Hyperscan databases and generated code.

A :class:`CompiledTable` is immutable once built or loaded: every field is set once and its
containers are tuples, frozensets and read-only mappings. Whatever changes while traffic flows
(value caches, the re-tuned pre-filter) belongs to a :class:`~ruletag.rules.matcher.Matcher`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import CodeType
from typing import Any

from ruletag.rules.algebra import simplify
from ruletag.rules.compiler.codegen import CodeGen, Formula, Program, exec_formulas
from ruletag.rules.compiler.frozen import Frozen, frozen_map
from ruletag.rules.compiler.hyperscan import Group, compile_group, encode, hs_escape
from ruletag.rules.compiler.prefilter import RawFilter, build_raw_filter
from ruletag.rules.fields import FieldMap
from ruletag.rules.ir import (
    And,
    Cidr,
    Compare,
    Const,
    Equals,
    Exists,
    FieldRef,
    Match,
    Node,
    Not,
    Or,
    Regex,
    Rule,
    Wild,
)
from ruletag.rules.reference import rule_condition

__all__ = ["CompiledTable", "build"]

#: One UTF-8 encoded character (values are encoded with ``surrogatepass``, so well formed).
_ONE_CHAR = (
    rb"(?:[\x00-\x7f]|[\xc0-\xdf][\x80-\xbf]"
    rb"|[\xe0-\xef][\x80-\xbf]{2}|[\xf0-\xf7][\x80-\xbf]{3})"
)


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


# --------------------------------------------------------------------------- the table


class CompiledTable(Frozen):
    """Every rule compiled (immutable); rule numbers are indexes into :attr:`rules`.

    Built by :func:`build`, written and read by ``store.py``; matched by a
    :class:`~ruletag.rules.matcher.Matcher`."""

    __slots__ = (
        "always",
        "code",
        "consts",
        "eager",
        "fieldmap",
        "formulas",
        "group_paths",
        "groups",
        "key_atom",
        "key_groups",
        "kw_eager",
        "kw_group",
        "leaves",
        "programs",
        "raw",
        "raw_forced",
        "rule_groups",
        "rules",
        "scan_always",
        "source",
        "stats",
        "trig",
        "version",
    )
    #: a tuple when built; read back from a file, rules read on first use (``rulelist.py``)
    rules: Sequence[Rule]
    version: str
    fieldmap: FieldMap
    stats: Mapping[str, Any]  # figures of the build (lists as tuples)
    #: the field groups (field not None), scanned eagerly; the keyword group (field None)
    groups: tuple[Group, ...]
    kw_group: Group | None
    #: atom -> its leaf; after loading, eager atoms (scanned, never evaluated) are None
    leaves: tuple[Node | None, ...]
    key_atom: Mapping[str, int]  # key name -> its pseudo atom
    key_groups: Mapping[str, tuple[int, ...]]  # key name -> the field groups it can supply
    scan_always: tuple[int, ...]  # field groups without key names: always scanned
    trig: Mapping[int, tuple[int, ...]]  # atom -> the rules it triggers
    always: tuple[int, ...]  # rules without a trigger
    kw_eager: bool  # a keyword atom is a trigger: scan every string of every record
    source: str  # the generated formula module
    consts: tuple[frozenset[int], ...]
    code: CodeType
    formulas: tuple[Formula, ...]
    #: the same formulas as data, for the C evaluator (``codegen`` module docstring)
    programs: tuple[Program, ...]
    eager: frozenset[int]  # the atoms scanned by the field groups
    rule_groups: tuple[tuple[int, ...], ...]  # rule -> the field groups it reads
    raw: RawFilter | None  # the raw-bytes pre-filter
    raw_forced: tuple[int, ...]  # rules the pre-filter cannot restrict
    #: per field group: its direct record paths, None if the field is derived
    group_paths: tuple[frozenset[str] | None, ...]

    def __init__(self, **fields: Any) -> None:
        """Every field of ``__slots__`` but ``formulas`` and ``group_paths``, which are
        derived here (``code`` executed; the field map's paths)."""
        fm: FieldMap = fields["fieldmap"]
        groups: tuple[Group, ...] = fields["groups"]
        self._set(
            **fields,
            formulas=exec_formulas(fields["code"], fields["consts"]),
            # per field group: its direct record paths when it has no derivation (a record
            # with none of them has no value for it, so the group is skipped unresolved)
            group_paths=tuple(
                None if fm.derived(g.field) else frozenset(fm.paths(g.field))  # type: ignore[arg-type]
                for g in groups
            ),
        )


def build(
    rules: Sequence[Rule],
    fieldmap: FieldMap | None = None,
    version: str = "",
    *,
    raw: bool = True,
) -> CompiledTable:
    """Compile ``rules`` (logsource conditions included) with ``fieldmap`` (default: the
    packaged one); ``raw``: with the raw-bytes pre-filter."""
    t0 = time.perf_counter()
    fm = fieldmap or FieldMap.default()
    rule_list = tuple(rules)
    formulas: list[Node] = [simplify(rule_condition(r, fm)) for r in rule_list]

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

    # per group key: its cased, caseless and regex atoms
    atoms: dict[
        str | None,
        tuple[list[tuple[int, bytes]], list[tuple[int, bytes]], list[tuple[int, str, str]]],
    ] = {}
    eager: set[int] = set()
    for leaf, i in atom_of.items():
        if isinstance(leaf, Match | Regex):
            gk = group_key(leaf.field)
            g = atoms.get(gk)
            if g is None:
                g = atoms[gk] = ([], [], [])
            if isinstance(leaf, Match):
                (g[0] if leaf.cased else g[1]).append((i, _match_regex(leaf)))
            else:
                g[2].append((i, leaf.pattern, leaf.flags))
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

    groups = {gk: compile_group(gk, *parts) for gk, parts in atoms.items()}
    field_groups = tuple(fg for fg in groups.values() if fg.field is not None)
    # key name -> indexes of the field groups it can supply
    key_groups: dict[str, list[int]] = {}
    scan_always: list[int] = []
    for gi, fg in enumerate(field_groups):
        assert fg.field is not None
        ks = raw_keys(fg.field)
        if not ks:
            scan_always.append(gi)
        for key in ks:
            key_groups.setdefault(key, []).append(gi)

    gen = CodeGen(atom_of, frozenset(eager))
    source = gen.module(formulas)
    code = compile(source, "<ruletag-table>", "exec")
    programs = tuple(gen.program(f) for f in formulas)

    stats: dict[str, Any] = {
        "rules": len(rule_list),
        "atoms": len(leaves),
        "string_atoms": sum(
            len(fg.cased) + len(fg.caseless) + len(fg.regex) for fg in groups.values()
        ),
        "fields": len(field_groups),
        "databases": sum(fg.db is not None for fg in groups.values()),
        "regex_re2_only": sum(len(fg.re2_only) for fg in groups.values()),
        "rules_without_literal": tuple(rule_list[k].id for k in always),
        # stateful rules never fire here: the engines in rules/stateful/ run them
        "rules_never_matching": tuple(
            rule_list[k].id for k in never if rule_list[k].kind == "event"
        ),
        "sequence_rules": sum(r.kind == "sequence" for r in rule_list),
        "threshold_rules": sum(r.kind == "threshold" for r in rule_list),
        "new_terms_rules": sum(r.kind == "new_terms" for r in rule_list),
        "correlation_rules": sum(r.kind == "correlation" for r in rule_list),
    }
    group_of = {fg.field: gi for gi, fg in enumerate(field_groups)}
    rule_groups: list[tuple[int, ...]] = []
    for f in formulas:
        used: dict[Node, int] = {}
        _leaves(f, used)
        gis = {
            group_of[group_key(n.field)] for n in used if isinstance(n, Match | Regex) and n.field
        }
        rule_groups.append(tuple(sorted(gis)))
    raw_filter: RawFilter | None = None
    forced: list[int] = []
    if raw:
        # rules the pre-filter cannot restrict are evaluated on every entry
        raw_filter, forced, raw_stats = build_raw_filter(formulas, fm)
        stats.update(raw_stats)
        stats["rules_without_raw_literal"] = tuple(rule_list[k].id for k in forced)
    stats["compile_seconds"] = round(time.perf_counter() - t0, 3)
    return CompiledTable(
        rules=rule_list,
        version=version,
        fieldmap=fm,
        stats=frozen_map(stats),
        groups=field_groups,
        kw_group=groups.get(None),
        leaves=tuple(leaves),
        key_atom=frozen_map(key_atom),
        key_groups=frozen_map({k: tuple(v) for k, v in key_groups.items()}),
        scan_always=tuple(scan_always),
        trig=frozen_map({a: tuple(v) for a, v in trig.items()}),
        always=tuple(always),
        kw_eager=any(a < len(leaves) and a not in eager for a in trig),
        source=source,
        consts=tuple(gen.consts),
        programs=programs,
        code=code,
        eager=frozenset(eager),
        rule_groups=tuple(rule_groups),
        raw=raw_filter,
        raw_forced=tuple(forced),
    )
