"""RE2 as the front-ends, the compiler and the reference evaluator use it: a bad pattern is
reported by its exception only, never also printed on stderr by the library; and which
patterns can only match text holding a non-ASCII character (an ASCII value need not run them).
"""

from __future__ import annotations

import importlib
import re
from typing import Any

import re2

__all__ = ["OPTIONS", "compile_re2", "needs_non_ascii"]

#: RE2 options: errors by exception only (RE2 logs them to stderr by default)
OPTIONS = re2.Options()
OPTIONS.log_errors = False


def compile_re2(pattern: str) -> Any:
    """``re2.compile(pattern)`` with :data:`OPTIONS`."""
    return re2.compile(pattern, OPTIONS)


#: Python's own regex parser and its opcodes (private modules of ``re``, without type stubs)
_parser: Any = importlib.import_module("re._parser")
_c: Any = importlib.import_module("re._constants")
#: classes wider than this (case-insensitive) are not walked: assumed to reach ASCII
_WIDE = 4096
_REPEATS = (_c.MAX_REPEAT, _c.MIN_REPEAT, _c.POSSESSIVE_REPEAT)


def needs_non_ascii(pattern: str) -> bool:
    """Whether every text ``pattern`` (RE2 syntax, inline flags included) matches holds a
    non-ASCII character, so that it cannot match an ASCII text.

    Conservative: the pattern is read by Python's own regex parser, and anything that parser
    refuses or that is not plainly a non-ASCII character (any class with ASCII or a category
    in it, a negated class, a construct other than literals, classes, groups, alternations,
    repeats and anchors) counts as possibly ASCII. Case-insensitive characters count as
    ASCII when a case variant of theirs is (``K``, the Kelvin sign, is a ``k``)."""
    try:
        parsed = _parser.parse(pattern)
    except (re.error, RecursionError, OverflowError, ValueError):
        return False
    return _seq_needs(list(parsed), bool(parsed.state.flags & re.IGNORECASE))


def _reaches_ascii(code: int, caseless: bool) -> bool:
    if code < 128:
        return True
    if not caseless:
        return False
    ch = chr(code)
    return any(ord(x) < 128 for x in ch.lower() + ch.upper() + ch.casefold() + ch.swapcase())


def _seq_needs(items: list[tuple[Any, Any]], caseless: bool) -> bool:
    return any(_item_needs(op, av, caseless) for op, av in items)


def _item_needs(op: Any, av: Any, caseless: bool) -> bool:
    if op is _c.LITERAL:
        return not _reaches_ascii(av, caseless)
    if op is _c.IN:
        return _class_needs(av, caseless)
    if op is _c.SUBPATTERN:
        _group, add, drop, sub = av
        inner = (caseless or bool(add & re.IGNORECASE)) and not drop & re.IGNORECASE
        return _seq_needs(list(sub), inner)
    if op is _c.BRANCH:
        return all(_seq_needs(list(branch), caseless) for branch in av[1])
    if op in _REPEATS:
        low, _high, sub = av
        return low >= 1 and _seq_needs(list(sub), caseless)
    if op is _c.ATOMIC_GROUP:
        return _seq_needs(list(av), caseless)
    return False  # AT (zero width), ANY, NOT_LITERAL, categories, anything else


def _class_needs(items: list[tuple[Any, Any]], caseless: bool) -> bool:
    for op, av in items:
        if op is _c.LITERAL:
            if _reaches_ascii(av, caseless):
                return False
        elif op is _c.RANGE:
            low, high = av
            if low < 128 or (caseless and high - low > _WIDE):
                return False
            if caseless and any(_reaches_ascii(c, True) for c in range(low, high + 1)):
                return False
        else:  # NEGATE, CATEGORY, ...
            return False
    return bool(items)
