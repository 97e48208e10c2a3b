"""Elastic EQL functions on Python values, with Elasticsearch semantics.

Used by ``reference.py`` and by the compiled table for :class:`ir.Call` leaves. Every function
takes scalar arguments (``str``, ``int``, ``float``, ``bool``, ``bytes`` or ``None``) and
returns a scalar; a ``None`` argument (missing or null field) gives ``None``, except where
noted. Arguments of the wrong type also give ``None`` (a runtime type error in Elasticsearch
fails the search; here the condition is simply not met), and so do results no number can
hold and NaN or infinite offsets: no function ever raises on record values. ``bytes`` are
decoded as UTF-8 and string functions read numbers and booleans through their canonical text
(``ir`` semantics).

Names are the lower-case EQL names without ``~``; ``cased=False`` selects the ``~`` variant
(case-insensitive) of ``between``, ``endswith``, ``indexof``, ``startswith`` and
``stringcontains``:

========================  =======================================================
``add(a, b)`` ...         ``subtract``, ``multiply``, ``divide``, ``modulo``: numbers
                          (numeric strings are not converted). Integer ``divide`` and
                          ``modulo`` truncate toward zero like Java; ``/ 0`` -> None.
``between(s, l, r[, g])``  text between the first ``l`` and the next ``r`` (the last
                          ``r`` when ``g`` is true); ``""`` when either is not found.
``cidrmatch(ip, c...)``   ip inside any CIDR; invalid ip -> False.
``concat(a...)``          the arguments' text joined; any None -> None.
``endswith(s, x)``        bool.
``indexof(s, x[, i])``    first index of ``x`` at or after ``i`` (None, negative -> 0),
                          None when absent.
``length(s)``             character count.
``number(s[, base])``     parse an integer (``0x`` prefix ok with base 16) or, base 10,
                          a float; unparsable -> None.
``startswith(s, x)``      bool.
``string(v)``             canonical text.
``stringcontains(s, x)``  bool.
``substring(s, a[, b])``  Python slice ``s[a:b]`` (negative offsets from the end).
========================  =======================================================

ES|QL functions (``esql.py``) share the dispatch under their ES|QL names, with ES|QL's
semantics; they are not EQL functions (``ARITY`` stays the EQL table, ``ESQL_ARITY`` is
theirs). String positions are in code points, 1-based:

===========================  ====================================================
``to_lower(s)``              ``s`` lower-cased (``str.lower``); ``to_upper`` too.
``locate(s, x)``             1-based position of the first ``x`` in ``s``, 0 when absent.
``esql_substring(s, a[, n])``  ``n`` code points (default: the rest) from position
                             ``a`` (1-based; negative counts from the end, 0 is 1);
                             a negative ``n`` -> None.
``replace(s, rx, r)``        every match of the Java regex ``rx`` replaced by ``r``
                             (``Matcher.replaceAll``; see ``javaregex.py``).
``coalesce(a...)``           the first non-null argument.
``trim(s)``                  leading and trailing ``Character.isWhitespace`` code points
                             removed; ``ltrim``/``rtrim`` one side.
``to_double(v)``             numbers and bools as floats, numeric text parsed.
``url_decode(s)``            ``java.net.URLDecoder`` (UTF-8): ``+`` is a space, ``%xx``
                             runs are UTF-8 bytes; a malformed escape -> None.
``from_base64(s)``           ``java.util.Base64`` decoding (padding optional); the bytes
                             as text (UTF-8, surrogateescape); invalid input -> None.
``to_ip(v)``                 the address's text (``ipaddress``), None if not one.
``date_trunc(span, d)``      ``d`` rounded down to ``span`` (``"5 minutes"``), ISO text.
``date_diff(unit, a, b)``    ``b - a`` in whole ``unit``s, truncated toward zero.
``date_add(d, span, sign)``  ``d + span`` (sign 1) or ``d - span`` (-1), ISO text.
``dissect(s, pattern, c)``   column ``c`` of the ``DISSECT`` pattern; None when the
                             pattern does not match (``javaregex.dissect``).
``grok(s, rx, g)``           group ``g`` of the first match of Python regex ``rx`` (a
                             translated ``GROK`` pattern); None when there is none.
===========================  ====================================================
"""

from __future__ import annotations

import base64
import calendar
import ipaddress
import math
import re
import unicodedata
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from functools import lru_cache

from ruletag.rules.algebra import as_text, ip_of, network_of, number_of
from ruletag.rules.javaregex import compile_java, dissect, java_replacement


def _text(value: object) -> str | None:
    return as_text(value)


def _num(value: object) -> int | float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


def _index(value: object) -> int | None:
    """An offset argument as an int; None for a non-number, NaN or an infinity."""
    n = _num(value)
    if n is None or (isinstance(n, float) and not math.isfinite(n)):
        return None
    return int(n)


def _fold(s: str, cased: bool) -> str:
    return s if cased else s.lower()


# --------------------------------------------------------------------------- math


def _arith(op: str, a: object, b: object) -> int | float | None:
    x, y = _num(a), _num(b)
    if x is None or y is None:
        return None
    try:
        return _arith_numbers(op, x, y)
    except (OverflowError, ValueError):  # int too large for a float, fmod of an infinity
        return None


def _arith_numbers(op: str, x: int | float, y: int | float) -> int | float | None:
    if op == "add":
        return x + y
    if op == "subtract":
        return x - y
    if op == "multiply":
        return x * y
    if y == 0:
        return None
    both_int = isinstance(x, int) and isinstance(y, int)
    if op == "divide":
        if both_int:
            q = abs(x) // abs(y)
            return q if (x >= 0) == (y >= 0) else -q
        return x / y
    # modulo: the sign follows the dividend (Java %)
    return math.fmod(x, y) if not both_int else (abs(x) % abs(y)) * (1 if x >= 0 else -1)


def add(a: object, b: object) -> int | float | None:
    """``a + b``."""
    return _arith("add", a, b)


def subtract(a: object, b: object) -> int | float | None:
    """``a - b``."""
    return _arith("subtract", a, b)


def multiply(a: object, b: object) -> int | float | None:
    """``a * b``."""
    return _arith("multiply", a, b)


def divide(a: object, b: object) -> int | float | None:
    """``a / b``; integer division truncates toward zero; division by zero -> None."""
    return _arith("divide", a, b)


def modulo(a: object, b: object) -> int | float | None:
    """``a % b`` with the sign of ``a``; modulo zero -> None."""
    return _arith("modulo", a, b)


# --------------------------------------------------------------------------- strings


def between(
    source: object, left: object, right: object, greedy: object = False, *, cased: bool = True
) -> str | None:
    """Text between the first ``left`` and the following (or, greedy, last) ``right``."""
    s, lt, rt = _text(source), _text(left), _text(right)
    if s is None or lt is None or rt is None:
        return None
    fs, fl, fr = _fold(s, cased), _fold(lt, cased), _fold(rt, cased)
    i = fs.find(fl)
    if i < 0:
        return ""
    start = i + len(fl)
    j = fs.rfind(fr, start) if greedy is True else fs.find(fr, start)
    if j < 0:
        return ""
    return s[start:j]


def cidrmatch(ip: object, *cidrs: object) -> bool | None:
    """True when ``ip`` is inside any of ``cidrs``."""
    t = _text(ip)
    if t is None:
        return None
    addr = ip_of(t)
    if addr is None:
        return False
    for c in cidrs:
        ct = _text(c)
        net = network_of(ct) if ct is not None else None
        if net is not None and addr.version == net.version and addr in net:
            return True
    return False


def concat(*args: object) -> str | None:
    """The arguments' text, joined."""
    parts = [_text(a) for a in args]
    if any(p is None for p in parts):
        return None
    return "".join(p for p in parts if p is not None)


def endswith(source: object, suffix: object, *, cased: bool = True) -> bool | None:
    """``source`` ends with ``suffix``."""
    s, x = _text(source), _text(suffix)
    if s is None or x is None:
        return None
    return _fold(s, cased).endswith(_fold(x, cased))


def startswith(source: object, prefix: object, *, cased: bool = True) -> bool | None:
    """``source`` starts with ``prefix``."""
    s, x = _text(source), _text(prefix)
    if s is None or x is None:
        return None
    return _fold(s, cased).startswith(_fold(x, cased))


def stringcontains(source: object, sub: object, *, cased: bool = True) -> bool | None:
    """``sub`` occurs in ``source``."""
    s, x = _text(source), _text(sub)
    if s is None or x is None:
        return None
    return _fold(x, cased) in _fold(s, cased)


def indexof(source: object, sub: object, start: object = 0, *, cased: bool = True) -> int | None:
    """First index of ``sub`` in ``source`` at or after ``start``; None when absent."""
    s, x = _text(source), _text(sub)
    if s is None or x is None:
        return None
    if start is None:
        begin = 0
    else:
        n = _index(start)
        if n is None:
            return None
        begin = max(n, 0)
    if begin > len(s):
        return None
    i = _fold(s, cased).find(_fold(x, cased), begin)
    return i if i >= 0 else None


def length(source: object) -> int | None:
    """Character length of the text."""
    s = _text(source)
    return None if s is None else len(s)


def number(source: object, base: object = None) -> int | float | None:
    """Parse text as a number in ``base`` (default 10; floats only in base 10)."""
    if _num(source) is not None:
        return _num(source)
    s = _text(source)
    if s is None:
        return None
    s = s.strip()
    b = 10 if base is None else _num(base)
    if not isinstance(b, int) or not 2 <= b <= 36:
        return None
    if b == 16 and s.lower().startswith(("0x", "-0x", "+0x")):
        s = s.replace("0x", "", 1).replace("0X", "", 1)
    if b == 10:
        return number_of(s)
    try:
        return int(s, b)
    except ValueError:
        return None


def string(value: object) -> str | None:
    """Canonical text of a value."""
    return _text(value)


def substring(source: object, start: object, end: object = None) -> str | None:
    """``source[start:end]`` with Python slice semantics."""
    s = _text(source)
    a = _index(start)
    if s is None or a is None:
        return None
    b = None if end is None else _index(end)
    if end is not None and b is None:
        return None
    return s[a:b]


# --------------------------------------------------------------------------- ES|QL


def to_lower(source: object) -> str | None:
    """``source`` lower-cased."""
    s = _text(source)
    return None if s is None else s.lower()


def to_upper(source: object) -> str | None:
    """``source`` upper-cased."""
    s = _text(source)
    return None if s is None else s.upper()


def locate(source: object, sub: object) -> int | None:
    """1-based position of ``sub`` in ``source``; 0 when absent."""
    s, x = _text(source), _text(sub)
    if s is None or x is None:
        return None
    return s.find(x) + 1


def esql_substring(source: object, start: object, count: object = None) -> str | None:
    """ES|QL ``SUBSTRING``: ``count`` code points from 1-based ``start``."""
    s, a = _text(source), _index(start)
    if s is None or a is None:
        return None
    begin = a - 1 if a > 0 else max(len(s) + a, 0) if a < 0 else 0
    if count is None:
        return s[begin:]
    n = _index(count)
    if n is None or n < 0:
        return None
    return s[begin : begin + n]


def replace(source: object, regex: object, replacement: object) -> str | None:
    """Every match of the Java regex ``regex`` in ``source`` replaced by ``replacement``."""
    s, rx, r = _text(source), _text(regex), _text(replacement)
    if s is None or rx is None or r is None:
        return None
    try:
        return compile_java(rx).sub(java_replacement(r), s)
    except ValueError:
        return None


def java_whitespace(ch: str) -> bool:
    """``Character.isWhitespace``: Unicode space separators except the non-breaking ones, and
    the ASCII controls TAB, LF, VT, FF, CR and FS, GS, RS, US."""
    if ch in "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f":
        return True
    if ch in "\xa0\u2007\u202f":
        return False
    return unicodedata.category(ch) in ("Zs", "Zl", "Zp")


def _trim(source: object, left: bool, right: bool) -> str | None:
    s = _text(source)
    if s is None:
        return None
    a, b = 0, len(s)
    while left and a < b and java_whitespace(s[a]):
        a += 1
    while right and b > a and java_whitespace(s[b - 1]):
        b -= 1
    return s[a:b]


def trim(source: object) -> str | None:
    """``source`` without leading and trailing white space (Java's definition)."""
    return _trim(source, True, True)


def ltrim(source: object) -> str | None:
    """``source`` without leading white space."""
    return _trim(source, True, False)


def rtrim(source: object) -> str | None:
    """``source`` without trailing white space."""
    return _trim(source, False, True)


def coalesce(*args: object) -> object:
    """The first argument that is not null."""
    return next((a for a in args if a is not None), None)


def to_double(value: object) -> float | None:
    """A number, bool or numeric text as a float."""
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    n = number_of(value)
    if n is None:
        return None
    try:
        return float(n)
    except OverflowError:
        return None


def to_ip(value: object) -> str | None:
    """The text of an IPv4 or IPv6 address (``TO_IP``); None when it is not one."""
    text = as_text(value)
    if text is None:
        return None
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        return None


def _date(value: object) -> datetime | None:
    """A date value: ISO 8601 text (no zone: UTC) or epoch milliseconds (seconds below
    10^12, like record timestamps); None if it is neither."""
    if isinstance(value, bool):
        return None
    n = number_of(value)
    if n is not None:
        v = float(n)
        try:
            return datetime.fromtimestamp(v / 1000.0 if abs(v) > 1e12 else v, UTC)
        except (OverflowError, OSError, ValueError):
            return None
    text = as_text(value)
    if text is None:
        return None
    try:
        dt = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def _iso(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


#: Fixed-length time units (ES|QL names and abbreviations) -> seconds.
_FIXED_UNITS: dict[str, float] = {}
for _names, _seconds in (
    (("millisecond", "milliseconds", "ms"), 0.001),
    (("second", "seconds", "sec", "s", "ss"), 1.0),
    (("minute", "minutes", "min", "mi", "n"), 60.0),
    (("hour", "hours", "h", "hh"), 3600.0),
    (("day", "days", "d", "dd"), 86400.0),
    (("week", "weeks", "w", "wk", "ww"), 604800.0),
):
    for _n in _names:
        _FIXED_UNITS[_n] = _seconds
_MONTH_UNITS = {"month": 1, "months": 1, "mo": 1, "mm": 1, "quarter": 3, "quarters": 3}
_MONTH_UNITS |= {"q": 3, "qq": 3, "year": 12, "years": 12, "yr": 12, "y": 12, "yy": 12}
_MONTH_UNITS |= {"yyyy": 12}
#: 1970-01-05, the first Monday after the epoch: weeks are truncated to Mondays.
_MONDAY = 4 * 86400.0


def date_trunc(span: object, value: object) -> str | None:
    """``DATE_TRUNC(n unit, date)``: the date rounded down to a multiple of the span (epoch
    aligned; weeks to Mondays; months, quarters and years by the calendar), as ISO text."""
    dt = _date(value)
    text = as_text(span)
    if dt is None or text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*([a-z]+)\s*", text.lower())
    if m is None or int(m.group(1)) < 1:
        return None
    n, unit = int(m.group(1)), m.group(2)
    if unit in _FIXED_UNITS:
        step = n * _FIXED_UNITS[unit]
        offset = _MONDAY if _FIXED_UNITS[unit] == 604800.0 else 0.0
        t = dt.timestamp() - offset
        return _iso(datetime.fromtimestamp(math.floor(t / step) * step + offset, UTC))
    if unit in _MONTH_UNITS:
        months = n * _MONTH_UNITS[unit]
        total = dt.year * 12 + dt.month - 1
        total -= total % months
        return _iso(datetime(total // 12, total % 12 + 1, 1, tzinfo=UTC))
    return None


def date_add(value: object, span: object, sign: object = 1) -> str | None:
    """``date + span`` (``sign`` 1) or ``date - span`` (-1), ``span`` like ``"9 minutes"``
    (months, quarters and years by the calendar, the day clamped to the month), as ISO text."""
    dt = _date(value)
    text = as_text(span)
    if dt is None or text is None or sign not in (1, -1):
        return None
    m = re.fullmatch(r"\s*(\d+)\s*([a-z]+)\s*", text.lower())
    if m is None:
        return None
    n, unit = int(m.group(1)) * (1 if sign == 1 else -1), m.group(2)
    try:
        if unit in _FIXED_UNITS:
            return _iso(dt + timedelta(seconds=n * _FIXED_UNITS[unit]))
        if unit in _MONTH_UNITS:
            total = dt.year * 12 + dt.month - 1 + n * _MONTH_UNITS[unit]
            year, month = divmod(total, 12)
            day = min(dt.day, calendar.monthrange(year, month + 1)[1])
            return _iso(dt.replace(year=year, month=month + 1, day=day))
    except (OverflowError, ValueError):
        return None
    return None


def date_diff(unit: object, start: object, end: object) -> int | None:
    """``DATE_DIFF(unit, start, end)``: ``end - start`` in whole units (truncated toward
    zero); months, quarters and years count calendar months."""
    a, b = _date(start), _date(end)
    name = as_text(unit)
    if a is None or b is None or name is None:
        return None
    name = name.lower()
    if name in _FIXED_UNITS:
        delta = (b - a).total_seconds() / _FIXED_UNITS[name]
        return int(delta)  # int() truncates toward zero
    if name in _MONTH_UNITS:
        months = (b.year - a.year) * 12 + (b.month - a.month)
        rest_b = (b.day, b.hour, b.minute, b.second, b.microsecond)
        rest_a = (a.day, a.hour, a.minute, a.second, a.microsecond)
        if months > 0 and rest_b < rest_a:
            months -= 1
        elif months < 0 and rest_b > rest_a:
            months += 1
        return int(months / _MONTH_UNITS[name])
    return None


_HEX = "0123456789abcdefABCDEF"


def url_decode(source: object) -> str | None:
    """``URLDecoder.decode(s, UTF_8)``: None for a malformed ``%`` escape."""
    s = _text(source)
    if s is None:
        return None
    out: list[str] = []
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c == "+":
            out.append(" ")
            i += 1
        elif c == "%":
            run = bytearray()
            while i < n and s[i] == "%":
                pair = s[i + 1 : i + 3]
                # Integer.parseInt(pair, 16) also takes a sign: "+f" is 15, "-x" is refused
                if len(pair) < 2 or pair[1] not in _HEX or pair[0] not in _HEX + "+":
                    return None
                run.append(int(pair.lstrip("+"), 16))
                i += 3
            out.append(run.decode("utf-8", "replace"))
        else:
            out.append(c)
            i += 1
    return "".join(out)


_BASE64 = re.compile(r"[A-Za-z0-9+/]*")


def from_base64(source: object) -> str | None:
    """``Base64.getDecoder().decode(s)`` as text; None for invalid base64."""
    s = _text(source)
    if s is None:
        return None
    body = s.rstrip("=")
    pad = len(s) - len(body)
    if not _BASE64.fullmatch(body) or len(body) % 4 == 1 or pad > 2:
        return None
    if pad and (len(s) % 4 != 0):  # padding, when present, must complete the last quantum
        return None
    try:
        data = base64.b64decode(body + "=" * (-len(body) % 4))
    except ValueError:
        return None
    return data.decode("utf-8", "surrogateescape")


def dissect_column(source: object, pattern: object, column: object) -> str | None:
    """Column ``column`` extracted by the dissect ``pattern``; None when it does not match."""
    s, p, c = _text(source), _text(pattern), _text(column)
    if s is None or p is None or c is None:
        return None
    try:
        found = dissect(s, p)
    except ValueError:
        return None
    return None if found is None else found.get(c)


@lru_cache(maxsize=1024)
def _python_regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def grok(source: object, pattern: object, group: object) -> str | None:
    """Group ``group`` of the first match of the (translated) grok ``pattern``."""
    s, p, g = _text(source), _text(pattern), _text(group)
    if s is None or p is None or g is None:
        return None
    m = _python_regex(p).search(s)
    return None if m is None else m.group(g)


# --------------------------------------------------------------------------- dispatch

_CASED = {"between", "endswith", "indexof", "startswith", "stringcontains"}

FUNCTIONS: dict[str, Callable[..., object]] = {
    "add": add,
    "between": between,
    "cidrmatch": cidrmatch,
    "concat": concat,
    "divide": divide,
    "endswith": endswith,
    "indexof": indexof,
    "length": length,
    "modulo": modulo,
    "multiply": multiply,
    "number": number,
    "startswith": startswith,
    "string": string,
    "stringcontains": stringcontains,
    "substring": substring,
    "subtract": subtract,
}

#: Argument count range per function (``None`` = unbounded).
ARITY: dict[str, tuple[int, int | None]] = {
    "add": (2, 2),
    "between": (3, 4),
    "cidrmatch": (2, None),
    "concat": (1, None),
    "divide": (2, 2),
    "endswith": (2, 2),
    "indexof": (2, 3),
    "length": (1, 1),
    "modulo": (2, 2),
    "multiply": (2, 2),
    "number": (1, 2),
    "startswith": (2, 2),
    "string": (1, 1),
    "stringcontains": (2, 2),
    "substring": (2, 3),
    "subtract": (2, 2),
}

ESQL_FUNCTIONS: dict[str, Callable[..., object]] = {
    "coalesce": coalesce,
    "date_add": date_add,
    "date_diff": date_diff,
    "date_trunc": date_trunc,
    "to_ip": to_ip,
    "dissect": dissect_column,
    "esql_substring": esql_substring,
    "from_base64": from_base64,
    "grok": grok,
    "locate": locate,
    "ltrim": ltrim,
    "replace": replace,
    "rtrim": rtrim,
    "to_double": to_double,
    "to_lower": to_lower,
    "to_upper": to_upper,
    "trim": trim,
    "url_decode": url_decode,
}

ESQL_ARITY: dict[str, tuple[int, int | None]] = {
    "coalesce": (1, None),
    "date_add": (2, 3),
    "date_diff": (3, 3),
    "date_trunc": (2, 2),
    "to_ip": (1, 1),
    "dissect": (3, 3),
    "esql_substring": (2, 3),
    "from_base64": (1, 1),
    "grok": (3, 3),
    "locate": (2, 2),
    "ltrim": (1, 1),
    "replace": (3, 3),
    "rtrim": (1, 1),
    "to_double": (1, 1),
    "to_lower": (1, 1),
    "to_upper": (1, 1),
    "trim": (1, 1),
    "url_decode": (1, 1),
}

#: Functions with a ``~`` (case-insensitive) variant.
CASE_INSENSITIVE_VARIANTS = frozenset(_CASED)


def call(name: str, args: Sequence[object], cased: bool = True) -> object:
    """Apply EQL or ES|QL function ``name`` (lower-case, no ``~``) to scalar ``args``.

    Raises ``KeyError`` for an unknown name and ``TypeError`` for a wrong argument count.
    """
    key = name.lower()
    fn = FUNCTIONS[key] if key in FUNCTIONS else ESQL_FUNCTIONS[key]
    lo, hi = ARITY[key] if key in ARITY else ESQL_ARITY[key]
    if len(args) < lo or (hi is not None and len(args) > hi):
        raise TypeError(f"{name}() takes {lo}..{hi or 'n'} arguments, got {len(args)}")
    if name.lower() in _CASED:
        return fn(*args, cased=cased)
    return fn(*args)
