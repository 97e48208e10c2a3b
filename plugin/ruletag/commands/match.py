"""``ruletag match``: match records from a file against rules, print JSON lines.

``match`` reads JSON lines or a msgpack stream (bare record maps, ``[time, record]`` entries,
or forward-protocol messages: Message, Forward, PackedForward, CompressedPackedForward) and
writes every record as one JSON line, in input order. A record that matched gets the key
``detections`` (a list of :func:`ruletag.enrich.annotate.detection` dicts; the record that
completes an EQL sequence gets a :func:`~ruletag.enrich.annotate.sequence_detection`, with
event time read from the records in file order); a record that matched nothing is written
without that key, as the server leaves unmatched records untouched.
With ``--explain``, a matched record also gets the key ``explain``: per rule that fired, its
traced condition tree (:mod:`ruletag.rules.explain`), so the output stays one JSON line per
record and can be filtered with ``jq``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Protocol

import msgpack
import ujson

from ruletag.commands.rules import read_vars, selection_from_args, summary_line
from ruletag.enrich.annotate import detection, sequence_detection
from ruletag.errors import ConfigError
from ruletag.rules.loader import source_of
from ruletag.rules.select import Selection

# --------------------------------------------------------------------------- match


def _is_time(v: object) -> bool:
    return isinstance(v, int | float | msgpack.ExtType) and not isinstance(v, bool)


def _entry_record(entry: object) -> object | None:
    """``[time, record]`` or ``[[time, metadata], record]`` -> record, else None."""
    if isinstance(entry, list | tuple) and len(entry) == 2:
        head = entry[0]
        if _is_time(head) or (isinstance(head, list | tuple) and head and _is_time(head[0])):
            return entry[1]
    return None


class _Readable(Protocol):
    """What ``msgpack.Unpacker`` reads a stream through: ``read(n)``."""

    def read(self, n: int = -1, /) -> bytes: ...


def _unpacker(data: _Readable | bytes) -> msgpack.Unpacker:
    opts: dict[str, Any] = {
        "raw": False,
        "strict_map_key": False,
        "unicode_errors": "surrogateescape",
        "max_buffer_size": 2**31 - 1,
    }
    if isinstance(data, bytes | bytearray):
        up = msgpack.Unpacker(**opts)
        up.feed(data)
        return up
    return msgpack.Unpacker(data, **opts)


def _packed_entries(payload: bytes | str, options: Mapping[str, Any]) -> Iterator[object]:
    raw = payload.encode("utf-8", "surrogateescape") if isinstance(payload, str) else payload
    if options.get("compressed") == "gzip" or raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)  # handles multi-member payloads too
        except (EOFError, zlib.error) as exc:  # BadGzipFile is an OSError already
            raise ValueError(f"bad gzip payload: {exc}") from exc
    for entry in _unpacker(raw):
        rec = _entry_record(entry)
        if rec is not None:
            yield rec


def records_of(obj: object) -> Iterator[object]:
    """Records in one decoded object: a map, an entry, or a forward-protocol message."""
    if isinstance(obj, Mapping):
        yield obj
        return
    rec = _entry_record(obj)
    if rec is not None:
        yield rec
        return
    if not (isinstance(obj, list | tuple) and len(obj) >= 2 and isinstance(obj[0], str)):
        return  # heartbeat (nil) or something else: no records
    options = obj[-1] if len(obj) in (3, 4) and isinstance(obj[-1], Mapping) else {}
    if options.get("fluent_signal", 0) not in (0, None):
        return  # metrics/traces: no log records
    second = obj[1]
    if _is_time(second) and len(obj) in (3, 4):  # Message [tag, time, record, options?]
        yield obj[2]
    elif isinstance(second, list | tuple):  # Forward [tag, [entries], options?]
        for entry in second:
            rec = _entry_record(entry)
            if rec is not None:
                yield rec
    elif isinstance(second, bytes | str) and len(obj) in (2, 3):  # (Compressed)PackedForward
        yield from _packed_entries(second, options)


def read_events(stream: IO[bytes]) -> Iterator[object]:
    """Every record of a JSON-lines or msgpack stream, in order (the format is sniffed).

    ``stream`` must be a buffered binary file (``open(..., "rb")``, ``sys.stdin.buffer``).
    """
    head = stream.peek(1)[:1]  # type: ignore[attr-defined]
    if not head:
        return
    if head in (b"{", b"[", b" ", b"\t", b"\r", b"\n", b"\xef"):  # JSON lines (maybe a BOM)
        for n, line in enumerate(stream, 1):
            text = line.decode("utf-8-sig" if n == 1 else "utf-8").strip()
            if not text:
                continue
            try:
                obj = ujson.loads(text)
            except ValueError as exc:
                raise ValueError(f"line {n}: not JSON: {exc}") from exc
            yield from records_of(obj)
        return
    counted = _CountingReader(stream)
    unpacker = _unpacker(counted)
    end = 0  # where the last complete object ended (tell() also counts a partial one)
    for obj in unpacker:
        end = unpacker.tell()
        yield from records_of(obj)
    if end != counted.bytes_read:
        raise ValueError(f"msgpack stream truncated: incomplete object after byte {end}")


class _CountingReader:
    """``read`` of a binary stream, counting the bytes handed out."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self.bytes_read = 0

    def read(self, n: int = -1) -> bytes:
        data = self._stream.read(n)
        self.bytes_read += len(data)
        return data


def _json_default(obj: object) -> object:
    if isinstance(obj, bytes | bytearray):
        return bytes(obj).decode("utf-8", "replace")
    return repr(obj)


def dump_record(record: object) -> str:
    """One record as a JSON line (bytes as UTF-8 text, unknown types as their repr)."""
    try:
        return ujson.dumps(
            record, ensure_ascii=False, escape_forward_slashes=False, default=_json_default
        )
    except (OverflowError, UnicodeEncodeError, TypeError):
        return json.dumps(record, ensure_ascii=False, default=_json_default)


def _load_table(
    paths: Sequence[str],
    variables: dict[str, list[str]] | None,
    selection: Selection | None = None,
) -> Any:
    """A table file, or rule files/folders compiled (through the cache) with ``selection``."""
    from ruletag.rules.compiler import load
    from ruletag.rules.loader import compile_rules

    sel = selection or Selection()
    if len(paths) == 1 and Path(paths[0]).is_file() and source_of(Path(paths[0])) is None:
        if sel.key():
            raise ConfigError("rule selection flags need rule files, not a compiled table")
        return load(Path(paths[0]))
    table, result = compile_rules(
        paths,
        variables,
        exclude=sel.exclude,
        building_blocks=sel.building_blocks,
        select=sel.select,
    )
    print(
        f"ruletag: rules: {summary_line(result)}" + (" [cached]" if result.cached else ""),
        file=sys.stderr,
    )
    return table


def match(ns: argparse.Namespace) -> int:
    """Match every record of ``--events`` and print it as JSON, with its detections."""
    from ruletag.rules.matcher import Matcher
    from ruletag.rules.stateful.sequence import SequenceEngine

    variables = read_vars(ns.vars)  # a bad --vars file: ConfigError, exit 2 (cli.main)
    table = _load_table(ns.rules, variables, selection_from_args(ns))
    matcher = Matcher(table)
    # stateful rules (EQL sequences): fed every record in file order, event time from records
    sequences = SequenceEngine.of(table.rules, table.fieldmap)
    annotations = [detection(r) for r in table.rules]
    only = bool(getattr(ns, "only_matches", False))
    explaining = bool(getattr(ns, "explain", False))
    fmap = None
    if explaining:
        from ruletag.commands.explain import explain_hits
        from ruletag.rules.fields import FieldMap

        fmap = FieldMap.default()
    out = sys.stdout
    try:
        src: IO[bytes] = sys.stdin.buffer if ns.events == "-" else open(ns.events, "rb")  # noqa: SIM115
    except OSError as exc:
        print(f"ruletag: {ns.events}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    skipped = 0
    try:
        for record in read_events(src):
            if not isinstance(record, dict):
                skipped += 1
                continue
            hits = matcher.match(record)
            done = sequences.feed(record) if sequences is not None else ()
            if hits or done:
                why = explain_hits(table.rules, hits, record, fmap) if fmap is not None else None
                record["detections"] = [annotations[i] for i in hits] + [
                    sequence_detection(c.rule, c.keys, c.events) for c in done
                ]
                if why is not None:
                    record["explain"] = why
            elif only:
                continue
            out.write(dump_record(record) + "\n")
    except (ValueError, OSError) as exc:  # msgpack errors are ValueErrors
        print(f"ruletag: {ns.events}: {exc}", file=sys.stderr)
        return 1
    finally:
        if src is not sys.stdin.buffer:
            src.close()
    out.flush()
    if skipped:
        print(f"ruletag: skipped {skipped} entries that are not maps", file=sys.stderr)
    return 0
