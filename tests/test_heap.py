"""glibc's malloc arenas: a serve limits them, and a user's MALLOC_ARENA_MAX wins."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from ruletag.heap import ARENAS

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="malloc arenas are glibc's (this libc has none to limit)",
)

#: A process whose 6 threads each call malloc while all are alive (a thread takes an arena of
#: its own while the limit allows), then prints the arena count glibc's malloc_stats reports.
_PROBE = textwrap.dedent(
    """
    import ctypes, sys, threading
    from ruletag.heap import limit_arenas
    print(limit_arenas() if sys.argv[1] == "limit" else None, flush=True)
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    barrier = threading.Barrier(7)
    def work():
        libc.malloc(4096)
        barrier.wait()
        barrier.wait()
    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    barrier.wait()
    libc.malloc_stats()  # to stderr: one "Arena N:" block per arena
    barrier.wait()
    for t in threads:
        t.join()
    """
)


def _arenas(mode: str, env: dict[str, str] | None = None) -> tuple[str, int]:
    full = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    full.update(env or {})
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, mode],
        capture_output=True,
        text=True,
        env=full,
        timeout=60,
        check=True,
    )
    return done.stdout.strip(), sum(line.startswith("Arena ") for line in done.stderr.splitlines())


def test_a_serve_s_threads_share_at_most_arenas_heaps() -> None:
    said, limited = _arenas("limit")
    assert said == "True" and 1 <= limited <= ARENAS
    # without the limit the same threads take more (the comparison the limit is for)
    said, free = _arenas("none")
    assert said == "None" and free > ARENAS


def test_a_user_s_malloc_arena_max_is_left_to_glibc() -> None:
    said, arenas = _arenas("limit", {"MALLOC_ARENA_MAX": "5"})
    assert said == "False" and arenas == 5
