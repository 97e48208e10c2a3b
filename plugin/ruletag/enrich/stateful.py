"""The relay's stateful stage: EQL sequences and samples, thresholds, new terms, aggregating
ES|QL and Sigma correlations (every ``rules.stateful`` engine) over the chunks the rule filter
sees.

``StatefulStage.of(rules, fieldmap)`` builds the engines a rule set needs
(:func:`ruletag.rules.stateful.stateful_engines`) and, with several, one :class:`StepTable`
holding all their conditions. ``results(entries, spans)`` runs them over one chunk's packed
``[time, record]`` entries, in entry order: the step table's raw pre-filter and matcher (one
pass for every engine; with one engine, its own ``step_hits``) name the entries each engine
needs, only those are decoded (once, shared by the engines) and fed; an engine without step
hits (None) is fed every record of the chunk. The answer maps an entry index to what the entry
completed (``Completion``, ``Alert``...), which :class:`ruletag.enrich.filter.RuleFilter`
turns into annotations.

Chunks are fed in the order the pipeline transforms them; with several upstream connections
that is the order in which their chunks reach the filter (event time orders the events
themselves, see the engines). State lives in the engines: :meth:`adopt` carries it over a hot
reload (the old engines are kept as they are when the stateful rules did not change, else the
state of every unchanged rule is moved through ``snapshot``/``restore``; an edited or new rule
starts empty), and :meth:`snapshot`/:meth:`restore` are what ``runtime.state`` checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, overload

import msgpack

from ruletag.rules.compiler.rulelist import rule_ids, stateful_rules
from ruletag.rules.fields import FieldMap
from ruletag.rules.ir import Rule
from ruletag.rules.stateful import Clocked, Engine, stateful_engines
from ruletag.rules.stateful.snapshot import rule_digest
from ruletag.rules.stateful.tables import step_cache, step_matcher, step_table

log = logging.getLogger(__name__)

__all__ = ["StatefulStage"]


def _unpack(data: bytes | memoryview) -> Any:
    return msgpack.unpackb(data, raw=False, unicode_errors="surrogateescape", strict_map_key=False)


class _StepRules(Sequence[Rule]):
    """The engines' step rules in order, each id prefixed with its engine's kind. The ids
    are at hand without reading a rule: a step table read from the cache needs no more (the
    engines' tables come from the cache too, their rules read only when used)."""

    def __init__(self, parts: Sequence[tuple[str, Sequence[Rule]]]) -> None:
        self._parts = list(parts)
        #: where each engine's rules start
        self.starts: list[int] = []
        n = 0
        for _, rules in self._parts:
            self.starts.append(n)
            n += len(rules)
        self._len = n
        self.ids = [f"{kind}:{rid}" for kind, rules in self._parts for rid in rule_ids(rules)]

    def __len__(self) -> int:
        return self._len

    @overload
    def __getitem__(self, i: int) -> Rule: ...

    @overload
    def __getitem__(self, i: slice) -> list[Rule]: ...

    def __getitem__(self, i: int | slice) -> Rule | list[Rule]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(i)
        n = bisect_right(self.starts, i) - 1
        kind, rules = self._parts[n]
        r = rules[i - self.starts[n]]
        return dataclasses.replace(r, id=f"{kind}:{r.id}")


class StepTable:
    """Every engine's step and base conditions in one table: one raw pre-filter pass and one
    decode per chunk find the step hits of all the engines, instead of one pass per engine.

    Entry ``i`` of engine ``n`` is entry ``starts[n] + i`` here (the engines' own tables, in
    order, rule ids prefixed with the engine kind)."""

    def __init__(
        self,
        engines: Sequence[Engine],
        fieldmap: FieldMap | None,
        cache_dir: str | Path | None,
        version: str | None = None,
    ) -> None:
        parts: list[tuple[str, Sequence[Rule]]] = []
        for e in engines:
            table = getattr(e, "table", None)
            if table is None:
                raise TypeError(f"{e.kind} engine has no step table")
            parts.append((e.kind, table.rules))
        rules = _StepRules(parts)
        self.starts = rules.starts
        with step_cache(cache_dir, version):
            self.table = step_table(rules, fieldmap, "steps")
            self.matcher = step_matcher(self.table)

    def hits(self, entries: bytes, spans: Sequence[tuple[int, int]]) -> list[dict[int, list[int]]]:
        """Per engine, entry index -> its own condition hits (as its ``step_hits`` says)."""
        per: list[dict[int, list[int]]] = [{} for _ in self.starts]
        starts = self.starts
        for idx, found in self.matcher.match_entries(entries, spans).items():
            for h in found:
                n = bisect_right(starts, h) - 1
                per[n].setdefault(idx, []).append(h - starts[n])
        return per


class StatefulStage:
    """The stateful engines of one rule set, fed chunk by chunk (see the module docstring)."""

    def __init__(
        self,
        engines: Sequence[Engine],
        rules: Iterable[Rule] = (),
        steps: StepTable | None = None,
    ) -> None:
        self.engines = list(engines)
        #: one table of every engine's conditions (None: each engine's ``step_hits``)
        self.steps = steps
        self._rules = [r for r in rules if r.kind != "event"]
        self.records_fed = 0
        self.record_errors = 0
        self._clocked_of: list[Engine] | None = None
        self._clocked_list: list[Clocked | None] = []

    @classmethod
    def of(
        cls,
        rules: Iterable[Rule],
        fieldmap: FieldMap | None = None,
        cache_dir: str | Path | None = None,
        version: str | None = None,
    ) -> StatefulStage | None:
        """A stage for the stateful rules among ``rules``; None when there are none.
        ``cache_dir``: where the engines' step tables are cached (None: compiled each time);
        ``version``: the version of the table ``rules`` come from (see ``step_cache``)."""
        found = stateful_rules(rules)
        if not found:
            return None
        engines = stateful_engines(found, fieldmap, cache_dir, version)
        if not engines:
            return None
        steps = StepTable(engines, fieldmap, cache_dir, version) if len(engines) > 1 else None
        return cls(engines, found, steps)

    @functools.cached_property
    def signature(self) -> frozenset[tuple[str, str, str]]:
        """(kind, rule id, definition digest) of every stateful rule: what :meth:`adopt`
        compares. Taken when first needed (a reload), not at start-up: the digests are the
        ``repr`` of every stateful definition, ~0.1 s with every rule."""
        return frozenset((r.kind, r.id, rule_digest(r)) for r in self._rules)

    def rule_counts(self) -> dict[str, int]:
        """Stateful rules by kind (each rule id once)."""
        out: dict[str, int] = {}
        for kind, _ in {(r.kind, r.id) for r in self._rules}:
            out[kind] = out.get(kind, 0) + 1
        return out

    # ------------------------------------------------------------------ the hot path

    def results(self, entries: bytes, spans: Sequence[tuple[int, int]]) -> dict[int, list[Any]]:
        """Entry index -> what the entry completed, for the entries that completed something.

        Engines waiting for event time (EQL missing events, :class:`Clocked`) also see the
        chunk's last record while they have results pending: it moves their watermark, and
        carries what that releases."""
        engines = self.engines
        steps: list[dict[int, list[int]] | None]
        if self.steps is not None:
            steps = list(self.steps.hits(entries, spans))
        else:
            steps = [e.step_hits(entries, spans) for e in engines]
        if any(s is None for s in steps):
            todo: list[int] = list(range(len(spans)))
        else:
            wanted: set[int] = set()
            for s in steps:
                if s:
                    wanted.update(s)
            todo = sorted(wanted)
        out: dict[int, list[Any]] = {}
        view = memoryview(entries)
        for idx in todo:
            self._one(view, spans, idx, steps, out)
        last = len(spans) - 1
        if last >= 0 and (not todo or todo[-1] != last) and self._pending():
            self._one(view, spans, last, steps, out)
        return out

    def _pending(self) -> bool:
        return any(e is not None and e.pending() for e in self._clocked())

    def _clocked(self) -> list[Clocked | None]:
        """Per engine, itself if it waits for event time (a runtime Protocol check is slow:
        done once per engine list, which :meth:`adopt` may replace)."""
        if self._clocked_of is not self.engines:
            self._clocked_list = [e if isinstance(e, Clocked) else None for e in self.engines]
            self._clocked_of = self.engines
        return self._clocked_list

    def _one(
        self,
        view: memoryview,
        spans: Sequence[tuple[int, int]],
        idx: int,
        steps: Sequence[dict[int, list[int]] | None],
        out: dict[int, list[Any]],
    ) -> None:
        """Feed entry ``idx`` to the engines it hit a step of (observe it in the clocked
        engines that wait for event time); its results into ``out``."""
        start, end = spans[idx]
        try:
            entry = _unpack(view[start:end])
            record = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
        except Exception as exc:
            self._error(idx, exc)
            return
        if not isinstance(record, dict):
            return
        self.records_fed += 1
        done: list[Any] = []
        for engine, hits, clocked in zip(self.engines, steps, self._clocked(), strict=True):
            try:
                if hits is None:
                    done.extend(engine.feed(record))
                elif idx in hits:
                    done.extend(engine.feed(record, hits[idx]))
                elif clocked is not None and clocked.pending():
                    done.extend(clocked.observe(record))
            except Exception as exc:  # a bug or an odd record must not block the chunk
                self._error(idx, exc)
        if done:
            out[idx] = done

    def set_lateness(self, lateness: float) -> None:
        """``rules.lateness`` on the engines that wait for event time."""
        for e in self.engines:
            if isinstance(e, Clocked):
                e.lateness = float(lateness)

    def _error(self, idx: int, exc: Exception) -> None:
        self.record_errors += 1
        n = self.record_errors
        if n <= 10 or n % 1000 == 0:
            log.error(
                "stateful rules: record %d of a chunk skipped: %s: %s (%d such records so far)",
                idx,
                type(exc).__name__,
                exc,
                n,
            )

    # ------------------------------------------------------------------ state

    def stats(self) -> dict[str, dict[str, int]]:
        """Per engine kind, its ``stats()``."""
        return {e.kind: dict(e.stats()) for e in self.engines}

    def snapshot(self) -> dict[str, Any]:
        """The engines' state, JSON-ready: ``{"engines": {kind: snapshot}}`` (an engine without
        ``snapshot`` is left out: its state is not checkpointed)."""
        engines: dict[str, Any] = {}
        # Building many small containers triggers the cyclic GC again and again; it finds
        # nothing here (a snapshot has no cycles) and about doubles the time on the loop.
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            for e in self.engines:
                snap = getattr(e, "snapshot", None)
                if snap is not None:
                    engines[e.kind] = snap()
        finally:
            if was_enabled:
                gc.enable()
        return {"version": 1, "engines": engines}

    def restore(self, data: Mapping[str, Any]) -> int:
        """Load a :meth:`snapshot` into the engines; how many rules got their state back."""
        saved = data.get("engines")
        if not isinstance(saved, Mapping):
            return 0
        restored = 0
        for e in self.engines:
            restore = getattr(e, "restore", None)
            snap = saved.get(e.kind)
            if restore is None or not isinstance(snap, Mapping):
                continue
            try:
                got = restore(snap)
            except (ValueError, TypeError, KeyError) as exc:  # a damaged or foreign snapshot
                log.warning("state: %s state not restored: %s", e.kind, exc)
                continue
            if isinstance(got, Mapping):  # {"restored": n, ...}
                got = got.get("restored", 0)
            restored += int(got or 0)
        return restored

    def adopt(self, old: StatefulStage) -> str:
        """Carry ``old``'s state over a reload (call between chunks); says what was kept."""
        if old.signature == self.signature:
            self.engines = old.engines  # same stateful rules: the very same state machines
            self.steps = old.steps
            self.records_fed, self.record_errors = old.records_fed, old.record_errors
            return "stateful rules unchanged, state kept"
        restored = self.restore(old.snapshot())
        return f"state of {restored} unchanged stateful rules kept, the others start empty"
