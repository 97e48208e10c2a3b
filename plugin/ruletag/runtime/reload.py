"""The live rule set of a running relay, and its hot reload (SIGHUP or rule-file change).

:class:`LiveFilter` is the pipeline's transform: it calls the current ``RuleFilter``. A reload
loads and compiles the rules, and builds the new filter, in a worker thread; only the final
swap (one attribute assignment) runs on the event loop. The transform is synchronous and runs
on the loop too, so a chunk is always filtered by exactly one rule set: the swap happens
between chunks, no connection is touched, and no record is held or lost.

A reload that raises, or whose result :func:`refusal` rejects (a configured rule path is
missing, or not one rule could be loaded), keeps the old rule set and logs why. Detection
counters survive reloads (the new filter shares the old one's ``FilterStats``), and so does the
state of stateful rules whose id and definition did not change
(:meth:`ruletag.enrich.stateful.StatefulStage.adopt`); an edited stateful rule starts empty.

:class:`Reloader` polls the rule files' (path, mtime, size) every ``interval`` seconds, in a
thread, and reloads when that fingerprint changes; SIGHUP reloads at once. Reload requests that
arrive during a reload are coalesced into one more reload after it.

Compiling a large corpus takes seconds and parts of it (Hyperscan) hold the GIL, which would
stall the event loop. :class:`SubprocessCompiler` therefore compiles a reload in a child
process that fills the table cache; the relay then only loads the cached table (fast).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ruletag.config.model import SelectConfig
from ruletag.enrich.filter import FilterStats, RuleFilter
from ruletag.protocol import Chunk
from ruletag.rules.compiler import CompiledTable
from ruletag.rules.loader import LoadResult, Stamps, reason_key, rule_stamps

log = logging.getLogger(__name__)

Loader = Callable[[], tuple[CompiledTable, LoadResult]]
FilterFactory = Callable[[CompiledTable], RuleFilter]
Fingerprint = Stamps

_MISSING = "no such file or folder"


def problem_counts(result: LoadResult) -> dict[str, int]:
    """Problems of a load by kind (``unsupported``/``invalid``), plus ``duplicate``."""
    counts = Counter(p.kind for p in result.problems)
    if result.duplicates:
        counts["duplicate"] = len(result.duplicates)
    return dict(counts)


def problem_summary(result: LoadResult, top: int = 8) -> str:
    """One line: how many rules could not be used, grouped by reason (most common first)."""
    if not result.problems and not result.duplicates:
        return "no problems"
    by_reason = Counter(f"{p.kind}: {reason_key(p.reason)}" for p in result.problems)
    parts = [f"{n}x {reason}" for reason, n in by_reason.most_common(top)]
    if len(by_reason) > top:
        parts.append(f"{len(by_reason) - top} more reasons")
    if result.duplicates:
        parts.append(f"{len(result.duplicates)}x duplicate rule id (newest kept)")
    return f"{len(result.problems)} rule files not loaded: " + "; ".join(parts)


def refusal(result: LoadResult) -> str | None:
    """Why a freshly loaded rule set must not replace the live one, or None if it may."""
    missing = [p.path for p in result.problems if p.reason == _MISSING]
    if missing:
        return f"rule path missing: {', '.join(str(m) for m in missing)}"
    if not result.rules and result.problems:
        left_out = (
            f"; {result.building_blocks} building-block rules left out by rules.building_blocks"
            if result.building_blocks
            else ""
        )
        sel = result.selection
        if sel is not None and sel.loaded > sel.kept:
            left_out += f"; {sel.text()}"
        return f"no rule could be loaded ({problem_summary(result)}{left_out})"
    return None


def select_from_json(data: Mapping[str, Any] | None) -> SelectConfig | None:
    """A ``SelectConfig`` sent to the compiler child as JSON (lists back to tuples)."""
    if data is None:
        return None
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return SelectConfig(**fields)


def _compile_job(job: Mapping[str, Any]) -> tuple[CompiledTable, LoadResult]:
    """``compile_rules`` on a compile job (the JSON-ready dict a compiler child reads)."""
    from ruletag.rules.loader import compile_rules

    variables = {k: tuple(v) for k, v in job["vars"].items()} if job["vars"] else None
    cache = Path(job["cache_dir"]) if job["cache_dir"] else None
    return compile_rules(
        job["paths"],
        variables,
        cache,
        exclude=job["exclude"],
        building_blocks=job.get("building_blocks", "keep"),
        select=select_from_json(job.get("select")),
    )


def _child_main() -> None:
    """Child-process entry point: compile the rules described on stdin into the table cache."""
    _compile_job(json.loads(sys.stdin.read()))


class SubprocessCompiler:
    """A :data:`Loader` that compiles in a child process, then reads the cached table.

    The child is ``python -c`` running :func:`_child_main` (no fork of the threaded relay, no
    re-import of its main module). If the child fails (or the cache cannot be written), the
    parent's ``compile_rules`` compiles again itself, which also reports the real error.
    :meth:`kill` ends a running child, so a long compile never delays shutdown.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        variables: Mapping[str, Sequence[str]] | None = None,
        cache_dir: str | Path | None = None,
        exclude: Sequence[str] = (),
        building_blocks: str = "keep",
        select: SelectConfig | None = None,
    ) -> None:
        self.paths = [str(p) for p in paths]
        self.exclude = list(exclude)
        self.building_blocks = building_blocks
        self.select = select
        self.variables = {k: list(v) for k, v in variables.items()} if variables else None
        self.cache_dir = str(cache_dir) if cache_dir is not None else None
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._killed = False

    def __call__(self) -> tuple[CompiledTable, LoadResult]:
        job = {
            "paths": self.paths,
            "vars": self.variables,
            "cache_dir": self.cache_dir,
            "exclude": self.exclude,
            "building_blocks": self.building_blocks,
            "select": asdict(self.select) if self.select is not None else None,
        }
        with self._lock:
            if self._killed:
                raise RuntimeError("shutting down")
            proc = self._proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "from ruletag.runtime.reload import _child_main; _child_main()",
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        try:
            _, err = proc.communicate(json.dumps(job).encode())
        finally:
            with self._lock:
                self._proc = None
        if self._killed:
            raise RuntimeError("shutting down")
        if proc.returncode != 0:
            last = err.decode("utf-8", "replace").strip().splitlines()[-1:] or ["?"]
            log.warning(
                "rule compiler process failed (exit %s: %s); compiling in-process",
                proc.returncode,
                last[0],
            )
        return _compile_job(job)

    def kill(self) -> None:
        """Stop a running child and refuse further compiles."""
        with self._lock:
            self._killed = True
            if self._proc is not None and self._proc.poll() is None:
                self._proc.kill()


def fingerprint(paths: Sequence[str | Path]) -> Fingerprint:
    """``(path, mtime_ns, size)`` of every rule file under ``paths`` (missing ones as -1)."""
    return rule_stamps(paths)


def _unchanged(chunk: Chunk) -> list[Chunk]:
    return [chunk]


class LiveFilter:
    """The pipeline transform that always runs the current rule set (see the module doc)."""

    def __init__(self, make_filter: FilterFactory) -> None:
        self.make_filter = make_filter
        self.filter: RuleFilter | None = None
        self.result: LoadResult | None = None
        self.stats = FilterStats()

    def __call__(self, chunk: Chunk) -> list[Chunk]:
        f = self.filter
        return [chunk] if f is None else f(chunk)

    def pinned(self) -> Callable[[Chunk], list[Chunk]]:
        """The transform of the rule set live now, for the slices of one large chunk."""
        f = self.filter
        return f if f is not None else _unchanged

    def prepare(self, table: CompiledTable) -> RuleFilter:
        """Build a filter for ``table`` (thread-safe: touches nothing live)."""
        new = self.make_filter(table)
        old = self.filter
        if old is not None and old.stateful is not None and new.stateful is not None:
            # what :meth:`swap` compares, on the loop: worked out here, off it
            _ = new.stateful.signature, old.stateful.signature
        return new

    def swap(self, new: RuleFilter, result: LoadResult) -> None:
        """Make ``new`` the live filter (call on the event loop, between chunks)."""
        new.stats = self.stats
        old = self.filter
        if old is not None and old.stateful is not None and new.stateful is not None:
            log.info("rule reload: %s", new.stateful.adopt(old.stateful))
        self.filter = new
        self.result = result

    # -- what metrics and logs read ---------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self.filter is not None

    @property
    def version(self) -> str | None:
        return self.filter.table.version if self.filter is not None else None

    @property
    def rule_count(self) -> int:
        return len(self.filter.table.rules) if self.filter is not None else 0

    @property
    def problem_counts(self) -> Mapping[str, int]:
        return problem_counts(self.result) if self.result is not None else {}

    @property
    def filter_stats(self) -> FilterStats:
        return self.stats

    @property
    def prefilter_stats(self) -> Mapping[str, Any] | None:
        """The live matcher's figures (``Matcher.stats``: tuning, drift), if it has one."""
        matcher = getattr(self.filter, "matcher", None)
        return None if matcher is None else matcher.stats


class Reloader:
    """Reload ``live`` from ``load()`` on demand, on SIGHUP and when ``watch`` paths change.

    ``freeze`` (a server process, where the rules are the bulk of the heap): after the first
    load, move every object so far to the collector's permanent generation (``gc.freeze``):
    a table with every rule is some 300,000 objects that never become garbage, and each full
    collection would walk them all (0.15 s each, twice at start-up). The first reload after
    that moves them back (``gc.unfreeze``), so the replaced table is freed as usual.

    ``stamped``: the loaders load the ``watch`` paths and their results carry the files as
    found (``LoadResult.stamp``, as ``compile_rules`` sets it); that is the fingerprint,
    so the files are not looked for twice (5,972 files: ~0.14 s of every start-up).
    """

    def __init__(
        self,
        live: LiveFilter,
        load: Loader,
        watch: Sequence[str | Path] = (),
        *,
        interval: float = 5.0,
        on_result: Callable[[bool], None] | None = None,
        initial_load: Loader | None = None,
        freeze: bool = False,
        stamped: bool = False,
    ) -> None:
        self.live = live
        self.freeze = freeze
        self.stamped = stamped
        self.load = load
        self.initial_load = initial_load or load
        self.watch = list(watch)
        self.interval = interval
        self.on_result = on_result
        self.ok = 0
        self.failed = 0
        self.last_error: str | None = None
        self._lock = asyncio.Lock()
        self._fingerprint: Fingerprint | None = None
        self._requested: str | None = None
        self._request_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._sighup = False
        self._stopping = False

    # -- loading ---------------------------------------------------------------------------

    def _prepare(
        self, load: Loader, freeze: bool = False
    ) -> tuple[RuleFilter, LoadResult, Fingerprint]:
        """Load the rules and build their filter (on a worker thread); ``freeze``: then
        ``gc.freeze()`` (see the class docstring)."""
        before: Fingerprint | None = None if self.watch else ()
        missing: list[str] = []
        if self.watch and self.stamped:  # the load finds the files; the paths checked here
            missing = [str(p) for p in self.watch if not os.path.exists(p)]
        elif self.watch:
            before = fingerprint(self.watch)
            missing = [p for p, mtime, _ in before if mtime == -1 and not Path(p).exists()]
        if missing:  # checked before compiling (a rename in progress, an unmounted volume)
            raise _Refused(f"rule path missing: {', '.join(missing)}")
        table, result = load()
        if before is None:
            before = result.stamp if result.stamp is not None else fingerprint(self.watch)
        why = refusal(result)
        if why is not None:
            raise _Refused(why)
        gc_was_on = gc.isenabled()
        gc.disable()  # a short while: the filter's objects are not garbage either
        try:
            prepared = self.live.prepare(table)
            if freeze:
                gc.freeze()
        finally:
            if gc_was_on:
                gc.enable()
        return prepared, result, before

    async def load_initial(self) -> LoadResult:
        """First load (startup): raises if the rules cannot be compiled or are refused."""
        async with self._lock:
            new, result, fp = await asyncio.to_thread(self._prepare, self.initial_load, self.freeze)
            self.live.swap(new, result)
            self._fingerprint = fp
            return result

    async def reload(self, reason: str = "manual") -> bool:
        """Load, compile and swap in the rules; on failure keep the live set. True if ok."""
        async with self._lock:
            old = self.live.version
            try:
                new, result, fp = await asyncio.to_thread(self._prepare, self.load)
            except Exception as exc:
                if self._stopping:
                    log.info("rule reload (%s) abandoned: shutting down", reason)
                    return False
                self.failed += 1
                self.last_error = (
                    str(exc) if isinstance(exc, _Refused) else (f"{type(exc).__name__}: {exc}")
                )
                log.error(
                    "rule reload (%s) failed, keeping rule set %s: %s",
                    reason,
                    old,
                    self.last_error,
                    extra={"event": "reload", "result": "failed", "reason": reason, "version": old},
                )
                self._fingerprint = fingerprint(self.watch) if self.watch else ()
                self._notify(False)
                return False
            self.live.swap(new, result)
            if self.freeze:  # the start-up table is garbage now: where the collector frees it
                gc.unfreeze()
            self._fingerprint = fp
            self.ok += 1
            self.last_error = None
            version = self.live.version
            log.info(
                "rules reloaded (%s): %d rules, version %s%s; %s",
                reason,
                self.live.rule_count,
                version,
                " (unchanged)" if version == old else f" (was {old})",
                problem_summary(result),
                extra={
                    "event": "reload",
                    "result": "ok",
                    "reason": reason,
                    "version": version,
                    "previous_version": old,
                    "rules": self.live.rule_count,
                },
            )
            self._notify(True)
            return True

    def _notify(self, ok: bool) -> None:
        if self.on_result is not None:
            try:
                self.on_result(ok)
            except Exception:
                log.exception("reload callback failed")

    def request(self, reason: str) -> None:
        """Ask for a reload from the event loop; coalesces requests made during a reload."""
        self._requested = reason
        if self._request_task is None or self._request_task.done():
            self._request_task = asyncio.get_running_loop().create_task(self._run_requests())

    async def _run_requests(self) -> None:
        while self._requested is not None:
            reason, self._requested = self._requested, None
            await self.reload(reason)

    # -- triggers --------------------------------------------------------------------------

    def start(self, *, sighup: bool = True) -> None:
        """Start polling (if ``interval`` > 0 and there is something to watch) and SIGHUP."""
        loop = asyncio.get_running_loop()
        if sighup:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signal.SIGHUP, self.request, "SIGHUP")
                self._sighup = True
        if self.interval > 0 and self.watch:
            self._watch_task = loop.create_task(self._watch_loop())

    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                now = await asyncio.to_thread(fingerprint, self.watch)
            except Exception as exc:
                log.warning("cannot check rule files for changes: %s", exc)
                continue
            if self._lock.locked() or self._fingerprint is None or now == self._fingerprint:
                continue
            changed = _changed(self._fingerprint, now)
            self._fingerprint = now  # a failing set is retried only when it changes again
            self.request(f"rule files changed: {changed}")

    async def stop(self) -> None:
        """Stop polling and SIGHUP handling; end a running reload (its child is killed)."""
        self._stopping = True
        kill = getattr(self.load, "kill", None)
        if kill is not None:
            kill()
        if self._sighup:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            self._sighup = False
        tasks: list[asyncio.Task[Any]] = [
            t for t in (self._watch_task, self._request_task) if t is not None
        ]
        if self._watch_task is not None:
            self._watch_task.cancel()
        self._requested = None
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._watch_task = self._request_task = None


class _Refused(Exception):
    """A loaded rule set that must not replace the live one (see :func:`refusal`)."""


def _changed(old: Fingerprint, new: Fingerprint, limit: int = 3) -> str:
    before = {p: (m, s) for p, m, s in old}
    after = {p: (m, s) for p, m, s in new}
    names = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    shown = ", ".join(Path(n).name for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
