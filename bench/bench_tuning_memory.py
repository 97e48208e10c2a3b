"""A serve's memory while its pre-filter tunes itself, and once tuned (prints figures).

Compiles (or loads, through the bench cache) a rule set. Then, per round, it starts ``ruletag
serve`` on that cached table with the table's kept tuned filter and tuning sample deleted (a
stateful step table keeps its own), so the serve observes the traffic and re-tunes itself,
and drives the bench traffic through it (``bench/load.py``) for ``--duration`` seconds. The
RSS of the serve's process tree is sampled every 0.1 s. Per round it prints:

- the peak RSS (the tree's VmHWM: the peak of each process, summed, as ``make bench``
  reports it);
- when the first tuning was logged;
- how many tunings there were, and how many of them were for drift (the traffic no longer
  looked like the tuning sample);
- the RSS over the last quarter of the run;
- the records/s.

``--keep`` starts from the kept tuned filter instead (what a restart does): the figure to
compare with.

    .venv/bin/python bench/bench_tuning_memory.py --corpus ../shared/rules
    .venv/bin/python bench/bench_tuning_memory.py --corpus ../shared/rules --stateful --rounds 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import load  # noqa: E402
import run_all  # noqa: E402


def one_round(
    cfg: Path,
    traffic: load.Traffic,
    sink: load.SinkProcess,
    port: int,
    duration: float,
    version: str,
) -> dict[str, float | None]:
    """One serve, driven for ``duration`` s: peak, tuned-at, steady RSS, records/s.
    ``version``: the rule table's key (its tuning line, not a stateful step table's)."""
    srv = run_all.Serve(cfg)
    stats = load.ProcStats(srv.pid)
    samples: list[tuple[float, float]] = []
    done = threading.Event()
    t0 = time.monotonic()

    def watch() -> None:
        while not done.is_set():
            samples.append((time.monotonic() - t0, stats.rss_mb()))
            done.wait(0.1)

    threading.Thread(target=watch, daemon=True).start()
    records = 0
    try:
        while time.monotonic() - t0 < duration:
            got = load.measure(
                traffic, sink, ("127.0.0.1", port), srv.pid, duration=1.0, connections=1, window=8
            )
            records += got["records"]
        peak = stats.peak_rss_mb()
    finally:
        done.set()
        srv.stop()
    tuned = next(
        (
            line
            for line in srv.lines
            if ("pre-filter re-tuned" in line or "pre-filter tuned on" in line)
            and f"(table {version})" in line
        ),
        None,
    )
    tuned_at = None
    if tuned is not None:  # the log's clock, against the first line's
        stamp = tuned[:23]
        first = srv.lines[0][:23]
        fmt = "%Y-%m-%d %H:%M:%S,%f"
        tuned_at = (datetime.strptime(stamp, fmt) - datetime.strptime(first, fmt)).total_seconds()
    tail = [r for t, r in samples if t >= 0.75 * duration]
    mark = f"(table {version})"
    drifts = sum("pre-filter: the traffic differs" in line and mark in line for line in srv.lines)
    tunings, _ = run_all._tuning_state(srv.lines, version)
    return {
        "tunings": tunings,
        "drifts": drifts,
        "start_mb": samples[0][1] if samples else None,
        "peak_mb": peak,
        "tuned_at_s": tuned_at,
        "steady_mb": statistics.median(tail) if tail else None,
        "steady_max_mb": max(tail) if tail else None,
        "records_per_s": records / max(duration, 1e-9),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, help="folder holding sigma/ and elastic/")
    ap.add_argument("--rules", nargs="+", help="rule paths instead of the whole --corpus")
    ap.add_argument("--work", default="/tmp/ruletag-bench", help="traffic and cache folder")
    ap.add_argument("--chunks", type=int, default=100, help="traffic chunks of 1000 records")
    ap.add_argument("--duration", type=float, default=25.0, help="seconds per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--stateful", action="store_true", help="evaluate stateful rules too")
    ap.add_argument("--keep", action="store_true", help="start from the kept tuned filter")
    ns = ap.parse_args()
    paths = ns.rules or ([str(ns.corpus.resolve())] if ns.corpus else None)
    if not paths:
        ap.error("want --corpus DIR or --rules PATH ...")
    paths = [str(Path(p).resolve()) for p in paths]
    work = Path(ns.work)
    cache, tpath = run_all.work_folder(work, ns.chunks)
    info = run_all.precompile(paths, cache)
    print(f"{info['rules']} rules, table {info['version']} ({info['compile_s']} s)", flush=True)
    traffic = load.Traffic.load(tpath)
    sink = load.SinkProcess(traffic.t0)
    name = "tuning-memory" + ("" if ns.stateful else "-stateless")
    try:
        print(
            "| round | start MB | peak MB | first tuned at s | tunings (for drift) "
            "| steady MB (max) | records/s |\n"
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            flush=True,
        )
        for k in range(ns.rounds):
            if not ns.keep:  # the serve tunes itself: no kept filter, no kept sample
                for p in [*cache.glob("*.tuned"), *cache.glob("*.sample")]:
                    p.unlink()
            port = load.free_port()
            cfg = run_all.write_config(
                work, name, port, sink.port, paths, cache, stateful=ns.stateful
            )
            r = one_round(cfg, traffic, sink, port, ns.duration, info["version"])
            at = "-" if r["tuned_at_s"] is None else f"{r['tuned_at_s']:.1f}"
            print(
                f"| {k + 1} | {r['start_mb']:.0f} | {r['peak_mb']:.0f} | {at} | "
                f"{r['tunings']} ({r['drifts']}) | "
                f"{r['steady_mb']:.0f} ({r['steady_max_mb']:.0f}) | {r['records_per_s']:,.0f} |",
                flush=True,
            )
    finally:
        sink.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
