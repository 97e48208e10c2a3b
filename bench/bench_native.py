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
from pathlib import Path

from ruletag.rules import fields, native
from ruletag.rules.loader import compile_rules
from ruletag.rules.matcher import Matcher
from ruletag.rules.matcher import prefilter as raw_mod
from ruletag.rules.matcher import table as table_mod
from why_decoded import read_chunks, tune


@contextlib.contextmanager
def reference() -> Iterator[None]:
    """Run the pure-Python reference helpers inside the block (the names the matcher calls)."""
    saved = (
        fields.flatten_record,
        table_mod.scan_cached,
        table_mod.scan_groups,
        table_mod.Adder,
        raw_mod.Adder,
        raw_mod.EntryHits,
    )
    fields.flatten_record = fields.py_flatten_record
    table_mod.scan_cached = table_mod.py_scan_cached
    table_mod.scan_groups = table_mod.py_scan_groups
    table_mod.Adder = raw_mod.Adder = native.PyAdder
    raw_mod.EntryHits = native.PyEntryHits
    try:
        yield
    finally:
        (
            fields.flatten_record,
            table_mod.scan_cached,
            table_mod.scan_groups,
            table_mod.Adder,
            raw_mod.Adder,
            raw_mod.EntryHits,
        ) = saved


def run(matcher: Matcher, chunks: list) -> tuple[float, list]:
    """Seconds for one pass over ``chunks``, and the matches."""
    out = []
    t = time.perf_counter()
    for entries, spans, _tag in chunks:
        out.append(matcher.match_entries(entries, spans))
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rules", nargs="+", required=True, help="rule files or folders")
    ap.add_argument("--traffic", default="/tmp/ruletag-bench/traffic.bin")
    ap.add_argument("--cache-dir", help="rule table cache (default: the user cache)")
    ap.add_argument("--tune-after", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=3)
    ns = ap.parse_args()
    if native.IMPLEMENTATION == "python":
        raise SystemExit("the C helpers are not built (or RULETAG_PURE_PYTHON is set)")

    t0 = time.perf_counter()
    compiled, result = compile_rules(
        ns.rules, cache_dir=Path(ns.cache_dir) if ns.cache_dir else None
    )
    print(f"{len(result.rules)} rules ({time.perf_counter() - t0:.1f} s to load or compile)")
    matcher = Matcher(compiled)
    chunks = read_chunks(Path(ns.traffic))
    start = tune(matcher, chunks, ns.tune_after, timeout=300.0)
    rest = chunks[start:] or chunks
    n = sum(len(c[1]) for c in rest)
    best = {"c": float("inf"), "python": float("inf")}
    for _ in range(ns.rounds):
        dt, got_c = run(matcher, rest)
        best["c"] = min(best["c"], dt)
        with reference():
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
