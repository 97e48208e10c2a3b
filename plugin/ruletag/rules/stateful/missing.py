"""Missing events ``![...]`` of EQL sequences: the absence check, released by a watermark.

The positive steps of such a sequence are matched by :class:`~.sequence.SequenceState` as if
the missing clauses were not there (Elasticsearch does the same); every completed positive
match is a *candidate* handed to :class:`MissingState`, which keeps, per join key and missing
clause, the event times of the records that matched the clause, and decides each candidate as
Elasticsearch's missing-event probes do (docs/rules.md "Missing events"):

* a *middle* clause (between positive steps i-1 and i) rejects the candidate if one of its
  records lies strictly between those two positive events;
* *leading* clauses give ``L``, the latest record strictly before the first positive event;
  *trailing* clauses give ``T``, the earliest record strictly after the last one;
* the candidate is accepted when there is neither ``L`` nor ``T``; or the query has leading
  clauses and no ``L``; or trailing clauses and no ``T``; or (leading and trailing)
  ``T - L > maxspan``; or (leading only) ``last - L > maxspan``; or (trailing only)
  ``T - first > maxspan``. In words: some maxspan-long window holding all the positives holds
  no missing-clause record.

Absence is only known once time has passed, so a candidate waits for the *watermark*
(``latest event time seen - lateness``: records older than that are assumed to have arrived):
with trailing clauses until the watermark is past ``first + maxspan``; otherwise until it
reaches the last positive event. :meth:`MissingState.release` decides the candidates whose
time has come; :meth:`MissingState.flush` decides all of them (end of input).

Bounds: missing-clause times older than ``watermark - 2 * maxspan`` are dropped (no candidate
can need them unless it is itself later than that); at most ``max_keys`` keys (least recently
used evicted first) and ``max_events`` times per key and clause (oldest first). With trailing
clauses only (both corpus rules), a candidate is checked against the history when it is made
and a missing-clause record rejects the waiting candidates it hits when it arrives, so times
are only kept back to the watermark (for candidates still to come within the lateness): the
history is the lateness window, not two maxspans.
"""

from __future__ import annotations

import heapq
import itertools
import math
from bisect import bisect_left, bisect_right, insort
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["MissingState"]

Key = tuple[str, ...]


class MissingState:
    """The missing-clause history and the pending candidates of one sequence rule.

    ``positions``: per missing clause, the number of positive steps before it; ``stages``: the
    number of positive steps; ``span``: the rule's maxspan in seconds.
    """

    def __init__(
        self,
        positions: Sequence[int],
        stages: int,
        span: float,
        *,
        max_keys: int = 100_000,
        max_events: int = 1024,
    ) -> None:
        self.positions = tuple(positions)
        self.stages = stages
        self.span = span
        self.max_keys = max_keys
        self.max_events = max_events
        self.leading = tuple(m for m, p in enumerate(self.positions) if p == 0)
        self.trailing = tuple(m for m, p in enumerate(self.positions) if p == stages)
        self.middle = tuple(m for m, p in enumerate(self.positions) if 0 < p < stages)
        #: key -> per missing clause, the sorted distinct event times of its records
        self.history: OrderedDict[Key, list[list[float]]] = OrderedDict()
        #: [deadline, order, key, positive times, payload, rejected]: a heap by deadline
        self.pending: list[list[Any]] = []
        #: key -> its pending entries (trailing clauses only: rejected as missing events come)
        self.waiting: dict[Key, list[list[Any]]] = {}
        self.trailing_only = bool(self.trailing) and not self.leading and not self.middle
        self._order = itertools.count()
        self._pruned = -math.inf
        self._prune_every = max(1.0, min(span, 60.0))
        self.counters: dict[str, int] = {
            "missing_accepted": 0,
            "missing_rejected": 0,
            "missing_evicted_keys": 0,
            "missing_evicted_events": 0,
        }

    # ------------------------------------------------------------------ input

    def seen(self, clause: int, key: Key, ts: float) -> None:
        """A record at ``ts`` matched missing clause ``clause`` with join ``key``."""
        hist = self.history.get(key)
        if hist is None:
            hist = self.history[key] = [[] for _ in self.positions]
            if len(self.history) > self.max_keys:
                self.history.popitem(last=False)
                self.counters["missing_evicted_keys"] += 1
        else:
            self.history.move_to_end(key)
        if self.trailing_only:
            for entry in self.waiting.get(key, ()):
                positives = entry[3]
                if positives[-1] < ts <= positives[0] + self.span:
                    entry[5] = True
        times = hist[clause]
        i = bisect_left(times, ts)
        if i < len(times) and times[i] == ts:
            return  # the same time adds nothing to strict comparisons
        insort(times, ts)
        if len(times) > self.max_events:
            del times[0]
            self.counters["missing_evicted_events"] += 1

    def candidate(self, key: Key, times: Sequence[float], payload: Any) -> None:
        """Positive events at ``times`` (one per positive step) matched for ``key``; decided
        once the watermark allows (``payload`` comes back with the decision)."""
        self._add(key, times, payload)

    def _add(self, key: Key, times: Sequence[float], payload: Any) -> list[Any]:
        entry = [self.deadline(times), next(self._order), key, tuple(times), payload, False]
        heapq.heappush(self.pending, entry)
        if self.trailing_only:  # decided as records come: the history may be pruned before
            entry[5] = not self._accepts(key, times)
            self.waiting.setdefault(key, []).append(entry)
        return entry

    def deadline(self, times: Sequence[float]) -> float:
        """The event time the watermark must reach (trailing clauses: pass) to decide."""
        return times[0] + self.span if self.trailing else times[-1]

    # ------------------------------------------------------------------ output

    def release(self, watermark: float) -> list[tuple[Key, Any]]:
        """Decide the candidates whose deadline ``watermark`` has reached (passed, with
        trailing clauses); the accepted ones as ``(key, payload)``, in deadline order."""
        out: list[tuple[Key, Any]] = []
        strict = bool(self.trailing)
        while self.pending:
            deadline = self.pending[0][0]
            if watermark < deadline or (strict and watermark == deadline):
                break
            entry = heapq.heappop(self.pending)
            _, _, key, times, payload, rejected = entry
            if self.trailing_only:
                mine = self.waiting[key]
                mine.remove(entry)
                if not mine:
                    del self.waiting[key]
            if rejected:
                self.counters["missing_rejected"] += 1
            elif self.accepts(key, times):
                out.append((key, payload))
        bound = watermark if self.trailing_only else watermark - 2 * self.span
        if bound > self._pruned + self._prune_every:
            self.prune(bound)
        return out

    def flush(self) -> list[tuple[Key, Any]]:
        """Decide every pending candidate (no more records will come)."""
        return self.release(math.inf)

    def accepts(self, key: Key, times: Sequence[float]) -> bool:
        """Elasticsearch's missing-event acceptance for positives at ``times`` (module doc)."""
        ok = self._accepts(key, times)
        self.counters["missing_accepted" if ok else "missing_rejected"] += 1
        return ok

    def _accepts(self, key: Key, times: Sequence[float]) -> bool:
        hist = self.history.get(key)
        if hist is None:
            return True
        for m in self.middle:
            seen = hist[m]
            before, after = times[self.positions[m] - 1], times[self.positions[m]]
            i = bisect_right(seen, before)
            if i < len(seen) and seen[i] < after:
                return False
        lead: float | None = None
        for m in self.leading:
            seen = hist[m]
            i = bisect_left(seen, times[0]) - 1
            if i >= 0 and (lead is None or seen[i] > lead):
                lead = seen[i]
        trail: float | None = None
        for m in self.trailing:
            seen = hist[m]
            i = bisect_right(seen, times[-1])
            if i < len(seen) and (trail is None or seen[i] < trail):
                trail = seen[i]
        if lead is None and trail is None:
            return True
        if (self.leading and lead is None) or (self.trailing and trail is None):
            return True
        if lead is not None and trail is not None:
            return trail - lead > self.span
        if lead is not None:
            return times[-1] - lead > self.span
        assert trail is not None
        return trail - times[0] > self.span

    # ------------------------------------------------------------------ bounds

    def prune(self, bound: float) -> None:
        """Forget missing-clause times before ``bound`` (and keys left with none)."""
        self._pruned = bound
        for key in list(self.history):
            hist = self.history[key]
            for times in hist:
                i = bisect_left(times, bound)
                if i:
                    del times[:i]
            if not any(hist):
                del self.history[key]

    def snapshot(self) -> dict[str, Any]:
        """The history and the pending candidates as JSON-able data (see :meth:`restore`);
        payloads must be JSON-able themselves (event references are)."""
        return {
            "positions": list(self.positions),
            "history": [[list(k), [list(t) for t in h]] for k, h in self.history.items()],
            "pending": [
                [_finite(d), list(k), list(times), [dict(e) for e in payload], rejected]
                for d, _, k, times, payload, rejected in sorted(self.pending)
            ],
        }

    def restore(self, data: Mapping[str, Any]) -> None:
        """Resume from :meth:`snapshot` output; data of another clause layout is ignored."""
        if list(data.get("positions") or []) != list(self.positions):
            return
        self.history.clear()
        for key, hist in data.get("history") or []:
            if len(hist) == len(self.positions):
                self.history[tuple(str(x) for x in key)] = [sorted(map(float, t)) for t in hist]
        self.pending = []
        self.waiting = {}
        for _, key, times, payload, rejected in data.get("pending") or []:
            entry = self._add(
                tuple(str(x) for x in key),
                [float(t) for t in times],
                tuple(dict(e) for e in payload),
            )
            entry[5] = bool(rejected)

    def stats(self) -> dict[str, int]:
        """Keys with history, times held, pending candidates, and the counters."""
        out = {
            "missing_keys": len(self.history),
            "missing_events": sum(len(t) for h in self.history.values() for t in h),
            "missing_pending": len(self.pending),
        }
        out.update(self.counters)
        return out


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None
