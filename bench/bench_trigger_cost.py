"""The tuner's per-pattern scan charge, on and off, on one tuning sample (prints figures).

Loads (or compiles) a rule set and lets its pre-filter tune itself on the first
``--tune-after`` records of a ``bench/gen_traffic.py`` traffic file (as ``why_decoded.py``).
Then it re-tunes the compiled filter on that same sample twice, once with
``prefilter.TRIGGER_SCAN`` as shipped and once with it at 0 (the tuner before it), and runs
the rest of the traffic through both filters in alternation: per round, the trigger pattern
count, ``RawMatcher.candidates`` and the bare trigger scan in µs per record, and the share of
records decoded.

    .venv/bin/python bench/bench_trigger_cost.py --rules ../shared/rules
"""

from __future__ import annotations

import argparse
import time

from ruletag.rules.compiler import prefilter
from ruletag.rules.compiler.prefilter import RawFilter
from ruletag.rules.matcher.prefilter import RawMatcher
from why_decoded import tuned_args, tuned_matcher


def timed(filt: RawFilter, chunks: list) -> tuple[float, float, float]:
    """µs per record for candidates and for the bare trigger scan, and the share decoded."""
    n = sum(len(spans) for _, spans, _ in chunks)
    rm = RawMatcher(filt, tune_after=0)
    t0 = time.perf_counter()
    decoded = sum(len(rm.candidates(e, s)) for e, s, _ in chunks)
    t1 = time.perf_counter()
    for e, _, _ in chunks:
        filt.trigger_db.scan(e, None)
    t2 = time.perf_counter()
    return (t1 - t0) / n * 1e6, (t2 - t1) / n * 1e6, decoded / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    tuned_args(ap)
    ap.add_argument("--rounds", type=int, default=4)
    ns = ap.parse_args()
    matcher, rest = tuned_matcher(ns)
    sample, compiled = matcher._sample, matcher.table.raw
    if sample is None or compiled is None:
        raise SystemExit("no tuning sample (too little traffic?) or no pre-filter")
    counts, passes, n, sets = sample
    charge = prefilter.TRIGGER_SCAN
    filters = {}
    for name, c in (("charged", charge), ("uncharged", 0.0)):
        prefilter.TRIGGER_SCAN = c
        filters[name] = prefilter.retune(compiled, counts, n, passes, sets)
    prefilter.TRIGGER_SCAN = charge
    print(f"tuned on {n} records; TRIGGER_SCAN = {charge:g}")
    for name, f in filters.items():
        print(f"{name}: {len(f.trig_rules) - 1} trigger patterns")
    for r in range(ns.rounds):
        for name, f in filters.items():
            cand, scan, share = timed(f, rest)
            print(
                f"round {r + 1} {name}: candidates {cand:.2f} µs, "
                f"bare trigger scan {scan:.2f} µs, decoded {share:.1%}",
                flush=True,
            )


if __name__ == "__main__":
    main()
