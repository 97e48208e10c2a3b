"""``ruletag match --workers N``: JSON lines matched by N forked processes, written in order.

The parent reads the input in blocks of whole lines (:func:`~ruletag.commands.match.json_pieces`)
and hands each to a worker with the number of its first line. A worker is forked after the
table, the kept tuned filter and the :class:`~ruletag.commands.match.MatchContext` are loaded,
so it starts from them without reading anything; it packs, matches and renders its block as
``ruletag match`` does in one process, and sends back the JSON lines. The parent writes the
blocks in input order, so the output is byte for byte what one process writes. At most
``2 * N`` blocks are in flight: a long input is never held in memory.

A bad line stops the run as in one process: the lines before it are written, then the error
(with its line number in the whole input). A worker that dies (killed, out of memory) stops it
too: the blocks before the one it held are written, then the error. Stateful rules need every
record in file order in one process; :func:`~ruletag.commands.match.match` does not come here
when any is loaded.

Without a kept tuned filter, the parent matches the first blocks itself until its pre-filter
has re-tuned on them (as one process does), and forks the workers after: they start from
its tuned filter rather than each tune on its share (two tunings at once on two cores made a
first run slower than one process). The workers are forked once no other thread runs.
"""

from __future__ import annotations

import io
import multiprocessing
import threading
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from ruletag.commands.match import MatchContext, Sink

#: the context the workers inherit (set in the parent before they are forked)
_CTX: MatchContext | None = None


def fork_available() -> bool:
    """Whether workers can be forked here (not on Windows; macOS can, Python's default there
    is spawn)."""
    return "fork" in multiprocessing.get_all_start_methods()


def _work(block: bytes, first_line: int) -> tuple[bytes, int, str | None]:
    """In a worker: the JSON lines of ``block`` (whose first line is ``first_line`` of the
    input), the entries skipped as not maps, and the error that stopped the block."""
    from ruletag.commands.match import BATCH, json_batches

    ctx = _CTX
    assert ctx is not None, "forked without a match context"
    skipped = ctx.skipped
    parts: list[bytes] = []
    error: str | None = None
    try:
        for batch in json_batches(io.BytesIO(block), BATCH, first_line):
            parts.append(ctx.render_batch(batch, ctx.match_batch(batch)))
    except ValueError as exc:
        error = str(exc)
    return b"".join(parts), ctx.skipped - skipped, error


def _tuning(ctx: MatchContext) -> bool:
    """Whether the pre-filter is still to re-tune itself on this input."""
    raw = ctx.matcher.raw
    return raw is not None and raw.tune_after > 0


def _alone(timeout: float = 30.0) -> None:
    """Wait (at most ``timeout`` s) until the main thread is the only one: the tuning thread
    ends just after its filter is swapped in, and a fork copies no thread but the caller."""
    deadline = time.monotonic() + timeout
    while threading.active_count() > 1 and time.monotonic() < deadline:
        time.sleep(0.005)


def run(ctx: MatchContext, src: IO[bytes], out: Sink, workers: int) -> tuple[int, str | None]:
    """Match the JSON lines of ``src`` in ``workers`` processes, write them to ``out`` in
    order; (entries skipped as not maps, the error that stopped the input or None)."""
    from ruletag.commands.match import json_pieces

    global _CTX
    _CTX = ctx
    skipped = 0
    line = 1
    pieces = json_pieces(src)
    try:
        while _tuning(ctx):  # the parent tunes first (see the module docstring)
            piece = next(pieces, None)
            if piece is None:
                return skipped, None
            data, n, error = _work(piece, line)
            out.write(data)
            skipped += n
            line += piece.count(b"\n")
            if error is not None:
                return skipped, error
    finally:
        _CTX = None
    _alone()
    _CTX = ctx
    error = None
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
    try:
        pending: deque[Future[tuple[bytes, int, str | None]]] = deque()

        def write_oldest() -> str | None:
            nonlocal skipped
            data, n, err = pending.popleft().result()
            out.write(data)
            skipped += n
            return err

        for piece in pieces:
            pending.append(pool.submit(_work, piece, line))
            line += piece.count(b"\n")
            while len(pending) >= 2 * workers and error is None:
                error = write_oldest()
            if error is not None:
                break
        while pending and error is None:
            error = write_oldest()
    except BrokenProcessPool as exc:  # killed (out of memory, a signal): the rest is lost
        error = f"a worker process died, the input was not read to its end ({exc})"
    finally:
        _CTX = None
        pool.shutdown(wait=True, cancel_futures=True)
    return skipped, error
