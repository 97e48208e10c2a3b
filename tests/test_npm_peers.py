"""Real npm clients upstream of ruletag and npm FluentServer downstream of it (127.0.0.1)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from ruletag.config.load import config_from_mapping
from ruletag.delivery.pipeline import Pipeline
from ruletag.transport.forwarder import Forwarder
from ruletag.transport.server import Server
from support.paths import JS_DIR
from support.servers import start_relay

pytestmark = pytest.mark.usefixtures("node_peers")


async def run_node(script: str, *args: str, timeout: float = 30.0) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        "node", str(JS_DIR / script), *args, cwd=JS_DIR,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("mode", ["Message", "Forward", "PackedForward", "CompressedPackedForward"])
@pytest.mark.parametrize("secure", [False, True], ids=["plain", "shared-key"])
def test_fluent_org_client_with_acks(mode: str, secure: bool, arun: Any) -> None:
    async def scenario() -> None:
        listen = {"shared_key": "npm-key"} if secure else {}
        extra = ["--shared-key", "npm-key"] if secure else []
        async with start_relay(listen) as r:
            code, out, err = await run_node(
                "fluent_org_client.mjs", str(r.port), mode, "25", "--ack", *extra
            )
            assert code == 0, err
            assert "SENT 25" in out
            records = await r.sink.wait_records(25)
            assert sorted(rec["seq"] for rec in records) == list(range(25))
            assert {rec["mode"] for rec in records} == {mode}
            assert {t for t, _, _ in r.sink.entries} == {"npm.fluentorg.rec"}
            assert r.server.stats.acks_sent >= 1

    arun(scenario())


def test_fluent_org_client_wrong_key_rejected(arun: Any) -> None:
    async def scenario() -> None:
        async with start_relay({"shared_key": "right"}) as r:
            code, _out, err = await run_node(
                "fluent_org_client.mjs", str(r.port), "Forward", "3", "--ack",
                "--shared-key", "wrong", "--deadline", "3000",
            )  # fmt: skip
            assert code != 0
            assert "ERROR" in err
            assert r.sink.records == []
            assert r.server.stats.auth_failures == 1

    arun(scenario())


@pytest.mark.parametrize("mode", ["PackedForward", "CompressedPackedForward", "Message"])
def test_npm_fluent_logger_ack_and_security(mode: str, arun: Any) -> None:
    async def scenario() -> None:
        listen = {"shared_key": "s3c", "users": [{"username": "u1", "password": "p1"}]}
        async with start_relay(listen) as r:
            code, out, err = await run_node(
                "fluent_logger_client.mjs", str(r.port), mode, "20", "--ack",
                "--shared-key", "s3c", "--user", "u1:p1",
            )  # fmt: skip
            assert code == 0, err
            assert "SENT 20" in out
            records = await r.sink.wait_records(20)
            assert sorted(rec["seq"] for rec in records) == list(range(20))

    arun(scenario())


@asynccontextmanager
async def fluent_server(*args: str) -> AsyncIterator[tuple[int, list[dict[str, Any]]]]:
    """npm FluentServer on an ephemeral port; yields (port, list filled with its records)."""
    proc = await asyncio.create_subprocess_exec(
        "node", str(JS_DIR / "fluent_server.mjs"), "0", *args, cwd=JS_DIR,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    records: list[dict[str, Any]] = []
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 15)
        assert line.startswith(b"LISTENING "), line
        port = int(line.split()[1])

        async def reader() -> None:
            assert proc.stdout is not None
            while line := await proc.stdout.readline():
                records.append(json.loads(line))

        task = asyncio.create_task(reader())
        yield port, records
        task.cancel()
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "shared-key"])
def test_fluent_server_as_downstream(secure: bool, arun: Any) -> None:
    """Upstream npm client -> ruletag -> npm FluentServer (v1 entries: it rejects v2)."""

    async def scenario() -> None:
        down_args = ["--shared-key", "down-key", "--hostname", "fluent-down"] if secure else []
        async with fluent_server(*down_args) as (port, records):
            fwd: dict[str, Any] = {
                "servers": [{"host": "127.0.0.1", "port": port}],
                "retry_backoff_base": 0.05, "retry_backoff_max": 0.3, "ack_timeout": 5,
            }  # fmt: skip
            if secure:
                fwd["shared_key"] = "down-key"
            cfg = config_from_mapping({"listen": {"port": 0}, "forward": fwd})
            forwarder = Forwarder(cfg.forward)
            await forwarder.start()
            server = Server(cfg.listen, Pipeline(forwarder).submit)
            await server.start()
            try:
                code, _out, err = await run_node(
                    "fluent_org_client.mjs", str(server.port), "PackedForward", "30", "--ack"
                )
                assert code == 0, err
                for _ in range(100):
                    if len(records) >= 30:
                        break
                    await asyncio.sleep(0.05)
                assert sorted(r["record"]["seq"] for r in records) == list(range(30))
                assert Counter(r["tag"] for r in records) == {"npm.fluentorg.rec": 30}
            finally:
                await server.stop(timeout=2)
                await forwarder.close(timeout=2)

    arun(scenario())
