"""``Matcher.match_entries`` µs/record over a tuned matcher, pass after pass (prints figures).

Loads (or compiles, through the rule cache) a rule set, lets the pre-filter re-tune itself on
the first ``--tune-after`` records of a traffic file written by ``bench/gen_traffic.py`` (as
``bench/why_decoded.py`` does), then times ``--passes`` passes over the following chunks and
prints each pass and their median. On a shared machine single passes wander; to compare two
versions, run this alternately from both checkouts (each with its own C helpers built) and
compare medians and best passes.

    .venv/bin/python bench/bench_passes.py --rules ../shared/rules --traffic <work>/traffic.bin

The matcher caches what each field value hits (per field group, up to 65,536 values). Passes
over the same records hit that cache for every value; real logs keep bringing values never
seen (command lines with ids and paths). ``--fresh-values`` empties the caches before each
pass, so every distinct value of the pass is scanned once: the cost closer to such logs.
"""

from __future__ import annotations

import argparse
import statistics
import time

from why_decoded import tuned_args, tuned_matcher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    tuned_args(ap)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument(
        "--fresh-values", action="store_true", help="empty the value scan caches before each pass"
    )
    ns = ap.parse_args()
    matcher, rest = tuned_matcher(ns)
    n = sum(len(spans) for _entries, spans, _tag in rest)

    def one_pass() -> float:
        if ns.fresh_values:  # the matcher's and its often-passed table's (private) caches
            matcher._value_cache.clear()
            if matcher._hot is not None:
                matcher._hot[0]._value_cache.clear()
        t = time.perf_counter()
        for entries, spans, _tag in rest:
            matcher.match_entries(entries, spans)
        return (time.perf_counter() - t) / n * 1e6

    one_pass()  # warm: memos, value caches
    got = [one_pass() for _ in range(ns.passes)]
    fresh = ", value caches emptied before each" if ns.fresh_values else ""
    print(f"{n} records after tuning, {ns.passes} passes{fresh}")
    print("us/record:", " ".join(f"{x:.2f}" for x in got))
    print(f"median {statistics.median(got):.2f}, best {min(got):.2f}")


if __name__ == "__main__":
    main()
