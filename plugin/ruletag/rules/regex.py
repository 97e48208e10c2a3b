"""RE2 as the front-ends, the compiler and the reference evaluator use it: a bad pattern is
reported by its exception only, never also printed on stderr by the library."""

from __future__ import annotations

from typing import Any

import re2

__all__ = ["OPTIONS", "compile_re2"]

#: RE2 options: errors by exception only (RE2 logs them to stderr by default)
OPTIONS = re2.Options()
OPTIONS.log_errors = False


def compile_re2(pattern: str) -> Any:
    """``re2.compile(pattern)`` with :data:`OPTIONS`."""
    return re2.compile(pattern, OPTIONS)
