"""Pre-filter drift: tune on part of the traffic's sources, then run the whole mix (prints figures).

The pre-filter tunes on the first records it sees. When those hold only some of the sources
(a backlog of one input replayed first, a quiet hour), the triggers it picks for the rules of
the other sources may fire on nearly every record of those sources. This loads a rule set,
tunes two matchers on the chunks of ``--tune-sources`` only, then runs the whole traffic
``--rounds`` times through each and prints per round the time per record: one matcher with
drift re-tuning off (as before), one with it on (``Matcher.DRIFT``), and, for reference, a
matcher tuned on the mix itself.

    .venv/bin/python bench/gen_traffic.py          # once: /tmp/ruletag-bench/traffic.bin
    .venv/bin/python bench/bench_prefilter_drift.py --rules ../shared/rules
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from ruletag.rules.loader import compile_rules
from ruletag.rules.matcher import Matcher
from why_decoded import read_chunks, tune

#: the sources the first tuning sees by default: the first chunks of the bench traffic
PART = "windows.sysmon.process,linux.auth,web.access,linux.audit"


def run(matcher: Matcher, chunks: list, rounds: int) -> list[float]:
    """µs per record of ``match_entries`` over the whole traffic, per round."""
    out = []
    for _ in range(rounds):
        n, t0 = 0, time.perf_counter()
        for entries, spans, _tag in chunks:
            matcher.match_entries(entries, spans)
            n += len(spans)
        out.append((time.perf_counter() - t0) / n * 1e6)
        time.sleep(0.5)  # let a background rebuild finish between rounds, as idle time would
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rules", nargs="+", required=True, help="rule files or folders")
    ap.add_argument("--traffic", default="/tmp/ruletag-bench/traffic.bin")
    ap.add_argument("--cache-dir", help="rule table cache (default: the user cache)")
    ap.add_argument("--tune-after", type=int, default=20_000)
    ap.add_argument("--tune-sources", default=PART, help="comma-separated chunk tags")
    ap.add_argument("--rounds", type=int, default=5, help="passes over the whole traffic")
    ns = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="  log: %(message)s")
    logging.getLogger("ruletag.rules.loader").setLevel(logging.WARNING)
    table, result = compile_rules(ns.rules, cache_dir=Path(ns.cache_dir) if ns.cache_dir else None)
    chunks = read_chunks(Path(ns.traffic))
    part = [c for c in chunks if c[2] in set(ns.tune_sources.split(","))]
    records = sum(len(c[1]) for c in chunks)
    print(
        f"{len(result.rules)} rules; traffic {records} records in {len(chunks)} chunks; "
        f"first tuning on {ns.tune_sources} ({sum(len(c[1]) for c in part)} records)"
    )
    rows = []
    for name, sample, drift in (
        ("tuned on part, drift off", part, float("inf")),
        ("tuned on part, drift on", part, Matcher.DRIFT),
        ("tuned on the mix", chunks, Matcher.DRIFT),
    ):
        print(f"[{name}]")
        m = Matcher(table)
        m.DRIFT = drift
        tune(
            m,
            sample * (1 + ns.tune_after // max(1, sum(len(c[1]) for c in sample))),
            ns.tune_after,
            timeout=300.0,
        )
        per = run(m, chunks, ns.rounds)
        rows.append((name, per, m.stats))
    print()
    print(
        "| matcher | "
        + " | ".join(f"round {i + 1} µs/rec" for i in range(ns.rounds))
        + " | re-tunings | tuned on | drift (last window) | often-passed rules |"
    )
    print("| --- |" + " ---: |" * (ns.rounds + 4))
    for name, per, st in rows:
        print(
            f"| {name} | "
            + " | ".join(f"{x:.1f}" for x in per)
            + f" | {st.get('raw_retunes', 0)} | {st.get('raw_tuned_on_records')} | "
            f"{st.get('raw_drift')} | {st.get('hot_rules')} |"
        )


if __name__ == "__main__":
    main()
