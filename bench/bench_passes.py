"""``Matcher.match_entries`` µs/record over a tuned matcher, pass after pass (prints figures).

Loads (or compiles, through the rule cache) a rule set, lets the pre-filter re-tune itself on
the first ``--tune-after`` records of a traffic file written by ``bench/gen_traffic.py`` (as
``bench/why_decoded.py`` does), then times ``--passes`` passes over the following chunks and
prints each pass and their median. On a shared machine single passes wander; to compare two
versions, run this alternately from both checkouts (each with its own C helpers built) and
compare medians and best passes.

    .venv/bin/python bench/bench_passes.py --rules ../shared/rules --traffic <work>/traffic.bin
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
    ns = ap.parse_args()
    matcher, rest = tuned_matcher(ns)
    n = sum(len(spans) for _entries, spans, _tag in rest)

    def one_pass() -> float:
        t = time.perf_counter()
        for entries, spans, _tag in rest:
            matcher.match_entries(entries, spans)
        return (time.perf_counter() - t) / n * 1e6

    one_pass()  # warm: memos, value caches
    got = [one_pass() for _ in range(ns.passes)]
    print(f"{n} records after tuning, {ns.passes} passes")
    print("us/record:", " ".join(f"{x:.2f}" for x in got))
    print(f"median {statistics.median(got):.2f}, best {min(got):.2f}")


if __name__ == "__main__":
    main()
