"""Rule selection (``rules.select``, ``rules.exclude``, ``rules.building_blocks`` and the
selection flags): each filter on the pinned corpus sample, defaults, config errors, flags over
config, the cache key, the counts ``rules check`` / ``validate`` report, and a real relay."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from ruletag.cli import build_parser, main
from ruletag.commands.rules import selection_from_args
from ruletag.config.load import config_from_mapping, parse_select, select_overrides
from ruletag.config.model import DEFAULT_STATUS, SelectConfig
from ruletag.errors import ConfigError
from ruletag.rules.ir import Const, Rule
from ruletag.rules.loader import cache_key, compile_rules, load_rules, rule_files
from ruletag.rules.select import Selection, rule_status, rule_tags
from support.paths import ELASTIC_SEED, SAMPLE, SEED_RULES, SIGMA_SEED
from support.servers import ServeProcess

MIN = {"forward": {"servers": [{"host": "127.0.0.1", "port": 24225}]}}


@pytest.fixture(scope="module")
def sample() -> list[Rule]:
    """The Sigma and Elastic single-event EQL rules of the sample (the KQL, ES|QL and EQL
    sequence rules added with their front-ends have their own tests; leaving them out keeps
    these counts fixed)."""
    rules = [
        r
        for r in load_rules([SAMPLE]).rules
        if r.kind == "event" and (r.source == "sigma" or r.rule_type == "eql")
    ]
    assert len(rules) == 28  # 17 Elastic (4 building blocks), 11 Sigma
    return rules


def stems(rules: list[Rule]) -> set[str]:
    return {Path(r.path).stem for r in rules}


def kept(rules: list[Rule], **select: Any) -> list[Rule]:
    extra = {k: select.pop(k) for k in ("exclude", "building_blocks") if k in select}
    out, _ = Selection(SelectConfig(**select), **extra).apply(rules)
    return out


# --------------------------------------------------------------------------- metadata


def test_front_ends_set_status_and_rule_type(sample: list[Rule]) -> None:
    sigma = [r for r in sample if r.source == "sigma"]
    elastic = [r for r in sample if r.source == "elastic"]
    assert {r.status for r in sigma} == {"test", "experimental"}
    assert {r.rule_type for r in sigma} == {""}
    assert {r.status for r in elastic} == {"production"}
    assert {r.rule_type for r in elastic} == {"eql"}
    assert {rule_status(r) for r in elastic} == {"stable"}


def test_rule_tags_include_attack_ids_names_and_parent_techniques(sample: list[Rule]) -> None:
    (robin,) = [r for r in sample if "raspberry_robin" in r.path]
    tags = rule_tags(robin)
    for t in ("attack.execution", "ta0002", "attack.t1059.001", "t1059", "attack.t1059"):
        assert t in tags
    assert "detection.emerging-threats" in tags
    (k8s,) = [r for r in sample if "execution_forbidden_creation_request" in r.path]
    assert {"tactic:execution", "attack.execution", "domain:kubernetes"} <= rule_tags(k8s)


# --------------------------------------------------------------------------- each filter


def test_defaults_keep_every_sample_rule(sample: list[Rule]) -> None:
    out, report = Selection().apply(sample)
    assert out == sample
    assert (report.loaded, report.kept) == (28, 28)
    assert [(s.filter, s.left_out) for s in report.steps] == [("status", 0)]
    assert SelectConfig().status == DEFAULT_STATUS == ("stable", "test", "experimental")
    assert Selection().key() == ""


def test_sources(sample: list[Rule]) -> None:
    assert {r.source for r in kept(sample, sources=("sigma",))} == {"sigma"}
    assert len(kept(sample, sources=("elastic",))) == 17


def test_min_level(sample: list[Rule]) -> None:
    high = kept(sample, min_level="high")
    assert {r.severity for r in high} == {"high", "critical"}
    assert len(high) == 8
    assert stems(kept(sample, min_level="critical")) == {"web_cve_2021_26858_iis_rce"}
    assert len(kept(sample, min_level="medium")) == 28 - 5  # the five low Elastic rules
    assert len(kept(sample, min_level="informational")) == 28


def test_status(sample: list[Rule]) -> None:
    stable_test = kept(sample, status=("stable", "test"))
    assert {rule_status(r) for r in stable_test} == {"stable", "test"}
    assert len(stable_test) == 28 - 5  # five experimental Sigma rules
    assert len(kept(sample, status=("stable",))) == 17  # Elastic production = stable
    assert len(kept(sample, status=("experimental",))) == 5


def _sigma_with(status: str | None, tmp: Path, name: str) -> Path:
    text = SIGMA_SEED.read_text("utf-8")
    text = re.sub(r"^id: .*$", f"id: {uuid.uuid5(uuid.NAMESPACE_URL, name)}", text, flags=re.M)
    text = re.sub(r"^title: .*$", f"title: {name}", text, flags=re.M)
    text = re.sub(r"^status: .*\n", f"status: {status}\n" if status else "", text, flags=re.M)
    path = tmp / f"{name}.yml"
    path.write_text(text, "utf-8")
    return path


def test_status_defaults_leave_out_deprecated_and_unsupported(tmp_path: Path) -> None:
    for status in ("stable", "test", "experimental", "deprecated", "unsupported", None):
        _sigma_with(status, tmp_path, f"s{status or 'none'}")
    toml = ELASTIC_SEED.read_text("utf-8").replace('maturity = "production"', "")
    (tmp_path / "dev.toml").write_text(
        toml.replace("[metadata]", '[metadata]\nmaturity = "development"')
    )
    rules = load_rules([tmp_path]).rules
    assert len(rules) == 7
    out, report = Selection().apply(rules)
    assert {r.status for r in out} == {"stable", "test", "experimental", "", "development"}
    assert report.steps[0].left_out == 2
    # a rule without status counts as experimental, Elastic development too
    assert {r.name for r in kept(rules, status=("experimental",))} == {
        "sexperimental",
        "snone",
        "Potential WSUS Abuse for Lateral Movement",
    }
    assert len(kept(rules, status=("deprecated", "unsupported"))) == 2


def test_rule_types(sample: list[Rule]) -> None:
    assert len(kept(sample, rule_types=("eql",))) == 28
    only_sigma = kept(sample, rule_types=("esql", "query"))
    assert {r.source for r in only_sigma} == {"sigma"} and len(only_sigma) == 11
    q = Rule("q", "kql rule", "elastic", Const(True), rule_type="query")
    assert kept([q], rule_types=("query",)) == [q]
    assert kept([q], rule_types=("eql",)) == []


def test_logsource(sample: list[Rule]) -> None:
    win = kept(sample, logsource=("product=windows",))
    sigma_win = [r for r in win if r.source == "sigma"]
    assert len(sigma_win) == 9 and len(win) == 9 + 17  # Elastic rules carry no logsource
    proc = kept(sample, logsource=("product=windows,category=process_*",))
    assert len([r for r in proc if r.source == "sigma"]) == 4
    two = kept(sample, logsource=("category=webserver", "service=aaa"), sources=("sigma",))
    assert stems(two) == {"web_cve_2021_26858_iis_rce", "cisco_cli_disable_logging"}
    no_proc = kept(sample, exclude_logsource=("category=process_creation",))
    assert len(no_proc) == 28 - 4


def test_tags_include_exclude(sample: list[Rule]) -> None:
    assert stems(kept(sample, tags=("T1059",))) == {
        "proc_creation_win_malware_raspberry_robin_execution"
    }
    assert kept(sample, tags=("attack.t1059",)) == kept(sample, tags=("t1059*",))
    et = kept(sample, tags=("detection.emerging_threats",))  # _ and - are one
    assert len(et) == 3 and {r.source for r in et} == {"sigma"}
    execution = kept(sample, tags=("attack.execution",))
    assert len(execution) == 6  # Sigma tags and Elastic [[rule.threat]] tactics
    assert len(kept(sample, tags=("TA0002",))) == 6
    assert len(kept(sample, tags=("Tactic: Execution",))) == 2  # the Elastic tag itself
    assert len(kept(sample, exclude_tags=("cve.*",))) == 28 - 2
    both = kept(sample, tags=("detection.*",), exclude_tags=("cve.*",))
    assert stems(both) == {"proc_creation_win_malware_raspberry_robin_execution"}
    # TA0005 has two names: a rule tagged attack.stealth is selected by defense-evasion too
    stealth = kept(sample, tags=("attack.stealth",))
    assert kept(sample, tags=("attack.defense-evasion",)) == stealth and stealth


def test_building_blocks_and_exclude_are_filters(sample: list[Rule]) -> None:
    out, report = Selection(building_blocks="drop").apply(sample)
    assert len(out) == 24 and report.left_out("building_blocks") == 4
    robin = next(r for r in sample if "raspberry_robin" in r.path)
    out, report = Selection(exclude=(robin.id, "Potential * Relay*")).apply(sample)
    assert len(out) == 26 and report.left_out("exclude") == 2


def test_filters_report_in_order(sample: list[Rule]) -> None:
    sel = Selection(
        SelectConfig(min_level="medium", status=("stable", "test"), exclude_tags=("cve.*",)),
        building_blocks="drop",
    )
    out, report = sel.apply(sample)
    steps = [(s.filter, s.left_out, s.kept) for s in report.steps]
    assert steps == [
        ("status", 5, 23),
        ("min_level", 5, 18),
        ("exclude_tags", 1, 17),
        ("building_blocks", 0, 17),
    ]
    assert report.kept == len(out) == 17
    assert report.by_source == {
        "elastic": {"loaded": 17, "kept": 12},
        "sigma": {"loaded": 11, "kept": 5},
    }
    assert "status stable,test: 5 left out" in report.text()


# --------------------------------------------------------------------------- config


def rules_cfg(select: Any, **extra: Any) -> Any:
    cfg = config_from_mapping({**MIN, "rules": {"paths": ["r/"], "select": select, **extra}})
    assert cfg.rules is not None
    return cfg.rules


def test_config_defaults_and_values() -> None:
    cfg = config_from_mapping({**MIN, "rules": {"paths": ["r/"]}})
    assert cfg.rules is not None and cfg.rules.select == SelectConfig()
    sel = rules_cfg(
        {
            "sources": ["Sigma"],
            "min_level": "High",
            "status": "stable, test, production",
            "tags": {"include": ["T1059", "attack.execution"], "exclude": "cve.*"},
            "logsource": {
                "include": [{"product": "windows", "category": "process_creation"}],
                "exclude": ["service=sysmon"],
            },
            "rule_types": ["eql", "esql"],
        }
    ).select
    assert sel == SelectConfig(
        sources=("sigma",),
        min_level="high",
        status=("stable", "test"),  # production is Elastic's word for stable
        tags=("T1059", "attack.execution"),
        exclude_tags=("cve.*",),
        logsource=("product=windows,category=process_creation",),
        exclude_logsource=("service=sysmon",),
        rule_types=("eql", "esql"),
    )
    assert rules_cfg({"tags": ["a.*"]}).select.tags == ("a.*",)  # a list means include


@pytest.mark.parametrize(
    ("select", "key"),
    [
        ({"min_level": "severe"}, r"rules\.select\.min_level: must be one of"),
        ({"status": ["stable", "done"]}, r"rules\.select\.status: 'done' is not one of"),
        ({"status": []}, r"rules\.select\.status: must name at least one"),
        ({"sources": ["splunk"]}, r"rules\.select\.sources: 'splunk'"),
        ({"sources": 3}, r"rules\.select\.sources: must be a list"),
        ({"tags": {"include": [""]}}, r"rules\.select\.tags\.include\[0\]"),
        ({"tags": {"only": ["x"]}}, r"rules\.select\.tags\.only: unknown key"),
        ({"logsource": {"include": ["os=windows"]}}, r"rules\.select\.logsource\.include\[0\]"),
        ({"logsource": {"exclude": ["windows"]}}, r"logsource\.exclude\[0\]: .*key=value"),
        ({"rule_types": ["kql"]}, r"rules\.select\.rule_types: 'kql'"),
        ({"level": "high"}, r"rules\.select\.level: unknown key"),
        ("high", r"rules\.select: must be a mapping"),
    ],
)
def test_config_errors_name_the_key(select: Any, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        rules_cfg(select)


def test_parse_select_alone() -> None:
    assert parse_select(None) == SelectConfig()
    with pytest.raises(ConfigError, match=r"^x\.min_level"):
        parse_select({"min_level": 1}, "x")


# --------------------------------------------------------------------------- flags


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_flags_override_config() -> None:
    rules = rules_cfg(
        {"min_level": "high", "status": ["stable"], "tags": {"exclude": ["cve.*"]}},
        exclude=["a"],
        building_blocks="drop",
    )
    ns = parse("rules", "check", "x", "--min-level", "low", "--tag", "T1059", "--tag", "T1003")
    sel = selection_from_args(ns, rules)
    assert sel.select.min_level == "low"  # the flag wins
    assert sel.select.tags == ("T1059", "T1003")
    assert sel.select.status == ("stable",) and sel.select.exclude_tags == ("cve.*",)  # kept
    assert (sel.exclude, sel.building_blocks) == (("a",), "drop")
    ns = parse(
        "validate", "c.yaml", "--status", "stable,test", "--source", "elastic",
        "--exclude", "b*", "--building-blocks", "keep", "--logsource", "product=linux",
        "--exclude-logsource", "category=file_event", "--rule-type", "eql",
        "--exclude-tag", "detection.*",
    )  # fmt: skip
    sel = selection_from_args(ns, rules)
    assert sel.select.status == ("stable", "test") and sel.select.sources == ("elastic",)
    assert (sel.exclude, sel.building_blocks) == (("b*",), "keep")
    assert sel.select.logsource == ("product=linux",)
    assert sel.select.exclude_logsource == ("category=file_event",)
    assert sel.select.rule_types == ("eql",) and sel.select.exclude_tags == ("detection.*",)
    assert selection_from_args(parse("rules", "check", "x")) == Selection()


@pytest.mark.parametrize(
    ("flags", "msg"),
    [
        ({"min_level": "urgent"}, "--min-level"),
        ({"status": ["stable,nope"]}, "--status"),
        ({"sources": ["x"]}, "--source"),
        ({"logsource": ["product"]}, "--logsource"),
        ({"rule_types": ["lucene"]}, "--rule-type"),
    ],
)
def test_flag_errors_name_the_flag(flags: dict[str, Any], msg: str) -> None:
    with pytest.raises(ConfigError, match=f"^{msg}"):
        select_overrides(SelectConfig(), **flags)


# --------------------------------------------------------------------------- cache key


def test_selection_is_part_of_the_cache_key(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    full, r0 = compile_rules([SAMPLE], cache_dir=cache)
    high, r1 = compile_rules([SAMPLE], cache_dir=cache, select=SelectConfig(min_level="high"))
    n_high = len(kept(list(full.rules), min_level="high"))
    assert 0 < n_high < len(full.rules)
    assert high.version != full.version and len(high.rules) == n_high and not r1.cached
    again, r2 = compile_rules([SAMPLE], cache_dir=cache, select=SelectConfig(min_level="high"))
    assert r2.cached and again.version == high.version and len(again.rules) == n_high
    assert r1.selection is not None and r2.selection is not None
    assert r2.selection.to_json() == r1.selection.to_json()
    tagged, _ = compile_rules([SAMPLE], cache_dir=cache, select=SelectConfig(tags=("T1059",)))
    assert len({full.version, high.version, tagged.version}) == 3
    # an explicit default selection is the same table as none
    default, r3 = compile_rules([SAMPLE], cache_dir=cache, select=SelectConfig())
    assert default.version == full.version and r3.cached and r0.selection is not None
    files = rule_files([SAMPLE])[0]
    keys = {
        cache_key(files, None, "v", select=SelectConfig(status=("stable",))),
        cache_key(files, None, "v", select=SelectConfig(status=("stable", "test"))),
        cache_key(files, None, "v", select=SelectConfig(logsource=("product=windows",))),
        cache_key(files, None, "v", select=SelectConfig(rule_types=("eql",))),
        cache_key(files, None, "v"),
    }
    assert len(keys) == 5


# --------------------------------------------------------------------------- commands


def test_rules_check_reports_each_filter(capsys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["rules", "check", str(SAMPLE), "--min-level", "medium", "--status", "stable,test"]
    assert main([*args, "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    every = load_rules([SAMPLE]).rules
    _, want = Selection(SelectConfig(min_level="medium", status=("stable", "test"))).apply(every)
    assert (s["loaded"], s["kept"]) == (len(every), want.kept) and want.kept < len(every)
    assert s["by_source"]["sigma"]["loaded"] == 11 and s["by_source"]["sigma"]["kept"] == 6
    filters = {f["filter"]: (f["left_out"], f["kept"]) for f in s["selection"]["filters"]}
    assert filters == {f.filter: (f.left_out, f.kept) for f in want.steps}
    assert filters["status"][0] == 5  # the five experimental Sigma rules
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-2] == (
        f"selection: {len(every)} loaded, {want.kept} kept (status stable,test: 5 left out; "
        f"min_level medium: {want.left_out('min_level')} left out)"
    )
    assert re.match(
        rf"\d+ files: {len(every)} loaded, \d+ unsupported, 0 invalid, 0 duplicates, "
        rf"{want.kept} kept",
        out[-1],
    ), out[-1]
    assert main(["rules", "check", str(SAMPLE), "--min-level", "bad"]) == 2
    assert "--min-level: must be one of" in capsys.readouterr().err


def test_rules_compile_and_match_apply_flags(tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "t.table"
    assert main(["rules", "compile", str(SEED_RULES), "-o", str(out), "--source", "sigma"]) == 0
    text = capsys.readouterr().out
    assert "table" in text and ", 1 rules," in text and "sources sigma: 1 left out" in text
    events = tmp_path / "e.jsonl"
    events.write_text('{"EventID": 1}\n')
    assert main(["match", "--rules", str(out), "--events", str(events), "--min-level", "high"]) == 2
    assert "need rule files" in capsys.readouterr().err
    rc = main(["match", "--rules", str(SEED_RULES), "--events", str(events), "--source", "elastic"])
    assert rc == 0
    assert "1 kept by the selection" in capsys.readouterr().err


def _pipeline(tmp_path: Path, select: str) -> Path:
    cfg = tmp_path / "p.yaml"
    cfg.write_text(
        "outputs: [stdout]\n"
        f"rules: {{paths: [{SEED_RULES}], cache_dir: {tmp_path / 'cache'}, select: {select}}}\n"
    )
    return cfg


def test_validate_reports_the_selection_and_flags_override(tmp_path: Path, capsys: Any) -> None:
    cfg = _pipeline(tmp_path, "{min_level: high}")
    assert main(["validate", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert ": 0 rules" in out and "min_level high: 2 left out" in out
    assert "the rule selection left no rule" in out
    assert main(["validate", str(cfg), "--min-level", "informational", "--source", "sigma"]) == 0
    out = capsys.readouterr().out
    assert ": 1 rules" in out and "sources sigma: 1 left out" in out and "min_level" not in out
    assert main(["validate", "--json", str(cfg), "--min-level", "medium"]) == 0
    (report,) = json.loads(capsys.readouterr().out)["configs"]
    assert report["ok"] and report["rules"] == 2 and report["selection"]["kept"] == 2
    bad = _pipeline(tmp_path, "{min_level: severe}")
    assert main(["validate", "--json", str(bad)]) == 1
    (report,) = json.loads(capsys.readouterr().out)["configs"]
    assert not report["ok"] and "rules.select.min_level" in report["error"]


def test_default_pipeline_still_runs_both_seed_rules(capsys: Any) -> None:
    from support.paths import REPO

    for name in ("default.yaml", "production.yaml"):
        assert main(["validate", str(REPO / "pipelines" / name)]) == 0, name
    out = capsys.readouterr().out
    assert out.count(": 2 rules") == 2, out


# --------------------------------------------------------------------------- real relay


def _wait_for(sp: ServeProcess, pattern: str, start: int = 0, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in sp.lines[start:]:
            if re.search(pattern, line):
                return line
        time.sleep(0.05)
    raise AssertionError(f"no line matching {pattern!r}:\n" + "".join(sp.lines))


def test_relay_applies_the_selection_at_start_and_on_reload(
    serve_process: Any, tmp_path: Path
) -> None:
    rules = tmp_path / "rules"
    shutil.copytree(SEED_RULES, rules)
    cfg = tmp_path / "p.yaml"
    cfg.write_text(
        "listen: {host: 127.0.0.1, port: 0}\noutputs: [stdout]\n"
        "rules: {paths: [rules], cache_dir: cache, reload_interval: 0.2s,"
        " select: {sources: [sigma], status: [stable, test]}}\n"
    )
    sp = serve_process(["--config", str(cfg)])
    _wait_for(sp, r"rules: 1 loaded from 2 files")
    _wait_for(sp, r"selection: 2 loaded, 1 kept \(sources sigma: 1 left out")
    mark = len(sp.lines)
    _sigma_with("experimental", rules, "left-out-by-status")  # the reload child selects too
    _wait_for(sp, r"rules reloaded \(.*\): 1 rules", mark)
    mark = len(sp.lines)
    _sigma_with("stable", rules, "kept-stable")
    _wait_for(sp, r"rules reloaded \(.*\): 2 rules", mark)
    sp.stop()
