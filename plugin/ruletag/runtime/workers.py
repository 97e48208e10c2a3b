"""``workers: N``: N serve processes on one TCP port, like fluentd's multi-process workers.

The supervisor reserves the port with an ``SO_REUSEPORT`` socket it never listens on (so
``port: 0`` resolves to one concrete port for every worker), then forks N workers; each runs
the whole pipeline (its own rule table, forwarder and counters) and binds the same port with
``SO_REUSEPORT``, so the kernel spreads incoming *connections* over the workers. One sender
connection is served by one worker: scaling needs at least as many connections as workers.

With a disk buffer, worker N keeps its chunks in its own folder ``<buffer.path>/worker-N``:
two processes never share a segment folder (each replays and deletes segments as if it were
alone). The dead letters stay in one folder (``<buffer.path>/rejected`` by default): their
file names are unique. A folder left by a run with more workers (or chunks left in
``<buffer.path>`` itself by a single-worker relay) is replayed only by a relay run with that
layout again; the supervisor logs a warning naming it.

SIGTERM/SIGINT to the supervisor stop every worker gracefully; a worker that dies on its own
is restarted after a second. Only worker 0 serves the metrics endpoint (counters are per
worker). The exit code is the worst worker exit code.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from ruletag.config.model import Config
from ruletag.errors import ConfigError
from ruletag.transport.deadletter import with_default_dir

log = logging.getLogger(__name__)

#: Seconds before a worker that died on its own is started again.
RESTART_DELAY = 1.0


def reserve_port(host: str, port: int) -> tuple[socket.socket, int]:
    """A bound, non-listening ``SO_REUSEPORT`` socket holding ``port``; and the port."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
    except BaseException:
        sock.close()
        raise
    return sock, int(sock.getsockname()[1])


def worker_config(config: Config, index: int, port: int) -> Config:
    """Worker ``index``'s config: the reserved port, ``reuse_port``, metrics on worker 0 only,
    its own disk-buffer folder ``<buffer.path>/worker-<index>`` (dead letters stay in the
    shared default folder), and its index (worker 0 tunes the pre-filter on a first start,
    the others read the filter it keeps: ``Matcher(follow=True)``)."""
    listen = replace(config.listen, port=port, reuse_port=True)
    metrics = config.metrics if index == 0 else None
    buffer = config.buffer
    if buffer is not None and buffer.disk and buffer.path:
        config = with_default_dir(config)
        buffer = replace(buffer, path=str(Path(buffer.path) / f"worker-{index}"))
    return replace(
        config,
        listen=listen,
        metrics=metrics,
        workers=1,
        worker_of=config.workers,
        worker_index=index,
        buffer=buffer,
    )


def stranded_buffers(config: Config) -> list[str]:
    """Disk-buffer folders this many workers will not replay: segments in ``buffer.path``
    itself, or ``worker-N`` folders with N >= ``workers`` that still hold segments."""
    buffer = config.buffer
    if buffer is None or not buffer.disk or not buffer.path:
        return []
    root = Path(buffer.path)
    out = [str(root)] if any(root.glob("segment-*.log")) else []
    for sub in sorted(root.glob("worker-*")):
        n = sub.name.split("-", 1)[1]
        if n.isdigit() and int(n) >= config.workers and any(sub.glob("segment-*.log")):
            out.append(str(sub))
    return out


def run_workers(config: Config, run_one: Callable[[Config], int]) -> int:
    """Fork ``config.workers`` processes running ``run_one(worker_config)``; supervise them."""
    if config.listen.path:
        raise ConfigError("workers > 1 needs a TCP listener (listen.host/port), not a unix path")
    if not hasattr(socket, "SO_REUSEPORT"):
        raise ConfigError("workers > 1 needs SO_REUSEPORT, which this platform lacks")
    for folder in stranded_buffers(config):
        log.warning(
            "disk buffer %s holds chunks that %d workers do not replay (each worker uses "
            "<buffer.path>/worker-N); run with the workers that wrote them to deliver them",
            folder,
            config.workers,
        )
    holder, port = reserve_port(config.listen.host, config.listen.port)
    children: dict[int, int] = {}  # pid -> worker index
    stopping = False

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                holder.close()
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                code = run_one(worker_config(config, index, port))
            except BaseException:
                log.exception("worker %d failed", index)
            finally:
                logging.shutdown()
                os._exit(code)
        children[pid] = index

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    worst = 0
    try:
        log.info("starting %d workers on port %d", config.workers, port)
        for i in range(config.workers):
            spawn(i)
        while children:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            index = children.pop(pid, None)
            code = os.waitstatus_to_exitcode(status)
            if index is None:
                continue
            if stopping:  # killed by our SIGTERM before its loop ran counts as stopped
                bad = code > 0 or (code < 0 and code != -signal.SIGTERM)
                worst = max(worst, code if code > 0 else int(bad))
                continue
            if code == 2:  # a config/rules error: a restart would fail the same way
                log.error("worker %d could not start; stopping the others", index)
                worst = 2
                on_signal(signal.SIGTERM, None)
                continue
            log.error("worker %d exited with code %d; restarting it", index, code)
            time.sleep(RESTART_DELAY)
            if not stopping:
                spawn(index)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        holder.close()
    return worst
