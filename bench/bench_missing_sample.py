"""Throughput and state of EQL missing-event sequences and samples (not a test: prints figures).

Loads the EQL sequence rules with missing events ``![...]`` and the ``sample`` rules of the
given rule folders (default: the pinned corpus sample in tests/data/corpus, which holds one of
each), builds their engines, and feeds them synthetic ECS records in event-time order (10 ms
apart, ``--hosts`` hosts) the way ``ruletag match`` does: batches of 4096 packed entries, the
engines' raw pre-filter (``step_hits``), ``feed`` for the records that hit a step and
``observe`` for the others while sequences wait for the watermark. ``--alerts`` of the records
are Elastic Defend alerts (the missing-events rule's positive step), ``--telemetry`` process
events (its missing clause), ``--sample`` auditd mprotect/network pairs (the sample rule).
Prints records/s with and without the engines, detections, and the engines' state.

    .venv/bin/python bench/bench_missing_sample.py [--records 200000] [--rules DIR...]
    .venv/bin/python bench/bench_missing_sample.py --rules ../shared/rules/elastic
"""

from __future__ import annotations

import argparse
import random
import time
import tracemalloc
from pathlib import Path
from typing import Any

import msgpack

from ruletag.rules.loader import load_rules
from ruletag.rules.stateful import Clocked, Engine, stateful_engines

SAMPLE_RULES = Path(__file__).resolve().parents[1] / "tests" / "data" / "corpus" / "elastic"
BATCH = 4096


def records(n: int, hosts: int, alerts: float, telemetry: float, sample: float) -> list[Any]:
    rnd = random.Random(7)
    out: list[Any] = []
    t0 = 1_767_225_600.0
    for i in range(n):
        ts = t0 + i * 0.01
        host = f"host-{rnd.randrange(hosts)}"
        r = rnd.random()
        rec: dict[str, Any] = {
            "@timestamp": ts,
            "host": {"id": host, "os": {"type": "linux"}},
            "event": {"id": f"e{i}", "category": ["web"]},
            "message": "x" * 200,
        }
        if r < alerts:
            rec["data_stream"] = {"dataset": "endpoint.alerts"}
        elif r < alerts + telemetry:
            rec["event"]["category"] = ["process"]
        elif r < alerts + telemetry + sample:
            rec["process"] = {"pid": rnd.randrange(100), "name": "payload"}
            if rnd.random() < 0.5:
                rec["auditd"] = {"data": {"syscall": "mprotect", "a2": "7"}}
                rec["event"]["category"] = ["process"]
            else:
                rec["event"].update(
                    category=["network"], type=["start"], action="connection_attempted"
                )
                rec["destination"] = {"ip": "203.0.113.9"}
        out.append(rec)
    return out


def run(engines: list[Engine], recs: list[Any]) -> tuple[float, int, list[dict[str, int]]]:
    """Seconds taken, detections, and the engines' stats before the end-of-input flush."""
    pack = msgpack.Packer(use_bin_type=True).pack
    clocked = [e if isinstance(e, Clocked) else None for e in engines]
    found = 0
    start = time.perf_counter()
    for b in range(0, len(recs), BATCH):
        batch = recs[b : b + BATCH]
        parts = [pack([0, r]) for r in batch]
        spans, pos = [], 0
        for p in parts:
            spans.append((pos, pos + len(p)))
            pos += len(p)
        buf = b"".join(parts)
        hits = [e.step_hits(buf, spans) for e in engines]
        for i, rec in enumerate(batch):
            for e, h, c in zip(engines, hits, clocked, strict=True):
                if h is not None and i in h:
                    found += len(e.feed(rec, h[i]))
                elif h is None:
                    found += len(e.feed(rec))
                elif c is not None and c.pending():
                    found += len(c.observe(rec))
    live = [e.stats() for e in engines]
    for c in clocked:
        if c is not None:
            found += len(c.flush())
    return time.perf_counter() - start, found, live


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--hosts", type=int, default=1000)
    ap.add_argument("--alerts", type=float, default=0.001)
    ap.add_argument("--telemetry", type=float, default=0.05)
    ap.add_argument("--sample", type=float, default=0.004)
    ap.add_argument("--rules", nargs="+", default=[str(SAMPLE_RULES)])
    ns = ap.parse_args()
    result = load_rules([Path(p) for p in ns.rules])
    chosen = [
        r
        for r in result.rules
        if r.kind == "sample" or (r.kind == "sequence" and r.sequence and r.sequence.missing)
    ]
    print(
        f"rules: {sum(r.kind == 'sequence' for r in chosen)} missing-event sequences, "
        f"{sum(r.kind == 'sample' for r in chosen)} samples"
    )
    recs = records(ns.records, ns.hosts, ns.alerts, ns.telemetry, ns.sample)
    base, _, _ = run([], recs)
    print(f"baseline (pack only): {len(recs) / base:,.0f} records/s")
    tracemalloc.start()
    engines = stateful_engines(chosen)
    before = tracemalloc.get_traced_memory()[0]
    took, found, live = run(engines, recs)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    print(f"with engines: {len(recs) / took:,.0f} records/s ({took:.2f} s), {found} detections")
    for e, stats in zip(engines, live, strict=True):
        print(f"  {e.kind} (before the end-of-input flush): {stats}")
    print(f"engine state after the run (traced, flushed): {(after - before) / 1024:,.0f} KiB")


if __name__ == "__main__":
    main()
