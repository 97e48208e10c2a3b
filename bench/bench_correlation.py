"""Sigma correlation engine throughput and state size (not a test: prints figures).

The correlation fixtures of ``tests/data/correlation`` (the specification's examples: chain,
counts, temporal, aliases, values) over ~0.5 KB Windows-shaped records of which ``--hot`` (1%)
hit a referenced rule, in event-time order, packed 1000 entries a chunk: records/s when only
the step hits found by the engine's raw pre-filter are fed (``step_hits`` + ``feed``), and when
every record is fed; then live groups, state held and the JSON snapshot size after
``--keys`` distinct users each had one failed logon.

    .venv/bin/python bench/bench_correlation.py [--records 200000] [--hot 0.01] [--keys 100000]
"""

from __future__ import annotations

import argparse
import json
import random
import time
import tracemalloc
from pathlib import Path

import msgpack

from ruletag.rules.loader import load_rules
from ruletag.rules.stateful.correlation import CorrelationEngine

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "correlation"
FILES = ("chain.yml", "counts.yml", "temporal.yml", "aliases.yml", "values.yml")
T0 = 1714557600.0


def record(rng: random.Random, i: int, hot: bool) -> dict:
    rec = {
        "@timestamp": T0 + i * 0.01,
        "Channel": "Security",
        "EventID": rng.choice((4625, 4624)) if hot else rng.choice((4688, 4634, 5156)),
        "User": f"user{rng.randint(1, 20 if hot else 500)}",
        "ComputerName": f"ws-{rng.randint(1, 5 if hot else 50)}",
        "WorkstationName": f"w{rng.randint(1, 20)}",
        "Message": "an ordinary event " * 20,
    }
    return rec


def chunks(recs: list[dict], size: int = 1000) -> list[tuple[bytes, list[tuple[int, int]]]]:
    out = []
    for k in range(0, len(recs), size):
        buf = bytearray()
        spans = []
        for rec in recs[k : k + size]:
            start = len(buf)
            buf += msgpack.packb([int(rec["@timestamp"]), rec])
            spans.append((start, len(buf)))
        out.append((bytes(buf), spans))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--hot", type=float, default=0.01)
    ap.add_argument("--keys", type=int, default=100_000)
    args = ap.parse_args()
    rules = load_rules([DATA / f for f in FILES]).rules
    rng = random.Random(7)
    recs = [record(rng, i, rng.random() < args.hot) for i in range(args.records)]
    packed = chunks(recs)

    eng = CorrelationEngine.of(rules)
    assert eng is not None
    fired = 0
    t = time.perf_counter()
    for n, (buf, spans) in enumerate(packed):
        hits = eng.step_hits(buf, spans)
        for i, h in hits.items():
            fired += len(eng.feed(recs[n * 1000 + i], h))
    dt = time.perf_counter() - t
    print(f"step hits only: {args.records / dt:,.0f} records/s ({fired} results)")

    eng = CorrelationEngine.of(rules)
    assert eng is not None
    t = time.perf_counter()
    fired = sum(len(eng.feed(r)) for r in recs)
    dt = time.perf_counter() - t
    print(f"every record fed: {args.records / dt:,.0f} records/s ({fired} results)")

    eng = CorrelationEngine.of(rules)
    assert eng is not None
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for k in range(args.keys):
        eng.feed(
            {
                "@timestamp": T0 + k * 0.001,
                "Channel": "Security",
                "EventID": 4625,
                "User": f"u{k}",
                "ComputerName": f"c{k}",
                "event.id": f"e{k}",
            }
        )
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    st = eng.stats()
    snap = len(json.dumps(eng.snapshot()))
    print(
        f"{args.keys:,} users with one failed logon: {st['groups']:,} groups, {st['events']:,} "
        f"events held, {held / max(st['groups'], 1):,.0f} bytes per group, snapshot "
        f"{snap / 1e6:.1f} MB"
    )


if __name__ == "__main__":
    main()
