"""``ruletag match`` on the fast path: the records packed into msgpack entries and matched with
``Matcher.match_entries`` (the raw pre-filter) give byte for byte the output of ``--no-prefilter``
(``Matcher.match`` on every decoded record), on the pinned corpus sample and the seed rules with
the captures, the seed fixtures and generated records; also after the pre-filter re-tuned
itself. Unmatched JSON-lines records are written as they came."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path

import msgpack
import pytest

from ruletag.cli import main
from ruletag.commands.match import Batch, MatchContext, read_batches
from ruletag.rules.compiler import CompiledTable, build
from ruletag.rules.fields import FieldMap
from ruletag.rules.loader import load_rules
from ruletag.rules.matcher import Matcher
from support.paths import CAPTURE_DIRS, CAPTURES, DATA, SAMPLE, SEED_RULES
from test_differential import _material

RULE_PATHS = [str(SAMPLE / "sigma"), str(SAMPLE / "elastic"), str(SEED_RULES)]


@cache
def table() -> CompiledTable:
    result = load_rules([Path(p) for p in RULE_PATHS])
    return build(result.rules, FieldMap.default(), "test")


def generated(n: int, seed: int) -> list[dict]:
    """Records made of the rules' own field names and texts (mutated), some nested."""
    fields, texts = _material(list(table().rules), FieldMap.default())
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        rec: dict[str, object] = {}
        for _ in range(rnd.randint(1, 8)):
            name = rnd.choice(fields)
            value: object = rnd.choice(texts)
            roll = rnd.random()
            if roll < 0.2:
                value = value.upper()  # type: ignore[union-attr]
            elif roll < 0.3:
                value = f"x {value} y"
            elif roll < 0.35:
                value = [value, "other"]
            elif roll < 0.4 and str(value).isdigit():
                value = int(str(value))
            if "." in name and rnd.random() < 0.5:
                head, _, tail = name.partition(".")
                sub = rec.setdefault(head, {})
                if isinstance(sub, dict):
                    sub[tail] = value
            else:
                rec[name] = value
        out.append(rec)
    return out


def json_lines() -> bytes:
    """The captures, the seed fixtures and generated records as JSON lines (some spaced out,
    ASCII-escaped or wrapped as entries, as a user's file might hold them)."""
    lines = []
    for path in [CAPTURES / "windows-events.jsonl", *sorted((DATA / "seeds").glob("*.jsonl"))]:
        lines += [x for x in path.read_text("utf-8").splitlines() if x.strip()]
    for k, rec in enumerate(generated(1500, 5)):
        if k % 7 == 0:
            lines.append(json.dumps(rec, indent=None, separators=(" , ", " : ")))
        elif k % 11 == 0:
            lines.append(json.dumps([1714564800, rec]))  # an entry: re-dumped, not passed on
        else:
            lines.append(json.dumps(rec, ensure_ascii=k % 2 == 0))
    return ("\n".join(lines) + "\n").encode()


def run_match(
    capsysbinary: pytest.CaptureFixture[bytes], events: Path, *extra: str
) -> tuple[int, bytes]:
    rc = main(["match", "--rules", *RULE_PATHS, "--events", str(events), *extra])
    return rc, capsysbinary.readouterr().out


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_fast_path_equals_dict_path_on_json_lines(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    events = tmp_path / "events.jsonl"
    events.write_bytes(json_lines())
    rc_fast, fast = run_match(capsysbinary, events)
    rc_dict, slow = run_match(capsysbinary, events, "--no-prefilter")
    assert rc_fast == rc_dict == 0
    assert fast == slow
    out = [json.loads(x) for x in fast.splitlines()]
    assert len(out) >= 1500
    matched = sum("detections" in o for o in out)
    assert matched >= 20, matched  # the comparison covers a real share of matches
    assert len(out) - matched >= 1000
    only_fast = run_match(capsysbinary, events, "--only-matches")[1]
    only_dict = run_match(capsysbinary, events, "--only-matches", "--no-prefilter")[1]
    assert only_fast == only_dict and len(only_fast.splitlines()) == matched
    expl_fast = run_match(capsysbinary, events, "--explain", "--only-matches")[1]
    expl_dict = run_match(capsysbinary, events, "--explain", "--only-matches", "--no-prefilter")[1]
    assert expl_fast == expl_dict
    assert all("explain" in json.loads(x) for x in expl_fast.splitlines())


def test_fast_path_equals_dict_path_on_the_msgpack_captures(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    sent = sorted(
        p for d in CAPTURE_DIRS for p in d.glob("*.bin") if not p.name.endswith(".reply.bin")
    )
    assert len(sent) >= 20
    records = 0
    for path in sent:
        fast = run_match(capsysbinary, path)
        slow = run_match(capsysbinary, path, "--no-prefilter")
        assert fast == slow, path.name
        records += len(fast[1].splitlines())
    assert records >= 100


def test_unmatched_json_lines_pass_through_as_they_came(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    hit = (DATA / "seeds" / "potential_wsus_abuse_for_lateral_movement.fire.jsonl").read_text()
    hit_line = hit.splitlines()[0]
    lines = [
        '  {"a" : 1,  "b": "caf\\u00e9 \\/x"}  \r',
        hit_line,
        '[1714564800, {"c": 2}]',
        '{"d": 1.50, "e": 18446744073709551616, "f": "\\ud800"}',
    ]
    events = tmp_path / "e.jsonl"
    events.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode() + b"\n")
    rc, out = run_match(capsysbinary, events)
    assert rc == 0
    got = out.split(b"\n")
    assert got[0] == b'{"a" : 1,  "b": "caf\\u00e9 \\/x"}'  # as it came, stripped
    assert "detections" in json.loads(got[1])
    assert json.loads(got[2]) == {"c": 2}  # from an entry: dumped
    assert got[3] == lines[3].encode()  # msgpack cannot hold it: matched as a dict
    assert got[4:] == [b""]
    assert run_match(capsysbinary, events, "--no-prefilter") == (rc, out)


def test_fast_path_equals_dict_path_after_re_tuning() -> None:
    """Small batches, a pre-filter that re-tunes after 600 records: same matches throughout."""
    t = table()
    recs = generated(3000, 11)
    stream = io.BufferedReader(io.BytesIO(b"".join(msgpack.packb(r) for r in recs)))
    batches = list(read_batches(stream, size=300))
    assert [len(b.records) for b in batches] == [300] * 10
    fast = MatchContext(Matcher(t, tune_after=600), t)
    slow = MatchContext(Matcher(t), t, prefilter=False)

    def both(batch: Batch) -> dict[int, list[int]]:
        got = fast.match_batch(batch)
        assert got == slow.match_batch(batch)
        return got

    matched = sum(len(both(b)) for b in batches)
    raw = fast.matcher.raw
    assert raw is not None
    deadline = time.monotonic() + 60
    while raw.tuned is None and raw.tune_error is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert raw.tune_error is None
    assert sum(len(both(b)) for b in batches) == matched > 0
    assert fast.matcher.stats.get("raw_tuned_on_records", 0) >= 600


def test_tune_after_flag(tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    events = tmp_path / "events.jsonl"
    events.write_bytes(json_lines())
    want = run_match(capsysbinary, events)
    assert run_match(capsysbinary, events, "--tune-after", "100") == want
    assert run_match(capsysbinary, events, "--tune-after", "0") == want
    assert run_match(capsysbinary, events, "--tune-after", "-1")[0] == 2


def test_a_second_run_matches_every_record_with_the_kept_tuned_filter(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first run tunes and keeps its filter; the next run waits for that file (read on a
    thread) and matches its first batch with it, not with the untuned filter."""
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in generated(3000, 12)))
    first = run_match(capsysbinary, events, "--tune-after", "600")
    assert first[0] == 0
    deadline = time.monotonic() + 60  # the tuning finishes on its thread, after the run
    while not list((tmp_path / "cache" / "ruletag").glob("*.tuned")):
        assert time.monotonic() < deadline, "the first run kept no tuned filter"
        time.sleep(0.05)
    seen: list[object] = []
    original = Matcher.match_entries

    def spy(
        self: Matcher,
        entries: bytes,
        spans: list[tuple[int, int]],
        records: Sequence[Mapping[str, object]] | None = None,
    ) -> dict[int, list[int]]:
        seen.append(self.stats.get("raw_tuned_from"))
        return original(self, entries, spans, records)

    monkeypatch.setattr(Matcher, "match_entries", spy)
    assert run_match(capsysbinary, events, "--tune-after", "600") == first
    assert seen and seen[0] == "file"


def test_a_cached_table_starts_without_the_rule_front_ends(tmp_path: Path) -> None:
    """Once the table is cached, ``ruletag match`` neither parses rules nor imports what
    parses them (lark and its grammars, pySigma, the TOML reader): start-up is the table's
    load, not the front-ends' imports. The stateful engines of the sample's rules load too."""
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in generated(50, 3)))
    code = (
        "import sys\n"
        "from ruletag.cli import main\n"
        f"rc = main(['match', '--rules', *{RULE_PATHS!r}, '--events', {str(events)!r}])\n"
        "heavy = ('lark', 'sigma', 'tomllib', 'tomli', 'ruletag.rules.esql', 'ruletag.rules.eql',"
        " 'ruletag.rules.kql', 'ruletag.rules.sigma')\n"
        "print(rc, sorted(m for m in heavy if m in sys.modules))\n"
    )
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    runs = [
        subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
        )
        for _ in range(2)
    ]
    first, second = (r.stdout.strip().splitlines()[-1] for r in runs)
    assert first.startswith("0 [") and "lark" in first  # compiled: the front-ends ran
    assert second == "0 []", runs[1].stderr[-2000:]
