"""Java regular expressions (``java.util.regex``, as ES|QL ``REPLACE`` uses them) on Python's
``re``.

:func:`compile_java` translates a Java pattern with its default flags (ASCII ``\\d \\s \\w
\\b``, ASCII-only ``(?i)``, ``.`` not matching line terminators, ``$`` before a final line
terminator) to an equivalent Python pattern compiled with ``re.ASCII``, and raises
``ValueError`` naming the construct for what it cannot translate exactly: ``(?m)``/``(?x)``
and other flags, inline flags after the start, ``\\p{..}`` classes, ``\\Q..\\E``, nested
or intersected character classes, ``\\G \\R \\X \\h \\v \\k``. Possessive quantifiers and atomic
groups exist in both. :func:`java_replacement` reads a ``Matcher.replaceAll`` replacement
(``$n``/``${name}`` groups, ``\\`` escapes).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import cache, lru_cache

_TERMINATORS = "\\n\\r\\u0085\\u2028\\u2029"
_DOT = f"[^{_TERMINATORS}]"
_END = f"(?=(?:\\r\\n|[{_TERMINATORS}])?\\Z)"
_KEEP_ESCAPES = set("dDsSwWbBAtnrfa0123456789xu")
_REFUSED_ESCAPES = {
    "p": "\\p{...} classes",
    "P": "\\P{...} classes",
    "Q": "\\Q...\\E quoting",
    "G": "\\G",
    "R": "\\R",
    "X": "\\X",
    "h": "\\h",
    "H": "\\H",
    "v": "\\v",
    "V": "\\V",
    "k": "\\k<name> back references",
    "c": "\\c control characters",
    "z": None,
    "Z": None,
    "e": None,
}


def _escape(src: str, i: int, in_class: bool) -> tuple[str, int]:
    """(Python text, next index) for the escape starting at ``src[i] == '\\\\'``."""
    if i + 1 >= len(src):
        raise ValueError("trailing backslash")
    ch = src[i + 1]
    if ch in _REFUSED_ESCAPES:
        what = _REFUSED_ESCAPES[ch]
        if what is not None:
            raise ValueError(f"Java regex {what} not supported")
        if ch == "e":
            return "\\x1b", i + 2
        if in_class:
            raise ValueError(f"\\{ch} in a character class")
        return ("\\Z" if ch == "z" else _END), i + 2
    if ch.isalpha() and ch not in _KEEP_ESCAPES:
        raise ValueError(f"unknown escape \\{ch}")
    if ch in "bB" and in_class:
        raise ValueError("\\b in a character class")
    if ch == "0":  # Java octal: \0n, \0nn, \0mnn
        m = re.match(r"0([0-3][0-7]{2}|[0-7]{1,2})", src[i + 1 :])
        if m is None:
            raise ValueError("malformed octal escape")
        return f"\\u{int(m.group(1), 8):04x}", i + 1 + m.end()
    if ch == "x" and i + 2 < len(src) and src[i + 2] == "{":
        end = src.find("}", i)
        if end < 0:
            raise ValueError("malformed \\x{...}")
        return f"\\U{int(src[i + 3 : end], 16):08x}", end + 1
    if ch.isdigit() and in_class:
        raise ValueError("back reference in a character class")
    return "\\" + ch, i + 2


def _class(src: str, i: int) -> tuple[str, int]:
    """A ``[...]`` class starting at ``src[i]``: (Python text, next index)."""
    out = ["["]
    j = i + 1
    if j < len(src) and src[j] == "^":
        out.append("^")
        j += 1
    if j < len(src) and src[j] == "]":
        raise ValueError("']' first in a character class")
    while j < len(src) and src[j] != "]":
        c = src[j]
        if c == "\\":
            text, j = _escape(src, j, in_class=True)
            out.append(text)
            continue
        if c == "[":
            raise ValueError("nested character classes not supported")
        if src.startswith("&&", j):
            raise ValueError("character class intersection not supported")
        out.append("\\" + c if c in "-&~|" and src[j : j + 2] in ("--", "~~", "||") else c)
        j += 1
    if j >= len(src):
        raise ValueError("unterminated character class")
    out.append("]")
    return "".join(out), j + 1


def translate(src: str) -> tuple[str, int]:
    """(Python pattern, ``re`` flags) equivalent to the Java pattern ``src``."""
    flags = re.ASCII
    i = 0
    m = re.match(r"\(\?([a-zA-Z]+)\)", src)
    if m is not None:
        for f in m.group(1):
            if f == "i":
                flags |= re.IGNORECASE
            elif f == "s":
                flags |= re.DOTALL
            else:
                raise ValueError(f"Java regex flag (?{f}) not supported")
        i = m.end()
    dotall = bool(flags & re.DOTALL)
    out: list[str] = []
    while i < len(src):
        c = src[i]
        if c == "\\":
            text, i = _escape(src, i, in_class=False)
            out.append(text)
        elif c == "[":
            text, i = _class(src, i)
            out.append(text)
        elif c == ".":
            out.append("." if dotall else _DOT)
            i += 1
        elif c == "$":
            out.append(_END)
            i += 1
        elif c == "(" and src.startswith("(?", i):
            g = re.match(r"\(\?(<[A-Za-z][A-Za-z0-9]*>|[:=!>]|<=|<!|i:)", src[i:])
            if g is None:
                raise ValueError(f"Java regex group {src[i : i + 4]!r} not supported")
            head = g.group(1)
            if head.startswith("<") and head not in ("<=", "<!"):
                out.append("(?P" + head)
            else:
                out.append("(?" + head)
            i += g.end()
        else:
            out.append(c)
            i += 1
    return "".join(out), flags


@lru_cache(maxsize=1024)
def compile_java(src: str) -> re.Pattern[str]:
    """The compiled Python equivalent of a Java regex; ValueError when not translatable."""
    pattern, flags = translate(src)
    try:
        return re.compile(pattern, flags)
    except re.error as exc:
        raise ValueError(f"invalid regex: {exc}") from None


@lru_cache(maxsize=1024)
def java_replacement(text: str) -> Callable[[re.Match[str]], str]:
    """A ``re.sub`` callable doing what ``Matcher.replaceAll(text)`` inserts per match."""
    parts: list[str | tuple[int | str]] = []  # literal text or (group number or name,)
    i = 0
    lit: list[str] = []
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            lit.append(text[i + 1])
            i += 2
        elif c == "$":
            m = re.match(r"\$(?:(\d)|\{([A-Za-z][A-Za-z0-9]*)\})", text[i:])
            if m is None:
                raise ValueError("malformed group reference in the replacement")
            if lit:
                parts.append("".join(lit))
                lit = []
            parts.append((int(m.group(1)),) if m.group(1) else (m.group(2),))
            i += m.end()
        elif c == "\\":
            raise ValueError("trailing backslash in the replacement")
        else:
            lit.append(c)
            i += 1
    if lit:
        parts.append("".join(lit))
    if all(isinstance(p, str) for p in parts):
        constant = "".join(p for p in parts if isinstance(p, str))
        return lambda _m: constant

    def expand(m: re.Match[str]) -> str:
        return "".join(p if isinstance(p, str) else (m.group(p[0]) or "") for p in parts)

    return expand


# --------------------------------------------------------------------------- grok

#: The grok library patterns translated (their Oniguruma meaning is Python's).
GROK_PATTERNS = {"DATA": ".*?", "GREEDYDATA": ".*"}


#: Oniguruma folds these characters to several ASCII letters (Unicode CaseFolding "F"
#: entries), so under ``(?i)`` the literal text on the right matches them.
_MULTI_FOLDS = {"ss": "ßẞ", "st": "ﬅﬆ", "ff": "ﬀ", "fi": "ﬁ", "fl": "ﬂ", "ffi": "ﬃ", "ffl": "ﬄ"}
_LINE_START = "(?:(?<![\\s\\S])|(?<=\\n)(?=[\\s\\S]))"


_SIMPLE_FOLDS = {"k": "\u212a", "s": "\u017f"}  # Kelvin sign, long s


def _caseless_char(c: str) -> str:
    """An ASCII character and every character Unicode simple case folding maps with it."""
    if not c.isalpha():
        return re.escape(c)
    low = c.lower()
    return f"[{low}{low.upper()}{_SIMPLE_FOLDS.get(low, '')}]"


def _folded_run(run: str) -> str:
    """Caseless ASCII literal ``run`` as an explicit Python pattern (no ``(?i)``, whose extra
    equivalences differ): each letter with its case variants, and the characters whose full
    case folding spells part of the run (``fi`` also matches ``ﬁ``)."""

    @cache
    def at(i: int) -> str:
        if i == len(run):
            return ""
        alternatives = [_caseless_char(run[i]) + at(i + 1)]
        for k in (3, 2):
            seg = run[i : i + k].lower()
            if len(seg) == k and seg in _MULTI_FOLDS:
                alternatives.append(f"[{_MULTI_FOLDS[seg]}]" + at(i + k))
        return alternatives[0] if len(alternatives) == 1 else f"(?:{'|'.join(alternatives)})"

    return at(0)


def grok_to_python(pattern: str) -> tuple[str, dict[str, str]]:
    """(Python pattern, column name -> group name) for an ES|QL ``GROK`` pattern.

    Grok compiles with Oniguruma's Ruby syntax. Only constructs that can be read the same in
    Python are accepted: leading ``(?i)``/``(?m)`` flags (Ruby's ``m`` is "dot matches newline";
    ``i`` is Unicode case folding, spelled out for ASCII literal text), literal text, escaped
    punctuation, ``\\t \\n \\r``, ``.`` (any character but ``\\n``), ``^``/``$`` (start and end
    of a line, always, as in Ruby), character classes without letters under ``(?i)``, groups
    ``(?:`` ``(?=`` ``(?!`` ``(?<name>``, quantifiers, ``|`` and the ``%{DATA}``/``%{GREEDYDATA}``
    library patterns (optionally named). Anything else (``\\d``-style classes, other flags,
    other library patterns, typed captures) raises ValueError naming it.
    """
    out: list[str] = []
    columns: dict[str, str] = {}
    run: list[str] = []  # pending literal characters (joined to fold multi-letter sequences)

    def group_for(column: str) -> str:
        if column in columns:
            raise ValueError(f"GROK column {column} captured twice")
        columns[column] = f"g{len(columns)}"
        return columns[column]

    i, n = 0, len(pattern)
    caseless = False
    m = re.match(r"\(\?([a-z]+)\)", pattern)
    if m is not None:
        for flag in m.group(1):
            if flag not in "im":
                raise ValueError(f"GROK regex flag (?{flag}) not supported")
        caseless = "i" in m.group(1)
        if "m" in m.group(1):
            out.append("(?s)")
        i = m.end()

    def flush(keep_last: bool = False) -> None:
        text = "".join(run)
        last = ""
        if keep_last and text:
            text, last = text[:-1], text[-1]
        out.append(_folded_run(text) if caseless else re.escape(text))
        out.append(re.escape(last))
        run.clear()

    while i < n:
        c = pattern[i]
        if c not in "\\[](){}.*+?^$|" and not pattern.startswith("%{", i):
            if caseless and c.isalpha() and not c.isascii():
                raise ValueError("GROK (?i) with non-ASCII letters not supported")
            run.append(c)
            i += 1
            continue
        if run:
            flush(keep_last=c in "*+?{")  # a quantifier applies to the last character alone
        if pattern.startswith("%{", i):
            end = pattern.find("}", i)
            if end < 0:
                raise ValueError("unterminated %{...} in GROK pattern")
            parts = pattern[i + 2 : end].split(":")
            if parts[0] not in GROK_PATTERNS:
                raise ValueError(f"GROK pattern %{{{parts[0]}}} not supported")
            if len(parts) > 2:
                raise ValueError("GROK typed captures (%{NAME:field:type}) not supported")
            body = GROK_PATTERNS[parts[0]]
            out.append(f"(?P<{group_for(parts[1])}>{body})" if len(parts) == 2 else f"(?:{body})")
            i = end + 1
        elif c == "\\":
            if i + 1 >= n:
                raise ValueError("trailing backslash in GROK pattern")
            nxt = pattern[i + 1]
            if nxt.isalnum() and nxt not in "tnr":
                raise ValueError(f"GROK regex escape \\{nxt} not supported")
            out.append("\\" + nxt)
            i += 2
        elif c == "[":
            j = i + 1
            while j < n and pattern[j] != "]":
                if pattern[j] == "[" or pattern.startswith("&&", j):
                    raise ValueError("GROK nested or intersected character classes not supported")
                if pattern[j] == "\\":
                    if j + 1 < n and pattern[j + 1].isalnum() and pattern[j + 1] not in "tnr":
                        raise ValueError(f"GROK regex escape \\{pattern[j + 1]} not supported")
                    j += 1
                elif caseless and pattern[j].isalpha():
                    raise ValueError("GROK (?i) with letters in a character class not supported")
                j += 1
            if j >= n or j == i + 1 or (j == i + 2 and pattern[i + 1] == "^"):
                raise ValueError("GROK character class not supported")
            out.append(pattern[i : j + 1])
            i = j + 1
        elif c == "(" and pattern.startswith("(?", i):
            m = re.match(r"\(\?(<([A-Za-z_][A-Za-z0-9_.@]*)>|[:=!])", pattern[i:])
            if m is None:
                raise ValueError(f"GROK regex group {pattern[i : i + 4]!r} not supported")
            out.append(f"(?P<{group_for(m.group(2))}>" if m.group(2) else m.group(0))
            i += m.end()
        elif c == "$":  # Ruby syntax: end of a line
            out.append("(?m:$)")
            i += 1
        elif c == "^":  # Ruby syntax: start of a line (not after a final newline)
            out.append(_LINE_START)
            i += 1
        else:
            out.append(c)
            i += 1
    if run:
        flush()
    if not columns:
        raise ValueError("GROK pattern captures nothing")
    python = "".join(out)
    try:
        re.compile(python)
    except re.error as exc:
        raise ValueError(f"invalid GROK regex: {exc}") from None
    return python, columns


# --------------------------------------------------------------------------- dissect

_LEADING = compile_java("^(.*?)%\\{")
_KEY_DELIMITER = compile_java("(?s)%\\{([^}]*?)}(.+?(?=%\\{)|.*$)")


@lru_cache(maxsize=1024)
def dissect_spec(pattern: str) -> tuple[str, tuple[tuple[str | None, bool, str], ...]]:
    """(leading delimiter, ((column or None for a skipped key, right padding, delimiter)...))
    of a dissect pattern, as Elasticsearch splits it; ValueError for the ``+``, ``/``, ``*``,
    ``&`` modifiers and repeated names."""
    m = _LEADING.match(pattern)
    leading = m.group(1) if m else ""
    pairs: list[tuple[str | None, bool, str]] = []
    seen: set[str] = set()
    for km in _KEY_DELIMITER.finditer(pattern[len(leading) :]):
        raw, delimiter = km.group(1), km.group(2)
        pad = raw.endswith("->")
        # ES looks for a modifier anywhere in the key: "?" (named skip), "+", "/", "*", "&"
        modifiers = re.findall(r"[/+*&?]", raw)
        if any(m != "?" for m in modifiers) or len(modifiers) > 1:
            raise ValueError(f"DISSECT key modifier in %{{{raw}}} not supported")
        name = raw[:-2] if pad else raw
        column = None if name == "" or modifiers else name
        if column is not None:
            if column in seen:
                raise ValueError(f"DISSECT key {column} used twice")
            seen.add(column)
        pairs.append((column, pad, delimiter))
    if not pairs or not seen:
        raise ValueError("DISSECT pattern has no keys")
    return leading, tuple(pairs)


def _utf16_len(s: str) -> int:
    return len(s) + sum(1 for ch in s if ord(ch) > 0xFFFF)


def dissect(text: str, pattern: str) -> dict[str, str] | None:
    """The columns ``pattern`` extracts from ``text``, or None when it does not match
    (Elasticsearch's left-to-right delimiter search, consecutive delimiters included)."""
    leading, pairs = dissect_spec(pattern)
    if not (_utf16_len(text) > _utf16_len(leading) and text.startswith(leading)):
        return None
    results: dict[str, str] = {}
    matched = 0
    k = 0
    column, pad, delimiter = pairs[0]
    n = len(text)
    i = start = len(leading)

    def add(col: str | None, value: str) -> None:
        nonlocal matched
        matched += 1
        if col is not None:
            results[col] = value

    while i < n:
        if not (delimiter and text.startswith(delimiter, i)):
            i += 1
            continue
        add(column, text[start:i])
        i += len(delimiter)
        while i < n and text.startswith(delimiter, i):  # consecutive delimiters
            i += len(delimiter)
            if not pad:
                if k + 1 >= len(pairs):
                    break
                k += 1
                column, pad = pairs[k][0], pairs[k][1]  # the delimiter stays, as in ES
                add(column, "")
        if k + 1 >= len(pairs):
            break
        k += 1
        column, pad, delimiter = pairs[k]
        start = i
    if matched != len(pairs) and delimiter == "":
        add(column, text[start:])
    wanted = sum(1 for c, _, _ in pairs if c is not None)
    return results if matched == len(pairs) and len(results) == wanted else None
