"""Fixtures over the ``support`` package (``tests/support/``): ``arun`` for async scenarios,
``relay`` (an in-process relay), ``serve_process`` (``ruletag serve`` subprocesses), ``certs``,
``node_peers``, ``fm`` (the default field mapping), and the line saying whether the
whole-corpus tests ran.

No pytest-asyncio: async scenarios run through the ``arun`` fixture (``asyncio.run`` with a
hard timeout), and build relays with the ``relay`` fixture (an async context manager factory).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest

from ruletag.rules.fields import FieldMap
from support import paths
from support.paths import JS_DIR
from support.servers import (
    Certs,
    Relay,
    ServeProcess,
    make_certs,
    require,
    start_relay,
    start_serve,
)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line when the whole-corpus tests were skipped: how to run them."""
    skipped = terminalreporter.stats.get("skipped", [])
    count = sum("whole-corpus test" in str(getattr(r, "longrepr", "")) for r in skipped)
    if count:
        terminalreporter.write_line(
            f"{count} whole-corpus tests not run ({paths.CORPUS_ENV} unset; the pinned sample in "
            f"tests/data/corpus ran instead). Run them with: {paths.CORPUS_HOWTO}"
        )


def run_async(coro: Coroutine[Any, Any, Any], timeout: float = 30.0) -> Any:
    """Run ``coro`` in a fresh event loop, failing the test after ``timeout`` seconds."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture
def arun() -> Callable[..., Any]:
    """``arun(coro, timeout=30)``: run an async scenario from a sync test."""
    return run_async


@pytest.fixture(scope="session")
def fm() -> FieldMap:
    """The default field mapping."""
    return FieldMap.default()


@pytest.fixture
def relay() -> Callable[..., contextlib.AbstractAsyncContextManager[Relay]]:
    """``async with relay(listen={...}, forward={...}) as r``: see ``start_relay``."""
    return start_relay


def node_available() -> bool:
    return shutil.which("node") is not None and (JS_DIR / "node_modules").is_dir()


@pytest.fixture
def node_peers() -> None:
    """The npm test peers (node and tests/js/node_modules) must be installed."""
    require(node_available(), "node or tests/js/node_modules is missing")


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """Self-signed server and client certificates (see ``support.servers.make_certs``)."""
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def serve_process() -> Iterator[Callable[[list[str]], ServeProcess]]:
    """Factory for ``ruletag serve`` subprocesses; each is killed at teardown if still up."""
    started: list[ServeProcess] = []

    def factory(args: list[str]) -> ServeProcess:
        sp = start_serve(args)
        started.append(sp)
        return sp

    yield factory
    for sp in started:
        if sp.proc.poll() is None:
            sp.proc.kill()
            sp.proc.wait(5)
