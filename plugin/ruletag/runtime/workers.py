"""``workers: N``: N serve processes on one TCP port, like fluentd's multi-process workers.

The supervisor reserves the port with an ``SO_REUSEPORT`` socket it never listens on (so
``port: 0`` resolves to one concrete port for every worker), then forks N workers; each runs
the whole pipeline (its own rule table, forwarder and counters) and binds the same port with
``SO_REUSEPORT``, so the kernel spreads incoming *connections* over the workers. One sender
connection is served by one worker: scaling needs at least as many connections as workers.

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

from ruletag.config.model import Config
from ruletag.errors import ConfigError

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
    """Worker ``index``'s config: the reserved port, ``reuse_port``, metrics on worker 0 only."""
    listen = replace(config.listen, port=port, reuse_port=True)
    metrics = config.metrics if index == 0 else None
    return replace(config, listen=listen, metrics=metrics, workers=1, worker_of=config.workers)


def run_workers(config: Config, run_one: Callable[[Config], int]) -> int:
    """Fork ``config.workers`` processes running ``run_one(worker_config)``; supervise them."""
    if config.listen.path:
        raise ConfigError("workers > 1 needs a TCP listener (listen.host/port), not a unix path")
    if not hasattr(socket, "SO_REUSEPORT"):
        raise ConfigError("workers > 1 needs SO_REUSEPORT, which this platform lacks")
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
