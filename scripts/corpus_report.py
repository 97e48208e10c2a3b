"""Corpus figures: how much of the Sigma and Elastic rule corpora ruletag loads and compiles.

Usage: ``python scripts/corpus_report.py [--json] SIGMA_DIR ELASTIC_DIR``, for example
``python scripts/corpus_report.py ../shared/rules/sigma ../shared/rules/elastic``.

Prints, per corpus and for both together: files, loaded / unsupported / invalid rules,
duplicates, the top reasons, the share of Elastic EQL rules that are single-event (the only
kind loaded today; sequences are reported unsupported), load time, compile time, table file
size and the time to load the table file back.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ruletag.commands.rules import summarize
from ruletag.rules.compiler import build, load, save
from ruletag.rules.fields import FieldMap
from ruletag.rules.loader import load_rules

_LANGUAGE = re.compile(r'^language\s*=\s*"([^"]+)"', re.M)
_SEQUENCE = re.compile(r"^\s*(sequence|sample)\b", re.M)


def eql_share(folder: Path) -> dict[str, int]:
    """Elastic rules by query kind (from the TOML text, independent of the loader)."""
    counts = {"eql_single_event": 0, "eql_sequence_or_sample": 0, "other_language": 0}
    for f in sorted(folder.rglob("*.toml")):
        if "_deprecated" in f.parts:
            continue
        text = f.read_text("utf-8", errors="replace")
        m = _LANGUAGE.search(text)
        if not m or m.group(1) != "eql":
            counts["other_language"] += 1
            continue
        query = text.split("query = ", 1)[-1]
        key = "eql_sequence_or_sample" if _SEQUENCE.search(query[:400]) else "eql_single_event"
        counts[key] += 1
    return counts


def measure(name: str, paths: list[Path], fieldmap: FieldMap) -> dict[str, Any]:
    result = load_rules(paths)
    summary = summarize(result)
    t0 = time.perf_counter()
    table = build(result.rules, fieldmap, name)
    compile_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "corpus.table"
        save(table, out)
        size = out.stat().st_size
        t1 = time.perf_counter()
        load(out)
        table_load_s = time.perf_counter() - t1
    return {
        "name": name,
        "files": summary["files"],
        "loaded": summary["loaded"],
        "unsupported": summary["unsupported"],
        "invalid": summary["invalid"],
        "duplicates": summary["duplicates"],
        "by_source": summary["by_source"],
        "top_reasons": dict(list(summary["by_reason"].items())[:12]),
        "load_seconds": round(result.seconds, 2),
        "compile_seconds": round(compile_s, 2),
        "table_bytes": size,
        "table_load_seconds": round(table_load_s, 3),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sigma", type=Path, help="the Sigma corpus folder")
    ap.add_argument("elastic", type=Path, help="the Elastic detection-rules corpus folder")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ns = ap.parse_args(argv)
    fm = FieldMap.default()
    report = {
        "sigma": measure("sigma", [ns.sigma], fm),
        "elastic": measure("elastic", [ns.elastic], fm),
        "both": measure("both", [ns.sigma, ns.elastic], fm),
        "elastic_query_kinds": eql_share(ns.elastic),
    }
    if ns.json:
        print(json.dumps(report, indent=1))
        return 0
    for key in ("sigma", "elastic", "both"):
        r = report[key]
        print(
            f"{key}: {r['files']} files, {r['loaded']} loaded, {r['unsupported']} unsupported, "
            f"{r['invalid']} invalid, {r['duplicates']} duplicates; load {r['load_seconds']}s, "
            f"compile {r['compile_seconds']}s, table {r['table_bytes'] / 1048576:.1f} MiB "
            f"(reload {r['table_load_seconds']}s)"
        )
        for reason, n in r["top_reasons"].items():
            print(f"    {n:5d}  {reason}")
    kinds = report["elastic_query_kinds"]
    eql = kinds["eql_single_event"] + kinds["eql_sequence_or_sample"]
    share = kinds["eql_single_event"] / eql if eql else 0.0
    print(
        f"elastic (active rules): {eql} EQL, {kinds['eql_single_event']} single-event "
        f"({share:.0%}), {kinds['eql_sequence_or_sample']} sequence/sample; "
        f"{kinds['other_language']} other languages"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
