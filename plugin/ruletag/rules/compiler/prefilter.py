"""The raw-bytes pre-filter, compile time: each rule's raw requirement and the compiled filter.

Each rule formula becomes a *raw requirement*: an AND/OR formula over byte patterns that must
occur in the msgpack bytes of any entry the rule matches. Leaves contribute what they imply:

* a string :class:`~ruletag.rules.ir.Match` whose value must be text: its literals of 3+
  characters (caseless unless the match is cased; caseless tokens are cut at non-ASCII
  characters that other characters lower-case to) AND one of the field's key names; an exact
  value on an underived field: the literal right after a msgpack str/bin header of its length;
  a derived field (``fields.yaml``): the direct form OR what each derivation needs (the
  ``windows_event`` category: one of the channel + event id pairs that map to it);
* :class:`~ruletag.rules.ir.Regex`: the literal runs every match contains (parsed with
  Python's regex parser; anything it rejects adds the key names only);
* :class:`~ruletag.rules.ir.Equals` with a number on an underived field: a key name
  immediately followed by the number in any msgpack integer encoding, by a float or array
  header, or by a str/bin header and a sign, digit or point (numeric strings can match too);
* other leaves on a field: one of the field's key names (matched cased, as record lookups
  are: the whole key after its str/bin header, or the end of a dotted key);
* a computed predicate (``length(CallTrace) > 0``) that is false on a record without any of
  the fields it reads (checked at compile time on an empty record): one of those fields'
  key names;
  ``Not``, ``IsNull`` and the other predicates: no requirement.

A requirement is a small immutable tree: :class:`Pattern` (a byte pattern's id), :class:`AllOf`
and :class:`AnyOf` (frozensets of requirements); ``None`` stands for no requirement and
:data:`NEVER` for a formula that is never true. The trees exist at compile and tune time
only: they are compiled to Python code over the set of pattern ids found in an entry, and the
filter's *plan* (what re-tuning starts from) keeps them as marshalled plain data.

Matching is two-staged: one Hyperscan scan of the whole chunk for each rule's *trigger* (the
rarest-looking patterns one of which must occur), then, for the entries a trigger hit, one scan
of the entry for every pattern and the triggered rules' requirements as generated Python code.
A :class:`RawFilter` is that compiled, immutable data; running it and re-tuning it on the
traffic seen (:func:`retune` builds the re-tuned filter) is the matcher's business
(``rules/matcher/prefilter.py``). The caller decodes only the entries with a rule left and
evaluates only those rules; rules without a requirement are evaluated on every entry. Entries
holding a character that lower-cases or case-folds to ASCII letters (U+0130, U+212A, U+017F)
go to every rule (a caseless ASCII literal could miss them).
"""

from __future__ import annotations

import bisect
import marshal
import re
import struct
from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache

# typeshed has no stubs for these private modules; the error shows only when no module in the
# run (lark.utils does) imports them as submodules, hence unused-ignore too
from re import _constants as _C  # type: ignore[attr-defined, unused-ignore]
from re import _parser as _sre  # type: ignore[attr-defined, unused-ignore]
from typing import Any

import hyperscan as hs

from ruletag.heap import malloc_trim
from ruletag.rules.algebra import wildcard_match
from ruletag.rules.compiler.codegen import compile_pieces, exec_pieces
from ruletag.rules.compiler.frozen import Frozen, frozen_map
from ruletag.rules.compiler.hyperscan import compile_db, encode, hs_escape
from ruletag.rules.fields import CHANNEL, EVENT_ID, FieldMap
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
    Predicate,
    Regex,
    Wild,
    leaf_fields,
)

__all__ = [
    "FOLDS_TO_ASCII",
    "FOLD_ID",
    "AllOf",
    "AnyOf",
    "Pattern",
    "RawFilter",
    "Req",
    "build_raw_filter",
    "retune",
]

#: Non-ASCII characters whose ``str.lower()`` contains ASCII letters (U+0130, U+212A), or
#: that RE2's caseless matching folds to an ASCII letter (U+017F long s, U+212A).
FOLDS_TO_ASCII = ("\u0130", "\u212a", "\u017f")
_NUMBER_CHARS = frozenset("0123456789.e+-")
_NUMBER_WORDS = ("true", "false", "-infinity", "-nan", "none", "null")
#: What else can follow a key whose value equals a number: a float, an array (of numbers), or
#: a str/bin header whose text starts like a plain decimal number (sign, digit or point).
_NUMERIC_OTHER = (
    rb"(?:[\xca\xcb\x90-\x9f\xdc\xdd]|(?:[\xa0-\xbf]|[\xd9\xc4][\x00-\xff]"
    rb"|[\xda\xc5][\x00-\xff]{2}|[\xdb\xc6][\x00-\xff]{4})[0-9\x2b\x2d\x2e])"
)
_INT_FORMATS = (
    (0xCC, ">B", 0, 0xFF),
    (0xCD, ">H", 0, 0xFFFF),
    (0xCE, ">I", 0, 0xFFFFFFFF),
    (0xCF, ">Q", 0, 0xFFFFFFFFFFFFFFFF),
    (0xD0, ">b", -0x80, 0x7F),
    (0xD1, ">h", -0x8000, 0x7FFF),
    (0xD2, ">i", -0x80000000, 0x7FFFFFFF),
    (0xD3, ">q", -0x8000000000000000, 0x7FFFFFFFFFFFFFFF),
)
#: Shortest literal worth scanning for (shorter ones occur in most records and cost a
#: callback each); a pattern with only shorter literals adds its field's key names only.
_MIN_LIT = 3
#: Lone surrogates: how undecodable bytes of a value are represented (surrogateescape).
_SURROGATES = re.compile("[\ud800-\udfff]")
_Q = hs.HS_FLAG_QUIET  # marks a sub-pattern; never passed to Hyperscan
_KEY_PRIOR = 20.0  # the prior cost of a key-name pattern (key names occur in most records)


# --------------------------------------------------------------------------- requirement type


@dataclass(frozen=True, slots=True)
class Pattern:
    """The entry holds byte pattern ``id`` (an index into the filter's pattern list)."""

    id: int


@dataclass(frozen=True, slots=True)
class AllOf:
    """Every one of ``args`` holds (none: always holds)."""

    args: frozenset[Req]


@dataclass(frozen=True, slots=True)
class AnyOf:
    """One of ``args`` holds (none: can never hold)."""

    args: frozenset[Req]


#: A raw requirement; where ``Req | None`` is written, None is no requirement at all.
Req = Pattern | AllOf | AnyOf
NEVER: Req = AnyOf(frozenset())  # can never hold (the rule never matches)
ALWAYS: Req = AllOf(frozenset())  # always holds
#: A requirement as marshal-able data (how the filter's plan keeps it, as before the types):
#: a pattern id, ("&", args) or ("|", args).
Plain = int | tuple[str, frozenset["Plain"]]


def _plain(r: Req, memo: dict[Req, Plain]) -> Plain:
    """``r`` as plain data; ``memo`` makes equal sub-requirements one object (a logsource
    test many rules share is marshalled once, then referenced)."""
    got = memo.get(r)
    if got is None:
        if isinstance(r, Pattern):
            got = r.id
        else:
            op = "&" if isinstance(r, AllOf) else "|"
            got = (op, frozenset(_plain(a, memo) for a in r.args))
        memo[r] = got
    return got


def _typed(r: Plain, memo: dict[Plain, Req]) -> Req:
    """The requirement of :func:`_plain` output (``memo``: as there)."""
    got = memo.get(r)
    if got is None:
        if isinstance(r, int):
            got = Pattern(r)
        else:
            args = frozenset(_typed(a, memo) for a in r[1])
            got = AllOf(args) if r[0] == "&" else AnyOf(args)
        memo[r] = got
    return got


# --------------------------------------------------------------------------- byte patterns


def number_like(lit: str) -> bool:
    """Could ``lit`` occur in the canonical text of an int, float or bool?"""
    low = lit.lower()
    return set(low) <= _NUMBER_CHARS or any(low in w for w in _NUMBER_WORDS)


def int_encodings(v: int) -> list[bytes]:
    """Every msgpack encoding of the integer ``v`` (canonical or not)."""
    out: list[bytes] = []
    if 0 <= v <= 0x7F:
        out.append(bytes((v,)))
    if -32 <= v < 0:
        out.append(bytes((v & 0xFF,)))
    for tag, fmt, lo, hi in _INT_FORMATS:
        if lo <= v <= hi:
            out.append(bytes((tag,)) + struct.pack(fmt, v))
    return out


def text_headers(n: int) -> list[bytes]:
    """Every msgpack str or bin header of an ``n``-byte value."""
    out: list[bytes] = []
    if n < 32:
        out.append(bytes((0xA0 | n,)))
    if n < 0x100:
        out += [b"\xd9" + bytes((n,)), b"\xc4" + bytes((n,))]
    if n < 0x10000:
        out += [b"\xda" + struct.pack(">H", n), b"\xc5" + struct.pack(">H", n)]
    out += [b"\xdb" + struct.pack(">I", n), b"\xc6" + struct.pack(">I", n)]
    return out


def _alts(parts: Sequence[bytes]) -> bytes:
    return b"(?:" + b"|".join(hs_escape(p) for p in parts) + b")"


def _key(name: str) -> bytes:
    """The pattern of a record key ``name``: the whole key (right after its msgpack str or
    bin header), or the end of a dotted literal key (``"process.name"`` supplies ``name``).
    A bare substring would also hit ``transport`` for ``port`` or ``hostname`` for ``name``."""
    raw = encode(name)
    return b"(?:" + _alts(text_headers(len(raw))) + b"|\\x2e)" + hs_escape(raw)


def _loose_head(pat: bytes) -> bytes:
    """``pat`` as a trigger: the str/bin header alternatives it starts with (every header of
    one length, :func:`text_headers`; for a key, the dotted form too) replaced by the length
    bytes they all end with. The trigger fires on a superset of ``pat``'s matches, which is
    all a trigger must do (stage 2 and the rule check exactly), and Hyperscan compiles one
    or two literals for it, not eight: a third less memory and half the time for the trigger
    database (docs/benchmarks.md). Any other pattern is returned as it is."""
    key = pat.startswith(b"(?:(?:")
    at = 6 if key else 3
    head = bytearray()
    while at < len(pat) and pat[at : at + 1] != b"|":
        if pat[at : at + 2] == b"\\x":
            head.append(int(pat[at + 2 : at + 4], 16))
            at += 4
        else:
            head.append(pat[at])
            at += 1
    if len(head) == 1 and 0xA0 <= head[0] <= 0xBF:
        n = head[0] & 0x1F
    elif len(head) in (2, 3, 5) and head[0] in (0xD9, 0xDA, 0xDB):
        n = int.from_bytes(head[1:], "big")
    else:
        return pat
    alts = _alts(text_headers(n))
    prefix = b"(?:" + alts + b"|\\x2e)" if key else alts
    if not pat.startswith(prefix):
        return pat
    ends = [bytes((0xA0 | n,))] if n < 32 else []
    ends.append(bytes((n,)) if n < 0x100 else (n & 0xFFFF).to_bytes(2, "big"))
    if key:
        ends.append(b".")
    loose = _alts(ends) if len(ends) > 1 else hs_escape(ends[0])
    return loose + pat[len(prefix) :]


# --------------------------------------------------------------------------- requirements


def _join(kind: type[AllOf] | type[AnyOf], parts: Sequence[Req | None]) -> Req | None:
    """``kind`` of ``parts``: nested ones of that kind flattened; decided by NEVER in an AllOf
    and by None (no requirement) in an AnyOf, which the other ignores; one part is itself."""
    decides, neutral = (NEVER, None) if kind is AllOf else (None, NEVER)
    items: set[Req] = set()
    for p in parts:
        if p is decides:
            return decides
        if p is None or p is neutral:
            continue
        if isinstance(p, kind):
            items |= p.args
        else:
            items.add(p)
    if len(items) <= 1:
        return next(iter(items), neutral)
    return kind(frozenset(items))


def _and(parts: Sequence[Req | None]) -> Req | None:
    return _join(AllOf, parts)


def _or(parts: Sequence[Req | None]) -> Req | None:
    got = _join(AnyOf, parts)
    if not isinstance(got, AnyOf) or got is NEVER:
        return got
    items = got.args
    # (a & k) | (b & k) -> k & (a | b): keeps expressions small (field key names repeat)
    conj = [p.args if isinstance(p, AllOf) else frozenset((p,)) for p in items]
    common = frozenset.intersection(*conj)
    if common:
        rest: list[Req | None] = []
        for c in conj:
            r = c - common
            if not r:
                return _and(list(common))
            rest.append(_and(list(r)))
        return _and([*common, _or(rest)])
    return got


class _ReqCode:
    """Requirements as Python source: ``def _q<k>(h, M): return ...`` over the set of hits.

    A sub-requirement several rules share (a logsource test) becomes its own function whose
    result is kept in ``M`` (one dict per entry), so it is evaluated once per entry.
    """

    def __init__(self, reqs: dict[int, Req]) -> None:
        self.consts: list[frozenset[int]] = []
        counts: dict[Req, int] = {}
        for r in reqs.values():
            self._count(r, counts, set())
        self.shared: dict[Req, int] = {}
        self.shared_src: list[str] = []
        self._big = {r for r, n in counts.items() if n >= 2 and _size(r) >= 6}

    def _count(self, r: Req, counts: dict[Req, int], seen: set[Req]) -> None:
        if isinstance(r, Pattern) or r in seen:
            return
        seen.add(r)
        counts[r] = counts.get(r, 0) + 1
        for a in r.args:
            self._count(a, counts, seen)

    def expr(self, r: Req, top: bool = False) -> str:
        if isinstance(r, Pattern):
            return f"({r.id} in h)"
        if not top and r in self._big:
            j = self.shared.get(r)
            if j is None:
                body = self.expr(r, top=True)
                j = self.shared[r] = len(self.shared_src)
                self.shared_src.append(f"def _c{j}(h, M):\n    return {body}")
            return f"(M[{j}] if {j} in M else _m(h, M, {j}))"
        every = isinstance(r, AllOf)
        if not r.args:  # ALWAYS (NEVER is no rule's requirement)
            return "True" if every else "False"
        ints = sorted(a.id for a in r.args if isinstance(a, Pattern))
        # cheaper (shorter) sub-expressions first: ``and``/``or`` stop early
        rest = sorted(
            (self.expr(a) for a in r.args if not isinstance(a, Pattern)), key=lambda x: (len(x), x)
        )
        parts: list[str] = []
        if len(ints) == 1:
            parts.append(f"({ints[0]} in h)")
        elif ints:
            self.consts.append(frozenset(ints))
            c = f"_S[{len(self.consts) - 1}]"
            parts.append(f"({c} <= h)" if every else f"(not h.isdisjoint({c}))")
        parts.extend(rest)
        return "(" + (" and " if every else " or ").join(parts) + ")"

    def module(self, reqs: dict[int, Req]) -> str:
        lines = [f"def _q{k}(h, M):\n    return {self.expr(r)}" for k, r in reqs.items()]
        lines += self.shared_src
        lines.append("_C = (" + "".join(f"_c{j}, " for j in range(len(self.shared_src))) + ")")
        lines.append("def _m(h, M, j):\n    r = M[j] = _C[j](h, M)\n    return r")
        lines.append("_REQS = {" + "".join(f"{k}: _q{k}, " for k in reqs) + "}")
        return "\n".join(lines) + "\n"


def _size(r: Req) -> int:
    if isinstance(r, Pattern):
        return 1
    return sum(_size(a) for a in r.args)


@cache
def _lowered_from_others() -> frozenset[str]:
    """Non-ASCII characters that occur in the lower case of some *other* character."""
    out: set[str] = set()
    for cp in range(0x80, 0x110000):
        c = chr(cp)
        low = c.lower()
        if low != c:
            out.update(x for x in low if not x.isascii())
    return frozenset(out)


def _caseless_runs(token: str) -> list[str]:
    """Pieces of a caseless token that a matching value holds as is, up to ASCII case.

    ASCII letters only come from ASCII letters (or the fold characters, which force a
    decode); a non-ASCII character is kept when it is its own lower and upper case and no
    other character lowers to it; any other character splits the token.
    """
    others = _lowered_from_others() if not token.isascii() else frozenset()
    runs: list[str] = []
    cur: list[str] = []
    for c in token:
        stable = c.lower() == c == c.upper() and c not in others
        if c.isascii() or (stable and not _SURROGATES.match(c)):
            cur.append(c)
        elif cur:
            runs.append("".join(cur))
            cur = []
    if cur:
        runs.append("".join(cur))
    return runs


def _lit_cost(n: int) -> float:
    """How likely a literal of ``n`` bytes is to occur in a record (a guess: shorter is far
    likelier), used to choose the rarest trigger."""
    return 2.0 ** -(n - 2)


class _Unsupported(Exception):
    """A regex construct the literal extraction does not model."""


def _regex_req(pattern: str, caseless: bool, lit: Callable[[str], Req | None]) -> Req | None:
    """Literal runs every match of ``pattern`` contains (RE2 syntax parsed by Python's
    parser: anything it rejects or whose case flags change inside is unsupported)."""
    try:
        parsed = _sre.parse(pattern, re.IGNORECASE if caseless else 0)
    except Exception as exc:  # re.error, RecursionError, ...
        raise _Unsupported from exc
    return _seq_req(list(parsed), lit)


def _seq_req(items: Sequence[Any], lit: Callable[[str], Req | None]) -> Req | None:
    parts: list[Req | None] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            parts.append(lit("".join(run)))
            run.clear()

    for op, av in items:
        if op is _C.LITERAL:
            run.append(chr(av))
            continue
        flush()
        if op is _C.SUBPATTERN:
            _group, add, dele, sub = av
            if (add | dele) & re.IGNORECASE:
                raise _Unsupported
            parts.append(_seq_req(list(sub), lit))
        elif op is _C.ATOMIC_GROUP:
            parts.append(_seq_req(list(av), lit))
        elif op is _C.BRANCH:
            parts.append(_or([_seq_req(list(b), lit) for b in av[1]]))
        elif op in (_C.MAX_REPEAT, _C.MIN_REPEAT, _C.POSSESSIVE_REPEAT):
            lo, _hi, sub = av
            if lo >= 1:
                parts.append(_seq_req(list(sub), lit))
    flush()
    return _and(parts)


class _Builder:
    """Turns formulas into requirements, collecting the byte patterns they use."""

    def __init__(self, fm: FieldMap) -> None:
        self.fm = fm
        self.patterns: dict[tuple[bytes, int], int] = {}
        self.kind: list[float] = []  # per pattern: base cost (how common it likely is)
        self._ids: list[Pattern] = []  # per pattern: its requirement
        self._keys: dict[tuple[str, bool], Req | None] = {}
        self._memo: dict[Node, Req | None] = {}

    def pattern(self, pat: bytes, flags: int, cost: float) -> Pattern:
        i = self.patterns.setdefault((pat, flags), len(self.patterns))
        if i == len(self.kind):
            self.kind.append(cost)
            self._ids.append(Pattern(i))
        return self._ids[i]

    def keys(self, field: str, direct: bool = False) -> Req | None:
        """One of the key names that can supply ``field`` (``direct``: no derivations)."""
        at = (field, direct)
        if at not in self._keys:
            ks = self.fm.direct_keys(field) if direct else self.fm.raw_keys(field)
            pats = [self.pattern(_key(k), _Q, _KEY_PRIOR) for k in sorted(ks)]
            self._keys[at] = _or(pats) if pats else None
        return self._keys[at]

    def req(self, n: Node) -> Req | None:
        """The raw requirement of ``n`` (None: none; NEVER: ``n`` is never true)."""
        if n not in self._memo:
            self._memo[n] = self._req(n)
        return self._memo[n]

    def _req(self, n: Node) -> Req | None:
        if isinstance(n, And):
            return _and([self.req(a) for a in n.args])
        if isinstance(n, Or):
            return _or([self.req(a) for a in n.args])
        if isinstance(n, Const):
            return None if n.value else NEVER
        if isinstance(n, Not):
            return None
        if isinstance(n, Match):
            return self._match(n)
        if isinstance(n, Equals):
            return self._equals(n)
        if isinstance(n, Regex):
            return self._regex(n)
        if isinstance(n, Compare | Cidr | Exists):
            return self.keys(n.field)
        if isinstance(n, FieldRef):
            return _and([self.keys(n.field), self.keys(n.other)])
        if isinstance(n, Predicate):
            return self._predicate(n)
        return None  # IsNull

    def _predicate(self, n: Predicate) -> Req | None:
        """A key of one of the fields ``n`` reads, if ``n`` is false when all are missing.

        Without those keys in the bytes, every field ``n`` reads is missing, so ``n`` has
        the value it has on an empty record."""
        fields = leaf_fields(n)
        if not fields:
            return None
        from ruletag.rules.fields import RecordView
        from ruletag.rules.reference import evaluate

        try:
            if evaluate(n, RecordView(self.fm, {})):
                return None
        except Exception:  # whatever fails here gives no requirement
            return None
        return _or([self.keys(f) for f in sorted(fields)])

    def _text(self, n: Match, field_req: Req | None, exact: bool) -> Req | None:
        """``field_req`` and the literals a text value matching ``n`` contains."""
        toks = [t for t in n.pattern if isinstance(t, str)]
        # a token no number or bool can contain: the value is text, present in the bytes
        if not any(not t.isascii() or not number_like(t) for t in toks):
            return field_req
        flags = _Q if n.cased else _Q | hs.HS_FLAG_CASELESS
        lits: list[bytes] = []
        whole = True  # every token kept entire (needed for the exact-value form)
        for t in toks:
            if n.cased:
                if _SURROGATES.search(t):  # stands for raw bytes the value holds otherwise
                    whole = False
                else:
                    lits.append(encode(t))
                continue
            runs = _caseless_runs(t)
            whole = whole and runs == [t]
            lits.extend(encode(x.lower()) for x in runs)
        if not lits:
            return field_req
        if exact and whole and len(n.pattern) == 1:
            lit = lits[0]
            exact_pat = _alts(text_headers(len(lit))) + hs_escape(lit)
            return _and([field_req, self.pattern(exact_pat, flags, _lit_cost(len(lit) + 2))])
        good = [x for x in lits if len(x) >= _MIN_LIT]
        if not good:
            best = max(lits, key=len)
            good = [best] if len(best) >= 2 else []
        pats = [self.pattern(hs_escape(x), flags, _lit_cost(len(x))) for x in good]
        return _and([field_req, *pats])

    def _regex(self, n: Regex) -> Req | None:
        field_req = self.keys(n.field) if n.field is not None else None
        if n.field is not None and not self.fm.verbatim(n.field):
            return field_req
        caseless = "i" in n.flags
        flags = _Q | (hs.HS_FLAG_CASELESS if caseless else 0)

        def lit(run: str) -> Req | None:
            pieces = _caseless_runs(run) if caseless else [run]
            out: list[Req | None] = []
            for p in pieces:
                if len(p) >= _MIN_LIT and not number_like(p) and not _SURROGATES.search(p):
                    b = encode(p.lower() if caseless else p)
                    out.append(self.pattern(hs_escape(b), flags, _lit_cost(len(b))))
            return _and(out)

        try:
            return _and([field_req, _regex_req(n.pattern, caseless, lit)])
        except _Unsupported:
            return field_req

    def _match(self, n: Match) -> Req | None:
        if n.field is None:
            return self._text(n, None, exact=True)
        derive = self.fm.derivations(n.field)
        if not derive:
            return self._text(n, self.keys(n.field), exact=True)
        # a direct value, or (only when there is none) a derived one
        alts: list[Req | None] = [self._text(n, self.keys(n.field, direct=True), exact=True)]
        for kind, src, value in derive:
            if kind == "basename":  # a basename is a substring of the source's value
                inner = Match(src, (Wild.ANY, *n.pattern, Wild.ANY), n.cased)
                alts.append(self.req(inner))
            elif kind == "when_present":
                alts.append(self.keys(src) if wildcard_match(value, n.pattern, n.cased) else NEVER)
            else:
                alts.append(self._windows_event(n, src))
        return _or(alts)

    def _windows_event(self, n: Match, attr: str) -> Req | None:
        rows: list[Req | None] = []
        for channel, eid, cats, types in self.fm.windows_events():
            values = cats if attr == "category" else types
            if any(wildcard_match(v, n.pattern, n.cased) for v in values):
                rows.append(
                    _and(
                        [
                            self.req(Match(CHANNEL, (channel,), cased=False)),
                            self.req(Equals(EVENT_ID, eid)),
                        ]
                    )
                )
        return _or(rows)

    def _equals(self, n: Equals) -> Req | None:
        v = n.value
        if isinstance(v, bool):
            return self.keys(n.field)
        ks = sorted(self.fm.direct_keys(n.field))
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        encs = int_encodings(v) if isinstance(v, int) else []
        tail = b"(?:" + b"|".join([*(hs_escape(e) for e in encs), _NUMERIC_OTHER]) + b")"
        alts: list[Req | None] = [self.pattern(_key(k) + tail, _Q, 0.3) for k in ks]
        for kind, src, _value in self.fm.derivations(n.field):
            alts.append(self.keys(src) if kind != "windows_event" else self.keys(CHANNEL))
        return _or(alts) if alts else None


def _trigger(
    r: Req, cost: Sequence[float], memo: dict[int, tuple[frozenset[int], float]] | None = None
) -> tuple[frozenset[int], float]:
    """Patterns one of which occurs whenever ``r`` holds, chosen to be rare; and their cost.

    ``memo`` (by object identity, for one ``cost``): requirements share sub-requirements
    (the logsource test of a thousand rules is one object), each is worked out once."""
    if isinstance(r, Pattern):
        return frozenset((r.id,)), cost[r.id]
    if memo is None:
        memo = {}
    got = memo.get(id(r))
    if got is None:
        subs = [_trigger(a, cost, memo) for a in r.args]
        if isinstance(r, AllOf):  # the rarest; of equally rare ones, the lowest pattern ids
            got = min(subs, key=lambda x: (x[1], sorted(x[0])))
        else:
            got = frozenset().union(*(s for s, _ in subs)), sum(c for _, c in subs)
        memo[id(r)] = got
    return got


def _pattern_ids(r: Req, out: set[int], seen: set[int] | None = None) -> None:
    """Add the pattern ids of ``r`` to ``out``; ``seen``: the ids of the sub-requirements
    already added to ``out`` (shared ones are walked once)."""
    if isinstance(r, Pattern):
        out.add(r.id)
        return
    if seen is not None:
        if id(r) in seen:
            return
        seen.add(id(r))
    for a in r.args:
        _pattern_ids(a, out, seen)


# --------------------------------------------------------------------------- the filter

#: A pattern found in more than this share of the observed records is no filter: stage 2
#: treats it as present (requirements only get looser) and stops scanning for it.
COMMON = 0.3
#: A rule whose trigger fires on more than this share of the records is *hot*: its stage-2
#: patterns are in the database scanned for most triggered entries; the others' patterns
#: are in a second database, scanned only for the entries that trigger one of them.
HOT = 0.002
#: A rule whose requirement held in more than this share of the records its trigger is
#: measured to fire on skips stage 2: it is decoded whenever its trigger fires.
PASSING = 0.5
#: What one trigger pattern costs, as a share of records triggered: the trigger scan of every
#: record grows with the pattern count (24,000 patterns ~4.6 µs per 1 KB record, ~0.19 ns
#: each), a triggered record costs ~5 µs of stage 2. Added to each pattern's measured rate
#: when a re-tuning picks triggers, so a rule with thousands of rare branches (a hash list)
#: takes one common trigger instead, when one fires on fewer records than its branches cost
#: to scan for (docs/benchmarks.md, "The trigger scan's pattern count").
TRIGGER_SCAN = 3.5e-5
FOLD_ID = 1 << 30  # the id of the fold-character patterns, above any literal's id


class RawFilter(Frozen):
    """A compiled pre-filter (immutable): the trigger database, the stage-2 database(s), the
    rules each trigger pattern triggers and the requirements as generated code.

    Two stages: one scan of the whole chunk for the *trigger* patterns (a rare pattern per
    rule, or per branch of an Or), then, for the entries a trigger hit, one scan of that entry
    for every pattern and a check of the triggered rules' full requirements.

    The first triggers are a guess (longer literals are rarer); :func:`retune` builds a filter
    whose triggers are the patterns measured rarest on the traffic, whose stage 2 no longer
    scans for the patterns almost every record holds. Any choice of triggers and any loosening
    is sound, so matches never change.
    """

    __slots__ = (
        "checked",
        "code",
        "cold",
        "consts",
        "full_db",
        "plan",
        "rates",
        "reqs",
        "source",
        "trig_rules",
        "trigger_db",
        "tuned_on",
    )
    trigger_db: Any
    full_db: Any
    #: the stage-2 database of the rarely triggered rules, and those rules
    cold: tuple[Any, frozenset[int]] | None
    trig_rules: Mapping[int, tuple[int, ...]]
    source: str
    consts: tuple[frozenset[int], ...]
    code: tuple[Any, ...]
    reqs: Mapping[int, Callable[[set[int], dict[int, bool]], bool]]
    #: rules whose stage-2 requirement needs a pattern (requirements are monotone: one that
    #: holds with no pattern found always holds, so its trigger is enough)
    checked: frozenset[int]
    #: marshalled (patterns, prior costs, requirements): what re-tuning starts from
    plan: bytes | None
    #: how many observed records the triggers were picked on (0: the length guess)
    tuned_on: int
    #: tuned: per rule, the measured share of records its trigger fires on
    rates: Mapping[int, float]

    def __init__(
        self,
        trigger_db: Any,
        full_db: Any,
        trig_rules: Mapping[int, tuple[int, ...]],
        source: str,
        consts: tuple[frozenset[int], ...],
        code: tuple[Any, ...] | None = None,
        plan: bytes | None = None,
        tuned_on: int = 0,
        cold: tuple[Any, frozenset[int]] | None = None,
        rates: Mapping[int, float] | None = None,
    ) -> None:
        code = code if code is not None else compile_pieces(source)
        reqs = exec_pieces(code, consts)
        self._set(
            trigger_db=trigger_db,
            full_db=full_db,
            cold=cold,
            trig_rules=frozen_map(trig_rules),
            source=source,
            consts=consts,
            code=code,
            reqs=frozen_map(reqs),
            checked=frozenset(k for k, f in reqs.items() if not f(set(), {})),
            plan=plan,
            tuned_on=tuned_on,
            rates=frozen_map(rates or {}),
        )


def retune(
    filt: RawFilter,
    counts: Mapping[int, int],
    n: int,
    passes: Mapping[int, int] | None = None,
    sets: Mapping[bytes, int] | None = None,
) -> RawFilter:
    """A filter with the requirements of ``filt``, triggers picked by the measured frequency
    of each pattern (``counts[i]`` of ``n`` records), common patterns no longer scanned for in
    stage 2, nor the patterns of rules whose requirement held in most of the records their
    trigger is expected to fire on (``passes[k]`` of ``n``).

    ``sets``: the distinct pattern sets observed in the records where no rule's requirement
    held (sorted uint32 pattern ids as bytes) and how many records had each. With them, a
    rule is loosened only if that is measured to make few records decoded that no requirement
    forces: all loosened rules together add at most :data:`LOOSE_BUDGET` of the observed
    records (see :func:`_keep_loosening`)."""
    if filt.plan is None:
        raise ValueError("this filter keeps no plan to re-tune from")
    n = max(n, 1)
    # the requirement trees are gone before Hyperscan compiles: its peak does not stack on
    # theirs (see docs/benchmarks.md on tuning memory)
    bp = _compacted(_retuned_blueprint(filt.plan, counts, n, passes, sets))
    # the rarely needed second stage-2 database: this filter's own, which holds every
    # pattern, reused rather than compiled anew
    return _compile(bp, filt.plan, n, cold_db=filt.full_db)


def _retuned_blueprint(
    plan: bytes,
    counts: Mapping[int, int],
    n: int,
    passes: Mapping[int, int] | None,
    sets: Mapping[bytes, int] | None,
) -> _Blueprint:
    """:func:`retune`'s Python half: the plan read, the requirements re-planned."""
    patterns, prior, plain = marshal.loads(plan)
    memo: dict[Plain, Req] = {}
    reqs = {k: _typed(r, memo) for k, r in plain.items()}
    del plain, memo  # the plain trees, before the planning's own memos
    cost = [(counts.get(i, 0) + 0.5 * min(1.0, p)) / n + TRIGGER_SCAN for i, p in enumerate(prior)]
    common = frozenset(i for i, c in counts.items() if i < len(prior) and c / n > COMMON)
    del prior
    return _blueprint(patterns, reqs, cost, common, n, True, passes, sets, TRIGGER_SCAN)


def _compacted(bp: _Blueprint) -> _Blueprint:
    """``bp`` copied into fresh memory. What it holds was made among the planning's
    short-lived objects; once they are freed, the copy lets the allocator give back the
    memory they shared (~25 MB with every rule) before Hyperscan compiles."""
    return _Blueprint(*marshal.loads(marshal.dumps(tuple(getattr(bp, f) for f in _BP_FIELDS))))


def _strip(r: Req, drop: frozenset[int], memo: dict[int, Req | None] | None = None) -> Req | None:
    """``r`` with the patterns of ``drop`` taken as present (None: always holds); ``memo``
    as for :func:`_trigger`."""
    if isinstance(r, Pattern):
        return None if r.id in drop else r
    if memo is None:
        memo = {}
    key = id(r)
    if key not in memo:
        parts = [_strip(a, drop, memo) for a in r.args]
        memo[key] = _and(parts) if isinstance(r, AllOf) else _or(parts)
    return memo[key]


@dataclass(frozen=True, slots=True)
class _Blueprint:
    """What :func:`_compile` builds a filter from: the Hyperscan pattern lists and the
    generated code, without the requirement trees they were planned from."""

    trig: list[tuple[int, bytes, int]]
    #: the stage-2 pattern lists: the often triggered rules', then (unless the caller
    #: brings a database for them) the others'
    full: list[list[tuple[int, bytes, int]]]
    trig_rules: dict[int, tuple[int, ...]]
    source: str
    consts: tuple[frozenset[int], ...]
    #: the rules of the second stage-2 database (None: there is none)
    cold_rules: frozenset[int] | None
    rates: dict[int, float] | None


def _blueprint(
    patterns: Sequence[tuple[bytes, int]],
    reqs: Mapping[int, Req],
    cost: Sequence[float],
    drop: frozenset[int],
    tuned_on: int = 0,
    cold_db: bool = False,
    passes: Mapping[int, int] | None = None,
    sets: Mapping[bytes, int] | None = None,
    scan_cost: float = 0.0,
) -> _Blueprint:
    """The filter for ``reqs``, planned: triggers by ``cost``, stage 2 without the ``drop``
    patterns. ``scan_cost``: what ``cost`` adds to each pattern's rate for its scan (each
    rule's expected trigger rate is worked out without it).

    When tuned (``tuned_on``), stage 2 has two databases: one for the rules whose trigger is
    measured to fire on more than :data:`HOT` of the records, one for the rest (scanned only
    for the rare entries that trigger one of those). ``cold_db``: the caller brings that
    second database (any that reports at least their patterns, under the same ids)."""
    trig_rules: dict[int, list[int]] = {}
    hot: set[int] = set()
    rates: dict[int, float] = {}
    trig_memo: dict[int, tuple[frozenset[int], float]] = {}
    strip_memo: dict[int, Req | None] = {}
    for k, r in reqs.items():
        pats, c = _trigger(r, cost, trig_memo)
        c = max(0.0, c - scan_cost * len(pats))
        rates[k] = c
        if not tuned_on or c > HOT:
            hot.add(k)
        for t in pats:
            trig_rules.setdefault(t, []).append(k)
    checks: dict[int, Req] = {}
    used: tuple[set[int], set[int]] = (set(), set())
    walked: tuple[set[int], set[int]] = (set(), set())  # (see _pattern_ids)
    loose: dict[int, Req | None] = {}
    for k, r in reqs.items():
        got = _strip(r, drop, strip_memo) if drop else r
        if passes and rates[k] > 0 and passes.get(k, 0) / tuned_on > PASSING * rates[k]:
            got = None  # the trigger is (almost) enough: stage 2 would mostly confirm it
        if got != r:
            loose[k] = got
    del strip_memo  # the memos, before the code is generated: they would add to its peak
    if sets is not None and loose:
        kept = _keep_loosening(reqs, loose, cost, sets, tuned_on, trig_memo)
        loose = {k: v for k, v in loose.items() if k in kept}
    del trig_memo
    for k, r in reqs.items():
        got = loose.get(k, r)
        if got is None:
            got = ALWAYS
        else:
            which = 0 if k in hot else 1
            _pattern_ids(got, used[which], walked[which])
        checks[k] = got
    fold = [(hs_escape(encode(ch)), hs.HS_FLAG_SINGLEMATCH) for ch in FOLDS_TO_ASCII]
    trig = [(i, _loose_head(patterns[i][0]), patterns[i][1] & ~_Q) for i in sorted(trig_rules)]
    trig += [(FOLD_ID, p, 0) for p, _ in fold]
    one = hs.HS_FLAG_SINGLEMATCH
    full = []
    for ids in used if not cold_db and used[1] else used[:1]:
        full.append([(i, patterns[i][0], (patterns[i][1] & ~_Q) | one) for i in sorted(ids)])
        full[-1] += [(FOLD_ID, p, fl) for p, fl in fold]
    trig_rules[FOLD_ID] = []
    gen = _ReqCode(checks)
    source = gen.module(checks)
    return _Blueprint(
        trig,
        full,
        {t: tuple(v) for t, v in trig_rules.items()},
        source,
        tuple(gen.consts),
        frozenset(reqs) - hot if used[1] else None,
        rates if tuned_on else None,
    )


_BP_FIELDS = tuple(_Blueprint.__dataclass_fields__)


def _compile(bp: _Blueprint, plan: bytes, tuned_on: int = 0, cold_db: Any = None) -> RawFilter:
    """The filter ``bp`` plans, its databases compiled (``cold_db``: as for
    :func:`_blueprint`)."""
    malloc_trim()  # what planning freed, before Hyperscan's compile needs its own
    dbs = [compile_db(p) for p in bp.full]
    if cold_db is not None:
        dbs.append(cold_db)
    return RawFilter(
        compile_db(bp.trig),
        dbs[0],
        bp.trig_rules,
        bp.source,
        bp.consts,
        plan=plan,
        tuned_on=tuned_on,
        cold=None if bp.cold_rules is None else (dbs[1], bp.cold_rules),
        rates=bp.rates,
    )


#: Loosening (dropping common patterns, skipping stage 2 for often-passing rules) may add
#: at most this share of the observed records to those decoded beyond what the requirements
#: force; the rules whose loosening costs the most keep their full requirement.
LOOSE_BUDGET = 0.01


def _holds(r: Req | None, found: array[int]) -> bool:
    """Does ``r`` hold on the sorted pattern ids ``found``?"""
    if r is None:
        return True
    if isinstance(r, Pattern):
        j = bisect.bisect_left(found, r.id)
        return j < len(found) and found[j] == r.id
    if isinstance(r, AllOf):
        return all(_holds(a, found) for a in r.args)
    return any(_holds(a, found) for a in r.args)


def _keep_loosening(
    reqs: Mapping[int, Req],
    loose: Mapping[int, Req | None],
    cost: Sequence[float],
    sets: Mapping[bytes, int],
    n: int,
    memo: dict[int, tuple[frozenset[int], float]] | None = None,
) -> set[int]:
    """The rules of ``loose`` whose loosened check may stay: measured on the observed
    distinct pattern ``sets``, a loosened rule passes an entry where no requirement holds
    when its trigger fires and its loosened check holds there. Rules that add no such entry
    stay loosened; the others, cheapest first, while the entries they add together stay
    within :data:`LOOSE_BUDGET` of ``n``. The decision depends on what was observed, never
    on which triggers happen to be rare: a mix with few positives does not loosen more."""
    free = [(array("I", key), c) for key, c in sets.items()]
    memo = {} if memo is None else memo
    trigs = {k: _trigger(reqs[k], cost, memo)[0] for k in loose}
    wanted = frozenset().union(*trigs.values())
    by_pattern: dict[int, list[int]] = {}
    for j, (found, _c) in enumerate(free):
        for i in wanted.intersection(found):
            by_pattern.setdefault(i, []).append(j)
    extra: dict[int, set[int]] = {}
    for k, got in loose.items():
        trig = trigs[k]
        hit: set[int] = set()
        for t in trig:
            hit.update(by_pattern.get(t, ()))
        extra[k] = {j for j in hit if _holds(got, free[j][0])}
    kept = {k for k, e in extra.items() if not e}
    covered: set[int] = set()
    budget = LOOSE_BUDGET * max(n, 1)
    weight = 0
    for k in sorted(
        (k for k in extra if extra[k]), key=lambda k: sum(free[j][1] for j in extra[k])
    ):
        new = extra[k] - covered
        w = sum(free[j][1] for j in new)
        if weight + w > budget:
            continue
        weight += w
        covered |= new
        kept.add(k)
    return kept


def build_raw_filter(
    formulas: Sequence[Node], fm: FieldMap
) -> tuple[RawFilter | None, list[int], dict[str, int]]:
    """The pre-filter of ``formulas``; also the rules without a raw requirement and stats."""
    b = _Builder(fm)
    forced: list[int] = []
    reqs: dict[int, Req] = {}
    for k, f in enumerate(formulas):
        r = b.req(f)
        if r is None:
            forced.append(k)
        elif r is not NEVER:
            reqs[k] = r
    # patterns many rules use (logsource tests, key names) are likely frequent in the data
    spread = [0] * len(b.kind)
    for r in reqs.values():
        used: set[int] = set()
        _pattern_ids(r, used)
        for i in used:
            spread[i] += 1
    cost = [c * (1.0 + spread[i] / 8) for i, c in enumerate(b.kind)]
    stats = {"raw_patterns": len(b.patterns), "raw_requirements": len(reqs)}
    if not reqs:
        stats["raw_triggers"] = 0
        return None, forced, stats
    patterns = [(pat, fl) for (pat, fl), _ in sorted(b.patterns.items(), key=lambda x: x[1])]
    memo: dict[Req, Plain] = {}
    plan = marshal.dumps((patterns, b.kind, {k: _plain(r, memo) for k, r in reqs.items()}))
    filt = _compile(_blueprint(patterns, reqs, cost, frozenset()), plan)
    stats["raw_triggers"] = len(filt.trig_rules) - 1
    return filt, forced, stats
