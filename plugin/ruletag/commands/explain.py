"""``ruletag rules explain``: one rule against each event of a file, as a traced condition tree.

The rules come from ``--rules`` or from a pipeline config's ``rules:`` section and are compiled
as ``serve`` compiles them (through the table cache), so the explanation also states the
compiled table's verdict beside the traced one; they must agree (a disagreement is a bug, and
the command then exits 3). The event file is one JSON object (pretty-printed or not), a JSON
array of objects, or JSON lines.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ruletag.commands.rules import read_vars, summary_line
from ruletag.errors import ConfigError
from ruletag.rules.explain import explain, to_text
from ruletag.rules.fields import FieldMap
from ruletag.rules.ir import Rule
from ruletag.rules.matcher import Matcher


def read_json_events(text: str) -> Iterator[dict[str, Any]]:
    """Records of a JSON object, array or JSON-lines text (non-objects are skipped)."""
    text = text.lstrip("\ufeff")
    try:
        whole = json.loads(text)
    except ValueError:
        whole = None
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise ConfigError(f"--event line {n}: not JSON: {exc}") from exc
            if isinstance(obj, dict):
                yield obj
        return
    if isinstance(whole, dict):
        yield whole
    elif isinstance(whole, list):
        yield from (x for x in whole if isinstance(x, dict))


def find_rule(rules: Sequence[Rule], wanted: str) -> int:
    """Index of the rule whose id or name is ``wanted`` (or whose name holds it, uniquely)."""
    for i, r in enumerate(rules):
        if r.id == wanted:
            return i
    low = wanted.lower()
    exact = [i for i, r in enumerate(rules) if r.name.lower() == low]
    if len(exact) == 1:
        return exact[0]
    part = exact or [i for i, r in enumerate(rules) if low in r.name.lower()]
    if len(part) == 1:
        return part[0]
    if not part:
        raise ConfigError(f"--rule {wanted!r}: no rule with that id or name")
    shown = "; ".join(f"{rules[i].id} {rules[i].name!r}" for i in part[:10])
    raise ConfigError(f"--rule {wanted!r} is ambiguous ({len(part)} rules): {shown}")


def _load(ns: argparse.Namespace) -> Any:
    from ruletag.rules.loader import compile_rules

    if ns.config:
        from ruletag.config.load import load_config

        config = load_config(ns.config)
        if config.rules is None:
            raise ConfigError(f"{ns.config}: no rules section")
        from ruletag.runtime.relay import rule_loader

        table, result = rule_loader(config)()
    else:
        table, result = compile_rules(ns.rules, read_vars(ns.vars))
    print(
        f"ruletag: rules: {summary_line(result)}" + (" [cached]" if result.cached else ""),
        file=sys.stderr,
    )
    return table


def explain_hits(
    rules: Sequence[Rule], hits: Sequence[int], record: Mapping[str, object], fmap: FieldMap
) -> list[dict[str, Any]]:
    """``match --explain``: the explanation of every rule that fired on ``record``."""
    out = []
    for i in hits:
        e = explain(rules[i], record, fmap).to_json()
        out.append(
            {
                "rule_id": rules[i].id,
                "name": rules[i].name,
                "logsource": e["logsource"],
                "condition": e["condition"],
                "verdict": e["verdict"],
            }
        )
    return out


def main_explain(ns: argparse.Namespace) -> int:
    """Entry point of ``ruletag rules explain``."""
    table = _load(ns)
    index = find_rule(table.rules, ns.rule)
    rule = table.rules[index]
    fmap = FieldMap.default()
    try:
        text = sys.stdin.read() if ns.event == "-" else Path(ns.event).read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        print(f"ruletag: {ns.event}: {exc}", file=sys.stderr)
        return 1
    matcher = Matcher(table, tune_after=0)
    disagree = 0
    n = 0
    for n, record in enumerate(read_json_events(text), 1):
        e = explain(rule, record, fmap)
        table_verdict = index in matcher.match(dict(record))
        disagree += table_verdict != e.verdict
        if ns.json:
            d = e.to_json()
            d["event"] = n
            d["table_verdict"] = table_verdict
            print(json.dumps(d, ensure_ascii=False, default=repr))
            continue
        if n > 1:
            print()
        print(f"event {n}:")
        print(to_text(e))
        if table_verdict != e.verdict:
            print(f"WARNING: the compiled table says {'MATCH' if table_verdict else 'no match'}")
    if n == 0:
        print(f"ruletag: {ns.event}: no JSON object found", file=sys.stderr)
        return 1
    return 3 if disagree else 0
