"""The optional C extensions: each found, checked against the interface these sources call,
or None (then the pure-Python reference runs).

An extension is not built where there is no C compiler, and ``RULETAG_PURE_PYTHON=1`` turns
them all off. One built from older sources (another ``ABI`` number, an old build left beside
newer sources) is never called: the log says how to rebuild.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any

__all__ = ["extension", "pure_python"]


def pure_python() -> bool:
    """Whether ``RULETAG_PURE_PYTHON`` asks for the pure-Python reference paths."""
    return os.environ.get("RULETAG_PURE_PYTHON", "") not in ("", "0")


def extension(
    package: str, name: str, abi: int, what: str, log: logging.Logger, warned: list[int]
) -> Any:
    """The C module ``package.name`` if it is built, of the interface version ``abi`` and
    not turned off; else None. A build of another version is warned about on ``log``, once
    per ``warned`` list (``what`` names it in the message)."""
    if pure_python():
        return None
    try:
        module = getattr(importlib.import_module(package), name, None)
        if module is None:
            module = importlib.import_module(f"{package}.{name}")
    except ImportError:
        return None
    got = getattr(module, "ABI", None)
    if got != abi:
        if not warned:
            warned.append(1)
            log.warning(
                "the built %s (%s, ABI %s) is not that of this source tree (ABI %s): the "
                "pure-Python reference runs; rebuild with `make setup` (or `pip install -e .`)",
                what,
                getattr(module, "__file__", "?"),
                "?" if got is None else got,
                abi,
            )
        return None
    return module
