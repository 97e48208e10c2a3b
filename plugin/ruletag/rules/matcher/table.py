"""The runtime matcher: matches records (decoded, or packed entries) against a compiled table.

A :class:`Matcher` reads one immutable :class:`~ruletag.rules.compiler.CompiledTable` and owns
everything that changes while traffic flows: the per-value scan cache, the raw pre-filter's
matcher and its re-tuning (``prefilter.py``), and the small table of often-passed rules that
tuning builds. Several matchers over one table are independent.

* :meth:`Matcher.match`: a decoded record; the field groups whose keys the record has are
  scanned (one Hyperscan scan per value), then the formulas of the rules an atom triggered
  (lazy leaves evaluated on demand: ``leaves.py``).
* :meth:`Matcher.match_entries`: raw msgpack bytes; the pre-filter lists the entries that
  meet some rule's raw requirement, only those are decoded and only those rules evaluated
  (:meth:`Matcher.match_subset`).

The often-passed table follows the traffic: once tuned, the matcher counts, per window of
:attr:`Matcher.HOT_WINDOW` records, how often each rule outside it was evaluated, and rebuilds
it (on a background thread) with the rules that now pass often, so traffic the tuning sample
did not hold (another source, a shift during the day) does not stay on the slow path. And
when the tuned triggers fire far more often than the tuning sample led to expect (over the
last :attr:`Matcher.DRIFT_GAP` windows: :attr:`Matcher.DRIFT` more fires per record, counting
per rule only what goes beyond twice its measured rate), the pre-filter observes again and
re-tunes on the old sample and the new together (at most :attr:`Matcher.MAX_RETUNES` times,
spaced further apart each time).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgpack

from ruletag.rules.algebra import as_text, re2_search
from ruletag.rules.compiler.hyperscan import Group, encode
from ruletag.rules.compiler.prefilter import RawFilter
from ruletag.rules.compiler.store import TableError, load_tuned, save_sample, save_tuned
from ruletag.rules.compiler.table import CompiledTable, build
from ruletag.rules.fields import FieldMap, RecordView, flatten_record
from ruletag.rules.ir import Rule
from ruletag.rules.matcher.leaves import Lazy, lazy_fn
from ruletag.rules.matcher.prefilter import TUNE_AFTER, RawMatcher, Sample
from ruletag.rules.native import Adder, native_module

log = logging.getLogger(__name__)

__all__ = ["Matcher"]

#: Values up to this many characters have their scan results cached (per matcher) ...
_CACHE_TEXT = 256
#: ... in at most this many texts (each with what it hits in every group that scanned it);
#: the cache is emptied when full.
_CACHE_ENTRIES = 1 << 16

Hits = set[int]
#: text -> (group key, the atoms it hits there, group key, ...): see :func:`py_scan_cached`
ValueCache = dict[str, tuple[int | tuple[int, ...], ...]]
#: rule lists a matcher memoises what it derives from (beyond: derived each time)
MEMO_LISTS = 1024
#: The matcher of the often-passed rules: (its matcher, rule -> its index there, index -> rule).
HotTable = tuple["Matcher", dict[int, int], tuple[int, ...]]
#: How one rule list is evaluated (see :meth:`Matcher._plan`): (the often-passed table's
#: evaluation (its matcher's ``_eval``) or None, its indexes of the list's rules there, the
#: field groups they read, its index -> rule, the list's other rules, the field groups they
#: read).
ListPlan = tuple[
    "Callable[[RecordView, tuple[int, ...], frozenset[int]], list[int]] | None",
    tuple[int, ...],
    frozenset[int],
    tuple[int, ...],
    tuple[int, ...],
    frozenset[int],
]
#: per field group: (direct paths or None, field, dotted paths, scan-cache key, scan of a text);
#: the direct paths, when not None, are the dotted paths as a set (the C scan reads those)
GroupSpec = tuple[
    tuple[frozenset[str] | None, str, tuple[str, ...], int, Callable[[str, Hits], None]], ...
]


class Matcher:
    """Matches records against ``table``; rule numbers are indexes into ``table.rules``.

    ``tune_after``: records the raw pre-filter observes before it re-tunes itself (0: never;
    None: :data:`~ruletag.rules.matcher.prefilter.TUNE_AFTER`). ``tuned_path``: where the
    re-tuned filter is kept for later runs (read at start when there). ``follow``: another
    process (the first of ``workers: N``) tunes and keeps the filter; this matcher reads it
    once written, and tunes on its own only after :attr:`FOLLOW_PATIENCE` times
    ``tune_after`` records without it.
    """

    #: a rule whose trigger fires on more than this share of the records is evaluated by
    #: a table of such rules only (its field databases are a fraction of the full ones)
    HOT_SHARE = 0.01
    #: records per check of which rules outside the often-passed table now pass often
    HOT_WINDOW = 20_000
    #: extra trigger fires per record (beyond twice each rule's tuned rate + HOT_SHARE) that
    #: make the pre-filter re-tune; the bench mixes: 0.3 tuned on the mix, 3.1 tuned on half
    #: its sources (docs/benchmarks.md)
    DRIFT = 1.0
    #: windows after a tuning before drift may re-tune (doubled at each re-tuning)
    DRIFT_GAP = 5
    MAX_RETUNES = 8
    #: a follower (``follow=True``: a ``workers: N`` process other than the first) reads the
    #: tuned filter the leader keeps, looking for it every this many records; it tunes on
    #: its own only after this many times ``tune_after`` records (the leader got no traffic)
    FOLLOW_EVERY = 2_000
    FOLLOW_PATIENCE = 5

    def __init__(
        self,
        table: CompiledTable,
        tune_after: int | None = None,
        tuned_path: Path | None = None,
        follow: bool = False,
    ) -> None:
        self.table = table
        #: where the re-tuned pre-filter is kept between runs (see :meth:`_start_tuned`)
        self.tuned_path = tuned_path
        #: the table's figures, and this matcher's re-tuning figures once it has re-tuned
        self.stats: dict[str, Any] = dict(table.stats)
        #: short value -> the atoms it hits, per field group (see :func:`py_scan_cached`)
        self._value_cache: ValueCache = {}
        #: a rule list (ascending) -> the field groups its rules read (see :meth:`_groups`)
        self._groups_of: dict[tuple[int, ...], frozenset[int]] = {}
        #: a rule list -> how to evaluate it, for the often-passed table ``_plans_for``
        #: (see :meth:`_plan`)
        self._plans: dict[tuple[int, ...], ListPlan] = {}
        self._plans_for: HotTable | None = None
        # the lookups of the hot path, as plain dicts
        self._key_atom = dict(table.key_atom)
        self._key_groups = dict(table.key_groups)
        self._trig = dict(table.trig)
        self._lazy = self._lazy_leaves()
        self._group_spec = self._build_group_spec()
        #: :meth:`_evaluate` as one C call when the extension is built (the method otherwise)
        self._eval: Callable[[RecordView, tuple[int, ...], frozenset[int]], list[int]] = (
            self._evaluate
            if evaluate is None
            else functools.partial(
                evaluate,
                (
                    self._group_spec,
                    self._value_cache,
                    table.programs,
                    self._lazy,
                    _CACHE_TEXT,
                    _CACHE_ENTRIES,
                ),
            )
        )
        self.raw: RawMatcher | None = None
        self._tune_after = 0
        if table.raw is not None:
            after = TUNE_AFTER if tune_after is None else tune_after
            self._tune_after = after
            if follow and tuned_path is not None and table.version:
                after *= self.FOLLOW_PATIENCE  # the leader's tuning is expected first
            self.raw = RawMatcher(table.raw, after, self._build_hot)
        self._hot: HotTable | None = None
        self._next_hot: HotTable | None = None
        # once tuned: the filter in use, and per rule outside the often-passed table the
        # records it was evaluated for in this window (see :meth:`_check_hot`)
        self._tuned: RawFilter | None = None
        self._cold_seen: Counter[int] | None = None
        self._cold_records = 0
        self._grown: tuple[HotTable, int, int] | None = None
        self._growing = False
        # the paths an entry's record is decoded for, and what they were gathered from
        # (see :meth:`_path_table`)
        self._paths: Any = None
        self._paths_from: tuple[int, HotTable | None] = (-1, None)
        # drift: what the last tuning observed, windows since it, re-tunings so far
        self._sample: Sample | None = None
        self._windows = 0
        self._fired: deque[tuple[Counter[frozenset[int]], int]] = deque(maxlen=self.DRIFT_GAP)
        self._gap = self.DRIFT_GAP
        self._retunes = 0
        #: while re-tuning for drift: the compiled filter observing the traffic on the side
        #: (the tuned filter keeps matching meanwhile)
        self._observer: RawMatcher | None = None
        # the kept tuned filter, read on a thread of its own (see :meth:`_start_tuned`)
        self._reader: threading.Thread | None = None
        self._read: tuple[RawFilter, HotTable | None, str] | None = None
        if tuned_path is not None and not table.version:
            self.tuned_path = None  # only a table with a cache key can be told apart
        #: following another process's tuning (see :meth:`_follow_leader`): records since the last
        #: look for its file, and the modification time of the file last read (None: not
        #: following)
        self._follow: tuple[int, int] | None = None
        if self.raw is not None and self.raw.tune_after > 0 and self.tuned_path is not None:
            if follow:
                self._follow = (0, self._mtime(self.tuned_path))
            self._start_tuned(self.tuned_path)

    def _start_tuned(self, path: Path) -> None:
        """Start from the pre-filter an earlier run re-tuned for this table, if ``path`` holds
        one: no observation phase, no tuning compile. Any tuned filter is sound (matches
        never change), so one tuned on other traffic only costs speed. A missing, damaged or
        foreign file is ignored (this matcher tunes itself and writes it anew).

        The file (tens of MB with every rule) is read on a thread of its own, so start-up
        does not wait for it; the first chunk after it is read swaps it in (or
        :meth:`wait_tuned`). Until then the compiled filter runs and observes."""
        if not path.exists():
            return
        self._reader = threading.Thread(
            target=self._read_tuned, args=(path,), daemon=True, name="ruletag-tuned-read"
        )
        self._reader.start()

    @staticmethod
    def _mtime(path: Path) -> int:
        """``path``'s modification time in ns (-1: no such file)."""
        try:
            return path.stat().st_mtime_ns
        except OSError:
            return -1

    def _follow_leader(self, records: int) -> None:
        """While following and untuned: every :attr:`FOLLOW_EVERY` records, read the kept
        tuned filter if the leader wrote it since the last look (a damaged or foreign file
        is tried once per version of it)."""
        assert self._follow is not None and self.tuned_path is not None
        seen, tried = self._follow
        seen += records
        if seen < self.FOLLOW_EVERY or (self._reader is not None and self._reader.is_alive()):
            self._follow = (seen, tried)
            return
        mtime = self._mtime(self.tuned_path)
        self._follow = (0, mtime)
        if mtime != tried and mtime != -1:
            self._start_tuned(self.tuned_path)

    def _read_tuned(self, path: Path) -> None:
        """On the reader thread: the kept filter and its often-passed table, if usable."""
        try:
            tuned, hot = load_tuned(path, self.table.version, self.table.raw)
            table = None
            if hot is not None:
                sub, back = hot
                table = (Matcher(sub, 0), {k: i for i, k in enumerate(back)}, back)
            self._read = (tuned, table, f"read from {path}")
        except (TableError, OSError) as exc:
            log.warning("tuned pre-filter not used (the matcher tunes itself again): %s", exc)

    def wait_tuned(self, timeout: float | None = None) -> bool:
        """Wait for the kept tuned filter to be read, and run it from now on; whether this
        matcher runs a tuned filter."""
        if self._reader is not None:
            self._reader.join(timeout)
        if self._read is not None:
            self._swap_read()
        return self._tuned is not None

    def _swap_read(self) -> None:
        """Run the filter the reader thread read (unless this matcher tuned itself first)."""
        assert self._read is not None
        tuned, hot, how = self._read
        self._read = None
        if self._tuned is not None:
            return
        if self.raw is not None:
            self.raw.after_tune = None  # its observation is dropped: no late often-passed table
        self._next_hot = hot
        self._swap_tuned(tuned, how)

    @property
    def rules(self) -> Sequence[Rule]:
        """The table's rules (what the indexes returned by the match methods point at)."""
        return self.table.rules

    def set_tune_after(self, records: int) -> None:
        """Let the pre-filter re-tune itself after ``records`` records (0: never)."""
        if self.raw is not None:
            self.raw.set_tune_after(records)

    def _lazy_leaves(self) -> dict[int, Lazy]:
        group = self.table.kw_group
        value_cache = self._value_cache

        def kw(view: RecordView, cache: dict[int, Any]) -> Hits:
            st = cache.get(-1)
            if st is None:
                st = cache[-1] = set()
                if group is not None:
                    scan(group, view.strings(), st, None, value_cache)
            return st

        lazy: dict[int, Lazy] = {}
        eager = self.table.eager
        for i, leaf in enumerate(self.table.leaves):
            if i not in eager:
                assert leaf is not None  # a saved table drops only the eager atoms' leaves
                lazy[i] = lazy_fn(leaf, kw, i)
        return lazy

    # ------------------------------------------------------------------ matching

    def match(self, record: Mapping[str, object]) -> list[int]:
        """Indexes (ascending) of the rules that match ``record``."""
        t = self.table
        view = t.fieldmap.view(record)
        keys: set[str] = set()
        _record_keys(record, keys)
        hits: Hits = set()
        key_atom = self._key_atom
        key_groups = self._key_groups
        todo: set[int] = set(t.scan_always)
        for k in keys:
            a = key_atom.get(k)
            if a is not None:
                hits.add(a)
            g = key_groups.get(k)
            if g is not None:
                todo.update(g)
        self._scan_groups(view, todo, hits)
        cache: dict[int, Any] = {}
        if t.kw_eager:
            scan(t.kw_group, view.strings(), hits, None, self._value_cache)  # type: ignore[arg-type]
            cache[-1] = hits
        cand: set[int] = set(t.always)
        trig = self._trig
        for a in hits:
            r = trig.get(a)
            if r is not None:
                cand.update(r)
        if not cand:
            return []
        return self._holding(sorted(cand), view, hits, cache)

    def _holding(
        self, rules: Iterable[int], view: RecordView, hits: Hits, cache: dict[int, Any]
    ) -> list[int]:
        """Those of ``rules`` whose formula holds: the scanned atoms that hit are ``hits``, the
        lazy leaves are evaluated on ``view`` when a formula asks (each once: ``cache``)."""
        lazy = self._lazy
        if holding is not None:  # the same formulas as programs, walked in C
            return holding(rules, self.table.programs, hits, lazy, view, cache)

        def L(i: int) -> bool:  # the name the generated code calls
            r = cache.get(i)
            if r is None:
                r = cache[i] = lazy[i](view, cache)
            return r

        f = self.table.formulas
        return [k for k in rules if f[k](hits, L)]

    def _scan_groups(self, view: RecordView, todo: Iterable[int], hits: Hits) -> None:
        """Scan the values of the field groups ``todo`` that the record has."""
        scan_groups(
            todo,
            self._group_spec,
            view,
            view.flat(),
            view.value_cache,
            hits,
            self._value_cache,
            _CACHE_TEXT,
            _CACHE_ENTRIES,
        )

    def _build_group_spec(self) -> GroupSpec:
        """Per field group, what :func:`scan_groups` needs: (its direct paths or None if
        derived, its field, the dotted paths ``RecordView`` reads for it, its scan-cache key,
        the scan of one text)."""
        fm = self.table.fieldmap
        spec = []
        for g, paths in zip(self.table.groups, self.table.group_paths, strict=True):
            field = g.field or ""
            spec.append((paths, field, fm.paths(field), id(g), functools.partial(_scan_value, g)))
        return tuple(spec)

    def _path_table(self, hot: HotTable | None) -> Any:
        """The dotted paths the C loop decodes an entry's record for (None without the C
        helpers): every path a field planned so far reads, and the paths of both tables'
        field groups; gathered again once fields are planned anew or the often-passed table
        changes. A view built from them decodes the whole record when it is asked for
        anything else (a new field, the record itself)."""
        if PathTable is None:
            return None
        fm = self.table.fieldmap
        if self._paths_from[0] == fm.planned_count and self._paths_from[1] is hot:
            return self._paths
        plans = fm.planned()
        wanted = {p for dotted, _spec in plans.values() for p in dotted}
        for spec in (self._group_spec, hot[0]._group_spec if hot is not None else ()):
            for paths, _field, dotted, _key, _scan in spec:
                wanted.update(dotted)
                wanted.update(paths or ())
        self._paths = path_table(wanted, plans)
        self._paths_from = (len(plans), hot)
        return self._paths

    def match_subset(self, record: Mapping[str, object], rules: Iterable[int]) -> list[int]:
        """Which of ``rules`` (indexes) match ``record``, scanning only the fields they read."""
        key = tuple(sorted(rules))
        return self._eval(RecordView(self.table.fieldmap, record), key, self._groups(key))

    def _groups(self, rules: tuple[int, ...]) -> frozenset[int]:
        """The field groups the rules ``rules`` (ascending) read."""
        todo = self._groups_of.get(rules)
        if todo is None:  # rule lists repeat (they follow the trigger patterns): memoised
            rule_groups = self.table.rule_groups
            todo = frozenset().union(*(rule_groups[k] for k in rules))
            if len(self._groups_of) < MEMO_LISTS:
                self._groups_of[rules] = todo
        return todo

    def _evaluate(
        self, view: RecordView, rules: tuple[int, ...], groups: frozenset[int]
    ) -> list[int]:
        """Those of ``rules`` (ascending) that match the record of ``view``; ``groups``: the
        field groups they read (:meth:`_groups`). The reference of the C ``evaluate`` (which
        :attr:`_eval` calls when the extension is built)."""
        hits: Hits = set()
        if groups:
            self._scan_groups(view, groups, hits)
        return self._holding(rules, view, hits, {})

    def match_entries(
        self,
        entries: bytes,
        spans: Sequence[tuple[int, int]],
        records: Sequence[Mapping[str, object]] | None = None,
    ) -> dict[int, list[int]]:
        """Entry index -> matching rule indexes, for entries with at least one match.

        Only entries that meet some rule's raw requirement are decoded, and only the rules
        the pre-filter lists for them (plus the rules without a requirement) are evaluated.
        ``records``: the record of every entry, when the caller packed them itself (exactly
        what decoding the entry gives): then nothing is decoded.
        """
        out: dict[int, list[int]] = {}
        if not spans:
            return out
        if self._grown is not None:
            self._swap_grown()
        cands = self.raw_candidates(entries, spans)
        forced = self.table.raw_forced
        todo: Iterable[int] = sorted(cands)
        if forced:  # every entry, with the rules that have no raw requirement
            cands = {
                k: tuple(sorted(set(cands.get(k, ())).union(forced))) for k in range(len(spans))
            }
            todo = range(len(spans))
        hot = self._hot
        if self._plans_for is not hot:
            self._plans_for = hot
            self._plans = {}
        cold = self._cold_seen
        paths = self._path_table(hot) if records is None else None
        match_loop(
            todo,
            cands,
            self._plans,
            functools.partial(self._plan, hot=hot),
            entries,
            spans,
            records,
            RecordView,
            self.table.fieldmap,
            self._eval,
            cold,
            msgpack.unpackb,
            _record_of,
            out,
            paths,
        )
        if cold is not None:
            self._cold_records += len(spans)
            if self._cold_records >= self.HOT_WINDOW:
                n = self._cold_records
                self._check_hot()
                self._check_drift(n)
        return out

    def raw_candidates(
        self, entries: bytes, spans: Sequence[tuple[int, int]]
    ) -> dict[int, tuple[int, ...]]:
        """The raw pre-filter's candidates (entry index -> the rules to evaluate there: see
        :meth:`RawMatcher.candidates`; the rules without a requirement not included); swaps in
        a re-tuned filter once it is ready."""
        if self._read is not None:
            self._swap_read()
        if self._follow is not None:
            if self._tuned is None:
                self._follow_leader(len(spans))
            else:
                self._follow = None  # tuned: from the leader's file, or on its own
        raw = self.raw
        if raw is None or not spans:
            return {}
        if self._observer is not None:
            self._observe_on_the_side(entries, spans)
        cands = raw.candidates(entries, spans)
        if raw.tune_error is not None:
            log.warning("pre-filter re-tuning failed (compiled triggers kept): %s", raw.tune_error)
            raw.tune_error = None
        if raw.tuned is not None:  # re-tuned on the traffic seen so far
            self._swap_tuned(raw.tuned)
        return cands

    def _observe_on_the_side(self, entries: bytes, spans: Sequence[tuple[int, int]]) -> None:
        """Feed a chunk to the observer of a re-tuning (its candidates are not used: the
        tuned filter matches meanwhile) and swap its result in once it is ready."""
        obs = self._observer
        assert obs is not None
        if obs.observing:
            obs.candidates(entries, spans)
        if obs.tune_error is not None:
            log.warning("pre-filter re-tuning failed (the tuned filter kept): %s", obs.tune_error)
            self._observer = None
        elif obs.tuned is not None:
            self._observer = None
            self._swap_tuned(obs.tuned, source=obs)

    def _swap_tuned(
        self, tuned: RawFilter, how: str = "re-tuned", source: RawMatcher | None = None
    ) -> None:
        """Run the re-tuned filter from now on (and the often-passed rules' own matcher);
        ``source``: the matcher that observed for it (default: the one running)."""
        prev = source or self.raw
        if prev is not None and prev.sample is not None:
            self._sample = prev.sample
        self.raw = RawMatcher(tuned, 0)
        if self._tune_after > 0:
            self.raw.fires = Counter()
        self._windows = 0
        self._fired.clear()
        self._grown = None  # built for the filter replaced here
        self._hot = self._next_hot
        self._tuned = tuned
        self._cold_seen = Counter()
        self._cold_records = 0
        self.stats["raw_tuned_on_records"] = tuned.tuned_on
        self.stats["raw_triggers"] = len(tuned.trig_rules) - 1
        self.stats["hot_rules"] = len(self._hot[1]) if self._hot else 0
        self.stats["raw_tuned_from"] = "file" if how != "re-tuned" else "traffic"
        log.info(
            "pre-filter %s: %d triggers, %d often-passed rules in their own table%s",
            f"re-tuned on {tuned.tuned_on} records"
            if how == "re-tuned"
            else f"tuned on {tuned.tuned_on} records, {how}",
            self.stats["raw_triggers"],
            self.stats["hot_rules"],
            # which table: the main one, or a stateful engine's step table
            f" (table {self.table.version})" if self.table.version else "",
        )

    def _plan(self, rules: tuple[int, ...], hot: HotTable | None) -> ListPlan:
        """How :meth:`match_entries` evaluates the rule list ``rules`` (ascending): the rules
        of the often-passed table ``hot`` by that table's matcher, the others by this one
        (counted as evaluated outside it). Memoised per list, up to :data:`MEMO_LISTS`."""
        sub: Matcher | None = None
        mine: tuple[int, ...] = ()
        back: tuple[int, ...] = ()
        rest = rules
        if hot is not None:
            sub, pos, back = hot
            mine = tuple(pos[r] for r in rules if r in pos)  # ascending, as ``hot`` is
            rest = tuple(r for r in rules if r not in pos)
        plan: ListPlan = (
            sub._eval if sub is not None and mine else None,
            mine,
            sub._groups(mine) if sub is not None and mine else frozenset(),
            back,
            rest,
            self._groups(rest) if rest else frozenset(),
        )
        if len(self._plans) < MEMO_LISTS:
            self._plans[rules] = plan
        return plan

    def _hot_table(self, hot: Sequence[int]) -> HotTable | None:
        """The small table of the rules ``hot`` (sorted indexes), with its index maps."""
        if not hot:
            return None
        t = self.table
        sub = build([t.rules[k] for k in hot], t.fieldmap, "", raw=False)
        return (Matcher(sub, 0), {k: i for i, k in enumerate(hot)}, tuple(hot))

    def _build_hot(self, tuned: RawFilter, sample: Sample | None = None) -> None:
        """On the tuning thread: the small table of the rules the tuned filter often passes."""
        self._next_hot = self._hot_table(
            sorted(k for k, c in tuned.rates.items() if c > self.HOT_SHARE)
        )
        self._keep(tuned, self._next_hot, sample)

    @property
    def sample_path(self) -> Path | None:
        """Where the sample of the kept tuned filter's tuning is kept (beside it), if any."""
        return None if self.tuned_path is None else self.tuned_path.with_suffix(".sample")

    def _keep(self, tuned: RawFilter, hot: HotTable | None, sample: Sample | None = None) -> None:
        """Write the tuned filter and its often-passed table to :attr:`tuned_path`, if any,
        and what its tuning observed (``sample``) to :attr:`sample_path`."""
        if self.tuned_path is None:
            return
        try:
            self.tuned_path.parent.mkdir(parents=True, exist_ok=True)
            save_tuned(
                self.tuned_path,
                self.table.version,
                tuned,
                None if hot is None else (hot[0].table, hot[2]),
                self.table.raw,
            )
            if sample is not None and self.sample_path is not None:
                save_sample(self.sample_path, self.table.version, sample)
        except OSError as exc:  # a cache: the tuned filter is used all the same
            log.warning("tuned pre-filter not saved to %s: %s", self.tuned_path, exc)

    def _check_hot(self) -> None:
        """End of a window: rebuild the often-passed table in the background if rules
        outside it were evaluated for more than :attr:`HOT_SHARE` of the window's records."""
        seen, n = self._cold_seen, self._cold_records
        self._cold_seen, self._cold_records = Counter(), 0
        if seen is None or self._growing or self._grown is not None or self._tuned is None:
            return
        limit = self.HOT_SHARE * n
        # a window that a rebuild's swap cut in two counted the rules it added as outside
        hot = set(self._hot[2] if self._hot else ())
        new = [k for k, c in seen.items() if c > limit and k not in hot]
        if not new:
            return
        rules = sorted(hot.union(new))
        self._growing = True
        threading.Thread(
            target=self._grow,
            args=(self._tuned, rules, len(new), n),
            daemon=True,
            name="ruletag-hot-table",
        ).start()

    def _check_drift(self, n: int) -> None:
        """End of a window of ``n`` records: re-tune if, over the last :attr:`DRIFT_GAP`
        windows, the tuned triggers fired far more often than the tuning sample led to
        expect (see the module docstring)."""
        raw, tuned = self.raw, self._tuned
        if raw is None or raw.fires is None or tuned is None or self.table.raw is None:
            return  # not tuned
        if self._observer is not None:
            return  # observing again
        self._fired.append((raw.fires, n))
        raw.fires = Counter()
        self._windows += 1
        if len(self._fired) < self.DRIFT_GAP:
            return  # judged over DRIFT_GAP windows: one window may hold few of the sources
        fires: Counter[int] = Counter()  # per trigger pattern, the entries it fired in
        for f, _ in self._fired:
            for key, c in f.items():
                for t in key:
                    fires[t] += c
        n = sum(m for _, m in self._fired)
        fired: Counter[int] = Counter()
        trig = tuned.trig_rules
        for t, c in fires.items():
            for r in trig.get(t, ()):
                fired[r] += c
        rates, floor = tuned.rates, self.HOT_SHARE
        excess = sum(max(0.0, c / n - 2 * rates.get(r, 0.0) - floor) for r, c in fired.items())
        self.stats["raw_drift"] = round(excess, 2)
        if excess <= self.DRIFT or self._windows < self._gap or self._retunes >= self.MAX_RETUNES:
            return
        self._retunes += 1
        self._gap *= 2
        self.stats["raw_retunes"] = self._retunes
        log.info(
            "pre-filter: the traffic differs from the %d records it was tuned on (%.1f more "
            "trigger fires per record than they led to expect): observing the next %d records "
            "to re-tune on both%s",
            tuned.tuned_on,
            excess,
            self._tune_after,
            f" (table {self.table.version})" if self.table.version else "",
        )
        # the compiled filter observes on the side (every entry scanned for every pattern,
        # requirements checked exactly); the tuned filter and its often-passed table keep
        # matching, so the records observed cost that scan more, not the untuned filter's
        # decoding
        kept = self.sample_path
        self._observer = RawMatcher(
            self.table.raw,
            self._tune_after,
            self._build_hot,
            self._sample,
            # started from a kept tuned filter: the sample its tuning observed, kept beside it
            None if kept is None else (kept, self.table.version),
        )

    def _grow(self, tuned: RawFilter, rules: list[int], new: int, window: int) -> None:
        """On its own thread: the larger often-passed table, kept with the tuned filter."""
        try:
            hot = self._hot_table(rules)
            assert hot is not None
            if self._tuned is not tuned:
                return  # re-tuned meanwhile: that filter has its own table (and file)
            self._keep(tuned, hot)
            self._grown = (hot, new, window)
        except Exception as exc:  # pragma: no cover - the current table stays in use
            log.warning("often-passed table not rebuilt (the current one is kept): %s", exc)
        finally:
            self._growing = False

    def _swap_grown(self) -> None:
        """Evaluate the often-passed rules with the rebuilt, larger table from now on."""
        assert self._grown is not None
        hot, new, window = self._grown
        self._grown = None
        self._hot = hot
        self.stats["hot_rules"] = len(hot[2])
        self.stats["hot_grown"] = self.stats.get("hot_grown", 0) + 1
        log.info(
            "often-passed table rebuilt: %d rules (%d more passed often in the last %d records)",
            len(hot[2]),
            new,
            window,
        )


# --------------------------------------------------------------------------- scanning


def scan(
    g: Group,
    values: Iterable[object],
    hits: Hits,
    on_match: Callable[..., None] | None = None,
    cache: ValueCache | None = None,
) -> None:
    """Add the atoms of group ``g`` that ``values`` hit to ``hits`` (``on_match``: a handler
    adding to it).

    With ``cache``, the atoms a short value hits are remembered per (group, value): log
    values repeat (images, users, channels), and a repeated one costs a dict lookup instead
    of a Hyperscan scan and its callbacks."""
    if cache is not None:

        def miss(s: str, into: Hits) -> None:
            _scan_value(g, s, into, None)

        scan_cached(id(g), values, hits, cache, miss, _CACHE_TEXT, _CACHE_ENTRIES)
        return
    for v in values:
        s = as_text(v)
        if s is not None:
            _scan_value(g, s, hits, on_match)


def py_scan_cached(
    key: int,
    values: Iterable[object],
    hits: Hits,
    cache: ValueCache,
    miss: Callable[[str, Hits], None],
    limit: int,
    max_entries: int,
) -> None:
    """Reference of the C ``scan_cached``: for each value's text (:func:`as_text`; others
    skipped), the atoms it hits are added to ``hits``: ``miss(text, hits)`` scans a text
    longer than ``limit``; a shorter one is looked up in ``cache`` (text -> ``(key, hits,
    key, hits, ...)``, one pair per field group that scanned it: no key tuple per value) and
    scanned into a fresh set on a miss (``cache`` emptied first when it holds
    ``max_entries`` texts)."""
    for v in values:
        s = as_text(v)
        if s is None:
            continue
        if len(s) > limit:
            miss(s, hits)
            continue
        entry = cache.get(s)
        if entry is not None:
            for j in range(0, len(entry), 2):
                if entry[j] == key:
                    hits.update(entry[j + 1])  # type: ignore[arg-type]
                    break
            else:
                entry = None
        if entry is None:
            mine: Hits = set()
            miss(s, mine)
            got = tuple(mine)
            entry = cache.get(s)  # again: the scan ran Python code
            if entry is None and len(cache) >= max_entries:
                cache.clear()
            cache[s] = (*(entry or ()), key, got)
            hits.update(got)


def py_scan_groups(
    todo: Iterable[int],
    spec: GroupSpec,
    view: RecordView,
    flat: Mapping[str, list[object]],
    vcache: dict[str, list[object]],
    hits: Hits,
    cache: ValueCache,
    limit: int,
    max_entries: int,
) -> None:
    """Reference of the C ``scan_groups``: for each field group ``todo`` names, skipped when
    it has direct paths and ``flat`` holds none of them, the field's values (``vcache``'s;
    else its dotted paths' in ``flat``, stored in ``vcache`` when any; else
    ``view.values(field)``) are scanned with :func:`py_scan_cached`."""
    for gi in todo:
        paths, field, dotted, key, miss = spec[gi]
        if paths is not None and flat.keys().isdisjoint(paths):
            continue
        vals = vcache.get(field)
        if vals is None:
            vals = []
            for p in dotted:
                got = flat.get(p)
                if got is not None:
                    vals.extend(got)
            if vals:
                vcache[field] = vals
            else:
                vals = view.values(field)
        if vals:
            scan_cached(key, vals, hits, cache, miss, limit, max_entries)


def py_match_loop(
    todo: Iterable[int],
    cands: Mapping[int, tuple[int, ...]],
    plans: Mapping[tuple[int, ...], ListPlan],
    make_plan: Callable[[tuple[int, ...]], ListPlan],
    entries: bytes,
    spans: Sequence[tuple[int, int]],
    records: Sequence[Mapping[str, object]] | None,
    view_type: Callable[[FieldMap, Mapping[str, object]], RecordView],
    fieldmap: FieldMap,
    own_eval: Callable[[RecordView, tuple[int, ...], frozenset[int]], list[int]],
    cold: Counter[int] | None,
    unpackb: Callable[..., object],
    decode: Callable[[memoryview], Mapping[str, object] | None],
    out: dict[int, list[int]],
    paths: object = None,
) -> None:
    """Reference of the C ``match_loop``, :meth:`Matcher.match_entries`' loop: for each entry
    ``todo`` names, its rule list (``cands``, else none) is evaluated as its plan says
    (``plans``, else ``make_plan``) on its record (``records``, else the entry decoded:
    ``decode``; the C loop decodes the usual entry with ``unpackb`` itself, exactly as
    ``decode`` would); entries with a match go to ``out``, and the rules evaluated outside the
    often-passed table are counted in ``cold``. ``paths``: the C loop's ``PathTable``, with
    which it reads only those paths of the usual entry's record, and decodes the record
    itself only when asked for it (this loop decodes every record whole)."""
    buf = memoryview(entries)
    for k in todo:
        rules = cands.get(k, ())
        plan = plans.get(rules)
        if plan is None:
            plan = make_plan(rules)
        if records is None:
            s, e = spans[k]
            record = decode(buf[s:e])
        else:
            record = records[k]
        if record is None:
            continue
        sub, mine, mine_groups, back, rest, rest_groups = plan
        view = view_type(fieldmap, record)
        m = [back[i] for i in sub(view, mine, mine_groups)] if sub is not None else []
        if rest:
            more = own_eval(view, rest, rest_groups)
            if more:
                m = sorted(m + more) if m else more
            if cold is not None:
                cold.update(rest)
        if m:
            out[k] = m


_native = native_module()
#: :func:`py_scan_cached` and :func:`py_scan_groups`, in C when the extension is built
scan_cached: Callable[..., None] = py_scan_cached if _native is None else _native.scan_cached
scan_groups: Callable[..., None] = py_scan_groups if _native is None else _native.scan_groups
#: the rules whose program holds, in C (None: the generated formula functions run instead)
holding: Callable[..., list[int]] | None = None if _native is None else _native.holding
#: :meth:`Matcher._evaluate` in one C call (None: the method runs)
evaluate: Callable[..., list[int]] | None = None if _native is None else _native.evaluate
#: :func:`py_match_loop`, in C when the extension is built
match_loop: Callable[..., None] = py_match_loop if _native is None else _native.match_loop
#: the dotted paths the C loop reads of an entry's record (None: no C helpers)
PathTable: Any = None if _native is None else _native.PathTable


def path_table(wanted: Iterable[str], plans: Mapping[str, tuple[Any, Any]] | None = None) -> Any:
    """The C loop's ``PathTable`` of the dotted paths ``wanted``, and of the paths above them
    (walked into for them); ``plans``: field -> (dotted, spec) of its plan
    (:meth:`FieldMap.planned`), which a view made from the bytes reads without looking its
    plan up (those whose paths are all covered)."""
    flags = dict.fromkeys(wanted, 1)
    for w in list(flags):
        for i, c in enumerate(w):
            if c == ".":
                flags[w[:i]] = flags.get(w[:i], 0) | 2
    return PathTable(flags, dict(plans or {}))


def py_flat_of(covered: Iterable[str], data: bytes) -> dict[str, list[object]] | None:
    """The reference of the C ``flat_of(PathTable(paths), data, unpackb)``:
    :func:`flatten_record` of the record ``data`` holds (None if it is not a map msgpack
    decodes), at the paths ``covered``. Where the C one answers (not None), it answers this."""
    try:
        rec = msgpack.unpackb(
            data, raw=False, unicode_errors="surrogateescape", strict_map_key=False
        )
    except Exception:
        return None
    if not isinstance(rec, dict):
        return None
    keep = set(covered)
    return {p: v for p, v in flatten_record(rec).items() if p in keep}


def _scan_value(g: Group, s: str, hits: Hits, on_match: Callable[..., None] | None = None) -> None:
    """Add the atoms of ``g`` the text ``s`` hits to ``hits`` (``on_match``: a handler adding
    to it, or None)."""
    if on_match is None:
        on_match = Adder(hits)
    db = g.db
    # (all, only, all ASCII, only ASCII): read once, not through four properties
    programs = g.programs.get()
    rest = programs[0]
    if s.isascii():  # the regexes that need a non-ASCII character are left out
        rest = programs[2]
        if db is not None:
            if programs[0] and s.endswith("\n"):
                _scan_only(db, s.encode(), g.cased_ids | g.caseless_ids, hits)
            else:
                db.scan(s.encode(), match_event_handler=on_match)
                rest = programs[3]
    elif db is not None:
        if g.cased_ids:
            _scan_only(db, encode(s), g.cased_ids, hits)
        if g.caseless_ids:
            _scan_only(db, encode(s.lower()), g.caseless_ids, hits)
    for i, rx in rest:
        if i not in hits and re2_search(rx, s):
            hits.add(i)


def _scan_only(db: Any, data: bytes, ids: frozenset[int], hits: Hits) -> None:
    """Scan ``data``, adding only the hits of ``ids`` to ``hits``."""
    db.scan(data, match_event_handler=Adder(hits, ids))


def _record_keys(obj: Mapping[Any, object], out: set[str]) -> None:
    """Every key name at any depth (dotted keys also split into their parts)."""
    for k, v in obj.items():
        if isinstance(k, str):
            out.add(k)
            if "." in k:
                out.update(k.split("."))
        if isinstance(v, dict):
            _record_keys(v, out)
        elif isinstance(v, list):
            for x in v:
                if isinstance(x, dict):
                    _record_keys(x, out)


#: msgpack type byte of an entry's time -> the time's length in bytes (EventTime, numbers)
_TIME_LEN = {0xD7: 10, 0xCB: 9, 0xCA: 5, 0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9, 0xD0: 2}
_TIME_LEN.update({0xD1: 3, 0xD2: 5, 0xD3: 9})


def _record_of(buf: memoryview) -> Mapping[str, object] | None:
    """The record map of one packed entry ``[time, record]``, or None if it has none.

    The usual entry (a two-element array whose time is an EventTime or a number) has its
    record decoded alone, without the time (an ``ExtType`` object per record otherwise)."""
    if len(buf) > 2 and buf[0] == 0x92:
        t = buf[1]
        off = 2 if t < 0x80 else 1 + _TIME_LEN.get(t, 0)
        if off > 1:
            try:
                rec = msgpack.unpackb(
                    buf[off:], raw=False, unicode_errors="surrogateescape", strict_map_key=False
                )
            except Exception:
                return None
            return rec if isinstance(rec, dict) else None
    try:
        entry = msgpack.unpackb(
            buf, raw=False, unicode_errors="surrogateescape", strict_map_key=False
        )
    except Exception:
        return None
    if isinstance(entry, list | tuple) and len(entry) >= 2 and isinstance(entry[1], dict):
        return entry[1]
    return None
