"""The rule loader: walking paths, per-file failures, duplicate ids, the compiled-table cache."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from ruletag.enrich.annotate import detection
from ruletag.errors import InvalidRule, UnsupportedRule
from ruletag.rules import loader
from ruletag.rules.ir import Attack, Const, Rule
from ruletag.rules.loader import (
    LoadResult,
    cache_key,
    compile_rules,
    dedupe,
    load_rules,
    rule_files,
)
from ruletag.rules.matcher import Matcher
from support.paths import SAMPLE, SEED_RULES, SIGMA_SEED
from support.seeds import EQL_ID as ELASTIC_ID
from support.seeds import SIGMA_ID

SEEDS = SEED_RULES

SIMPLE_SIGMA = """\
title: Test rule {n}
id: 00000000-0000-4000-8000-00000000000{n}
status: test
author: Tester
date: 2024-01-01
modified: {modified}
logsource:
    product: windows
    category: process_creation
detection:
    selection:
        Image|endswith: '\\\\tool{n}.exe'
    condition: selection
level: high
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def sigma(tmp: Path, name: str, n: int = 1, modified: str = "2024-01-02") -> Path:
    return write(tmp / name, SIMPLE_SIGMA.format(n=n, modified=modified))


def test_walk_is_sorted_and_skips_non_rule_files(tmp_path: Path) -> None:
    sigma(tmp_path, "b.yml", 1)
    sigma(tmp_path, "a/c.yaml", 2)
    write(tmp_path / "z.toml", "x = 1\n")
    for skipped in (
        "LICENSE.yml",
        "README.yml",
        "NOTICE.txt",
        "notes.txt",
        ".hidden/d.yml",
        ".e.yml",
    ):
        write(tmp_path / skipped, "whatever: 1\n")
    files, problems = rule_files([tmp_path])
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["a/c.yaml", "b.yml", "z.toml"]
    assert problems == []


def test_missing_path_and_explicit_non_rule_file_are_problems(tmp_path: Path) -> None:
    other = write(tmp_path / "rules.txt", "nope")
    result = load_rules([tmp_path / "absent", other])
    assert result.rules == [] and result.files == 0
    assert [type(p) for p in result.problems] == [InvalidRule, InvalidRule]
    assert "no such file" in result.problems[0].reason
    assert result.problems[0].path == str(tmp_path / "absent")


def test_a_bad_file_never_stops_the_others(tmp_path: Path) -> None:
    sigma(tmp_path, "a.yml", 1)
    write(tmp_path / "b.yml", "title: broken\ndetection: [unclosed\n")
    sigma(tmp_path, "c.yml", 2)
    shutil.copy(SIGMA_SEED, tmp_path / "d.yml")
    result = load_rules([tmp_path])
    assert result.files == 4
    assert sorted(r.id for r in result.rules) == [
        "00000000-0000-4000-8000-000000000001",
        "00000000-0000-4000-8000-000000000002",
        SIGMA_ID,
    ]
    assert len(result.problems) == 1
    bad = result.problems[0]
    assert bad.kind == "invalid" and bad.path == str(tmp_path / "b.yml")
    assert str(bad).startswith(f"{tmp_path / 'b.yml'}:")
    assert result.sources == {"sigma": 4}


def test_front_end_crash_becomes_internal_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ruletag.rules.sigma as sigma_mod

    real = sigma_mod.load_sigma_file
    sigma(tmp_path, "good.yml", 1)
    sigma(tmp_path, "crash.yml", 2)

    def flaky(path: Path, variables: object = None) -> list[Rule]:
        if Path(path).name == "crash.yml":
            raise KeyError("boom")
        return real(path, variables)

    monkeypatch.setattr(sigma_mod, "load_sigma_file", flaky)
    result = load_rules([tmp_path])
    assert [r.id for r in result.rules] == ["00000000-0000-4000-8000-000000000001"]
    (p,) = result.problems
    assert isinstance(p, InvalidRule)
    assert p.reason.startswith("internal error: KeyError")
    assert p.path == str(tmp_path / "crash.yml")


def _rule(rid: str, path: str, modified: str) -> Rule:
    return Rule(
        id=rid, name=rid, source="sigma", condition=Const(True), path=path, modified=modified
    )


def test_dedupe_keeps_newest_then_last_loaded() -> None:
    rules = [
        _rule("x", "a.yml", "2024-05-01"),
        _rule("y", "b.yml", "2024-01-01"),
        _rule("x", "c.yml", "2023-01-01"),  # older: ignored
        _rule("y", "d.toml", "2024/01/01"),  # same day (Elastic spelling): later path wins
        _rule("z", "e.yml", ""),
    ]
    kept, messages = dedupe(rules)
    assert [(r.id, r.path) for r in kept] == [("x", "a.yml"), ("y", "d.toml"), ("z", "e.yml")]
    assert len(messages) == 2
    assert "kept a.yml:1" in messages[0] and "ignored c.yml:1" in messages[0]
    assert "kept d.toml:1" in messages[1] and "ignored b.yml:1" in messages[1]


def test_duplicate_ids_across_files(tmp_path: Path) -> None:
    sigma(tmp_path, "new/a.yml", 1, modified="2024-06-01")
    sigma(tmp_path, "old/a.yml", 1, modified="2023-06-01")
    result = load_rules([tmp_path])
    (rule,) = result.rules
    assert rule.path.endswith("new/a.yml")
    (msg,) = result.duplicates
    assert "00000000-0000-4000-8000-000000000001" in msg and "old/a.yml" in msg


def test_annotation_carries_author_and_attack() -> None:
    result = load_rules([SIGMA_SEED])
    (rule,) = result.rules
    d = detection(rule)
    assert d["rule_id"] == SIGMA_ID and d["source"] == "sigma"
    assert d["author"] == list(rule.author) and d["author"]
    assert d["severity"] == "medium" and d["risk_score"] == 47
    assert {"id": "T1218", "name": "System Binary Proxy Execution"} in d["techniques"]
    assert all(set(t) == {"id", "name"} for t in d["tactics"])
    json.dumps(d)  # JSON-ready
    r2 = Rule(
        id="e",
        name="E",
        source="elastic",
        condition=Const(True),
        author=("Elastic",),
        tactics=(Attack("TA0008", "Lateral Movement"),),
        severity="high",
        risk_score=73,
    )
    assert detection(r2) == {
        "rule_id": "e",
        "name": "E",
        "source": "elastic",
        "severity": "high",
        "risk_score": 73,
        "author": ["Elastic"],
        "tactics": [{"id": "TA0008", "name": "Lateral Movement"}],
        "techniques": [],
    }


# --------------------------------------------------------------------------- cache


def _setup_rules(tmp: Path) -> Path:
    rules = tmp / "rules"
    rules.mkdir(parents=True)
    shutil.copy(SIGMA_SEED, rules / SIGMA_SEED.name)
    sigma(rules, "extra.yml", 3)
    write(rules / "broken.yml", "title: [\n")
    return rules


def test_compile_rules_caches_table_and_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rules = _setup_rules(tmp_path)
    cache = tmp_path / "cache"
    table, first = compile_rules([rules], cache_dir=cache)
    assert not first.cached
    assert len(first.rules) == 2 and len(first.problems) == 1
    assert table.version and len(table.version) == 16
    assert {p.name for p in cache.iterdir()} == {
        f"{table.version}.report.json",
        f"{table.version}.table",
        "digests.pickle",
    }

    def no_parse(*_a: object, **_k: object) -> object:
        raise AssertionError("rules were parsed again despite the cache")

    monkeypatch.setattr(loader, "_load_file", no_parse)
    table2, second = compile_rules([rules], cache_dir=cache)
    assert second.cached
    assert table2.version == table.version
    assert [r.id for r in table2.rules] == [r.id for r in table.rules]
    assert [(p.kind, p.path, p.line, p.reason) for p in second.problems] == [
        (p.kind, p.path, p.line, p.reason) for p in first.problems
    ]
    assert second.files == first.files and second.duplicates == first.duplicates
    rec = {
        "EventID": 1,
        "Channel": "Microsoft-Windows-Sysmon/Operational",
        "Image": "C:\\x\\tool3.exe",
    }
    assert [table2.rules[i].id for i in Matcher(table2).match(rec)] == [
        "00000000-0000-4000-8000-000000000003"
    ]


def test_an_unreadable_rule_file_fails_only_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rules = _setup_rules(tmp_path)
    write(rules / "locked.yml", "title: x\n")
    write(rules / "locked.toml", "[rule]\n")
    real_read_bytes, real_read_text = Path.read_bytes, Path.read_text

    def refuse(real):  # type: ignore[no-untyped-def]
        def read(self: Path, *a: object, **k: object) -> object:
            if self.stem == "locked":
                raise PermissionError(13, "Permission denied", str(self))
            return real(self, *a, **k)

        return read

    monkeypatch.setattr(Path, "read_bytes", refuse(real_read_bytes))
    monkeypatch.setattr(Path, "read_text", refuse(real_read_text))
    table, result = compile_rules([rules], cache_dir=tmp_path / "cache")
    assert len(table.rules) == 2
    locked = sorted(
        (Path(p.path or "").name, p.reason) for p in result.problems if "locked" in (p.path or "")
    )
    assert locked == [
        ("locked.toml", "cannot read rule file: PermissionError"),
        ("locked.yml", "cannot read rule file: PermissionError"),
    ]


def test_cache_key_follows_content_variables_and_fieldmap(tmp_path: Path) -> None:
    rules = _setup_rules(tmp_path)
    files, _ = rule_files([rules])
    base = cache_key(files, None, "f1")
    assert cache_key(files, None, "f1") == base
    assert cache_key(files, {"admins": ["a"]}, "f1") != base
    assert cache_key(files, None, "f2") != base
    sigma(rules, "extra.yml", 3, modified="2024-09-09")
    assert cache_key(files, None, "f1") != base


def test_changed_rule_file_rebuilds(tmp_path: Path) -> None:
    rules = _setup_rules(tmp_path)
    cache = tmp_path / "cache"
    t1, _ = compile_rules([rules], cache_dir=cache)
    sigma(rules, "extra.yml", 4)
    t2, r2 = compile_rules([rules], cache_dir=cache)
    assert not r2.cached and t2.version != t1.version
    assert "00000000-0000-4000-8000-000000000004" in {r.id for r in t2.rules}


def test_damaged_cache_is_rebuilt(tmp_path: Path) -> None:
    rules = _setup_rules(tmp_path)
    cache = tmp_path / "cache"
    t1, _ = compile_rules([rules], cache_dir=cache)
    (cache / f"{t1.version}.table").write_bytes(b"garbage")
    t2, r2 = compile_rules([rules], cache_dir=cache)
    assert not r2.cached and t2.version == t1.version and len(t2.rules) == 2
    assert (
        loader._read_cache(cache / f"{t1.version}.table", cache / f"{t1.version}.report.json")
        is not None
    )


def test_default_cache_dir_follows_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert loader.default_cache_dir() == tmp_path / "ruletag"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert loader.default_cache_dir() == tmp_path / "home" / ".cache" / "ruletag"


def test_load_result_partitions_problems() -> None:
    res = LoadResult([], [UnsupportedRule("u", "a.yml", 3), InvalidRule("i", "b.toml")], [], 2)
    assert [p.reason for p in res.unsupported] == ["u"]
    assert [p.reason for p in res.invalid] == ["i"]


def test_elastic_and_sigma_seeds_load_together() -> None:
    result = load_rules([SEEDS])
    assert result.problems == [], [str(p) for p in result.problems]
    assert sorted(r.id for r in result.rules) == sorted([SIGMA_ID, ELASTIC_ID])
    assert result.sources == {"elastic": 1, "sigma": 1}


def test_cache_key_follows_the_compiler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "r.yml"
    shutil.copy(SEEDS / "net_connection_win_wuauclt_network_connection.yml", f)
    before = cache_key([f], None, "fm")
    monkeypatch.setattr(loader, "compiler_fingerprint", lambda: "another-compiler")
    assert cache_key([f], None, "fm") != before


def test_cache_key_reads_only_changed_files(tmp_path: Path) -> None:
    rules = _setup_rules(tmp_path)
    files, _ = rule_files([rules])
    digests: dict[str, tuple[int, int, str]] = {}
    base = cache_key(files, None, "f1", digests)
    assert base == cache_key(files, None, "f1")  # the memo changes nothing by itself
    assert sorted(digests) == sorted(os.path.abspath(f) for f in files)
    # an unchanged file (same size and mtime) is taken from the memo, not read again
    first = os.path.abspath(files[0])
    size, mtime, _ = digests[first]
    digests[first] = (size, mtime, "0" * 64)
    assert cache_key(files, None, "f1", digests) != base
    # a changed file is read again, and its digest renewed
    digests[first] = (size, mtime - 1, "0" * 64)
    assert cache_key(files, None, "f1", digests) == base
    assert digests[first][2] != "0" * 64


def test_compile_rules_keeps_rule_digests_in_the_cache(tmp_path: Path) -> None:
    rules = _setup_rules(tmp_path)
    cache = tmp_path / "cache"
    t1, _ = compile_rules([rules], cache_dir=cache)
    memo = loader._read_digests(cache / "digests.pickle")
    assert len(memo) == len(rule_files([rules])[0])
    t2, r2 = compile_rules([rules], cache_dir=cache)
    assert r2.cached and t2.version == t1.version
    (cache / "digests.pickle").write_bytes(b"not a pickle")  # damaged: rebuilt, same key
    t3, r3 = compile_rules([rules], cache_dir=cache)
    assert r3.cached and t3.version == t1.version
    sigma(rules, "extra.yml", 5)
    t4, r4 = compile_rules([rules], cache_dir=cache)
    assert not r4.cached and t4.version != t1.version


def test_exclude_leaves_rules_out_by_id_or_name_and_keys_the_cache(tmp_path: Path) -> None:
    rules = _setup_rules(tmp_path)
    cache = tmp_path / "cache"
    full, _ = compile_rules([rules], cache_dir=cache)
    by_name, first = compile_rules([rules], cache_dir=cache, exclude=["Extra *"])
    assert not first.cached and first.excluded == 0  # no rule is named "Extra ..."
    assert by_name.version != full.version  # the exclude list is part of the cache key
    seed_id = next(r.id for r in full.rules if r.path.endswith(SIGMA_SEED.name))
    table, result = compile_rules([rules], cache_dir=cache, exclude=[seed_id, "Test rule *"])
    assert result.excluded == 2 and not table.rules and table.version != full.version
    again, cached = compile_rules([rules], cache_dir=cache, exclude=[seed_id, "Test rule *"])
    assert cached.cached and cached.excluded == 2 and again.version == table.version
    _, by_glob = compile_rules([rules], cache_dir=cache, exclude=["00000000-*"])
    assert by_glob.excluded == 1 and [r.id for r in by_glob.rules] == [seed_id]
    _, none = compile_rules([rules], cache_dir=cache, exclude=[])
    assert none.excluded == 0 and len(none.rules) == len(full.rules)


BUILDING_BLOCKS = SAMPLE / "elastic" / "rules_building_block"


def test_building_block_rules_are_marked_in_their_annotation() -> None:
    result = load_rules([BUILDING_BLOCKS])
    assert result.rules and all(r.building_block for r in result.rules)
    assert all(detection(r)["building_block"] is True for r in result.rules)
    seeds = load_rules([SEEDS]).rules
    assert seeds and not any(r.building_block for r in seeds)
    assert all("building_block" not in detection(r) for r in seeds)  # other bytes unchanged


def test_building_blocks_drop_leaves_them_out_and_keys_the_cache(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    shutil.copytree(BUILDING_BLOCKS, rules / "bb")
    shutil.copytree(SEEDS, rules / "seeds")
    cache = tmp_path / "cache"
    kept, full = compile_rules([rules], cache_dir=cache)
    n_bb = sum(r.building_block for r in full.rules)
    assert n_bb >= 3 and full.building_blocks == 0
    table, result = compile_rules([rules], cache_dir=cache, building_blocks="drop")
    assert not result.cached and result.building_blocks == n_bb
    assert len(table.rules) == len(kept.rules) - n_bb
    assert not any(r.building_block for r in table.rules)
    assert table.version != kept.version  # the switch is part of the cache key
    again, cached = compile_rules([rules], cache_dir=cache, building_blocks="drop")
    assert cached.cached and cached.building_blocks == n_bb and again.version == table.version
    assert loader.report_to_json(cached)["building_blocks"] == n_bb
