"""A real relay (``ruletag serve`` subprocess) on 127.0.0.1 whose rules are a ``rules update``
folder: records sent, ``rules stats`` names the noisiest rule and the sampled costliest ones,
and an update or a rollback of ``current`` is picked up by the relay's hot reload."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from ruletag.cli import main
from ruletag.commands.stats import parse
from ruletag.config.load import config_from_mapping, with_cli_overrides
from ruletag.errors import ConfigError
from ruletag.runtime.rulecost import RuleCostSampler
from support.paths import SAMPLE, SIGMA_SEED
from support.peers import Source, make_chunk
from test_rules_update import make_zip

SIGMA_ID = "c649a6c7-cd8c-4a78-9c04-000fc76df954"
FIRE = [
    json.loads(x)
    for x in (
        Path(__file__).parent
        / "data/seeds/net_connection_win_wuauclt_network_connection.fire.jsonl"
    )
    .read_text()
    .splitlines()
    if x.strip()
]
EXTRA = sorted((SAMPLE / "sigma" / "rules" / "windows" / "process_creation").glob("*.yml"))


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(k, raising=False)


def _package(tmp_path: Path, name: str, extra: int) -> str:
    files = {f"rules/{SIGMA_SEED.name}": SIGMA_SEED.read_bytes()}
    for p in EXTRA[:extra]:
        files[f"rules/{p.name}"] = p.read_bytes()
    path = tmp_path / name
    path.write_bytes(make_zip(files))
    return path.as_uri()


def _metrics(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return parse(resp.read().decode())


def _wait(cond: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def test_stats_on_a_real_relay_and_reload_on_update(
    tmp_path: Path,
    serve_process: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert len(EXTRA) >= 2
    dest = tmp_path / "rules"
    assert main(["rules", "update", "--sigma", "--url", _package(tmp_path, "v1.zip", 1),
                 "--dest", str(dest)]) == 0  # fmt: skip
    cfg = tmp_path / "p.yaml"
    cfg.write_text(
        "listen: {host: 127.0.0.1, port: 0}\n"
        f"rules:\n  paths: [{dest / 'sigma' / 'current'}]\n  reload_interval: 0.2s\n"
        f"  cache_dir: {tmp_path / 'cache'}\n"
        "metrics: {listen: '127.0.0.1:0', rule_cost_sample: 1}\n"
        "outputs:\n  - {type: file, path: out.jsonl}\n",
        encoding="utf-8",
    )
    sp = serve_process(["--config", str(cfg)])
    ready = next(ln for ln in sp.lines if "ready" in ln)
    m = re.search(r"metrics on (\S+?:\d+)", ready)
    assert m, ready
    hostport = m.group(1)
    url = f"http://{hostport}/metrics"
    assert _metrics(url).rules_loaded == 2

    quiet = {"EventID": 1, "Image": "C:\\x.exe"}

    async def send() -> None:
        src = await Source.connect(sp.port)
        try:
            for _ in range(4):
                await src.send_chunk(make_chunk("win", [*FIRE, quiet]))
                await src.read_ack()
        finally:
            await src.close()

    asyncio.run(asyncio.wait_for(send(), 20))
    _wait(lambda: _metrics(url).cost_samples >= 1)

    capsys.readouterr()
    assert main(["rules", "stats", "--metrics", hostport, "--json", "--top", "3"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["noisiest"][0] == {"rule_id": SIGMA_ID, "hits": 4 * len(FIRE)}
    assert rep["records_in"] == 4 * (len(FIRE) + 1)
    assert rep["cost_samples"] >= 1 and len(rep["costliest"]) == 2
    assert {r["rule_id"] for r in rep["costliest"]} >= {SIGMA_ID}
    assert all(r["mean_us_per_record"] > 0 for r in rep["costliest"])
    assert main(["rules", "stats", "--metrics", url, "--interval", "0.3",
                 "--rules", str(dest / "sigma" / "current")]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert SIGMA_ID in text and "Potentially Suspicious Wuauclt" in text and "/s" in text
    assert "costliest rules (reference-evaluator time" in text

    # rules update switches current: the relay's polling sees it and reloads; so does rollback.
    assert main(["rules", "update", "--sigma", "--url", _package(tmp_path, "v2.zip", 2),
                 "--dest", str(dest)]) == 0  # fmt: skip
    _wait(lambda: _metrics(url).rules_loaded == 3)
    assert main(["rules", "update", "--sigma", "--rollback", "--dest", str(dest)]) == 0
    _wait(lambda: _metrics(url).rules_loaded == 2)
    out = sp.stop()
    assert "rules reloaded" in out and "rule cost sampling on" in out


def test_stats_without_samples_and_unreachable(capsys: pytest.CaptureFixture[str]) -> None:
    from ruletag.commands.stats import report, to_text

    text = 'ruletag_detections_total{rule_id="a"} 5.0\nruletag_detections_total{rule_id="b"} 9.0\n'
    rep = report(parse(text), None, 10)
    assert [r["rule_id"] for r in rep["noisiest"]] == ["b", "a"] and rep["costliest"] == []
    assert "metrics.rule_cost_sample" in to_text(rep, {})
    assert main(["rules", "stats", "--metrics", "127.0.0.1:9"]) == 1
    assert "127.0.0.1:9/metrics" in capsys.readouterr().err


def test_sampler_times_every_rule() -> None:
    from ruletag.rules.loader import load_rules

    rules = load_rules([SIGMA_SEED, *EXTRA[:2]]).rules
    s = RuleCostSampler(lambda: rules, 1)
    try:
        s.measure(FIRE[0])
        s.measure({"x": 1})
        samples, seconds = s.snapshot()
        assert samples == 2 and set(seconds) == {r.id for r in rules}
    finally:
        s.close()


def test_rule_cost_sample_config_key() -> None:
    base: dict[str, Any] = {"listen": {"port": 0}, "outputs": [{"type": "stdout"}]}
    off = config_from_mapping({**base, "metrics": {"listen": "127.0.0.1:0"}})
    assert off.metrics is not None and off.metrics.rule_cost_sample == 0
    on = config_from_mapping({**base, "metrics": {"rule_cost_sample": 50}})
    assert on.metrics is not None and on.metrics.rule_cost_sample == 50
    for bad in (-1, "x", 1.5, True):
        with pytest.raises(ConfigError, match=r"metrics\.rule_cost_sample"):
            config_from_mapping({**base, "metrics": {"rule_cost_sample": bad}})
    # serve --metrics HOST:PORT replaces the address and keeps the sampling
    moved = with_cli_overrides(on, metrics="127.0.0.1:0")
    assert moved.metrics is not None and moved.metrics.port == 0
    assert moved.metrics.rule_cost_sample == 50
