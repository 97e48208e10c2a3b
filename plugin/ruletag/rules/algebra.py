"""The IR algebra: building and normalising :mod:`ruletag.rules.ir` nodes, and the value
coercions the IR's semantics are written in.

One place for what every front-end, the compiler and the reference evaluator agree on:

* **Constructors** :func:`and_`, :func:`or_`, :func:`not_` simplify as they build: nested
  And/Or are flattened one level (their arguments were built by these constructors too),
  duplicate arguments dropped (first place kept), a neutral constant dropped (true in And,
  false in Or), an absorbing one returned (false in And, true in Or); no argument is the
  neutral constant, one argument is itself. ``not_`` removes double negation, negates a
  constant and turns ``Not(IsNull(f))`` into ``Exists(f)``. :func:`simplify` applies them to
  a whole tree (a tree built by hand, ``And((logsource, condition))``).
* **Wildcard tokens** (:class:`~ruletag.rules.ir.Match` patterns): :func:`tokens` joins text
  and wildcards into the canonical form (no empty text, adjacent text merged, no two ``*`` in
  a row), :func:`wildcard_tokens` reads a ``*``/``?`` string (no escapes), and
  :func:`wildcard_regex` / :func:`wildcard_match` give the pattern's meaning as a Python regex.
* **Value coercions**: :func:`as_text` (a scalar's canonical text), :func:`number_of`
  (ints, floats and plain decimal strings), :func:`ip_of` / :func:`network_of` (IP text),
  :func:`equals_value` (the :class:`~ruletag.rules.ir.Equals` comparison) and
  :func:`re2_search` (RE2 on text that may hold lone surrogates from undecodable bytes).

Only the meaning of the IR lives here: how the compiled table matches (Hyperscan databases,
generated code) is ``compiler/codegen.py``'s, and the reference evaluator walks the IR on its own.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

from ruletag.rules.ir import And, Const, Exists, IsNull, Node, Not, Or, Token, Wild

__all__ = [
    "and_",
    "as_text",
    "equals_value",
    "ip_of",
    "network_of",
    "not_",
    "number_of",
    "or_",
    "re2_search",
    "simplify",
    "tokens",
    "wildcard_match",
    "wildcard_regex",
    "wildcard_tokens",
]

# --------------------------------------------------------------------------- constructors


def _join(kind: type[And] | type[Or], args: Iterable[Node]) -> Node:
    neutral = kind is And  # true changes nothing in an And, false nothing in an Or
    out: dict[Node, None] = {}  # ordered set
    for a in args:
        if isinstance(a, Const):
            if a.value == neutral:
                continue
            return a  # false in an And / true in an Or decides
        if isinstance(a, kind):
            out.update(dict.fromkeys(a.args))
        else:
            out[a] = None
    if not out:
        return Const(neutral)
    if len(out) == 1:
        return next(iter(out))
    return kind(tuple(out))


def and_(*args: Node) -> Node:
    """The conjunction of ``args``, simplified (see the module docstring)."""
    return _join(And, args)


def or_(*args: Node) -> Node:
    """The disjunction of ``args``, simplified (see the module docstring)."""
    return _join(Or, args)


def not_(arg: Node) -> Node:
    """The negation of ``arg``: no double negation, constants folded, ``IsNull`` -> ``Exists``."""
    if isinstance(arg, Const):
        return Const(not arg.value)
    if isinstance(arg, Not):
        return arg.arg
    if isinstance(arg, IsNull):
        return Exists(arg.field)
    return Not(arg)


def simplify(n: Node) -> Node:
    """``n`` rebuilt bottom-up with :func:`and_`, :func:`or_` and :func:`not_`."""
    if isinstance(n, And):
        return and_(*map(simplify, n.args))
    if isinstance(n, Or):
        return or_(*map(simplify, n.args))
    if isinstance(n, Not):
        return not_(simplify(n.arg))
    return n


# --------------------------------------------------------------------------- wildcard tokens


def tokens(*parts: Token) -> tuple[Token, ...]:
    """Text and wildcards as a Match pattern: empty text dropped, adjacent text merged, a run
    of ``*`` kept once."""
    out: list[Token] = []
    for p in parts:
        if p == "":
            continue
        if out:
            last = out[-1]
            if p is Wild.ANY and last is Wild.ANY:
                continue
            if isinstance(p, str) and isinstance(last, str):
                out[-1] = last + p
                continue
        out.append(p)
    return tuple(out)


_WILDCARDS = {"*": Wild.ANY, "?": Wild.ONE}


def wildcard_tokens(text: str) -> tuple[Token, ...]:
    """A wildcard string (``*`` any run, ``?`` one character, no escapes) as Match tokens."""
    return tokens(*(_WILDCARDS.get(p, p) for p in re.split(r"([*?])", text)))


@lru_cache(maxsize=4096)
def wildcard_regex(pattern: tuple[Token, ...], cased: bool) -> re.Pattern[str]:
    """Match tokens -> an anchored Python regex (use ``fullmatch``; DOTALL). Caseless
    patterns are lower-cased: match them against lower-cased text."""
    parts: list[str] = []
    for tok in pattern:
        if tok is Wild.ANY:
            parts.append(".*")
        elif tok is Wild.ONE:
            parts.append(".")
        else:
            parts.append(re.escape(tok if cased else str(tok).lower()))
    return re.compile("".join(parts), re.DOTALL)


def wildcard_match(text: str, pattern: tuple[Token, ...], cased: bool) -> bool:
    """Does ``text`` fully match the Match ``pattern`` (``cased=False``: both lower-cased)?"""
    return wildcard_regex(pattern, cased).fullmatch(text if cased else text.lower()) is not None


# --------------------------------------------------------------------------- values

_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def as_text(value: object) -> str | None:
    """Canonical text of a scalar (``ir`` semantics): str as is, bytes decoded, ints, floats and
    bools as text (``"4688"``, ``"true"``); ``None`` for maps, lists and null."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "surrogateescape")
    return None


def number_of(value: object) -> int | float | None:
    """A value as a number: ints and floats as is, plain decimal strings (``[+-]digits`` or a
    float literal, no spaces) parsed; bools are not numbers; else None (also for an integer
    text too long for ``int``)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return value
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("utf-8", "surrogateescape")
    if isinstance(value, str):
        if _INT.fullmatch(value):
            try:
                return int(value)
            except ValueError:  # more digits than int() converts (sys.get_int_max_str_digits)
                return None
        if _FLOAT.fullmatch(value):
            return float(value)
    return None


def equals_value(value: object, want: int | float | bool) -> bool:
    """The :class:`~ruletag.rules.ir.Equals` test of one value: a bool equals the same bool or
    its text (``"true"``), a number any value :func:`number_of` reads as that number."""
    if isinstance(want, bool):
        if isinstance(value, bool):
            return value is want
        return as_text(value) == ("true" if want else "false")
    n = number_of(value)
    return n is not None and n == want


def ip_of(value: object) -> IPAddress | None:
    """The IP address a value's text holds (surrounding white space ignored), else None."""
    text = as_text(value)
    return None if text is None else _ip_of_text(text)


@lru_cache(maxsize=8192)
def _ip_of_text(text: str) -> IPAddress | None:
    """:func:`ip_of` of a text (cached: logs repeat their addresses, and parsing one costs
    microseconds)."""
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None


@lru_cache(maxsize=4096)
def network_of(cidr: str) -> IPNetwork | None:
    """The network of a CIDR text (host bits allowed, white space ignored), else None."""
    try:
        return ipaddress.ip_network(cidr.strip(), strict=False)
    except ValueError:
        return None


def re2_search(rx: Any, text: str) -> bool:
    """``rx.search(text)`` for an RE2 regex; lone surrogates (undecodable bytes, which are not
    UTF-8) are searched as U+FFFD."""
    try:
        return rx.search(text) is not None
    except UnicodeEncodeError:
        clean = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        return rx.search(clean) is not None
