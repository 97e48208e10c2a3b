"""Cost of the Elastic new_terms engine (not a test: prints figures).

Loads every new_terms rule under ``--rules`` into one :class:`NewTermsEngine` (learning off),
then runs ``--records`` records through it the way ``ruletag match`` does: packed in batches of
4096 ``[time, record]`` entries, the engine's :meth:`step_hits` (raw pre-filter over its own
condition table) over each batch, and :meth:`feed` for the records that hit. Background
traffic is ``gen_traffic``'s ECS process/network, Sysmon and syslog records; ``--hit-fraction``
of the records (default 1%) are Linux ``getconf`` process starts (they hit "Linux System
Information Discovery via Getconf") whose parent executable is one of ``--distinct`` values,
so the rule's store grows to that many combinations. Event time advances 10 ms per record.

Prints: engine build time; records/s through step_hits + feed, split between the two (the
step_hits share is the project's matcher over this traffic), and the packing alone; the
engine's counters; live combinations and the memory they take (``tracemalloc`` over a second,
untimed feeding, per combination); the snapshot size as JSON.

    .venv/bin/python bench/bench_newterms.py --rules ../shared/rules/elastic [--records 200000]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gen_traffic
from ruletag.rules.loader import load_rules
from ruletag.rules.stateful.newterms import NewTermsEngine
from ruletag.rules.stateful.threshold import iso_time

T0 = 1_714_564_800.0  # 2024-05-01T12:00:00Z
BATCH = 4096


def hit_record(rnd: random.Random, seq: int, distinct: int) -> dict[str, Any]:
    """A Linux getconf process start with one of ``distinct`` parent executables."""
    host = f"{rnd.randrange(50):04x}"
    return {
        "event": {"category": ["process"], "type": ["start"], "action": "exec", "id": str(seq)},
        "host": {"id": host, "os": {"type": "linux"}},
        "process": {
            "name": "getconf",
            "executable": "/usr/bin/getconf",
            "args": ["getconf", "PAGESIZE"],
            "parent": {"executable": f"/opt/app{rnd.randrange(distinct)}/bin/run"},
        },
    }


def records(n: int, hit_fraction: float, distinct: int, seed: int = 1) -> list[dict[str, Any]]:
    rnd = random.Random(seed)
    kinds = (
        gen_traffic.ecs_process,
        gen_traffic.ecs_network,
        gen_traffic.sysmon_process,
        gen_traffic.linux_syslog,
    )
    out = []
    for seq in range(n):
        rec = (
            hit_record(rnd, seq, distinct)
            if rnd.random() < hit_fraction
            else rnd.choice(kinds)(rnd, seq)
        )
        rec["@timestamp"] = iso_time(T0 + seq * 0.01)
        out.append(rec)
    return out


def batches(recs: list[dict[str, Any]]) -> list[tuple[list[dict[str, Any]], bytes, list]]:
    """The records in batches, each packed as ``match`` packs them."""
    pack = msgpack.Packer(use_bin_type=True).pack
    out = []
    for i in range(0, len(recs), BATCH):
        chunk = recs[i : i + BATCH]
        parts = [pack([0, r]) for r in chunk]
        spans, pos = [], 0
        for p in parts:
            spans.append((pos, pos + len(p)))
            pos += len(p)
        out.append((chunk, b"".join(parts), spans))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rules", default="../shared/rules/elastic", help="Elastic rule folder")
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--hit-fraction", type=float, default=0.01)
    ap.add_argument("--distinct", type=int, default=5_000, help="parent executables in hits")
    ns = ap.parse_args(argv)

    result = load_rules([ns.rules])
    rules = [r for r in result.rules if r.kind == "new_terms"]
    t0 = time.perf_counter()
    engine = NewTermsEngine(rules, learn=0.0)
    build_s = time.perf_counter() - t0
    print(f"new_terms rules: {len(rules)}; engine built in {build_s:.2f} s")

    recs = records(ns.records, ns.hit_fraction, ns.distinct)
    t0 = time.perf_counter()
    packed = batches(recs)
    pack_s = time.perf_counter() - t0

    fed = fired = 0
    step_s = feed_s = 0.0
    clock = time.perf_counter
    for chunk, buf, spans in packed:
        t0 = clock()
        hits = engine.step_hits(buf, spans)
        t1 = clock()
        for i, h in hits.items():
            fed += 1
            fired += len(engine.feed(chunk[i], h))
        step_s += t1 - t0
        feed_s += clock() - t1
    run_s = step_s + feed_s

    # memory: a second engine fed the same hits under tracemalloc (not timed)
    again = NewTermsEngine(rules, learn=0.0)
    tracemalloc.start()
    base_mem = tracemalloc.get_traced_memory()[0]
    for chunk, buf, spans in packed:
        for i, h in engine.step_hits(buf, spans).items():
            again.feed(chunk[i], h)
    mem = tracemalloc.get_traced_memory()[0] - base_mem
    tracemalloc.stop()

    stats = engine.stats()
    n = len(recs)
    print(f"records: {n:,}; fed (hit a condition): {fed:,}; results: {fired:,}")
    print(
        f"step_hits + feed: {run_s:.2f} s = {n / run_s:,.0f} records/s "
        f"({run_s / n * 1e6:.2f} us/record); packing alone: {n / pack_s:,.0f} records/s"
    )
    print(
        f"  of which step_hits {step_s:.2f} s, feed {feed_s:.3f} s "
        f"({feed_s / max(fed, 1) * 1e6:.1f} us per record fed)"
    )
    print(f"counters: {json.dumps(stats, sort_keys=True)}")
    terms = stats["terms"]
    if terms:
        print(f"live combinations: {terms:,}; memory while feeding: {mem / terms:,.0f} B each")
    snap = json.dumps(engine.snapshot())
    print(f"snapshot: {len(snap):,} bytes of JSON ({len(snap) / max(terms, 1):,.0f} B/term)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
