"""``ruletag serve`` and ``ruletag validate``: build config, pipeline, server and forwarder.

``serve`` logs one ``ruletag ready: ...`` line once it accepts connections (with the number
of rules and the rule-set version), and shuts down gracefully (exit 0) on SIGTERM/SIGINT. A bad
config, or rules that cannot be used at all, print one line on stderr and exit 2. Around the
pipeline, ``_Enrichment`` wires the live rule filter (``reload``), its hot reload (SIGHUP and
rule-file polling) and the metrics endpoint (``metrics``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ruletag.config import Config, config_from_cli, load_config, with_cli_overrides
from ruletag.errors import ConfigError
from ruletag.logs import setup_logging

if TYPE_CHECKING:
    from ruletag.filter import RuleFilter
    from ruletag.metrics import MetricsServer
    from ruletag.pipeline import Sender, Transform
    from ruletag.reload import LiveFilter, Reloader
    from ruletag.rules.loader import LoadResult
    from ruletag.rules.table import CompiledTable
    from ruletag.server import Server

log = logging.getLogger("ruletag.app")

def _fail(message: str) -> int:
    print(f"ruletag: {message}", file=sys.stderr)
    return 2


def build_config(ns: argparse.Namespace) -> Config:
    """The ``Config`` for ``serve``: from ``--config``, or from ``--listen``/``--forward``."""
    config_file = getattr(ns, "config", None)
    listen = getattr(ns, "listen", None)
    forward = getattr(ns, "forward", None)
    shared_key = getattr(ns, "shared_key", None)
    rules = getattr(ns, "rules", None)
    metrics = getattr(ns, "metrics", None)
    buffer_dir = getattr(ns, "buffer_dir", None)
    if config_file:
        if listen or forward or shared_key is not None:
            raise ConfigError("use either --config or --listen/--forward/--shared-key, not both")
        config = load_config(config_file)
        return with_cli_overrides(config, rules=rules, metrics=metrics, buffer_dir=buffer_dir)
    if not forward and not rules:
        raise ConfigError("serve needs --config FILE, --forward HOST:PORT[,HOST:PORT...] "
                          "or --rules PATH... (without --forward, records go to stdout)")
    config = config_from_cli(listen, forward, shared_key, rules=rules, metrics=metrics)
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
    if config.workers > 1:
        from ruletag.workers import run_workers

        try:
            return run_workers(config, _serve_one)
        except ConfigError as exc:
            return _fail(f"invalid config: {exc}")
        except OSError as exc:
            log.error("cannot start: %s", exc)
            return 1
    return _serve_one(config)


def _serve_one(config: Config) -> int:
    """Run one serving process to the end; its exit code."""
    try:
        return _run(serve(config))
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


def _reopen_soon(output: object) -> None:
    from ruletag.outputs import reopen_files

    async def reopen() -> None:
        try:
            n = await reopen_files(output)
            log.info("SIGUSR1: reopened %d file output(s)", n)
        except OSError as exc:
            log.error("SIGUSR1: could not reopen a file output: %s", exc)

    task = asyncio.get_running_loop().create_task(reopen())
    _background.add(task)
    task.add_done_callback(_background.discard)


_background: set[asyncio.Task[None]] = set()


async def serve(config: Config, stop: asyncio.Event | None = None) -> int:
    """Run the relay until ``stop`` is set or SIGTERM/SIGINT arrives; return 0."""
    from ruletag.deadletter import with_default_dir
    from ruletag.durable import DurablePipeline, start_durable
    from ruletag.outputs import build_outputs, describe
    from ruletag.pipeline import Pipeline
    from ruletag.server import Server

    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    enrichment = _Enrichment(config)
    try:
        await enrichment.start()  # metrics endpoint, then the rules (raises ConfigError)
    except BaseException:
        await enrichment.stop()
        for sig in installed:
            loop.remove_signal_handler(sig)
        raise
    forwarder = build_outputs(with_default_dir(config))  # forward and/or stdout/file outputs
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        # SIGUSR1 reopens file outputs after a log rotation (the nginx/fluentd convention).
        loop.add_signal_handler(signal.SIGUSR1, _reopen_soon, forwarder)
        installed.append(signal.SIGUSR1)
    sender, transform = enrichment.wrap(forwarder)
    durable: DurablePipeline | None = None
    try:
        await forwarder.start()  # inside: a bad output path still stops metrics and reload
        if config.buffer is not None and config.buffer.disk:  # the ack point: on disk
            durable = await start_durable(config.buffer, sender, transform)
        server = Server(config.listen, (durable or Pipeline(sender, transform)).submit)
        enrichment.attach(server, forwarder, durable.stats if durable else None)
        await server.start()
        targets = describe(forwarder)
        log.info("ruletag ready: listening on %s, forwarding to %s%s%s", server.address, targets,
                 enrichment.describe(), durable.describe() if durable else "")
        await stop.wait()
        log.info("shutting down")
        await server.stop()
    finally:
        if durable is not None:
            await durable.close(timeout=min(config.listen.shutdown_timeout, 2.0))
        await enrichment.stop()
        await forwarder.close()
        for sig in installed:
            loop.remove_signal_handler(sig)
    log.info("stopped")
    return 0


# ---------------------------------------------------------------------------------------------
# rules, enrichment, metrics and hot reload (the parts of a running relay around the filter)


def filter_factory(config: Config) -> Callable[[CompiledTable], RuleFilter]:
    from ruletag.config import EnrichConfig
    from ruletag.filter import RuleFilter

    enrich = config.enrich or EnrichConfig()
    tune_after = config.rules.tune_after if config.rules is not None else None

    def make(table: CompiledTable) -> RuleFilter:
        if tune_after is not None:
            table.set_tune_after(tune_after)
        return RuleFilter(table, key=enrich.key, style=enrich.style,  # type: ignore[arg-type]
                          retag_prefix=enrich.retag_prefix)

    return make


def rule_loader(config: Config) -> Callable[[], tuple[CompiledTable, LoadResult]]:
    from ruletag.rules.loader import compile_rules

    rules = config.rules
    assert rules is not None
    cache = Path(rules.cache_dir) if rules.cache_dir else None
    return lambda: compile_rules(
        list(rules.paths), rules.vars or None, cache, exclude=rules.exclude
    )


class _Enrichment:
    """One relay's live rule set, reloader, metrics and metrics endpoint."""

    def __init__(self, config: Config) -> None:
        from ruletag.metrics import Metrics

        self.config = config
        self.metrics = Metrics()
        self.live: LiveFilter | None = None
        self.reloader: Reloader | None = None
        self.http: MetricsServer | None = None

    async def start(self) -> None:
        """Start the metrics endpoint (``/health`` says 503 meanwhile), then load the rules."""
        from ruletag.metrics import MetricsServer
        from ruletag.reload import LiveFilter, Reloader, SubprocessCompiler, problem_summary

        if self.config.metrics is not None:
            m = self.config.metrics
            self.http = MetricsServer(self.metrics, m.host, m.port)
            await self.http.start()
        if self.config.rules is None:
            return
        self.live = LiveFilter(filter_factory(self.config))
        rules = self.config.rules
        self.reloader = Reloader(  # reloads compile in a child process: the loop never stalls
            self.live,
            SubprocessCompiler(rules.paths, rules.vars or None, rules.cache_dir, rules.exclude),
            rules.paths,
            interval=rules.reload_interval,
            on_result=self.metrics.reload_done,
            initial_load=rule_loader(self.config),
        )
        try:
            result = await self.reloader.load_initial()
        except Exception as exc:
            raise ConfigError(f"rules: {exc}") from exc
        log.info("rules: %d loaded from %d files in %.2f s%s%s, ruleset %s",
                 self.live.rule_count, result.files, result.seconds,
                 " (cached)" if result.cached else "",
                 f", {result.excluded} excluded by rules.exclude" if result.excluded else "",
                 self.live.version,
                 extra={"event": "rules_loaded", "rules": self.live.rule_count,
                        "version": self.live.version})
        if result.problems or result.duplicates:
            log.warning("rules: %s", problem_summary(result))
            for p in result.problems:
                log.debug("rules: %s:%s: %s: %s", p.path, p.line or 1, p.kind, p.reason)

    def wrap(self, output: Sender) -> tuple[Sender, Transform | None]:
        """The instrumented output and the (timed) live rule filter for the pipeline."""
        transform = self.metrics.timed_transform(self.live) if self.live is not None else None
        return self.metrics.instrument_sender(output), transform

    def attach(self, server: Server, output: object, buffer: object = None) -> None:
        """Export ``server``'s and ``output``'s counters; start watching the rule files."""
        from ruletag.metrics import health_of

        live = self.live
        server.on_decode = functools.partial(self.metrics.observe, "decode")
        health = health_of(
            (lambda: live is None or live.loaded, "rule table not loaded"),
            (lambda: server.listening, "listener not up"),
        )
        self.metrics.bind(server=server, forwarder=output, rules=live, buffer=buffer,
                          health=health)
        if self.reloader is not None:
            self.reloader.start()

    def describe(self) -> str:
        """The ready line's tail: rules and metrics endpoint."""
        parts = []
        if self.live is not None:
            parts.append(f"{self.live.rule_count} rules loaded (ruleset {self.live.version})")
        if self.http is not None:
            parts.append(f"metrics on {self.http.address}")
        return "".join(f", {p}" for p in parts)

    async def stop(self) -> None:
        if self.reloader is not None:
            await self.reloader.stop()
        if self.http is not None:
            await self.http.stop()


def main_validate(ns: argparse.Namespace) -> int:
    """Entry point of ``ruletag validate``: 0 if every config (and its rules) is valid, else 1.

    Loads each config, parses its ``tests:`` block, and loads and compiles its rules exactly as
    ``serve`` does. Rules that are unsupported or malformed are counted and listed (``serve``
    skips them too); a missing rule path or a rule set without one usable rule is invalid.
    """
    from ruletag.pipeline_tests import load_rule_filter, parse_tests
    from ruletag.reload import problem_summary

    bad = 0
    for path in ns.configs:
        try:
            config = load_config(path)
            tests = 0
            if config.tests is not None:
                tests = len(parse_tests(config.tests.raw, Path(path).resolve().parent))
            rule_filter, result = load_rule_filter(config)
        except ConfigError as exc:
            where = "" if str(exc).startswith(str(path)) else f"{path}: "
            print(f"INVALID {where}{exc}", file=sys.stderr)
            bad += 1
            continue
        parts = []
        if rule_filter is not None and result is not None:
            parts.append(
                f"{len(rule_filter.table.rules)} rules (version {rule_filter.table.version}), "
                f"{len(result.unsupported)} unsupported, {len(result.invalid)} invalid, "
                f"{len(result.duplicates)} duplicate ids"
                + (f", {result.excluded} excluded" if result.excluded else "")
            )
        else:
            parts.append("no rules")
        parts.append(f"{tests} tests")
        print(f"OK {path}: {'; '.join(parts)}")
        if result is not None and (result.problems or result.duplicates):
            print(f"  {problem_summary(result)}")
            for problem in result.problems[:20]:
                print(f"  {problem.kind}: {problem}")
            if len(result.problems) > 20:
                print(f"  ... and {len(result.problems) - 20} more (ruletag rules check)")
    return 1 if bad else 0
