"""``ruletag rules check`` and ``ruletag rules compile``: load rules, report what cannot be
used and why, write the compiled pattern table."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ruletag.config.load import select_overrides
from ruletag.config.model import RulesConfig
from ruletag.errors import ConfigError, RuleError
from ruletag.rules.loader import (
    LoadResult,
    load_rules,
    problem_to_json,
    reason_key,
    select_rules,
    source_of,
)
from ruletag.rules.select import Selection

# --------------------------------------------------------------------------- shared helpers


def read_vars(path: str | None) -> dict[str, list[str]] | None:
    """The ``--vars`` YAML file: a map of placeholder name -> value or list of values."""
    if not path:
        return None
    try:
        data = yaml.safe_load(Path(path).read_text("utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"--vars {path}: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"--vars {path}: want a map of placeholder -> list of values")
    out: dict[str, list[str]] = {}
    for k, v in data.items():
        values = v if isinstance(v, list) else [v]
        out[str(k)] = ["" if x is None else str(x) for x in values]
    return out


def selection_from_args(ns: argparse.Namespace, rules: RulesConfig | None = None) -> Selection:
    """The selection of ``rules`` (a config's rules section; None = the defaults) with the
    selection flags of ``ns`` (``cli.add_select_flags``) replacing its values."""
    base = Selection.from_config(rules)
    select = select_overrides(
        base.select,
        sources=getattr(ns, "source", None),
        min_level=getattr(ns, "min_level", None),
        status=getattr(ns, "status", None),
        tags=getattr(ns, "tag", None),
        exclude_tags=getattr(ns, "exclude_tag", None),
        logsource=getattr(ns, "logsource", None),
        exclude_logsource=getattr(ns, "exclude_logsource", None),
        rule_types=getattr(ns, "rule_type", None),
    )
    exclude = getattr(ns, "exclude", None)
    return Selection(
        select,
        tuple(exclude) if exclude is not None else base.exclude,
        getattr(ns, "building_blocks", None) or base.building_blocks,
    )


def _problem_source(p: RuleError) -> str:
    return (source_of(Path(p.path)) if p.path else None) or "other"


def summarize(result: LoadResult) -> dict[str, Any]:
    """The ``rules check --json`` object."""
    by_source: dict[str, dict[str, int]] = {}

    def bucket(src: str) -> dict[str, int]:
        return by_source.setdefault(
            src, {"files": 0, "loaded": 0, "kept": 0, "unsupported": 0, "invalid": 0}
        )

    sel = result.selection
    for src, n in result.sources.items():
        bucket(src)["files"] = n
    for r in result.rules:
        bucket(r.source)["kept"] += 1
    for src, counts in (sel.by_source if sel is not None else {}).items():
        bucket(src)["loaded"] = counts["loaded"]
    if sel is None:
        for c in by_source.values():
            c["loaded"] = c["kept"]
    for p in result.problems:
        bucket(_problem_source(p))["unsupported" if p.kind == "unsupported" else "invalid"] += 1
    by_reason = Counter(f"{p.kind}: {reason_key(p.reason)}" for p in result.problems)
    return {
        "files": result.files,
        "loaded": sel.loaded if sel is not None else len(result.rules),
        "kept": len(result.rules),
        "unsupported": len(result.unsupported),
        "invalid": len(result.invalid),
        "duplicates": len(result.duplicates),
        "by_source": by_source,
        "by_reason": dict(by_reason.most_common()),
        "problems": [problem_to_json(p) for p in result.problems],
        "duplicate_messages": result.duplicates,
        "selection": sel.to_json() if sel is not None else None,
        "load_seconds": round(result.seconds, 3),
    }


def summary_line(result: LoadResult) -> str:
    s = summarize(result)
    per = ", ".join(
        f"{src} {c['loaded']}/{c['unsupported']}/{c['invalid']}"
        for src, c in sorted(s["by_source"].items())
    )
    return (
        f"{s['files']} files: {s['loaded']} loaded, {s['unsupported']} unsupported, "
        f"{s['invalid']} invalid, {s['duplicates']} duplicates"
        + (f", {s['kept']} kept by the selection" if s["kept"] != s["loaded"] else "")
        + (f" (loaded/unsupported/invalid by source: {per})" if per else "")
    )


# --------------------------------------------------------------------------- rules check


def check(ns: argparse.Namespace) -> int:
    """Load every rule; print each problem as ``file:line: reason``, what the selection kept
    (each filter's count) and a summary."""
    variables = read_vars(ns.vars)  # a bad --vars file: ConfigError, exit 2 (cli.main)
    selection = selection_from_args(ns)  # bad flags: ConfigError, exit 2
    result = load_rules(ns.paths, variables)
    select_rules(result, selection)
    if ns.json:
        print(json.dumps(summarize(result), ensure_ascii=False))
        return 0
    for p in result.problems:
        print(f"{p.path}:{p.line or 1}: {p.kind}: {p.reason}")
    for d in result.duplicates:
        print(f"warning: {d}")
    if result.selection is not None:
        print(result.selection.text())
    print(summary_line(result))
    return 0


# --------------------------------------------------------------------------- rules compile


def compile_(ns: argparse.Namespace) -> int:
    """Load and compile rules into a table file; print counts and times."""
    from ruletag.rules.compiler import build, save
    from ruletag.rules.fields import FieldMap
    from ruletag.rules.loader import cache_key, rule_files

    variables = read_vars(ns.vars)  # a bad --vars file: ConfigError, exit 2 (cli.main)
    selection = selection_from_args(ns)
    result = load_rules(ns.paths, variables)
    select_rules(result, selection)
    for p in result.problems:
        print(f"{p.path}:{p.line or 1}: {p.kind}: {p.reason}", file=sys.stderr)
    fmap = FieldMap.default()
    files = rule_files(ns.paths)[0]
    sel = selection
    version = cache_key(
        files, variables, fmap.version, None, sel.exclude, sel.building_blocks, sel.select
    )
    start = time.perf_counter()
    table = build(result.rules, fmap, version)
    built = time.perf_counter() - start
    out = Path(ns.output)
    try:
        save(table, out)
    except OSError as exc:
        print(f"ruletag: cannot write {out}: {exc}", file=sys.stderr)
        return 1
    if result.selection is not None:
        print(result.selection.text())
    print(summary_line(result))
    print(
        f"table {out}: version {version}, {len(table.rules)} rules, "
        f"{out.stat().st_size / 1048576:.2f} MiB; load {result.seconds:.2f}s, "
        f"compile {built:.2f}s"
    )
    stats = getattr(table, "stats", None)
    if isinstance(stats, Mapping):
        shown = {
            k: (len(v) if isinstance(v, list | tuple | dict | set) else v) for k, v in stats.items()
        }
        print("stats: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    return 0
