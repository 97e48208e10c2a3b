"""Sampled per-rule evaluation cost, for ``ruletag rules stats``.

The compiled table matches all rules at once (shared literal scans, one pre-filter), so a rule
has no cost of its own on the hot path. This module estimates one off it: for 1 chunk in
``every``, the chunk's first record is handed to a worker thread, which evaluates each rule of
the live table on it with the reference evaluator (logsource condition included, a fresh
field view per rule) and adds the time taken to that rule's total. A rule that is expensive
for the reference walk (many leaves, regexes, wide keyword searches, logsources that match
everything) is expensive for the table too, so the ranking says which rules to look at first;
the absolute figures are reference-evaluator time, not table time.

The relay's transform is wrapped only when sampling is on (``metrics.rule_cost_sample: N``
in the config, N >= 1); when it is off nothing is wrapped and the hot path is unchanged. With
it on, the filter path pays a counter increment per chunk, plus a first-entry decode and a
queue put on sampled chunks; the evaluation runs in the worker, and a sample arriving while the
worker is busy is dropped rather than queued. The worker still shares the GIL with the event
loop (it yields it between rules), and a sample walks every rule in Python: on large rule sets
keep N large (hundreds or thousands of chunks).

Exported (on the relay's ``/metrics``): ``ruletag_rule_eval_seconds_total{rule_id}`` and
``ruletag_rule_eval_samples_total`` (records evaluated); their ratio is a rule's mean
reference-evaluation time per record.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import msgpack
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from ruletag.protocol import Chunk, iter_entries
from ruletag.rules.fields import FieldMap
from ruletag.rules.ir import Node, Rule
from ruletag.rules.reference import evaluate, rule_condition

log = logging.getLogger(__name__)

Transform = Callable[[Chunk], list[Chunk]]


class RuleCostSampler:
    """Wraps a transform; samples records and times each rule on them (see the module doc)."""

    def __init__(
        self, rules: Callable[[], list[Rule]], every: int, fieldmap: FieldMap | None = None
    ) -> None:
        self.rules = rules  # the live table's rules, read at evaluation time
        self.every = max(1, every)
        self.fieldmap = fieldmap or FieldMap.default()
        self.seconds: dict[str, float] = {}
        self.samples = 0
        self.dropped = 0
        self._count = 0
        self._queue: queue.Queue[Mapping[str, object] | None] = queue.Queue(maxsize=1)
        self._conditions: dict[int, tuple[Rule, Node]] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="rule-cost", daemon=True)
        self._thread.start()

    def wrap(self, transform: Transform) -> Transform:
        def sampled(chunk: Chunk) -> list[Chunk]:
            out = transform(chunk)
            self._count += 1
            if self._count >= self.every and chunk.signal == 0 and chunk.entries:
                self._count = 0
                self._offer(chunk)
            return out

        return sampled

    def _offer(self, chunk: Chunk) -> None:
        try:
            spans = chunk.spans if chunk.spans is not None else iter_entries(chunk.entries)
            start, end = spans[0]
            entry = msgpack.unpackb(
                chunk.entries[start:end],
                raw=False,
                unicode_errors="surrogateescape",
                strict_map_key=False,
            )
            record = entry[1] if isinstance(entry, list | tuple) and len(entry) == 2 else None
        except Exception:  # a sample is best effort: never disturb the filter
            return
        if not isinstance(record, dict):
            return
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1

    def _condition(self, rule: Rule) -> Node:
        got = self._conditions.get(id(rule))
        if got is None or got[0] is not rule:
            got = (rule, rule_condition(rule, self.fieldmap))
            self._conditions[id(rule)] = got
        return got[1]

    def measure(self, record: Mapping[str, object]) -> None:
        """Time every live rule on ``record`` and add the times (also used by tests)."""
        rules = self.rules()
        if len(self._conditions) > 4 * max(len(rules), 1024):  # rule sets replaced by reloads
            self._conditions.clear()
        clock = time.perf_counter
        times: list[tuple[str, float]] = []
        for n, rule in enumerate(rules):
            if n % 64 == 63:
                # let the event loop take the GIL between rules, not only at the
                # interpreter's switch interval
                time.sleep(0)
            cond = self._condition(rule)
            t0 = clock()
            try:
                evaluate(cond, self.fieldmap.view(record))
            except Exception:
                pass
            times.append((rule.id, clock() - t0))
        with self._lock:
            for rid, t in times:
                self.seconds[rid] = self.seconds.get(rid, 0.0) + t
            self.samples += 1

    def _work(self) -> None:
        while True:
            record = self._queue.get()
            if record is None:
                return
            try:
                self.measure(record)
            except Exception:
                log.debug("rule cost sample failed", exc_info=True)

    def close(self) -> None:
        """Stop the worker (a sample in progress finishes first)."""
        try:
            self._queue.put(None, timeout=1.0)
        except queue.Full:
            return
        self._thread.join(timeout=5.0)

    def snapshot(self) -> tuple[int, dict[str, float]]:
        with self._lock:
            return self.samples, dict(self.seconds)


class RuleCostCollector(Collector):
    """Exports a sampler's totals at scrape time."""

    def __init__(self, sampler: RuleCostSampler) -> None:
        self.sampler = sampler

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        samples, seconds = self.sampler.snapshot()
        yield CounterMetricFamily(
            "ruletag_rule_eval_samples",
            "Records sampled for per-rule cost (metrics.rule_cost_sample).",
            value=samples,
        )
        fam = CounterMetricFamily(
            "ruletag_rule_eval_seconds",
            "Reference-evaluator time per rule on the sampled records.",
            labels=["rule_id"],
        )
        for rid, t in sorted(seconds.items()):
            fam.add_metric([rid], t)
        yield fam


def install(
    live: Any, registry: Any, transform: Transform, every: int
) -> tuple[Transform, RuleCostSampler | None]:
    """The relay's hook: ``(transform, sampler)``, wrapped and exported only when ``every``
    (``metrics.rule_cost_sample``) is 1 or more."""
    if every <= 0:
        return transform, None

    def rules() -> list[Rule]:
        f = live.filter
        return list(f.table.rules) if f is not None else []

    sampler = RuleCostSampler(rules, every)
    registry.register(RuleCostCollector(sampler))
    log.info("rule cost sampling on: 1 chunk in %d (metrics.rule_cost_sample)", every)
    return sampler.wrap(transform), sampler
