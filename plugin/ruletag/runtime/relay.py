"""A running relay with a start/stop lifecycle, like uvicorn's ``Server``.

``Relay(config)`` wires server -> pipeline (memory or durable) -> outputs around the live rule
filter, its hot reload and the metrics endpoint. ``serve()`` installs the signal handlers
(SIGTERM/SIGINT stop, SIGUSR1 reopens file outputs), runs ``startup()``, waits until
``should_exit`` is set and runs ``shutdown()``; ``startup()`` logs one ``ruletag ready: ...``
line once the relay accepts connections.
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
    from ruletag.delivery.durable import DurablePipeline
    from ruletag.delivery.pipeline import Sender, Transform
    from ruletag.enrich.filter import RuleFilter
    from ruletag.enrich.stateful import StatefulStage
    from ruletag.rules.compiler import CompiledTable
    from ruletag.rules.loader import LoadResult
    from ruletag.runtime.metrics import MetricsServer
    from ruletag.runtime.reload import LiveFilter, Reloader
    from ruletag.runtime.state import StateStore
    from ruletag.transport.server import Server

log = logging.getLogger(__name__)


class Relay:
    """One relay built from ``config``: ``await Relay(config).serve()`` runs it to the end.

    Setting ``should_exit`` (from a signal handler, a test or another task on the relay's event
    loop) makes ``serve()`` shut down gracefully. ``startup()`` and ``shutdown()`` can also be
    driven by hand, without any signal handler.
    """

    def __init__(self, config: Config, *, freeze_heap: bool = False) -> None:
        self.config = config
        # freeze_heap: the process is this relay's own: freeze the start-up heap
        # (``Reloader(freeze=)``)
        self.enrichment = _Enrichment(config, freeze_heap)
        self.output: Any = None  # the forwarder and/or stdout/file outputs
        self.durable: DurablePipeline | None = None
        self.server: Server | None = None
        self.state: StateStore | None = None  # checkpoints of the stateful rules' state
        self.started = False
        self._exit = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()

    @property
    def should_exit(self) -> bool:
        return self._exit.is_set()

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        if value:
            self._exit.set()
        else:
            self._exit.clear()

    async def serve(self) -> int:
        """Install the signal handlers, start, wait for ``should_exit``, shut down; 0."""
        loop = asyncio.get_running_loop()
        installed = self._install_signal_handlers(loop)
        try:
            try:
                await self.startup()
                await self._exit.wait()
                log.info("shutting down")
            finally:
                await self.shutdown()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
        log.info("stopped")
        return 0

    def _install_signal_handlers(self, loop: asyncio.AbstractEventLoop) -> list[signal.Signals]:
        handlers: list[tuple[signal.Signals, Callable[[], None]]] = [
            (signal.SIGTERM, self._handle_exit),
            (signal.SIGINT, self._handle_exit),
            # SIGUSR1 reopens file outputs after a log rotation (the nginx/fluentd convention).
            (signal.SIGUSR1, self._reopen_soon),
        ]
        installed = []
        for sig, handler in handlers:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, handler)
                installed.append(sig)
        return installed

    def _handle_exit(self) -> None:
        self.should_exit = True

    def _reopen_soon(self) -> None:
        from ruletag.delivery.outputs import reopen_files

        output = self.output
        if output is None:
            return

        async def reopen() -> None:
            try:
                n = await reopen_files(output)
                log.info("SIGUSR1: reopened %d file output(s)", n)
            except OSError as exc:
                log.error("SIGUSR1: could not reopen a file output: %s", exc)

        task = asyncio.get_running_loop().create_task(reopen())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def startup(self) -> None:
        """Metrics endpoint and rules, outputs, durable buffer, then the listener; logs the
        ready line. On failure, ``shutdown()`` releases what was started."""
        from ruletag.delivery.durable import start_durable
        from ruletag.delivery.outputs import build_outputs, describe
        from ruletag.delivery.pipeline import Pipeline
        from ruletag.transport.deadletter import with_default_dir
        from ruletag.transport.server import Server

        config = self.config
        await self.enrichment.start()  # metrics endpoint, then the rules (raises ConfigError)
        self.state = self.enrichment.start_state()  # stateful rules' checkpoints, restored
        self.output = build_outputs(with_default_dir(config))  # forward and/or stdout/file
        sender, transform = self.enrichment.wrap(self.output)
        await self.output.start()
        if config.buffer is not None and config.buffer.disk:  # the ack point: on disk
            self.durable = await start_durable(config.buffer, sender, transform)
        durable = self.durable
        server = Server(config.listen, (durable or Pipeline(sender, transform)).submit)
        self.server = server
        self.enrichment.attach(server, self.output, durable.stats if durable else None)
        await server.start()
        self.started = True
        log.info(
            "ruletag ready: listening on %s, forwarding to %s%s%s",
            server.address,
            describe(self.output),
            self.enrichment.describe(),
            durable.describe() if durable else "",
        )

    async def shutdown(self) -> None:
        """Stop accepting and drain the listener, then the buffer, rules and outputs."""
        try:
            if self.started and self.server is not None:
                self.started = False
                await self.server.stop()
        finally:
            if self.durable is not None:
                await self.durable.close(timeout=min(self.config.listen.shutdown_timeout, 2.0))
            if self.state is not None:  # after the last chunk went through the filter
                await self.state.stop()
            await self.enrichment.stop()
            if self.output is not None:
                await self.output.close()


# ---------------------------------------------------------------------------------------------
# rules, enrichment, metrics and hot reload (the parts of a running relay around the filter)


def filter_factory(config: Config) -> Callable[[CompiledTable], RuleFilter]:
    from ruletag.config.model import EnrichConfig
    from ruletag.enrich.filter import RuleFilter
    from ruletag.rules.fingerprint import default_cache_dir, tuned_path

    enrich = config.enrich or EnrichConfig()
    tune_after = config.rules.tune_after if config.rules is not None else None
    # the stateful engines' step tables are cached beside the main tables
    step_cache_dir = (config.rules.cache_dir if config.rules is not None else None) or str(
        default_cache_dir()
    )

    def make(table: CompiledTable) -> RuleFilter:
        stage = None
        if enrich.stateful == "on":  # the engines' modules are imported only then
            from ruletag.enrich.stateful import StatefulStage

            stage = StatefulStage.of(table.rules, table.fieldmap, step_cache_dir, table.version)
        if stage is not None and config.rules is not None:
            from ruletag.rules.stateful.newterms import configure_new_terms

            nt = config.rules.new_terms
            configure_new_terms(stage.engines, learn=nt.learn, max_terms=nt.max_terms)
            stage.set_lateness(config.rules.lateness)
        # a worker, or validate/test; ``workers: auto`` serves stateful rules in one process
        # (commands.serve), so only its workers refuse them (a reload that adds some)
        workers = config.worker_of if config.workers_auto else max(config.workers, config.worker_of)
        if stage is not None and workers > 1:
            counts = ", ".join(f"{n} {k}" for k, n in sorted(stage.rule_counts().items()))
            raise ConfigError(
                f"workers: {workers} with stateful rules ({counts}) would split the "
                "state of a key between processes: use workers: 1 here, or set "
                "enrich.stateful: off on this tier and forward to a single-worker ruletag "
                'that evaluates them (docs/deploy.md "Stateful rules and workers")'
            )
        return RuleFilter(
            table,
            tune_after=tune_after,
            # the pre-filter re-tuned by an earlier run (or worker) of this rule table
            tuned_path=tuned_path(step_cache_dir, table.version),
            # workers after the first read the filter the first one tunes and keeps (one
            # tuning's CPU and memory on a first start, not one per worker)
            follow=config.worker_index > 0,
            key=enrich.key,
            style=enrich.style,  # type: ignore[arg-type]
            retag_prefix=enrich.retag_prefix,
            # EQL sequences, thresholds...: their engines, fed after the filter matched a chunk
            stateful=stage,
            alert_tag=enrich.alert_tag,
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

    def __init__(self, config: Config, freeze_heap: bool = False) -> None:
        from ruletag.runtime.metrics import Metrics

        self.config = config
        self.freeze_heap = freeze_heap
        self.metrics = Metrics()
        self.live: LiveFilter | None = None
        self.reloader: Reloader | None = None
        self.http: MetricsServer | None = None
        self.cost: Any = None  # runtime.rulecost.RuleCostSampler when sampling is on
        self.state: StateStore | None = None

    async def start(self) -> None:
        """Start the metrics endpoint (``/health`` says 503 meanwhile), then load the rules."""
        from ruletag.rules.compiler.rulelist import rule_kinds
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
            freeze=self.freeze_heap,
            stamped=True,  # both loaders run compile_rules on rules.paths, the watched paths
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
        stage = self.live.filter.stateful if self.live.filter is not None else None
        if stage is not None:
            counts = ", ".join(f"{n} {k}" for k, n in sorted(stage.rule_counts().items()))
            log.info("rules: stateful rules evaluated in the stream: %s", counts)
        elif stateful := sum(k != "event" for k in rule_kinds(result.rules)):
            log.info(
                "rules: %d stateful rules loaded, not evaluated here (enrich.stateful: off)",
                stateful,
            )
        correlations = sum(k == "correlation" for k in rule_kinds(result.rules))
        if correlations:
            log.warning(
                "rules: %d Sigma correlation rules loaded but not evaluated by the relay yet, "
                "and the rules they use with generate: false do not fire on their own "
                '(ruletag match evaluates them; docs/rules.md "Sigma correlations")',
                correlations,
            )
        if result.problems or result.duplicates:
            log.warning("rules: %s", problem_summary(result))
            for p in result.problems:
                log.debug("rules: %s:%s: %s: %s", p.path, p.line or 1, p.kind, p.reason)

    def stage(self) -> StatefulStage | None:
        """The live rule set's stateful stage (None: no stateful rules)."""
        f = self.live.filter if self.live is not None else None
        return f.stateful if f is not None else None

    def start_state(self) -> StateStore | None:
        """Restore the stateful rules' checkpoint and start checkpointing (``state.path``, or
        ``<buffer.path>/state`` with a disk buffer); None without a folder."""
        from ruletag.runtime.state import StateStore, state_folder

        if self.live is None:
            return None
        folder, interval = state_folder(self.config)
        stage = self.stage()
        if folder is None:
            if stage is not None:
                log.info(
                    "state: no state.path and no disk buffer: the state of stateful rules "
                    "(partial sequences, threshold counts) is lost at restart"
                )
            return None
        store = StateStore(folder, self.stage, interval)
        store.restore()
        store.start()
        self.state = store
        return store

    def wrap(self, output: Sender) -> tuple[Sender, Transform | None]:
        """The instrumented output and the (timed) live rule filter for the pipeline."""
        transform = self.metrics.timed_transform(self.live) if self.live is not None else None
        metrics = self.config.metrics
        every = metrics.rule_cost_sample if metrics is not None else 0
        if transform is not None and every > 0:  # sampled per-rule cost (metrics.rule_cost_sample)
            from ruletag.runtime.rulecost import install

            transform, self.cost = install(self.live, self.metrics.registry, transform, every)
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
        self.metrics.bind_stateful(self.stage, self.state)
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
