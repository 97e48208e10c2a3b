"""Cost of the aggregating ES|QL engine (not a test: prints figures).

1. Loads every aggregating ES|QL rule of ``--rules`` (an Elastic rules folder) and prints how
   many load and the build time of their engine.
2. Feeds the GKE failure-burst rule (``tests/data/corpus``) ``--records`` records that all hit
   its base condition, spread over ``--groups`` groups (one user each), and prints records/s,
   the live state, the bytes allocated per live group (``tracemalloc``) and the size of the
   JSON snapshot.
3. Repeats 2 with all records in one group of growing size: the engine recomputes a group's
   aggregates from the records it holds on every hit, so the cost per record grows with the
   group (bounded by ``max_events``).

    .venv/bin/python bench/bench_aggregation.py --rules ../shared/rules/elastic
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

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
        "from l | stats n = count(*), d = count_distinct(event.action),"
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rules", type=Path, default=None, help="Elastic rules folder")
    ap.add_argument("--records", type=int, default=50_000)
    ap.add_argument("--groups", type=int, default=1_000)
    ns = ap.parse_args()
    if ns.rules is not None:
        load_all(ns.rules)
    spread(ns.records, ns.groups)
    for size in (100, 1_000, 5_000):
        one_group(size)


if __name__ == "__main__":
    main()
