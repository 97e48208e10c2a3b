"""The ``stdout`` and ``file`` outputs: chunks written as JSON lines, beside or instead of forward.

Each output has the same ``async send(chunk)`` as :class:`ruletag.transport.forwarder.Forwarder`
(plus ``start``/``close``), so the pipeline treats every output alike; :class:`FanOut` sends
one chunk to several outputs and returns once all of them have it. ``send`` returns once the
lines are written and flushed (and fsync'ed for a file output with ``fsync: true``): that is
what "acknowledged" means for these outputs.

One line per record, keys in this order::

    {"tag": "windows.events", "time": 1714564800.123456789, "record": {...}}

* ``time``: an integer time stays an integer; an EventTime becomes a float of seconds
  (nanoseconds beyond a float's precision are rounded).
* ``metadata``: added only for a v2 entry ``[[time, metadata], record]`` with metadata.
* Text: msgpack ``str`` and ``bin`` values are both written as JSON strings. Bytes that are not
  valid UTF-8 are kept losslessly with Python's ``surrogateescape``: each such byte ``0xNN``
  appears as the escape ``\\udcNN`` (that line is then written ASCII-only). To get the exact
  bytes back: ``json.loads(line)`` then ``s.encode("utf-8", "surrogateescape")``.
* Other msgpack extension types inside a record are written as
  ``{"ext": code, "base64": "..."}``.
* Metrics and traces chunks (``fluent_signal`` 1/2) are opaque: one line
  ``{"tag": ..., "signal": 1, "base64": "<payload>"}``.
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

import msgpack
import ujson

from ruletag.protocol import Chunk

if TYPE_CHECKING:
    from ruletag.config.model import Config, OutputConfig

_EVENT_TIME = struct.Struct(">II")


class Output(Protocol):
    """What the pipeline needs from an output (a Forwarder is one too)."""

    async def start(self) -> None: ...

    async def send(self, chunk: Chunk) -> None: ...

    async def close(self) -> None: ...


# ---------------------------------------------------------------------------------- formatting


def _ext_hook(code: int, data: bytes) -> object:
    if code == 0 and len(data) == 8:
        seconds, nanos = _EVENT_TIME.unpack(data)
        return seconds + nanos / 1e9 if nanos else float(seconds)
    return {"ext": code, "base64": base64.b64encode(data).decode("ascii")}


def _default(obj: object) -> object:
    if isinstance(obj, bytes | bytearray | memoryview):
        return bytes(obj).decode("utf-8", "surrogateescape")
    return repr(obj)


def dump_json(obj: object) -> bytes:
    """``obj`` as one UTF-8 JSON text; invalid UTF-8 kept as ``\\udcNN`` escapes."""
    text = ujson.dumps(obj, ensure_ascii=False, escape_forward_slashes=False, default=_default)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from surrogateescape: escape them
        return ujson.dumps(
            obj, ensure_ascii=True, escape_forward_slashes=False, default=_default
        ).encode("ascii")


def _entry_line(tag: str, entry: object) -> dict[str, Any]:
    if not isinstance(entry, list | tuple) or len(entry) != 2:
        return {"tag": tag, "entry": entry}
    head, record = entry
    line: dict[str, Any] = {"tag": tag}
    if isinstance(head, list | tuple) and len(head) == 2:  # v2: [[time, metadata], record]
        line["time"] = head[0]
        line["record"] = record
        if head[1]:
            line["metadata"] = head[1]
        return line
    line["time"] = head
    line["record"] = record
    return line


def chunk_lines(chunk: Chunk) -> bytes:
    """Every record of ``chunk`` as JSON lines (each ending in ``\\n``)."""
    if chunk.signal != 0:
        payload = base64.b64encode(chunk.entries).decode("ascii")
        return dump_json({"tag": chunk.tag, "signal": chunk.signal, "base64": payload}) + b"\n"
    unpacker = msgpack.Unpacker(
        raw=False,
        unicode_errors="surrogateescape",
        strict_map_key=False,
        ext_hook=_ext_hook,
        max_buffer_size=max(len(chunk.entries), 64),
    )
    unpacker.feed(chunk.entries)
    tag = chunk.tag
    return b"".join(dump_json(_entry_line(tag, entry)) + b"\n" for entry in unpacker)


# ------------------------------------------------------------------------------------- outputs


class JsonLinesOutput:
    """Writes chunks as JSON lines to a binary stream, one chunk at a time, in order."""

    kind = "jsonl"

    def __init__(self, name: str = "") -> None:
        self.name = name or self.kind
        self.records_out = 0
        self.bytes_out = 0
        self._lock = asyncio.Lock()

    def _stream(self) -> IO[bytes]:
        raise NotImplementedError

    async def start(self) -> None:
        """Nothing to open by default."""

    async def close(self) -> None:
        """Nothing to close by default."""

    def _write(self, data: bytes) -> None:
        stream = self._stream()
        stream.write(data)
        stream.flush()

    async def send(self, chunk: Chunk) -> None:
        """Write the chunk's records; return once they are flushed."""
        data = chunk_lines(chunk)
        async with self._lock:
            self._write(data)
        self.records_out += chunk.count
        self.bytes_out += len(data)


class StdoutOutput(JsonLinesOutput):
    """JSON lines on standard output (or any binary stream given, for tests/embedding)."""

    kind = "stdout"

    def __init__(self, name: str = "", stream: IO[bytes] | None = None) -> None:
        super().__init__(name)
        self._out = stream

    def _stream(self) -> IO[bytes]:
        return self._out if self._out is not None else sys.stdout.buffer


class FileOutput(JsonLinesOutput):
    """JSON lines appended to a file; ``fsync`` makes each send durable before it returns.

    ``reopen()`` closes and reopens the path (SIGUSR1, for log rotation by rename).
    """

    kind = "file"

    def __init__(self, path: str | Path, *, fsync: bool = False, name: str = "") -> None:
        super().__init__(name)
        self.path = Path(path)
        self.fsync = fsync
        self._file: IO[bytes] | None = None

    def _open(self) -> IO[bytes]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return open(self.path, "ab")  # kept open for the output's lifetime

    def _stream(self) -> IO[bytes]:
        if self._file is None:
            self._file = self._open()
        return self._file

    def _write(self, data: bytes) -> None:
        super()._write(data)
        if self.fsync:
            os.fsync(self._stream().fileno())

    async def start(self) -> None:
        """Open (create) the file now, so a bad path fails at startup."""
        self._stream()

    async def send(self, chunk: Chunk) -> None:
        """Write the chunk; with ``fsync`` the blocking part runs in a thread."""
        if not self.fsync:
            await super().send(chunk)
            return
        data = chunk_lines(chunk)
        async with self._lock:
            await asyncio.to_thread(self._write, data)
        self.records_out += chunk.count
        self.bytes_out += len(data)

    async def reopen(self) -> None:
        """Close and reopen the file (after a rotation)."""
        async with self._lock:
            if self._file is not None:
                self._file.close()
            self._file = self._open()

    async def close(self) -> None:
        """Flush and close the file."""
        async with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


class FanOut:
    """Sends each chunk to every output at once; returns when all have it.

    If one output fails, ``send`` raises (the upstream gets no ack and resends), so the
    outputs that did succeed may see that chunk twice: at-least-once, as everywhere.
    """

    def __init__(self, outputs: Sequence[Output]) -> None:
        if not outputs:
            raise ValueError("FanOut needs at least one output")
        self.outputs = list(outputs)

    async def start(self) -> None:
        """Start every output (in order)."""
        for out in self.outputs:
            await out.start()

    async def send(self, chunk: Chunk) -> None:
        """Send to all outputs concurrently; raise the first failure after all finished."""
        if len(self.outputs) == 1:
            await self.outputs[0].send(chunk)
            return
        results = await asyncio.gather(
            *(out.send(chunk) for out in self.outputs), return_exceptions=True
        )
        for res in results:
            if isinstance(res, BaseException):
                raise res

    async def close(self) -> None:
        """Close every output, even if one fails to close."""
        errors = []
        for out in self.outputs:
            try:
                await out.close()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]


# ------------------------------------------------------------------------------------ building


def open_output(spec: OutputConfig) -> Output:
    """One configured ``stdout``/``file`` output (not started)."""
    if spec.type == "file":
        if not spec.path:
            raise ValueError("a file output needs a path")
        return FileOutput(spec.path, fsync=spec.fsync, name=spec.name)
    return StdoutOutput(name=spec.name)


def build_outputs(config: Config) -> Output:
    """Every output of ``config``: the forwarder (if ``forward`` is set) and ``outputs``.

    With neither ``forward`` nor ``outputs`` configured, records go to stdout.
    """
    outputs: list[Output] = []
    if config.forward is not None:
        from ruletag.transport.forwarder import Forwarder

        outputs.append(Forwarder(config.forward))
    if config.outputs is not None:
        outputs.extend(open_output(spec) for spec in config.outputs.items)
    if not outputs:
        outputs.append(StdoutOutput())
    return outputs[0] if len(outputs) == 1 else FanOut(outputs)


async def reopen_files(output: object) -> int:
    """Reopen every file output inside ``output`` (SIGUSR1, after a log rotation)."""
    outputs = output.outputs if isinstance(output, FanOut) else [output]
    files = [o for o in outputs if isinstance(o, FileOutput)]
    for f in files:
        await f.reopen()
    return len(files)


def describe(output: object) -> str:
    """For the ready log line: ``HOST:PORT, ...`` (forward), ``stdout``, ``file:PATH``."""
    if isinstance(output, FanOut):
        return ", ".join(describe(o) for o in output.outputs)
    if isinstance(output, FileOutput):
        return f"file:{output.path}"
    if isinstance(output, StdoutOutput):
        return "stdout"
    servers = getattr(getattr(output, "config", None), "servers", None)
    if servers:
        return ", ".join(s.address for s in servers)
    return type(output).__name__
