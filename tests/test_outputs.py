"""The stdout/file JSON-lines outputs and the fan-out."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import signal
import socket
import struct
from pathlib import Path
from typing import Any

import msgpack
import pytest

from ruletag.config.load import config_from_mapping
from ruletag.delivery.outputs import FanOut, FileOutput, StdoutOutput, chunk_lines, dump_json
from ruletag.protocol import Chunk
from ruletag.runtime.relay import Relay
from support.peers import Source, eventually, make_chunk


def _event_time(seconds: int, nanos: int) -> msgpack.ExtType:
    return msgpack.ExtType(0, struct.pack(">II", seconds, nanos))


def _chunk(entries: list[object], tag: str = "windows.events", signal: int = 0) -> Chunk:
    data = b"".join(msgpack.packb(e, use_bin_type=True) for e in entries)
    return Chunk(tag=tag, entries=data, count=len(entries), signal=signal)


def _lines(data: bytes) -> list[dict[str, object]]:
    return [json.loads(line) for line in data.decode("utf-8").splitlines()]


def test_chunk_lines_every_entry_shape() -> None:
    chunk = _chunk(
        [
            [1714564800, {"a": 1}],
            [_event_time(1714564800, 500_000_000), {"b": "x"}],
            [[_event_time(1714564801, 0), {"host": "h1"}], {"c": [1, 2]}],
            [[_event_time(1714564802, 0), {}], {"d": None}],
        ]
    )
    out = _lines(chunk_lines(chunk))
    assert out == [
        {"tag": "windows.events", "time": 1714564800, "record": {"a": 1}},
        {"tag": "windows.events", "time": 1714564800.5, "record": {"b": "x"}},
        {
            "tag": "windows.events",
            "time": 1714564801.0,
            "record": {"c": [1, 2]},
            "metadata": {"host": "h1"},
        },
        {"tag": "windows.events", "time": 1714564802.0, "record": {"d": None}},
    ]
    assert list(out[2]) == ["tag", "time", "record", "metadata"]


def test_bytes_and_invalid_utf8_survive_losslessly() -> None:
    raw_str = b"caf\xc3\xa9 \xff\xfe"  # valid UTF-8 then two invalid bytes
    entry = msgpack.packb([1, {"bin": b"\x00ok", "text": "ünï"}], use_bin_type=True)
    entry += msgpack.packb([2, {"bin": b"\x00ok\x80"}], use_bin_type=True)
    entry += b"\x92\x03\x81\xa1s" + bytes((0xA0 | len(raw_str),)) + raw_str  # str, bad UTF-8
    chunk = Chunk(tag="t", entries=entry, count=3)
    first, second, third = chunk_lines(chunk).decode("utf-8").splitlines()
    assert "ünï" in first  # valid text stays readable (not \u-escaped)
    assert json.loads(first)["record"] == {"bin": "\x00ok", "text": "ünï"}
    # a line holding invalid UTF-8 is written ASCII-only, the bad bytes as \udcNN
    assert second.isascii() and third.isascii() and "\\udcff\\udcfe" in third
    rec2 = json.loads(second)["record"]
    assert rec2["bin"].encode("utf-8", "surrogateescape") == b"\x00ok\x80"
    rec3 = json.loads(third)["record"]
    assert rec3["s"].encode("utf-8", "surrogateescape") == raw_str


def test_other_ext_types_and_signals() -> None:
    chunk = _chunk([[1, {"x": msgpack.ExtType(5, b"\x01\x02")}]])
    assert _lines(chunk_lines(chunk))[0]["record"]["x"] == {"ext": 5, "base64": "AQI="}
    metrics = Chunk(tag="fb.metrics", entries=b"\x01\x02\x03", count=1, signal=1)
    line = _lines(chunk_lines(metrics))[0]
    payload = base64.b64encode(b"\1\2\3").decode()
    assert line == {"tag": "fb.metrics", "signal": 1, "base64": payload}


def test_dump_json_keeps_slashes() -> None:
    assert dump_json({"p": "a/b"}) == b'{"p":"a/b"}'


def test_stdout_output_writes_in_order_under_concurrency() -> None:
    stream = io.BytesIO()
    out = StdoutOutput(stream=stream)

    async def go() -> None:
        await out.start()
        chunks = [_chunk([[i, {"n": i, "pad": "x" * 1000}]] * 3) for i in range(20)]
        await asyncio.gather(*(out.send(c) for c in chunks))
        await out.close()

    asyncio.run(go())
    lines = _lines(stream.getvalue())
    assert len(lines) == 60
    # each chunk's three lines stay together (no interleaving inside a chunk)
    for k in range(0, 60, 3):
        assert lines[k]["record"] == lines[k + 1]["record"] == lines[k + 2]["record"]
    assert out.records_out == 60 and out.bytes_out == len(stream.getvalue())


@pytest.mark.parametrize("fsync", [False, True])
def test_file_output_appends_and_reopens(tmp_path: Path, fsync: bool) -> None:
    path = tmp_path / "sub" / "out.jsonl"
    out = FileOutput(path, fsync=fsync)

    async def go() -> None:
        await out.start()
        assert path.exists()  # created at start, before any record
        await out.send(_chunk([[1, {"a": 1}], [2, {"a": 2}]]))
        path.rename(tmp_path / "rotated.jsonl")
        await out.reopen()
        await out.send(_chunk([[3, {"a": 3}]]))
        await out.close()

    asyncio.run(go())
    assert [r["record"] for r in _lines((tmp_path / "rotated.jsonl").read_bytes())] == [
        {"a": 1},
        {"a": 2},
    ]
    assert [r["record"] for r in _lines(path.read_bytes())] == [{"a": 3}]


def test_file_output_bad_path_fails_at_start(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    out = FileOutput(blocker / "out.jsonl")
    with pytest.raises(OSError):
        asyncio.run(out.start())


def test_serve_with_a_bad_output_path_cleans_up(tmp_path: Path) -> None:
    """An output that cannot start fails ``serve`` and releases what it set up before."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        metrics_port = probe.getsockname()[1]
    cfg = config_from_mapping({
        "listen": {"host": "127.0.0.1", "port": 0},
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
        "outputs": [{"type": "file", "path": str(blocker / "out.jsonl")}],
    })  # fmt: skip

    async def scenario() -> bool:
        with pytest.raises(OSError):
            await Relay(cfg).serve()
        return asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)

    assert asyncio.run(asyncio.wait_for(scenario(), 30)) is False  # handler removed
    with socket.socket() as again:
        again.bind(("127.0.0.1", metrics_port))  # the metrics endpoint was closed


class _Failing:
    def __init__(self) -> None:
        self.sent = 0

    async def start(self) -> None:
        pass

    async def send(self, chunk: Chunk) -> None:
        self.sent += 1
        raise ConnectionError("downstream gone")

    async def close(self) -> None:
        pass


def test_fanout_sends_to_all_and_raises_on_any_failure(tmp_path: Path) -> None:
    a, b = io.BytesIO(), io.BytesIO()
    chunk = _chunk([[1, {"k": "v"}]])

    async def go() -> None:
        fan = FanOut([StdoutOutput(stream=a), StdoutOutput(stream=b)])
        await fan.start()
        await fan.send(chunk)
        await fan.close()
        failing = _Failing()
        bad = FanOut([StdoutOutput(stream=a), failing])
        with pytest.raises(ConnectionError):
            await bad.send(chunk)
        assert failing.sent == 1

    asyncio.run(go())
    assert len(_lines(a.getvalue())) == 2  # both fan-outs wrote to a
    assert _lines(b.getvalue()) == [{"tag": "windows.events", "time": 1, "record": {"k": "v"}}]
    with pytest.raises(ValueError):
        FanOut([])


# ----------------------------------------------------------------- through a running ruletag


def test_serve_writes_stdout_and_file_and_acks_after_writing(
    tmp_path: Path, serve_process: Any
) -> None:
    out_file = tmp_path / "out" / "records.jsonl"
    cfg = tmp_path / "p.yaml"
    cfg.write_text(
        "listen: {host: 127.0.0.1, port: 0}\n"
        "outputs:\n  - stdout\n  - {type: file, path: out/records.jsonl, fsync: true}\n",
        encoding="utf-8",
    )
    sp = serve_process(["--config", str(cfg)])
    records = [{"n": i, "msg": "héllo", "raw": b"\xff\x00"} for i in range(5)]

    async def send() -> None:
        src = await Source.connect(sp.port)
        try:
            chunk_id = await src.send_chunk(make_chunk("app.log", records))
            assert await src.read_ack() == chunk_id
        finally:
            await src.close()

    asyncio.run(asyncio.wait_for(send(), 20))
    # the ack came after the write: the file already holds every record
    lines = _lines(out_file.read_bytes())
    assert [ln["record"]["n"] for ln in lines] == list(range(5))
    assert lines[0]["tag"] == "app.log" and lines[0]["time"] == 1_700_000_000
    assert lines[0]["record"]["msg"] == "héllo"
    assert lines[0]["record"]["raw"].encode("utf-8", "surrogateescape") == b"\xff\x00"
    rest = sp.stop()
    assert sp.proc.returncode == 0
    printed = [json.loads(ln) for ln in rest.splitlines() if ln.startswith('{"tag"')]
    assert [p["record"]["n"] for p in printed] == list(range(5))


def test_sigusr1_reopens_file_outputs_after_rotation(tmp_path: Path, serve_process: Any) -> None:
    out_file = tmp_path / "records.jsonl"
    cfg = tmp_path / "p.yaml"
    cfg.write_text(
        "listen: {host: 127.0.0.1, port: 0}\noutputs:\n  - {type: file, path: records.jsonl}\n",
        encoding="utf-8",
    )
    sp = serve_process(["--config", str(cfg)])

    async def send(n: int) -> None:
        src = await Source.connect(sp.port)
        try:
            chunk_id = await src.send_chunk(make_chunk("app.log", [{"n": n}]))
            assert await src.read_ack() == chunk_id
        finally:
            await src.close()

    asyncio.run(asyncio.wait_for(send(1), 20))
    rotated = tmp_path / "records.jsonl.1"
    out_file.rename(rotated)
    sp.proc.send_signal(signal.SIGUSR1)
    asyncio.run(eventually(out_file.exists, "the file output reopened its path"))
    asyncio.run(asyncio.wait_for(send(2), 20))
    assert [ln["record"]["n"] for ln in _lines(rotated.read_bytes())] == [1]
    assert [ln["record"]["n"] for ln in _lines(out_file.read_bytes())] == [2]
    sp.stop()
    assert sp.proc.returncode == 0
