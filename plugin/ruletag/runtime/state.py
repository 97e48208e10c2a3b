"""Checkpoints of the stateful rules' state (partial sequences, threshold counts).

:class:`StateStore` writes the live :class:`~ruletag.enrich.stateful.StatefulStage`'s
``snapshot()`` to ``<folder>/state.json`` every ``snapshot_interval`` seconds and at shutdown,
and loads it back into the stage at start (only rules whose id and definition are unchanged
get their state back). The snapshot is taken on the event loop, between chunks, so it is
consistent; the JSON is written in a thread, atomically: a temporary file, fsync, rename,
fsync of the folder. A crash (kill -9) loses at most the state changes of the last interval;
a file that cannot be read is set aside as ``state.json.bad`` and the relay starts empty.

The folder is ``state.path``, else ``<buffer.path>/state`` with a disk buffer, else there is
no checkpoint and the state is lost at restart (:func:`state_folder`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ruletag.config.model import DEFAULT_SNAPSHOT_INTERVAL, Config

if TYPE_CHECKING:
    from ruletag.enrich.stateful import StatefulStage

log = logging.getLogger(__name__)

FILE = "state.json"
FORMAT = "ruletag-state"


def state_folder(config: Config) -> tuple[Path | None, float]:
    """The checkpoint folder of ``config`` (None: no checkpoints) and the interval."""
    if config.state is not None:
        return Path(config.state.path or ""), config.state.snapshot_interval
    if config.buffer is not None and config.buffer.disk and config.buffer.path:
        return Path(config.buffer.path) / "state", DEFAULT_SNAPSHOT_INTERVAL
    return None, DEFAULT_SNAPSHOT_INTERVAL


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StateStore:
    """Periodic, atomic checkpoints of ``stage()`` in ``folder`` (see the module docstring)."""

    def __init__(
        self,
        folder: Path,
        stage: Callable[[], StatefulStage | None],
        interval: float = DEFAULT_SNAPSHOT_INTERVAL,
    ) -> None:
        self.path = folder / FILE
        self.stage = stage
        self.interval = interval
        self.snapshots = 0  # checkpoints written
        self.failures = 0  # checkpoints that could not be written
        self.last_bytes = 0  # size of the last checkpoint
        self.restored_rules = 0
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def restore(self) -> int:
        """Load the checkpoint into the stage (call before traffic); rules restored."""
        stage = self.stage()
        if stage is None or not self.path.exists():
            return 0
        try:
            data = json.loads(self.path.read_bytes())
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise ValueError("not a ruletag state file")
            self.restored_rules = stage.restore(data["stage"])
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            bad = self.path.with_name(FILE + ".bad")
            log.error("state: %s unreadable (%s); set aside as %s", self.path, exc, bad.name)
            with contextlib.suppress(OSError):
                os.replace(self.path, bad)
            return 0
        log.info(
            "state: restored %d stateful rules from %s (saved %s)",
            self.restored_rules,
            self.path,
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(data.get("saved_at", 0))),
        )
        return self.restored_rules

    async def save(self) -> bool:
        """Write one checkpoint now (the snapshot taken on the loop); True if written."""
        stage = self.stage()
        if stage is None:
            return False
        async with self._lock:
            doc: dict[str, Any] = {
                "format": FORMAT,
                "saved_at": time.time(),
                "stage": stage.snapshot(),
            }
            try:
                size = await asyncio.to_thread(self._write, doc)
            except (OSError, ValueError, TypeError) as exc:
                self.failures += 1
                log.error("state: checkpoint to %s failed: %s", self.path, exc)
                return False
            self.snapshots += 1
            self.last_bytes = size
            return True

    def _write(self, doc: dict[str, Any]) -> int:
        data = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
        _write_atomic(self.path, data)
        return len(data)

    def start(self) -> None:
        """Checkpoint every ``interval`` seconds from now on."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.save()

    async def stop(self) -> None:
        """Stop the periodic checkpoints and write a last one."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.save()
