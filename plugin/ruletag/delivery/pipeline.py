"""The pipeline between the server and the forwarder, and the single ack point.

Ack point (the one written decision): the server acks a chunk upstream only after
``Pipeline.submit(chunk)`` returns, and ``submit`` returns only after every chunk the transform
produced from it was acknowledged by the downstream (``Forwarder.send`` returns on the
downstream ack; with ``forward.require_ack: false`` it returns once the bytes are written).
So an upstream ack means "delivered downstream": end-to-end, at-least-once. If ``submit``
raises, the server sends no ack and closes that connection, so the sender retries.
Disk mode (``buffer: {type: disk}`` / ``--buffer-dir``) moves the ack point to "written and
fsync'ed to the disk buffer": ``ruletag.delivery.durable.DurablePipeline`` has the same ``submit``.

Fairness: both pipelines call the transform through :func:`apply_transform`, which hands a
large chunk to it in slices of whole entries and yields to the event loop between slices, so
other connections' acks are not held up for the whole chunk. A transform must therefore work
entry by entry (as the rule filter does): the output for a chunk equals the outputs for its
slices, one after the other, with adjacent chunks of the same tag joined; a transform that
returns its input unchanged (the very object) for every slice returns the chunk itself.
Slicing costs a copy of the entries and a join of the outputs, so a pipeline's :class:`Pace`
remembers how much CPU its transform takes per byte and hands over whole a chunk that would hold
the loop no longer than :attr:`Pace.BUDGET` (the 1 MB chunks of a relay with a few rules).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Protocol

from ruletag.protocol import Chunk, iter_entries

Transform = Callable[[Chunk], list[Chunk]]

#: A chunk with more entries or bytes than this is transformed in slices of at most this much.
SLICE_ENTRIES = 4096
SLICE_BYTES = 128 * 1024


class Pace:
    """How much CPU a pipeline's transform takes per entry byte, measured on what it was given.

    A rise is taken at once, a fall slowly (an eighth of the way per chunk), so after a reload
    to a heavier rule set at most one chunk is handed over whole on the old figure."""

    #: longest a whole chunk may hold the event loop (a 128 KiB slice with every corpus rule
    #: takes about as long)
    BUDGET = 0.005
    #: smaller pieces are not measured: their time is mostly the per-call cost, which would
    #: make every large chunk look slow
    MIN_BYTES = 64 * 1024

    def __init__(self) -> None:
        self.per_byte: float | None = None  # unknown until measured: slice

    def whole(self, size: int) -> bool:
        """Whether a chunk of ``size`` entry bytes may be transformed in one piece."""
        return self.per_byte is not None and self.per_byte * size <= self.BUDGET

    def observe(self, size: int, seconds: float) -> None:
        if size < self.MIN_BYTES:
            return
        rate = seconds / size
        old = self.per_byte
        self.per_byte = rate if old is None or rate > old else old + (rate - old) / 8


async def apply_transform(
    transform: Transform | None, chunk: Chunk, pace: Pace | None = None
) -> list[Chunk]:
    """``transform(chunk)``, in slices that yield to the event loop when ``chunk`` is large
    (and, given ``pace``, the transform too slow to run it whole within its budget)."""
    if transform is None:
        return [chunk]
    if chunk.signal != 0 or (chunk.count <= SLICE_ENTRIES and len(chunk.entries) <= SLICE_BYTES):
        return _timed(transform, chunk, pace)
    if pace is not None and pace.whole(len(chunk.entries)):
        return _timed(transform, chunk, pace)
    pinned = getattr(transform, "pinned", None)
    if pinned is not None:
        transform = pinned()  # one rule set for every slice, even across a reload
    spans = chunk.spans
    if spans is None:
        spans = await asyncio.to_thread(iter_entries, chunk.entries)
    bounds = slice_bounds(spans)
    if len(bounds) <= 1:
        return transform(chunk)
    outputs: list[list[Chunk]] = []
    unchanged = True
    for n, (first, last) in enumerate(bounds):
        if n:
            await asyncio.sleep(0)
        part = _slice(chunk, spans, first, last)
        out = _timed(transform, part, pace)
        unchanged = unchanged and len(out) == 1 and out[0] is part
        outputs.append(out)
    return [chunk] if unchanged else _join_runs(chunk, outputs)


def _timed(transform: Transform, chunk: Chunk, pace: Pace | None) -> list[Chunk]:
    """``transform(chunk)``, its time per entry byte noted in ``pace``.

    The time is this thread's CPU time, not the wall clock: on a busy host a chunk preempted
    by other processes (or waiting for the GIL) would otherwise look slow, and every such
    outlier sent the chunks after it back to slicing (a third of a seed-rule relay's chunks
    on two busy cores)."""
    if pace is None:
        return transform(chunk)
    t0 = time.thread_time()
    out = transform(chunk)
    pace.observe(len(chunk.entries), time.thread_time() - t0)
    return out


def slice_bounds(spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Entry index ranges ``[first, last)`` of at most ``SLICE_ENTRIES`` / ``SLICE_BYTES``."""
    bounds: list[tuple[int, int]] = []
    first = 0
    total = len(spans)
    while first < total:
        last = min(first + SLICE_ENTRIES, total)
        start = spans[first][0]
        if spans[last - 1][1] - start > SLICE_BYTES:
            lo, hi = first + 1, last  # the largest last with the slice within SLICE_BYTES
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if spans[mid - 1][1] - start <= SLICE_BYTES:
                    lo = mid
                else:
                    hi = mid - 1
            last = lo
        bounds.append((first, last))
        first = last
    return bounds


def _slice(chunk: Chunk, spans: Sequence[tuple[int, int]], first: int, last: int) -> Chunk:
    """The entries ``first`` to ``last - 1`` of ``chunk`` as a chunk of their own."""
    lo, hi = spans[first][0], spans[last - 1][1]
    return replace(
        chunk,
        entries=chunk.entries[lo:hi],
        count=last - first,
        chunk_id=None,
        spans=[(s - lo, e - lo) for s, e in spans[first:last]],
    )


def _join_runs(chunk: Chunk, outputs: list[list[Chunk]]) -> list[Chunk]:
    """The slices' outputs in order, adjacent chunks of one tag joined (no chunk id)."""
    runs: list[tuple[str, list[Chunk]]] = []
    for out in outputs:
        for c in out:
            if runs and runs[-1][0] == c.tag:
                runs[-1][1].append(c)
            else:
                runs.append((c.tag, [c]))
    return [
        replace(
            chunk,
            tag=tag,
            entries=b"".join(c.entries for c in parts),
            chunk_id=None,
            count=sum(c.count for c in parts),
            v2=any(c.v2 for c in parts),
            spans=None,
        )
        for tag, parts in runs
    ]


class Sender(Protocol):
    """What the pipeline needs from a forwarder."""

    async def send(self, chunk: Chunk) -> None: ...


class Pipeline:
    """``submit(chunk)``: transform (sync, e.g. the rule filter), forward, wait for the acks."""

    def __init__(self, forwarder: Sender, transform: Transform | None = None) -> None:
        self.forwarder = forwarder
        self.transform = transform
        self.pace = Pace()
        self.chunks_in = 0
        self.chunks_out = 0

    async def submit(self, chunk: Chunk) -> None:
        """Return once every chunk derived from ``chunk`` is acked downstream."""
        self.chunks_in += 1
        out = await apply_transform(self.transform, chunk, self.pace)
        # Runs cut by re-tagging go one after the other: with several downstream servers,
        # sending them concurrently could let a later run overtake an earlier one.
        for c in out:
            await self.forwarder.send(c)
        self.chunks_out += len(out)
