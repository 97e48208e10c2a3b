"""Which records the raw pre-filter still decodes, and which rules make it (prints figures).

Loads (or compiles, through the rule cache) a rule set, lets the pre-filter re-tune itself on
the first ``--tune-after`` records of a traffic file written by ``bench/gen_traffic.py``, then
runs the tuned filter over the following chunks and prints, per traffic source (the chunk's
tag), the share of records decoded and the time ``match_entries`` takes, and the rules whose
raw requirement held on the most records: each of those rules makes every record it holds on
be decoded and evaluated.

    .venv/bin/python bench/gen_traffic.py          # once: /tmp/ruletag-bench/traffic.bin
    .venv/bin/python bench/why_decoded.py --rules ../shared/rules
"""

from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path

import msgpack

from gen_traffic import load_index
from ruletag.protocol import iter_entries
from ruletag.rules.loader import compile_rules
from ruletag.rules.matcher import Matcher


def read_chunks(path: Path) -> list[tuple[bytes, list[tuple[int, int]], str]]:
    """The traffic file's chunks: (entries, entry spans, tag)."""
    data = path.read_bytes()
    out = []
    for off, length, _n, _chunk, tag in load_index(path)["chunks"]:
        _tag, entries, _opt = msgpack.unpackb(data[off : off + length], raw=False)
        out.append((entries, iter_entries(entries), tag))
    return out


def tune(matcher: Matcher, chunks: list, records: int, timeout: float) -> int:
    """Feed chunks until the pre-filter has re-tuned itself; the index of the next chunk."""
    matcher.set_tune_after(records)
    fed = k = 0
    while fed < records and k < len(chunks):
        matcher.match_entries(*chunks[k][:2])
        fed += len(chunks[k][1])
        k += 1
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not matcher.stats.get("raw_tuned_on_records"):
        matcher.match_entries(*chunks[k % len(chunks)][:2])  # swaps the tuned filter in
        k += 1
        time.sleep(0.2)
    return k


def tuned_args(ap: argparse.ArgumentParser) -> None:
    """The options of :func:`tuned_matcher` (rules, traffic file, cache, tuning length)."""
    ap.add_argument("--rules", nargs="+", required=True, help="rule files or folders")
    ap.add_argument("--traffic", default="/tmp/ruletag-bench/traffic.bin")
    ap.add_argument("--cache-dir", help="rule table cache (default: the user cache)")
    ap.add_argument("--tune-after", type=int, default=20_000)


def tuned_matcher(ns: argparse.Namespace) -> tuple[Matcher, list]:
    """A matcher of ``--rules`` (loaded or compiled through the cache) whose pre-filter has
    re-tuned itself on the first ``--tune-after`` records of ``--traffic``, and the chunks
    after those (all of them if the file is too short)."""
    t0 = time.perf_counter()
    compiled, result = compile_rules(
        ns.rules, cache_dir=Path(ns.cache_dir) if ns.cache_dir else None
    )
    print(f"{len(result.rules)} rules ({time.perf_counter() - t0:.1f} s to load or compile)")
    matcher = Matcher(compiled)
    chunks = read_chunks(Path(ns.traffic))
    start = tune(matcher, chunks, ns.tune_after, timeout=300.0)
    if not matcher.stats.get("raw_tuned_on_records"):
        print("the pre-filter did not re-tune (too little traffic?): figures are untuned")
    return matcher, chunks[start:] or chunks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    tuned_args(ap)
    ap.add_argument("--top", type=int, default=25, help="rules to list")
    ns = ap.parse_args()
    matcher, rest = tuned_matcher(ns)
    compiled = matcher.table
    raw = matcher.raw
    per_rule: collections.Counter[int] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    decoded: collections.Counter[str] = collections.Counter()
    seconds: collections.Counter[str] = collections.Counter()
    for entries, spans, tag in rest:
        cands = raw.candidates(entries, spans) if raw is not None else {}
        total[tag] += len(spans)
        decoded[tag] += len(cands)
        for rules in cands.values():
            per_rule.update(rules)
        t = time.perf_counter()
        matcher.match_entries(entries, spans)
        seconds[tag] += time.perf_counter() - t
    n = sum(total.values())
    print(
        f"\n{n} records after tuning; decoded {sum(decoded.values()) / n:.1%}; "
        f"match_entries {sum(seconds.values()) / n * 1e6:.1f} us/record\n"
    )
    print("| source | share of records | decoded | match_entries us/record |")
    print("| --- | ---: | ---: | ---: |")
    for tag in sorted(total, key=lambda x: -seconds[x] / total[x]):
        print(
            f"| {tag} | {total[tag] / n:.0%} | {decoded[tag] / total[tag]:.0%} "
            f"| {seconds[tag] / total[tag] * 1e6:.1f} |"
        )
    print("\n| records its requirement held on | rule | source | file |")
    print("| ---: | --- | --- | --- |")
    for k, c in per_rule.most_common(ns.top):
        rule = compiled.rules[k]
        print(f"| {c / n:.1%} | {rule.name} | {rule.source} | {Path(rule.path).name} |")


if __name__ == "__main__":
    main()
