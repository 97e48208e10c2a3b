"""Throughput of ``ruletag match`` on flat Sysmon JSON lines (not a test: prints figures).

Writes ``--events`` flat Sysmon events (process creation, network connection, file creation
from ``gen_traffic.py``, 0.5% of them positives) as JSON lines once, then runs the
``ruletag match`` command (in a child process, output to ``/dev/null``) with the given rules:
cold (compiling into an empty cache), warm (cached table) while tuning the pre-filter on the
input, warm again starting from the tuned filter the previous run kept (also with
``--workers``, default 2), and warm with ``--no-prefilter``. It prints events/s per run and
the in-process cost split of one warm run (parse + pack, match, output), measured by timing
the stages of
:func:`ruletag.commands.match.run_batches`.

    .venv/bin/python bench/bench_cli_match.py --rules ../shared/rules/sigma [--events 100000]
    .venv/bin/python bench/bench_cli_match.py --rules ../shared/rules/sigma --profile  # cProfile
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gen_traffic


def write_events(path: Path, n: int, seed: int = 1, match_fraction: float = 0.005) -> None:
    """``n`` flat Sysmon events as JSON lines (``match_fraction`` of them positives)."""
    rnd = random.Random(seed)
    pos = [
        p
        for p in gen_traffic.positives()
        if p.get("Channel") == "Microsoft-Windows-Sysmon/Operational"
    ]
    kinds = (gen_traffic.sysmon_process, gen_traffic.sysmon_network, gen_traffic.sysmon_file)
    with path.open("w", encoding="utf-8") as f:
        for seq in range(n):
            if pos and rnd.random() < match_fraction:
                rec = rnd.choice(pos)
            else:
                rec = rnd.choice(kinds)(rnd, seq)
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def run_cli(rules: list[str], events: Path, cache: Path, *extra: str) -> tuple[float, str]:
    """Wall seconds of one ``ruletag match`` run (stdout to /dev/null) and its stderr."""
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    argv = [sys.executable, "-m", "ruletag", "match", "--rules", *rules, "--events", str(events)]
    t0 = time.perf_counter()
    with open(os.devnull, "wb") as sink:
        p = subprocess.run(
            [*argv, *extra], stdout=sink, stderr=subprocess.PIPE, env=env, check=False
        )
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"ruletag match failed ({p.returncode}): {p.stderr.decode()[-2000:]}")
    return dt, p.stderr.decode().strip()


def split(rules: list[str], events: Path, cache: Path, prefilter: bool, profile: bool) -> None:
    """In-process: the cost of each stage of one warm run, from the tuned filter an earlier
    run kept (and a cProfile, if asked)."""
    os.environ["XDG_CACHE_HOME"] = str(cache)
    from ruletag.commands import match as m
    from ruletag.rules.fingerprint import default_cache_dir, tuned_path
    from ruletag.rules.matcher import Matcher

    table = m._load_table(rules, None)
    matcher = Matcher(table, None, tuned_path(default_cache_dir(), table.version))
    matcher.wait_tuned()  # the steady state: the kept tuned filter, if there is one
    times = {"read": 0.0, "match": 0.0, "output": 0.0}
    n = 0
    with open(events, "rb") as src, open(os.devnull, "wb") as sink:
        ctx = m.MatchContext(matcher, table, prefilter=prefilter)
        batches = m.read_batches(src)
        prof = None
        if profile:
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)
            t1 = time.perf_counter()
            if batch is None:
                break
            hits = ctx.match_batch(batch)
            t2 = time.perf_counter()
            sink.write(ctx.render_batch(batch, hits))
            t3 = time.perf_counter()
            times["read"] += t1 - t0
            times["match"] += t2 - t1
            times["output"] += t3 - t2
            n += len(batch.records)
        if prof is not None:
            prof.disable()
            import pstats

            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    total = sum(times.values())
    print(
        f"  in-process ({'fast path' if prefilter else 'dict path'}): {n} events, "
        f"{n / total:,.0f} events/s; "
        + ", ".join(f"{k} {v:.2f} s ({100 * v / total:.0f}%)" for k, v in times.items())
    )
    if matcher.stats.get("raw_tuned_on_records"):
        print(
            f"  tuned on {matcher.stats['raw_tuned_on_records']} records: "
            f"{matcher.stats['raw_triggers']} triggers, {matcher.stats['hot_rules']} hot rules"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rules", nargs="+", required=True, help="rule folders or a table")
    ap.add_argument("--events", type=int, default=100_000, help="number of events")
    ap.add_argument("--file", default="/tmp/ruletag-bench/sysmon.jsonl", help="events file")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold (compile) run")
    ap.add_argument("--no-dict", action="store_true", help="skip the --no-prefilter run")
    ap.add_argument("--profile", action="store_true", help="cProfile the in-process run")
    ap.add_argument(
        "--workers",
        default="2",
        help="comma-separated --workers values to run from the tuned file too ('' for none)",
    )
    ns = ap.parse_args(argv)
    events = Path(ns.file)
    events.parent.mkdir(parents=True, exist_ok=True)
    if not events.exists() or sum(1 for _ in events.open("rb")) != ns.events:
        write_events(events, ns.events)
    size = events.stat().st_size
    print(f"events: {ns.events} flat Sysmon events, {size / 1e6:.1f} MB ({events})")
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        runs: list[tuple[str, tuple[str, ...]]] = []
        if not ns.no_cold:
            runs.append(("cold (compile)", ()))
        # the first warm run tunes the pre-filter on its input and keeps it (<key>.tuned);
        # the next one starts from that file
        runs.append(("warm, tuning", ()))
        runs.append(("warm, tuned file", ()))
        for w in filter(None, ns.workers.split(",")):
            runs.append((f"warm, tuned, {w} workers", ("--workers", w)))
        if not ns.no_dict:
            runs.append(("warm --no-prefilter", ("--no-prefilter",)))
        if ns.no_cold:
            run_cli(ns.rules, events, cache, "--only-matches")  # fill the cache
        for name, extra in runs:
            if name == "warm, tuning":
                for f in (cache / "ruletag").glob("*.tuned"):
                    f.unlink()
            dt, err = run_cli(ns.rules, events, cache, *extra)
            rules_line = next((x for x in err.splitlines() if "rules:" in x), "")
            print(f"  {name:22s} {dt:7.2f} s  {ns.events / dt:9,.0f} events/s   {rules_line}")
        split(ns.rules, events, cache, True, ns.profile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
