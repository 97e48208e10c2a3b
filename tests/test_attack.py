"""The shipped ATT&CK table: lookups, v19 tactics, agreement with the Elastic corpus."""

from __future__ import annotations

import json
import re
from importlib import resources

from ruletag.rules import attack
from ruletag.rules.ir import Attack
from support.paths import corpus, needs_corpus


def test_tactic_shortnames_in_every_spelling() -> None:
    want = Attack("TA0005", "Defense Evasion")
    assert attack.tactic_by_shortname("defense-evasion") == want
    assert attack.tactic_by_shortname("defense_evasion") == want
    assert attack.tactic_by_shortname("Defense Evasion") == want
    assert attack.tactic_by_shortname("command_and_control") == Attack(
        "TA0011", "Command and Control"
    )
    assert attack.tactic_by_shortname("no-such-tactic") is None


def test_v19_tactics_stealth_and_defense_impairment() -> None:
    assert attack.tactic_by_shortname("stealth") == Attack("TA0005", "Stealth")
    assert attack.tactic_by_shortname("defense-impairment") == Attack(
        "TA0112", "Defense Impairment"
    )
    assert attack.tactic_by_id("TA0112") == Attack("TA0112", "Defense Impairment")
    # By id, TA0005 keeps the name of the release the table was generated from.
    assert attack.tactic_by_id("ta0005") == Attack("TA0005", "Defense Evasion")


def test_tactic_ids_and_techniques() -> None:
    assert attack.tactic_by_id("TA0008") == Attack("TA0008", "Lateral Movement")
    assert attack.tactic_by_id("TA9999") is None
    assert attack.technique("T1218") == Attack("T1218", "System Binary Proxy Execution")
    assert attack.technique("t1218.011") == Attack("T1218.011", "Rundll32")
    assert attack.technique(" T1210 ") == Attack("T1210", "Exploitation of Remote Services")
    assert attack.technique("T9999") is None
    assert attack.attack_version() == "18.1"


def test_table_shape() -> None:
    text = resources.files("ruletag").joinpath("data/attack.json").read_text("utf-8")
    table = json.loads(text)
    assert "gen_attack.py" in table["generated_by"]
    ids = [t["id"] for t in table["techniques"]]
    assert len(ids) == len(set(ids)) > 600
    assert all(re.fullmatch(r"T\d{4}(\.\d{3})?", i) for i in ids)
    shorts = [t["shortname"] for t in table["tactics"]]
    assert len(shorts) == len(set(shorts))
    assert all(re.fullmatch(r"TA\d{4}", t["id"]) for t in table["tactics"])


@needs_corpus
def test_every_elastic_threat_entry_agrees_with_the_table() -> None:
    """Elastic's [[rule.threat]] blocks carry MITRE ids and names: all must resolve the same."""
    elastic = corpus("elastic")
    pair = re.compile(r'^id = "((?:TA|T)\d{4}(?:\.\d{3})?)"\s*\nname = "([^"]*)"', re.M)
    seen = 0
    for path in elastic.rglob("*.toml"):
        if "_deprecated" in path.parts:  # retired rules keep names MITRE has since changed
            continue
        for ident, name in pair.findall(path.read_text("utf-8")):
            got = attack.tactic_by_id(ident) if ident.startswith("TA") else attack.technique(ident)
            assert got == Attack(ident, name), f"{path.name}: {ident} {name!r} -> {got}"
            seen += 1
    assert seen > 1000
