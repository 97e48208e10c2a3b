"""``ruletag serve`` and ``ruletag validate``: build config, pipeline, server and forwarder.

``serve`` logs one ``ruletag ready: ...`` line once it accepts connections, and shuts down
gracefully (exit 0) on SIGTERM/SIGINT. A bad config prints one line on stderr and exits 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from ruletag.config import Config, config_from_cli, load_config
from ruletag.errors import ConfigError
from ruletag.logs import setup_logging

log = logging.getLogger("ruletag.app")

#: CLI options and config sections that later issues implement.
_NOT_YET_OPTIONS = (("rules", "--rules"), ("metrics", "--metrics"), ("buffer_dir", "--buffer-dir"))
_NOT_YET_SECTIONS = ("rules", "enrich", "buffer", "metrics", "outputs")


def _fail(message: str) -> int:
    print(f"ruletag: {message}", file=sys.stderr)
    return 2


def build_config(ns: argparse.Namespace) -> Config:
    """The ``Config`` for ``serve``: from ``--config``, or from ``--listen``/``--forward``."""
    config_file = getattr(ns, "config", None)
    listen = getattr(ns, "listen", None)
    forward = getattr(ns, "forward", None)
    shared_key = getattr(ns, "shared_key", None)
    if config_file:
        if listen or forward or shared_key is not None:
            raise ConfigError("use either --config or --listen/--forward/--shared-key, not both")
        return load_config(config_file)
    if not forward:
        raise ConfigError("serve needs --config FILE or --forward HOST:PORT[,HOST:PORT...]")
    return config_from_cli(listen, forward, shared_key)


def main_serve(ns: argparse.Namespace) -> int:
    """Entry point of ``ruletag serve``; returns the exit code."""
    for attr, flag in _NOT_YET_OPTIONS:
        if getattr(ns, attr, None):
            return _fail(f"{flag} is not implemented yet")
    try:
        config = build_config(ns)
    except ConfigError as exc:
        return _fail(f"invalid config: {exc}")
    unimplemented = [n for n in _NOT_YET_SECTIONS if getattr(config, n) is not None]
    if unimplemented:
        return _fail(f"config section {unimplemented[0]!r} is not implemented yet")
    try:
        setup_logging(
            getattr(ns, "log_format", None) or config.log.format,
            getattr(ns, "log_level", None) or config.log.level,
        )
    except ValueError as exc:
        return _fail(f"--log-level: {exc}")
    try:
        return _run(serve(config))
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1


def _run(coro: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop when installed, else the default asyncio loop."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        pass
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


async def serve(config: Config, stop: asyncio.Event | None = None) -> int:
    """Run the relay until ``stop`` is set or SIGTERM/SIGINT arrives; return 0."""
    from ruletag.forwarder import Forwarder
    from ruletag.pipeline import Pipeline
    from ruletag.server import Server

    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    forwarder = Forwarder(config.forward)
    await forwarder.start()
    server = Server(config.listen, Pipeline(forwarder).submit)
    try:
        await server.start()
        targets = ", ".join(s.address for s in config.forward.servers)
        log.info("ruletag ready: listening on %s, forwarding to %s", server.address, targets)
        await stop.wait()
        log.info("shutting down")
        await server.stop()
    finally:
        await forwarder.close()
        for sig in installed:
            loop.remove_signal_handler(sig)
    log.info("stopped")
    return 0


def main_validate(ns: argparse.Namespace) -> int:
    """Entry point of ``ruletag validate``: 0 if every config is valid, else 1."""
    bad = 0
    for path in ns.configs:
        try:
            config = load_config(path)
        except ConfigError as exc:
            print(f"INVALID {exc}", file=sys.stderr)
            bad += 1
            continue
        later = config.reserved_sections()
        note = f" (not checked yet: {', '.join(later)})" if later else ""
        print(f"OK {path}{note}")
    return 1 if bad else 0
