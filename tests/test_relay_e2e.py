"""End-to-end relay: recorded Fluent Bit captures, real Python clients, outages, the CLI.

Every test runs a real server -> pipeline -> forwarder -> tests/peers.Sink chain on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack
import pytest

from ruletag.config.load import config_from_mapping
from ruletag.runtime.relay import Relay
from support.paths import CAPTURES, REPO
from support.peers import Sink, Source, decode_entries, make_chunk
from support.servers import start_relay

HANDSHAKE_KEY = "fwd-secret-123"
HANDSHAKE_USER = {"username": "edr-user", "password": "edr-pass-456"}


def capture_names() -> list[str]:
    out = []
    for d in (CAPTURES, CAPTURES / "fluent-bit-5.1.1"):
        for meta in sorted(d.glob("*.json")):
            if meta.name.startswith("fb-in-forward") or meta.name.endswith(".expected.json"):
                continue
            out.append(str(meta.relative_to(CAPTURES))[: -len(".json")])
    return out


def _unpack_all(data: bytes, raw: bool) -> list[Any]:
    u = msgpack.Unpacker(raw=raw, strict_map_key=False, unicode_errors="surrogateescape")
    u.feed(data)
    return list(u)


def _canon(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=repr, ensure_ascii=False)


def _entry_key(tag: str, time_field: Any, record: Any) -> str:
    t = time_field[0] if isinstance(time_field, list) else time_field
    return _canon([tag, t, record])


def expected_from_capture(data: bytes) -> tuple[list[str], list[str]]:
    """(entry keys of every log record, decoded payloads of every metrics/traces message)."""
    keys: list[str] = []
    blobs: list[str] = []
    for msg, decoded in zip(_unpack_all(data, raw=True), decode_entries(data), strict=True):
        if not isinstance(msg, list) or msg[0] == b"PING":
            continue
        tag = msg[0].decode()
        body = msg[1]
        opts = msg[-1] if len(msg) >= 3 and isinstance(msg[-1], dict) else {}
        if isinstance(body, bytes):  # (Compressed)PackedForward or a signal payload
            if opts.get(b"compressed") == b"gzip" or body[:2] == b"\x1f\x8b":
                body = gzip.decompress(body)
            if opts.get(b"fluent_signal", 0) in (1, 2):
                blobs.append(_canon(decode_entries(body)))
                continue
            keys += [_entry_key(tag, e[0], e[1]) for e in decode_entries(body)]
        elif opts.get(b"fluent_signal", 0) in (1, 2):  # Fluentd_Compat metrics
            blobs.append(_canon(decoded[1]))
        else:  # Message or Forward: use the copy decoded with str as str
            if isinstance(decoded[1], list):
                keys += [_entry_key(tag, e[0], e[1]) for e in decoded[1]]
            else:
                keys.append(_entry_key(tag, decoded[1], decoded[2]))
    return keys, blobs


def _reply_objects(data: bytes) -> list[Any]:
    """Decoded reply messages; HELO maps reduced to nonce/auth (str vs bin is not compared)."""
    out = []
    for obj in _unpack_all(data, raw=True):
        if isinstance(obj, list) and obj and obj[0] == b"HELO":
            opts = obj[1]
            obj = [b"HELO", opts.get(b"nonce"), opts.get(b"auth") or b""]
        out.append(obj)
    return out


async def replay_connection(port: int, data: bytes, pieces: int = 5) -> bytes:
    """Write ``data`` in several writes, half-close, return every byte the server sent."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    step = max(1, len(data) // pieces)
    for i in range(0, len(data), step):
        writer.write(data[i : i + step])
        await writer.drain()
        await asyncio.sleep(0)
    writer.write_eof()
    reply = bytearray()
    async with asyncio.timeout(10):
        while chunk := await reader.read(65536):
            reply += chunk
    writer.close()
    return bytes(reply)


@pytest.mark.parametrize("name", capture_names())
def test_replay_capture(name: str, arun: Any) -> None:
    meta = json.loads((CAPTURES / f"{name}.json").read_text())
    sent = (CAPTURES / f"{name}.bin").read_bytes()
    reply_file = CAPTURES / f"{name}.reply.bin"
    expected_reply = reply_file.read_bytes() if reply_file.exists() else b""
    conns = meta["connections"]
    handshake = next((c["handshake"] for c in conns if c["handshake"]), None)
    listen: dict[str, Any] = {}
    if handshake:
        listen = {
            "shared_key": HANDSHAKE_KEY,
            "self_hostname": handshake["pong"]["server_hostname"],
        }
        if handshake["ping"]["username"]:
            listen["users"] = [HANDSHAKE_USER]
    keys, blobs = expected_from_capture(sent)

    async def scenario() -> None:
        async with start_relay(listen) as r:
            for c in conns:
                cs, sc = c["client_to_server"], c["server_to_client"]
                if c["handshake"]:
                    helo = c["handshake"]["helo"]
                    r.server.nonce = bytes.fromhex(helo["nonce_hex"])
                    r.server.auth_salt = bytes.fromhex(helo["auth_salt_hex"])
                data = sent[cs["offset"] : cs["offset"] + cs["length"]]
                reply = await replay_connection(r.port, data)
                want = expected_reply[sc["offset"] : sc["offset"] + sc["length"]]
                if meta["capture_server"].get("acks_sent_when_chunk_present", True):
                    if c["handshake"]:
                        assert _reply_objects(reply) == _reply_objects(want)
                    else:
                        assert reply == want
                else:  # the capture server withheld acks; ruletag acks every chunk
                    assert all(set(o) == {b"ack"} for o in _unpack_all(reply, raw=True))
            await r.sink.wait_records(len(keys), timeout=10)
            await r.sink.wait_chunks(len(blobs), timeout=10)
            got = [_entry_key(t, tf, rec) for t, tf, rec in r.sink.entries]
            assert len(got) == len(keys)
            assert Counter(got) == Counter(keys)
            got_blobs = [
                _canon(
                    decode_entries(
                        gzip.decompress(c.entries) if c.entries[:2] == b"\x1f\x8b" else c.entries
                    )
                )
                for c in r.sink.chunks
                if c.signal in (1, 2)
            ]
            assert got_blobs == blobs

    arun(scenario(), timeout=60)
    if meta.get("records_received"):
        assert len(keys) == meta["records_received"] or not keys  # metrics count differently


def test_downstream_outage_loses_nothing(arun: Any) -> None:
    """The sink goes away for ~1.5 s mid-stream and comes back: every record arrives."""

    async def scenario() -> None:
        async with start_relay() as r:
            src = await Source.connect(r.port)
            n_chunks, per_chunk = 40, 10
            acks: list[bytes] = []

            async def sender() -> list[bytes | None]:
                ids = []
                for i in range(n_chunks):
                    recs = [{"seq": i * per_chunk + j} for j in range(per_chunk)]
                    ids.append(await src.send_chunk(make_chunk("outage", recs)))
                    await asyncio.sleep(0.02)
                return ids

            async def acker() -> None:
                for _ in range(n_chunks):
                    acks.append(await src.read_ack(timeout=20))

            ack_task = asyncio.create_task(acker())
            send_task = asyncio.create_task(sender())
            await r.sink.wait_records(100, timeout=10)
            await r.sink.stop()
            await asyncio.sleep(1.5)
            assert not ack_task.done()
            await r.sink.start()
            ids = await send_task
            await asyncio.wait_for(ack_task, 20)
            assert acks == ids
            seqs = {rec["seq"] for rec in r.sink.records}
            assert seqs == set(range(n_chunks * per_chunk))
            await src.close()

    arun(scenario(), timeout=60)


def test_pypi_fluent_logger_sender(arun: Any) -> None:
    from fluent import sender

    async def scenario() -> None:
        async with start_relay() as r:

            def emit() -> None:
                plain = sender.FluentSender("py", host="127.0.0.1", port=r.port)
                nano = sender.FluentSender(
                    "pyns", host="127.0.0.1", port=r.port, nanosecond_precision=True
                )
                for i in range(5):
                    assert plain.emit("plain", {"i": i}), plain.last_error
                    assert nano.emit("nano", {"i": i}), nano.last_error
                plain.close()
                nano.close()

            await asyncio.to_thread(emit)
            await r.sink.wait_records(10)
            by_tag = Counter(t for t, _, _ in r.sink.entries)
            assert by_tag == {"py.plain": 5, "pyns.nano": 5}
            nano_times = [tf for t, tf, _ in r.sink.entries if t == "pyns.nano"]
            assert all(hasattr(tf, "nanoseconds") for tf in nano_times)

    arun(scenario())


def test_relay_with_forward_shared_key_and_v2(arun: Any) -> None:
    """Handshake on both sides; v2 entries kept when forward.entry_format is v2."""

    async def scenario() -> None:
        sink = Sink(shared_key="down", hostname="downstream")
        await sink.start()
        async with start_relay(
            {"shared_key": "up"}, {"shared_key": "down", "entry_format": "v2"}, sink=sink
        ) as r:
            src = await Source.connect(r.port, shared_key="up")
            cid = await src.send_chunk(make_chunk("v2", [{"a": 1}, {"a": 2}], v2=True))
            assert await src.read_ack() == cid
            await src.close()
            assert [tf[1] for _, tf, _ in sink.entries] == [{"m": 1}, {"m": 1}]

    arun(scenario())


def _relay_yaml(tmp_path: Path, sink_port: int, listen_extra: str = "") -> Path:
    cfg = tmp_path / "relay.yaml"
    cfg.write_text(
        "listen:\n  host: 127.0.0.1\n  port: 0\n"
        + listen_extra
        + f"forward:\n  servers:\n    - host: 127.0.0.1\n      port: {sink_port}\n"
        + "log:\n  format: json\n"
    )
    return cfg


def test_serve_subprocess_relays_and_stops_on_sigterm(
    arun: Any, serve_process: Any, tmp_path: Path
) -> None:
    async def scenario() -> None:
        sink = Sink()
        await sink.start()
        cfg = _relay_yaml(tmp_path, sink.port)
        sp = await asyncio.to_thread(serve_process, ["--config", str(cfg)])
        assert json.loads(sp.lines[-1])["msg"].startswith("ruletag ready: listening on")
        src = await Source.connect(sp.port)
        cid = await src.send_chunk(make_chunk("cli", [{"a": 1}]))
        assert await src.read_ack() == cid
        await src.close()
        assert sink.records == [{"a": 1}]
        sp.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(sp.proc.wait, 10) == 0
        await sink.stop()

    arun(scenario())


def test_serve_cli_flags(arun: Any, serve_process: Any) -> None:
    async def scenario() -> None:
        sink = Sink()
        await sink.start()
        sp = await asyncio.to_thread(
            serve_process, ["--listen", "127.0.0.1:0", "--forward", f"127.0.0.1:{sink.port}"]
        )
        assert f"127.0.0.1:{sink.port}" in sp.lines[-1] and "forwarding to" in sp.lines[-1]
        src = await Source.connect(sp.port)
        cid = await src.send_chunk(make_chunk("cli", [{"b": 2}]))
        assert await src.read_ack() == cid
        await src.close()
        sp.proc.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(sp.proc.wait, 10) == 0
        await sink.stop()

    arun(scenario())


@pytest.mark.parametrize("forward_key", ["aggregator", None])
def test_serve_cli_listen_and_forward_keys(
    arun: Any, serve_process: Any, forward_key: str | None
) -> None:
    """Agents authenticate with one key, the downstream with another (or none)."""

    async def scenario() -> None:
        sink = Sink(shared_key=forward_key, hostname="downstream")
        await sink.start()
        args = [
            "--listen",
            "127.0.0.1:0",
            "--forward",
            f"127.0.0.1:{sink.port}",
            "--listen-shared-key",
            "agents",
        ]
        if forward_key is not None:
            args += ["--forward-shared-key", forward_key]
        sp = await asyncio.to_thread(serve_process, args)
        src = await Source.connect(sp.port, shared_key="agents")
        cid = await src.send_chunk(make_chunk("keys", [{"k": 1}]))
        assert await src.read_ack() == cid
        await src.close()
        assert sink.records == [{"k": 1}]
        sp.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(sp.proc.wait, 10) == 0
        await sink.stop()

    arun(scenario())


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--rules", "no/such/rules.yml", "--forward", "127.0.0.1:1"], "no/such/rules.yml"),
        (["--forward", "127.0.0.1:99999"], "bad port"),
        ([], "--forward"),
    ],
)
def test_serve_bad_usage_exits_2(args: list[str], needle: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ruletag", "serve", *args],
        capture_output=True, text=True, timeout=30, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 2
    assert needle in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_serve_bad_config_file_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("forward:\n  servers:\n    - host: 127.0.0.1\n      port: 70000\n")
    proc = subprocess.run(
        [sys.executable, "-m", "ruletag", "serve", "--config", str(cfg)],
        capture_output=True, text=True, timeout=30, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "forward.servers[0].port: must be an int 1..65535" in proc.stderr


def test_relay_lifecycle_by_hand_installs_no_signal_handler(arun: Any) -> None:
    """``Relay.startup()``/``shutdown()`` without ``serve()``: a chunk goes through, no signal
    handler is installed; ``serve()`` returns once ``should_exit`` is set."""

    async def scenario() -> None:
        async with Sink() as sink:
            cfg = config_from_mapping({
                "listen": {"host": "127.0.0.1", "port": 0},
                "forward": {"servers": [f"127.0.0.1:{sink.port}"]},
            })  # fmt: skip
            relay = Relay(cfg)
            await relay.startup()
            try:
                assert relay.server is not None and not relay.should_exit
                src = await Source.connect(relay.server.port)
                cid = await src.send_chunk(make_chunk("hand", [{"n": 1}]))
                assert await src.read_ack() == cid
                await src.close()
            finally:
                await relay.shutdown()
            loop = asyncio.get_running_loop()
            assert not loop.remove_signal_handler(signal.SIGTERM)
            assert sink.records == [{"n": 1}]

            again = Relay(cfg)
            task = asyncio.create_task(again.serve())
            while not again.started:
                assert not task.done(), task
                await asyncio.sleep(0.01)
            again.should_exit = True
            assert await asyncio.wait_for(task, 10) == 0
            assert not loop.remove_signal_handler(signal.SIGTERM)  # serve() removed its own

    arun(scenario())
