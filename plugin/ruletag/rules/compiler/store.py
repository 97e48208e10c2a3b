"""Table files: a compiled table written to disk and read back without recompiling.

The file is a magic line (naming the format version), a SHA-256 of the body and the body: the
table's fields pickled, with Hyperscan databases serialised and the formula code marshalled.
A file of another format version, or a damaged one, raises :class:`TableError` (the rule cache
then rebuilds the table; it never misreads one).
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import io
import marshal
import os
import pickle
import sys
from pathlib import Path
from typing import Any

from ruletag.errors import RuletagError
from ruletag.rules.compiler.frozen import frozen_map
from ruletag.rules.compiler.hyperscan import dump_db, dump_group, load_db, load_group
from ruletag.rules.compiler.prefilter import RawFilter
from ruletag.rules.compiler.table import CompiledTable
from ruletag.rules.ir import Rule

__all__ = ["TableError", "dumps", "load", "load_tuned", "save", "save_tuned"]

#: v5: the compiler and the matcher split (groups and pre-filter stored as plain tuples)
_MAGIC = b"RULETAG-TABLE\x00v5\n"
#: a re-tuned pre-filter of one table, with the table of its often-passed rules
_TUNED_MAGIC = b"RULETAG-TUNED\x00v1\n"

#: The fields stored as they are (the others are converted, or derived on loading).
_PLAIN_KEYS = (
    "rules",
    "version",
    "fieldmap",
    "key_groups",
    "scan_always",
    "trig",
    "always",
    "kw_eager",
    "source",
    "consts",
    "eager",
    "raw_forced",
    "rule_groups",
    "key_atom",
    "stats",
)


class TableError(RuletagError):
    """A table file is unreadable or was written by an incompatible version."""


def dumps(table: CompiledTable) -> bytes:
    """The body of ``table``'s file (deterministic for one table)."""
    buf = io.BytesIO()
    _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(_state(table))
    return buf.getvalue()


def save(table: CompiledTable, path: Path) -> None:
    """Write ``table`` (Hyperscan databases serialised, formulas as marshalled code)."""
    _write(path, _MAGIC, dumps(table))


def _write(path: Path, magic: bytes, blob: bytes) -> None:
    digest = hashlib.sha256(blob).digest()
    tmp = Path(path).with_name(f"{Path(path).name}.{os.getpid()}.tmp")
    tmp.write_bytes(magic + digest + blob)
    tmp.replace(path)


def _body(path: Path, magic: bytes, what: str) -> memoryview:
    """The checked body of a file written by :func:`_write`."""
    data = Path(path).read_bytes()
    head = len(magic)
    if not data.startswith(magic):
        raise TableError(f"{path}: not a ruletag {what} file")
    body = memoryview(data)[head + 32 :]
    if hashlib.sha256(body).digest() != data[head : head + 32]:
        raise TableError(f"{path}: file is corrupt")
    return body


def save_tuned(
    path: Path, version: str, tuned: RawFilter, hot: tuple[CompiledTable, tuple[int, ...]] | None
) -> None:
    """Write the re-tuned pre-filter of the table ``version`` and the table of its
    often-passed rules (``hot``: that table and the rules' indexes in the main table)."""
    state = {
        "version": version,
        "raw": _dump_raw(tuned),
        "hot": None if hot is None else (_state(hot[0]), hot[1]),
    }
    buf = io.BytesIO()
    _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(state)
    _write(path, _TUNED_MAGIC, buf.getvalue())


def load_tuned(
    path: Path, version: str
) -> tuple[RawFilter, tuple[CompiledTable, tuple[int, ...]] | None]:
    """Read what :func:`save_tuned` wrote for the table ``version`` (:class:`TableError` if the
    file is damaged, of another format, or of another table)."""
    body = _body(path, _TUNED_MAGIC, "tuned pre-filter")
    try:
        st = pickle.loads(body)
        if st["version"] != version:
            raise TableError(f"{path}: tuned for another rule table")
        raw = _load_raw(st["raw"])
        hot = None if st["hot"] is None else (_from_state(st["hot"][0]), tuple(st["hot"][1]))
    except TableError:
        raise
    except Exception as exc:
        raise TableError(f"{path}: cannot read tuned pre-filter: {exc}") from exc
    if raw is None or not raw.tuned_on:
        raise TableError(f"{path}: holds no tuned pre-filter")
    return raw, hot


def load(path: Path) -> CompiledTable:
    """Read a table written by :func:`save` (no rule parsing, no Hyperscan compile)."""
    body = _body(path, _MAGIC, "table")
    gc_was_on = gc.isenabled()
    # hundreds of thousands of new objects, none of them garbage: each collection the
    # allocations would trigger walks them all
    gc.disable()
    try:
        try:
            st = pickle.loads(body)
        except Exception as exc:  # pragma: no cover - depends on the damage
            raise TableError(f"{path}: cannot read table: {exc}") from exc
        return _from_state(st)
    finally:
        if gc_was_on:
            gc.enable()


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
    return st


def _from_state(st: dict[str, Any]) -> CompiledTable:
    fields = {k: st[k] for k in _PLAIN_KEYS}
    for k in ("key_groups", "trig", "key_atom", "stats"):
        fields[k] = frozen_map(fields[k])
    if st["pyver"] == sys.version_info[:2]:
        code = marshal.loads(st["code"])
    else:
        code = compile(st["source"], "<ruletag-table>", "exec")
    kw = st["kw_group"]
    return CompiledTable(
        **fields,
        groups=tuple(load_group(g) for g in st["groups"]),
        kw_group=None if kw is None else load_group(kw),
        leaves=st["leaves"],
        code=code,
        raw=_load_raw(st["raw"]),
    )


def _dump_raw(f: RawFilter | None) -> tuple[Any, ...] | None:
    """The pre-filter as picklable data (Hyperscan databases serialised)."""
    if f is None:
        return None
    code = (sys.version_info[:2], marshal.dumps(f.code))
    dbs = (dump_db(f.trigger_db), dump_db(f.full_db))
    cold = None if f.cold is None else (dump_db(f.cold[0]), f.cold[1])
    rates = dict(f.rates)
    return (*dbs, dict(f.trig_rules), f.source, f.consts, code, f.plan, f.tuned_on, cold, rates)


def _load_raw(state: tuple[Any, ...] | None) -> RawFilter | None:
    """A pre-filter from :func:`_dump_raw` output."""
    if state is None:
        return None
    trig, full, trig_rules, source, consts, (pyver, blob), plan, tuned_on, cold, rates = state
    code = marshal.loads(blob) if pyver == sys.version_info[:2] else None
    dbs = [load_db(b) for b in (trig, full, *(cold[:1] if cold else ()))]
    cold_db = (dbs[2], cold[1]) if cold else None
    return RawFilter(
        dbs[0], dbs[1], trig_rules, source, consts, code, plan, tuned_on, cold_db, rates
    )


class _Pickler(pickle.Pickler):
    """Pickles frozen dataclasses (the IR) as plain constructor calls with positional fields,
    instead of the generic object reduction."""

    def reducer_override(self, obj: Any) -> Any:
        cls = type(obj)
        names = _DATACLASS_FIELDS.get(cls)
        if names is None:
            if not dataclasses.is_dataclass(cls) or cls.__module__ != Rule.__module__:
                return NotImplemented
            names = _DATACLASS_FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls))
        return cls, tuple(getattr(obj, n) for n in names)


_DATACLASS_FIELDS: dict[type, tuple[str, ...]] = {}
