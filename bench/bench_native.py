"""The C build against the pure-Python reference, on one tuned matcher (prints figures).

Loads (or compiles, through the rule cache) a rule set, lets the pre-filter re-tune itself on
the first ``--tune-after`` records of a traffic file written by ``bench/gen_traffic.py``, then
matches the following chunks with ``Matcher.match_entries`` ``--rounds`` times and prints the
best µs/record (process CPU time). It does so twice: here, with the C modules, and in a child
process with ``RULETAG_PURE_PYTHON=1``, where every C module (the match loop, the entry walk,
the record views, the scans, the rule programs) gives way to its pure-Python reference. The
matches of both are checked equal, and the ratio printed. The child compiles its own table
the first time (the cache key covers the implementation).

``--only NAME...`` instead swaps just those helpers for their references in this process, on
the same tuned filter, alternating (a helper's own share).

    .venv/bin/python bench/gen_traffic.py -o /tmp/ruletag-bench/traffic.bin --chunks 60
    .venv/bin/python bench/bench_native.py --rules ../shared/rules
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from ruletag.rules import fields, native
from ruletag.rules.matcher import Matcher
from ruletag.rules.matcher import prefilter as raw_mod
from ruletag.rules.matcher import table as table_mod
from why_decoded import read_chunks, tuned_args, tuned_matcher

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
    """Process CPU seconds for one pass over ``chunks``, and the matches."""
    out = []
    t = time.process_time()
    for entries, spans, _tag in chunks:
        out.append(matcher.match_entries(entries, spans))
    return time.process_time() - t, out


def best_of(matcher: Matcher, chunks: list, rounds: int) -> tuple[float, list]:
    """The best of ``rounds`` passes, and the matches (the same every pass)."""
    best = float("inf")
    got: list = []
    for _ in range(rounds):
        dt, got = run(matcher, chunks)
        best = min(best, dt)
    return best, got


def show(impl: str, dt: float, n: int) -> None:
    print(f"{impl:>6}: {dt / n * 1e6:6.1f} us/record, {n / dt:8,.0f} records/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    tuned_args(ap)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--only",
        nargs="+",
        default=[],
        choices=sorted({name for _, name, _ in SWAPS}),
        help="swap in only these references, in this process",
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)  # the reference run: where to write
    ap.add_argument("--from-chunk", type=int, help=argparse.SUPPRESS)  # ... and on what
    ns = ap.parse_args()
    matcher, rest = tuned_matcher(ns)
    if ns.from_chunk is not None:  # the chunks the parent measured, wherever tuning ended here
        rest = read_chunks(Path(ns.traffic))[ns.from_chunk :]
    n = sum(len(c[1]) for c in rest)
    if ns.child:
        dt, got = best_of(matcher, rest, ns.rounds)
        Path(ns.child).write_bytes(pickle.dumps((native.IMPLEMENTATION, dt, n, got)))
        return
    if native.IMPLEMENTATION == "python":
        raise SystemExit("the C helpers are not built (or RULETAG_PURE_PYTHON is set)")
    if ns.only:
        best = {"c": float("inf"), "python": float("inf")}
        for _ in range(ns.rounds):
            dt, got_c = run(matcher, rest)
            best["c"] = min(best["c"], dt)
            with reference(frozenset(ns.only)):
                dt, got_py = run(matcher, rest)
            best["python"] = min(best["python"], dt)
            if got_c != got_py:
                raise SystemExit("the C helpers and the reference disagree")
    else:
        dt_c, got_c = best_of(matcher, rest, ns.rounds)
        del matcher  # the child has the machine to itself
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "reference.pickle"
            start = len(read_chunks(Path(ns.traffic))) - len(rest)
            child = [sys.executable, *sys.argv, "--child", str(out), "--from-chunk", str(start)]
            env = {**os.environ, "RULETAG_PURE_PYTHON": "1"}
            subprocess.run(child, env=env, check=True, stdout=subprocess.DEVNULL)
            impl, dt_py, n_py, got_py = pickle.loads(out.read_bytes())
        if impl != "python" or n_py != n:
            raise SystemExit(f"the reference run was not the reference ({impl}, {n_py} records)")
        if got_c != got_py:
            raise SystemExit("the C build and the pure-Python reference disagree")
        best = {"c": dt_c, "python": dt_py}
    matched = sum(len(m) for m in got_c)
    what = f"with {', '.join(ns.only)} swapped" if ns.only else "whole builds"
    print(f"{n} records after tuning, {matched} matched (the same with both; {what})")
    for impl, dt in best.items():
        show(impl, dt, n)
    print(f" ratio: {best['python'] / best['c']:.2f}x")


if __name__ == "__main__":
    main()
