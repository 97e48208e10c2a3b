"""Hyperscan compile wrappers: byte patterns, databases and the per-field atom groups.

A :class:`Group` holds the string atoms of one field and their one compiled database; it is
built once (:func:`compile_group`) or restored from its serialised form
(:func:`dump_group` / :func:`load_group`) and never changes afterwards. Scanning values
with it is the matcher's business (``rules/matcher/table.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any

import hyperscan as hs
import re2

from ruletag.rules.regex import compile_re2, needs_non_ascii

__all__ = [
    "Group",
    "compile_db",
    "compile_group",
    "dump_db",
    "dump_group",
    "encode",
    "hs_escape",
    "load_db",
    "load_group",
]


def encode(s: str) -> bytes:
    """Text as the UTF-8 bytes Hyperscan scans (lone surrogates kept: ``surrogatepass``)."""
    return s.encode("utf-8", "surrogatepass")


def hs_escape(lit: bytes) -> bytes:
    """A Hyperscan pattern matching the bytes ``lit`` literally."""
    return b"".join(
        bytes((c,)) if (48 <= c <= 57 or 65 <= c <= 90 or 97 <= c <= 122) else b"\\x%02x" % c
        for c in lit
    )


def compile_db(patterns: Sequence[tuple[int, bytes, int]]) -> Any:
    """One block-mode Hyperscan database of (id, pattern, flags); raises ``hs.error`` when
    Hyperscan rejects a pattern."""
    db = hs.Database(mode=hs.HS_MODE_BLOCK)
    db.compile(
        expressions=[p for _, p, _ in patterns],
        ids=[i for i, _, _ in patterns],
        elements=len(patterns),
        flags=[f for _, _, f in patterns],
    )
    return db


def dump_db(db: Any) -> bytes:
    """A database serialised (``load_db`` reads it back)."""
    return hs.dumpb(db)


def load_db(blob: bytes) -> Any:
    """A database serialised by ``hs.dumpb``, with its scratch space."""
    db = hs.loadb(blob, hs.HS_MODE_BLOCK)
    db.scratch = hs.Scratch(db)
    return db


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


class _Programs:
    """A group's regex atoms compiled by RE2, on first use: a table of every rule holds
    ~1,100 of them, and compiling them all took ~0.15 s of each start. Two threads that race
    on the first use compile the same programs twice; either result is kept."""

    __slots__ = ("_got", "_hs_regex", "_regex")

    def __init__(self, regex: tuple[tuple[int, str, str], ...], hs_regex: frozenset[int]) -> None:
        self._regex = regex
        self._hs_regex = hs_regex  # the ids Hyperscan runs (empty when there is no database)
        self._got: tuple[tuple[tuple[int, Any], ...], ...] | None = None

    def get(self) -> tuple[tuple[tuple[int, Any], ...], ...]:
        """(all, only, all ASCII, only ASCII): see :class:`Group`."""
        got = self._got
        if got is None:
            got = self._got = _compile_programs(self._regex, self._hs_regex)
        return got


def _compile_programs(
    regex: tuple[tuple[int, str, str], ...], in_db: frozenset[int]
) -> tuple[tuple[tuple[int, Any], ...], ...]:
    r2: list[tuple[int, Any]] = []
    non_ascii: set[int] = set()
    for i, pat, flags in regex:
        try:
            prefix = f"(?{''.join(sorted(set(flags)))})" if flags else ""
            r2.append((i, compile_re2(prefix + pat)))
        except re2.error:
            continue  # invalid: never matches (front-ends reject these)
        if not pat.isascii() and needs_non_ascii(prefix + pat):
            non_ascii.add(i)
    only = tuple(x for x in r2 if x[0] not in in_db)
    return (
        tuple(r2),
        only,
        tuple(x for x in r2 if x[0] not in non_ascii),
        tuple(x for x in only if x[0] not in non_ascii),
    )


@dataclass(frozen=True, slots=True)
class Group:
    """The string atoms of one field (``None`` = keywords) and their one database.

    Cased, caseless and regex atoms share one Hyperscan database (per-pattern flags), so an
    ASCII value costs one scan. Non-ASCII values are scanned as is for the cased atoms and
    lower-cased for the caseless ones, and their regexes run by RE2 (as do values ending in a
    newline, where ``$`` semantics could differ).
    """

    field: str | None
    cased: tuple[tuple[int, bytes], ...]
    caseless: tuple[tuple[int, bytes], ...]
    regex: tuple[tuple[int, str, str], ...]  # id, pattern, flags
    db: Any
    hs_regex: tuple[int, ...]  # regex atoms compiled into ``db``
    cased_ids: frozenset[int]
    caseless_ids: frozenset[int]
    programs: _Programs = dc_field(compare=False, repr=False)

    @property
    def re2_all(self) -> tuple[tuple[int, Any], ...]:
        """Every regex atom, compiled by RE2."""
        return self.programs.get()[0]

    @property
    def re2_only(self) -> tuple[tuple[int, Any], ...]:
        """The regex atoms Hyperscan cannot take."""
        return self.programs.get()[1]

    @property
    def re2_all_ascii(self) -> tuple[tuple[int, Any], ...]:
        """:attr:`re2_all` without the regexes only a text with a non-ASCII character can
        match (what an ASCII value runs)."""
        return self.programs.get()[2]

    @property
    def re2_only_ascii(self) -> tuple[tuple[int, Any], ...]:
        """:attr:`re2_only` without the regexes that need a non-ASCII character."""
        return self.programs.get()[3]


def _hs_regex_patterns(regex: Sequence[tuple[int, str, str]]) -> list[tuple[int, bytes, int]]:
    out: list[tuple[int, bytes, int]] = []
    for i, pat, flags in regex:
        if not pat.isascii():
            continue
        f = hs.HS_FLAG_SINGLEMATCH | hs.HS_FLAG_ALLOWEMPTY | hs.HS_FLAG_UTF8
        f |= hs.HS_FLAG_CASELESS if "i" in flags else 0
        f |= hs.HS_FLAG_MULTILINE if "m" in flags else 0
        f |= hs.HS_FLAG_DOTALL if "s" in flags else 0
        out.append((i, pat.encode(), f))
    return out


def compile_group(
    field: str | None,
    cased: Sequence[tuple[int, bytes]],
    caseless: Sequence[tuple[int, bytes]],
    regex: Sequence[tuple[int, str, str]],
) -> Group:
    """The group of these atoms, with their database compiled."""
    fl = hs.HS_FLAG_SINGLEMATCH | hs.HS_FLAG_ALLOWEMPTY | hs.HS_FLAG_DOTALL
    lits = [(i, p, fl) for i, p in cased]
    lits += [(i, p, fl | hs.HS_FLAG_CASELESS) for i, p in caseless]
    hs_pats = _hs_regex_patterns(regex)
    bad: set[int] = set()
    db = None
    if lits or hs_pats:
        db = _hs_try([*lits, *hs_pats])
        if db is None:
            # find the regexes Hyperscan rejects among the regexes alone (cheap), then
            # compile the rest (probing everything only if that still fails)
            bad.update(_hs_compile(hs_pats)[1] if hs_pats else ())
            db, more = _hs_compile([x for x in (*lits, *hs_pats) if x[0] not in bad])
            bad.update(more)
    hs_regex = tuple(i for i, _, _ in hs_pats if i not in bad)
    return _group(field, tuple(cased), tuple(caseless), tuple(regex), db, hs_regex)


def _group(
    field: str | None,
    cased: tuple[tuple[int, bytes], ...],
    caseless: tuple[tuple[int, bytes], ...],
    regex: tuple[tuple[int, str, str], ...],
    db: Any,
    hs_regex: tuple[int, ...],
) -> Group:
    """The group with its id sets and its RE2 programs, compiled on first use (rebuilt after
    loading, never stored)."""
    in_db = frozenset(hs_regex) if db is not None else frozenset()
    return Group(
        field=field,
        cased=cased,
        caseless=caseless,
        regex=regex,
        db=db,
        hs_regex=hs_regex,
        cased_ids=frozenset(i for i, _ in cased),
        caseless_ids=frozenset(i for i, _ in caseless),
        programs=_Programs(regex, in_db),
    )


def dump_group(g: Group) -> tuple[Any, ...]:
    """The group as picklable data (its database serialised)."""
    db = dump_db(g.db) if g.db is not None else None
    return (g.field, g.cased, g.caseless, g.regex, db, g.hs_regex)


def load_group(state: tuple[Any, ...]) -> Group:
    """A group from :func:`dump_group` output (no Hyperscan compile)."""
    field, cased, caseless, regex, db, hs_regex = state
    return _group(field, cased, caseless, regex, None if db is None else load_db(db), hs_regex)
