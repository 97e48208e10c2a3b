"""The pre-filter re-tunes itself on the traffic it sees, and matches never change."""

from __future__ import annotations

import gc
import logging
import marshal
import random
import time
from collections import Counter
from pathlib import Path

import hyperscan as hs
import pytest

from ruletag.config.load import config_from_mapping
from ruletag.errors import ConfigError
from ruletag.rules.compiler import CompiledTable, TableError, build, load, prefilter, save
from ruletag.rules.compiler.store import load_tuned, save_tuned
from ruletag.rules.fields import FieldMap
from ruletag.rules.ir import And, Match, Node, Not, Or, Rule, Wild
from ruletag.rules.matcher import Matcher
from ruletag.rules.matcher.prefilter import RawMatcher
from support.codec import pack_records

A = Wild.ANY


def rule(rid: str, cond: Node) -> Rule:
    return Rule(id=rid, name=rid, source="sigma", condition=cond)


def rules() -> list[Rule]:
    return [
        # the length guess picks the long literal, which every record holds; the short one
        # is the rare one
        rule(
            "pair",
            And(
                (
                    Match("CommandLine", (A, "program files", A)),
                    Match("CommandLine", (A, "zq", A)),
                )
            ),
        ),
        # broad: every process record passes its raw requirement
        rule("broad", And((Match("Image", (A,)), Not(Match("Image", (A, ".exe")))))),
        rule("rare", Match("CommandLine", (A, "mimikatz", A))),
    ]


def traffic(n: int, seed: int) -> list[dict[str, object]]:
    rng = random.Random(seed)
    out: list[dict[str, object]] = []
    for i in range(n):
        image = rng.choice(["C:\\Program Files\\a.exe", "C:\\Program Files\\b.dll", "x.exe"])
        cmd = f'"{image}" --id {rng.randint(1, 10**6)}'
        if i % 97 == 0:
            cmd += " zq"
        if i % 131 == 0:
            cmd += " mimikatz"
        out.append({"Image": image, "CommandLine": cmd, "EventID": 1})
    return out


def want(t: Matcher, records: list[dict[str, object]]) -> dict[int, list[int]]:
    return {k: m for k, r in enumerate(records) if (m := t.match(r))}


def feed_until_tuned(t: Matcher, records: list[dict[str, object]]) -> None:
    buf, spans = pack_records(records)
    deadline = time.monotonic() + 60
    while t.stats.get("raw_tuned_on_records") is None:
        assert t.raw is not None and t.raw.tune_error is None
        assert time.monotonic() < deadline, "the pre-filter did not re-tune"
        t.match_entries(buf, spans)
        time.sleep(0.01)


@pytest.fixture()
def table(fm: FieldMap) -> Matcher:
    return Matcher(build(rules(), fm), tune_after=300)


def test_retuned_filter_gives_the_same_matches(table: Matcher) -> None:
    sample = traffic(1000, 1)
    feed_until_tuned(table, sample)
    raw = table.raw
    assert raw is not None and raw.filter.tuned_on >= 300
    fresh = traffic(3000, 2)
    buf, spans = pack_records(fresh)
    expected = want(table, fresh)
    assert expected, "the test traffic must trip some rule"
    assert table.match_entries(buf, spans) == expected


def test_retuned_triggers_follow_measured_frequency(table: Matcher) -> None:
    before = table.table.raw
    assert before is not None and before.plan is not None
    patterns = [p for p, _ in marshal.loads(before.plan)[0]]
    long_id = patterns.index(b"program\\x20files")
    short_id = patterns.index(b"zq")
    assert 0 in before.trig_rules.get(long_id, ())  # the guess: the longer literal
    feed_until_tuned(table, traffic(1000, 3))
    assert table.raw is not None
    after = table.raw.filter
    assert after is not before and table.table.raw is before
    assert 0 in after.trig_rules.get(short_id, ())  # measured: the rarer one
    assert 0 not in after.trig_rules.get(long_id, ())
    # the broad rule is evaluated by the small table of often-passed rules
    assert table.stats["hot_rules"] >= 1 and table._hot is not None
    assert 1 in table._hot[1]


def test_a_loaded_table_tunes_too(table: Matcher, tmp_path) -> None:
    path = tmp_path / "t.table"
    save(table.table, path)
    loaded = Matcher(load(path), tune_after=200)
    feed_until_tuned(loaded, traffic(600, 4))
    fresh = traffic(1500, 5)
    buf, spans = pack_records(fresh)
    assert loaded.match_entries(buf, spans) == want(loaded, fresh)


def test_an_entry_decoded_anyway_skips_stage_2_once_tuned(fm: FieldMap) -> None:
    """Once tuned, an entry that a rule without a stage-2 check decodes anyway is not scanned
    again: the other rules its triggers fired for are evaluated on the record (matches
    unchanged); an entry no such rule decodes is still checked by stage 2, and while
    observing every entry is (the passes counted for tuning stay exact)."""
    two = rule(
        "two", And((Match("CommandLine", (A, "qqzz", A)), Match("CommandLine", (A, "wwyy", A))))
    )
    records = [
        {"Image": "C:\\x\\b.dll", "CommandLine": "run qqzz"},
        {"Image": "C:\\x\\b.dll", "CommandLine": "run wwyy"},
        {"CommandLine": "run qqzz"},
        {"CommandLine": "run wwyy"},
    ]
    buf, spans = pack_records(records)
    t = Matcher(build([*rules(), two], fm), tune_after=300)
    observing = t.raw_candidates(buf, spans)
    assert 3 not in observing.get(0, ()) + observing.get(1, ())
    feed_until_tuned(t, traffic(1000, 16))
    assert t.raw is not None and 3 in t.raw.filter.checked
    cands = t.raw_candidates(buf, spans)
    # the trigger of "two" is one of its literals: it fired in one of the first two entries,
    # which "broad" (an Image without .exe) decodes anyway ...
    assert [3 in cands.get(i, []) for i in (0, 1)].count(True) == 1
    # ... and in one of the last two, where stage 2 finds the other literal missing
    assert 2 not in cands and 3 not in cands
    assert t.match_entries(buf, spans) == want(t, records) == {0: [1], 1: [1]}


def test_retune_frees_its_requirement_trees_before_hyperscan_compiles(
    fm: FieldMap, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hyperscan's compile is the tuning's largest allocation: the requirement trees (and
    the plan they are read from) are gone by then, so the two peaks do not stack. The
    re-tuned filter is the one the same sample gives."""
    filt = build(rules(), fm).raw
    assert filt is not None and filt.plan is not None
    patterns = marshal.loads(filt.plan)[0]
    counts = {i: 50 for i in range(len(patterns))}
    live: list[int] = []
    compile_db = prefilter.compile_db

    def spy(pats: list[tuple[int, bytes, int]]) -> object:
        gc.collect()
        trees = (prefilter.AllOf, prefilter.AnyOf)
        consts = {id(prefilter.ALWAYS), id(prefilter.NEVER)}  # module constants
        live.append(sum(isinstance(o, trees) and id(o) not in consts for o in gc.get_objects()))
        return compile_db(pats)

    monkeypatch.setattr(prefilter, "compile_db", spy)
    tuned = prefilter.retune(filt, counts, 100)
    assert len(live) == 2  # the often triggered rules' stage-2 database, then the triggers
    assert live == [0, 0]
    monkeypatch.setattr(prefilter, "compile_db", compile_db)
    again = prefilter.retune(filt, counts, 100)
    assert dict(again.trig_rules) == dict(tuned.trig_rules)
    assert again.checked == tuned.checked and dict(again.rates) == dict(tuned.rates)


def test_tune_after_zero_keeps_the_compiled_filter(fm: FieldMap) -> None:
    t = Matcher(build(rules(), fm), tune_after=0)
    first = t.raw
    buf, spans = pack_records(traffic(2000, 6))
    for _ in range(3):
        t.match_entries(buf, spans)
    time.sleep(0.2)
    t.match_entries(buf, spans)
    assert t.raw is first and first is not None and first.tuned is None
    assert "raw_tuned_on_records" not in t.stats


def test_tune_after_config_key() -> None:
    base = {"listen": {"port": 0}, "outputs": [{"type": "stdout"}]}
    rules_ = {"paths": ["builtin:seeds"]}
    cfg = config_from_mapping({**base, "rules": {**rules_, "tune_after": 500}}, None)
    assert cfg.rules is not None and cfg.rules.tune_after == 500
    default = config_from_mapping({**base, "rules": rules_}, None)
    assert default.rules is not None and default.rules.tune_after == 20_000
    with pytest.raises(ConfigError, match=r"rules\.tune_after"):
        config_from_mapping({**base, "rules": {**rules_, "tune_after": -1}}, None)


def test_tuning_does_not_decode_what_no_requirement_forces(fm: FieldMap) -> None:
    """Two literals each in half the records, never together: the rule needing both holds
    nowhere. Both are common, so the old tuner took them as present and decoded every record
    the trigger fired on (half of them); loosening is now checked against the observed
    pattern sets and dropped when it would decode records no requirement forces."""
    both = rule(
        "both",
        And(
            (
                Match("CommandLine", (A, "alphaword", A)),
                Match("CommandLine", (A, "betaword", A)),
            )
        ),
    )
    t = Matcher(build([both], fm), tune_after=300)

    def mix(n: int, seed: int) -> list[dict[str, object]]:
        rng = random.Random(seed)
        word = ("alphaword", "betaword")
        return [
            {"CommandLine": f"run {word[i % 2]} {rng.randint(1, 10**6)}", "EventID": 1}
            for i in range(n)
        ]

    feed_until_tuned(t, mix(1000, 7))
    assert t.raw is not None and t.raw.filter.tuned_on >= 300
    assert t.table.raw is not None
    exact = RawMatcher(t.table.raw, 0)  # untuned: passes exactly where a requirement holds
    buf, spans = pack_records(mix(2000, 8))
    forced = exact.candidates(buf, spans)
    decoded = t.raw_candidates(buf, spans)
    assert forced == {}
    assert len(decoded) <= len(spans) // 100, f"{len(decoded)} of {len(spans)} decoded"
    assert t.match_entries(buf, spans) == {}


def test_a_rule_with_thousands_of_rare_branches_takes_one_common_trigger(fm: FieldMap) -> None:
    """Each trigger pattern costs scan time on every record. A rule listing 3,000 hashes (none
    seen in the tuning sample) beside an event kind on 1% of the records was re-tuned to be
    triggered by its 3,000 hashes (measured rarer); now by the event kind, the hashes left to
    stage 2.
    Matches stay exact: a listed hash on a driver load matches, on another kind it does not."""
    hashes = [f"feed{i:028x}{i * 7919:032x}" for i in range(3000)]  # never number-like
    kind = Match("EventType", ("DriverLoad",))
    listed = rule("listed", And((kind, Or(tuple(Match("Hashes", (A, h, A)) for h in hashes)))))
    t = Matcher(build([listed], fm), tune_after=300)

    def mix(n: int, seed: int, hit: int = 0) -> list[dict[str, object]]:
        rng = random.Random(seed)
        out: list[dict[str, object]] = []
        for i in range(n):
            ev = "DriverLoad" if i % 100 == 0 else rng.choice(["ProcessCreate", "FileCreate"])
            h = hashes[i % 3000] if hit and i % hit == 0 else f"{rng.getrandbits(128):032x}"
            out.append({"EventType": ev, "Hashes": f"SHA256={h}", "EventID": 6})
        return out

    feed_until_tuned(t, mix(1000, 11))
    assert t.raw is not None and t.raw.filter.tuned_on >= 300
    assert len(t.raw.filter.trig_rules) - 1 < 10, "the hashes are still trigger patterns"
    fresh = mix(3000, 12, hit=50)
    buf, spans = pack_records(fresh)
    expected = want(t, fresh)
    assert expected and all(fresh[k]["EventType"] == "DriverLoad" for k in expected)
    assert len(expected) == 30  # the driver loads (i % 100 == 0) all hold a listed hash
    assert t.match_entries(buf, spans) == expected


# --------------------------------------------------------------------------- tuned-filter file


def _keyed(fm: FieldMap, version: str = "v-test") -> object:
    """The test rules' table with a cache key (only such a table has a tuned-filter file)."""
    return build(rules(), fm, version)


def test_a_tuned_filter_is_saved_and_the_next_matcher_starts_from_it(
    fm: FieldMap, tmp_path
) -> None:
    path = tmp_path / "v-test.tuned"
    first = Matcher(_keyed(fm), tune_after=300, tuned_path=path)
    feed_until_tuned(first, traffic(1000, 6))
    assert first.stats["raw_tuned_from"] == "traffic"
    assert path.exists()
    second = Matcher(_keyed(fm), tune_after=300, tuned_path=path)
    # tuned before it has seen a record: no observation phase, the often-passed rules' table
    assert second.wait_tuned(10) and second.stats["raw_tuned_from"] == "file"
    assert second.raw is not None and second.raw.filter.tuned_on == first.raw.filter.tuned_on  # type: ignore[union-attr]
    assert second._hot is not None and second._hot[2] == first._hot[2]  # type: ignore[index]
    fresh = traffic(2000, 7)
    buf, spans = pack_records(fresh)
    expected = want(second, fresh)
    assert expected and second.match_entries(buf, spans) == expected


def test_tuned_file_of_another_table_damaged_or_off_is_not_used(fm: FieldMap, tmp_path) -> None:
    path = tmp_path / "x.tuned"
    first = Matcher(_keyed(fm), tune_after=300, tuned_path=path)
    feed_until_tuned(first, traffic(1000, 8))
    good = path.read_bytes()
    # another table (another cache key): ignored, the matcher tunes itself
    other = Matcher(_keyed(fm, "v-other"), tune_after=300, tuned_path=path)
    assert not other.wait_tuned(10) and "raw_tuned_from" not in other.stats
    # tune_after 0 means the compiled triggers, whatever was saved
    off = Matcher(_keyed(fm), tune_after=0, tuned_path=path)
    assert not off.wait_tuned(10) and "raw_tuned_from" not in off.stats
    # a table without a key never reads or writes one
    assert Matcher(build(rules(), fm), tune_after=300, tuned_path=path).tuned_path is None
    for damaged in (good[:-10], good[:40] + bytes([good[40] ^ 1]) + good[41:], b"junk"):
        path.write_bytes(damaged)
        m = Matcher(_keyed(fm), tune_after=300, tuned_path=path)
        assert not m.wait_tuned(10) and "raw_tuned_from" not in m.stats
        # fewer records than tune_after: a tuning of its own would write a good file back
        # while the next damaged one is written (seen on a slow machine)
        fresh = traffic(250, 9)
        buf, spans = pack_records(fresh)
        assert m.match_entries(buf, spans) == want(m, fresh)
    # ... and the matcher that tunes again writes a good file back
    feed_until_tuned(m, traffic(1000, 10))
    again = Matcher(_keyed(fm), tune_after=300, tuned_path=path)
    assert again.wait_tuned(10) and again.stats["raw_tuned_from"] == "file"


def test_a_tuned_file_refers_to_the_stage_2_database_it_shares_with_its_table(
    fm: FieldMap, tmp_path
) -> None:
    """The tuned filter's rarely needed stage-2 database is its table's own: the file refers
    to it instead of holding a copy, and a matcher reading the file back runs its own table's
    database; read without that table, the file is refused (never misread)."""
    # a rule whose trigger never fires: its stage 2 is the rarely needed database
    cold = rule("cold", And((Match("CommandLine", (A, "qqzz", A)), Match("Image", (A, "nope", A)))))

    def keyed() -> CompiledTable:
        return build([*rules(), cold], fm, "v-test")

    path = tmp_path / "v-test.tuned"
    table = keyed()
    first = Matcher(table, tune_after=300, tuned_path=path)
    feed_until_tuned(first, traffic(1000, 14))
    tuned = first.raw.filter  # type: ignore[union-attr]
    assert tuned.cold is not None and tuned.cold[0] is table.raw.full_db  # type: ignore[attr-defined]
    copy = tmp_path / "copy.tuned"
    save_tuned(copy, "v-test", tuned, None)
    save_tuned(path, "v-test", tuned, None, table.raw)  # type: ignore[attr-defined]
    saved = copy.stat().st_size - path.stat().st_size
    assert saved >= len(hs.dumpb(table.raw.full_db))  # type: ignore[attr-defined]
    again = keyed()
    second = Matcher(again, tune_after=300, tuned_path=path)
    assert second.wait_tuned(10) and second.stats["raw_tuned_from"] == "file"
    assert second.raw.filter.cold[0] is again.raw.full_db  # type: ignore[attr-defined, index, union-attr]
    fresh = traffic(2000, 15)
    buf, spans = pack_records(fresh)
    assert second.match_entries(buf, spans) == want(second, fresh)
    with pytest.raises(TableError, match="refers to its table"):
        load_tuned(path, "v-test")
    # a copy needs nothing from its table
    assert load_tuned(copy, "v-test")[0].cold[0] is not None  # type: ignore[index]


def test_the_kept_filter_is_read_off_the_start_up_path(fm: FieldMap, tmp_path) -> None:
    """The matcher is usable at once (compiled filter, same matches) and swaps the kept
    filter in with the first chunk after it has been read."""
    path = tmp_path / "v-test.tuned"
    feed_until_tuned(Matcher(_keyed(fm), tune_after=300, tuned_path=path), traffic(1000, 12))
    m = Matcher(_keyed(fm), tune_after=300, tuned_path=path)
    assert m._reader is not None
    fresh = traffic(1000, 13)
    buf, spans = pack_records(fresh)
    expected = want(m, fresh)
    assert m.match_entries(buf, spans) == expected  # tuned or not yet: the same matches
    m._reader.join(10)
    assert m.match_entries(buf, spans) == expected
    assert m.stats["raw_tuned_from"] == "file" and m._read is None


def test_an_unwritable_tuned_file_costs_nothing_but_a_warning(
    fm: FieldMap, tmp_path, caplog
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    m = Matcher(_keyed(fm), tune_after=300, tuned_path=blocker / "v.tuned")
    feed_until_tuned(m, traffic(1000, 11))
    assert m.stats["raw_tuned_from"] == "traffic"
    assert "tuned pre-filter not saved" in caplog.text


def other_source(n: int, seed: int) -> list[dict[str, object]]:
    """Records of another source than :func:`traffic`: no ``Image``, no "program files"."""
    rng = random.Random(seed)
    return [
        {
            "CommandLine": f"sh -c 'run {rng.randint(1, 10**6)}'" + (" zq" if i % 3 == 0 else ""),
            "EventID": 4688,
        }
        for i in range(n)
    ]


def feed_until(t: Matcher, records: list[dict[str, object]], done: object, what: str) -> None:
    """Feed ``records`` (in chunks of 100) until ``done()`` holds (background rebuilds)."""
    chunks = [pack_records(records[i : i + 100]) for i in range(0, len(records), 100)]
    deadline = time.monotonic() + 60
    k = 0
    while not done():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        t.match_entries(*chunks[k % len(chunks)])
        k += 1
        if k % len(chunks) == 0:
            time.sleep(0.05)


def _drifting(
    fm: FieldMap, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Matcher, Path]:
    """Drift checked every 200 records over two windows; a matcher of the keyed test table
    tuned on :func:`other_source` only, keeping its filter in ``tmp_path``; and that file."""
    monkeypatch.setattr(Matcher, "HOT_WINDOW", 200)
    monkeypatch.setattr(Matcher, "DRIFT_GAP", 2)
    path = tmp_path / "v-test.tuned"
    m = Matcher(_keyed(fm), tune_after=300, tuned_path=path)
    feed_until_tuned(m, other_source(400, 1))
    return m, path


def test_the_prefilter_follows_traffic_its_tuning_sample_did_not_hold(
    fm: FieldMap, tmp_path, monkeypatch
) -> None:
    """Tuned on one source only, then the other arrives: its often-passed rule joins the small
    table, and the triggers picked for the absent source's rules (they fire on most of its
    records) make the pre-filter observe again and re-tune on both samples; the re-tuned
    filter is kept; matches never change."""
    m, path = _drifting(fm, tmp_path, monkeypatch)
    assert m.raw is not None
    first = m.raw.filter.tuned_on
    assert m._hot is None or 1 not in m._hot[1]  # "broad" needs Image: never passed yet
    b = traffic(2000, 2)
    feed_until(m, b, lambda: m.stats.get("hot_grown"), "the often-passed table did not grow")
    assert m._hot is not None and 1 in m._hot[1]
    # a window cut in two by that swap counted rule 1 outside the table: no rebuild for it
    deadline = time.monotonic() + 30
    while m._growing and time.monotonic() < deadline:  # a rebuild for other rules, if any
        time.sleep(0.01)
    if m._grown is not None:
        m._swap_grown()
    m._cold_seen, m._cold_records = Counter({1: 10_000}), 10_000
    m._check_hot()
    assert not m._growing and m._grown is None
    tuned = m.raw.filter
    # while it observes again, the tuned filter keeps matching (the compiled one observes on
    # the side): the records observed are not decoded and evaluated as by an untuned filter
    running = []

    def done() -> bool:
        if m._observer is not None:
            running.append((m.raw.filter is tuned, m._observer.filter is m.table.raw))  # type: ignore[union-attr]
        return m.stats.get("raw_retunes") == 1 and m.raw.filter.tuned_on >= first + 300  # type: ignore[union-attr]

    feed_until(m, b, done, "the pre-filter did not re-tune on the new traffic")
    assert running and set(running) == {(True, True)}
    assert m._observer is None
    assert m.stats["raw_drift"] > Matcher.DRIFT
    fresh = traffic(1500, 3) + other_source(500, 4)
    buf, spans = pack_records(fresh)
    expected = want(m, fresh)
    assert expected and m.match_entries(buf, spans) == expected
    # the next matcher of this table starts from the re-tuned filter
    again = Matcher(_keyed(fm), tune_after=300, tuned_path=path)
    assert again.wait_tuned(10)
    assert again.raw is not None and again.raw.filter.tuned_on == m.raw.filter.tuned_on  # type: ignore[union-attr]
    assert again.match_entries(buf, spans) == expected


def test_traffic_like_the_tuning_sample_never_re_tunes(fm: FieldMap, monkeypatch) -> None:
    """The guard against re-tuning for nothing: the same mix, many windows, no re-tuning."""
    monkeypatch.setattr(Matcher, "HOT_WINDOW", 200)
    monkeypatch.setattr(Matcher, "DRIFT_GAP", 2)
    m = Matcher(build(rules(), fm), tune_after=300)
    mix = traffic(2000, 5)
    feed_until_tuned(m, mix)
    buf, spans = pack_records(traffic(2000, 6))
    for _ in range(10):  # 100 windows
        m.match_entries(buf, spans)
    assert "raw_drift" in m.stats and m.stats["raw_drift"] <= Matcher.DRIFT
    assert "raw_retunes" not in m.stats and m.raw is not None and m.raw.fires is not None


def test_re_tuning_for_drift_is_spaced_out_and_bounded(fm: FieldMap, monkeypatch) -> None:
    """Traffic that keeps changing cannot keep the pre-filter observing: each re-tuning
    doubles the wait before the next, and there are at most MAX_RETUNES."""
    monkeypatch.setattr(Matcher, "HOT_WINDOW", 100)
    monkeypatch.setattr(Matcher, "DRIFT_GAP", 1)
    monkeypatch.setattr(Matcher, "MAX_RETUNES", 2)
    m = Matcher(build(rules(), fm), tune_after=100)
    feed_until_tuned(m, other_source(200, 7))
    a, b = other_source(1000, 8), traffic(1000, 9)
    gaps = []
    for _ in range(40):
        for recs in (b, a):
            buf, spans = pack_records(recs)
            m.match_entries(buf, spans)
            gaps.append(m._gap)
        time.sleep(0.02)
    # it did re-tune, twice (the bound), and waited twice as long before the second
    assert m.stats["raw_retunes"] == 2
    assert set(gaps) <= {1, 2, 4} and m._gap == 4


def test_a_matcher_started_from_the_kept_filter_re_tunes_on_the_kept_sample_too(
    fm: FieldMap, tmp_path, monkeypatch, caplog
) -> None:
    """A run tunes on one source and keeps its filter and sample; the next run starts from
    the kept filter (it observed nothing itself), then the other source arrives: its re-tuning
    adds the kept sample to the records it observes, so the re-tuned filter still knows the
    first source. With the sample file damaged, it re-tunes on the new records only and says
    so; with none, it re-tunes on the new records only. Matches never change."""
    first, path = _drifting(fm, tmp_path, monkeypatch)
    assert first.raw is not None
    kept = first.raw.filter.tuned_on
    sample = first.sample_path
    assert sample is not None and sample.exists()
    b = traffic(2000, 2)
    fresh = traffic(1500, 3) + other_source(500, 4)
    buf, spans = pack_records(fresh)
    kept_filter, kept_sample = path.read_bytes(), sample.read_bytes()
    for case in ("kept", "damaged", "missing"):
        path.write_bytes(kept_filter)  # as the first run left it (the loop's runs re-tune)
        data = bytearray(kept_sample)
        if case == "damaged":
            data[-3] ^= 0xFF
        sample.write_bytes(bytes(data))
        if case == "missing":  # e.g. kept by an earlier version: not worth a warning
            sample.unlink()
            caplog.clear()
        m = Matcher(_keyed(fm), tune_after=300, tuned_path=path)
        assert m.wait_tuned(10) and m.stats["raw_tuned_from"] == "file"
        assert m._sample is None  # the run itself observed nothing

        def done(m: Matcher = m) -> bool:
            return m.stats.get("raw_retunes") == 1 and m.stats["raw_tuned_from"] == "traffic"

        feed_until(m, b, done, "the pre-filter did not re-tune on the new traffic")
        assert m.raw is not None
        got = m.raw.filter.tuned_on
        if case == "kept":
            assert got >= kept + 300, (got, kept)  # the kept sample and its own records
        else:
            assert 300 <= got < kept + 300, got  # its own records only
        warned = "earlier tuning sample not used" in caplog.text
        assert warned == (case == "damaged"), case
        assert m.match_entries(buf, spans) == want(m, fresh)


def _feed(t: Matcher, records: list[dict[str, object]], times: int) -> None:
    """``records`` through ``t`` ``times`` times, its matches checked each time."""
    buf, spans = pack_records(records)
    for _ in range(times):
        assert t.match_entries(buf, spans) == want(t, records)


def test_a_follower_reads_the_filter_its_leader_tunes_and_never_tunes_itself(
    fm: FieldMap, tmp_path
) -> None:
    """``workers: N`` on a first start: the first worker tunes and keeps the filter; another
    one, already matching, reads it once written instead of tuning a second time."""
    path = tmp_path / "v-test.tuned"
    follower = Matcher(_keyed(fm), tune_after=1000, tuned_path=path, follow=True)
    assert follower.raw is not None and follower.raw.tune_after == 1000 * Matcher.FOLLOW_PATIENCE
    _feed(follower, traffic(500, 20), 3)  # more than tune_after: a plain matcher would tune
    assert not path.exists() and follower.raw.observing and "raw_tuned_from" not in follower.stats
    leader = Matcher(_keyed(fm), tune_after=300, tuned_path=path)
    feed_until_tuned(leader, traffic(1000, 21))
    assert path.exists() and leader.stats["raw_tuned_from"] == "traffic"
    deadline = time.monotonic() + 30
    while follower.stats.get("raw_tuned_from") is None:  # found within FOLLOW_EVERY records
        assert time.monotonic() < deadline, "the follower never read its leader's filter"
        _feed(follower, traffic(500, 22), 1)
        time.sleep(0.01)
    assert follower.stats["raw_tuned_from"] == "file"
    assert follower.stats["raw_tuned_on_records"] == leader.stats["raw_tuned_on_records"]
    _feed(follower, traffic(1500, 23), 1)  # exact on the leader's filter too


def test_a_follower_without_a_leader_tunes_after_its_patience(fm: FieldMap, tmp_path) -> None:
    """The leader got no traffic (the kernel gave every connection to this worker): the
    follower tunes on its own, later than a leader would, and keeps what it tuned."""
    path = tmp_path / "v-test.tuned"
    follower = Matcher(_keyed(fm), tune_after=100, tuned_path=path, follow=True)
    feed_until_tuned(follower, traffic(600, 24))
    assert follower.stats["raw_tuned_from"] == "traffic"
    assert follower.stats["raw_tuned_on_records"] >= 100 * Matcher.FOLLOW_PATIENCE
    assert path.exists()


def test_a_damaged_leader_file_is_tried_once_then_again_when_rewritten(
    fm: FieldMap, tmp_path, caplog
) -> None:
    path = tmp_path / "v-test.tuned"
    follower = Matcher(_keyed(fm), tune_after=2000, tuned_path=path, follow=True)
    path.write_bytes(b"junk")
    with caplog.at_level(logging.WARNING, logger="ruletag.rules.matcher.table"):
        for _ in range(12):  # 6,000 records: three looks at the file
            _feed(follower, traffic(500, 25), 1)
            if follower._reader is not None:
                follower._reader.join(10)
    refused = [r for r in caplog.records if "tuned pre-filter not used" in r.getMessage()]
    assert len(refused) == 1 and "raw_tuned_from" not in follower.stats
    leader = Matcher(_keyed(fm), tune_after=300, tuned_path=path)
    feed_until_tuned(leader, traffic(1000, 26))
    deadline = time.monotonic() + 30
    while follower.stats.get("raw_tuned_from") is None:
        assert time.monotonic() < deadline, "the rewritten file was never read"
        _feed(follower, traffic(500, 27), 1)
        time.sleep(0.01)
    assert follower.stats["raw_tuned_from"] == "file"
