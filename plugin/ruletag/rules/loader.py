"""Load rule files and folders into IR, report what cannot load, cache the compiled table.

* Paths are walked sorted (deterministic); ``*.yml``/``*.yaml`` go to the Sigma front-end,
  ``*.toml`` to the Elastic one; LICENSE/NOTICE/README and other files are skipped.
* A failing file never stops the others: its :class:`RuleError` lands in
  :attr:`LoadResult.problems`; an unexpected exception becomes ``InvalidRule("internal
  error: ...")`` for that file.
* Duplicate rule ids: the newest copy (``Rule.modified``) is kept; on equal dates the one
  loaded last (later in path order) wins. Each dropped copy is reported.
* :func:`compile_rules` applies the rule selection (``ruletag.rules.select``: ``rules.select``,
  ``rules.exclude``, ``rules.building_blocks``) and caches the compiled table by a hash of
  (ruletag version, field map version, variables, selection, every file's path and bytes); the
  load report is stored beside it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ruletag.errors import InvalidRule, RuleError, UnsupportedRule
from ruletag.rules.fingerprint import compiler_fingerprint, default_cache_dir
from ruletag.rules.ir import Rule
from ruletag.rules.select import Selection, SelectionReport

if TYPE_CHECKING:
    from ruletag.config.model import SelectConfig
    from ruletag.rules.compiler import CompiledTable
    from ruletag.rules.fields import FieldMap

log = logging.getLogger(__name__)

SIGMA_SUFFIXES = frozenset({".yml", ".yaml"})
ELASTIC_SUFFIXES = frozenset({".toml"})
RULE_SUFFIXES = SIGMA_SUFFIXES | ELASTIC_SUFFIXES
_SKIP_STEMS = ("license", "notice", "readme", "copying")
REPORT_FORMAT = 1

Variables = Mapping[str, Sequence[str]]


@dataclass
class LoadResult:
    """What a load produced: the rules, and everything that could not be used."""

    rules: Sequence[Rule]  # read back from the rule cache: rules read on first use
    problems: list[RuleError]  # InvalidRule/UnsupportedRule with path/line/reason
    duplicates: list[str]  # messages about duplicate ids (newest kept)
    files: int
    cached: bool = False  # the table and this report came from the cache
    seconds: float = 0.0  # load (or cache read) time
    sources: dict[str, int] = field(default_factory=dict)  # rule files per front-end
    excluded: int = 0  # rules left out by ``rules.exclude``
    building_blocks: int = 0  # Elastic building-block rules left out (``rules.building_blocks``)
    selection: SelectionReport | None = None  # what each selection filter left out
    # the rule files as found before reading them (:func:`rule_stamps`), set by compile_rules
    stamp: Stamps | None = None

    @property
    def unsupported(self) -> list[RuleError]:
        return [p for p in self.problems if p.kind == "unsupported"]

    @property
    def invalid(self) -> list[RuleError]:
        return [p for p in self.problems if p.kind != "unsupported"]


def source_of(path: Path) -> str | None:
    """``"sigma"``/``"elastic"`` for a rule file name, None for anything else."""
    return _source_of_suffix(path.suffix)


def _source_of_suffix(suffix: str) -> str | None:
    suffix = suffix.lower()
    if suffix in SIGMA_SUFFIXES:
        return "sigma"
    if suffix in ELASTIC_SUFFIXES:
        return "elastic"
    return None


def _scan_folder(
    top: str, rel: tuple[str, ...], out: list[tuple[tuple[str, ...], str, bool]]
) -> None:
    """Rule files under ``top`` as (path parts below the root, path, is a symlink); hidden
    entries skipped, symlinked folders followed. One ``scandir`` per folder: the file type
    comes with the entry, so most files cost no system call."""
    try:
        with os.scandir(top) as it:
            entries = list(it)
    except OSError:  # unreadable or vanished meanwhile: as os.walk, skip it
        return
    for e in entries:
        name = e.name
        if name.startswith("."):
            continue
        try:
            if e.is_dir():
                _scan_folder(e.path, (*rel, name), out)
                continue
            stem, suffix = os.path.splitext(name)
            if _source_of_suffix(suffix) is None:
                continue
            if stem.lower().startswith(_SKIP_STEMS) or not e.is_file():
                continue
            out.append(((*rel, name), e.path, e.is_symlink()))
        except OSError:
            continue


def reason_key(reason: str) -> str:
    """Group problem reasons: quoted parts and numbers become placeholders (digits inside
    a name, as in ``RE2`` or ``MD5``, are part of the name)."""
    key = re.sub(r"'[^']*'|\"[^\"]*\"|`[^`]*`", "'…'", reason)
    key = re.sub(r"%[^%\s]+%", "%…%", key)
    key = re.sub(r"(?<![A-Za-z_\d])\d+(?![A-Za-z_\d])", "N", key)
    return key[:120]


def rule_files(paths: Sequence[str | Path]) -> tuple[list[Path], list[RuleError]]:
    """Every rule file under ``paths`` (sorted within each folder), and paths that are missing.

    A file named explicitly is taken whatever its name, unless its suffix is unknown.
    """
    found, problems = _rule_paths(paths)
    return [Path(f) for f in found], problems


def _rule_paths(paths: Sequence[str | Path]) -> tuple[list[str], list[RuleError]]:
    """:func:`rule_files` as text paths (a ``Path`` per file is ~10 us more, 60 ms of every
    start with 5,972 files, where only the texts are needed)."""
    files: list[str] = []
    problems: list[RuleError] = []
    seen: set[str] = set()  # resolved paths as text

    def add(f: str, key: str | None = None) -> None:
        key = key or os.path.realpath(f)
        if key not in seen:
            seen.add(key)
            files.append(f)

    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            # once per folder: resolve() per file costs an lstat per part
            root = str(p.resolve()).rstrip(os.sep)
            found: list[tuple[tuple[str, ...], str, bool]] = []
            _scan_folder(str(p), (), found)
            for rel, f, link in sorted(found):
                add(f, os.path.realpath(f) if link else os.sep.join((root, *rel)))
        elif p.is_file():
            if source_of(p):
                add(str(p), str(p.resolve()))
            else:
                problems.append(InvalidRule("not a rule file (want .yml, .yaml or .toml)", str(p)))
        else:
            problems.append(InvalidRule("no such file or folder", str(p)))
    return files, problems


#: rule files as found: (path, mtime_ns, size) each, -1 and -1 where it could not be read,
#: then the missing paths as (path, -1, -1)
Stamps = tuple[tuple[str, int, int], ...]


def rule_stamps(paths: Sequence[str | Path]) -> Stamps:
    """The :data:`Stamps` of every rule file under ``paths`` (what the reload watcher
    compares)."""
    files, problems = _rule_paths(paths)
    out: list[tuple[str, int, int]] = []
    for f in files:
        try:
            st = os.stat(f)
        except OSError:
            out.append((f, -1, -1))
            continue
        out.append((f, st.st_mtime_ns, st.st_size))
    out.extend((str(p.path), -1, -1) for p in problems)
    return tuple(out)


def _front_end(source: str) -> Callable[[Path, Variables | None], list[Rule]]:
    if source == "sigma":
        from ruletag.rules.sigma import load_sigma_file

        return lambda path, variables: load_sigma_file(path, variables)
    from ruletag.rules.elastic import load_elastic_file

    return lambda path, variables: load_elastic_file(path)


def _load_file(path: Path, variables: Variables | None) -> tuple[list[Rule], list[RuleError]]:
    source = source_of(path)
    assert source is not None
    try:
        return list(_front_end(source)(path, variables)), []
    except RuleError as exc:
        if exc.path is None:
            exc.path = str(path)
        return [], [exc]
    except Exception as exc:  # one bad file never kills a load
        log.debug("front-end crashed on %s", path, exc_info=True)
        return [], [InvalidRule(f"internal error: {type(exc).__name__}: {exc}", str(path))]


def _date_key(rule: Rule) -> str:
    return rule.modified.strip().replace("/", "-")


def dedupe(rules: list[Rule]) -> tuple[list[Rule], list[str]]:
    """Keep one rule per id: the newest, ties to the one loaded last. Order is kept."""
    best: dict[str, int] = {}
    messages: list[str] = []
    for i, rule in enumerate(rules):
        j = best.get(rule.id)
        if j is None:
            best[rule.id] = i
            continue
        old = rules[j]
        keep, drop = (rule, old) if _date_key(rule) >= _date_key(old) else (old, rule)
        best[rule.id] = i if keep is rule else j
        messages.append(
            f"duplicate rule id {rule.id}: kept {keep.path}:{keep.line} "
            f"(modified {keep.modified or '?'}), ignored {drop.path}:{drop.line} "
            f"(modified {drop.modified or '?'})"
        )
    kept = sorted(best.values())
    return [rules[i] for i in kept], messages


def load_rules(paths: Sequence[str | Path], variables: Variables | None = None) -> LoadResult:
    """Load every rule under ``paths``; problems are collected, never raised."""
    start = time.perf_counter()
    files, problems = rule_files(paths)
    rules: list[Rule] = []
    sources: dict[str, int] = {}
    for path in files:
        src = source_of(path) or "?"
        sources[src] = sources.get(src, 0) + 1
        got, bad = _load_file(path, variables)
        rules.extend(got)
        problems.extend(bad)
    rules, duplicates = dedupe(rules)
    rules, unlinked = _link(rules)
    problems.extend(unlinked)
    return LoadResult(
        rules,
        problems,
        duplicates,
        len(files),
        seconds=time.perf_counter() - start,
        sources=sources,
    )


def _link(rules: list[Rule]) -> tuple[list[Rule], list[RuleError]]:
    """Sigma correlations linked to the rules they refer to (``rules/stateful/correlation``)."""
    if not any(r.kind == "correlation" for r in rules):
        return rules, []
    from ruletag.rules.stateful.correlation import link_correlations

    return link_correlations(rules)


def select_rules(result: LoadResult, selection: Selection) -> None:
    """Keep in ``result`` only the rules ``selection`` keeps; record its report (and the
    ``excluded`` / ``building_blocks`` counts)."""
    result.rules, report = selection.apply(result.rules)
    result.selection = report
    result.excluded = report.left_out("exclude")
    result.building_blocks = report.left_out("building_blocks")


def _selection(
    select: SelectConfig | None, exclude: Sequence[str], building_blocks: str
) -> Selection:
    if select is None:
        return Selection(exclude=tuple(exclude), building_blocks=building_blocks)
    return Selection(select, tuple(exclude), building_blocks)


# --------------------------------------------------------------------------- cache


#: One rule file's content digest and the ``(size, mtime_ns)`` it was taken at.
Digests = dict[str, tuple[int, int, str]]
#: Most rule files whose digests the cache folder remembers (every rule set sharing it).
_MAX_DIGESTS = 200_000


def cache_key(
    files: Sequence[str | Path],
    variables: Variables | None,
    fieldmap_version: str,
    digests: Digests | None = None,
    exclude: Sequence[str] = (),
    building_blocks: str = "keep",
    select: SelectConfig | None = None,
    stamps: list[tuple[str, int, int]] | None = None,
) -> str:
    """Hash of everything a compiled table depends on (also the table's version).

    It follows the files' contents. ``digests`` (path -> size, mtime, content digest) lets
    an unchanged file (same size and modification time, as the reload watcher judges) go
    unread; it is updated in place for the files that were read. ``stamps``, if given, gets
    each file's ``(path, mtime_ns, size)`` as it was hashed (see :data:`Stamps`)."""
    from ruletag import __version__

    h = hashlib.sha256()
    h.update(f"ruletag {__version__}\0compiler {compiler_fingerprint()}\0".encode())
    h.update(f"fields {fieldmap_version}\0".encode())
    norm = {k: list(v) for k, v in sorted((variables or {}).items())}
    h.update(json.dumps(norm, sort_keys=True).encode() + b"\0")
    selection = _selection(select, exclude, building_blocks).key()
    if selection:
        h.update(f"select {selection}\0".encode())
    parts = []  # one update for every file: the same hash as one update per file, faster
    for f in files:
        path = os.path.abspath(f)
        parts.append(f"{path}\0{_file_digest(path, digests, stamps, str(f))}\0")
    h.update("".join(parts).encode())
    return h.hexdigest()[:16]


def _file_digest(
    path: str,
    digests: Digests | None,
    stamps: list[tuple[str, int, int]] | None = None,
    name: str = "",
) -> str:
    try:
        st = os.stat(path)
    except OSError as exc:  # the front-end reports it as that file's problem
        if stamps is not None:
            stamps.append((name, -1, -1))
        return f"unreadable: {exc.strerror or exc}"
    if stamps is not None:
        stamps.append((name, st.st_mtime_ns, st.st_size))
    try:
        if digests is not None:
            got = digests.get(path)
            if got is not None and got[0] == st.st_size and got[1] == st.st_mtime_ns:
                return got[2]
        with open(path, "rb") as fh:
            digest = hashlib.sha256(fh.read()).hexdigest()
    except OSError as exc:  # the front-end reports it as that file's problem
        return f"unreadable: {exc.strerror or exc}"
    if digests is not None:
        digests[path] = (st.st_size, st.st_mtime_ns, digest)
    return digest


def _read_digests(path: Path) -> Digests:
    try:
        with open(path, "rb") as fh:
            got = pickle.load(fh)
    except Exception:  # missing, damaged or from another Python: start afresh
        return {}
    return got if isinstance(got, dict) else {}


def problem_to_json(p: RuleError) -> dict[str, Any]:
    """One load problem as JSON-ready data (kind, reason, path, line)."""
    return {"kind": p.kind, "reason": p.reason, "path": p.path, "line": p.line}


def _problem_from_json(d: Mapping[str, Any]) -> RuleError:
    cls = UnsupportedRule if d.get("kind") == "unsupported" else InvalidRule
    return cls(str(d["reason"]), d.get("path"), d.get("line"))


def report_to_json(result: LoadResult) -> dict[str, Any]:
    """The load report (everything but the rules) as JSON-ready data."""
    return {
        "format": REPORT_FORMAT,
        "files": result.files,
        "sources": result.sources,
        "problems": [problem_to_json(p) for p in result.problems],
        "duplicates": result.duplicates,
        "excluded": result.excluded,
        "building_blocks": result.building_blocks,
        "selection": result.selection.to_json() if result.selection is not None else None,
    }


def _atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Write ``path`` through ``write(temporary path)`` (its result is ignored), then rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_cache(table_path: Path, report_path: Path) -> tuple[CompiledTable, LoadResult] | None:
    from ruletag.rules.compiler import load

    if not (table_path.is_file() and report_path.is_file()):
        return None
    start = time.perf_counter()
    try:
        report = json.loads(report_path.read_text("utf-8"))
        if report.get("format") != REPORT_FORMAT:
            return None
        table = load(table_path)
    except Exception:  # a stale or damaged cache entry is rebuilt, never fatal
        log.warning("ignoring unreadable rule cache %s", table_path, exc_info=True)
        return None
    result = LoadResult(
        rules=table.rules,
        problems=[_problem_from_json(p) for p in report["problems"]],
        duplicates=list(report["duplicates"]),
        files=int(report["files"]),
        cached=True,
        seconds=time.perf_counter() - start,
        sources=dict(report.get("sources", {})),
        excluded=int(report.get("excluded", 0)),
        building_blocks=int(report.get("building_blocks", 0)),
        selection=SelectionReport.from_json(report["selection"])
        if report.get("selection")
        else None,
    )
    return table, result


def _write_cache(
    table: CompiledTable, result: LoadResult, table_path: Path, report_path: Path
) -> None:
    from ruletag.rules.compiler import save

    try:
        table_path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(table_path, lambda p: save(table, p))
        text = json.dumps(report_to_json(result), indent=1)
        _atomic_write(report_path, lambda p: p.write_text(text, "utf-8"))
    except OSError as exc:  # a read-only cache only costs the next start a re-parse
        log.warning("cannot write rule cache in %s: %s", table_path.parent, exc)


def compile_rules(
    paths: Sequence[str | Path],
    variables: Variables | None = None,
    cache_dir: Path | None = None,
    *,
    fieldmap: FieldMap | None = None,
    use_cache: bool = True,
    exclude: Sequence[str] = (),
    building_blocks: str = "keep",
    select: SelectConfig | None = None,
) -> tuple[CompiledTable, LoadResult]:
    """Load and compile ``paths``, or read the same table back from the cache.

    Only the rules the selection keeps go into the table: ``select`` (``rules.select``; None =
    the defaults), rules whose id or name matches one of the ``exclude`` glob patterns left
    out, Elastic building-block rules too when ``building_blocks`` is ``"drop"``.

    The table's ``version`` is the cache key, so equal rule sets give equal versions. The
    result's ``stamp`` is the rule files as found before they were read (:data:`Stamps`).
    """
    from ruletag.rules.compiler import build
    from ruletag.rules.fields import FieldMap

    fmap = fieldmap or FieldMap.default()
    files, problems = _rule_paths(paths)
    found: list[tuple[str, int, int]] = []
    folder = cache_dir or default_cache_dir()
    memo_path = folder / "digests.pickle"
    digests = _read_digests(memo_path) if use_cache else None
    if digests is not None and len(digests) > _MAX_DIGESTS:  # paths long gone pile up
        digests.clear()
    before = dict(digests) if digests is not None else None
    key = cache_key(
        files, variables, fmap.version, digests, exclude, building_blocks, select, found
    )
    found.extend((str(p.path), -1, -1) for p in problems)
    stamp = tuple(found)
    if digests is not None and digests != before:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            blob = pickle.dumps(digests, protocol=pickle.HIGHEST_PROTOCOL)
            _atomic_write(memo_path, lambda p: p.write_bytes(blob))
        except OSError as exc:  # costs the next start a re-read, nothing else
            log.warning("cannot write rule digests in %s: %s", folder, exc)
    table_path = folder / f"{key}.table"
    report_path = folder / f"{key}.report.json"
    if use_cache and (hit := _read_cache(table_path, report_path)) is not None:
        hit[1].stamp = stamp
        return hit
    result = load_rules(paths, variables)
    result.stamp = stamp
    select_rules(result, _selection(select, exclude, building_blocks))
    table = build(result.rules, fmap, key)
    if use_cache:
        _write_cache(table, result, table_path, report_path)
    return table, result
