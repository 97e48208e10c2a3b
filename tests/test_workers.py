"""``workers: N``: N serve processes share one port (SO_REUSEPORT), supervised."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from ruletag.config.load import config_from_mapping, load_config
from ruletag.config.model import AUTO_WORKERS_CAP, auto_workers
from ruletag.errors import ConfigError
from ruletag.runtime.workers import reserve_port, stranded_buffers, worker_config
from support.peers import Sink, Source, make_chunk

FORWARD = {"servers": [{"host": "127.0.0.1", "port": 1}]}


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            out += [int(x) for x in f.read().split()]
    return out


def _wait_children(pid: int, n: int, timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = _children(pid)
        if len(kids) == n:
            return kids
        time.sleep(0.05)
    raise AssertionError(f"expected {n} workers, have {_children(pid)}")


def test_workers_key_is_validated() -> None:
    assert config_from_mapping({"forward": FORWARD}).workers == 1
    assert config_from_mapping({"forward": FORWARD, "workers": 3}).workers == 3
    with pytest.raises(ConfigError, match=r"workers: must be an int 1\.\.64"):
        config_from_mapping({"forward": FORWARD, "workers": 0})
    with pytest.raises(ConfigError, match="TCP listener"):
        config_from_mapping({"forward": FORWARD, "workers": 2, "listen": {"path": "/tmp/x"}})


def test_worker_config_pins_port_and_keeps_metrics_on_worker_zero() -> None:
    cfg = config_from_mapping(
        {"forward": FORWARD, "workers": 2, "metrics": {"listen": "127.0.0.1:0"}}
    )
    w0, w1 = worker_config(cfg, 0, 4321), worker_config(cfg, 1, 4321)
    assert (w0.listen.port, w0.listen.reuse_port, w0.workers) == (4321, True, 1)
    assert w0.metrics is not None and w1.metrics is None


def test_reserved_port_can_be_shared() -> None:
    holder, port = reserve_port("127.0.0.1", 0)
    try:
        other, same = reserve_port("127.0.0.1", port)  # a worker binds the same port
        other.close()
        assert same == port > 0
    finally:
        holder.close()


def test_two_workers_relay_restart_and_stop(arun: Any, serve_process: Any, tmp_path: Path) -> None:
    async def scenario() -> None:
        sink = Sink()
        await sink.start()
        cfg = tmp_path / "w.yaml"
        cfg.write_text(
            "listen:\n  host: 127.0.0.1\n  port: 0\n"
            f"forward:\n  servers:\n    - host: 127.0.0.1\n      port: {sink.port}\n"
            "workers: 2\n"
        )
        sp = await asyncio.to_thread(serve_process, ["--config", str(cfg)])
        pid = sp.proc.pid
        kids = await asyncio.to_thread(_wait_children, pid, 2)
        sources = [await Source.connect(sp.port) for _ in range(6)]
        for i, src in enumerate(sources):
            cid = await src.send_chunk(make_chunk("w", [{"i": i}]))
            assert await src.read_ack() == cid
            await src.close()
        assert sorted(r["i"] for r in sink.records) == list(range(6))
        # a worker that dies is replaced; the others keep serving
        os.kill(kids[0], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            now = _children(pid)
            if len(now) == 2 and kids[0] not in now:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"worker not restarted: {_children(pid)}")
        src = await Source.connect(sp.port)
        cid = await src.send_chunk(make_chunk("w", [{"i": 6}]))
        assert await src.read_ack() == cid
        await src.close()
        sp.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(sp.proc.wait, 15) == 0
        await sink.stop()

    arun(scenario())


def test_workers_auto_is_the_usable_cpu_count() -> None:
    cfg = config_from_mapping({"forward": FORWARD, "workers": "auto"})
    assert cfg.workers == auto_workers() >= 1 and cfg.workers_auto
    assert auto_workers() <= AUTO_WORKERS_CAP
    unix = config_from_mapping({"forward": FORWARD, "workers": "auto", "listen": {"path": "/x"}})
    assert unix.workers == 1  # a unix socket cannot be shared by processes
    with pytest.raises(ConfigError, match=r"workers: must be an int 1\.\.64 or auto"):
        config_from_mapping({"forward": FORWARD, "workers": "many"})
    prod = load_config(Path(__file__).parent.parent / "pipelines" / "production.yaml")
    assert prod.workers_auto and prod.workers == auto_workers()


def test_each_worker_has_its_own_buffer_folder(tmp_path: Path) -> None:
    cfg = config_from_mapping(
        {"forward": FORWARD, "workers": 2, "buffer": {"type": "disk", "path": str(tmp_path)}}
    )
    w0, w1 = worker_config(cfg, 0, 4321), worker_config(cfg, 1, 4321)
    assert w0.buffer is not None and w1.buffer is not None
    assert (w0.buffer.path, w1.buffer.path) == (
        str(tmp_path / "worker-0"),
        str(tmp_path / "worker-1"),
    )
    # dead letters stay in the one default folder of the buffer (file names are unique)
    assert w0.forward is not None and w1.forward is not None
    assert w0.forward.dead_letter_path == w1.forward.dead_letter_path == str(tmp_path / "rejected")
    # chunks a run with another layout left behind are named
    (tmp_path / "segment-00000001.log").write_bytes(b"")
    (tmp_path / "worker-5").mkdir()
    (tmp_path / "worker-5" / "segment-00000001.log").write_bytes(b"")
    (tmp_path / "worker-1").mkdir()
    (tmp_path / "worker-1" / "segment-00000001.log").write_bytes(b"")
    assert stranded_buffers(cfg) == [str(tmp_path), str(tmp_path / "worker-5")]


def test_two_workers_with_a_disk_buffer_never_share_segments(
    arun: Any, serve_process: Any, tmp_path: Path
) -> None:
    buf = tmp_path / "buffer"

    async def scenario() -> None:
        sink = Sink()
        await sink.start()
        cfg = tmp_path / "w.yaml"
        cfg.write_text(
            "listen:\n  host: 127.0.0.1\n  port: 0\n"
            f"forward:\n  servers:\n    - host: 127.0.0.1\n      port: {sink.port}\n"
            f"buffer:\n  type: disk\n  path: {buf}\n"
            "workers: 2\n"
        )
        sp = await asyncio.to_thread(serve_process, ["--config", str(cfg)])
        pid = sp.proc.pid
        kids = await asyncio.to_thread(_wait_children, pid, 2)
        # connections until both workers have taken one (the kernel spreads connections)
        i = 0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            src = await Source.connect(sp.port)
            cid = await src.send_chunk(make_chunk("w", [{"i": i}]))
            assert await src.read_ack() == cid
            await src.close()
            i += 1
            if i >= 4 and all((buf / f"worker-{n}").is_dir() for n in (0, 1)):
                break
        owners = {}
        for n in (0, 1):
            folder = buf / f"worker-{n}"
            assert folder.is_dir(), f"worker {n} has no buffer folder after {i} chunks"
            owners[n] = folder
        assert not list(buf.glob("segment-*.log"))  # nothing in the shared root
        deadline = time.monotonic() + 10
        while len(sink.records) < i and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert sorted(r["i"] for r in sink.records) == list(range(i))
        sp.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(sp.proc.wait, 15) == 0
        assert len(kids) == 2
        await sink.stop()

    arun(scenario())


def test_workers_after_the_first_follow_the_first_one_s_tuning(tmp_path: Path) -> None:
    """On a first start only worker 0 tunes the pre-filter; the others read what it keeps
    (``Matcher(follow=True)``, tests/test_prefilter_tuning.py)."""
    from ruletag.rules.compiler import build
    from ruletag.rules.fields import FieldMap
    from ruletag.rules.ir import Match, Rule, Wild
    from ruletag.runtime.relay import filter_factory

    cfg = config_from_mapping(
        {
            "forward": FORWARD,
            "workers": 3,
            "rules": {"paths": [str(tmp_path)], "cache_dir": str(tmp_path)},
            "enrich": {"stateful": "off"},
        }
    )
    cond = Match("CommandLine", (Wild.ANY, "mimikatz", Wild.ANY))
    table = build([Rule(id="m", name="m", source="sigma", condition=cond)], FieldMap.default(), "v")
    workers = [worker_config(cfg, i, 4321) for i in range(3)]
    assert [w.worker_index for w in workers] == [0, 1, 2]
    matchers = [filter_factory(w)(table).matcher for w in workers]
    assert [m._follow is not None for m in matchers] == [False, True, True]
    assert filter_factory(cfg)(table).matcher._follow is None  # one process: tunes itself
