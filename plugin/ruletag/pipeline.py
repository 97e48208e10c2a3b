"""The pipeline between the server and the forwarder, and the single ack point.

Ack point (the one written decision): the server acks a chunk upstream only after
``Pipeline.submit(chunk)`` returns, and ``submit`` returns only after every chunk the transform
produced from it was acknowledged by the downstream (``Forwarder.send`` returns on the
downstream ack; with ``forward.require_ack: false`` it returns once the bytes are written).
So an upstream ack means "delivered downstream": end-to-end, at-least-once. If ``submit``
raises, the server sends no ack and closes that connection, so the sender retries.
Disk mode (``buffer: {type: disk}`` / ``--buffer-dir``) moves the ack point to "written and
fsync'ed to the disk buffer": ``ruletag.durable.DurablePipeline`` has the same ``submit``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from ruletag.events import Chunk

Transform = Callable[[Chunk], list[Chunk]]


class Sender(Protocol):
    """What the pipeline needs from a forwarder."""

    async def send(self, chunk: Chunk) -> None: ...


class Pipeline:
    """``submit(chunk)``: transform (sync, e.g. the rule filter), forward, wait for the acks."""

    def __init__(self, forwarder: Sender, transform: Transform | None = None) -> None:
        self.forwarder = forwarder
        self.transform = transform
        self.chunks_in = 0
        self.chunks_out = 0

    async def submit(self, chunk: Chunk) -> None:
        """Return once every chunk derived from ``chunk`` is acked downstream."""
        self.chunks_in += 1
        out = [chunk] if self.transform is None else self.transform(chunk)
        # Runs cut by re-tagging go one after the other: with several downstream servers,
        # sending them concurrently could let a later run overtake an earlier one.
        for c in out:
            await self.forwarder.send(c)
        self.chunks_out += len(out)
