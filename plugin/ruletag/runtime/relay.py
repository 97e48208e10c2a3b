"""A running relay: build it from a ``Config``, run it until stopped, shut it down in order.

``serve`` wires server -> pipeline (memory or durable) -> outputs, logs one ``ruletag ready:
...`` line once it accepts connections (with the number of rules and the rule-set version),
and shuts down gracefully on SIGTERM/SIGINT. Around the pipeline, ``_Enrichment`` wires the
live rule filter (``reload``), its hot reload (SIGHUP and rule-file polling) and the metrics
endpoint (``metrics``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ruletag.config.model import Config
from ruletag.errors import ConfigError

if TYPE_CHECKING:
    from ruletag.delivery.pipeline import Sender, Transform
    from ruletag.enrich.filter import RuleFilter
    from ruletag.rules.compiler import CompiledTable
    from ruletag.rules.loader import LoadResult
    from ruletag.runtime.metrics import MetricsServer
    from ruletag.runtime.reload import LiveFilter, Reloader
    from ruletag.transport.server import Server

log = logging.getLogger(__name__)


def _reopen_soon(output: object) -> None:
    from ruletag.delivery.outputs import reopen_files

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
    from ruletag.delivery.durable import DurablePipeline, start_durable
    from ruletag.delivery.outputs import build_outputs, describe
    from ruletag.delivery.pipeline import Pipeline
    from ruletag.transport.deadletter import with_default_dir
    from ruletag.transport.server import Server

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
        log.info(
            "ruletag ready: listening on %s, forwarding to %s%s%s",
            server.address,
            targets,
            enrichment.describe(),
            durable.describe() if durable else "",
        )
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
    from ruletag.config.model import EnrichConfig
    from ruletag.enrich.filter import RuleFilter

    enrich = config.enrich or EnrichConfig()
    tune_after = config.rules.tune_after if config.rules is not None else None

    def make(table: CompiledTable) -> RuleFilter:
        return RuleFilter(
            table,
            tune_after=tune_after,
            key=enrich.key,
            style=enrich.style,  # type: ignore[arg-type]
            retag_prefix=enrich.retag_prefix,
        )

    return make


def rule_loader(config: Config) -> Callable[[], tuple[CompiledTable, LoadResult]]:
    from ruletag.rules.loader import compile_rules

    rules = config.rules
    assert rules is not None
    cache = Path(rules.cache_dir) if rules.cache_dir else None
    return lambda: compile_rules(
        list(rules.paths),
        rules.vars or None,
        cache,
        exclude=rules.exclude,
        building_blocks=rules.building_blocks,
        select=rules.select,
    )


class _Enrichment:
    """One relay's live rule set, reloader, metrics and metrics endpoint."""

    def __init__(self, config: Config) -> None:
        from ruletag.runtime.metrics import Metrics

        self.config = config
        self.metrics = Metrics()
        self.live: LiveFilter | None = None
        self.reloader: Reloader | None = None
        self.http: MetricsServer | None = None
        self.cost: Any = None  # runtime.rulecost.RuleCostSampler when sampling is on

    async def start(self) -> None:
        """Start the metrics endpoint (``/health`` says 503 meanwhile), then load the rules."""
        from ruletag.runtime.metrics import MetricsServer
        from ruletag.runtime.reload import (
            LiveFilter,
            Reloader,
            SubprocessCompiler,
            problem_summary,
        )

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
            SubprocessCompiler(
                rules.paths,
                rules.vars or None,
                rules.cache_dir,
                rules.exclude,
                rules.building_blocks,
                rules.select,
            ),
            rules.paths,
            interval=rules.reload_interval,
            on_result=self.metrics.reload_done,
            initial_load=rule_loader(self.config),
        )
        try:
            result = await self.reloader.load_initial()
        except Exception as exc:
            raise ConfigError(f"rules: {exc}") from exc
        log.info(
            "rules: %d loaded from %d files in %.2f s%s%s%s, ruleset %s",
            self.live.rule_count,
            result.files,
            result.seconds,
            " (cached)" if result.cached else "",
            f", {result.excluded} excluded by rules.exclude" if result.excluded else "",
            f", {result.building_blocks} building-block rules left out by rules.building_blocks"
            if result.building_blocks
            else "",
            self.live.version,
            extra={
                "event": "rules_loaded",
                "rules": self.live.rule_count,
                "version": self.live.version,
            },
        )
        if result.selection is not None and result.selection.loaded > result.selection.kept:
            log.info("rules: %s", result.selection.text())
        if result.problems or result.duplicates:
            log.warning("rules: %s", problem_summary(result))
            for p in result.problems:
                log.debug("rules: %s:%s: %s: %s", p.path, p.line or 1, p.kind, p.reason)

    def wrap(self, output: Sender) -> tuple[Sender, Transform | None]:
        """The instrumented output and the (timed) live rule filter for the pipeline."""
        transform = self.metrics.timed_transform(self.live) if self.live is not None else None
        if transform is not None:  # sampled per-rule cost, only with RULETAG_RULE_COST_SAMPLE
            from ruletag.runtime.rulecost import install

            transform, self.cost = install(self.live, self.metrics.registry, transform)
        return self.metrics.instrument_sender(output), transform

    def attach(self, server: Server, output: object, buffer: object = None) -> None:
        """Export ``server``'s and ``output``'s counters; start watching the rule files."""
        from ruletag.runtime.metrics import health_of

        live = self.live
        server.on_decode = functools.partial(self.metrics.observe, "decode")
        health = health_of(
            (lambda: live is None or live.loaded, "rule table not loaded"),
            (lambda: server.listening, "listener not up"),
        )
        self.metrics.bind(server=server, forwarder=output, rules=live, buffer=buffer, health=health)
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
        if self.cost is not None:
            await asyncio.to_thread(self.cost.close)
        if self.reloader is not None:
            await self.reloader.stop()
        if self.http is not None:
            await self.http.stop()
