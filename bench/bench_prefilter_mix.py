"""Pre-filter robustness: tune on one traffic mix, run another; prints decoded shares.

The raw pre-filter re-tunes itself on the first ``--tune-after`` records it sees (measured
pattern frequencies; it may loosen requirements). This checks that what it learned on one
mix does not make it decode far more than the rules force on another mix, or on traffic with
no positives at all. For each scenario (tune on X, then run Y) it prints, per traffic source
(the chunk's tag), the share of records the tuned pre-filter passes on to decoding, beside
the share the rules' raw requirements force (the untuned filter checks every requirement in
full, so it passes exactly the entries where some rule's requirement holds). The target: the
tuned share stays within 10 points of the forced share, per source.

Traffic files are written once into ``--dir`` by ``gen_traffic.py`` (mix a and mix b, with
and without positives), with other seeds than the load benchmark's.

    .venv/bin/python bench/bench_prefilter_mix.py --rules ../shared/rules
    .venv/bin/python bench/bench_prefilter_mix.py --rules ../shared/rules --tune-after 5000
"""

from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path

from gen_traffic import generate, load_index
from ruletag.rules.loader import compile_rules
from ruletag.rules.matcher import Matcher
from ruletag.rules.matcher.prefilter import RawMatcher
from why_decoded import read_chunks

#: traffic file name -> (mix, share of planted positives, seed)
TRAFFIC = {
    "a": ("a", 0.005, 101),
    "b": ("b", 0.005, 202),
    "a-none": ("a", 0.0, 303),
    "b-none": ("b", 0.0, 404),
}
#: (train on, run on): the usual case, a mix change both ways, no positives at all
SCENARIOS = [
    ("a", "a"),
    ("a", "b"),
    ("b", "a"),
    ("a-none", "a-none"),
    ("b-none", "b-none"),
    ("a", "b-none"),
]
TARGET = 10.0  # points


Chunks = list[tuple[bytes, list[tuple[int, int]], str]]


def traffic(folder: Path, name: str, chunks: int) -> Chunks:
    """The chunks of traffic file ``name`` (written first if missing or of another size)."""
    path = folder / f"{name}.bin"
    meta = Path(str(path) + ".json")
    if not meta.exists() or len(load_index(path)["chunks"]) != chunks:
        mix, fraction, seed = TRAFFIC[name]
        folder.mkdir(parents=True, exist_ok=True)
        generate(path, chunks, fraction, seed, mix=mix)
    return read_chunks(path)


def forced(compiled, chunks: Chunks) -> tuple[collections.Counter, collections.Counter]:
    """Per source: records, and records where some rule's raw requirement holds."""
    exact = RawMatcher(compiled.raw, 0)
    total: collections.Counter[str] = collections.Counter()
    held: collections.Counter[str] = collections.Counter()
    for entries, spans, tag in chunks:
        total[tag] += len(spans)
        held[tag] += len(exact.candidates(entries, spans))
    return total, held


def tuned_run(
    compiled, train: Chunks, run: Chunks, tune_after: int, timeout: float
) -> tuple[Matcher, collections.Counter, float]:
    """Tune a matcher on ``train``; the records it passes on per source over ``run``."""
    m = Matcher(compiled, tune_after)
    fed = k = 0
    while fed < tune_after and k < len(train):
        m.raw_candidates(*train[k][:2])
        fed += len(train[k][1])
        k += 1
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not m.stats.get("raw_tuned_on_records"):
        time.sleep(0.2)
        m.raw_candidates(*train[k % len(train)][:2])  # swaps the tuned filter in when ready
        k += 1
    decoded: collections.Counter[str] = collections.Counter()
    t = time.perf_counter()
    for entries, spans, tag in run:
        decoded[tag] += len(m.raw_candidates(entries, spans))
    return m, decoded, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rules", nargs="+", required=True, help="rule files or folders")
    ap.add_argument("--dir", default="/tmp/ruletag-bench/mix", help="traffic files")
    ap.add_argument("--chunks", type=int, default=100, help="chunks of 1000 records per file")
    ap.add_argument("--cache-dir", help="rule table cache (default: the user cache)")
    ap.add_argument("--tune-after", type=int, default=20_000)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for tuning")
    ns = ap.parse_args()

    t0 = time.perf_counter()
    compiled, result = compile_rules(
        ns.rules, cache_dir=Path(ns.cache_dir) if ns.cache_dir else None
    )
    print(f"{len(result.rules)} rules ({time.perf_counter() - t0:.1f} s to load or compile)")
    if compiled.raw is None:
        print("no rule has a raw requirement: every record is decoded")
        return
    if compiled.raw_forced:
        print(f"{len(compiled.raw_forced)} rules have no raw requirement: every record decoded")
    folder = Path(ns.dir)
    files = {n: traffic(folder, n, ns.chunks) for n in TRAFFIC}
    exact = {n: forced(compiled, c) for n, c in files.items()}
    worst = 0.0
    print(
        f"\ntuned on {ns.tune_after} records of the first file, then run over all of the "
        "second; decoded = passed on by the pre-filter, forced = some rule's requirement holds"
    )
    print("\n| tuned on | run on | source | records | forced | decoded | points over |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for train, run in SCENARIOS:
        m, decoded, secs = tuned_run(compiled, files[train], files[run], ns.tune_after, ns.timeout)
        total, held = exact[run]
        for tag in sorted(total):
            over = 100.0 * (decoded[tag] - held[tag]) / total[tag]
            worst = max(worst, over)
            print(
                f"| {train} | {run} | {tag} | {total[tag]} | {held[tag] / total[tag]:.1%} "
                f"| {decoded[tag] / total[tag]:.1%} | {over:.1f} |"
            )
        n = sum(total.values())
        over = 100.0 * (sum(decoded.values()) - sum(held.values())) / n
        tuned = m.stats.get("raw_tuned_on_records", "not tuned")
        extra = {k: v for k, v in m.stats.items() if k.startswith("raw_retune")}
        print(
            f"| {train} | {run} | **all** | {n} | {sum(held.values()) / n:.1%} "
            f"| {sum(decoded.values()) / n:.1%} | {over:.1f} "
            f"(tuned on {tuned}; {secs / n * 1e6:.1f} us/record pre-filter{'; ' if extra else ''}"
            f"{', '.join(f'{k} {v}' for k, v in extra.items())}) |"
        )
    verdict = "within" if worst <= TARGET else "NOT within"
    print(
        f"\nworst source: {worst:.1f} points over forced ({verdict} the {TARGET:.0f}-point target)"
    )


if __name__ == "__main__":
    main()
