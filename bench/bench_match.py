"""Matching throughput of the compiled table (not a test: prints figures).

~1 KB ECS- and Sysmon-shaped records, 0.5% of them tripping a rule, matched with the bundled
seed rules only and, given ``--corpus``, with every rule of a corpus: records/s for
``match()`` and for ``match_entries()`` on packed chunks of 1000 entries (with the compiled
pre-filter triggers, then re-tuned on the same records), plus compile time, file size, load
time.

    .venv/bin/python bench/bench_match.py [--records 20000] [--corpus RULES...]
    .venv/bin/python bench/bench_match.py --corpus ../shared/rules   # e.g. the shared corpora
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import msgpack

from ruletag.rules.compiler import build, load, save
from ruletag.rules.fields import FieldMap
from ruletag.rules.loader import load_rules
from ruletag.rules.matcher import Matcher

SEEDS = Path(__file__).resolve().parents[1] / "plugin" / "ruletag" / "data" / "rules"
WORDS = (
    "alpha",
    "beta",
    "gamma",
    "delta",
    "update",
    "service",
    "host",
    "agent",
    "module",
    "event",
    "data",
    "value",
)


def _pad(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def sysmon(rng: random.Random, hot: bool) -> dict:
    image = (
        "C:\\Windows\\System32\\wuauclt.exe"
        if hot
        else f"C:\\Program Files\\App{rng.randint(1, 999)}\\app.exe"
    )
    return {
        "EventID": 3,
        "Channel": "Microsoft-Windows-Sysmon/Operational",
        "Provider_Name": "Microsoft-Windows-Sysmon",
        "Computer": f"ws-{rng.randint(1, 9999)}.corp.example.com",
        "EventRecordID": rng.randint(1, 10**9),
        "UtcTime": "2024-05-01 12:00:00.000",
        "ProcessGuid": f"{{{rng.getrandbits(32):08x}-0000-0000-0000-000000000000}}",
        "ProcessId": rng.randint(100, 60000),
        "Image": image,
        "CommandLine": (image + " /RunHandlerComServer") if hot else image + " --" + _pad(rng, 12),
        "User": f"CORP\\user{rng.randint(1, 500)}",
        "Protocol": "tcp",
        "Initiated": True,
        "SourceIp": f"10.0.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
        "SourcePort": rng.randint(1024, 65535),
        "DestinationIp": f"93.184.216.{rng.randint(1, 254)}",
        "DestinationHostname": f"cdn{rng.randint(1, 99)}.example.net",
        "DestinationPort": 443,
        "Description": _pad(rng, 40),
    }


def ecs(rng: random.Random, hot: bool) -> dict:
    parent = "wuauclt.exe" if hot else "explorer.exe"
    exe = (
        "C:\\Windows\\SoftwareDistribution\\Download\\Install\\psexec64.exe"
        if hot
        else f"C:\\Users\\u{rng.randint(1, 500)}\\AppData\\Local\\tool{rng.randint(1, 99)}.exe"
    )
    return {
        "@timestamp": "2024-05-01T12:00:00.000Z",
        "event": {
            "kind": "event",
            "type": ["start"],
            "category": ["process"],
            "module": "endpoint",
            "dataset": "endpoint.events.process",
        },
        "host": {
            "name": f"WS-{rng.randint(1, 9999)}",
            "os": {
                "type": "windows",
                "family": "windows",
                "name": "Windows 10 Pro",
                "version": "22H2",
            },
        },
        "agent": {"type": "endpoint", "version": "8.13.2"},
        "process": {
            "pid": rng.randint(100, 60000),
            "name": exe.rsplit("\\", 1)[1],
            "executable": exe,
            "command_line": exe + " " + _pad(rng, 15),
            "parent": {
                "name": parent,
                "executable": "C:\\Windows\\System32\\" + parent,
                "pid": rng.randint(100, 60000),
            },
            "pe": {"original_file_name": "psexec.c" if hot else "tool.exe"},
        },
        "user": {"name": f"u{rng.randint(1, 500)}", "domain": "CORP"},
        "message": _pad(rng, 45),
    }


def make_records(n: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    return [(sysmon if k % 2 else ecs)(rng, rng.random() < 0.005) for k in range(n)]


def chunks(records: list[dict], size: int = 1000) -> list[tuple[bytes, list[tuple[int, int]]]]:
    out = []
    for i in range(0, len(records), size):
        buf = bytearray()
        spans = []
        for rec in records[i : i + size]:
            start = len(buf)
            buf += msgpack.packb([1714564800, rec])
            spans.append((start, len(buf)))
        out.append((bytes(buf), spans))
    return out


def bench(name: str, paths: list[Path], records: list[dict]) -> None:
    fm = FieldMap.default()
    t = time.perf_counter()
    rules = load_rules(paths).rules
    t_load_rules = time.perf_counter() - t
    t = time.perf_counter()
    table = build(rules, fm)
    t_build = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "table.bin"
        save(table, path)
        size = path.stat().st_size
        t = time.perf_counter()
        table = load(path)
        t_load = time.perf_counter() - t
    m = Matcher(table)
    t = time.perf_counter()
    hits = sum(bool(m.match(r)) for r in records)
    rate_match = len(records) / (time.perf_counter() - t)
    packed = chunks(records)
    m.set_tune_after(0)  # first the compiled triggers (the length guess) ...
    t = time.perf_counter()
    hits2 = sum(len(m.match_entries(buf, spans)) for buf, spans in packed)
    rate_entries = len(records) / (time.perf_counter() - t)
    # ... then the filter re-tuned on these records (docs/rules.md), waited for
    m.set_tune_after(len(records))
    t = time.perf_counter()
    while "raw_tuned_on_records" not in m.stats and time.perf_counter() - t < 120:
        for buf, spans in packed:
            m.match_entries(buf, spans)
    t_tune = time.perf_counter() - t
    t = time.perf_counter()
    hits3 = sum(len(m.match_entries(buf, spans)) for buf, spans in packed)
    rate_tuned = len(records) / (time.perf_counter() - t)
    avg = sum(len(buf) for buf, _ in packed) / len(records)
    st = m.stats
    print(f"== {name}: {len(rules)} rules (parsed in {t_load_rules:.1f}s)")
    print(f"   compile {t_build:.1f}s, table file {size / 1e6:.1f} MB, load {t_load:.2f}s")
    print(
        f"   atoms {st['atoms']}, databases {st['databases']}, "
        f"untriggered rules {len(st['rules_without_literal'])}, "
        f"rules without raw literal {len(st.get('rules_without_raw_literal', []))}"
    )
    print(f"   records {len(records)} (~{avg:.0f} B packed), matching {hits} / {hits2} / {hits3}")
    print(f"   match():         {rate_match:10.0f} records/s")
    print(f"   match_entries(): {rate_entries:10.0f} records/s (compiled triggers)")
    print(
        f"   match_entries(): {rate_tuned:10.0f} records/s (re-tuned, "
        f"{st.get('hot_rules', 0)} often-passed rules; sampling + tuning took {t_tune:.1f}s)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=20000)
    ap.add_argument(
        "--corpus",
        nargs="+",
        type=Path,
        metavar="RULES",
        help="rule files or folders to bench as the whole corpus",
    )
    ap.add_argument("--seeds-only", action="store_true", help="ignore --corpus")
    args = ap.parse_args()
    records = make_records(args.records)
    bench("seed rules", [SEEDS], records)
    if args.corpus and not args.seeds_only:
        bench("whole corpus", args.corpus, records)


if __name__ == "__main__":
    main()
