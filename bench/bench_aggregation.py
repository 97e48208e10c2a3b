"""Cost of the aggregating ES|QL engine (not a test: prints figures).

1. Loads every aggregating ES|QL rule of ``--rules`` (an Elastic rules folder) and prints how
   many load and the build time of their engine.
2. Feeds the GKE failure-burst rule (``tests/data/corpus``) ``--records`` records that all hit
   its base condition, spread over ``--groups`` groups (one user each), and prints records/s,
   the live state, the bytes allocated per live group (``tracemalloc``) and the size of the
   JSON snapshot.
3. ``ruletag match``'s path: the engine's raw pre-filter over 100,000 packed entries of which 1%
   hit, and feeding the hits (every aggregating rule of ``--rules`` loaded).
4. Repeats 2 with all records in one group of growing size: the engine recomputes a group's
   aggregates from the records it holds on every hit, so the cost per record grows with the
   group (bounded by ``max_events``).

    .venv/bin/python bench/bench_aggregation.py --rules ../shared/rules/elastic
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import msgpack

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "plugin"))

from ruletag.errors import RuleError  # noqa: E402
from ruletag.rules.elastic import load_elastic_file  # noqa: E402
from ruletag.rules.esql_stats import parse_esql_aggregation  # noqa: E402
from ruletag.rules.ir import Const, Rule  # noqa: E402
from ruletag.rules.stateful.aggregation import AggregationEngine  # noqa: E402

GKE = REPO / "tests/data/corpus/elastic/rules/integrations/gcp"
GKE_RULE = GKE / "discovery_gcp_gke_api_request_failure_burst.toml"


def record(n: int, user: int, second: float) -> dict[str, Any]:
    minute, sec = divmod(second, 60)
    hour, minute = divmod(int(minute), 60)
    return {
        "@timestamp": f"2026-03-01T{10 + hour:02d}:{minute:02d}:{sec:06.3f}Z",
        "event": {"outcome": "failure", "type": "denied", "action": f"a{n % 7}"},
        "data_stream": {"dataset": "gcp.audit", "namespace": "default"},
        "service": {"name": "k8s.io"},
        "user": {"email": f"u{user}@x"},
        "source": {"ip": "10.0.0.9"},
        "user_agent": {"original": "kubectl"},
        "orchestrator": {"resource": {"name": f"pod{n % 50}"}},
    }


def load_all(folder: Path) -> None:
    rules = []
    t0 = time.perf_counter()
    for path in sorted(folder.rglob("*.toml")):
        if "_deprecated" in path.parts:
            continue
        try:
            rules.extend(r for r in load_elastic_file(path) if r.kind == "aggregation")
        except RuleError:
            continue
    t1 = time.perf_counter()
    engine = AggregationEngine.of(rules)
    t2 = time.perf_counter()
    n = len(engine.rules) if engine is not None else 0
    print(f"aggregating rules loaded: {n} (load {t1 - t0:.2f} s, engine build {t2 - t1:.2f} s)")


def spread(records: int, groups: int) -> None:
    (rule,) = load_elastic_file(GKE_RULE)
    batch = [record(n, n % groups, n * 0.01) for n in range(records)]
    engine = AggregationEngine([rule])
    t0 = time.perf_counter()
    fired = sum(len(engine.feed(r)) for r in batch)
    dt = time.perf_counter() - t0
    # the same run again under tracemalloc (slower) for the memory the state holds
    engine = AggregationEngine([rule])
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for r in batch:
        engine.feed(r)
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    st = engine.stats()
    size = len(json.dumps(engine.snapshot()))
    print(
        f"{records} hits over {groups} groups: {records / dt:,.0f} records/s, {fired} alerts,"
        f" live groups {st['groups']}, records held {st['events']},"
        f" {held / max(st['groups'], 1):,.0f} B per live group, snapshot {size:,} B"
    )


def one_group(size: int) -> None:
    query = (
        'from l | where user.email like "u*" | stats n = count(*),'
        " d = count_distinct(event.action),"
        " v = values(orchestrator.resource.name) by user.email | where n > 1000000000"
    )
    agg = parse_esql_aggregation(query)
    assert agg is not None
    rule = Rule(
        id="grow",
        name="grow",
        source="elastic",
        condition=Const(False),
        kind="aggregation",
        aggregation=dataclasses.replace(agg, window=3600.0),
    )
    engine = AggregationEngine([rule])
    batch = [record(n, 0, n * 0.001) for n in range(size)]  # never fires: the group grows
    t0 = time.perf_counter()
    for r in batch:
        engine.feed(r)
    dt = time.perf_counter() - t0
    print(f"one group growing to {size} records: {size / dt:,.0f} records/s")


def other(n: int, rnd: random.Random) -> dict[str, Any]:
    """A process-start record that no aggregating rule of the sample counts."""
    return {
        "@timestamp": f"2026-03-01T10:{(n // 60) % 60:02d}:{n % 60:02d}.000Z",
        "event": {"category": ["process"], "type": ["start"], "action": "exec"},
        "host": {"name": f"h{rnd.randrange(50)}", "os": {"type": "linux"}},
        "process": {"name": rnd.choice(["ls", "cat", "sshd", "python3"]), "pid": n},
        "user": {"name": f"u{rnd.randrange(20)}"},
    }


def step_hit_path(folder: Path | None, records: int) -> None:
    """``ruletag match``'s path: the engine's raw pre-filter over packed ``[time, record]``
    entries (1% of them hit the GKE rule), then :meth:`feed` for the hits only."""
    rules = []
    if folder is not None:
        for path in sorted(folder.rglob("*.toml")):
            if "_deprecated" in path.parts:
                continue
            try:
                rules.extend(r for r in load_elastic_file(path) if r.kind == "aggregation")
            except RuleError:
                continue
    if not any(r.name == "GKE API Request Failure Burst by User" for r in rules):
        rules.extend(load_elastic_file(GKE_RULE))
    engine = AggregationEngine(rules)
    rnd = random.Random(3)
    batch = [
        record(n, n % 100, n * 0.01) if rnd.random() < 0.01 else other(n, rnd)
        for n in range(records)
    ]
    pack = msgpack.Packer(use_bin_type=True).pack
    parts = [pack([0, r]) for r in batch]
    spans, pos = [], 0
    for p in parts:
        spans.append((pos, pos + len(p)))
        pos += len(p)
    buf = b"".join(parts)
    t0 = time.perf_counter()
    hits = engine.step_hits(buf, spans)
    t1 = time.perf_counter()
    fired = sum(len(engine.feed(batch[i], got)) for i, got in hits.items())
    t2 = time.perf_counter()
    print(
        f"{len(engine.rules)} aggregating rules, {records} records (1% hit the GKE rule):"
        f" pre-filter {records / (t1 - t0):,.0f} records/s, {len(hits)} records fed,"
        f" feeding {(t2 - t1) * 1e3:,.0f} ms, overall {records / (t2 - t0):,.0f} records/s,"
        f" {fired} alerts"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rules", type=Path, default=None, help="Elastic rules folder")
    ap.add_argument("--records", type=int, default=50_000)
    ap.add_argument("--groups", type=int, default=1_000)
    ns = ap.parse_args()
    if ns.rules is not None:
        load_all(ns.rules)
    step_hit_path(ns.rules, 100_000)
    spread(ns.records, ns.groups)
    for size in (100, 1_000, 5_000):
        one_group(size)


if __name__ == "__main__":
    main()
