"""The C helpers against the pure-Python reference, on one tuned matcher (prints figures).

Loads (or compiles, through the rule cache) a rule set, lets the pre-filter re-tune itself on
the first ``--tune-after`` records of a traffic file written by ``bench/gen_traffic.py``, then
matches the following chunks with ``Matcher.match_entries``, alternating the C helpers of
``ruletag.rules._native`` and the pure-Python reference (the same tuned filter, the same
records), and prints the best µs/record of each over ``--rounds`` rounds and the ratio. The
matches of both are checked equal.

    .venv/bin/python bench/gen_traffic.py -o /tmp/ruletag-bench/traffic.bin --chunks 60
    .venv/bin/python bench/bench_native.py --rules ../shared/rules
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator

from ruletag.rules import fields, native
from ruletag.rules.matcher import Matcher
from ruletag.rules.matcher import prefilter as raw_mod
from ruletag.rules.matcher import table as table_mod
from why_decoded import tuned_args, tuned_matcher

#: (module, name the matcher calls, the pure-Python reference put there by ``reference``)
SWAPS = (
    (fields, "flatten_record", fields.py_flatten_record),
    (fields, "RecordView", fields.PyRecordView),
    (table_mod, "scan_cached", table_mod.py_scan_cached),
    (table_mod, "scan_groups", table_mod.py_scan_groups),
    (table_mod, "Adder", native.PyAdder),
    (raw_mod, "Adder", native.PyAdder),
    (raw_mod, "EntryHits", native.PyEntryHits),
)


@contextlib.contextmanager
def reference(only: frozenset[str] = frozenset()) -> Iterator[None]:
    """Run the pure-Python reference helpers inside the block (the names the matcher calls;
    ``only``: just these names, when given)."""
    swaps = [s for s in SWAPS if not only or s[1] in only]
    saved = [getattr(mod, name) for mod, name, _ in swaps]
    for mod, name, ref in swaps:
        setattr(mod, name, ref)
    try:
        yield
    finally:
        for (mod, name, _), value in zip(swaps, saved, strict=True):
            setattr(mod, name, value)


def run(matcher: Matcher, chunks: list) -> tuple[float, list]:
    """Seconds for one pass over ``chunks``, and the matches."""
    out = []
    t = time.perf_counter()
    for entries, spans, _tag in chunks:
        out.append(matcher.match_entries(entries, spans))
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    tuned_args(ap)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--only",
        nargs="+",
        default=[],
        choices=sorted({name for _, name, _ in SWAPS}),
        help="swap in only these references (default: every one)",
    )
    ns = ap.parse_args()
    if native.IMPLEMENTATION == "python":
        raise SystemExit("the C helpers are not built (or RULETAG_PURE_PYTHON is set)")
    matcher, rest = tuned_matcher(ns)
    n = sum(len(c[1]) for c in rest)
    best = {"c": float("inf"), "python": float("inf")}
    for _ in range(ns.rounds):
        dt, got_c = run(matcher, rest)
        best["c"] = min(best["c"], dt)
        with reference(frozenset(ns.only)):
            dt, got_py = run(matcher, rest)
        best["python"] = min(best["python"], dt)
        if got_c != got_py:
            raise SystemExit("the C helpers and the reference disagree")
    matched = sum(len(m) for m in got_c)
    print(f"{n} records after tuning, {matched} matched (the same with both)")
    for impl, dt in best.items():
        print(f"{impl:>6}: {dt / n * 1e6:6.1f} us/record, {n / dt:8,.0f} records/s")
    print(f" ratio: {best['python'] / best['c']:.2f}x")


if __name__ == "__main__":
    main()
