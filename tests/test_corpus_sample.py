"""The pinned corpus sample (``tests/data/corpus``): every file loads, or fails, exactly as
``MANIFEST.json`` records; its ATT&CK entries agree with the shipped table; and the compiled
table agrees with the reference evaluator on it. The sample holds, for every feature the
corpora exercise, one rule using it (see ``tests/data/README.md``), so these run on every
``make test``; the whole-corpus versions run when ``RULETAG_CORPUS`` is set."""

from __future__ import annotations

import json
import re
from functools import cache

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ruletag.errors import RuleError
from ruletag.rules import attack
from ruletag.rules.compiler import build
from ruletag.rules.elastic import load_elastic_file
from ruletag.rules.fields import FieldMap
from ruletag.rules.ir import Attack, Rule
from ruletag.rules.loader import load_rules
from ruletag.rules.matcher import Matcher
from ruletag.rules.sigma import load_sigma_file
from support.paths import SAMPLE
from test_differential import _check, _material, records_from

MANIFEST: dict[str, dict[str, object]] = json.loads((SAMPLE / "MANIFEST.json").read_text())
LICENSES = [
    "sigma/LICENSE",
    "sigma/LICENSE.Detection.Rules.md",
    "elastic/LICENSE.txt",
    "elastic/NOTICE.txt",
]


def rule_files() -> list[str]:
    return sorted(
        p.relative_to(SAMPLE).as_posix() for p in SAMPLE.rglob("*") if p.suffix in (".yml", ".toml")
    )


def outcome(rel: str) -> str:
    load = load_sigma_file if rel.startswith("sigma/") else load_elastic_file
    try:
        load(SAMPLE / rel)
    except RuleError as exc:
        return f"{exc.kind}: {exc.reason}"
    return "loaded"


@cache
def sample_rules() -> tuple[Rule, ...]:
    result = load_rules([SAMPLE / "sigma", SAMPLE / "elastic"])
    return tuple(result.rules)


def test_manifest_lists_every_file_and_the_licenses_travel_with_them() -> None:
    assert rule_files() == sorted(MANIFEST)
    assert all((SAMPLE / name).is_file() for name in LICENSES)
    assert {m["outcome"] for m in MANIFEST.values()} >= {"loaded"}
    assert all(m["chosen_for"] for m in MANIFEST.values())


@pytest.mark.parametrize("rel", sorted(MANIFEST))
def test_each_sample_file_loads_as_recorded(rel: str) -> None:
    assert outcome(rel) == MANIFEST[rel]["outcome"]


def test_the_loader_reports_the_sample_like_the_front_ends() -> None:
    result = load_rules([SAMPLE / "sigma", SAMPLE / "elastic"])
    loaded = sum(m["outcome"] == "loaded" for m in MANIFEST.values())
    assert len({r.path for r in result.rules}) == loaded
    assert sorted(f"{p.kind}: {p.reason}" for p in result.problems) == sorted(
        str(m["outcome"]) for m in MANIFEST.values() if m["outcome"] != "loaded"
    )


def test_sample_threat_entries_agree_with_the_attack_table() -> None:
    pair = re.compile(r'^id = "((?:TA|T)\d{4}(?:\.\d{3})?)"\s*\nname = "([^"]*)"', re.M)
    seen = 0
    for path in (SAMPLE / "elastic").rglob("*.toml"):
        if "_deprecated" in path.parts:
            continue
        for ident, name in pair.findall(path.read_text("utf-8")):
            got = attack.tactic_by_id(ident) if ident.startswith("TA") else attack.technique(ident)
            assert got == Attack(ident, name), f"{path.name}: {ident} {name!r} -> {got}"
            seen += 1
    assert seen > 20


FM = FieldMap.default()


@cache
def sample_table() -> tuple[Matcher, list[str], list[str]]:
    rules = list(sample_rules())
    fields, texts = _material(rules, FM)
    return Matcher(build(rules, FM)), fields, texts


def _records() -> st.SearchStrategy[list[dict]]:
    _, fields, texts = sample_table()
    return st.lists(records_from(fields, texts), min_size=1, max_size=6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.deferred(_records))
def test_table_agrees_with_reference_on_the_sample(records: list[dict]) -> None:
    table, _, _ = sample_table()
    _check(table, FM, records)
