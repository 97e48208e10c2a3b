"""Table files: a compiled table written to disk and read back without recompiling.

The file is a magic line (naming the format version), a SHA-256 of the body and the body: the
table's fields pickled, with Hyperscan databases serialised and the formula code marshalled.
A file of another format version, or a damaged one, raises :class:`TableError` (the rule cache
then rebuilds the table; it never misreads one).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import io
import marshal
import os
import pickle
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, BinaryIO, TypeVar

from ruletag.errors import RuletagError
from ruletag.rules.compiler.frozen import frozen_map
from ruletag.rules.compiler.hyperscan import dump_db, dump_group, load_db, load_group
from ruletag.rules.compiler.prefilter import RawFilter
from ruletag.rules.compiler.rulelist import StoredRules
from ruletag.rules.compiler.table import CompiledTable
from ruletag.rules.fields import FieldMap
from ruletag.rules.ir import Rule

__all__ = [
    "TableError",
    "dumps",
    "load",
    "load_sample",
    "load_tuned",
    "save",
    "save_sample",
    "save_tuned",
]

#: v6: each rule pickled on its own, read when first used (``rulelist.py``)
_MAGIC = b"RULETAG-TABLE\x00v6\n"
#: a re-tuned pre-filter of one table, with the table of its often-passed rules
#: (v2: a stage-2 database shared with the table's own filter is stored as a reference to it;
#: v3: its table's rules stored as the main table's are)
_TUNED_MAGIC = b"RULETAG-TUNED\x00v3\n"
#: what a pre-filter tuning of one table observed (plain data, marshalled)
_SAMPLE_MAGIC = b"RULETAG-SAMPLE\x00v1\n"

#: The fields stored as they are (the others are converted, or derived on loading).
_PLAIN_KEYS = (
    "version",
    "fieldmap",
    "key_groups",
    "scan_always",
    "trig",
    "always",
    "kw_eager",
    "source",
    "consts",
    "programs",
    "eager",
    "raw_forced",
    "rule_groups",
    "key_atom",
    "stats",
)


T = TypeVar("T")


class TableError(RuletagError):
    """A table file is unreadable or was written by an incompatible version."""


def dumps(table: CompiledTable) -> bytes:
    """The body of ``table``'s file (deterministic for one table)."""
    buf = io.BytesIO()
    _dump_table(table, buf)
    return buf.getvalue()


def _dump_table(table: CompiledTable, out: IO[bytes]) -> None:
    _Pickler(out, protocol=pickle.HIGHEST_PROTOCOL).dump(_Sharer().of(_state(table)))


def save(table: CompiledTable, path: Path) -> None:
    """Write ``table`` (Hyperscan databases serialised, formulas as marshalled code)."""
    _write(path, _MAGIC, lambda out: _dump_table(table, out))


class _Hashing(io.RawIOBase):
    """A file being written whose bytes also go through a SHA-256."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.digest = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.digest.update(b)
        return self.f.write(b)


def _write(path: Path, magic: bytes, dump: Callable[[IO[bytes]], object]) -> None:
    """Write ``magic``, the SHA-256 of the body and the body ``dump`` writes, to a file beside
    ``path`` renamed over it once complete. The body is written as it is made (the whole of it
    is never held in memory, tens of MB with every rule)."""
    tmp = Path(path).with_name(f"{Path(path).name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(magic + bytes(32))
            out = _Hashing(f)
            with io.BufferedWriter(out, _PIECE) as buffered:
                dump(buffered)
                buffered.flush()
                f.seek(len(magic))
                f.write(out.digest.digest())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _body(path: Path, magic: bytes, what: str) -> Iterator[BinaryIO]:
    """The checked body of a file written by :func:`_write`, as an open file at its start.

    The digest is checked reading the file in pieces, and the body is then unpickled from the
    file: the whole file is never held in memory beside what it holds (tens of MB with every
    rule, the largest part of the start-up peak otherwise). Reading twice from one open
    file sees one version of it (a new version is written beside it and renamed over)."""
    with open(path, "rb") as f:
        head = len(magic)
        start = f.read(head + 32)
        if not start.startswith(magic) or len(start) < head + 32:
            raise TableError(f"{path}: not a ruletag {what} file")
        digest = hashlib.sha256()
        while piece := f.read(_PIECE):
            digest.update(piece)
        if digest.digest() != start[head:]:
            raise TableError(f"{path}: file is corrupt")
        f.seek(head + 32)
        yield f


#: bytes read at a time while checking a file's digest
_PIECE = 1 << 20


def save_tuned(
    path: Path,
    version: str,
    tuned: RawFilter,
    hot: tuple[CompiledTable, tuple[int, ...]] | None,
    base: RawFilter | None = None,
) -> None:
    """Write the re-tuned pre-filter of the table ``version`` and the table of its
    often-passed rules (``hot``: that table and the rules' indexes in the main table).

    ``base``: the table's own filter; a tuned filter's rarely needed stage-2 database is
    that filter's (see :func:`~ruletag.rules.compiler.prefilter.retune`), and is then stored
    as a reference to it, not a second copy (read back by :func:`load_tuned` with ``base``)."""
    state = {
        "version": version,
        "raw": _dump_raw(tuned, None if base is None else base.full_db),
        "hot": None if hot is None else (_state(hot[0]), hot[1]),
    }
    _write(
        path, _TUNED_MAGIC, lambda out: _Pickler(out, protocol=pickle.HIGHEST_PROTOCOL).dump(state)
    )


def load_tuned(
    path: Path, version: str, base: RawFilter | None = None
) -> tuple[RawFilter, tuple[CompiledTable, tuple[int, ...]] | None]:
    """Read what :func:`save_tuned` wrote for the table ``version`` (:class:`TableError` if the
    file is damaged, of another format, or of another table); ``base``: the table's own
    filter, whose database a reference in the file stands for."""
    try:
        with _body(path, _TUNED_MAGIC, "tuned pre-filter") as body:
            st = pickle.load(body)
        if st["version"] != version:
            raise TableError(f"{path}: tuned for another rule table")
        raw = _pop_raw(st, None if base is None else base.full_db)
        hot = None if st["hot"] is None else (_from_state(st["hot"][0]), tuple(st["hot"][1]))
    except TableError:
        raise
    except Exception as exc:
        raise TableError(f"{path}: cannot read tuned pre-filter: {exc}") from exc
    if raw is None or not raw.tuned_on:
        raise TableError(f"{path}: holds no tuned pre-filter")
    return raw, hot


def save_sample(path: Path, version: str, sample: tuple[Any, ...]) -> None:
    """Write what a pre-filter tuning of the table ``version`` observed (its sample: pattern
    counts, requirement passes, records, distinct pattern sets), so that a later run that
    starts from the tuned filter and re-tunes for drift still adds it to what it observes."""
    blob = marshal.dumps((version, tuple(sample)))
    _write(path, _SAMPLE_MAGIC, lambda out: out.write(blob))


def load_sample(path: Path, version: str) -> tuple[Any, ...]:
    """Read what :func:`save_sample` wrote for the table ``version`` (:class:`TableError` if
    the file is damaged, of another format, or of another table; ``FileNotFoundError`` if
    there is none)."""
    try:
        with _body(path, _SAMPLE_MAGIC, "tuning sample") as body:
            got, sample = marshal.load(body)
        counts, passes, n, sets = sample
        ok = isinstance(counts, dict) and isinstance(passes, dict) and isinstance(sets, dict)
        if not ok or not isinstance(n, int):
            raise TableError(f"{path}: not a tuning sample")
    except (TableError, FileNotFoundError):
        raise
    except Exception as exc:
        raise TableError(f"{path}: cannot read tuning sample: {exc}") from exc
    if got != version:
        raise TableError(f"{path}: observed for another rule table")
    return (counts, passes, n, sets)


def load(path: Path) -> CompiledTable:
    """Read a table written by :func:`save` (no rule parsing, no Hyperscan compile)."""
    gc_was_on = gc.isenabled()
    # hundreds of thousands of new objects, none of them garbage: each collection the
    # allocations would trigger walks them all
    gc.disable()
    try:
        with _body(path, _MAGIC, "table") as body:
            try:
                st = pickle.load(body)
            except Exception as exc:  # pragma: no cover - depends on the damage
                raise TableError(f"{path}: cannot read table: {exc}") from exc
        return _from_state(st)
    finally:
        if gc_was_on:
            _age_unwalked()
            gc.enable()


def _age_unwalked() -> None:
    """Move every object the collector tracks to its oldest generation, unwalked.

    The collector re-enabled after a load would walk the whole new table at the next
    allocation, as one young generation (0.16 s of a start-up with every rule, finding
    nothing). ``gc.freeze()`` then ``gc.unfreeze()`` makes that move. It is skipped while
    objects are frozen (a serve's start-up table, until its first reload): the pair would
    unfreeze them."""
    if gc.get_freeze_count() == 0:
        gc.freeze()
        gc.unfreeze()


def _state(t: CompiledTable) -> dict[str, Any]:
    st: dict[str, Any] = {k: getattr(t, k) for k in _PLAIN_KEYS}
    for k in ("key_groups", "trig", "key_atom", "stats"):  # read-only views: their dicts
        st[k] = dict(st[k])
    st["groups"] = tuple(dump_group(g) for g in t.groups)
    st["kw_group"] = None if t.kw_group is None else dump_group(t.kw_group)
    # only lazily evaluated leaves are needed after loading
    st["leaves"] = tuple(None if i in t.eager else n for i, n in enumerate(t.leaves))
    st["code"] = marshal.dumps(t.code)
    st["pyver"] = sys.version_info[:2]
    st["raw"] = _dump_raw(t.raw)
    st["rules"] = _dump_rules(t.rules)
    return st


def _from_state(st: dict[str, Any]) -> CompiledTable:
    """The table of a state read back (``st`` is emptied of its databases on the way)."""
    fields = {k: st[k] for k in _PLAIN_KEYS}
    for k in ("key_groups", "trig", "key_atom", "stats"):
        fields[k] = frozen_map(fields[k])
    if st["pyver"] == sys.version_info[:2]:
        code = marshal.loads(st["code"])
    else:
        code = compile(st["source"], "<ruletag-table>", "exec")
    kw = st.pop("kw_group")
    raw = _pop_raw(st)
    return CompiledTable(
        **fields,
        rules=StoredRules(*st.pop("rules")),
        groups=tuple(_loaded(st.pop("groups"), load_group)),
        kw_group=None if kw is None else load_group(kw),
        leaves=st["leaves"],
        code=code,
        raw=raw,
    )


def _dump_rules(rules: Sequence[Rule]) -> tuple[tuple[Any, ...], ...]:
    """Each rule's kind, id and bytes: each rule is pickled on its own, to be read back only
    when used (:class:`~ruletag.rules.compiler.rulelist.StoredRules`)."""
    if isinstance(rules, StoredRules):  # saved again: not read for it
        blobs = tuple(rules.blob(i, _rule_bytes) for i in range(len(rules)))
        return rules.kinds, rules.ids, blobs
    return tuple(r.kind for r in rules), tuple(r.id for r in rules), tuple(map(_rule_bytes, rules))


def _rule_bytes(rule: Rule) -> bytes:
    """One rule pickled, its equal sub-values shared (:class:`_Sharer`)."""
    buf = io.BytesIO()
    _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(_Sharer().of(rule))
    return buf.getvalue()


def _loaded(states: Sequence[Any], load: Callable[[Any], T]) -> Iterator[T]:
    """``load`` of each of ``states``, each state dropped once loaded: a serialised database
    is freed as soon as it is loaded, so the two copies of all of them never coexist (the
    caller must hold no other reference to ``states``)."""
    todo = list(states)
    del states
    for i in range(len(todo)):
        state, todo[i] = todo[i], None
        yield load(state)
        del state


def _dump_raw(f: RawFilter | None, shared: Any = None) -> tuple[Any, ...] | None:
    """The pre-filter as picklable data (Hyperscan databases serialised; its cold database
    as None when it is ``shared``, a database the reader has: see :func:`save_tuned`)."""
    if f is None:
        return None
    code = (sys.version_info[:2], marshal.dumps(f.code))
    dbs = (dump_db(f.trigger_db), dump_db(f.full_db))
    cold = None
    if f.cold is not None:
        cold = (None if f.cold[0] is shared else dump_db(f.cold[0]), f.cold[1])
    rates = dict(f.rates)
    return (*dbs, dict(f.trig_rules), f.source, f.consts, code, f.plan, f.tuned_on, cold, rates)


def _pop_raw(st: dict[str, Any], shared: Any = None) -> RawFilter | None:
    """The pre-filter ``st["raw"]`` holds (:func:`_dump_raw` output), taken out of ``st`` so
    that each serialised database is freed once loaded; ``shared``: the database a cold
    database stored as None stands for."""
    state = st.pop("raw")
    if state is None:
        return None
    trig, full, trig_rules, source, consts, (pyver, blob), plan, tuned_on, cold, rates = state
    del state
    code = marshal.loads(blob) if pyver == sys.version_info[:2] else None
    own_cold = cold is not None and cold[0] is not None
    if cold is not None and not own_cold and shared is None:
        raise TableError("the tuned filter refers to its table's database, which was not given")
    blobs = [trig, full, *((cold[0],) if own_cold else ())]
    del trig, full
    dbs = list(_loaded(blobs, load_db))
    cold_db = None if cold is None else (dbs[2] if own_cold else shared, cold[1])
    return RawFilter(
        dbs[0], dbs[1], trig_rules, source, consts, code, plan, tuned_on, cold_db, rates
    )


class _Sharer:
    """Equal immutable values made one object before pickling, so that they are stored and
    read back once: the rules' conditions repeat whole sub-trees (a logsource test, a field
    name, a tuple of values) thousands of times, and a loaded table held each copy.

    Only values whose equality is exact are shared: texts, bytes, numbers (keyed by their
    type, so ``True``, ``1`` and ``1.0`` stay apart, and floats by their ``repr``), tuples and
    frozensets of shared values, and the IR's frozen dataclasses; dicts and lists are copied
    with shared contents; any other object is kept as it is."""

    def __init__(self) -> None:
        self._canon: dict[tuple[Any, ...], Any] = {}
        # id of an object walked -> its shared value (the objects walked are all reachable
        # from the value given to :meth:`of`, so their ids stay theirs meanwhile)
        self._seen: dict[int, Any] = {}

    def of(self, obj: Any) -> Any:
        """The shared equivalent of ``obj`` (equal to it, of the same types throughout)."""
        cls = type(obj)
        if cls is str or cls is int or cls is bytes:
            return self._canon.setdefault((cls, obj), obj)
        if cls is float:
            return self._canon.setdefault((cls, repr(obj)), obj)
        if obj is None or cls is bool:
            return obj
        got = self._seen.get(id(obj), self)
        if got is not self:
            return got
        if cls is tuple or cls is frozenset:
            items = [self.of(x) for x in obj]
            key = (cls, *map(id, items))
            got = self._canon.get(key)
            if got is None:
                same = cls is tuple and all(a is b for a, b in zip(items, obj, strict=True))
                got = self._canon[key] = obj if same else cls(items)
        elif cls is dict:
            got = {self.of(k): self.of(v) for k, v in obj.items()}
        elif cls is list:
            got = [self.of(x) for x in obj]
        elif dataclasses.is_dataclass(cls) and cls.__module__ == Rule.__module__:
            names = _fields(cls)
            vals = [self.of(getattr(obj, n)) for n in names]
            key = (cls, *map(id, vals))
            got = self._canon.get(key)
            if got is None:
                same = all(v is getattr(obj, n) for n, v in zip(names, vals, strict=True))
                got = self._canon[key] = obj if same else cls(*vals)
        else:
            got = obj
        self._seen[id(obj)] = got
        return got


def _fields(cls: type) -> tuple[str, ...]:
    """The field names of the dataclass ``cls``, in order (memoised)."""
    names = _DATACLASS_FIELDS.get(cls)
    if names is None:
        names = _DATACLASS_FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


#: The modules whose frozen dataclasses :class:`_Pickler` stores as constructor calls: the
#: IR, and the field map's plans (a thousand of them in each stateful step table).
_CONSTRUCTED = frozenset((Rule.__module__, FieldMap.__module__))


class _Pickler(pickle.Pickler):
    """Pickles frozen dataclasses (the IR, the field plans) as plain constructor calls with
    positional fields, instead of the generic object reduction (whose ``__setstate__`` runs
    a Python loop per object when read back: twice as slow)."""

    def reducer_override(self, obj: Any) -> Any:
        cls = type(obj)
        if not dataclasses.is_dataclass(cls) or cls.__module__ not in _CONSTRUCTED:
            return NotImplemented
        return cls, tuple(getattr(obj, n) for n in _fields(cls))


_DATACLASS_FIELDS: dict[type, tuple[str, ...]] = {}
