"""Stateful rules in the relay's filter stage (not a test: prints figures).

~1 KB records in chunks of 1000 packed entries through ``RuleFilter`` (the relay's transform)
with and without its ``StatefulStage``: the seed rules plus the sample corpus' sequence
(``sequence by process.entity_id with maxspan=30s``, 2 steps) and threshold (10 process stops
per ``host.id``) rules, or, with ``--corpus``, every rule of the given folders. About 1% of the
records hit a step (``--hit``): half open the sequence of a fresh entity, a quarter complete
one, a quarter are process stops on one of 1000 hosts. Every run starts with fresh filters
(untuned pre-filters that re-tune on the traffic, as a new relay does). Prints records/s for
both runs, the state's size (live keys, partials, threshold groups, events), the memory the
stage holds per live key or group (tracemalloc: state plus the engines' matcher caches, so an
upper bound) and the JSON checkpoint's size and snapshot time after all the records.

    .venv/bin/python bench/bench_stateful.py [--records 1000000] [--hit 0.01] [--corpus DIR...]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
import tracemalloc
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import msgpack

from ruletag.enrich.filter import RuleFilter
from ruletag.enrich.stateful import StatefulStage
from ruletag.protocol import Chunk
from ruletag.rules.loader import compile_rules

ROOT = Path(__file__).resolve().parents[1]
SEEDS = ROOT / "plugin" / "ruletag" / "data" / "rules"
SAMPLE = ROOT / "tests" / "data" / "corpus" / "elastic" / "rules"
STATEFUL = [
    SAMPLE / "macos" / "collection_sensitive_file_access_followed_by_compression.toml",
    SAMPLE / "windows" / "impact_stop_process_service_threshold.toml",
]
PAD = "lorem ipsum dolor sit amet " * 28


def _ts(n: int) -> str:
    s = n // 100  # 100 records per second of event time
    return f"2026-03-{1 + s // 86400:02d}T{s // 3600 % 24:02d}:{s // 60 % 60:02d}:{s % 60:02d}.000Z"


def records(n: int, hit: float, seed: int = 7) -> Iterator[dict[str, Any]]:
    """``n`` records (the same ones for the same arguments), generated as they are read."""
    rnd = random.Random(seed)
    open_entities: list[str] = []
    for i in range(n):
        ts = _ts(i)
        base: dict[str, Any] = {"@timestamp": ts, "event": {"id": f"r{i}"}}
        r = rnd.random()
        if r >= hit:
            base.update(
                host={"name": f"h{rnd.randrange(1000)}", "os": {"type": "linux"}},
                process={"name": "nginx", "pid": rnd.randrange(1 << 16)},
                message=PAD,
            )
        elif r < hit / 2 or not open_entities:
            ent = f"p{i}"
            open_entities.append(ent)
            base["event"].update(category=["file"], action="open")
            base.update(
                host={"os": {"type": "macos"}}, process={"entity_id": ent}, file={"name": "s.db"}
            )
        elif r < hit * 3 / 4:
            ent = open_entities.pop(rnd.randrange(len(open_entities)))
            base["event"].update(category=["file"], action="modification")
            base.update(
                host={"os": {"type": "macos"}},
                process={"entity_id": ent},
                file={"extension": "zip", "path": "/tmp/o.zip", "name": "o.zip"},
            )
        else:
            base["event"].update(category="process", type="start")
            base.update(
                host={"id": f"h{rnd.randrange(1000)}", "os": {"type": "windows"}},
                process={"name": "taskkill.exe", "args": ["/F", "/IM", "x.exe"]},
            )
        yield base


class Traffic:
    """The bench's chunks of ``per`` entries, generated afresh on each pass (so 1 M records need
    no 1 GB of memory); :func:`run` times only the filter."""

    def __init__(self, n: int, hit: float, per: int = 1000) -> None:
        self.n, self.hit, self.per = n, hit, per

    def __iter__(self) -> Iterator[Chunk]:
        part: list[bytes] = []
        for i, r in enumerate(records(self.n, self.hit)):
            part.append(msgpack.packb([1_700_000_000 + i, r]))
            if len(part) == self.per:
                yield Chunk(tag="bench", entries=b"".join(part), count=len(part))
                part = []
        if part:
            yield Chunk(tag="bench", entries=b"".join(part), count=len(part))


def run(f: RuleFilter, cs: Iterable[Chunk]) -> float:
    spent = 0.0
    for c in cs:
        start = time.perf_counter()
        f(c)
        spent += time.perf_counter() - start
    return spent


def per_key_bytes(stage: StatefulStage, make: Any, keys: int = 20_000) -> float:
    """Traced bytes the stage holds per key after ``keys`` records of distinct keys."""
    warm = [make(i, f"warm{i}") for i in range(1000)]  # allocate the matchers' caches first
    data = b"".join(msgpack.packb([1_700_000_000, r]) for r in warm)
    f = RuleFilter(compile_rules([str(SEEDS)])[0], stateful=stage)
    f(Chunk(tag="bench", entries=data, count=len(warm)))
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for lo in range(0, keys, 1000):
        part = [make(i, f"k{i}") for i in range(lo, lo + 1000)]
        data = b"".join(msgpack.packb([1_700_000_000, r]) for r in part)
        f(Chunk(tag="bench", entries=data, count=len(part)))
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return (after - before) / keys


def _open(i: int, key: str) -> dict[str, Any]:
    return {
        "@timestamp": "2026-03-01T10:00:00.000Z",
        "event": {"id": f"o{i}", "category": ["file"], "action": "open"},
        "host": {"os": {"type": "macos"}},
        "process": {"entity_id": key},
        "file": {"name": "s.db"},
    }


def _stop(i: int, key: str) -> dict[str, Any]:
    return {
        "@timestamp": "2026-03-01T10:00:00.000Z",
        "event": {"id": f"s{i}", "category": "process", "type": "start"},
        "host": {"id": key, "os": {"type": "windows"}},
        "process": {"name": "taskkill.exe", "args": ["/F", "/IM", "x.exe"]},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--hit", type=float, default=0.01, help="share of records hitting a step")
    ap.add_argument("--corpus", nargs="*", default=None, help="rule folders instead of sample")
    ns = ap.parse_args()
    paths = [str(p) for p in (ns.corpus or [SEEDS, *STATEFUL])]
    t0 = time.perf_counter()
    table, result = compile_rules(paths)
    kinds: dict[str, int] = {}
    for r in result.rules:
        kinds[r.kind] = kinds.get(r.kind, 0) + 1
    print(f"rules: {kinds} (compiled/loaded in {time.perf_counter() - t0:.1f} s)")
    cs = Traffic(ns.records, ns.hit)
    mb = sum(len(c.entries) for c in cs) / 1e6
    print(f"traffic: {ns.records} records, {mb:.0f} MB, {ns.hit:.1%} hitting a step")

    steps = Path(tempfile.mkdtemp(prefix="bench-steps-"))  # the step-table cache, empty

    def fresh() -> StatefulStage:
        stage = StatefulStage.of(table.rules, table.fieldmap, steps)
        assert stage is not None
        return stage

    t0 = time.perf_counter()
    fresh()
    t1 = time.perf_counter()
    fresh()
    print(
        f"stateful engines built in {t1 - t0:.2f} s "
        f"(step tables compiled), {time.perf_counter() - t1:.2f} s (read from the step cache)"
    )
    n = ns.records
    t_plain, t_state = float("inf"), float("inf")
    for _ in range(2):  # interleaved, best of two: the machine is shared
        # fresh filters and engines each pass: every pre-filter (the main table's and the
        # engines' step tables') starts untuned and re-tunes on the traffic, as in a new relay
        t_plain = min(t_plain, run(RuleFilter(table), cs))
        t_state = min(t_state, run(RuleFilter(table, stateful=fresh()), cs))
    print(f"without stateful rules: {n / t_plain:>10,.0f} records/s")
    print(f"with stateful rules:    {n / t_state:>10,.0f} records/s (x{t_plain / t_state:.2f})")
    print(f"stateful cost per record: {(t_state - t_plain) / n * 1e6:.2f} µs")
    stage = fresh()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    run(RuleFilter(table, stateful=stage), cs)  # once more, traced, for the memory figure
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    stats = stage.stats()
    print(f"state after {n} records: {json.dumps(stats)}")
    seq = stats.get("sequence", {})
    th = stats.get("threshold", {})
    live = seq.get("keys", 0) + th.get("groups", 0)
    if live:
        print(
            f"memory held by the stage: {(after - before) / 1e6:.2f} MB traced, "
            f"{(after - before) / live:,.0f} bytes per live key/group "
            f"({seq.get('keys', 0)} sequence keys, {th.get('groups', 0)} threshold groups, "
            f"{th.get('events', 0)} threshold events)"
        )
    for what, make in (("sequence partial (1 per key)", _open), ("threshold group", _stop)):
        st = fresh()
        b = per_key_bytes(st, make)
        print(f"memory per live {what}: {b:,.0f} bytes (20,000 distinct keys, tracemalloc)")
        t0 = time.perf_counter()
        snap = st.snapshot()
        t_snap = time.perf_counter() - t0
        blob = json.dumps(snap, separators=(",", ":")).encode()
        print(
            f"  checkpoint with those 21,000 keys: {len(blob):,} bytes JSON, "
            f"snapshot on the event loop {t_snap * 1000:.1f} ms"
        )
    t0 = time.perf_counter()
    snap = stage.snapshot()
    t_snap = time.perf_counter() - t0
    blob = json.dumps(snap, separators=(",", ":")).encode()
    print(
        f"checkpoint after {n} records: {len(blob):,} bytes JSON "
        f"(snapshot on the event loop: {t_snap * 1000:.1f} ms)"
    )


if __name__ == "__main__":
    main()
