"""``ruletag dead-letter list DIR`` and ``ruletag dead-letter resend DIR --forward H:P``.

``resend`` sends each dead letter with the same :class:`~ruletag.transport.forwarder.Forwarder` as
``serve`` (acks, shared key, TLS from ``--config``), with dead-lettering off and a retry limit,
and deletes a file only once the downstream acked its chunk; what fails stays in the folder.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import sys
from dataclasses import replace
from pathlib import Path

from ruletag.config.load import config_from_cli, load_config
from ruletag.config.model import ForwardConfig
from ruletag.errors import ConfigError, RuletagError
from ruletag.transport import deadletter


def main_dead_letter(ns: argparse.Namespace) -> int:
    """Dispatch ``list`` / ``resend``; exit 0 when every file was read (and resent)."""
    if not Path(ns.dir).is_dir():
        print(f"ruletag: {ns.dir}: no such folder", file=sys.stderr)
        return 2
    if ns.dead_letter_cmd == "list":
        return list_letters(ns.dir)
    from ruletag.runtime.logs import setup_logging

    setup_logging("text", "WARNING")
    return asyncio.run(resend_letters(ns.dir, _forward_config(ns)))


def list_letters(folder: str) -> int:
    """Print one line per dead letter: file, tag, records, signal, tries, time, reason."""
    bad = 0
    paths = deadletter.files(folder)
    for path in paths:
        try:
            dl = deadletter.read(path)
        except (OSError, ValueError) as exc:
            print(f"{path.name}\tunreadable: {exc}")
            bad += 1
            continue
        when = dt.datetime.fromtimestamp(dl.time, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        print(
            f"{path.name}\ttag={dl.chunk.tag}\trecords={dl.chunk.count}\t"
            f"signal={dl.chunk.signal}\ttries={dl.tries}\t{when}\t{dl.reason}"
        )
    print(f"{len(paths)} dead letter(s) in {folder}" + (f", {bad} unreadable" if bad else ""))
    return 1 if bad else 0


def _forward_config(ns: argparse.Namespace) -> ForwardConfig:
    if bool(ns.config) == bool(ns.forward):
        raise ConfigError("dead-letter resend needs one of --config FILE or --forward HOST:PORT")
    if ns.config:
        cfg = load_config(ns.config).forward
        if cfg is None:
            raise ConfigError(f"{ns.config}: has no forward section")
    else:
        forward = config_from_cli(None, ns.forward, ns.shared_key).forward
        assert forward is not None
        cfg = forward
    if ns.retry_limit < 0:
        raise ConfigError("--retry-limit: must be >= 0")
    return replace(cfg, max_rejects=0, retry_limit=ns.retry_limit)


async def resend_letters(folder: str, config: ForwardConfig) -> int:
    """Send every dead letter in ``folder``; delete each file once its chunk was acked."""
    from ruletag.transport.forwarder import Forwarder

    fw = Forwarder(config)
    await fw.start()
    sent = kept = 0
    try:
        for path in deadletter.files(folder):
            try:
                dl = deadletter.read(path)
                await fw.send(dl.chunk)
            except (OSError, ValueError, RuletagError) as exc:
                print(f"{path.name}: kept: {exc}", file=sys.stderr)
                kept += 1
                continue
            path.unlink()
            sent += 1
    finally:
        await fw.close(timeout=2.0)
    _fsync_dir(folder)
    print(f"resent {sent} dead letter(s), {kept} kept in {folder}")
    return 1 if kept else 0


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
