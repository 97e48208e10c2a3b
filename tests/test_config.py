"""Config loading and validation: defaults, key-path errors, CLI configs, `ruletag validate`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ruletag.cli import main
from ruletag.config.load import (
    config_from_cli,
    config_from_mapping,
    load_config,
    parse_duration,
    parse_size,
)
from ruletag.config.model import DEFAULT_MAX_FRAME_SIZE, ForwardTLS
from ruletag.errors import ConfigError
from support.paths import REPO

MIN = {"forward": {"servers": [{"host": "127.0.0.1", "port": 24225}]}}


def with_(section: str, **values: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"forward": dict(MIN["forward"])}
    data.setdefault(section, {}).update(values)
    return data


def test_defaults() -> None:
    cfg = config_from_mapping(MIN)
    assert cfg.listen.host == "127.0.0.1" and cfg.listen.port == 24224
    assert cfg.listen.self_hostname == "ruletag-in"
    assert cfg.listen.max_frame_size == DEFAULT_MAX_FRAME_SIZE == 16 * 1024 * 1024
    assert cfg.listen.max_connections == 1024
    assert cfg.listen.idle_timeout == 300.0
    f = cfg.forward
    assert f.self_hostname == "ruletag-out" and f.require_ack and f.keepalive
    assert (f.ack_timeout, f.retry_backoff_base, f.retry_backoff_max) == (30.0, 1.0, 60.0)
    assert f.retry_limit is None and f.entry_format == "v1" and not f.compress
    assert f.servers[0].tls == ForwardTLS()
    assert cfg.log.format == "text" and cfg.log.level == "INFO"
    assert cfg.rules is None and cfg.tests is None and cfg.buffer is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"forward": {"servers": [{"host": "h", "port": 70000}]}},
            "forward.servers[0].port: must be an int 1..65535",
        ),
        (
            {"forward": {"servers": [{"host": "h", "port": "80"}]}},
            "forward.servers[0].port: must be an int 1..65535",
        ),
        (
            {"forward": {"servers": [{"host": "h", "prot": 1}]}},
            "forward.servers[0].prot: unknown key",
        ),
        ({**MIN, "lisen": {}}, "lisen: unknown key"),
        (with_("listen", idle_timeout="soon"), "listen.idle_timeout: must be a duration"),
        (with_("listen", max_frame_size="big"), "listen.max_frame_size: must be a size"),
        (with_("listen", max_connections=0), "listen.max_connections: must be an int >= 1"),
        (
            with_("listen", users=[{"username": "u", "password": "p"}]),
            "listen.users: needs listen.shared_key",
        ),
        (
            with_("listen", users=[{"username": "u", "pass": "p"}], shared_key="k"),
            "listen.users[0].pass: unknown key",
        ),
        (
            with_("listen", tls={"cert_file": "c", "key_file": "k", "client_cert_required": True}),
            "listen.tls.ca_file: is required",
        ),
        (with_("listen", tls={"cert_file": "c"}), "listen.tls.key_file: is required"),
        (with_("listen", path="/tmp/s", port=1), "listen.path: set either path"),
        (
            with_("listen", shared_key="k", self_hostname="ruletag-out"),
            "forward.self_hostname: must differ",
        ),
        (with_("forward", entry_format="v3"), "forward.entry_format: must be one of v1, v2"),
        (with_("forward", require_ack="yes"), "forward.require_ack: must be true or false"),
        (
            with_("forward", retry_backoff_base=10, retry_backoff_max=1),
            "forward.retry_backoff_max: must be >= retry_backoff_base",
        ),
        (with_("forward", tls={"cert_file": "c"}), "forward.tls: cert_file and key_file"),
        ({"forward": {"servers": []}}, "forward.servers: must be a non-empty list"),
        (
            {"forward": {"servers": [{"host": "h", "standby": True}]}},
            "forward.servers: at least one server must not be standby",
        ),
        (
            {"forward": {"servers": [{"host": "h", "username": "u"}]}},
            "forward.servers[0].username: needs a shared_key",
        ),
        ({"listen": {}}, "forward: is required"),
        (with_("log", format="xml"), "log.format: must be one of text, json"),
        ([1, 2], ": must be a mapping"),
    ],
)
def test_errors_name_the_key(data: Any, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_mapping(data)
    assert message in str(err.value)


def test_forward_defaults_are_inherited_by_servers() -> None:
    cfg = config_from_mapping(
        {
            "forward": {
                "shared_key": "k",
                "username": "u",
                "password": "p",
                "tls": True,
                "servers": ["a:1", {"host": "b", "shared_key": "other", "tls": {"verify": False}}],
            }
        }
    )
    a, b = cfg.forward.servers
    assert (a.host, a.port, a.shared_key, a.username, a.password) == ("a", 1, "k", "u", "p")
    assert a.tls.enabled and b.tls.enabled and not b.tls.verify
    assert b.shared_key == "other" and b.port == 24224


def test_units_and_typed_sections(tmp_path: Path) -> None:
    assert parse_duration("500ms", "x") == 0.5 and parse_duration("5m", "x") == 300.0
    assert parse_duration(2, "x") == 2.0
    assert parse_size("16MiB", "x") == 16 * 1024 * 1024 and parse_size("1kb", "x") == 1000
    cfg = config_from_mapping({**MIN, "rules": {"paths": ["r/"]}, "tests": [{"name": "t"}]})
    assert cfg.rules is not None and cfg.rules.paths == ("r",)
    assert cfg.tests is not None and cfg.tests.raw == [{"name": "t"}]


def test_load_config_resolves_relative_tls_paths(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text(
        "listen:\n  port: 0\n  tls: {cert_file: c.pem, key_file: /abs/k.pem}\n"
        "forward:\n  servers: ['127.0.0.1:24225']\n"
    )
    cfg = load_config(f)
    assert cfg.listen.tls is not None
    assert cfg.listen.tls.cert_file == str(tmp_path / "c.pem")
    assert cfg.listen.tls.key_file == "/abs/k.pem"
    assert cfg.source == str(f)


def test_load_config_yaml_error_has_line(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("forward:\n  servers: [\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: invalid YAML"):
        load_config(f)


def test_config_from_cli() -> None:
    cfg = config_from_cli("0.0.0.0:0", "a:1,[::1]:2", "key")
    assert (cfg.listen.host, cfg.listen.port, cfg.listen.shared_key) == ("0.0.0.0", 0, "key")
    assert [(s.host, s.port, s.shared_key) for s in cfg.forward.servers] == [
        ("a", 1, "key"),
        ("::1", 2, "key"),
    ]
    assert config_from_cli("unix:/tmp/x.sock", "a").listen.path == "/tmp/x.sock"
    with pytest.raises(ConfigError, match="--forward: bad port"):
        config_from_cli(None, "a:0")


def _serve_config(*flags: str) -> Any:
    from ruletag.cli import build_parser
    from ruletag.commands.serve import build_config

    return build_config(build_parser().parse_args(["serve", *flags]))


def test_serve_keys_per_side() -> None:
    """--shared-key sets both sides; --listen-shared-key / --forward-shared-key set one side
    each (agents with one key, an aggregator with another or none), replacing --shared-key."""

    def keys(*flags: str) -> tuple[str | None, list[str | None]]:
        cfg = _serve_config("--listen", "127.0.0.1:0", "--forward", "a:1,b:2", *flags)
        return cfg.listen.shared_key, [s.shared_key for s in cfg.forward.servers]

    assert keys() == (None, [None, None])
    assert keys("--shared-key", "k") == ("k", ["k", "k"])
    assert keys("--listen-shared-key", "agents") == ("agents", [None, None])
    assert keys("--forward-shared-key", "agg") == (None, ["agg", "agg"])
    assert keys("--listen-shared-key", "agents", "--forward-shared-key", "agg") == (
        "agents",
        ["agg", "agg"],
    )
    assert keys("--shared-key", "k", "--forward-shared-key", "agg") == ("k", ["agg", "agg"])
    assert keys("--shared-key", "k", "--listen-shared-key", "agents") == ("agents", ["k", "k"])
    with pytest.raises(ConfigError, match="--forward-shared-key: needs --forward"):
        _serve_config("--rules", "builtin:seeds", "--forward-shared-key", "agg")
    with pytest.raises(ConfigError, match="not both"):
        _serve_config(
            "--config", str(REPO / "pipelines" / "relay.yaml"), "--listen-shared-key", "agents"
        )


def test_example_relay_pipeline_is_valid() -> None:
    cfg = load_config(REPO / "pipelines" / "relay.yaml")
    assert cfg.forward.servers[0].port == 24225


def test_validate_command(tmp_path: Path, capsys: Any) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("forward: {servers: [{host: h, port: 0}]}\n")
    assert main(["validate", str(REPO / "pipelines" / "relay.yaml")]) == 0
    assert main(["validate", str(REPO / "pipelines" / "relay.yaml"), str(bad)]) == 1
    err = capsys.readouterr().err
    assert "forward.servers[0].port: must be an int 1..65535" in err


def test_rules_exclude_is_a_list_of_globs() -> None:
    cfg = config_from_mapping({**MIN, "rules": {"paths": ["r/"], "exclude": ["a*", "b"]}})
    assert cfg.rules is not None and cfg.rules.exclude == ("a*", "b")
    for bad in ("a*", [""], [1]):
        with pytest.raises(ConfigError, match=r"rules\.exclude"):
            config_from_mapping({**MIN, "rules": {"paths": ["r/"], "exclude": bad}})


def test_rules_building_blocks_keep_or_drop() -> None:
    cfg = config_from_mapping({**MIN, "rules": {"paths": ["r/"]}})
    assert cfg.rules is not None and cfg.rules.building_blocks == "keep"
    cfg = config_from_mapping({**MIN, "rules": {"paths": ["r/"], "building_blocks": "drop"}})
    assert cfg.rules is not None and cfg.rules.building_blocks == "drop"
    with pytest.raises(ConfigError, match=r"rules\.building_blocks"):
        config_from_mapping({**MIN, "rules": {"paths": ["r/"], "building_blocks": "hide"}})


def test_rules_lateness_is_a_duration() -> None:
    cfg = config_from_mapping({**MIN, "rules": {"paths": ["r/"]}})
    assert cfg.rules is not None and cfg.rules.lateness == 2.0
    cfg = config_from_mapping({**MIN, "rules": {"paths": ["r/"], "lateness": "500ms"}})
    assert cfg.rules is not None and cfg.rules.lateness == 0.5
    with pytest.raises(ConfigError, match=r"rules\.lateness"):
        config_from_mapping({**MIN, "rules": {"paths": ["r/"], "lateness": -1}})


def test_validate_reports_building_blocks_left_out(tmp_path: Path, capsys: Any) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    bb = REPO / "tests" / "data" / "corpus" / "elastic" / "rules_building_block"
    for f in [*bb.glob("*.toml"), *(REPO / "plugin" / "ruletag" / "data" / "rules").glob("*.toml")]:
        (rules / f.name).write_bytes(f.read_bytes())
    cfg = tmp_path / "bb.yaml"
    cfg.write_text(
        "forward: {servers: [{host: 127.0.0.1, port: 24225}]}\n"
        f"rules: {{paths: [{rules}], building_blocks: drop, cache_dir: {tmp_path / 'cache'}}}\n"
    )
    from ruletag.rules.loader import load_rules

    blocks = sum(r.building_block for r in load_rules([rules]).rules)
    assert blocks >= 4
    assert main(["validate", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "1 rules" in out and f"{blocks} building-block rules left out" in out


def test_bare_yaml_on_off_is_accepted_for_enrich_stateful(tmp_path: Path) -> None:
    """``stateful: off`` as the docs write it: YAML 1.1 reads a bare off as false."""
    for text, want in (("off", "off"), ("on", "on"), ('"off"', "off")):
        cfg = tmp_path / "c.yaml"
        cfg.write_text(
            "forward: {servers: ['127.0.0.1:9']}\nrules: {paths: [builtin:seeds]}\n"
            f"enrich:\n  stateful: {text}\n",
            encoding="utf-8",
        )
        got = load_config(cfg).enrich
        assert got is not None and got.stateful == want
