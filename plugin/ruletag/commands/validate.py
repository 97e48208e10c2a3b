"""``ruletag validate``: load each pipeline config, its ``tests:`` block and its rules,
exactly as ``serve`` would, without starting anything."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ruletag.commands.test import load_rule_filter, parse_tests
from ruletag.config.load import load_config
from ruletag.errors import ConfigError
from ruletag.runtime.reload import problem_summary


def main_validate(ns: argparse.Namespace) -> int:
    """Entry point of ``ruletag validate``: 0 if every config (and its rules) is valid, else 1.

    Loads each config, parses its ``tests:`` block, and loads and compiles its rules exactly as
    ``serve`` does. Rules that are unsupported or malformed are counted and listed (``serve``
    skips them too); a missing rule path or a rule set without one usable rule is invalid.
    """
    bad = 0
    for path in ns.configs:
        try:
            config = load_config(path)
            tests = 0
            if config.tests is not None:
                tests = len(parse_tests(config.tests.raw, Path(path).resolve().parent))
            rule_filter, result = load_rule_filter(config)
        except ConfigError as exc:
            where = "" if str(exc).startswith(str(path)) else f"{path}: "
            print(f"INVALID {where}{exc}", file=sys.stderr)
            bad += 1
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
        if result is not None and (result.problems or result.duplicates):
            print(f"  {problem_summary(result)}")
            for problem in result.problems[:20]:
                print(f"  {problem.kind}: {problem}")
            if len(result.problems) > 20:
                print(f"  ... and {len(result.problems) - 20} more (ruletag rules check)")
    return 1 if bad else 0
