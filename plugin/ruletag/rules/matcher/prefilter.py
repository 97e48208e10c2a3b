"""The raw-bytes pre-filter at run time: which packed entries can match some rule.

A :class:`RawMatcher` runs one compiled, immutable
:class:`~ruletag.rules.compiler.prefilter.RawFilter` over chunks of packed entries and owns
what changes while traffic flows: the pattern counts it observes and the re-tuning they lead
to. Each matcher tunes on its own; the filter it started from is never changed.
"""

from __future__ import annotations

import logging
import threading
from array import array
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from ruletag.heap import malloc_trim
from ruletag.rules.compiler.prefilter import FOLD_ID, RawFilter, retune
from ruletag.rules.compiler.store import TableError, load_sample
from ruletag.rules.native import Adder, EntryHits, native_module

__all__ = ["TUNE_AFTER", "RawMatcher"]

log = logging.getLogger(__name__)

#: Records observed before the filter re-picks its triggers from measured frequencies.
TUNE_AFTER = 20_000
#: Most distinct pattern sets kept while observing (entries with a set beyond these are not
#: in the sample that loosening is checked on).
MAX_SETS = 20_000

#: Most distinct trigger pattern sets a matcher memoises what follows from.
MAX_TRIGGERED = 4096
# How an entry's triggered rules are checked: no rule triggered; each by its trigger alone;
# some by their trigger alone and some in stage 2; all in stage 2; any rule (a hidden
# caseless literal).
_NOTHING, _TRIGGER_ENOUGH, _SOME_UNCHECKED, _ALL_CHECKED, _ANY = range(5)
#: what follows from a trigger pattern set: (its rules ascending, how they are checked,
#: scan the full stage-2 database, scan the cold one)
_Triggered = tuple[tuple[int, ...], int, bool, bool]

#: What a tuning observed: per pattern the entries holding it, per rule the entries its
#: requirement held in, the entries observed, and the distinct pattern sets of the entries
#: no requirement held in (see :meth:`RawMatcher._observe`).
Sample = tuple[dict[int, int], dict[int, int], int, dict[bytes, int]]


def py_follow_triggers(
    per_entry: Mapping[int, set[int]],
    triggered: Mapping[frozenset[int], _Triggered],
    fire_sets: Counter[frozenset[int]] | None,
    out: dict[int, tuple[int, ...]],
) -> list[tuple[int, frozenset[int]]]:
    """Reference of the C ``follow_triggers``: the tuned filter's pass over the entries a
    trigger fired in (``per_entry``: entry -> its pattern ids). Each entry's pattern set is
    counted in ``fire_sets`` (unless None); what the memo ``triggered`` settles without
    stage 2 goes to ``out`` (nothing triggered: skipped; every triggered rule checked by its
    trigger, or some unchecked but the entry decoded anyway: its rules); the entries left,
    with their pattern sets, are returned (ascending) for the caller to finish."""
    left = []
    for k in sorted(per_entry):
        key = frozenset(per_entry[k])
        if fire_sets is not None:
            fire_sets[key] += 1
        got = triggered.get(key)
        how = -1 if got is None else got[1]
        if how in (_TRIGGER_ENOUGH, _SOME_UNCHECKED):
            assert got is not None
            out[k] = got[0]
        elif how != _NOTHING:
            left.append((k, key))
    return left


class RawMatcher:
    """Runs :attr:`filter`: :meth:`candidates` lists the entries worth decoding, and for
    each the rules whose raw requirement holds.

    *Self-tuning*: while it runs, the matcher counts in how many of the first ``tune_after``
    records each pattern occurs, then builds (:func:`~ruletag.rules.compiler.prefilter.retune`),
    on a background thread (Hyperscan compiles without the GIL), a filter whose triggers are
    the patterns measured rarest and whose stage 2 no longer scans for the patterns almost
    every record holds; :attr:`tuned` holds it once ready and the owner swaps in a matcher
    over it. Any choice of triggers and any loosening is sound, so matches never change.

    ``prior``: the sample an earlier tuning observed; the tuning adds it to its own, so a
    re-tuning after the traffic changed serves the old traffic and the new. ``prior_file``
    (path, table version): where an earlier run kept its sample, read (on the tuning thread)
    when ``prior`` is None: a run that started from a kept tuned filter has none of its own.
    """

    def __init__(
        self,
        filt: RawFilter,
        tune_after: int = TUNE_AFTER,
        after_tune: Callable[[RawFilter, Sample], None] | None = None,
        prior: Sample | None = None,
        prior_file: tuple[Path, str] | None = None,
    ) -> None:
        self.filter = filt
        self._trigger_db = filt.trigger_db
        self._full_db = filt.full_db
        self._cold = filt.cold
        self._trig_rules = dict(filt.trig_rules)
        self._reqs = dict(filt.reqs)
        self._checked = filt.checked
        #: an entry's trigger pattern set -> what follows from it (see :meth:`_what_follows`)
        self._triggered: dict[frozenset[int], _Triggered] = {}
        #: the re-tuned filter, once built (the owner replaces this matcher with one over it)
        self.tuned: RawFilter | None = None
        self.tune_error: str | None = None
        #: called on the tuning thread with the tuned filter before it is published
        self.after_tune = after_tune
        self._counts: dict[int, int] | None = None
        self._passes: dict[int, int] = {}  # while observing: entries each requirement held in
        #: while observing, the entries no requirement held in: their distinct pattern sets
        #: (sorted uint32 pattern ids as bytes, compact) -> entries
        self._sets: dict[bytes, int] = {}
        self._observed = 0
        self._tuning = False
        self._prior = prior
        self._prior_file = prior_file
        #: what the tuning observed (its own records and ``prior``), once tuned
        self.sample: Sample | None = None
        #: when set (by the owner of a tuned filter): per trigger pattern set, the entries
        #: exactly those patterns fired in, to tell when the traffic no longer looks like the
        #: tuning sample
        self.fires: Counter[frozenset[int]] | None = None
        self.tune_after = 0
        self.set_tune_after(tune_after)

    @property
    def observing(self) -> bool:
        """Whether this matcher still counts patterns for its tuning."""
        return self._counts is not None

    def set_tune_after(self, records: int) -> None:
        """Re-tune after ``records`` observed records (0: never; only an untuned filter)."""
        self.tune_after = records
        f = self.filter
        can = records > 0 and f.plan is not None and not f.tuned_on and not self._tuning
        self._counts = ({} if self._counts is None else self._counts) if can else None

    def candidates(
        self, entries: bytes, spans: Sequence[tuple[int, int]]
    ) -> dict[int, tuple[int, ...]]:
        """Entry index -> rules (ascending) to evaluate on that entry: those whose raw
        requirement holds, and (once tuned) in an entry decoded anyway, every rule a
        trigger pattern of it fired for."""
        if not spans:
            return {}
        on_trigger = EntryHits(spans)
        self._trigger_db.scan(entries, on_trigger)
        per_entry: dict[int, set[int]] = on_trigger.per_entry
        counts = self._counts
        out: dict[int, tuple[int, ...]] = {}
        #: while observing: the entries scanned for every pattern, with what was found (the
        #: observation needs that scan of every entry; stage 2 reuses it)
        scanned: dict[int, set[int]] | None = {} if counts is not None else None
        if not per_entry:
            if counts is not None:
                self._observe(entries, spans, counts, out, {})
            return out
        triggered = self._triggered
        if counts is None:  # what the memo settles (and the fires), in C when built
            left = follow_triggers(per_entry, triggered, self.fires, out)
        else:  # observing: every entry below (passes counted, stage 2 exact)
            left = [(k, frozenset(per_entry[k])) for k in sorted(per_entry)]
            if self.fires is not None:
                self.fires.update(key for _k, key in left)
        view = memoryview(entries)
        reqs = self._reqs
        hits: set[int] = set()
        on_hit = Adder(hits)
        cold = self._cold
        full_db = self._full_db
        for k, key in left:
            got = triggered.get(key)
            if got is None:  # pattern sets repeat: what follows from one is memoised
                got = self._what_follows(key)
            order, how, in_full, in_cold = got
            if how == _ANY:  # a caseless literal could be hidden: any rule may match
                out[k] = tuple(sorted(reqs))
                continue
            if how <= _TRIGGER_ENOUGH:
                if how == _TRIGGER_ENOUGH:  # every triggered rule's requirement is met
                    out[k] = order
                    if counts is not None:
                        self._count_passes(order)
                continue
            if counts is None and how == _SOME_UNCHECKED:
                # decoded anyway (a triggered rule needs no stage 2): the other triggered
                # rules are evaluated on the record, which costs less than scanning the
                # entry again (while observing, the passes counted must be exact)
                out[k] = order
                continue
            s, e = spans[k]
            if scanned is not None:  # observing (an untuned filter: one stage-2 database)
                hits = scanned[k] = set()
                full_db.scan(view[s:e], Adder(hits))
            elif cold is None:
                hits.clear()
                full_db.scan(view[s:e], on_hit)
            else:
                hits.clear()
                if in_full:
                    full_db.scan(view[s:e], on_hit)
                if in_cold:
                    cold[0].scan(view[s:e], on_hit)
            memo: dict[int, bool] = {}
            ok = tuple(r for r in order if reqs[r](hits, memo))
            if ok:
                out[k] = ok
                if counts is not None:
                    self._count_passes(ok)
        if counts is not None:
            assert scanned is not None
            self._observe(entries, spans, counts, out, scanned)
        return out

    def _what_follows(self, pats: frozenset[int]) -> _Triggered:
        """What a trigger pattern set ``pats`` of an entry leads to: the rules it triggers,
        ascending, how they are checked, and (with a cold stage-2 database) whether stage 2
        scans the full database and the cold one (memoised up to :data:`MAX_TRIGGERED`)."""
        rules: set[int] = set()
        for t in pats:
            rules.update(self._trig_rules.get(t, ()))
        checked = self._checked
        if FOLD_ID in pats:
            how = _ANY
        elif checked.isdisjoint(rules):
            how = _TRIGGER_ENOUGH if rules else _NOTHING
        elif not checked.issuperset(rules):
            how = _SOME_UNCHECKED
        else:
            how = _ALL_CHECKED
        cold = self._cold
        in_full = cold is None or not cold[1].issuperset(rules)
        in_cold = cold is not None and not cold[1].isdisjoint(rules)
        got = (tuple(sorted(rules)), how, in_full, in_cold)
        if len(self._triggered) < MAX_TRIGGERED:
            self._triggered[pats] = got
        return got

    def _count_passes(self, rules: Sequence[int]) -> None:
        passes = self._passes
        for r in rules:
            passes[r] = passes.get(r, 0) + 1

    # ------------------------------------------------------------------ self-tuning

    def _observe(
        self,
        entries: bytes,
        spans: Sequence[tuple[int, int]],
        counts: dict[int, int],
        out: Mapping[int, Sequence[int]],
        scanned: Mapping[int, set[int]],
    ) -> None:
        """Count, per pattern, the observed entries holding it (every entry of the chunk), and
        the distinct pattern sets of the entries where no rule's requirement held (the
        observing filter is untuned, so ``out`` is exact), to check loosening against.
        ``scanned``: the entries stage 2 already scanned for every pattern, and what it found."""
        view = memoryview(entries)
        mine: set[int] = set()
        on_hit = Adder(mine)
        get = counts.get
        sets = self._sets
        for k, (s, e) in enumerate(spans):
            seen = scanned.get(k)
            if seen is None:
                seen = mine
                seen.clear()
                self._full_db.scan(view[s:e], on_hit)
            for i in seen:
                counts[i] = get(i, 0) + 1
            if k in out:
                continue
            key = array("I", sorted(seen)).tobytes()  # ~0.6 KB, a frozenset ~7 KB
            if key in sets or len(sets) < MAX_SETS:
                sets[key] = sets.get(key, 0) + 1
        self._observed += len(spans)
        if self._observed >= self.tune_after and not self._tuning:
            self._tuning = True
            self._counts = None
            threading.Thread(
                target=self._tune_in_background,
                args=(counts, self._passes, self._observed, self._sets),
                name="ruletag-prefilter-tune",
                daemon=True,
            ).start()

    def _tune_in_background(
        self,
        counts: dict[int, int],
        passes: dict[int, int],
        n: int,
        sets: dict[bytes, int],
    ) -> None:
        try:
            prior = self._prior
            if prior is None and self._prior_file is not None:  # kept by an earlier run
                prior = _read_sample(*self._prior_file)
            if prior is not None:
                counts, passes, n, sets = _merge((counts, passes, n, sets), prior)
            tuned = retune(self.filter, counts, n, passes, sets)
            self.sample = (counts, passes, n, sets)
            if self.after_tune is not None:
                self.after_tune(tuned, self.sample)
            self.tuned = tuned
        except Exception as exc:  # pragma: no cover - the untuned filter stays in use
            self.tune_error = f"{type(exc).__name__}: {exc}"
        finally:
            malloc_trim()  # what the compile freed


def _read_sample(path: Path, version: str) -> Sample | None:
    """The sample kept in ``path`` for the table ``version``; None (and a warning unless the
    file is missing) when it cannot be used."""
    try:
        counts, passes, n, sets = load_sample(path, version)
    except FileNotFoundError:
        return None
    except (TableError, OSError) as exc:
        log.warning("earlier tuning sample not used (re-tuning on new traffic only): %s", exc)
        return None
    return counts, passes, n, sets


def _merge(a: Sample, b: Sample) -> Sample:
    """Two samples as one (the distinct pattern sets still at most :data:`MAX_SETS`)."""
    counts = Counter(a[0])
    counts.update(b[0])
    passes = Counter(a[1])
    passes.update(b[1])
    sets = dict(a[3])
    for key, c in b[3].items():
        if key in sets or len(sets) < MAX_SETS:
            sets[key] = sets.get(key, 0) + c
    return dict(counts), dict(passes), a[2] + b[2], sets


_native = native_module()
#: :func:`py_follow_triggers`, in C when the extension is built
follow_triggers: Callable[..., list[tuple[int, frozenset[int]]]] = (
    py_follow_triggers if _native is None else _native.follow_triggers
)
