"""What the lark front-ends (EQL, KQL, ES|QL) share: syntax-error messages and lines."""

from __future__ import annotations

from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput


def _at_end(exc: UnexpectedInput) -> bool:
    token = getattr(exc, "token", None)
    return isinstance(exc, UnexpectedEOF) or getattr(token, "type", "") == "$END"


def syntax_message(language: str, exc: UnexpectedInput, unit: str = "query") -> str:
    """``"<language> syntax error ..."``: the column and what was unexpected, or the end of
    the ``unit`` (a query, an ES|QL command)."""
    if _at_end(exc):
        return f"{language} syntax error: unexpected end of {unit}"
    if isinstance(exc, UnexpectedCharacters):
        return f"{language} syntax error at column {exc.column}: unexpected character {exc.char!r}"
    token = getattr(exc, "token", None)
    return f"{language} syntax error at column {getattr(exc, 'column', '?')}: unexpected {token!r}"


def error_line(exc: UnexpectedInput, query: str) -> int:
    """The 1-based line of ``query`` a syntax error points at: its own, or the last line with
    text when the query ended too early."""
    if _at_end(exc) or getattr(exc, "line", -1) in (-1, None):
        return query.rstrip().count("\n") + 1 if query.strip() else 1
    return int(exc.line)
