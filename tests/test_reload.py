"""Hot reload: LiveFilter swaps, refused and failing reloads, file polling, SIGHUP, coalescing.

Rules are copies of the bundled seed rules in a temporary folder, compiled with a temporary
cache folder; chunks go through the live transform directly (the relay-level reload test is in
test_enrich_e2e.py).
"""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import signal
import threading
import weakref
from pathlib import Path

import pytest

from ruletag.enrich.filter import RuleFilter
from ruletag.errors import InvalidRule
from ruletag.rules.loader import LoadResult, compile_rules
from ruletag.runtime.reload import (
    LiveFilter,
    Reloader,
    SubprocessCompiler,
    fingerprint,
    problem_summary,
    refusal,
)
from support.paths import ELASTIC_SEED as EQL
from support.paths import SIGMA_SEED as SIGMA
from support.peers import decode_entries, eventually, make_chunk
from support.seeds import SIGMA_HIT as HIT
from support.seeds import SIGMA_ID as SYSMON_RULE

MISS = {"log": "plain"}


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    d = tmp_path / "rules"
    d.mkdir()
    shutil.copy(SIGMA, d / SIGMA.name)
    return d


def make_reloader(rules_dir: Path, cache: Path, **kw: object) -> tuple[LiveFilter, Reloader]:
    live = LiveFilter(lambda t: RuleFilter(t))
    rl = Reloader(live, lambda: compile_rules([rules_dir], None, cache), [rules_dir], **kw)
    return live, rl


def detections_of(live: LiveFilter, records: list[dict]) -> list[list[str]]:
    out = live(make_chunk("t", records))
    return [
        [d["rule_id"] for d in e[1].get("detections", [])]
        for c in out
        for e in decode_entries(c.entries)
    ]


def test_live_filter_without_rules_passes_chunks_through() -> None:
    live = LiveFilter(lambda t: RuleFilter(t))
    chunk = make_chunk("t", [HIT])
    assert live(chunk) == [chunk]
    assert not live.loaded and live.version is None and live.rule_count == 0


def test_reload_adds_rules_keeps_stats_and_version(arun, rules_dir: Path, tmp_path: Path) -> None:
    async def scenario() -> None:
        live, rl = make_reloader(rules_dir, tmp_path / "cache")
        result = await rl.load_initial()
        assert live.rule_count == 1 and result.problems == []
        v1 = live.version
        assert detections_of(live, [HIT, MISS]) == [[SYSMON_RULE], []]
        assert await rl.reload("same files")
        assert live.version == v1  # content hash: nothing changed
        shutil.copy(EQL, rules_dir / EQL.name)
        assert await rl.reload("added a file")
        assert live.rule_count == 2 and live.version != v1
        assert detections_of(live, [HIT]) == [[SYSMON_RULE]]
        assert live.filter_stats.detections == {SYSMON_RULE: 2}  # survived two swaps
        assert (rl.ok, rl.failed) == (2, 0)

    arun(scenario())


def test_a_serving_process_freezes_its_start_up_heap_and_a_reload_frees_it(
    arun, rules_dir: Path, tmp_path: Path
) -> None:
    """``freeze`` (what ``ruletag serve`` sets): the start-up table leaves the collector's
    walks; the first reload gives it back, so the replaced filter is freed, cycles and all."""

    async def scenario() -> None:
        live, rl = make_reloader(rules_dir, tmp_path / "cache", freeze=True)
        await rl.load_initial()
        assert gc.get_freeze_count() > 0
        first = weakref.ref(live.filter)
        shutil.copy(EQL, rules_dir / EQL.name)
        assert await rl.reload("added a file")
        assert gc.get_freeze_count() == 0 and live.rule_count == 2
        gc.collect()
        assert first() is None  # the start-up filter did not outlive its reload
        assert detections_of(live, [HIT]) == [[SYSMON_RULE]]

    try:
        arun(scenario())
    finally:
        gc.unfreeze()  # whatever happened, leave this test process as it was


def test_failing_and_refused_reloads_keep_the_live_set(
    arun, rules_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        results: list[bool] = []
        live, rl = make_reloader(rules_dir, tmp_path / "cache", on_result=results.append)
        await rl.load_initial()
        v1 = live.version
        # every rule file broken -> no rule loads -> refused
        (rules_dir / SIGMA.name).write_text("title: [unclosed\n")
        assert not await rl.reload("broken file")
        assert rl.last_error  # refused: no rule could be loaded
        # the whole folder gone -> refused
        shutil.rmtree(rules_dir)
        assert not await rl.reload("folder gone")
        assert "rule path missing" in (rl.last_error or "")

        # the compiler raising -> failed
        def boom() -> tuple:  # type: ignore[type-arg]
            raise RuntimeError("hyperscan exploded")

        rules_dir.mkdir()
        shutil.copy(SIGMA, rules_dir / SIGMA.name)
        rl.load = boom
        assert not await rl.reload("compiler error")
        assert rl.last_error == "RuntimeError: hyperscan exploded"
        assert live.version == v1 and detections_of(live, [HIT]) == [[SYSMON_RULE]]
        assert results == [False, False, False] and rl.failed == 3

    arun(scenario())
    msgs = [r.getMessage() for r in caplog.records if r.name == "ruletag.runtime.reload"]
    assert sum("failed, keeping rule set" in m for m in msgs) == 3


def test_startup_load_raises_when_refused(arun, tmp_path: Path) -> None:
    async def scenario() -> None:
        live, rl = make_reloader(tmp_path / "nope", tmp_path / "cache")
        with pytest.raises(Exception, match="rule path missing"):
            await rl.load_initial()
        assert not live.loaded

    arun(scenario())


def test_file_change_triggers_reload(arun, rules_dir: Path, tmp_path: Path) -> None:
    async def scenario() -> None:
        live, rl = make_reloader(rules_dir, tmp_path / "cache", interval=0.05)
        await rl.load_initial()
        rl.start(sighup=False)
        try:
            v1 = live.version
            shutil.copy(EQL, rules_dir / EQL.name)
            await eventually(lambda: live.rule_count == 2)
            assert live.version != v1 and rl.ok == 1
            # an edit that keeps size but changes mtime is seen too
            p = rules_dir / EQL.name
            st = p.stat()
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
            await eventually(lambda: rl.ok == 2)
            (rules_dir / EQL.name).unlink()
            await eventually(lambda: live.rule_count == 1)
        finally:
            await rl.stop()

    arun(scenario())


def test_sighup_reloads(arun, rules_dir: Path, tmp_path: Path) -> None:
    # signal handlers can only be installed from the main thread, where pytest runs tests
    assert threading.current_thread() is threading.main_thread()

    async def scenario() -> None:
        live, rl = make_reloader(rules_dir, tmp_path / "cache", interval=0)
        await rl.load_initial()
        rl.start()
        try:
            shutil.copy(EQL, rules_dir / EQL.name)
            os.kill(os.getpid(), signal.SIGHUP)
            await eventually(lambda: rl.ok == 1)
            assert live.rule_count == 2
        finally:
            await rl.stop()

    previous = signal.getsignal(signal.SIGHUP)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # if the handler were missing: no kill
    try:
        arun(scenario())
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_requests_during_a_reload_coalesce_and_chunks_keep_flowing(
    arun, rules_dir: Path, tmp_path: Path
) -> None:
    gate = threading.Event()
    calls = 0

    def slow_load():  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls > 1:
            gate.wait(5)
        return compile_rules([rules_dir], None, tmp_path / "cache")

    async def scenario() -> None:
        live = LiveFilter(lambda t: RuleFilter(t))
        rl = Reloader(live, slow_load, [rules_dir], interval=0)
        await rl.load_initial()
        v1 = live.version
        rl.request("one")
        await asyncio.sleep(0.05)
        rl.request("two")
        rl.request("three")
        # the compile runs in a thread: the loop (and so the filter) is not blocked meanwhile
        for _ in range(5):
            assert detections_of(live, [HIT]) == [[SYSMON_RULE]]
            await asyncio.sleep(0.01)
        shutil.copy(EQL, rules_dir / EQL.name)
        gate.set()
        await eventually(lambda: rl.ok == 2)
        await rl.stop()
        assert calls == 3  # startup + the running reload + one for both queued requests
        assert live.rule_count == 2 and live.version != v1

    arun(scenario())


def test_refusal_summary_and_fingerprint(rules_dir: Path, tmp_path: Path) -> None:
    ok = LoadResult(rules=[], problems=[], duplicates=[], files=0)
    assert refusal(ok) is None and problem_summary(ok) == "no problems"
    bad = LoadResult(
        rules=[], files=3, duplicates=["dup x"],
        problems=[InvalidRule("bad 'a' at 1", "a.yml"), InvalidRule("bad 'b' at 2", "b.yml"),
                  InvalidRule("no such file or folder", "gone")],
    )  # fmt: skip
    assert refusal(bad) == "rule path missing: gone"
    none_loaded = LoadResult(rules=[], problems=bad.problems[:1], duplicates=[], files=1)
    assert (refusal(none_loaded) or "").startswith("no rule could be loaded (1 rule files")
    summary = problem_summary(bad)
    assert summary.startswith("3 rule files not loaded: 2x invalid: bad '…' at N")
    assert "1x duplicate rule id" in summary
    fp1 = fingerprint([rules_dir, tmp_path / "missing"])
    assert [Path(p).name for p, _, _ in fp1] == [SIGMA.name, "missing"]
    assert fp1[1][1:] == (-1, -1)
    (rules_dir / "README.md").write_text("not a rule")
    assert fingerprint([rules_dir, tmp_path / "missing"]) == fp1  # non-rule files ignored


def test_a_load_stamps_the_files_as_the_watcher_sees_them(rules_dir: Path, tmp_path: Path) -> None:
    paths = [rules_dir, tmp_path / "missing"]
    _, fresh = compile_rules(paths, None, tmp_path / "cache")
    _, cached = compile_rules(paths, None, tmp_path / "cache")
    assert not fresh.cached and cached.cached
    assert fresh.stamp == cached.stamp == fingerprint(paths)
    assert fresh.stamp is not None and fresh.stamp[-1][1:] == (-1, -1)
    shutil.copy(EQL, rules_dir / EQL.name)
    _, grown = compile_rules(paths, None, tmp_path / "cache")
    assert grown.stamp == fingerprint(paths) != fresh.stamp


def test_a_stamped_reloader_looks_for_the_files_once_and_still_sees_changes(
    arun, rules_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ruletag.runtime.reload as reload_mod

    looks: list[object] = []

    def counted(paths: object) -> object:
        looks.append(paths)
        return fingerprint(paths)  # type: ignore[arg-type]

    monkeypatch.setattr(reload_mod, "fingerprint", counted)
    loads: list[int] = []

    def load() -> tuple:
        loads.append(1)
        return compile_rules([rules_dir], None, tmp_path / "cache")

    async def scenario() -> None:
        live = LiveFilter(lambda t: RuleFilter(t))
        rl = Reloader(live, load, [rules_dir], interval=0.05, stamped=True)
        await rl.load_initial()
        assert looks == [] and live.rule_count == 1  # the load's own look was the fingerprint
        rl.start(sighup=False)
        try:
            await eventually(lambda: len(looks) >= 3)  # the watcher polls ...
            assert rl.ok == 0 and len(loads) == 1  # ... and sees the files unchanged
            shutil.copy(EQL, rules_dir / EQL.name)
            await eventually(lambda: live.rule_count == 2)
        finally:
            await rl.stop()
        gone = Reloader(LiveFilter(lambda t: RuleFilter(t)), load, [tmp_path / "nope"],
                        stamped=True)  # fmt: skip
        with pytest.raises(Exception, match="rule path missing"):
            await gone.load_initial()
        assert len(loads) == 2  # refused before loading

    arun(scenario())


def test_subprocess_compiler_fills_the_cache_and_can_be_killed(
    rules_dir: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    table, result = SubprocessCompiler([rules_dir], None, cache)()
    assert result.cached  # the child compiled; the parent only read the cache
    assert table.version == compile_rules([rules_dir], None, tmp_path / "other")[0].version
    assert [r.id for r in table.rules] == [SYSMON_RULE]

    slow = SubprocessCompiler([rules_dir], None, tmp_path / "cache2")
    errors: list[BaseException] = []

    def run() -> None:
        try:
            slow()
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    slow.kill()
    t.join(30)
    assert not t.is_alive()
    assert [str(e) for e in errors] == ["shutting down"]
    with pytest.raises(RuntimeError, match="shutting down"):
        slow()


def test_subprocess_compiler_passes_the_exclude_list(rules_dir: Path, tmp_path: Path) -> None:
    table, result = SubprocessCompiler([rules_dir], None, tmp_path / "cache", [SYSMON_RULE])()
    assert result.cached and result.excluded == 1 and not table.rules


def test_reason_key_keeps_digits_inside_names() -> None:
    from ruletag.runtime.reload import reason_key

    assert reason_key("pattern not accepted by RE2 at line 12, col 3") == (
        "pattern not accepted by RE2 at line N, col N"
    )
    assert reason_key("MD5 hash 'abc' of 32 chars; base64 in 4 parts") == (
        "MD5 hash '…' of N chars; base64 in N parts"
    )
