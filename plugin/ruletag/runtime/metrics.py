"""Prometheus metrics of a running relay, and the small HTTP endpoint for /metrics and /health.

Every :class:`Metrics` owns a private ``CollectorRegistry`` (several relays can run in one
process). Counters that the server, forwarder and rule filter already keep as plain ints are
read at scrape time by a custom collector, so the hot path pays nothing for them; only the
per-stage latency histogram (one observation per chunk and stage) and the downstream
in-flight gauge are updated as chunks move. The exposition itself is prometheus-client's.

Exported families (all prefixed ``ruletag_``): ``records_in_total``, ``records_out_total``,
``bytes_in_total`` (wire bytes), ``bytes_out_total`` (entry bytes), ``forward_bytes_total``
(frames acked downstream), ``chunks_in_total``, ``chunks_out_total``, ``acks_sent_total``,
``detections_total{rule_id}``, ``detections_by_severity_total{severity}``,
``records_matched_total``, ``record_match_errors_total``, ``downstream_pending_chunks``,
``upstream_pending_chunks``,
``upstream_in_flight_bytes``, ``forward_in_flight_bytes``, ``forward_retries_total``,
``forward_ack_timeouts_total``, ``forward_connect_failures_total``, ``dead_letters_total``,
``downstream_up{server}``,
``protocol_errors_total``, ``auth_failures_total``, ``submit_errors_total``,
``connections_total``, ``connections_refused_total``, ``connections_idle_closed_total``,
``connections_handshake_timeouts_total``, ``connections_unauthenticated_overflows_total``,
``connections_slow_frames_total``, ``decodes_off_loop_total``,
``connections_open``, ``stage_duration_seconds{stage=decode|filter|forward}``,
``rules_loaded``, ``rule_load_problems{kind}``, ``ruleset_info{version}``,
``rule_reloads_total{result=ok|failed}``, ``prefilter_tuned_on_records``,
``prefilter_often_passed_rules``, ``prefilter_drift``, ``prefilter_retunes_total``,
``ready``; in disk mode ``buffer_bytes``, ``buffer_chunks``, ``buffer_oldest_age_seconds``,
``buffer_duplicates_dropped_total``, ``buffer_full_waits_total``,
``buffer_write_errors_total``, ``buffer_full``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ruletag.delivery.pipeline import Sender, Transform
from ruletag.protocol import Chunk

log = logging.getLogger(__name__)

PREFIX = "ruletag"
STAGES = ("decode", "filter", "forward")
#: Latency buckets (seconds): from microseconds (pass-through) to seconds (slow acks).
LATENCY_BUCKETS = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
_MAX_REQUEST_HEAD = 8192
_REQUEST_TIMEOUT = 5.0


class RuleSource(Protocol):
    """What the collector reads about the live rule set (``reload.LiveFilter`` provides it)."""

    @property
    def version(self) -> str | None: ...

    @property
    def rule_count(self) -> int: ...

    @property
    def problem_counts(self) -> Mapping[str, int]: ...

    @property
    def filter_stats(self) -> Any: ...


class Metrics:
    """The metrics of one relay: bind the live objects, then scrape with :meth:`render`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.stage_seconds = Histogram(
            f"{PREFIX}_stage_duration_seconds",
            "Time spent per chunk in each stage (decode, filter, forward incl. the ack wait).",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._stage = {s: self.stage_seconds.labels(stage=s) for s in STAGES}
        registry = self.registry

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(f"{PREFIX}_{name}", doc, labels, registry=registry)

        self.reloads = counter(
            "rule_reloads",
            "Rule-set reloads by result (a failed reload keeps the previous rule set).",
            ("result",),
        )
        self._reload_ok = self.reloads.labels(result="ok")
        self._reload_failed = self.reloads.labels(result="failed")
        self.downstream_pending = Gauge(
            f"{PREFIX}_downstream_pending_chunks",
            "Chunks sent (or queued) to the downstream and not yet acknowledged.",
            registry=registry,
        )
        self.records_out = counter("records_out", "Records delivered (acked by every output).")
        self.bytes_out = counter(
            "bytes_out", "Bytes of msgpack entries delivered (before framing)."
        )
        self.chunks_out = counter("chunks_out", "Chunks delivered (acked by every output).")
        self.server: Any = None
        self.forwarder: Any = None
        self.buffer: Any = None  # durable.BufferStats in disk mode
        self.rules: RuleSource | None = None
        self.health_check: Callable[[], tuple[bool, str]] = lambda: (False, "starting")
        #: the live stateful stage (``stats()`` per engine) and the state checkpoints
        self.stateful: Callable[[], Any] | None = None
        self.state_store: Any = None
        self.registry.register(_RelayCollector(self))

    # -- binding ---------------------------------------------------------------------------

    def bind(
        self,
        *,
        server: Any = None,
        forwarder: Any = None,
        rules: RuleSource | None = None,
        health: Callable[[], tuple[bool, str]] | None = None,
        buffer: Any = None,
    ) -> None:
        """Attach the live objects whose counters are exported (any may be left out).

        ``forwarder`` may be any output: the first ``Forwarder`` inside it (a ``FanOut``'s
        ``outputs``) provides the downstream counters.
        """
        if server is not None:
            self.server = server
        if forwarder is not None:
            self.forwarder = find_forwarder(forwarder)
        if rules is not None:
            self.rules = rules
        if buffer is not None:
            self.buffer = buffer
        if health is not None:
            self.health_check = health

    def bind_stateful(self, stage: Callable[[], Any], store: Any = None) -> None:
        """Export ``stage()``'s engine stats as ``ruletag_stateful{engine,stat}`` gauges and
        the checkpoint counters of ``store`` (a ``runtime.state.StateStore``)."""
        self.stateful = stage
        self.state_store = store

    # -- hot-path helpers ------------------------------------------------------------------

    def observe(self, stage: str, seconds: float) -> None:
        """Record one chunk's time in ``stage`` (one of :data:`STAGES`)."""
        self._stage[stage].observe(seconds)

    def reload_done(self, ok: bool) -> None:
        """Count one reload attempt."""
        (self._reload_ok if ok else self._reload_failed).inc()

    def timed_transform(self, transform: Transform) -> Transform:
        """``transform`` with its time per chunk recorded as the ``filter`` stage."""
        hist = self._stage["filter"]
        clock = time.perf_counter

        def timed(chunk: Chunk) -> list[Chunk]:
            start = clock()
            try:
                return transform(chunk)
            finally:
                hist.observe(clock() - start)

        return timed

    def instrument_sender(self, sender: Sender) -> Sender:
        """``sender`` with the ``forward`` stage timed and pending downstream chunks counted."""
        return _InstrumentedSender(sender, self)

    # -- output ----------------------------------------------------------------------------

    def health(self) -> tuple[bool, str]:
        """``(ok, reason)`` from the bound health check (never raises)."""
        try:
            ok, reason = self.health_check()
        except Exception as exc:  # a broken check reports unhealthy, never crashes a scrape
            return False, f"health check failed: {exc}"
        if getattr(self.buffer, "full", False):  # backpressure by design: still healthy
            reason += "; buffer full: disk buffer holding acks until delivery frees space"
        return ok, reason

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition body and its content type (OpenMetrics if ``accept`` asks for it)."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


def find_forwarder(output: Any) -> Any:
    """The first object with the forwarder's counters in ``output`` (or a FanOut), else None."""
    if hasattr(output, "records_sent") and hasattr(output, "retries"):
        return output
    for inner in getattr(output, "outputs", ()):
        found = find_forwarder(inner)
        if found is not None:
            return found
    return None


class _InstrumentedSender:
    """Wraps the outputs: time each ``send``, count what was delivered, pending chunks."""

    def __init__(self, inner: Sender, metrics: Metrics) -> None:
        self.inner = inner
        self._hist = metrics._stage["forward"]
        self._pending = metrics.downstream_pending
        self._records = metrics.records_out
        self._bytes = metrics.bytes_out
        self._chunks = metrics.chunks_out

    async def send(self, chunk: Chunk) -> None:
        start = time.perf_counter()
        self._pending.inc()
        try:
            await self.inner.send(chunk)
        finally:
            self._pending.dec()
            self._hist.observe(time.perf_counter() - start)
        self._chunks.inc()
        self._records.inc(chunk.count)
        self._bytes.inc(len(chunk.entries))


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)


class _RelayCollector(Collector):
    """Reads the plain counters of the bound server, forwarder and rule set at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def describe(self) -> list[Metric]:
        return []  # families depend on what is bound; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        m = self.m
        ok, _ = m.health()
        yield _gauge("ready", "1 when the rule table is loaded and the listener is up.", ok)
        yield from self._server(m.server)
        yield from self._forwarder(m.forwarder)
        yield from self._rules(m.rules)
        yield from self._buffer(m.buffer)
        yield from self._stateful(m.stateful, m.state_store)

    @staticmethod
    def _stateful(stage_of: Callable[[], Any] | None, store: Any) -> Iterator[Metric]:
        stage = stage_of() if stage_of is not None else None
        if stage is not None:
            fam = GaugeMetricFamily(
                f"{PREFIX}_stateful",
                "Stateful rules' engines: live keys/groups, partials, events held, and their "
                "counters (completed, fired, evicted, expired, late records...), per engine.",
                labels=["engine", "stat"],
            )
            for engine, stats in sorted(stage.stats().items()):
                for stat, value in sorted(stats.items()):
                    fam.add_metric([engine, stat], float(value))
            yield fam
            yield _counter(
                "stateful_records_fed", "Records fed to the stateful engines.", stage.records_fed
            )
        if store is not None:
            yield _counter(
                "state_snapshots", "Checkpoints of the stateful rules' state written.",
                store.snapshots,
            )  # fmt: skip
            yield _counter(
                "state_snapshot_failures", "Checkpoints that could not be written.",
                store.failures,
            )  # fmt: skip
            yield _gauge("state_snapshot_bytes", "Size of the last checkpoint.", store.last_bytes)

    @staticmethod
    def _buffer(st: Any) -> Iterator[Metric]:
        if st is not None:
            yield from _read(st, _BUFFER_METRICS)

    @staticmethod
    def _server(server: Any) -> Iterator[Metric]:
        if server is None:
            return
        yield from _read(server.stats, _SERVER_METRICS)
        yield _gauge("connections_open", "Open upstream connections.", len(server.connections))
        yield from _read(server, _SERVER_STATE_METRICS)

    @staticmethod
    def _forwarder(fwd: Any) -> Iterator[Metric]:
        if fwd is None:
            return
        yield from _read(fwd, _FORWARDER_METRICS)
        now = time.monotonic()
        yield _labelled(
            GaugeMetricFamily,
            "downstream_up",
            "1 while a downstream server is not backing off after a failure.",
            "server",
            # the forwarder's per-server health
            (
                (str(srv.name), 1.0 if srv.healthy(now) else 0.0)
                for srv in getattr(fwd, "_servers", ())
            ),
        )

    @staticmethod
    def _rules(rules: RuleSource | None) -> Iterator[Metric]:
        if rules is None:
            return
        yield _gauge("rules_loaded", "Rules in the live rule table.", rules.rule_count)
        info = InfoMetricFamily(f"{PREFIX}_ruleset", "The live rule set (content hash).")
        info.add_metric([], {"version": rules.version or ""})
        yield info
        yield _labelled(
            GaugeMetricFamily,
            "rule_load_problems",
            "Rule files of the live set that could not be used, by kind.",
            "kind",
            sorted(rules.problem_counts.items()),
        )
        pre: Mapping[str, Any] | None = getattr(rules, "prefilter_stats", None)
        if pre:
            yield from _prefilter(pre)
        stats = rules.filter_stats
        if stats is None:
            return
        yield from _read(stats, _FILTER_METRICS)
        yield _labelled(
            CounterMetricFamily,
            "detections",
            "Rule matches, per rule.",
            "rule_id",
            sorted(dict(stats.detections).items()),
        )
        yield _labelled(
            CounterMetricFamily,
            "detections_by_severity",
            "Rule matches, per rule severity.",
            "severity",
            sorted(dict(stats.by_severity).items()),
        )


def _prefilter(st: Mapping[str, Any]) -> Iterator[Metric]:
    """The live matcher's raw pre-filter: how it is tuned and whether the traffic drifted."""
    for family, name, doc, key in _PREFILTER_METRICS:
        yield family(name, doc, st.get(key) or 0)


#: One plain family read at scrape time: (family, name, help, attribute of the object read).
_Spec = tuple[Callable[[str, str, float], Metric], str, str, str]


def _read(obj: Any, specs: tuple[_Spec, ...]) -> Iterator[Metric]:
    """The families of ``specs`` with their values read from ``obj`` (a missing one is 0)."""
    for family, name, doc, attr in specs:
        yield family(name, doc, float(getattr(obj, attr, 0)))


def _labelled(
    family: type[CounterMetricFamily] | type[GaugeMetricFamily],
    name: str,
    doc: str,
    label: str,
    values: Iterable[tuple[str, float]],
) -> Metric:
    """A family with one ``label``, one sample per ``(label value, value)``."""
    metric = family(f"{PREFIX}_{name}", doc, labels=[label])
    for key, value in values:
        metric.add_metric([key], value)
    return metric


_SERVER_METRICS: tuple[_Spec, ...] = (
    (_counter, "records_in", "Records received from upstream.", "records"),
    (_counter, "bytes_in", "Bytes received from upstream (as on the wire).", "bytes_in"),
    (_counter, "chunks_in", "Chunks received from upstream.", "chunks"),
    (_counter, "acks_sent", "Acks sent upstream.", "acks_sent"),
    (_counter, "protocol_errors", "Connections closed on a protocol error.", "protocol_errors"),
    (_counter, "auth_failures", "Failed upstream handshakes.", "auth_failures"),
    (_counter, "connections", "Upstream connections accepted.", "connections_accepted"),
    (
        _counter,
        "connections_refused",
        "Upstream connections refused (limit/shutdown).",
        "connections_refused",
    ),
    (_counter, "connections_idle_closed", "Upstream connections closed when idle.", "idle_closed"),
    (
        _counter,
        "submit_errors",
        "Chunks not delivered (connection closed unacked).",
        "submit_errors",
    ),
    (
        _counter,
        "connections_handshake_timeouts",
        "Upstream connections closed: no handshake in time.",
        "handshake_timeouts",
    ),
    (
        _counter,
        "connections_unauthenticated_overflows",
        "Upstream connections closed: too many bytes before the handshake.",
        "unauthenticated_overflows",
    ),
    (
        _counter,
        "connections_slow_frames",
        "Upstream connections closed: a message arrived below the minimum rate.",
        "slow_frames",
    ),
    (
        _counter,
        "decodes_off_loop",
        "Large messages decoded on a worker thread.",
        "decodes_off_loop",
    ),
)
_SERVER_STATE_METRICS: tuple[_Spec, ...] = (
    (
        _gauge,
        "upstream_pending_chunks",
        "Upstream chunks received and not yet acked.",
        "pending_chunks",
    ),
    (_gauge, "upstream_in_flight_bytes", "Bytes of upstream chunks not yet acked.", "in_flight"),
)
_FORWARDER_METRICS: tuple[_Spec, ...] = (
    (_counter, "forward_bytes", "Bytes of frames acked by the downstream servers.", "bytes_sent"),
    (_counter, "forward_retries", "Chunk resends to the downstream.", "retries"),
    (
        _counter,
        "forward_ack_timeouts",
        "Downstream acks that did not come in time.",
        "ack_timeouts",
    ),
    (_counter, "forward_connect_failures", "Failed downstream connects.", "connect_failures"),
    (
        _counter,
        "dead_letters",
        "Chunks the downstream kept rejecting, set aside in the dead-letter folder.",
        "dead_letters",
    ),
    (
        _gauge,
        "forward_in_flight_bytes",
        "Bytes sent downstream and not yet acked.",
        "in_flight_bytes",
    ),
)
_FILTER_METRICS: tuple[_Spec, ...] = (
    (_counter, "records_matched", "Records that matched at least one rule.", "records_matched"),
    (
        _counter,
        "record_match_errors",
        "Records forwarded unannotated because matching them failed.",
        "record_errors",
    ),
)

#: The pre-filter's figures, read from ``Matcher.stats`` (missing: 0).
_PREFILTER_METRICS: tuple[_Spec, ...] = (
    (
        _gauge,
        "prefilter_tuned_on_records",
        "Records the raw pre-filter was tuned on (0: not tuned yet).",
        "raw_tuned_on_records",
    ),
    (
        _gauge,
        "prefilter_often_passed_rules",
        "Rules the tuned pre-filter often passes, evaluated by their own small table.",
        "hot_rules",
    ),
    (
        _gauge,
        "prefilter_drift",
        "Trigger fires per record beyond what the tuning sample led to expect (last check).",
        "raw_drift",
    ),
    (
        _counter,
        "prefilter_retunes",
        "Pre-filter re-tunings because the traffic differed from its tuning sample.",
        "raw_retunes",
    ),
)
_BUFFER_METRICS: tuple[_Spec, ...] = (
    (_gauge, "buffer_bytes", "Bytes of disk-buffer segment files.", "bytes"),
    (_gauge, "buffer_chunks", "Chunks in the disk buffer not yet acked downstream.", "chunks"),
    (
        _gauge,
        "buffer_oldest_age_seconds",
        "Age of the oldest unacked buffered chunk.",
        "oldest_age",
    ),
    (
        _counter,
        "buffer_duplicates_dropped",
        "Resends of a chunk id still buffered.",
        "duplicates_dropped",
    ),
    (
        _counter,
        "buffer_full_waits",
        "Times an upstream chunk waited for buffer space.",
        "full_waits",
    ),
    (
        _counter,
        "buffer_write_errors",
        "Failed buffer writes (e.g. ENOSPC), retried.",
        "write_errors",
    ),
    (_gauge, "buffer_full", "1 while chunks wait for disk-buffer space (acks held).", "full"),
)


# ---------------------------------------------------------------------------------------------
# HTTP endpoint


class MetricsServer:
    """``GET /metrics`` (Prometheus/OpenMetrics) and ``GET /health`` (200 or 503) on asyncio."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        self.metrics = metrics
        self.host = host
        self.port = port
        self._server: asyncio.AbstractServer | None = None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def start(self) -> None:
        """Bind (port 0 picks a free port; :attr:`port` is then the real one)."""
        self._server = await asyncio.start_server(
            self._handle, self.host, self.port, reuse_address=True
        )
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _REQUEST_TIMEOUT)
            status, ctype, body, method = self._respond(head)
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            TimeoutError,
            ConnectionError,
        ):
            writer.close()
            return
        headers = (
            f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        try:
            writer.write(headers.encode("latin-1") + (b"" if method == "HEAD" else body))
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    def _respond(self, head: bytes) -> tuple[str, str, bytes, str]:
        if len(head) > _MAX_REQUEST_HEAD:
            return "431 Request Header Fields Too Large", "text/plain", b"too large\n", "GET"
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split()
        if len(parts) < 2:
            return "400 Bad Request", "text/plain", b"bad request\n", "GET"
        method, target = parts[0].upper(), parts[1]
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"GET or HEAD only\n", "GET"
        path = target.split("?", 1)[0]
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        if path == "/metrics":
            body, ctype = self.metrics.render(headers.get("accept", ""))
            return "200 OK", ctype, body, method
        if path in ("/health", "/healthz", "/ready"):
            ok, reason = self.metrics.health()
            status = "200 OK" if ok else "503 Service Unavailable"
            return status, "text/plain; charset=utf-8", f"{reason}\n".encode(), method
        return "404 Not Found", "text/plain", b"try /metrics or /health\n", method


async def start_metrics_server(metrics: Metrics, host: str, port: int) -> MetricsServer:
    """Start a :class:`MetricsServer` and return it (its ``port`` is the bound one)."""
    srv = MetricsServer(metrics, host, port)
    await srv.start()
    return srv


def health_of(*checks: tuple[Callable[[], bool], str]) -> Callable[[], tuple[bool, str]]:
    """A health check from ``(predicate, reason-if-false)`` pairs; all true -> ``(True, ok)``."""

    def check() -> tuple[bool, str]:
        for predicate, reason in checks:
            if not predicate():
                return False, reason
        return True, "ok"

    return check


__all__ = [
    "STAGES",
    "Metrics",
    "MetricsServer",
    "health_of",
    "start_metrics_server",
]
