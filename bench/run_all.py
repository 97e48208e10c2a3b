"""``make bench``: run ``ruletag serve`` under load for every rule set and print one table.

Rule sets: none (pure relay), seeds (the bundled seed rules), and, given ``--corpus DIR`` (a
folder holding ``sigma/`` and ``elastic/``): a 10% sample of every rule file (for the 10x
scaling ratio), all Sigma, all Elastic, everything. Each table is compiled once
into a bench cache folder first, so ``serve`` starts from the compiled table (start-up time is
spawn -> ``ruletag ready``). Per rule set: a full-speed run (throughput, ruletag CPU per
record, peak RSS) and a fixed-rate run (added latency at a steady load), after a warm-up that
lasts until the pre-filter has re-tuned itself on the traffic (or read the filter an earlier
run kept), the whole traffic file has gone through once more per worker (what the drift check
judges on) and no re-tuning for drift is under way ("tuned after s": that warm-up). Then
``workers`` scaling with every rule loaded and ``enrich.stateful: off`` (``workers: N``
refuses stateful rules: the stateless tier of docs/deploy.md), 1 worker included as the
ratio's base; the rows above evaluate the stateful rules the sets hold. With both the tenth
and everything, the tenth runs in the stateless tier too, and the 10x-rules ratio is printed
for each tier (a tier's rows against each other only).

    python bench/run_all.py --corpus ../shared/rules   # everything, ~6 minutes (+1 to compile)
    python bench/run_all.py --sets none,seeds --duration 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SEEDS = REPO / "plugin" / "ruletag" / "data" / "rules"
sys.path.insert(0, str(HERE))

import gen_traffic  # noqa: E402
import load  # noqa: E402

#: The workers scaling runs: every rule, stateful rules off (the tier ``workers: N`` serves).
STATELESS = "everything/stateless"
#: the tenth in the stateless tier, run beside it (the 10x-rules ratio of the same tier)
TENTH_STATELESS = "tenth/stateless"

#: The rule sets that need ``--corpus``.
CORPUS_SETS = ("tenth", "sigma", "elastic", "everything")


def _sample_tenth(corpus: Path) -> list[str]:
    """Every 10th rule file of the whole corpus (sorted), for the 10x rule-count ratio."""
    files = sorted(str(p) for p in corpus.rglob("*") if p.suffix in (".yml", ".yaml", ".toml"))
    return files[::10]


def rule_sets(corpus: Path | None) -> dict[str, Any]:
    """Rule paths (or a function giving them) per set; the corpus sets only with a corpus."""
    sets: dict[str, Any] = {"none": [], "seeds": [str(SEEDS)]}
    if corpus is not None:
        sets.update(
            tenth=lambda: _sample_tenth(corpus),
            sigma=[str(corpus / "sigma")],
            elastic=[str(corpus / "elastic")],
            everything=[str(corpus)],
        )
    return sets


def code_hash() -> str:
    """The rule compiler's fingerprint: a table cached by other compiler code is rebuilt."""
    from ruletag.rules.loader import compiler_fingerprint

    return compiler_fingerprint()[:12]


def ruletag_bin() -> str:
    exe = Path(sys.executable).with_name("ruletag")
    return str(exe) if exe.exists() else "ruletag"


def _yaml_list(items: list[str], indent: str) -> str:
    return "".join(f"{indent}- {json.dumps(i)}\n" for i in items)


def _tuning_state(lines: list[str], version: str | None) -> tuple[int, int]:
    """From serve's log: how many times the main table's pre-filter was tuned (re-tuned on
    the traffic, or started from the filter an earlier run kept), and how many re-tunings for
    drift are under way. A step table's tuning, logged with its own key, does not count."""
    mark = f"(table {version})" if version else ""
    tuned = drifting = 0
    for line in lines:
        if "pre-filter: the traffic differs" in line and mark in line:
            drifting += 1
        elif ("pre-filter re-tuned" in line or "pre-filter tuned on" in line) and mark in line:
            tuned += 1
            drifting = max(0, drifting - 1)
    return tuned, drifting


def write_config(
    folder: Path,
    name: str,
    port: int,
    sink_port: int,
    paths: list[str],
    cache: Path,
    workers: int = 1,
    stateful: bool = True,
) -> Path:
    """A serve config: listen on ``port``, forward to the sink, these rules, no reload;
    ``stateful=False``: ``enrich.stateful: off`` (the stateless tier, as ``workers: N`` needs)."""
    text = (
        f"listen:\n  host: 127.0.0.1\n  port: {port}\n"
        f"forward:\n  servers:\n    - host: 127.0.0.1\n      port: {sink_port}\n"
        "log:\n  level: info\n"
    )
    if workers > 1:
        text += f"workers: {workers}\n"
    if not stateful:
        text += 'enrich:\n  stateful: "off"\n'
    if paths:
        text += "rules:\n  paths:\n" + _yaml_list(paths, "    ")
        text += f"  cache_dir: {json.dumps(str(cache))}\n  reload_interval: 0\n"
    path = folder / f"{name.replace('/', '-')}-w{workers}.yaml"
    path.write_text(text)
    return path


class Serve:
    """A ``ruletag serve`` child process; ``startup`` = seconds until it logged ready."""

    def __init__(self, config: Path, timeout: float = 120.0, workers: int = 1) -> None:
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [ruletag_bin(), "serve", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        ready = threading.Event()
        seen = [0]

        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line.rstrip())
                if "ruletag ready" in line:
                    seen[0] += 1
                    if seen[0] >= workers:  # every worker logs its own ready line
                        ready.set()

        threading.Thread(target=pump, daemon=True).start()
        while not ready.wait(0.005):
            if self.proc.poll() is not None or time.monotonic() - t0 > timeout:
                self.stop()
                raise RuntimeError("ruletag serve did not start:\n" + "\n".join(self.lines[-20:]))
        self.startup = time.monotonic() - t0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def work_folder(work: Path, chunks: int) -> tuple[Path, Path]:
    """The bench's table cache in ``work`` (one folder per compiler fingerprint: a table
    compiled by other code is rebuilt) and its traffic file of ``chunks`` chunks (generated
    when missing or of another length)."""
    cache = work / f"cache-{code_hash()}"
    cache.mkdir(parents=True, exist_ok=True)
    tpath = work / "traffic.bin"
    meta_path = Path(str(tpath) + ".json")
    if not meta_path.exists() or len(gen_traffic.load_index(tpath)["chunks"]) != chunks:
        print(f"generating {chunks} chunks of traffic into {tpath} ...", flush=True)
        gen_traffic.generate(tpath, chunks)
    return cache, tpath


def byte_compile() -> None:
    """Byte-compile the ruletag package, so that start-up measures a start and not the byte
    compiler: with ``PYTHONDONTWRITEBYTECODE`` set (container images and some CI set it) a
    module edited since its last ``.pyc`` is compiled again at every start, 50 ms or more
    after a change to the larger ones. An installed wheel is byte-compiled by pip."""
    import compileall

    import ruletag

    compileall.compile_dir(str(Path(ruletag.__file__).parent), quiet=1)


def precompile(paths: list[str], cache: Path) -> dict[str, Any]:
    """Compile (or load from the cache) a rule set; rule count and seconds."""
    from ruletag.rules.loader import compile_rules

    t0 = time.perf_counter()
    table, _ = compile_rules(paths, cache_dir=cache)
    return {
        "version": table.version,
        "rules": len(table.rules),
        "compile_s": round(time.perf_counter() - t0, 1),
        "raw_literals": table.stats.get("raw_literals"),
        "rules_without_raw_literal": len(table.stats.get("rules_without_raw_literal", [])),
    }


def run_set(
    name: str,
    paths: list[str],
    traffic: load.Traffic,
    sink: load.SinkProcess,
    work: Path,
    cache: Path,
    ns: argparse.Namespace,
    workers: int = 1,
    stateful: bool = True,
    version: str | None = None,
) -> dict[str, Any]:
    """Start serve for one rule set, run full speed then fixed rate, stop it. ``version``:
    the rule table's key, to tell its tuning from the stateful step tables' in the log."""
    port = load.free_port()
    cfg = write_config(work, name, port, sink.port, paths, cache, workers, stateful)
    if stateful and paths:  # a first start compiles the stateful rules' step tables into the
        Serve(cfg, workers=workers).stop()  # cache: done ahead, as the main table is
    srv = Serve(cfg, workers=workers)
    row: dict[str, Any] = {"set": name, "workers": workers, "startup_s": round(srv.startup, 2)}
    try:
        # the kernel spreads connections over the workers by a hash of their addresses: with
        # two per worker, all four land on one of two workers once in eight runs (seen)
        conns = max(ns.connections, 4 * workers) if workers > 1 else ns.connections
        # warm-up; with rules, until every worker's pre-filter has re-tuned itself on the
        # traffic (docs/rules.md), then seen the whole traffic file (enough windows for the
        # drift check), and no re-tuning for drift is under way: the runs below measure the
        # steady state
        t_warm = time.monotonic()
        after_tuned = 0
        enough = len(traffic.frames) and sum(traffic.counts) * workers * 6 // 5
        while True:
            got = load.measure(
                traffic,
                sink,
                ("127.0.0.1", port),
                srv.pid,
                duration=1.0,
                connections=conns,
                window=ns.window,
            )
            tuned, drifting = _tuning_state(srv.lines, version)
            if tuned >= workers:
                after_tuned += got["records"]
            settled = tuned >= workers and after_tuned >= enough and not drifting
            if not paths or settled or time.monotonic() - t_warm > ns.tune_timeout:
                break
        row["tuned_after_s"] = round(time.monotonic() - t_warm, 1) if paths and tuned else None
        full = load.measure(
            traffic,
            sink,
            ("127.0.0.1", port),
            srv.pid,
            duration=ns.duration,
            connections=conns,
            window=ns.window,
        )
        row["full"] = full
        if workers == 1 and ns.rate:
            # a steady load the server can carry: at most half its full-speed throughput
            rate = min(ns.rate, full["records_per_s"] / 2)
            row["rate"] = load.measure(
                traffic,
                sink,
                ("127.0.0.1", port),
                srv.pid,
                duration=ns.duration / 2,
                connections=1,
                window=ns.window,
                rate=rate,
            )
    finally:
        srv.stop()
        # its log (tuning and re-tuning lines with their times), beside the config
        cfg.with_suffix(".log").write_text("\n".join(srv.lines) + "\n")
    return row


def _fmt_row(r: dict[str, Any], relay: float | None) -> str:
    f = r["full"]
    rate = r.get("rate") or {}
    vs = f"{f['records_per_s'] / relay * 100:.0f}%" if relay else "-"
    cap = 1e6 / f["cpu_us_per_record"] if f["cpu_us_per_record"] else 0
    lat = (
        f"{rate['p50_ms']:.1f} / {rate['p99_ms']:.1f} @ {rate['records_per_s'] / 1000:.0f}k/s"
        if rate
        else "-"
    )
    return (
        f"| {r['set']} | {r.get('rules', 0)} | {r['workers']} | {r['startup_s']:.2f} | "
        f"{r['tuned_after_s'] if r.get('tuned_after_s') is not None else '-'} | "
        f"{f['records_per_s']:,} | {f['mb_per_s']:.0f} | {vs} | {f['cpu_us_per_record']:.2f} | "
        f"{cap:,.0f} | {lat} | {f['p50_ms']:.0f} / {f['p99_ms']:.0f} | {f['peak_rss_mb']:.0f} |"
    )


HEADER = (
    "| rule set | rules | workers | start-up s | tuned after s | records/s | MB/s | vs relay | "
    "ruletag CPU µs/record | records/s per CPU s | latency p50/p99 ms (fixed rate) | "
    "latency p50/p99 ms (full speed) | peak RSS MB |\n"
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/ruletag-bench", help="traffic, configs, cache")
    ap.add_argument("--chunks", type=int, default=100, help="traffic chunks of 1000 records")
    ap.add_argument(
        "--corpus", type=Path, help="folder holding sigma/ and elastic/ (e.g. ../shared/rules)"
    )
    ap.add_argument("--sets", help="comma-separated rule sets (default: every available one)")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per full-speed run")
    ap.add_argument("--rate", type=float, default=50_000.0, help="records/s of the fixed-rate run")
    ap.add_argument("--window", type=int, default=8, help="unacked chunks per connection")
    ap.add_argument("--connections", type=int, default=1)
    ap.add_argument("--workers", default="1,2", help="worker counts to try with everything")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument(
        "--tune-timeout",
        type=float,
        default=120.0,
        help="longest warm-up waiting for the pre-filter to re-tune (seconds)",
    )
    ns = ap.parse_args(argv)
    if ns.corpus is not None:  # the configs live elsewhere: rule paths must be absolute
        ns.corpus = ns.corpus.resolve()
    sets = rule_sets(ns.corpus)
    if ns.corpus is not None and not all((ns.corpus / d).is_dir() for d in ("sigma", "elastic")):
        ap.error(f"--corpus {ns.corpus}: want a folder holding sigma/ and elastic/")
    ns.sets = ns.sets or ",".join(sets)
    missing = [s for s in ns.sets.split(",") if s not in sets]
    if missing:
        need = [s for s in missing if s in CORPUS_SETS]
        ap.error(
            f"rule sets {','.join(missing)}: "
            + ("need --corpus DIR" if need == missing else f"unknown; have {','.join(sets)}")
        )
    if ns.corpus is None:
        print(
            f"no --corpus: benchmarking {ns.sets} only (the corpus sets "
            f"{','.join(CORPUS_SETS)} need --corpus DIR)",
            flush=True,
        )
    byte_compile()
    work = Path(ns.work)
    cache, tpath = work_folder(work, ns.chunks)
    meta = gen_traffic.load_index(tpath)
    traffic = load.Traffic.load(tpath)
    sink = load.SinkProcess(traffic.t0)
    rows: list[dict[str, Any]] = []
    chosen = ns.sets.split(",")
    set_paths: dict[str, list[str]] = {}
    try:
        for name in chosen:
            spec = sets[name]
            paths = set_paths[name] = spec() if callable(spec) else spec
            info = precompile(paths, cache) if paths else {"rules": 0}
            print(f"[{name}] {info}", flush=True)
            row = run_set(name, paths, traffic, sink, work, cache, ns, version=info.get("version"))
            row.update(info)
            rows.append(row)
            print(f"[{name}] {json.dumps(row)}", flush=True)

        def stateless(name: str, of: str, workers: int) -> None:
            """A row of set ``of`` run in the stateless tier (enrich.stateful: off)."""
            base = next(r for r in rows if r["set"] == of)
            paths = set_paths[of]
            version = base.get("version")
            row = run_set(name, paths, traffic, sink, work, cache, ns, workers, False, version)
            row["rules"] = base.get("rules", 0)
            rows.append(row)
            print(f"[{name} x{workers}] {json.dumps(row)}", flush=True)

        if "tenth" in chosen and "everything" in chosen:
            # the 10x-rules ratio compares like with like: the stateless tier of both too
            stateless(TENTH_STATELESS, "tenth", 1)
        if "everything" in chosen:
            # workers: N needs the stateless tier (enrich.stateful: off); its 1-worker run is
            # the base of the scaling ratio
            for w in (int(x) for x in ns.workers.split(",")):
                try:
                    stateless(STATELESS, "everything", w)
                except RuntimeError as exc:
                    print(f"[workers {w}] skipped: {str(exc).splitlines()[-1]}", flush=True)
    finally:
        sink.close()
    relay = next((r["full"]["records_per_s"] for r in rows if r["set"] == "none"), None)
    print()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; traffic: {meta['records']} records, "
        f"{meta['avg_record_bytes']} B/record avg, {meta['match_fraction'] * 100:.1f}% planted "
        f"positives; {ns.duration:.0f} s per run, window {ns.window} chunks"
    )
    print()
    print(HEADER)
    for r in rows:
        print(_fmt_row(r, relay))
    by = {(r["set"], r["workers"]): r for r in rows}
    for tenth, every, tier in (
        ("tenth", "everything", "stateful rules on"),
        (TENTH_STATELESS, STATELESS, "stateless"),
    ):
        if (tenth, 1) in by and (every, 1) in by:
            a, b = by[(tenth, 1)], by[(every, 1)]
            print(
                f"\nper-record CPU, everything vs tenth, {tier} ({b['rules']} vs "
                f"{a['rules']} rules): "
                f"{b['full']['cpu_us_per_record'] / a['full']['cpu_us_per_record']:.2f}x"
            )
    if (STATELESS, 2) in by and (STATELESS, 1) in by:
        two = by[(STATELESS, 2)]["full"]["records_per_s"]
        one = by[(STATELESS, 1)]["full"]["records_per_s"]
        print(f"workers 2 vs 1 ({STATELESS}): {two / one:.2f}x")
    if ns.json:
        Path(ns.json).write_text(
            json.dumps(
                {"meta": {k: v for k, v in meta.items() if k != "chunks"}, "rows": rows}, indent=1
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
