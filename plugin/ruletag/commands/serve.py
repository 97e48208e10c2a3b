"""``ruletag serve``: the config from ``--config`` or flags, logging, one relay or N workers.

A bad config, or rules that cannot be used at all, print one line on stderr and exit 2; the
relay itself (``ruletag.runtime.relay``) logs its ready line and stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Any

from ruletag.config.load import config_from_cli, load_config, with_cli_overrides
from ruletag.config.model import Config
from ruletag.errors import ConfigError
from ruletag.heap import limit_arenas
from ruletag.runtime.logs import setup_logging
from ruletag.runtime.relay import Relay

log = logging.getLogger(__name__)


def _fail(message: str) -> int:
    print(f"ruletag: {message}", file=sys.stderr)
    return 2


def build_config(ns: argparse.Namespace) -> Config:
    """The ``Config`` for ``serve``: from ``--config``, or from ``--listen``/``--forward``."""
    config_file = getattr(ns, "config", None)
    listen = getattr(ns, "listen", None)
    forward = getattr(ns, "forward", None)
    shared_key = getattr(ns, "shared_key", None)
    listen_key = getattr(ns, "listen_shared_key", None)
    forward_key = getattr(ns, "forward_shared_key", None)
    rules = getattr(ns, "rules", None)
    metrics = getattr(ns, "metrics", None)
    buffer_dir = getattr(ns, "buffer_dir", None)
    if config_file:
        if listen or forward or {shared_key, listen_key, forward_key} != {None}:
            raise ConfigError("use either --config or --listen/--forward/--shared-key, not both")
        config = load_config(config_file)
        return with_cli_overrides(config, rules=rules, metrics=metrics, buffer_dir=buffer_dir)
    if not forward and not rules:
        raise ConfigError(
            "serve needs --config FILE, --forward HOST:PORT[,HOST:PORT...] "
            "or --rules PATH... (without --forward, records go to stdout)"
        )
    config = config_from_cli(
        listen,
        forward,
        shared_key,
        rules=rules,
        metrics=metrics,
        listen_shared_key=listen_key,
        forward_shared_key=forward_key,
    )
    return with_cli_overrides(config, buffer_dir=buffer_dir)


def main_serve(ns: argparse.Namespace) -> int:
    """Entry point of ``ruletag serve``; returns the exit code."""
    try:
        config = build_config(ns)
    except ConfigError as exc:
        return _fail(f"invalid config: {exc}")
    try:
        setup_logging(
            getattr(ns, "log_format", None) or config.log.format,
            getattr(ns, "log_level", None) or config.log.level,
        )
    except ValueError as exc:
        return _fail(f"--log-level: {exc}")
    limit_arenas()  # before any thread: the workers are forked with the limit
    config = _auto_workers(config)
    if config.workers > 1:
        from ruletag.runtime.workers import run_workers

        try:
            return run_workers(config, _serve_one)
        except ConfigError as exc:
            return _fail(f"invalid config: {exc}")
        except OSError as exc:
            log.error("cannot start: %s", exc)
            return 1
    return _serve_one(config)


def _auto_workers(config: Config) -> Config:
    """``workers: auto`` with stateful rules evaluated here: one process, since the state of a
    key must not be split between processes (an explicit ``workers: N`` is refused instead).
    Compiling here also fills the table cache the workers read."""
    enrich = config.enrich
    if not (config.workers_auto and config.workers > 1 and config.rules is not None):
        return config
    if enrich is not None and enrich.stateful != "on":
        return config
    from ruletag.rules.compiler.rulelist import rule_kinds
    from ruletag.runtime.relay import rule_loader

    try:
        table, _ = rule_loader(config)()
    except Exception:  # the rules' problems are reported by the relay itself
        return config
    stateful = sum(k != "event" for k in rule_kinds(table.rules))
    del table
    if not stateful:
        return config
    log.warning(
        "workers: auto runs 1 process, not %d: %d stateful rules keep per-key state that "
        "must stay in one process (enrich.stateful: off on a stateless tier; "
        'docs/deploy.md "Stateful rules and workers")',
        config.workers,
        stateful,
    )
    return replace(config, workers=1)


def _serve_one(config: Config) -> int:
    """Run one serving process to the end; its exit code."""
    try:
        return _run(Relay(config, freeze_heap=True).serve())
    except ConfigError as exc:  # e.g. the rules cannot be used at all
        return _fail(f"invalid config: {exc}")
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
