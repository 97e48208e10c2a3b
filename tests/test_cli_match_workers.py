"""``ruletag match --workers N``: forked workers write byte for byte what one process writes, in
input order, over many blocks; a bad line or a dead worker stops the run as in one process;
stateful rules and msgpack input run in one process, said on stderr."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from ruletag.cli import main
from ruletag.commands import match as match_cmd
from ruletag.commands import match_workers
from support.paths import SAMPLE, SEED_RULES
from test_cli_match import RULE_PATHS, json_lines

#: no stateful rule among them (the elastic sample holds sequences, thresholds, ...)
STATELESS = [str(SAMPLE / "sigma"), str(SEED_RULES)]
#: the pre-filter never re-tunes: the workers match from the first block (by default the
#: parent matches the blocks of the first 20,000 records itself, tuning on them)
NO_TUNING = ("--tune-after", "0")

pytestmark = pytest.mark.skipif(
    not match_workers.fork_available(), reason="workers are forked; this platform cannot fork"
)


@pytest.fixture(autouse=True)
def _small_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A private cache, and blocks of 4 KB: the test inputs make dozens of them."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(match_cmd, "_BLOCK", 4096)


def run(
    capfd: pytest.CaptureFixture[bytes], events: Path, *extra: str, rules: list[str] = STATELESS
) -> tuple[int, bytes, str]:
    rc = main(["match", "--rules", *rules, "--events", str(events), *extra])
    out, err = capfd.readouterr()
    return rc, out, err.decode()


def _unhurried(block: bytes, first_line: int) -> tuple[bytes, int, str | None]:
    """``_work`` a little slower: the parent's tuning thread runs meanwhile (a test input
    this small ends before the thread gets the GIL for long enough otherwise)."""
    time.sleep(0.01)
    return match_workers.__dict__["_real_work"](block, first_line)


def test_workers_write_what_one_process_writes(
    tmp_path: Path, capfdbinary: pytest.CaptureFixture[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    events = tmp_path / "e.jsonl"
    body = json_lines()
    events.write_bytes(b"\xef\xbb\xbf" + body.replace(b"\n", b"\n\n", 5) + b"   \n")
    assert len(body) > 40 * 4096
    rc, one, _ = run(capfdbinary, events)
    assert rc == 0
    matched = sum(b'"detections"' in x for x in one.splitlines())
    assert matched >= 10, matched
    for workers in ("2", "3", "auto"):
        rc, out, err = run(capfdbinary, events, "--workers", workers, *NO_TUNING)
        assert rc == 0 and "one process" not in err, err
        assert out == one, workers
    pools: list[int] = []

    class Counted(ProcessPoolExecutor):
        def __init__(self, workers: int, **kw: Any) -> None:
            pools.append(workers)
            super().__init__(workers, **kw)

    monkeypatch.setattr(match_workers, "ProcessPoolExecutor", Counted)
    with monkeypatch.context() as patch:
        patch.setitem(match_workers.__dict__, "_real_work", match_workers._work)
        patch.setattr(match_workers, "_work", _unhurried)
        # the parent tunes on the first 300 records, then the workers start from its filter
        got = run(capfdbinary, events, "--workers", "2", "--tune-after", "300")
    assert got[:2] == (0, one)
    assert pools == [2]
    # the next run starts from the filter that tuning kept: workers from the first block
    assert run(capfdbinary, events, "--workers", "2")[:2] == (0, one)
    assert pools == [2, 2]
    # --no-prefilter never tunes: the workers start at once (a fresh cache: no kept filter)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "fresh"))
    assert run(capfdbinary, events, "--no-prefilter", "--workers", "2")[:2] == (0, one)
    assert pools == [2, 2, 2]
    for flags in (("--only-matches",), ("--explain", "--only-matches"), ("--no-prefilter",)):
        one_process = run(capfdbinary, events, *flags)[:2]
        assert run(capfdbinary, events, *flags, "--workers", "2", *NO_TUNING)[:2] == one_process


def test_one_huge_line_beside_many_small_ones(
    tmp_path: Path, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    """A line 60 times the block size, between thousands of small ones, with no newline at
    the end of the input: written whole and in its place."""
    small = json_lines().splitlines()
    huge = json.dumps({"CommandLine": "x" * (60 * 4096), "Image": "C:\\huge.exe"}).encode()
    events = tmp_path / "e.jsonl"
    events.write_bytes(b"\n".join([*small[:700], huge, *small[700:], huge]))
    rc, one, _ = run(capfdbinary, events)
    rc2, two, err = run(capfdbinary, events, "--workers", "2", *NO_TUNING)
    assert rc == rc2 == 0 and "one process" not in err
    assert two == one
    lines = two.splitlines()
    assert len(lines) == len(small) + 2 and lines[700] == huge and lines[-1] == huge


def test_a_bad_line_stops_the_workers_where_it_stops_one_process(
    tmp_path: Path, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    lines = [json.dumps({"Image": f"C:\\x{i}.exe", "n": i}) for i in range(3000)]
    lines[2499] = '{"Image": "cut'
    events = tmp_path / "bad.jsonl"
    events.write_text("\n".join(lines) + "\n")
    rc1, out1, err1 = run(capfdbinary, events, *NO_TUNING)  # no kept filter for the rest
    assert rc1 == 1 and len(out1.splitlines()) == 2499 and "line 2500: not JSON" in err1
    error = err1.splitlines()[-1]
    # workers from the first block; the parent tuning on 500 records first; the parent
    # alone (the input is shorter than a tuning)
    for tuning in (NO_TUNING, ("--tune-after", "500"), ()):
        rc, out, err = run(capfdbinary, events, "--workers", "2", *tuning)
        assert (rc, out, err.splitlines()[-1]) == (rc1, out1, error)  # [cached] aside


def _die_after_the_first_block(block: bytes, first_line: int) -> tuple[bytes, int, str | None]:
    if first_line > 1:
        os._exit(9)  # as the OOM killer would end it
    return match_workers.__dict__["_real_work"](block, first_line)


def test_a_worker_that_dies_ends_the_run_with_an_error(
    tmp_path: Path, capfdbinary: pytest.CaptureFixture[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    events = tmp_path / "e.jsonl"
    events.write_bytes(json_lines())
    whole = run(capfdbinary, events)[1]
    monkeypatch.setitem(match_workers.__dict__, "_real_work", match_workers._work)
    monkeypatch.setattr(match_workers, "_work", _die_after_the_first_block)
    rc, out, err = run(capfdbinary, events, "--workers", "2", *NO_TUNING)
    assert rc == 1
    assert "a worker process died" in err
    assert len(out) < len(whole) // 2 and whole.startswith(out)  # the blocks before, in order


def test_stateful_rules_and_msgpack_input_match_in_one_process(
    tmp_path: Path, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    events = tmp_path / "e.jsonl"
    events.write_bytes(json_lines()[:20000].rsplit(b"\n", 1)[0] + b"\n")
    rc, out, err = run(capfdbinary, events, "--workers", "2", rules=RULE_PATHS)
    assert rc == 0 and "matching in one process (stateful rules" in err
    assert out == run(capfdbinary, events, rules=RULE_PATHS)[1]
    packed = tmp_path / "e.msgpack"
    packed.write_bytes(b"\x81\xa1a\x01\x81\xa1a\x02")
    rc, out, err = run(capfdbinary, packed, "--workers", "2")
    assert rc == 0 and "matching in one process (a msgpack input" in err
    assert out.splitlines() == [b'{"a":1}', b'{"a":2}']
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    rc, out, err = run(capfdbinary, empty, "--workers", "2")
    assert rc == 0 and out == b"" and "one process" not in err


@pytest.mark.parametrize("bad", ["0", "-1", "two", "2.5"])
def test_a_bad_workers_value_is_a_usage_error(
    tmp_path: Path, capfdbinary: pytest.CaptureFixture[bytes], bad: str
) -> None:
    events = tmp_path / "e.jsonl"
    events.write_text('{"a": 1}\n')
    rc, out, err = run(capfdbinary, events, "--workers", bad)
    assert rc == 2 and out == b"" and "--workers" in err


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_reader_that_goes_away_ends_the_run_quietly(tmp_path: Path, workers: str) -> None:
    """``ruletag match ... | head -1``: the run stops at the closed pipe with 141 (as a tool
    ended by SIGPIPE), no "Broken pipe" message, no traceback."""
    events = tmp_path / "e.jsonl"
    events.write_bytes(json_lines() * 20)  # more than a pipe buffer holds
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "ruletag", "match", "--rules", *STATELESS]
    cmd += ["--events", str(events), "--workers", workers, *NO_TUNING]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert json.loads(first)
    assert "Broken pipe" not in err and "Traceback" not in err and "Exception" not in err, err
