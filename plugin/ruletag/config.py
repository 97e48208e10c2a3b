"""Pipeline configuration: typed, frozen dataclasses plus YAML loading and validation.

A config file is a YAML mapping with the sections ``listen`` (forward input), ``forward``
(downstream output), ``log``, and the reserved sections ``rules``, ``enrich``, ``buffer``,
``metrics``, ``outputs`` and ``tests`` (parsed as raw data for now; later issues give them
their own types). Unknown keys are errors, and every error names its key path, e.g.
``forward.servers[0].port: must be an int 1..65535``.

Durations accept a number of seconds or a string with a unit (``500ms``, ``30s``, ``5m``,
``1h``); sizes accept a number of bytes or a string with a unit (``64KiB``, ``16MiB``, ``1GB``).
Relative TLS file paths are resolved against the config file's folder.

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
listen.max_connections             1024         further connections are closed at accept
listen.idle_timeout                300 s        close a silent connection (0 = never)
listen.max_in_flight_bytes         32 MiB       per connection: pause reading above this
listen.max_total_in_flight_bytes   256 MiB      all connections: pause reading above this
listen.shutdown_timeout            10 s         graceful shutdown: wait for in-flight chunks
forward.self_hostname              ruletag-out  hostname in our PING
forward.require_ack                true         wait for ``{"ack": id}`` from downstream
forward.ack_timeout                30 s         no ack within this: reconnect and resend
forward.retry_backoff_base / _max  1 s / 60 s   exponential reconnect/resend backoff
forward.retry_limit                null         null = retry forever (never drop a record)
forward.connect_timeout            10 s
forward.max_in_flight_bytes        64 MiB       bytes sent but not yet acked downstream
forward.entry_format               v1           v1 = ``[time, record]``; v2 keeps metadata
=================================  ===========  ============================================
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

from ruletag.errors import ConfigError

KIB: Final = 1024
MIB: Final = 1024 * 1024

DEFAULT_PORT: Final = 24224
DEFAULT_MAX_FRAME_SIZE: Final = 16 * MIB
DEFAULT_MAX_INFLATE_SIZE: Final = 64 * MIB
DEFAULT_MAX_CONNECTIONS: Final = 1024
DEFAULT_IDLE_TIMEOUT: Final = 300.0


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
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT  # seconds; 0 = none
    max_in_flight_bytes: int = 32 * MIB  # per connection
    max_total_in_flight_bytes: int = 256 * MIB  # all connections together
    shutdown_timeout: float = 10.0

    @property
    def address(self) -> str:
        """``HOST:PORT`` or ``unix:PATH``, for log lines."""
        return f"unix:{self.path}" if self.path else _join_hostport(self.host, self.port)


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
        return _join_hostport(self.host, self.port)


@dataclass(frozen=True, slots=True)
class ForwardConfig:
    """The forward-protocol output (used by ``ruletag.forwarder.Forwarder``)."""

    servers: tuple[ForwardServer, ...]
    self_hostname: str = "ruletag-out"
    require_ack: bool = True
    ack_timeout: float = 30.0
    retry_backoff_base: float = 1.0
    retry_backoff_max: float = 60.0
    retry_limit: int | None = None  # None = never give up
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


@dataclass(frozen=True, slots=True)
class ReservedSection:
    """A section later issues will type; for now its raw YAML value is kept as is."""

    raw: Any = None


@dataclass(frozen=True, slots=True)
class RulesConfig(ReservedSection):
    """``rules``: detection rules (coming later)."""


@dataclass(frozen=True, slots=True)
class EnrichConfig(ReservedSection):
    """``enrich``: record annotations (coming later)."""


@dataclass(frozen=True, slots=True)
class BufferConfig(ReservedSection):
    """``buffer``: durable disk buffer (coming later)."""


@dataclass(frozen=True, slots=True)
class MetricsConfig(ReservedSection):
    """``metrics``: Prometheus endpoint (coming later)."""


@dataclass(frozen=True, slots=True)
class OutputsConfig(ReservedSection):
    """``outputs``: extra outputs (coming later)."""


@dataclass(frozen=True, slots=True)
class TestsConfig(ReservedSection):
    """``tests``: pipeline unit tests run by ``ruletag test`` (coming later)."""


@dataclass(frozen=True, slots=True)
class Config:
    """A whole pipeline config."""

    listen: ListenConfig
    forward: ForwardConfig
    log: LogConfig = field(default_factory=LogConfig)
    rules: RulesConfig | None = None
    enrich: EnrichConfig | None = None
    buffer: BufferConfig | None = None
    metrics: MetricsConfig | None = None
    outputs: OutputsConfig | None = None
    tests: TestsConfig | None = None
    source: str | None = None  # the file it was loaded from

    def reserved_sections(self) -> list[str]:
        """Names of the reserved sections that are set (features not implemented yet)."""
        names = ("rules", "enrich", "buffer", "metrics", "outputs", "tests")
        return [n for n in names if getattr(self, n) is not None]


# ---------------------------------------------------------------------------------------------
# scalar parsing

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1, "k": 1000, "kb": 1000, "kib": KIB, "ki": KIB,
    "m": 1000**2, "mb": 1000**2, "mib": MIB, "mi": MIB,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "gi": 1024**3,
}  # fmt: skip


def parse_duration(value: object, path: str) -> float:
    """Seconds from a number or a string such as ``"500ms"``, ``"30s"``, ``"5m"``."""
    if isinstance(value, bool):
        raise ConfigError(f"{path}: must be a duration (seconds or e.g. '30s')")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[(m.group(2) or "s").lower()]
    else:
        raise ConfigError(f"{path}: must be a duration (seconds or e.g. '30s')")
    if seconds < 0:
        raise ConfigError(f"{path}: must not be negative")
    return seconds


def parse_size(value: object, path: str) -> int:
    """Bytes from a number or a string such as ``"64KiB"``, ``"16MiB"``, ``"1GB"``."""
    if isinstance(value, bool):
        raise ConfigError(f"{path}: must be a size (bytes or e.g. '16MiB')")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE_RE.match(value)):
        size = int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "b").lower()])
    else:
        raise ConfigError(f"{path}: must be a size (bytes or e.g. '16MiB')")
    if size <= 0:
        raise ConfigError(f"{path}: must be positive")
    return size


def _join_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_hostport(
    text: str, path: str, default_port: int = DEFAULT_PORT, *, allow_zero: bool = False
) -> tuple[str, int]:
    """``HOST:PORT``, ``HOST`` or ``[V6]:PORT`` into ``(host, port)`` (port 0 if allowed)."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(f"{path}: bad address {text!r} (want HOST:PORT)")
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    if not host:
        raise ConfigError(f"{path}: bad address {text!r} (want HOST:PORT)")
    if not port_text:
        return host, default_port
    lo = 0 if allow_zero else 1
    if not port_text.isdigit() or not lo <= int(port_text) <= 65535:
        raise ConfigError(f"{path}: bad port in {text!r} (want {lo}..65535)")
    return host, int(port_text)


# ---------------------------------------------------------------------------------------------
# section reader


class _Section:
    """Typed reads from one mapping; ``done()`` rejects keys nobody read."""

    def __init__(self, data: object, path: str) -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: must be a mapping")
        for key in data:
            if not isinstance(key, str):
                raise ConfigError(f"{path}: keys must be strings, got {key!r}")
        self.data: dict[str, Any] = dict(data)
        self.path = path
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def has(self, name: str) -> bool:
        return self.data.get(name) is not None

    def raw(self, name: str, default: Any = None) -> Any:
        self.seen.add(name)
        value = self.data.get(name)
        return default if value is None else value

    def str_(self, name: str, default: str | None = None, *, empty: bool = True) -> Any:
        value = self.raw(name, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ConfigError(f"{self.key(name)}: must be a string")
        value = str(value)
        if not empty and not value:
            raise ConfigError(f"{self.key(name)}: must not be empty")
        return value

    def bool_(self, name: str, default: bool) -> bool:
        value = self.raw(name, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.key(name)}: must be true or false")
        return value

    def int_(self, name: str, default: int | None, lo: int, hi: int | None = None) -> Any:
        value = self.raw(name, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < lo or (
            hi is not None and value > hi
        ):
            bound = f"{lo}..{hi}" if hi is not None else f">= {lo}"
            raise ConfigError(f"{self.key(name)}: must be an int {bound}")
        return value

    def duration(self, name: str, default: float) -> float:
        return parse_duration(self.raw(name, default), self.key(name))

    def size(self, name: str, default: int) -> int:
        return parse_size(self.raw(name, default), self.key(name))

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.raw(name, default)
        if not isinstance(value, str) or value.lower() not in choices:
            raise ConfigError(f"{self.key(name)}: must be one of {', '.join(choices)}")
        return value.lower()

    def file(self, name: str, base: Path | None, *, required: bool = False) -> str | None:
        value = self.str_(name)
        if value is None:
            if required:
                raise ConfigError(f"{self.key(name)}: is required")
            return None
        p = Path(os.path.expanduser(value))
        if not p.is_absolute() and base is not None:
            p = base / p
        return str(p)

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            raise ConfigError(f"{self.key(unknown[0])}: unknown key")


# ---------------------------------------------------------------------------------------------
# sections


def _listen_tls(data: object, path: str, base: Path | None) -> ListenTLS | None:
    if data is None or data is False:
        return None
    s = _Section(data, path)
    if not s.bool_("enabled", True):
        s.seen.update(s.data)
        return None
    tls = ListenTLS(
        cert_file=s.file("cert_file", base, required=True) or "",
        key_file=s.file("key_file", base, required=True) or "",
        ca_file=s.file("ca_file", base),
        client_cert_required=s.bool_("client_cert_required", False),
    )
    s.done()
    if tls.client_cert_required and not tls.ca_file:
        raise ConfigError(f"{path}.ca_file: is required when client_cert_required is true")
    return tls


def _users(data: object, path: str) -> tuple[User, ...]:
    if data is None:
        return ()
    if not isinstance(data, list):
        raise ConfigError(f"{path}: must be a list of {{username, password}}")
    users = []
    for i, item in enumerate(data):
        s = _Section(item, f"{path}[{i}]")
        users.append(
            User(s.str_("username", empty=False) or "", s.str_("password", "") or "")
        )
        if not users[-1].username:
            raise ConfigError(f"{path}[{i}].username: is required")
        s.done()
    return tuple(users)


def _listen(data: object, base: Path | None) -> ListenConfig:
    s = _Section(data, "listen")
    path = s.str_("path", empty=False)
    if path is not None and (s.has("host") or s.has("port")):
        raise ConfigError("listen.path: set either path (unix socket) or host/port, not both")
    if path is not None and not Path(path).is_absolute() and base is not None:
        path = str(base / path)
    users = _users(s.raw("users"), "listen.users")
    cfg = ListenConfig(
        host=s.str_("host", "127.0.0.1", empty=False),
        port=s.int_("port", DEFAULT_PORT, 0, 65535),
        path=path,
        tls=_listen_tls(s.raw("tls"), "listen.tls", base),
        shared_key=s.str_("shared_key"),
        users=users,
        self_hostname=s.str_("self_hostname", "ruletag-in", empty=False),
        tag_prefix=s.str_("tag_prefix", ""),
        max_frame_size=s.size("max_frame_size", DEFAULT_MAX_FRAME_SIZE),
        max_inflate_size=s.size("max_inflate_size", DEFAULT_MAX_INFLATE_SIZE),
        max_connections=s.int_("max_connections", DEFAULT_MAX_CONNECTIONS, 1),
        idle_timeout=s.duration("idle_timeout", DEFAULT_IDLE_TIMEOUT),
        max_in_flight_bytes=s.size("max_in_flight_bytes", 32 * MIB),
        max_total_in_flight_bytes=s.size("max_total_in_flight_bytes", 256 * MIB),
        shutdown_timeout=s.duration("shutdown_timeout", 10.0),
    )
    s.done()
    if users and cfg.shared_key is None:
        raise ConfigError("listen.users: needs listen.shared_key (users ride on the handshake)")
    return cfg


def _forward_tls(data: object, path: str, base: Path | None, default: ForwardTLS) -> ForwardTLS:
    if data is None:
        return default
    if isinstance(data, bool):
        return ForwardTLS(enabled=data)
    s = _Section(data, path)
    tls = ForwardTLS(
        enabled=s.bool_("enabled", True),
        ca_file=s.file("ca_file", base),
        cert_file=s.file("cert_file", base),
        key_file=s.file("key_file", base),
        verify=s.bool_("verify", True),
        server_hostname=s.str_("server_hostname", empty=False),
    )
    s.done()
    if (tls.cert_file is None) != (tls.key_file is None):
        raise ConfigError(f"{path}: cert_file and key_file go together")
    return tls


def _forward_server(
    data: object, path: str, base: Path | None, defaults: ForwardServer
) -> ForwardServer:
    if isinstance(data, str):
        host, port = parse_hostport(data, path)
        return ForwardServer(
            host=host, port=port, shared_key=defaults.shared_key, username=defaults.username,
            password=defaults.password, tls=defaults.tls,
        )
    s = _Section(data, path)
    server = ForwardServer(
        host=s.str_("host", empty=False) or "",
        port=s.int_("port", DEFAULT_PORT, 1, 65535),
        name=s.str_("name", ""),
        standby=s.bool_("standby", False),
        shared_key=s.str_("shared_key", defaults.shared_key),
        username=s.str_("username", defaults.username),
        password=s.str_("password", defaults.password),
        tls=_forward_tls(s.raw("tls"), f"{path}.tls", base, defaults.tls),
    )
    s.done()
    if not server.host:
        raise ConfigError(f"{path}.host: is required")
    return server


def _forward(data: object, base: Path | None) -> ForwardConfig:
    s = _Section(data, "forward")
    defaults = ForwardServer(
        host="",
        shared_key=s.str_("shared_key"),
        username=s.str_("username", ""),
        password=s.str_("password", ""),
        tls=_forward_tls(s.raw("tls"), "forward.tls", base, ForwardTLS()),
    )
    raw_servers = s.raw("servers")
    if not isinstance(raw_servers, list) or not raw_servers:
        raise ConfigError("forward.servers: must be a non-empty list")
    servers = tuple(
        _forward_server(item, f"forward.servers[{i}]", base, defaults)
        for i, item in enumerate(raw_servers)
    )
    if all(srv.standby for srv in servers):
        raise ConfigError("forward.servers: at least one server must not be standby")
    cfg = ForwardConfig(
        servers=servers,
        self_hostname=s.str_("self_hostname", "ruletag-out", empty=False),
        require_ack=s.bool_("require_ack", True),
        ack_timeout=s.duration("ack_timeout", 30.0),
        retry_backoff_base=s.duration("retry_backoff_base", 1.0),
        retry_backoff_max=s.duration("retry_backoff_max", 60.0),
        retry_limit=s.int_("retry_limit", None, 0),
        compress=s.bool_("compress", False),
        entry_format=s.choice("entry_format", "v1", ("v1", "v2")),
        keepalive=s.bool_("keepalive", True),
        connect_timeout=s.duration("connect_timeout", 10.0),
        max_in_flight_bytes=s.size("max_in_flight_bytes", 64 * MIB),
    )
    s.done()
    if cfg.retry_backoff_max < cfg.retry_backoff_base:
        raise ConfigError("forward.retry_backoff_max: must be >= retry_backoff_base")
    for i, srv in enumerate(servers):
        if srv.username and srv.shared_key is None:
            raise ConfigError(f"forward.servers[{i}].username: needs a shared_key")
    return cfg


def _log(data: object) -> LogConfig:
    s = _Section(data, "log")
    level = s.choice("level", "info", ("debug", "info", "warning", "error", "critical"))
    cfg = LogConfig(format=s.choice("format", "text", ("text", "json")), level=level.upper())
    s.done()
    return cfg


_RESERVED: dict[str, type[ReservedSection]] = {
    "rules": RulesConfig,
    "enrich": EnrichConfig,
    "buffer": BufferConfig,
    "metrics": MetricsConfig,
    "outputs": OutputsConfig,
    "tests": TestsConfig,
}


# ---------------------------------------------------------------------------------------------
# public entry points


def config_from_mapping(data: object, base_dir: str | Path | None = None) -> Config:
    """Validate a parsed YAML mapping into a ``Config``; raise ``ConfigError`` naming the key."""
    base = Path(base_dir) if base_dir is not None else None
    s = _Section(data, "")
    if not s.has("forward"):
        raise ConfigError("forward: is required (where records go)")
    listen = _listen(s.raw("listen"), base)
    forward = _forward(s.raw("forward"), base)
    log = _log(s.raw("log"))
    reserved = {
        name: cls(s.raw(name)) for name, cls in _RESERVED.items() if s.has(name)
    }
    s.done()
    if listen.shared_key is not None and listen.self_hostname == forward.self_hostname:
        raise ConfigError(
            "forward.self_hostname: must differ from listen.self_hostname "
            "(fluentd refuses a peer with its own hostname)"
        )
    return Config(listen=listen, forward=forward, log=log, **reserved)  # type: ignore[arg-type]


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML config file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from exc
    try:
        cfg = config_from_mapping(data, p.resolve().parent)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from exc
    return Config(
        listen=cfg.listen, forward=cfg.forward, log=cfg.log, rules=cfg.rules, enrich=cfg.enrich,
        buffer=cfg.buffer, metrics=cfg.metrics, outputs=cfg.outputs, tests=cfg.tests,
        source=str(p),
    )


def config_from_cli(
    listen: str | None, forward: str, shared_key: str | None = None
) -> Config:
    """The config for ``ruletag serve --listen HOST:PORT --forward H:P[,H:P...]``.

    ``listen`` may be ``unix:PATH``; ``--shared-key`` applies to both sides.
    """
    ldata: dict[str, Any] = {}
    if listen:
        if listen.startswith("unix:"):
            ldata["path"] = listen[5:]
        else:
            ldata["host"], ldata["port"] = parse_hostport(listen, "--listen", allow_zero=True)
    if shared_key is not None:
        ldata["shared_key"] = shared_key
    servers = [
        dict(zip(("host", "port"), parse_hostport(part, "--forward"), strict=True))
        for part in forward.split(",")
        if part.strip()
    ]
    fdata: dict[str, Any] = {"servers": servers}
    if shared_key is not None:
        fdata["shared_key"] = shared_key
    return config_from_mapping({"listen": ldata, "forward": fdata}, Path.cwd())
