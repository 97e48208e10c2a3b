"""``ruletag match --workers N``: JSON lines matched by N forked processes, written in order.

The parent reads the input in blocks of whole lines (``ruletag.commands.match.json_pieces``)
and hands each to a worker with the number of its first line. A worker is forked after the
table, the kept tuned filter and the match context are loaded, so it starts from them
without reading anything; it packs, matches and renders its block as ``ruletag match`` does
in one process (``MatchContext.render_block``, handed in as ``render``), and sends back the
JSON lines. The parent writes the
blocks in input order, so the output is byte for byte what one process writes. At most
``2 * N`` blocks are in flight: a long input is never held in memory.

A bad line stops the run as in one process: the lines before it are written, then the error
(with its line number in the whole input). A worker that dies (killed, out of memory) stops it
too: the blocks before the one it held are written, then the error. Stateful rules need every
record in file order in one process; ``ruletag match`` does not come here when any is loaded.

Without a kept tuned filter, the parent matches the first blocks itself until its pre-filter
has re-tuned on them (as one process does), and forks the workers after: they start from
its tuned filter rather than each tune on its share (two tunings at once on two cores made a
first run slower than one process). The workers are forked once no other thread runs.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

#: a block of whole lines and the number of its first line -> (its output, entries skipped as
#: not maps, the error that stopped it or None)
Render = Callable[[bytes, int], tuple[bytes, int, "str | None"]]

#: what the workers render blocks with (set in the parent before they are forked)
_RENDER: Render | None = None


def fork_available() -> bool:
    """Whether workers can be forked here (not on Windows; macOS can, Python's default there
    is spawn)."""
    return "fork" in multiprocessing.get_all_start_methods()


def _work(block: bytes, first_line: int) -> tuple[bytes, int, str | None]:
    """In a worker: ``block`` rendered (see :data:`Render`)."""
    render = _RENDER
    assert render is not None, "forked without a renderer"
    return render(block, first_line)


def _alone(timeout: float = 30.0) -> None:
    """Wait (at most ``timeout`` s) until the main thread is the only one: the tuning thread
    ends just after its filter is swapped in, and a fork copies no thread but the caller."""
    deadline = time.monotonic() + timeout
    while threading.active_count() > 1 and time.monotonic() < deadline:
        time.sleep(0.005)


def run(
    render: Render,
    tuning: Callable[[], bool],
    pieces: Iterator[bytes],
    write: Callable[[bytes], object],
    workers: int,
) -> tuple[int, str | None]:
    """Render ``pieces`` (blocks of whole lines of the input) in ``workers`` processes and
    ``write`` the output in order, the parent rendering alone while ``tuning()``; (entries
    skipped as not maps, the error that stopped the input or None)."""
    global _RENDER
    _RENDER = render
    try:
        skipped, line = 0, 1
        while tuning():  # the parent tunes first (see the module docstring)
            piece = next(pieces, None)
            if piece is None:
                return skipped, None
            data, n, error = _work(piece, line)
            write(data)
            skipped += n
            line += piece.count(b"\n")
            if error is not None:
                return skipped, error
        _alone()
        n, error = _in_workers(pieces, line, write, workers)
        return skipped + n, error
    finally:
        _RENDER = None


def _in_workers(
    pieces: Iterator[bytes], line: int, write: Callable[[bytes], object], workers: int
) -> tuple[int, str | None]:
    """:func:`run`'s pool: ``pieces`` (the first of them at ``line``) rendered by forked
    workers, written in order; (entries skipped, the error that stopped them or None)."""
    skipped = 0
    error: str | None = None
    pending: deque[Future[tuple[bytes, int, str | None]]] = deque()

    def write_oldest() -> str | None:
        nonlocal skipped
        data, n, err = pending.popleft().result()
        write(data)
        skipped += n
        return err

    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
    try:
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
        pool.shutdown(wait=True, cancel_futures=True)
    return skipped, error
