"""The pipeline between the server and the forwarder, and the single ack point.

Ack point (the one written decision): the server acks a chunk upstream only after
``Pipeline.submit(chunk)`` returns, and ``submit`` returns only after every chunk the transform
produced from it was acknowledged by the downstream (``Forwarder.send`` returns on the
downstream ack; with ``forward.require_ack: false`` it returns once the bytes are written).
So an upstream ack means "delivered downstream": end-to-end, at-least-once. If ``submit``
raises, the server sends no ack and closes that connection, so the sender retries.
When the durable buffer arrives, this is the one place that moves the ack point to
"written to the buffer".
"""

from __future__ import annotations

import asyncio
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
        if len(out) == 1:
            await self.forwarder.send(out[0])
        elif out:
            await asyncio.gather(*(self.forwarder.send(c) for c in out))
        self.chunks_out += len(out)
