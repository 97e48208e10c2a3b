"""``ruletag match``: match records from a file against rules, print JSON lines.

``match`` reads JSON lines or a msgpack stream (bare record maps, ``[time, record]`` entries,
or forward-protocol messages: Message, Forward, PackedForward, CompressedPackedForward) and
writes every record as one JSON line, in input order. A record that matched gets the key
``detections`` (a list of :func:`ruletag.enrich.annotate.detection` dicts; the record that
completes an EQL sequence gets a :func:`~ruletag.enrich.annotate.sequence_detection`, the
record that reaches an Elastic threshold a :func:`~ruletag.enrich.annotate.threshold_detection`,
with event time read from the records in file order; the record that shows a new_terms
combination first a :func:`~ruletag.enrich.annotate.new_terms_detection` (after each rule's
learning period unless ``--new-terms-no-learning``); an EQL sample a
:func:`~ruletag.enrich.annotate.sample_detection`) and is written re-serialised; a record that
matched nothing is written without that key, as the server leaves unmatched records untouched:
a JSON object that was alone on its input line is written as that line (surrounding whitespace
and a BOM removed, its bytes unchanged), any other record as JSON. With ``--explain``, a matched
record also gets the key ``explain``: per rule that fired, its traced condition tree
(:mod:`ruletag.rules.explain`), so the output stays one JSON line per
record and can be filtered with ``jq``. An EQL sequence with missing events ``![...]`` is
confirmed once event time (minus ``--lateness``) has passed its window: the record that moved
it carries the annotation, and those still waiting at the end of the input are written as one
extra line ``{"end_of_input": true, "detections": [...]}`` (docs/rules.md "Missing events").

Records are handled in batches (:data:`BATCH`): packed once into msgpack entries and matched
with :meth:`~ruletag.rules.matcher.Matcher.match_entries` as the relay matches a chunk (the
raw pre-filter lets most records through undecoded, and re-tunes itself on long inputs), then
written to stdout as one block. JSON lines holding one object each are packed straight from
their text in C (:data:`json_block`) and only parsed when they are written with detections or
fed to a stateful rule; other lines, and every line without the C helpers, are parsed with
``ujson`` and packed with msgpack. ``--no-prefilter`` matches every decoded record with
:meth:`~ruletag.rules.matcher.Matcher.match` instead; the output is the same.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import sys
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

import msgpack
import ujson

from ruletag.commands.explain import explain_hits
from ruletag.commands.rules import read_vars, selection_from_args, summary_line
from ruletag.config.model import DEFAULT_TUNE_AFTER
from ruletag.enrich.annotate import detection, stateful_detection
from ruletag.enrich.filter import Annotations
from ruletag.errors import ConfigError
from ruletag.rules.compiler.rulelist import stateful_rules
from ruletag.rules.fields import FieldMap
from ruletag.rules.fingerprint import default_cache_dir, tuned_path
from ruletag.rules.loader import source_of
from ruletag.rules.matcher import Matcher
from ruletag.rules.native import native_module
from ruletag.rules.select import Selection
from ruletag.rules.stateful import Clocked, Engine, stateful_engines
from ruletag.rules.stateful.newterms import configure_new_terms, learning_note

# --------------------------------------------------------------------------- match

#: Records read, matched and written at a time.
BATCH = 4096


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
    for batch in read_batches(stream):
        for i in range(len(batch)):
            yield batch.record(i)


#: what :attr:`Batch.parsed` holds for a record not parsed yet (it was packed in C)
_UNPARSED = object()
#: the first bytes of a JSON-lines input (a BOM's first byte included)
_JSON_START = (b"{", b"[", b" ", b"\t", b"\r", b"\n", b"\xef")
_BOM = b"\xef\xbb\xbf"
#: bytes read from a JSON-lines stream at a time (at most: what the stream has ready)
_BLOCK = 1 << 20

_native = native_module()
#: ``json_block(data, start, end, most, base) -> (entries, spans, lines, nlines, stop)``: the
#: JSON lines of ``data[start:end]`` that hold one object each, packed as msgpack entries
#: ``[0, record]`` (the bytes msgpack gives for what ujson parses from the line; spans counted
#: from ``base``), up to ``most`` records or the first line it leaves to ujson (floats,
#: duplicate keys, other JSON, bad input), which starts at ``stop``; ``nlines``: lines read
#: (blank ones too). None without the C helpers: every line is parsed with ujson.
json_block: Callable[..., tuple[bytes, list[tuple[int, int]], list[bytes], int, int]] | None = (
    None if _native is None else _native.json_block
)


@dataclass
class Batch:
    """Consecutive records of the input.

    ``parsed[i]``: record ``i``, or :data:`_UNPARSED` until :meth:`record` parses its line
    (a record packed in C is only parsed when it is written with detections or fed to a
    stateful rule); ``lines[i]``: the JSON line it was read from when it was a bare map on its
    own line (None otherwise); ``packed``: runs of consecutive records packed in C, as (index
    of the first, their msgpack entries ``[0, record]``, each one's span in the entries of
    every run joined); ``packed_bytes``: the length of those.
    """

    parsed: list[object] = field(default_factory=list)
    lines: list[bytes | None] = field(default_factory=list)
    packed: list[tuple[int, bytes, list[tuple[int, int]]]] = field(default_factory=list)
    packed_bytes: int = 0
    packed_records: int = 0

    def __len__(self) -> int:
        return len(self.parsed)

    def add(self, record: object, line: bytes | None = None) -> None:
        """Append a parsed record (and the JSON line it was alone on)."""
        self.parsed.append(record)
        self.lines.append(line)

    def add_packed(self, entries: bytes, spans: list[tuple[int, int]], lines: list[bytes]) -> None:
        """Append records packed in C: their entries, spans (from :attr:`packed_bytes` on)
        and JSON lines."""
        self.packed.append((len(self.parsed), entries, spans))
        self.packed_bytes += len(entries)
        self.packed_records += len(spans)
        self.parsed.extend([_UNPARSED] * len(lines))
        self.lines.extend(lines)

    def all_packed(self) -> bool:
        """Whether every record was packed in C."""
        return self.packed_records == len(self.parsed)

    def record(self, i: int) -> object:
        """Record ``i``, parsed from its line on first use."""
        rec = self.parsed[i]
        if rec is _UNPARSED:
            line = self.lines[i]
            assert line is not None
            rec = self.parsed[i] = ujson.loads(line)
        return rec

    def is_map(self, i: int) -> bool:
        """Whether record ``i`` is a map (without parsing it)."""
        rec = self.parsed[i]
        return rec is _UNPARSED or isinstance(rec, dict)

    @property
    def records(self) -> list[object]:
        """Every record, parsed."""
        return [self.record(i) for i in range(len(self.parsed))]


def read_batches(stream: IO[bytes], size: int = BATCH) -> Iterator[Batch]:
    """The records of a JSON-lines or msgpack stream (sniffed), about ``size`` at a time.

    A stream that breaks off (bad JSON line, cut msgpack object) first yields the records read
    before the fault, then raises ValueError.
    """
    head = stream.peek(1)[:1]  # type: ignore[attr-defined]
    if not head:
        return
    if head in _JSON_START:
        yield from json_batches(stream, size)
        return
    batch = Batch()
    try:
        counted = _CountingReader(stream)
        unpacker = _unpacker(counted)
        end = 0  # where the last complete object ended (tell() also counts a partial one)
        for obj in unpacker:
            end = unpacker.tell()
            for rec in records_of(obj):
                batch.add(rec)
            if len(batch) >= size:
                yield batch
                batch = Batch()
        if end != counted.bytes_read:
            raise ValueError(f"msgpack stream truncated: incomplete object after byte {end}")
    except ValueError:
        if len(batch):
            yield batch  # what was read before the fault is still written
        raise
    if len(batch):
        yield batch


def _blocks(stream: IO[bytes]) -> Iterator[tuple[bytes, int]]:
    """The stream in blocks: (data, end), ``data[:end]`` whole lines (the last one may lack
    its newline at the end of the stream)."""
    read = getattr(stream, "read1", stream.read)
    pending: list[bytes] = []  # the start of a line that has not ended yet
    while True:
        data = read(_BLOCK)
        if not data:
            break
        cut = data.rfind(b"\n") + 1
        if not cut:
            pending.append(data)
            continue
        if pending:
            yield b"".join([*pending, data[:cut]]), -1
            pending = []
        else:
            yield data, cut
        if cut < len(data):
            pending.append(data[cut:])
    if pending:
        yield b"".join(pending), -1


def json_pieces(stream: IO[bytes]) -> Iterator[bytes]:
    """A JSON-lines stream in pieces of about a block (:data:`_BLOCK`), each whole lines
    (the last one may lack its newline at the end of the stream)."""
    for data, cut in _blocks(stream):
        yield data if cut < 0 or cut == len(data) else data[:cut]


def json_batches(stream: IO[bytes], size: int, first_line: int = 1) -> Iterator[Batch]:
    """:func:`read_batches` of a JSON-lines stream: runs of object lines packed in C
    (:data:`json_block`), any other line parsed with ujson. ``first_line``: the number of the
    stream's first line in the input (errors name lines by it; a BOM is only taken off line
    1)."""
    batch = Batch()
    n = first_line - 1  # lines read
    try:
        for block, cut in _blocks(stream):
            pos, end = 0, len(block) if cut < 0 else cut
            while pos < end:
                if json_block is not None and (n or not block.startswith(_BOM)):
                    entries, spans, lines, k, pos = json_block(
                        block, pos, end, size - len(batch), batch.packed_bytes
                    )
                    n += k
                    if spans:
                        batch.add_packed(entries, spans, lines)
                    if len(batch) >= size:
                        yield batch
                        batch = Batch()
                        continue
                    if pos >= end:
                        break
                nl = block.find(b"\n", pos, end)
                stop = end if nl < 0 else nl + 1
                line = block[pos:stop]
                pos = stop
                n += 1
                if n == 1 and line.startswith(_BOM):
                    line = line[3:]
                text = line.strip()
                if not text:
                    continue
                try:
                    obj = ujson.loads(text)
                except ValueError as exc:
                    raise ValueError(f"line {n}: not JSON: {exc}") from exc
                if isinstance(obj, dict):
                    batch.add(obj, text)
                else:
                    for rec in records_of(obj):
                        batch.add(rec)
                if len(batch) >= size:
                    yield batch
                    batch = Batch()
    except ValueError:
        if len(batch):
            yield batch  # what was read before the fault is still written
        raise
    if len(batch):
        yield batch


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


class MatchContext:
    """Matches batches of records and renders them as JSON lines.

    ``prefilter``: pack the records into msgpack entries and match them with
    :meth:`~ruletag.rules.matcher.Matcher.match_entries` (the raw pre-filter skips most of
    them undecoded), like the relay; False: :meth:`~ruletag.rules.matcher.Matcher.match`
    on every record. Both give the same matches.
    """

    def __init__(
        self,
        matcher: Matcher,
        table: Any,
        *,
        prefilter: bool = True,
        only_matches: bool = False,
        explain: bool = False,
        engines: Sequence[Engine] = (),
    ) -> None:
        self.matcher = matcher
        self.engines = list(engines)
        #: per engine, record index -> its step hits, when the raw pre-filter found them
        #: (None: unknown, the engine matches each record itself)
        self._step_hits: list[dict[int, list[int]] | None] = [None] * len(self.engines)
        #: per engine, itself when its results may wait for event time (missing events)
        self._clocked: list[Clocked | None] = [
            e if isinstance(e, Clocked) else None for e in self.engines
        ]
        self.rules = table.rules
        self.annotations = Annotations(lambda i: detection(self.rules[i]))  # made when matched
        self.prefilter = prefilter
        self.only_matches = only_matches
        self.fmap: FieldMap | None = None
        if explain:
            self.fmap = FieldMap.default()
        self.skipped = 0  # records that are not maps
        self._pack = msgpack.Packer(use_bin_type=True).pack

    def match_batch(self, batch: Batch) -> dict[int, list[int]]:
        """Record index in ``batch`` -> the indexes of the rules it matches (matched only)."""
        match = self.matcher.match
        self._step_hits = [None] * len(self.engines)
        if not self.prefilter:
            out: dict[int, list[int]] = {}
            for i in range(len(batch)):
                if batch.is_map(i):
                    rec = batch.record(i)
                    assert isinstance(rec, dict)
                    got = match(rec)
                    if got:
                        out[i] = got
            return out
        buf, spans, where, packed, alone = self._entries(batch)
        # records packed here from what was parsed: what decoding their entries would give,
        # so none is decoded
        hits = self.matcher.match_entries(buf, spans, packed)
        out = hits if where is None else {where[k]: got for k, got in hits.items()}
        out.update((i, got) for i, got in alone.items() if got)
        if not alone:
            for n, engine in enumerate(self.engines):
                steps = engine.step_hits(buf, spans)
                if steps is not None:
                    self._step_hits[n] = (
                        steps if where is None else {where[k]: got for k, got in steps.items()}
                    )
        return out

    def _entries(
        self, batch: Batch
    ) -> tuple[
        bytes,
        list[tuple[int, int]],
        list[int] | None,
        list[dict[str, Any]] | None,
        dict[int, list[int]],
    ]:
        """The maps of ``batch`` as msgpack entries ``[0, record]``: (entries, their spans,
        entry index -> record index (None: the same), the records when every entry was
        packed here from a parsed one (None: read them from their bytes), record index ->
        matches of those msgpack cannot hold, matched as parsed)."""
        if batch.all_packed():  # every record packed in C, as it was read
            if len(batch.packed) == 1:
                return batch.packed[0][1], batch.packed[0][2], None, None, {}
            every: list[tuple[int, int]] = []
            for _, _, run_spans in batch.packed:
                every += run_spans
            return b"".join([run[1] for run in batch.packed]), every, None, None, {}
        runs = {first: (entries, spans) for first, entries, spans in batch.packed}
        pack = self._pack
        match = self.matcher.match
        parsed = batch.parsed
        parts: list[bytes] = []
        spans = []
        where: list[int] = []
        packed: list[dict[str, Any]] | None = []  # entry index -> its record, as parsed
        alone: dict[int, list[int]] = {}
        pos = 0
        i = 0
        while i < len(parsed):
            run = runs.get(i)
            if run is not None:  # records packed in C
                data, run_spans = run
                shift = pos - run_spans[0][0]
                spans.extend([(s + shift, e + shift) for s, e in run_spans])
                where.extend(range(i, i + len(run_spans)))
                i += len(run_spans)
                packed = None  # the entries are read from their bytes
            else:
                rec = parsed[i]
                i += 1
                if not isinstance(rec, dict):
                    continue
                try:
                    data = pack([0, rec])
                except (OverflowError, ValueError, TypeError):  # huge int, lone surrogate
                    alone[i - 1] = match(rec)
                    continue
                spans.append((pos, pos + len(data)))
                where.append(i - 1)
                if packed is not None:
                    packed.append(rec)
            parts.append(data)
            pos += len(data)
        return b"".join(parts), spans, where, packed, alone

    def render_batch(self, batch: Batch, hits: Mapping[int, list[int]]) -> bytes:
        """The JSON lines of ``batch``: matched records with ``detections`` (and ``explain``),
        the others as they came (a bare-map JSON line unchanged) unless ``only_matches``."""
        out: list[bytes | None]
        if not self.engines and batch.all_packed():  # only the matched records are parsed
            if self.only_matches:
                out = [self._render(batch, k, hits[k], []) for k in sorted(hits)]
            else:
                out = list(batch.lines)
                for k, got in hits.items():
                    out[k] = self._render(batch, k, got, [])
        else:
            out = []
            add = out.append
            lines = batch.lines
            for i in range(len(batch)):
                if not batch.is_map(i):
                    self.skipped += 1
                    continue
                found = hits.get(i) or ()
                done = self.stateful(batch, i) if self.engines else []
                if found or done:
                    add(self._render(batch, i, found, done))
                elif self.only_matches:
                    continue
                else:
                    line = lines[i]
                    add(line if line is not None else _utf8(dump_record(batch.record(i))))
        if not out:
            return b""
        out.append(b"")
        return b"\n".join(out)  # type: ignore[arg-type]  # every line is set

    def render_block(self, block: bytes, first_line: int) -> tuple[bytes, int, str | None]:
        """The JSON lines of ``block`` (whole lines, the first of them ``first_line`` of the
        input) matched and rendered: (the output, entries skipped as not maps, the error that
        stopped the block or None). What a ``--workers`` process does with a block."""
        skipped = self.skipped
        parts: list[bytes] = []
        error: str | None = None
        try:
            for batch in json_batches(io.BytesIO(block), BATCH, first_line):
                parts.append(self.render_batch(batch, self.match_batch(batch)))
        except ValueError as exc:
            error = str(exc)
        return b"".join(parts), self.skipped - skipped, error

    def tuning(self) -> bool:
        """Whether the pre-filter is still to re-tune itself on this input (never with
        ``prefilter`` off)."""
        raw = self.matcher.raw
        return self.prefilter and raw is not None and raw.tune_after > 0

    def _render(
        self, batch: Batch, i: int, found: Sequence[int], done: list[dict[str, Any]]
    ) -> bytes:
        """Record ``i`` of ``batch`` with its detections (and ``explain``), as a JSON line."""
        record = batch.record(i)
        assert isinstance(record, dict)
        fmap = self.fmap
        why = explain_hits(self.rules, found, record, fmap) if fmap is not None else None
        record["detections"] = [self.annotations[k] for k in found] + done
        if why is not None:
            record["explain"] = why
        return _utf8(dump_record(record))

    def stateful(self, batch: Batch, i: int) -> list[dict[str, Any]]:
        """The stateful detections record ``i`` of ``batch`` completes, engine by engine. An
        engine whose step hits the batch's raw pre-filter found sees only the records that hit
        a step (the others are not parsed for it)."""
        out: list[dict[str, Any]] = []
        for engine, steps, clocked in zip(
            self.engines, self._step_hits, self._clocked, strict=True
        ):
            if steps is None:
                done = engine.feed(_as_map(batch.record(i)))
            elif i in steps:
                done = engine.feed(_as_map(batch.record(i)), steps[i])
            elif clocked is not None and clocked.pending():
                done = clocked.observe(_as_map(batch.record(i)))  # may release results
            else:
                continue
            out.extend(stateful_detection(r) for r in done)
        return out

    def finish(self) -> bytes:
        """End of input: the results still waiting for event time (EQL missing events),
        decided now, as one extra JSON line ``{"end_of_input": true, "detections": [...]}``;
        empty when there are none."""
        done: list[dict[str, Any]] = []
        for clocked in self._clocked:
            if clocked is not None:
                done.extend(stateful_detection(r) for r in clocked.flush())
        if not done:
            return b""
        return _utf8(dump_record({"end_of_input": True, "detections": done})) + b"\n"


def _as_map(record: object) -> Mapping[str, object]:
    assert isinstance(record, dict)
    return record


def _utf8(text: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError:  # msgpack strings decoded with surrogateescape: bytes back
        return text.encode("utf-8", "surrogateescape")


def match(ns: argparse.Namespace) -> int:
    """Match every record of ``--events`` and print it as JSON, with its detections."""
    variables = read_vars(ns.vars)  # a bad --vars file: ConfigError, exit 2 (cli.main)
    asked = _worker_count(ns)
    table = _load_table(ns.rules, variables, selection_from_args(ns))
    # re-tunes its pre-filter on long inputs, like the relay, and starts from the filter an
    # earlier run tuned for this table: a batch job waits for that file (read on a thread
    # while the stateful engines load) rather than match its first records untuned
    matcher = Matcher(table, _tune_after(ns), tuned_path(default_cache_dir(), table.version))
    engines = stateful_engines(stateful_rules(table.rules), table.fieldmap, default_cache_dir())
    if getattr(ns, "new_terms_no_learning", False):
        configure_new_terms(engines, learn=0.0)
    matcher.wait_tuned()
    ctx = MatchContext(
        matcher,
        table,
        prefilter=not getattr(ns, "no_prefilter", False),
        only_matches=bool(getattr(ns, "only_matches", False)),
        explain=bool(getattr(ns, "explain", False)),
        # stateful rules (EQL sequences, thresholds, ...): fed the records in file order,
        # event time from the records
        engines=_with_lateness(engines, ns),
    )
    out = _binary_stdout()
    try:
        src: IO[bytes] = sys.stdin.buffer if ns.events == "-" else open(ns.events, "rb")  # noqa: SIM115
    except OSError as exc:
        print(f"ruletag: {ns.events}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    workers = _workers(asked, engines, src)
    try:
        if workers > 1:
            from ruletag.commands import match_workers

            ctx.skipped, error = match_workers.run(
                ctx.render_block, ctx.tuning, json_pieces(src), out.write, workers
            )
            if error is not None:
                raise ValueError(error)
        else:
            for batch in read_batches(src):
                out.write(ctx.render_batch(batch, ctx.match_batch(batch)))
        out.write(ctx.finish())
    except BrokenPipeError:  # the reader went away (``| head``): stop quietly, as grep does
        _quiet_stdout()
        return 128 + 13  # what a shell reports for a tool ended by SIGPIPE
    except (ValueError, OSError) as exc:  # msgpack errors are ValueErrors
        out.flush()
        print(f"ruletag: {ns.events}: {exc}", file=sys.stderr)
        return 1
    finally:
        if src is not sys.stdin.buffer:
            src.close()
    out.flush()
    if ctx.skipped:
        print(f"ruletag: skipped {ctx.skipped} entries that are not maps", file=sys.stderr)
    note = learning_note(engines)
    if note is not None:
        print(f"ruletag: {note}", file=sys.stderr)
    return 0


def _quiet_stdout() -> None:
    """Point stdout at /dev/null: what is still buffered for a closed pipe is dropped at exit
    rather than reported as another broken pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no file descriptor (a replaced stdout): nothing to do
        pass


def _with_lateness(engines: list[Engine], ns: argparse.Namespace) -> list[Engine]:
    """``engines`` with ``--lateness`` set on those that wait for event time."""
    lateness = getattr(ns, "lateness", None)
    if lateness is not None:
        if lateness < 0:
            raise ConfigError("--lateness: must be 0 or more seconds")
        for e in engines:
            if isinstance(e, Clocked):
                e.lateness = float(lateness)
    return engines


def _worker_count(ns: argparse.Namespace) -> int:
    """``--workers``: a count, or ``auto`` (the CPUs this process may use, at most 16)."""
    from ruletag.config.model import auto_workers

    asked = str(getattr(ns, "workers", None) or "1")
    if asked == "auto":
        return auto_workers()
    if asked.isdigit() and int(asked) >= 1:
        return int(asked)
    raise ConfigError(f"--workers: want a count of 1 or more, or 'auto', not {asked!r}")


def _workers(n: int, engines: Sequence[Engine], src: IO[bytes]) -> int:
    """How many processes match: ``n``, or 1 when stateful rules are loaded (they see every
    record in file order), for a msgpack input, or where processes cannot be forked (each
    said on stderr)."""
    from ruletag.commands.match_workers import fork_available

    head = src.peek(1)[:1] if n > 1 else b""  # type: ignore[attr-defined]
    if not head:
        return 1
    why = None
    if engines:
        why = "stateful rules see every record in file order in one process"
    elif head not in _JSON_START:
        why = "a msgpack input is read in one process"
    elif not fork_available():
        why = "this platform cannot fork workers"
    if why is not None:
        print(f"ruletag: --workers {n}: matching in one process ({why})", file=sys.stderr)
        return 1
    return n


def _tune_after(ns: argparse.Namespace) -> int:
    """``--tune-after``, else the relay's default (``rules.tune_after``)."""
    n = getattr(ns, "tune_after", None)
    if n is None:
        return DEFAULT_TUNE_AFTER
    if n < 0:
        raise ConfigError("--tune-after: must be 0 or more")
    return int(n)


class Sink(Protocol):
    """Where ``match`` writes its output blocks."""

    def write(self, data: bytes, /) -> int: ...

    def flush(self) -> None: ...


def _binary_stdout() -> Sink:
    """Where the JSON lines go: ``sys.stdout``'s bytes layer (flushed of any text first)."""
    sys.stdout.flush()
    buf = getattr(sys.stdout, "buffer", None)
    if buf is not None:
        return buf
    return _TextSink(sys.stdout)


class _TextSink:
    """A text stream seen as a bytes one (a replaced ``sys.stdout`` without ``buffer``)."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def write(self, data: bytes) -> int:
        return self._stream.write(data.decode("utf-8", "surrogateescape"))

    def flush(self) -> None:
        self._stream.flush()
