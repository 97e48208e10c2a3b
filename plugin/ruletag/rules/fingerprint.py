"""What a cached table depends on beyond its rules: the compiler's own fingerprint, and where
tables are cached by default (the loader's main tables and the stateful engines' step tables)."""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

__all__ = ["compiler_fingerprint", "default_cache_dir", "tuned_path"]


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/ruletag``, else ``~/.cache/ruletag``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ruletag"


def tuned_path(cache_dir: str | Path | None, version: str) -> Path | None:
    """Where a matcher keeps the pre-filter it re-tuned for the table ``version`` (the table's
    cache key), beside the cached table; None for a table without a key."""
    if not version:
        return None
    return Path(cache_dir or default_cache_dir()) / f"{version}.tuned"


@functools.cache
def compiler_fingerprint() -> str:
    """Hash of the code and data that turn rule files into a table (front-ends, compiler,
    ATT&CK table, field types, default field mapping, the C helpers' source) and which
    implementation runs (C or the pure-Python reference): a changed compiler, or another
    build, never reuses a table cached by an older or different one."""
    from ruletag.rules.native import IMPLEMENTATION

    pkg = Path(__file__).resolve().parent.parent
    h = hashlib.sha256(f"implementation={IMPLEMENTATION}\0".encode())
    for f in sorted(
        [
            *(pkg / "rules").rglob("*.py"),
            *(pkg / "rules").rglob("*.lark"),
            *(pkg / "rules").rglob("*.c"),
            pkg / "data" / "attack.json",
            pkg / "data" / "field_types.json",
            pkg / "data" / "fields.yaml",
            pkg / "enrich" / "annotate.py",
        ]
    ):
        h.update(f.relative_to(pkg).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]
