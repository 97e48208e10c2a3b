"""``ruletag validate``: load each pipeline config, its ``tests:`` block and its rules,
exactly as ``serve`` would, without starting anything; the rule selection flags replace the
configs' selection values."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from ruletag.commands.rules import selection_from_args
from ruletag.commands.test import load_rule_filter, parse_tests
from ruletag.config.load import load_config
from ruletag.config.model import Config
from ruletag.errors import ConfigError
from ruletag.rules.loader import problem_to_json
from ruletag.runtime.reload import problem_summary


def _with_flags(config: Config, ns: argparse.Namespace) -> Config:
    """``config`` with the selection flags of ``ns`` replacing its rules.select values."""
    if config.rules is None:
        return config
    sel = selection_from_args(ns, config.rules)
    rules = replace(
        config.rules, select=sel.select, exclude=sel.exclude, building_blocks=sel.building_blocks
    )
    return replace(config, rules=rules)


def main_validate(ns: argparse.Namespace) -> int:
    """Entry point of ``ruletag validate``: 0 if every config (and its rules) is valid, else 1.

    Loads each config, parses its ``tests:`` block, and loads and compiles its rules exactly as
    ``serve`` does. Rules that are unsupported or malformed are counted and listed (``serve``
    skips them too); a missing rule path or a rule set without one usable rule is invalid. What
    the rule selection kept is reported per filter. ``--json`` prints one object instead.
    """
    bad = 0
    as_json = bool(getattr(ns, "json", False))
    reports: list[dict[str, Any]] = []
    for path in ns.configs:
        try:
            config = _with_flags(load_config(path), ns)
            tests = 0
            if config.tests is not None:
                tests = len(parse_tests(config.tests.raw, Path(path).resolve().parent))
            rule_filter, result = load_rule_filter(config)
        except ConfigError as exc:
            where = "" if str(exc).startswith(str(path)) else f"{path}: "
            if as_json:
                reports.append({"config": str(path), "ok": False, "error": f"{where}{exc}"})
            else:
                print(f"INVALID {where}{exc}", file=sys.stderr)
            bad += 1
            continue
        if as_json:
            report: dict[str, Any] = {"config": str(path), "ok": True, "tests": tests}
            if rule_filter is not None and result is not None:
                report.update(
                    rules=len(rule_filter.table.rules),
                    version=rule_filter.table.version,
                    unsupported=len(result.unsupported),
                    invalid=len(result.invalid),
                    duplicates=len(result.duplicates),
                    selection=result.selection.to_json() if result.selection else None,
                    problems=[problem_to_json(p) for p in result.problems],
                )
            reports.append(report)
            continue
        parts = []
        if rule_filter is not None and result is not None:
            parts.append(
                f"{len(rule_filter.table.rules)} rules (version {rule_filter.table.version}), "
                f"{len(result.unsupported)} unsupported, {len(result.invalid)} invalid, "
                f"{len(result.duplicates)} duplicate ids"
                + (f", {result.excluded} excluded" if result.excluded else "")
                + (
                    f", {result.building_blocks} building-block rules left out"
                    if result.building_blocks
                    else ""
                )
            )
        else:
            parts.append("no rules")
        parts.append(f"{tests} tests")
        print(f"OK {path}: {'; '.join(parts)}")
        if result is not None and result.selection is not None:
            print(f"  {result.selection.text()}")
            if result.selection.loaded and not result.selection.kept:
                print("  warning: the rule selection left no rule: records pass unchanged")
        if result is not None and (result.problems or result.duplicates):
            print(f"  {problem_summary(result)}")
            for problem in result.problems[:20]:
                print(f"  {problem.kind}: {problem}")
            if len(result.problems) > 20:
                print(f"  ... and {len(result.problems) - 20} more (ruletag rules check)")
    if as_json:
        print(json.dumps({"ok": not bad, "configs": reports}, ensure_ascii=False))
    return 1 if bad else 0
