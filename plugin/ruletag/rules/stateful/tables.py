"""The stateful engines' own tables (steps, base conditions), compiled once and cached.

Each engine compiles its conditions into a small table of its own (``build``); with every
corpus rule that is seconds of Hyperscan and code generation at each start and reload. Inside
``with step_cache(folder):`` :func:`step_table` keeps each such table in
``<folder>/steps/<key>.table``, the key covering the compiler, the field map and every
condition (its rule id and IR), so an unchanged rule set loads its step tables back instead
of compiling them. Outside it (tests, ``step_cache(None)``) tables are compiled every time.
The folder keeps the :data:`KEEP` most recently used step tables (each rule-set change leaves
new ones behind).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ruletag.rules.fingerprint import compiler_fingerprint

if TYPE_CHECKING:
    from ruletag.rules.compiler import CompiledTable
    from ruletag.rules.fields import FieldMap
    from ruletag.rules.ir import Rule
    from ruletag.rules.matcher import Matcher

__all__ = ["step_cache", "step_key", "step_matcher", "step_table"]

log = logging.getLogger(__name__)

#: Step tables kept in ``<folder>/steps``, the most recently used first.
KEEP = 32

_FOLDER: contextvars.ContextVar[Path | None] = contextvars.ContextVar("step_cache", default=None)
_VERSION: contextvars.ContextVar[str | None] = contextvars.ContextVar("step_cache_v", default=None)


@contextlib.contextmanager
def step_cache(folder: str | Path | None, version: str | None = None) -> Iterator[None]:
    """Cache the step tables the engines built inside the block in ``folder`` (None: off).

    ``version``: the version of the table the engines' rules come from (its cache key, which
    fixes every rule). The step keys worked out under it are then remembered beside the step
    tables, so the next start of the same rule set reads each key instead of taking it from
    the ``repr`` of every condition again (~0.1 s with every rule)."""
    token = _FOLDER.set(Path(folder) if folder is not None else None)
    vtoken = _VERSION.set(version or None)
    try:
        yield
    finally:
        _VERSION.reset(vtoken)
        _FOLDER.reset(token)


def step_key(rules: Sequence[Rule], fieldmap: FieldMap | None) -> str:
    """What a step table depends on: the package and compiler, the field map, the conditions."""
    from ruletag import __version__

    h = hashlib.sha256()
    h.update(f"ruletag {__version__}\0compiler {compiler_fingerprint()}\0".encode())
    h.update(f"fields {fieldmap.version if fieldmap is not None else '-'}\0".encode())
    for r in rules:
        h.update(f"{r.id}\0{r.condition!r}\0{r.logsource!r}\0".encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:24]


def step_table(rules: Sequence[Rule], fieldmap: FieldMap | None, of: str = "") -> CompiledTable:
    """``build(rules, fieldmap)``, read back from the step cache when it holds the same table.
    ``of``: what the table is for (the engine kind; one table per kind of one rule set)."""
    from ruletag.rules.compiler import TableError, build, load, save

    folder = _FOLDER.get()
    if folder is None:
        return build(list(rules), fieldmap)
    key = _remembered_key(folder, rules, fieldmap, of)
    path = folder / "steps" / f"{key}.table"
    if path.is_file():
        try:
            table = load(path)
            with contextlib.suppress(OSError):
                path.touch()  # recently used: kept by _prune
            return table
        except (OSError, TableError, ValueError, EOFError) as exc:  # damaged: compile again
            log.warning("step table %s unreadable, compiling it again: %s", path, exc)
    table = build(list(rules), fieldmap, key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save(table, path)
        _prune(path.parent)
    except OSError as exc:  # a read-only cache still runs, compiling at each start
        log.warning("step table not cached in %s: %s", path.parent, exc)
    return table


def _remembered_key(folder: Path, rules: Sequence[Rule], fieldmap: FieldMap | None, of: str) -> str:
    """:func:`step_key`, remembered under the table version of :func:`step_cache`: within
    one version, ``of`` and the rule ids name one list of rules."""
    from ruletag.rules.compiler.rulelist import rule_ids

    version = _VERSION.get()
    if not version or not of:
        return step_key(rules, fieldmap)
    h = hashlib.sha256(f"{version}\0{of}\0".encode())
    h.update("\0".join(rule_ids(rules)).encode("utf-8", "surrogatepass"))
    memo = folder / "steps" / f"{h.hexdigest()[:24]}.key"
    with contextlib.suppress(OSError, UnicodeDecodeError):
        got = memo.read_text("ascii").strip()
        if _KEY.fullmatch(got):
            return got
    key = step_key(rules, fieldmap)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")
        tmp.write_text(key, "ascii")
        os.replace(tmp, memo)
    except OSError:  # a read-only cache: worked out again at the next start
        pass
    return key


#: a step key as :func:`step_key` writes it
_KEY = re.compile(r"[0-9a-f]{24}")


def step_matcher(table: CompiledTable, tune_after: int | None = None) -> Matcher:
    """A matcher of a step table; inside ``step_cache``, it keeps the pre-filter it re-tunes
    beside the cached table (``<key>.tuned``) and starts from the one an earlier run kept."""
    from ruletag.rules.matcher import Matcher

    folder = _FOLDER.get()
    tuned = folder / "steps" / f"{table.version}.tuned" if folder and table.version else None
    return Matcher(table, tune_after, tuned)


def _prune(folder: Path) -> None:
    """Delete all but the :data:`KEEP` most recently used step tables (and their tuned
    pre-filters)."""
    found = []
    for p in folder.glob("*.table"):
        with contextlib.suppress(OSError):
            found.append((p.stat().st_mtime_ns, p))
    for _, p in sorted(found, reverse=True)[KEEP:]:
        with contextlib.suppress(OSError):
            p.unlink()
        with contextlib.suppress(OSError):
            p.with_suffix(".tuned").unlink(missing_ok=True)
    keys = []
    for p in folder.glob("*.key"):
        with contextlib.suppress(OSError):
            keys.append((p.stat().st_mtime_ns, p))
    for _, p in sorted(keys, reverse=True)[4 * KEEP :]:  # a few per rule set
        with contextlib.suppress(OSError):
            p.unlink()
