"""Dead letters: chunks the downstream keeps rejecting, set aside on disk instead of retried
forever (``forward.max_rejects``, ``forward.dead_letter_path``).

One file per chunk, ``<unix ms>-<chunk id hex>.rtdl``: a msgpack map with ``tag``, ``entries``
(the packed entries, or the opaque metrics/traces payload, as bytes), ``count``, ``signal``,
``v2``, ``reason``, ``tries``, ``downstream``, ``chunk_id`` and ``time``. A file is written to a
temporary name, fsync'ed, renamed and its folder fsync'ed, so it exists whole or not at all
before the chunk counts as done. ``ruletag dead-letter list|resend`` reads them back.

Default folder, like Fluent Bit's ``storage.rejected.path`` (``rejected`` under its storage
path): ``<buffer.path>/rejected`` in disk mode, else ``$XDG_STATE_HOME/ruletag/rejected``
(``~/.local/state/ruletag/rejected``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import msgpack

from ruletag.config.model import Config
from ruletag.protocol import Chunk

SUFFIX = ".rtdl"
_FORMAT = 1


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead-lettered chunk read back from its file."""

    path: Path
    chunk: Chunk
    reason: str
    tries: int
    downstream: str
    time: float


def default_dir(buffer_path: str | None = None) -> str:
    """``<buffer_path>/rejected`` when a disk buffer is used, else the user's state folder."""
    if buffer_path:
        return str(Path(buffer_path) / "rejected")
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(state) / "ruletag" / "rejected")


def with_default_dir(config: Config) -> Config:
    """``config`` with ``forward.dead_letter_path`` filled in when it was left unset."""
    fwd = config.forward
    if fwd is None or fwd.dead_letter_path is not None:
        return config
    buffer_path = config.buffer.path if config.buffer is not None and config.buffer.disk else None
    return replace(config, forward=replace(fwd, dead_letter_path=default_dir(buffer_path)))


def write(
    folder: str,
    chunk: Chunk,
    chunk_id: bytes | None,
    *,
    reason: str,
    tries: int,
    downstream: str,
) -> Path:
    """Write ``chunk`` durably into ``folder`` (created if needed); raises OSError."""
    now = time.time()
    ident = (chunk_id or os.urandom(12)).hex()
    body = msgpack.packb(
        {
            "format": _FORMAT,
            "tag": chunk.tag,
            "entries": chunk.entries,
            "count": chunk.count,
            "signal": chunk.signal,
            "v2": chunk.v2,
            "reason": reason,
            "tries": tries,
            "downstream": downstream,
            "chunk_id": ident,
            "time": now,
        },
        use_bin_type=True,
    )
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    final = path / f"{int(now * 1000)}-{ident}{SUFFIX}"
    tmp = final.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    dfd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return final


def read(path: Path) -> DeadLetter:
    """Load one dead-letter file; raises ValueError when it is not one."""
    try:
        data: Any = msgpack.unpackb(path.read_bytes(), raw=False)
    except (msgpack.UnpackException, ValueError) as exc:
        raise ValueError(f"{path}: not a dead-letter file ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise ValueError(f"{path}: not a dead-letter file (unknown format)")
    try:
        chunk = Chunk(
            tag=str(data["tag"]),
            entries=bytes(data["entries"]),
            count=int(data["count"]),
            signal=int(data["signal"]),
            v2=bool(data["v2"]),
        )
        return DeadLetter(
            path=path,
            chunk=chunk,
            reason=str(data["reason"]),
            tries=int(data["tries"]),
            downstream=str(data["downstream"]),
            time=float(data["time"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: incomplete dead-letter file ({exc!r})") from None


def files(folder: str | Path) -> list[Path]:
    """The dead-letter files in ``folder``, oldest first."""
    return sorted(Path(folder).glob(f"*{SUFFIX}"))
