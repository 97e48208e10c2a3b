"""The pipeline config model: typed, frozen dataclasses, and every default in one place.

A ``Config`` is built by ``ruletag.config.load`` (YAML file, mapping or CLI flags); every
other layer reads only these dataclasses. The constants and field defaults below are the only
place a default is written.

Defaults (sized against fluentd's 8 MB buffer chunks):

=================================  ===========  ============================================
key                                default      meaning
=================================  ===========  ============================================
listen.host / listen.port          127.0.0.1 /  TCP listener (``listen.path``: unix socket
                                   24224        instead)
listen.self_hostname               ruletag-in   hostname in our PONG (must differ from the
                                                client's own and from forward.self_hostname)
listen.max_frame_size              16 MiB       largest msgpack message accepted
listen.max_inflate_size            64 MiB       largest decompressed gzip payload
listen.max_inflate_members         1024         most gzip members in one compressed payload
listen.max_connections             1024         further connections are closed at accept
listen.idle_timeout                300 s        close a silent connection (0 = never)
listen.handshake_timeout           10 s         with a shared_key: close a connection that
                                                has not passed the handshake by then (0 = never)
listen.max_unauthenticated_bytes   64 KiB       with a shared_key: most bytes buffered before
                                                the handshake passed (a PING is < 1 KiB)
listen.frame_timeout /             20 s /       a started message must arrive within
listen.min_frame_rate              1 KiB        frame_timeout + its bytes / min_frame_rate
                                                (bytes/s) seconds (frame_timeout 0 = never)
listen.max_in_flight_bytes         32 MiB       per connection: pause reading above this
listen.max_total_in_flight_bytes   256 MiB      all connections: pause reading above this
listen.shutdown_timeout            10 s         graceful shutdown: wait for in-flight chunks
forward.self_hostname              ruletag-out  hostname in our PING
forward.require_ack                true         wait for ``{"ack": id}`` from downstream
forward.ack_timeout                30 s         no ack within this: reconnect and resend
forward.retry_backoff_base / _max  1 s / 60 s   exponential reconnect/resend backoff
forward.retry_limit                null         null = retry forever (never drop a record)
forward.max_rejects                5            a chunk the downstream rejected this often
                                                (closed on it / left unacked while acking
                                                others) goes to the dead-letter folder;
                                                0 = never (retry with growing delay)
forward.dead_letter_path           see          dead-letter folder (``transport.deadletter``):
                                   note         <buffer.path>/rejected in disk mode, else
                                                $XDG_STATE_HOME/ruletag/rejected
forward.connect_timeout            10 s
forward.max_in_flight_bytes        64 MiB       bytes sent but not yet acked downstream
forward.entry_format               v1           v1 = ``[time, record]``; v2 keeps metadata
rules.reload_interval              5 s          poll rule files for changes (0 = SIGHUP only)
rules.exclude                      []           rule ids or names (globs) left out of the table
rules.building_blocks              keep         drop = leave Elastic building-block rules out
rules.lateness                     2 s          stateful rules: allowed lateness of event time
                                                (EQL missing events wait for it)
rules.select.sources               sigma,       rule front-ends kept
                                   elastic
rules.select.min_level             informa-     lowest Sigma ``level`` / Elastic ``severity``
                                   tional       kept (all)
rules.select.status                stable,      statuses kept: deprecated and unsupported
                                   test,        rules are left out, as Hayabusa does; Elastic
                                   experimental ``maturity`` production = stable,
                                                development = experimental
rules.select.tags                  all          include/exclude globs on tags and ATT&CK ids
rules.select.logsource             all          include/exclude of Sigma product/category/service
rules.select.rule_types            all          Elastic rule types kept (query, eql, esql, ...)
enrich.key / enrich.style          detections   where (style ruletag) the detections go /
                                   / ruletag    ``ecs`` writes rule.*, threat.*, event.*
enrich.alert_tag                   "" (off)     stateful rules: one extra alert record per
                                                detection, on this tag, after its record
enrich.stateful                    on           off: stateful rules are loaded, not evaluated
                                                (the stateless tier before a stateful one)
state.path                         <buffer.path>/state with a disk buffer, else none:
                                                checkpoints of stateful rules' state
state.snapshot_interval            10s          time between two checkpoints
metrics.listen                     127.0.0.1:   Prometheus /metrics and /health
                                   9464
metrics.rule_cost_sample           0            time every rule, off the hot path, on the first
                                                record of 1 chunk in N (0 = off; see
                                                ``ruletag.runtime.rulecost``)
buffer.type                        memory       memory: ack after downstream ack; disk: ack
                                                once fsync'ed to the disk buffer at ``path``
buffer.max_size / segment_size     1 GiB /      disk buffer size limit (full: acks are held,
                                   64 MiB       senders paused) / segment file size
buffer.fsync                       always       never: survives a crash, not a power loss
workers                            1            serve processes sharing the listen port
                                                (SO_REUSEPORT, see ``ruletag.runtime.workers``);
                                                ``auto`` = usable CPUs, at most 16 (1 on a
                                                unix-socket listener)
=================================  ===========  ============================================
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Final

KIB: Final = 1024
MIB: Final = 1024 * 1024
MAX_WORKERS: Final = 64
#: ``workers: auto`` runs one worker per usable CPU, at most this many (each holds its own
#: rule table).
AUTO_WORKERS_CAP: Final = 16

DEFAULT_PORT: Final = 24224
DEFAULT_MAX_FRAME_SIZE: Final = 16 * MIB
DEFAULT_MAX_INFLATE_SIZE: Final = 64 * MIB
DEFAULT_MAX_INFLATE_MEMBERS: Final = 1024
DEFAULT_MAX_CONNECTIONS: Final = 1024
DEFAULT_IDLE_TIMEOUT: Final = 300.0
DEFAULT_RULE_COST_SAMPLE: Final = 0


# ---------------------------------------------------------------------------------------------
# dataclasses


@dataclass(frozen=True, slots=True)
class User:
    """One username/password pair for the handshake's user authentication."""

    username: str
    password: str


@dataclass(frozen=True, slots=True)
class ListenTLS:
    """Server-side TLS: our certificate, and optionally client-certificate verification."""

    cert_file: str
    key_file: str
    ca_file: str | None = None
    client_cert_required: bool = False


@dataclass(frozen=True, slots=True)
class ListenConfig:
    """The forward-protocol input: where we listen and what we accept."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    path: str | None = None  # unix socket path; when set, host/port are not used
    tls: ListenTLS | None = None
    shared_key: str | None = None
    users: tuple[User, ...] = ()
    self_hostname: str = "ruletag-in"
    tag_prefix: str = ""
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    max_inflate_size: int = DEFAULT_MAX_INFLATE_SIZE
    max_inflate_members: int = DEFAULT_MAX_INFLATE_MEMBERS
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT  # seconds; 0 = none
    handshake_timeout: float = 10.0  # seconds to pass the handshake; 0 = none
    max_unauthenticated_bytes: int = 64 * KIB  # buffered before the handshake passed
    frame_timeout: float = 20.0  # initial allowance for one message; 0 = none
    min_frame_rate: int = KIB  # bytes/s that extend the allowance of a started message
    max_in_flight_bytes: int = 32 * MIB  # per connection
    max_total_in_flight_bytes: int = 256 * MIB  # all connections together
    shutdown_timeout: float = 10.0
    reuse_port: bool = False  # SO_REUSEPORT; set for each of ``workers`` (not a YAML key)

    @property
    def address(self) -> str:
        """``HOST:PORT`` or ``unix:PATH``, for log lines."""
        return f"unix:{self.path}" if self.path else join_hostport(self.host, self.port)


@dataclass(frozen=True, slots=True)
class ForwardTLS:
    """Client-side TLS towards one downstream server."""

    enabled: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify: bool = True
    server_hostname: str | None = None  # SNI / name to verify; default: the server's host


@dataclass(frozen=True, slots=True)
class ForwardServer:
    """One downstream forward-protocol receiver.

    ``shared_key``, ``username``, ``password`` and ``tls`` are already resolved: values set
    on the ``forward`` section apply to every server that does not set its own.
    """

    host: str
    port: int = DEFAULT_PORT
    name: str = ""
    standby: bool = False
    shared_key: str | None = None
    username: str = ""
    password: str = ""
    tls: ForwardTLS = field(default_factory=ForwardTLS)

    @property
    def address(self) -> str:
        """``HOST:PORT`` for log lines."""
        return join_hostport(self.host, self.port)


@dataclass(frozen=True, slots=True)
class ForwardConfig:
    """The forward-protocol output (used by ``ruletag.transport.forwarder.Forwarder``)."""

    servers: tuple[ForwardServer, ...]
    self_hostname: str = "ruletag-out"
    require_ack: bool = True
    ack_timeout: float = 30.0
    retry_backoff_base: float = 1.0
    retry_backoff_max: float = 60.0
    retry_limit: int | None = None  # None = never give up
    max_rejects: int = 5  # rejections of one chunk before it is dead-lettered; 0 = never
    dead_letter_path: str | None = None  # None = transport.deadletter.default_dir()
    compress: bool = False
    entry_format: str = "v1"  # "v1" | "v2"
    keepalive: bool = True
    connect_timeout: float = 10.0
    max_in_flight_bytes: int = 64 * MIB


@dataclass(frozen=True, slots=True)
class LogConfig:
    """Logging: ``text`` or ``json`` (one object per line), and the level."""

    format: str = "text"
    level: str = "INFO"


#: ``rules.paths`` value that selects the rules bundled in ``ruletag/data/rules``.
BUILTIN_RULES: Final = "builtin:seeds"
DEFAULT_RELOAD_INTERVAL: Final = 5.0
#: ``rules.lateness``: seconds records may arrive behind the latest event time seen
DEFAULT_LATENESS: Final = 2.0
DEFAULT_TUNE_AFTER: Final = 20_000  # records the pre-filter observes before re-tuning


def builtin_rules_path() -> str:
    """The folder of the bundled seed rules (package data)."""
    from importlib.resources import files

    return str(files("ruletag").joinpath("data", "rules"))


#: Sigma ``level`` / Elastic ``severity`` values, lowest first (``rules.select.min_level``).
LEVELS: Final = ("informational", "low", "medium", "high", "critical")
#: Sigma ``status`` values, least trusted first (``rules.select.status``).
STATUSES: Final = ("unsupported", "deprecated", "experimental", "test", "stable")
#: Elastic ``maturity`` values as the Sigma status they are selected by.
MATURITY_STATUS: Final = {
    "production": "stable",
    "development": "experimental",
    "deprecated": "deprecated",
}
#: The status a rule without one is selected by (unreviewed: as a new rule).
NO_STATUS: Final = "experimental"
#: Statuses kept by default: every status but ``deprecated`` and ``unsupported``, the choice of
#: Hayabusa (which loads those two only on request) and of the SigmaHQ release packages.
DEFAULT_STATUS: Final = ("stable", "test", "experimental")
RULE_SOURCES: Final = ("sigma", "elastic")
#: Elastic rule ``type`` values (``rules.select.rule_types``).
ELASTIC_RULE_TYPES: Final = (
    "query",
    "eql",
    "esql",
    "threshold",
    "new_terms",
    "threat_match",
    "machine_learning",
)
LOGSOURCE_KEYS: Final = ("product", "category", "service")


@dataclass(frozen=True, slots=True)
class SelectConfig:
    """``rules.select``: which loaded rules go into the table (``ruletag.rules.select``).

    Tags, logsource items and rule types are globs/values; empty include lists keep everything.
    Logsource items are ``key=glob[,key=glob]`` strings over product/category/service (Sigma
    rules only); tags match Sigma tags, Elastic tags and ATT&CK tactic/technique ids.
    """

    sources: tuple[str, ...] = RULE_SOURCES
    min_level: str = "informational"
    status: tuple[str, ...] = DEFAULT_STATUS
    tags: tuple[str, ...] = ()  # include: a rule needs one tag matching one of these
    exclude_tags: tuple[str, ...] = ()
    logsource: tuple[str, ...] = ()  # include: a Sigma rule needs to match one item
    exclude_logsource: tuple[str, ...] = ()
    rule_types: tuple[str, ...] = ()  # Elastic rule types kept; empty = all


@dataclass(frozen=True, slots=True)
class NewTermsConfig:
    """``rules.new_terms``: Elastic new_terms rules in the stream. ``learn``: seconds of event
    time a rule only learns before it fires (None: its own history window; 0: fires from the
    first record), unless its state was restored; ``max_terms``: combinations kept per rule,
    the least recently seen evicted first."""

    learn: float | None = None
    max_terms: int = 100_000


@dataclass(frozen=True, slots=True)
class RulesConfig:
    """``rules``: rule files/folders (absolute), Sigma ``|expand`` variables, table cache."""

    paths: tuple[str, ...]
    vars: dict[str, tuple[str, ...]] = field(default_factory=dict)
    cache_dir: str | None = None  # None = $XDG_CACHE_HOME/ruletag
    reload_interval: float = DEFAULT_RELOAD_INTERVAL  # poll rule files; 0 = SIGHUP only
    tune_after: int = DEFAULT_TUNE_AFTER  # re-pick pre-filter triggers after N records; 0 = never
    exclude: tuple[str, ...] = ()  # rule id / name globs left out of the table
    building_blocks: str = "keep"  # keep | drop: Elastic building-block rules in the table or not
    select: SelectConfig = field(default_factory=SelectConfig)  # rules.select
    new_terms: NewTermsConfig = field(default_factory=NewTermsConfig)  # rules.new_terms
    lateness: float = DEFAULT_LATENESS  # stateful rules: event-time lateness of the watermark


@dataclass(frozen=True, slots=True)
class EnrichConfig:
    """``enrich``: how matched records are annotated."""

    key: str = "detections"  # style ruletag: the list of detections goes under this key
    style: str = "ruletag"  # ruletag | ecs (rule.*, threat.*, event.severity/risk_score)
    retag_prefix: str = ""  # e.g. "alert.": matched records get tag "alert.<tag>"
    alert_tag: str = ""  # stateful rules: one extra alert record per detection on this tag
    stateful: str = "on"  # on | off: evaluate stateful rules here (off: a stateless tier)


DEFAULT_BUFFER_MAX_SIZE: Final = 1024 * MIB
DEFAULT_BUFFER_SEGMENT_SIZE: Final = 64 * MIB


@dataclass(frozen=True, slots=True)
class BufferConfig:
    """``buffer``: where a chunk is when the upstream ack is sent (docs/reliability.md)."""

    type: str = "memory"  # memory | disk
    path: str | None = None  # disk: the buffer folder (resolved against the config file)
    max_size: int = DEFAULT_BUFFER_MAX_SIZE
    segment_size: int = DEFAULT_BUFFER_SEGMENT_SIZE
    fsync: str = "always"  # always | never

    @property
    def disk(self) -> bool:
        return self.type == "disk"


DEFAULT_SNAPSHOT_INTERVAL: Final = 10.0


@dataclass(frozen=True, slots=True)
class StateConfig:
    """``state``: where the state of stateful rules is checkpointed (``ruletag.runtime.state``).
    Without this section it goes to ``<buffer.path>/state`` with a disk buffer, else nowhere
    (state is lost at restart)."""

    path: str | None = None  # the state folder (resolved against the config file)
    snapshot_interval: float = DEFAULT_SNAPSHOT_INTERVAL  # seconds between checkpoints


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """``metrics``: the Prometheus ``/metrics`` and ``/health`` HTTP endpoint, and the sampled
    per-rule cost it exports (``rule_cost_sample``: 1 chunk in N; 0 = off)."""

    host: str = "127.0.0.1"
    port: int = 9464
    rule_cost_sample: int = DEFAULT_RULE_COST_SAMPLE

    @property
    def address(self) -> str:
        return join_hostport(self.host, self.port)


@dataclass(frozen=True, slots=True)
class OutputConfig:
    """One ``outputs`` item: JSON lines to ``stdout`` or to a ``file`` (see delivery.outputs)."""

    type: str  # "stdout" | "file"
    path: str | None = None  # file: resolved against the config file's folder
    fsync: bool = False  # file: fsync before a chunk counts as written
    name: str = ""


@dataclass(frozen=True, slots=True)
class OutputsConfig:
    """``outputs``: JSON-lines outputs used beside ``forward``, or instead of it."""

    items: tuple[OutputConfig, ...] = ()


@dataclass(frozen=True, slots=True)
class TestsConfig:
    """``tests``: pipeline unit tests, kept as written; ``ruletag test`` parses them."""

    raw: Any = None


@dataclass(frozen=True, slots=True)
class Config:
    """A whole pipeline config."""

    listen: ListenConfig
    forward: ForwardConfig | None  # None: records go to ``outputs`` only
    log: LogConfig = field(default_factory=LogConfig)
    rules: RulesConfig | None = None
    enrich: EnrichConfig | None = None
    buffer: BufferConfig | None = None
    metrics: MetricsConfig | None = None
    outputs: OutputsConfig | None = None
    tests: TestsConfig | None = None
    source: str | None = None  # the file it was loaded from
    workers: int = 1  # serve processes sharing the listen port (ruletag.runtime.workers)
    state: StateConfig | None = None  # checkpoints of stateful rules (ruletag.runtime.state)
    worker_of: int = 1  # in a worker: how many workers share the port (not a YAML key)
    worker_index: int = 0  # in a worker: which one (0: the first; not a YAML key)
    workers_auto: bool = False  # ``workers: auto``: ``workers`` is the usable CPU count


def auto_workers() -> int:
    """``workers: auto``: the CPUs this process may run on, at most :data:`AUTO_WORKERS_CAP`."""
    count = getattr(os, "process_cpu_count", None)
    n = count() if count is not None else None
    if n is None and hasattr(os, "sched_getaffinity"):
        n = len(os.sched_getaffinity(0))
    return max(1, min(n or os.cpu_count() or 1, AUTO_WORKERS_CAP))


def join_hostport(host: str, port: int) -> str:
    """``HOST:PORT``, or ``[V6]:PORT`` for an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
