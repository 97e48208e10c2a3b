"""Servers on 127.0.0.1 for the tests: an in-process relay (server -> pipeline -> forwarder ->
``Sink``), a disk-mode pipeline with fast retries, ``ruletag serve`` subprocesses, the
``ruletag`` console script, self-signed certificates and a bare HTTP GET. A missing test peer
fails the test (``require``), never skips it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ruletag.config.load import config_from_mapping
from ruletag.delivery.buffer import DiskBuffer
from ruletag.delivery.durable import DurablePipeline
from ruletag.delivery.pipeline import Pipeline
from ruletag.transport.forwarder import Forwarder
from ruletag.transport.server import Server
from support.paths import REPO
from support.peers import Sink

#: Fast retries so outage tests finish in seconds.
FAST_FORWARD = {"retry_backoff_base": 0.05, "retry_backoff_max": 0.3, "ack_timeout": 5}


def require(ok: bool, what: str) -> None:
    """Fail, never skip: `make setup` installs every test peer, so a missing one is a setup
    error that must not pass silently."""
    if not ok:
        pytest.fail(f"{what} (run `make setup`)", pytrace=False)


#: The installed console script (``make setup`` installs it beside the interpreter).
RULETAG = Path(sys.executable).with_name("ruletag")


def ruletag_script() -> Path:
    """The ``ruletag`` console script; fails the test (never skips) when it is missing."""
    require(RULETAG.exists(), f"the ruletag console script is not installed at {RULETAG}")
    return RULETAG


async def http_get(port: int, path: str, accept: str = "") -> tuple[int, dict[str, str], bytes]:
    """A bare HTTP/1.1 GET on 127.0.0.1 (status, lower-cased headers, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    extra = f"Accept: {accept}\r\n" if accept else ""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return status, headers, body


@contextlib.asynccontextmanager
async def durable_pipeline(
    path: Path, port: int, *, forward: dict[str, Any] | None = None, **buffer: Any
) -> AsyncIterator[DurablePipeline]:
    """A started disk-mode pipeline (``DiskBuffer(path, **buffer)``, fast retries) whose
    forwarder sends to 127.0.0.1:``port`` with ``FAST_FORWARD`` and a 1 s ack timeout."""
    cfg = config_from_mapping(
        {
            "forward": {
                "servers": [{"host": "127.0.0.1", "port": port}],
                **FAST_FORWARD,
                "ack_timeout": 1,
                **(forward or {}),
            }
        }
    )
    assert cfg.forward is not None
    fwd = Forwarder(cfg.forward)
    await fwd.start()
    pipe = DurablePipeline(fwd, DiskBuffer(path, **buffer), retry_min=0.05, retry_max=0.3)
    try:
        await pipe.start()
        yield pipe
    finally:
        await pipe.close(timeout=0.5)
        await fwd.close(timeout=0.5)


@dataclass
class Relay:
    """A running in-process relay and its downstream sink."""

    server: Server
    forwarder: Forwarder
    pipeline: Pipeline
    sink: Sink

    @property
    def port(self) -> int:
        return self.server.port


@contextlib.asynccontextmanager
async def start_relay(
    listen: dict[str, Any] | None = None,
    forward: dict[str, Any] | None = None,
    *,
    sink: Sink | None = None,
    nonce: bytes | None = None,
    auth_salt: bytes | None = None,
) -> AsyncIterator[Relay]:
    """Sink (started unless given running) <- Forwarder <- Pipeline <- Server on 127.0.0.1:0."""
    own_sink = sink is None
    if sink is None:
        sink = Sink()
    if own_sink or sink.port == 0:
        await sink.start()
    fdata: dict[str, Any] = {
        "servers": [{"host": "127.0.0.1", "port": sink.port}],
        **FAST_FORWARD,
        **(forward or {}),
    }
    cfg = config_from_mapping(
        {"listen": {"host": "127.0.0.1", "port": 0, **(listen or {})}, "forward": fdata}
    )
    assert cfg.forward is not None
    forwarder = Forwarder(cfg.forward)
    await forwarder.start()
    pipeline = Pipeline(forwarder)
    server = Server(cfg.listen, pipeline.submit, nonce=nonce, auth_salt=auth_salt)
    await server.start()
    try:
        yield Relay(server, forwarder, pipeline, sink)
    finally:
        await server.stop(timeout=2.0)
        await forwarder.close(timeout=2.0)
        await sink.stop()


@dataclass
class Certs:
    """A self-signed CA-less server cert (also usable as its own CA) and a client cert."""

    cert: str
    key: str
    client_cert: str
    client_key: str


def selfsigned_cert(cert: Path, key: Path, cn: str) -> None:
    """A self-signed certificate for ``cn`` and 127.0.0.1, made with the openssl command."""
    require(
        shutil.which("openssl") is not None,
        "the openssl command is needed to make test certificates",
    )
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={cn}",
            "-addext", f"subjectAltName=DNS:{cn},IP:127.0.0.1",
        ],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip


def make_certs(folder: Path) -> Certs:
    """Self-signed certs made with the ``openssl`` command (``cryptography`` is not a dep)."""
    selfsigned_cert(folder / "server.pem", folder / "server.key", "localhost")
    selfsigned_cert(folder / "client.pem", folder / "client.key", "client")
    return Certs(
        str(folder / "server.pem"),
        str(folder / "server.key"),
        str(folder / "client.pem"),
        str(folder / "client.key"),
    )


@dataclass
class ServeProcess:
    """A ``ruletag serve`` subprocess; ``port`` parsed from its ready line."""

    proc: subprocess.Popen[str]
    port: int
    lines: list[str]

    def stop(self) -> str:
        """SIGTERM the server; everything it printed (stdout and logs) up to ``stopped``."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=20)
        deadline = time.monotonic() + 10
        while not any("stopped" in ln for ln in self.lines) and time.monotonic() < deadline:
            time.sleep(0.05)  # the reader thread is still draining the pipe
        return "".join(self.lines)


def _drain(proc: subprocess.Popen[str], lines: list[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)


def start_serve(args: list[str], timeout: float = 15.0) -> ServeProcess:
    """Start ``python -m ruletag serve ARGS`` and wait for the line containing ``ready``."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ruletag", "serve", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
    )  # fmt: skip
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "ready" in line:
            m = re.search(r"listening on \S*?:(\d+)", line)
            assert m, line
            # Keep reading what the server logs afterwards, so a chatty server never blocks
            # on a full pipe; tests can still inspect ``lines``.
            threading.Thread(target=_drain, args=(proc, lines), daemon=True).start()
            return ServeProcess(proc, int(m.group(1)), lines)
    proc.kill()
    proc.wait(5)
    raise AssertionError("ruletag serve did not become ready:\n" + "".join(lines))
