"""``workers: N``: N serve processes share one port (SO_REUSEPORT), supervised."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from ruletag.config.load import config_from_mapping
from ruletag.errors import ConfigError
from ruletag.runtime.workers import reserve_port, worker_config
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
