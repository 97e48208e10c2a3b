"""Loading a pipeline config: YAML file, parsed mapping or ``serve`` flags -> ``Config``.

A config file is a YAML mapping with the sections ``listen`` (forward input), ``forward``
(downstream output), ``outputs`` (JSON lines to ``stdout``/``file``, beside or instead of
``forward``; at least one of the two is required), ``log``, ``tests`` (run by ``ruletag
test``, parsed by ``ruletag.commands.test``), ``rules`` (rule ``paths`` relative to the
config file, or ``builtin:seeds`` for the bundled rules; ``vars``; ``cache_dir``;
``reload_interval``; ``exclude``, ``building_blocks`` and ``select``: which rules the table
keeps, see ``parse_select``), ``enrich`` (``key``, ``style: ruletag|ecs``, ``retag_prefix``,
``alert_tag``, ``stateful: on|off``), ``metrics`` (``listen: HOST:PORT``, ``rule_cost_sample:
N``), ``buffer`` (``type: memory|disk``, ``path``, ``max_size``, ``segment_size``, ``fsync:
always|never``; see docs/reliability.md), and ``state`` (``path``, ``snapshot_interval``:
checkpoints of stateful rules).
Unknown keys are errors, and every error names its key path, e.g.
``forward.servers[0].port: must be an int 1..65535``.

Durations accept a number of seconds or a string with a unit (``500ms``, ``30s``, ``5m``,
``1h``); sizes accept a number of bytes or a string with a unit (``64KiB``, ``16MiB``, ``1GB``).
Relative TLS file paths are resolved against the config file's folder.
The dataclasses and every default are in ``ruletag.config.model``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

import yaml

from ruletag.config.model import (
    BUILTIN_RULES,
    DEFAULT_LATENESS,
    DEFAULT_PORT,
    DEFAULT_RELOAD_INTERVAL,
    DEFAULT_RULE_COST_SAMPLE,
    DEFAULT_SNAPSHOT_INTERVAL,
    DEFAULT_TUNE_AFTER,
    ELASTIC_RULE_TYPES,
    KIB,
    LEVELS,
    LOGSOURCE_KEYS,
    MATURITY_STATUS,
    MAX_WORKERS,
    MIB,
    RULE_SOURCES,
    STATUSES,
    BufferConfig,
    Config,
    EnrichConfig,
    ForwardConfig,
    ForwardServer,
    ForwardTLS,
    ListenConfig,
    ListenTLS,
    LogConfig,
    MetricsConfig,
    NewTermsConfig,
    OutputConfig,
    OutputsConfig,
    RulesConfig,
    SelectConfig,
    StateConfig,
    TestsConfig,
    User,
    auto_workers,
    builtin_rules_path,
)
from ruletag.errors import ConfigError

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


#: The model's defaults, read by the section readers below (config/model.py is their one source).
_LISTEN: Final = ListenConfig()
_FORWARD: Final = ForwardConfig(servers=())
_ENRICH: Final = EnrichConfig()
_RULES: Final = RulesConfig(paths=())
_BUFFER: Final = BufferConfig()
_SELECT: Final = SelectConfig()


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
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < lo
            or (hi is not None and value > hi)
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
        if isinstance(value, bool) and {"on", "off"} <= set(choices):
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
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
        users.append(User(s.str_("username", empty=False) or "", s.str_("password", "") or ""))
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
        host=s.str_("host", _LISTEN.host, empty=False),
        port=s.int_("port", _LISTEN.port, 0, 65535),
        path=path,
        tls=_listen_tls(s.raw("tls"), "listen.tls", base),
        shared_key=s.str_("shared_key"),
        users=users,
        self_hostname=s.str_("self_hostname", _LISTEN.self_hostname, empty=False),
        tag_prefix=s.str_("tag_prefix", _LISTEN.tag_prefix),
        max_frame_size=s.size("max_frame_size", _LISTEN.max_frame_size),
        max_inflate_size=s.size("max_inflate_size", _LISTEN.max_inflate_size),
        max_inflate_members=s.int_("max_inflate_members", _LISTEN.max_inflate_members, 1),
        max_connections=s.int_("max_connections", _LISTEN.max_connections, 1),
        idle_timeout=s.duration("idle_timeout", _LISTEN.idle_timeout),
        handshake_timeout=s.duration("handshake_timeout", _LISTEN.handshake_timeout),
        max_unauthenticated_bytes=s.size(
            "max_unauthenticated_bytes", _LISTEN.max_unauthenticated_bytes
        ),
        frame_timeout=s.duration("frame_timeout", _LISTEN.frame_timeout),
        min_frame_rate=s.size("min_frame_rate", _LISTEN.min_frame_rate),
        max_in_flight_bytes=s.size("max_in_flight_bytes", _LISTEN.max_in_flight_bytes),
        max_total_in_flight_bytes=s.size(
            "max_total_in_flight_bytes", _LISTEN.max_total_in_flight_bytes
        ),
        shutdown_timeout=s.duration("shutdown_timeout", _LISTEN.shutdown_timeout),
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
            host=host,
            port=port,
            shared_key=defaults.shared_key,
            username=defaults.username,
            password=defaults.password,
            tls=defaults.tls,
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
        self_hostname=s.str_("self_hostname", _FORWARD.self_hostname, empty=False),
        require_ack=s.bool_("require_ack", _FORWARD.require_ack),
        ack_timeout=s.duration("ack_timeout", _FORWARD.ack_timeout),
        retry_backoff_base=s.duration("retry_backoff_base", _FORWARD.retry_backoff_base),
        retry_backoff_max=s.duration("retry_backoff_max", _FORWARD.retry_backoff_max),
        retry_limit=s.int_("retry_limit", None, 0),
        max_rejects=s.int_("max_rejects", _FORWARD.max_rejects, 0),
        dead_letter_path=s.file("dead_letter_path", base),
        compress=s.bool_("compress", _FORWARD.compress),
        entry_format=s.choice("entry_format", _FORWARD.entry_format, ("v1", "v2")),
        keepalive=s.bool_("keepalive", _FORWARD.keepalive),
        connect_timeout=s.duration("connect_timeout", _FORWARD.connect_timeout),
        max_in_flight_bytes=s.size("max_in_flight_bytes", _FORWARD.max_in_flight_bytes),
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


def _outputs(data: object, base: Path | None) -> OutputsConfig:
    if not isinstance(data, list) or not data:
        raise ConfigError("outputs: must be a non-empty list of {type: stdout|file, ...}")
    items = []
    for i, item in enumerate(data):
        path = f"outputs[{i}]"
        if isinstance(item, str):  # shorthand: `- stdout`
            item = {"type": item}
        s = _Section(item, path)
        kind = s.choice("type", "", ("stdout", "file"))
        out = OutputConfig(
            type=kind,
            path=s.file("path", base, required=kind == "file"),
            fsync=s.bool_("fsync", False),
            name=s.str_("name", "") or "",
        )
        s.done()
        if kind == "stdout" and (out.path is not None or out.fsync):
            raise ConfigError(f"{path}: path and fsync are for type: file only")
        items.append(out)
    return OutputsConfig(tuple(items))


def _rule_path(value: object, path: str, base: Path | None) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{path}: must be a file or folder path (or {BUILTIN_RULES!r})")
    if value.strip() == BUILTIN_RULES:
        return builtin_rules_path()
    p = Path(os.path.expanduser(value.strip()))
    if not p.is_absolute() and base is not None:
        p = base / p
    return str(p)


def _names(
    value: object, path: str, choices: tuple[str, ...], aliases: Mapping[str, str] | None = None
) -> tuple[str, ...]:
    """A list of ``choices`` (or one string, comma-separated), lower-cased, each ``aliases``
    key standing for its value, duplicates dropped."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(
        isinstance(x, str) and x.strip() for x in items
    ):
        raise ConfigError(f"{path}: must be a list of: {', '.join(choices)}")
    out = [x.strip().lower() for x in items]
    out = [(aliases or {}).get(x, x) for x in out]
    bad = [x for x in out if x not in choices]
    if bad:
        raise ConfigError(f"{path}: {bad[0]!r} is not one of {', '.join(choices)}")
    return tuple(dict.fromkeys(out))


def logsource_item(value: object, path: str) -> str:
    """One logsource selector, a mapping or ``key=glob[,key=glob]`` over product/category/
    service, in its canonical text form (keys in that order, values lower-cased)."""
    pairs: dict[str, object] = {}
    if isinstance(value, Mapping):
        pairs = {str(k): v for k, v in value.items()}
    elif isinstance(value, str) and value.strip():
        for part in value.split(","):
            key, eq, glob = part.partition("=")
            if not eq:
                raise ConfigError(f"{path}: {value!r}: want key=value (product, category, service)")
            pairs[key.strip()] = glob.strip()
    else:
        raise ConfigError(f"{path}: must be a mapping or 'product=..,category=..,service=..'")
    for key, got in pairs.items():
        if key not in LOGSOURCE_KEYS:
            raise ConfigError(f"{path}: {key!r} is not one of {', '.join(LOGSOURCE_KEYS)}")
        if not isinstance(got, str) or not got:
            raise ConfigError(f"{path}.{key}: must be a non-empty string")
    if not pairs:
        raise ConfigError(f"{path}: names none of {', '.join(LOGSOURCE_KEYS)}")
    return ",".join(f"{k}={str(pairs[k]).lower()}" for k in LOGSOURCE_KEYS if k in pairs)


def _include_exclude(
    value: object, path: str, item: Any
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``{include: [...], exclude: [...]}``, or a plain list meaning ``include``."""
    if isinstance(value, list | str):
        value = {"include": value}
    s = _Section(value, path)
    lists = []
    for key in ("include", "exclude"):
        raw = s.raw(key, [])
        if not isinstance(raw, list):
            raw = [raw]
        lists.append(tuple(dict.fromkeys(item(x, f"{path}.{key}[{i}]") for i, x in enumerate(raw))))
    s.done()
    return lists[0], lists[1]


def _tag(value: object, path: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{path}: must be a tag or ATT&CK id (globs allowed)")
    return value.strip()


def parse_select(data: object, path: str = "rules.select") -> SelectConfig:
    """The ``rules.select`` section (see ``SelectConfig``); errors name the key."""
    s = _Section(data, path)
    tags, exclude_tags = _include_exclude(s.raw("tags", {}), s.key("tags"), _tag)
    logsource, exclude_logsource = _include_exclude(
        s.raw("logsource", {}), s.key("logsource"), logsource_item
    )
    cfg = SelectConfig(
        sources=_names(s.raw("sources", list(_SELECT.sources)), s.key("sources"), RULE_SOURCES),
        min_level=s.choice("min_level", _SELECT.min_level, LEVELS),
        status=_names(
            s.raw("status", list(_SELECT.status)), s.key("status"), STATUSES, MATURITY_STATUS
        ),
        tags=tags,
        exclude_tags=exclude_tags,
        logsource=logsource,
        exclude_logsource=exclude_logsource,
        rule_types=_names(s.raw("rule_types", []), s.key("rule_types"), ELASTIC_RULE_TYPES),
    )
    s.done()
    if not cfg.sources:
        raise ConfigError(f"{s.key('sources')}: must name at least one of sigma, elastic")
    if not cfg.status:
        raise ConfigError(f"{s.key('status')}: must name at least one status")
    return cfg


def select_overrides(
    base: SelectConfig,
    *,
    sources: list[str] | None = None,
    min_level: str | None = None,
    status: list[str] | None = None,
    tags: list[str] | None = None,
    exclude_tags: list[str] | None = None,
    logsource: list[str] | None = None,
    exclude_logsource: list[str] | None = None,
    rule_types: list[str] | None = None,
) -> SelectConfig:
    """``base`` with the selection flags given on the command line replacing its values
    (``--source``, ``--min-level``, ``--status``, ``--tag``, ``--exclude-tag``,
    ``--logsource``, ``--exclude-logsource``, ``--rule-type``); lists may be comma-separated
    and repeated. Errors name the flag."""
    from dataclasses import replace

    def flat(values: list[str]) -> list[str]:
        return [x for v in values for x in v.split(",")]

    changes: dict[str, Any] = {}
    if sources is not None:
        changes["sources"] = _names(flat(sources), "--source", RULE_SOURCES)
    if min_level is not None:
        if min_level.lower() not in LEVELS:
            raise ConfigError(f"--min-level: must be one of {', '.join(LEVELS)}")
        changes["min_level"] = min_level.lower()
    if status is not None:
        changes["status"] = _names(flat(status), "--status", STATUSES, MATURITY_STATUS)
    if tags is not None:
        changes["tags"] = tuple(_tag(t, "--tag") for t in tags)
    if exclude_tags is not None:
        changes["exclude_tags"] = tuple(_tag(t, "--exclude-tag") for t in exclude_tags)
    if logsource is not None:
        changes["logsource"] = tuple(logsource_item(x, "--logsource") for x in logsource)
    if exclude_logsource is not None:
        changes["exclude_logsource"] = tuple(
            logsource_item(x, "--exclude-logsource") for x in exclude_logsource
        )
    if rule_types is not None:
        changes["rule_types"] = _names(flat(rule_types), "--rule-type", ELASTIC_RULE_TYPES)
    return replace(base, **changes)


def _rules(data: object, base: Path | None) -> RulesConfig:
    s = _Section(data, "rules")
    raw_paths = s.raw("paths")
    if isinstance(raw_paths, str):
        raw_paths = [raw_paths]
    if not isinstance(raw_paths, list) or not raw_paths:
        raise ConfigError("rules.paths: must be a non-empty list of rule files/folders")
    paths = tuple(_rule_path(v, f"rules.paths[{i}]", base) for i, v in enumerate(raw_paths))
    raw_vars = s.raw("vars", {})
    if not isinstance(raw_vars, Mapping):
        raise ConfigError("rules.vars: must be a mapping of placeholder -> value(s)")
    variables: dict[str, tuple[str, ...]] = {}
    for k, v in raw_vars.items():
        values = v if isinstance(v, list) else [v]
        if any(isinstance(x, Mapping | list) for x in values):
            raise ConfigError(f"rules.vars.{k}: values must be strings")
        variables[str(k)] = tuple("" if x is None else str(x) for x in values)
    raw_exclude = s.raw("exclude", [])
    if not isinstance(raw_exclude, list) or not all(isinstance(x, str) and x for x in raw_exclude):
        raise ConfigError("rules.exclude: must be a list of rule ids or names (globs allowed)")
    cfg = RulesConfig(
        paths=paths,
        exclude=tuple(raw_exclude),
        vars=variables,
        cache_dir=s.file("cache_dir", base),
        reload_interval=s.duration("reload_interval", DEFAULT_RELOAD_INTERVAL),
        tune_after=s.int_("tune_after", DEFAULT_TUNE_AFTER, 0),
        building_blocks=s.choice("building_blocks", _RULES.building_blocks, ("keep", "drop")),
        select=parse_select(s.raw("select"), "rules.select"),
        new_terms=parse_new_terms(s.raw("new_terms"), "rules.new_terms"),
        lateness=s.duration("lateness", DEFAULT_LATENESS),
    )
    s.done()
    return cfg


def parse_new_terms(data: object, path: str = "rules.new_terms") -> NewTermsConfig:
    """The ``rules.new_terms`` section: ``learn`` (true: each rule's history window, the
    default; false: no learning; or a duration) and ``max_terms`` (per rule, at least 1)."""
    s = _Section(data, path)
    raw = s.raw("learn", True)
    learn: float | None
    if raw is True:
        learn = None
    elif raw is False:
        learn = 0.0
    else:
        learn = parse_duration(raw, s.key("learn"))
    cfg = NewTermsConfig(learn=learn, max_terms=s.int_("max_terms", NewTermsConfig().max_terms, 1))
    s.done()
    return cfg


def _enrich(data: object) -> EnrichConfig:
    s = _Section(data, "enrich")
    cfg = EnrichConfig(
        key=s.str_("key", _ENRICH.key, empty=False),
        style=s.choice("style", _ENRICH.style, ("ruletag", "ecs")),
        retag_prefix=s.str_("retag_prefix", _ENRICH.retag_prefix),
        alert_tag=s.str_("alert_tag", _ENRICH.alert_tag),
        stateful=s.choice("stateful", _ENRICH.stateful, ("on", "off")),
    )
    s.done()
    return cfg


def _state(data: object, base: Path | None) -> StateConfig:
    s = _Section(data, "state")
    cfg = StateConfig(
        path=s.file("path", base, required=True),
        snapshot_interval=s.duration("snapshot_interval", DEFAULT_SNAPSHOT_INTERVAL),
    )
    s.done()
    if cfg.snapshot_interval <= 0:
        raise ConfigError("state.snapshot_interval: must be more than 0")
    return cfg


def _metrics(data: object) -> MetricsConfig:
    s = _Section(data, "metrics")
    text = s.str_("listen", "127.0.0.1:9464", empty=False)
    host, port = parse_hostport(text, "metrics.listen", 9464, allow_zero=True)
    every = s.int_("rule_cost_sample", DEFAULT_RULE_COST_SAMPLE, 0)
    s.done()
    return MetricsConfig(host=host, port=port, rule_cost_sample=every)


def _buffer(data: object, base: Path | None, max_frame_size: int) -> BufferConfig:
    s = _Section(data, "buffer")
    kind = s.choice("type", "memory", ("memory", "disk"))
    cfg = BufferConfig(
        type=kind,
        path=s.file("path", base, required=kind == "disk"),
        max_size=s.size("max_size", _BUFFER.max_size),
        segment_size=s.size("segment_size", _BUFFER.segment_size),
        fsync=s.choice("fsync", _BUFFER.fsync, ("always", "never")),
    )
    s.done()
    if cfg.segment_size < 4 * KIB:
        raise ConfigError("buffer.segment_size: must be at least 4KiB")
    if cfg.max_size < 2 * cfg.segment_size:
        raise ConfigError("buffer.max_size: must be at least twice buffer.segment_size")
    if kind == "disk" and cfg.max_size < max_frame_size:
        raise ConfigError(
            f"buffer.max_size: must be at least listen.max_frame_size ({max_frame_size} bytes)"
        )
    return cfg


# ---------------------------------------------------------------------------------------------
# public entry points


def config_from_mapping(data: object, base_dir: str | Path | None = None) -> Config:
    """Validate a parsed YAML mapping into a ``Config``; raise ``ConfigError`` naming the key."""
    base = Path(base_dir) if base_dir is not None else None
    s = _Section(data, "")
    if not s.has("forward") and not s.has("outputs"):
        raise ConfigError("forward: is required (where records go), unless outputs: is set")
    listen = _listen(s.raw("listen"), base)
    forward = _forward(s.raw("forward"), base) if s.has("forward") else None
    outputs = _outputs(s.raw("outputs"), base) if s.has("outputs") else None
    log = _log(s.raw("log"))
    sections: dict[str, Any] = {}
    if s.has("tests"):
        sections["tests"] = TestsConfig(s.raw("tests"))
    if s.has("rules"):
        sections["rules"] = _rules(s.raw("rules"), base)
    if s.has("enrich"):
        if "rules" not in sections:
            raise ConfigError("enrich: needs a rules section (nothing to annotate with)")
        sections["enrich"] = _enrich(s.raw("enrich"))
    if s.has("metrics"):
        sections["metrics"] = _metrics(s.raw("metrics"))
    if s.has("buffer"):
        sections["buffer"] = _buffer(s.raw("buffer"), base, listen.max_frame_size)
    if s.has("state"):
        sections["state"] = _state(s.raw("state"), base)
    workers_auto = s.raw("workers", 1) == "auto"
    if workers_auto:  # one per usable CPU; a unix socket cannot be shared: one
        workers = 1 if listen.path else auto_workers()
    else:
        try:
            workers = s.int_("workers", 1, 1, MAX_WORKERS)
        except ConfigError as exc:
            raise ConfigError(f"{exc} or auto") from None
    if workers > 1 and listen.path:
        raise ConfigError("workers: needs a TCP listener (listen.host/port), not listen.path")
    s.done()
    if (
        forward is not None
        and listen.shared_key is not None
        and listen.self_hostname == forward.self_hostname
    ):
        raise ConfigError(
            "forward.self_hostname: must differ from listen.self_hostname "
            "(fluentd refuses a peer with its own hostname)"
        )
    return Config(
        listen=listen,
        forward=forward,
        log=log,
        outputs=outputs,
        workers=workers,
        workers_auto=workers_auto,
        **sections,
    )


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
    return replace(cfg, source=str(p))


def with_cli_overrides(
    config: Config,
    *,
    rules: list[str] | None = None,
    metrics: str | None = None,
    buffer_dir: str | None = None,
) -> Config:
    """``config`` with ``serve --rules``/``--metrics``/``--buffer-dir`` replacing its
    rules/metrics/buffer sections.

    ``--rules`` paths are relative to the current folder; the ``rules`` section's other keys
    (vars, cache_dir, reload_interval) are kept. ``--buffer-dir`` turns the disk buffer on in
    that folder (keeping the ``buffer`` section's sizes and fsync policy).
    """

    if buffer_dir:
        old = config.buffer or BufferConfig()
        path = str(Path(os.path.expanduser(buffer_dir)).resolve())
        config = replace(config, buffer=replace(old, type="disk", path=path))
    if rules:
        new = _rules({"paths": list(rules)}, Path.cwd())
        if config.rules is not None:
            new = replace(config.rules, paths=new.paths)
        config = replace(config, rules=new)
    if metrics:
        new_metrics = _metrics({"listen": metrics})
        if config.metrics is not None:
            new_metrics = replace(config.metrics, host=new_metrics.host, port=new_metrics.port)
        config = replace(config, metrics=new_metrics)
    return config


def config_from_cli(
    listen: str | None,
    forward: str | None,
    shared_key: str | None = None,
    *,
    rules: list[str] | None = None,
    metrics: str | None = None,
    listen_shared_key: str | None = None,
    forward_shared_key: str | None = None,
) -> Config:
    """The config for ``ruletag serve --listen HOST:PORT --forward H:P[,H:P...]``.

    ``listen`` may be ``unix:PATH``; ``--shared-key`` applies to both sides, and
    ``--listen-shared-key`` / ``--forward-shared-key`` set (or replace it on) one side only,
    as Fluent Bit configures each plugin on its own: agents with one key, an aggregator with
    another or none. Without
    ``forward``, records go to stdout (JSON lines). ``rules`` are
    rule paths (relative to the current folder, or ``builtin:seeds``); ``metrics`` is the
    ``HOST:PORT`` of the metrics endpoint.
    """
    ldata: dict[str, Any] = {}
    if listen:
        if listen.startswith("unix:"):
            ldata["path"] = listen[5:]
        else:
            ldata["host"], ldata["port"] = parse_hostport(listen, "--listen", allow_zero=True)
    if listen_shared_key is None:
        listen_shared_key = shared_key
    if forward_shared_key is None:
        forward_shared_key = shared_key
    elif not forward:
        raise ConfigError("--forward-shared-key: needs --forward")
    if listen_shared_key is not None:
        ldata["shared_key"] = listen_shared_key
    data: dict[str, Any] = {"listen": ldata}
    if forward:
        servers = [
            dict(zip(("host", "port"), parse_hostport(part, "--forward"), strict=True))
            for part in forward.split(",")
            if part.strip()
        ]
        fdata: dict[str, Any] = {"servers": servers}
        if forward_shared_key is not None:
            fdata["shared_key"] = forward_shared_key
        data["forward"] = fdata
    else:
        data["outputs"] = [{"type": "stdout"}]
    if rules:
        data["rules"] = {"paths": list(rules)}
    if metrics:
        data["metrics"] = {"listen": metrics}
    return config_from_mapping(data, Path.cwd())
