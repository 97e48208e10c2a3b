"""Field mapping: which record paths can supply a rule's field, and logsource conditions.

The mapping lives in ``ruletag/data/fields.yaml`` (see ``docs/rules.md``). A rule field name
resolves to a *plan*: direct record paths (every alias of the field, the names Windows gives
the same event data in a channel, the Winlogbeat ``winlog.event_data.<Name>`` form of un-dotted
names, ``winlog.user_data.<Name>`` for the UserData fields of the channels that have them, and
the other spelling of a prefix alias such as ``requestParameters.`` /
``aws.cloudtrail.flattened.request_parameters.``) and, used only when no direct path has a
value, *derivations* (the basename or a copy of another field, the ECS category/type of a
Windows event id, a constant when another field is present and others are not). Plans are
built once per field name, so a record pays only for the paths of the fields rules read.
Paths match nested objects, literal dotted keys and any mix of both
(``{"process": {"parent.name": ...}}``); lists are searched element-wise.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ruletag.errors import ConfigError
from ruletag.rules.algebra import and_, as_text, not_, or_, wildcard_tokens
from ruletag.rules.ir import Equals, Exists, Logsource, Match, Node
from ruletag.rules.native import native_module

#: Bumped when the meaning of the YAML schema changes (part of :attr:`FieldMap.version`).
_SCHEMA = "fields-v2"

CHANNEL = "winlog.channel"
EVENT_ID = "winlog.event_id"


def basename(path: str) -> str:
    """Last component of a Windows or POSIX path (``C:\\a\\b.exe`` -> ``b.exe``)."""
    return path[max(path.rfind("\\"), path.rfind("/")) + 1 :]


def _flatten(value: object, out: list[object]) -> None:
    if isinstance(value, list | tuple):
        for v in value:
            _flatten(v, out)
    elif value is not None:
        out.append(value)


def resolve(obj: object, parts: Sequence[str], out: list[object]) -> None:
    """Append every value at ``parts`` below ``obj`` to ``out`` (lists flattened, nulls dropped).

    Each prefix of ``parts`` joined with dots is tried as a key, so nested objects, literal
    dotted keys and mixtures all resolve; lists on the way are searched element by element.
    """
    if not parts:
        _flatten(obj, out)
        return
    if isinstance(obj, Mapping):
        key = parts[0]
        for i in range(1, len(parts) + 1):
            if i > 1:
                key = key + "." + parts[i - 1]
            if key in obj:
                resolve(obj[key], parts[i:], out)
    elif isinstance(obj, list | tuple):
        for v in obj:
            resolve(v, parts, out)


_SCALARS = (str, int, float, bytes)


def py_flatten_record(obj: Mapping[str, object]) -> dict[str, list[object]]:
    """Every path of ``obj`` (keys joined with dots) -> its values, in one walk.

    The reference implementation; :data:`flatten_record` is the C one when it is built
    (:mod:`ruletag.rules.native`).

    A path of nested objects, of literal dotted keys or of any mix gives the same dotted
    string, so looking a field path up here finds what :func:`resolve` finds (lists searched
    element-wise and flattened, nulls dropped, objects kept as values). Non-string keys are
    skipped: no path can name them.
    """
    out: dict[str, list[object]] = {}
    _flat_map(obj, None, out)
    return out


def _flat_map(obj: Mapping[Any, object], prefix: str | None, out: dict[str, list[object]]) -> None:
    for k, v in obj.items():
        if v is None or type(k) is not str:
            continue
        path = k if prefix is None else prefix + "." + k
        if isinstance(v, _SCALARS):
            got = out.get(path)
            if got is None:
                out[path] = [v]
            else:
                got.append(v)
        elif isinstance(v, list | tuple):
            vals: list[object] = []
            _flatten(v, vals)
            if vals:
                got = out.get(path)
                if got is None:
                    out[path] = vals
                else:
                    got.extend(vals)
                _flat_list(v, path, out)
        else:
            got = out.get(path)
            if got is None:
                out[path] = [v]
            else:
                got.append(v)
            if isinstance(v, Mapping):
                _flat_map(v, path, out)


def _flat_list(items: Sequence[object], path: str, out: dict[str, list[object]]) -> None:
    """Walk into the objects of a list (and of nested lists) below ``path``."""
    for e in items:
        if isinstance(e, Mapping):
            _flat_map(e, path, out)
        elif isinstance(e, list | tuple):
            _flat_list(e, path, out)


_native = native_module()
#: :func:`py_flatten_record`, in C when the extension is built
flatten_record: Callable[[Mapping[str, object]], dict[str, list[object]]] = (
    py_flatten_record if _native is None else _native.flatten_record
)


def _walk_strings(obj: object, out: list[str]) -> None:
    if isinstance(obj, Mapping):
        for v in obj.values():
            _walk_strings(v, out)
    elif isinstance(obj, list | tuple):
        for v in obj:
            _walk_strings(v, out)
    else:
        t = as_text(obj)
        if t is not None:
            out.append(t)


# --------------------------------------------------------------------------- plans


@dataclass(frozen=True, slots=True)
class _Basename:
    source: str


@dataclass(frozen=True, slots=True)
class _WindowsEvent:
    attr: str  # "category" or "type"


@dataclass(frozen=True, slots=True)
class _Copy:
    source: str
    only: tuple[str, ...] = ()  # when given, only the values in this list are copied
    caseless: bool = False  # ... compared lower-cased

    def keeps(self, v: object) -> bool:
        if not self.only:
            return True
        if not isinstance(v, str):
            return False
        return (v.lower() if self.caseless else v) in self.only


@dataclass(frozen=True, slots=True)
class _WhenPresent:
    source: str
    value: str
    unless: tuple[str, ...] = ()  # no value when any of these fields has one


_Derivation = _Basename | _Copy | _WindowsEvent | _WhenPresent


@dataclass(frozen=True, slots=True)
class _Plan:
    paths: tuple[tuple[str, ...], ...]
    derive: tuple[_Derivation, ...]
    dotted: tuple[str, ...] = ()  # ``paths`` joined with dots (keys of ``flatten_record``)
    #: ``derive`` as plain tuples, for the C view: (0, source) basename; (1, source, only or
    #: None, caseless) copy; (2, source, value, unless) when present; (3, attr, channel field,
    #: event id field, the map's (channel, event id) -> row table, the event id parser)
    #: Windows event
    spec: tuple[tuple[object, ...], ...] = ()


def _spec(d: _Derivation, events: Mapping[tuple[str, int], _WinEvent]) -> tuple[object, ...]:
    """One derivation as :attr:`_Plan.spec` holds it."""
    if isinstance(d, _Basename):
        return (0, d.source)
    if isinstance(d, _Copy):
        return (1, d.source, frozenset(d.only) if d.only else None, d.caseless)
    if isinstance(d, _WhenPresent):
        return (2, d.source, d.value, tuple(d.unless))
    return (3, d.attr, CHANNEL, EVENT_ID, events, _as_int)


@dataclass(frozen=True, slots=True)
class _WinEvent:
    channel: str
    event_id: int
    category: str | None
    ecs_category: tuple[str, ...]
    ecs_type: tuple[str, ...]


class _ViewMethods:
    """What both record views share (their state: ``_map``, ``_record``, ``_cache``,
    ``_flat``, ``_strings``, ``_event``; ``values`` is each one's own)."""

    if TYPE_CHECKING:  # the state the subclasses hold (slots of their own, or in C)
        __slots__ = ("_cache", "_event", "_flat", "_map", "_record", "_strings")
    else:
        __slots__ = ()
    _map: FieldMap
    _record: Mapping[str, object]
    _cache: dict[str, list[object]]
    _flat: dict[str, list[object]] | None
    _strings: list[str] | None
    _event: _WinEvent | bool | None

    def values(self, field: str) -> list[object]:
        """Every value the record has for ``field`` (lists flattened); ``[]`` when absent.

        ``None`` values are dropped, so ``[]`` means missing-or-null.
        """
        raise NotImplementedError

    @property
    def record(self) -> Mapping[str, object]:
        """The record as given."""
        return self._record

    def flat(self) -> dict[str, list[object]]:
        """Every dotted path of the record -> its values (:func:`flatten_record`, computed once).

        Read-only: the lists are shared with later :meth:`values` results."""
        flat = self._flat
        if flat is None:
            flat = self._flat = flatten_record(self._record)
        return flat

    @property
    def value_cache(self) -> dict[str, list[object]]:
        """Field -> the values :meth:`values` gave for it so far. A caller that resolved a
        field's direct paths itself (``ruletag.rules.matcher``'s group scan) may store the
        non-empty result here, exactly as :meth:`values` would."""
        return self._cache

    def strings(self) -> list[str]:
        """Every scalar value in the record as text, for Sigma keywords."""
        if self._strings is None:
            out: list[str] = []
            _walk_strings(self._record, out)
            self._strings = out
        return self._strings

    def _windows_event(self, attr: str) -> list[object]:
        row = self._event
        if row is False:
            row = self._event = self._event_row()
        if row is None:
            return []
        assert isinstance(row, _WinEvent)
        return list(row.ecs_category if attr == "category" else row.ecs_type)

    def _event_row(self) -> _WinEvent | None:
        """The known Windows event (channel, event id) of the record, if any."""
        table = self._map._events
        for ch in self.values(CHANNEL):
            if not isinstance(ch, str):
                continue
            for eid in self.values(EVENT_ID):
                num = _as_int(eid)
                row = table.get((ch.lower(), num)) if num is not None else None
                if row is not None:
                    return row
        return None


class PyRecordView(_ViewMethods):
    """One record seen through the field mapping (built per record, values cached): the
    reference implementation; :class:`RecordView` is the one with ``values`` in C when the
    extension is built (``tests/test_native.py`` checks both agree)."""

    __slots__ = ("_cache", "_event", "_flat", "_map", "_record", "_strings")

    def __init__(self, fieldmap: FieldMap, record: Mapping[str, object]) -> None:
        self._map = fieldmap
        self._record = record
        self._cache = {}
        self._strings = None
        self._flat = None
        self._event = False  # the Windows event row, once looked up

    def values(self, field: str) -> list[object]:
        got = self._cache.get(field)
        if got is None:
            got = self._compute(field)
            self._cache[field] = got
        return got

    def _compute(self, field: str) -> list[object]:
        plan = self._map._plans.get(field) or self._map._plan(field)
        flat = self._flat
        if flat is None:
            flat = self._flat = flatten_record(self._record)
        out: list[object] = []
        for path in plan.dotted:
            got = flat.get(path)
            if got is not None:
                out.extend(got)
        if out:
            return out
        for d in plan.derive:
            if isinstance(d, _Basename):
                out = [basename(v) for v in self.values(d.source) if isinstance(v, str)]
            elif isinstance(d, _Copy):
                out = [v for v in self.values(d.source) if d.keeps(v)]
            elif isinstance(d, _WhenPresent):
                present = self.values(d.source) and not any(self.values(u) for u in d.unless)
                out = [d.value] if present else []
            else:
                out = self._windows_event(d.attr)
            if out:
                return out
        return out


_ViewBase: Any = getattr(_native, "ViewBase", None)
if TYPE_CHECKING or _ViewBase is None:
    #: one record seen through the field mapping (built per record, values cached)
    RecordView = PyRecordView
else:

    class RecordView(_ViewMethods, _ViewBase):
        """One record seen through the field mapping (built per record, values cached):
        ``values`` in C (``ruletag.rules._native.ViewBase``), the rest as
        :class:`PyRecordView`'s."""

        __slots__ = ()
        values = _ViewBase.values


def _as_int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        return int(value) if value.strip().isdecimal() else None  # what int() takes
    if isinstance(value, bytes) and value.strip().isdigit():
        return int(value)
    return None


# --------------------------------------------------------------------------- the map


def _str_list(value: object, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(f"fields mapping: {where} must be a string or a list of strings")


class FieldMap:
    """The editable mapping shipped as ``ruletag/data/fields.yaml``."""

    def __init__(self, data: Mapping[str, object], text: bytes = b"") -> None:
        """Build from parsed YAML ``data``; ``text`` (the file bytes) feeds :attr:`version`."""
        if not isinstance(data, Mapping):
            raise ConfigError("fields mapping: top level must be a mapping")
        self._version = hashlib.sha256(_SCHEMA.encode() + b"\0" + text).hexdigest()[:16]
        self._prefixes = tuple(_str_list(data.get("event_data_prefixes"), "event_data_prefixes"))
        self._groups: dict[str, tuple[str, ...]] = {}  # any name -> every name of its group
        self._extra: dict[str, list[str]] = {}  # canonical -> extra paths
        self._derive: dict[str, tuple[_Derivation, ...]] = {}
        self._canonical: dict[str, str] = {}
        self._plans: dict[str, _Plan] = {}
        self._prefix_aliases: list[tuple[str, ...]] = []
        self._load_fields(data.get("fields") or {})
        self._load_prefix_aliases(data.get("prefix_aliases") or [])
        self._load_channels(data.get("windows_channels") or {})
        self._events: dict[tuple[str, int], _WinEvent] = {}
        self._by_category: dict[str, list[_WinEvent]] = {}
        self._load_windows(data.get("windows_events") or [])
        self._ecs_categories = self._load_ecs(data.get("ecs_categories") or {})
        self._services = self._load_services(data.get("services") or {})
        self._products = self._load_products(data.get("products") or {})
        self._check_cycles()

    # ----------------------------------------------------------------- loading

    @classmethod
    def default(cls) -> FieldMap:
        """The mapping shipped with ruletag (cached: it is immutable)."""
        return _default()

    @classmethod
    def load(cls, path: Path) -> FieldMap:
        """Load a mapping file; malformed content raises :class:`ConfigError`."""
        text = Path(path).read_bytes()
        return cls.from_bytes(text, str(path))

    @classmethod
    def from_bytes(cls, text: bytes, where: str = "fields.yaml") -> FieldMap:
        """Parse mapping YAML text."""
        try:
            # libyaml when PyYAML has it: the default map is parsed at every start-up
            data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where}: invalid YAML: {exc}") from exc
        return cls(data, text)

    def _load_fields(self, fields: object) -> None:
        if not isinstance(fields, Mapping):
            raise ConfigError("fields mapping: 'fields' must be a mapping")
        for name, spec in fields.items():
            spec = spec or {}
            if not isinstance(name, str) or not isinstance(spec, Mapping):
                raise ConfigError(f"fields mapping: bad entry for {name!r}")
            unknown = set(spec) - {"aliases", "paths", "derive"}
            if unknown:
                raise ConfigError(f"fields mapping: {name}: unknown keys {sorted(unknown)}")
            names = (name, *_str_list(spec.get("aliases"), f"{name}.aliases"))
            for n in names:
                if n in self._canonical:
                    raise ConfigError(f"fields mapping: {n!r} is in two field groups")
                self._canonical[n] = name
                self._groups[n] = names
            self._extra[name] = _str_list(spec.get("paths"), f"{name}.paths")
            self._derive[name] = tuple(self._parse_derive(name, spec.get("derive") or []))

    def _parse_derive(self, name: str, items: object) -> Iterator[_Derivation]:
        if not isinstance(items, list):
            raise ConfigError(f"fields mapping: {name}.derive must be a list")
        for item in items:
            if isinstance(item, Mapping) and isinstance(item.get("basename"), str):
                yield _Basename(item["basename"])
            elif isinstance(item, Mapping) and item.get("windows_event") in ("category", "type"):
                yield _WindowsEvent(item["windows_event"])
            elif (
                isinstance(item, Mapping)
                and isinstance(item.get("copy"), str)
                and set(item) <= {"copy", "only", "caseless"}
                and isinstance(item.get("caseless", False), bool)
            ):
                only = tuple(_str_list(item.get("only"), f"{name}.derive.only"))
                caseless = bool(item.get("caseless", False))
                if caseless:
                    only = tuple(o.lower() for o in only)
                yield _Copy(item["copy"], only, caseless)
            elif (
                isinstance(item, Mapping)
                and isinstance(item.get("when_present"), str)
                and isinstance(item.get("value"), str)
                and set(item) <= {"when_present", "value", "unless"}
            ):
                unless = tuple(_str_list(item.get("unless"), f"{name}.derive.unless"))
                yield _WhenPresent(item["when_present"], item["value"], unless)
            else:
                raise ConfigError(f"fields mapping: {name}: bad derivation {item!r}")

    def _join(self, name: str, other: str) -> None:
        """Put ``other`` in ``name``'s field group (creating the group when there is none)."""
        mine, theirs = self._groups.get(name), self._groups.get(other)
        if mine is not None and theirs is not None:
            if set(mine) != set(theirs):
                raise ConfigError(f"fields mapping: {other!r} is in two field groups")
            return
        if theirs is not None:
            name, other, mine = other, name, theirs
        canon = self._canonical.get(name, name)
        names = (*(mine or (name,)), other)
        for n in names:
            self._canonical[n] = canon
            self._groups[n] = names
        self._extra.setdefault(canon, [])
        self._derive.setdefault(canon, ())

    def _load_prefix_aliases(self, rows: object) -> None:
        if not isinstance(rows, list):
            raise ConfigError("fields mapping: 'prefix_aliases' must be a list")
        for row in rows:
            names = _str_list(row, "prefix_aliases[]")
            if len(names) < 2 or any(not n or n.endswith(".") for n in names):
                raise ConfigError(f"fields mapping: bad prefix_aliases row {row!r}")
            self._prefix_aliases.append(tuple(names))

    def _load_channels(self, channels: object) -> None:
        """``windows_channels``: per channel, the names Windows gives event data that rules
        spell otherwise (``names``: rule name -> Windows name(s)) and the names of its UserData
        fields (``user_data``), which Winlogbeat puts below ``winlog.user_data``."""
        if not isinstance(channels, Mapping):
            raise ConfigError("fields mapping: 'windows_channels' must be a mapping")
        for channel, spec in channels.items():
            where = f"windows_channels.{channel}"
            if not isinstance(spec, Mapping) or set(spec) - {"names", "user_data"}:
                raise ConfigError(f"fields mapping: {where}: expected names and/or user_data")
            names = spec.get("names") or {}
            if not isinstance(names, Mapping):
                raise ConfigError(f"fields mapping: {where}.names must be a mapping")
            for rule_name, spelled in names.items():
                for other in _str_list(spelled, f"{where}.names.{rule_name}"):
                    self._join(str(rule_name), other)
            for n in _str_list(spec.get("user_data"), f"{where}.user_data"):
                extra = self._extra.setdefault(self._canonical.get(n, n), [])
                if f"winlog.user_data.{n}" not in extra:
                    extra.append(f"winlog.user_data.{n}")

    def _load_windows(self, rows: object) -> None:
        if not isinstance(rows, list):
            raise ConfigError("fields mapping: 'windows_events' must be a list")
        for row in rows:
            if not isinstance(row, Mapping) or not isinstance(row.get("channel"), str):
                raise ConfigError(f"fields mapping: bad windows_events row {row!r}")
            ids = row.get("ids", row.get("id"))
            id_list = ids if isinstance(ids, list) else [ids]
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in id_list):
                raise ConfigError(f"fields mapping: bad event id in {row!r}")
            cat = row.get("sigma")
            for i in id_list:
                ev = _WinEvent(
                    row["channel"],
                    i,
                    cat if isinstance(cat, str) else None,
                    tuple(_str_list(row.get("category"), "category")),
                    tuple(_str_list(row.get("type"), "type")),
                )
                self._events[(ev.channel.lower(), i)] = ev
                for c in _str_list(cat, "sigma"):
                    self._by_category.setdefault(c, []).append(ev)

    def _load_ecs(self, cats: object) -> dict[str, Node]:
        if not isinstance(cats, Mapping):
            raise ConfigError("fields mapping: 'ecs_categories' must be a mapping")
        out: dict[str, Node] = {}
        for name, spec in cats.items():
            out[name] = self._condition(spec, f"ecs_categories.{name}")
        return out

    def _load_services(self, services: object) -> dict[tuple[str, str], Node]:
        if not isinstance(services, Mapping):
            raise ConfigError("fields mapping: 'services' must be a mapping")
        out: dict[tuple[str, str], Node] = {}
        for product, table in services.items():
            if not isinstance(table, Mapping):
                raise ConfigError(f"fields mapping: services.{product} must be a mapping")
            for service, spec in table.items():
                out[(product, service)] = self._condition(spec, f"services.{product}.{service}")
        return out

    def _load_products(self, products: object) -> dict[str, Node]:
        if not isinstance(products, Mapping):
            raise ConfigError("fields mapping: 'products' must be a mapping")
        return {p: self._condition(s, f"products.{p}") for p, s in products.items()}

    def _condition(self, spec: object, where: str) -> Node:
        """YAML condition -> IR: a mapping is an And of ``field: value`` tests (a list value
        means any of them); a list of mappings is an Or; ``{not: ...}`` negates; a string value
        ``"*"`` means the field exists. Strings are case-insensitive patterns (``*``, ``?``)."""
        if isinstance(spec, list) and spec:
            return or_(*(self._condition(s, where) for s in spec))
        if not isinstance(spec, Mapping) or not spec:
            raise ConfigError(f"fields mapping: {where}: expected a mapping or a list")
        parts: list[Node] = []
        for key, value in spec.items():
            if key == "not":
                parts.append(not_(self._condition(value, where)))
                continue
            values = value if isinstance(value, list) else [value]
            if not values:
                raise ConfigError(f"fields mapping: {where}.{key}: empty list")
            alts: list[Node] = []
            for v in values:
                if v == "*":
                    alts.append(Exists(key))
                elif isinstance(v, str):
                    alts.append(Match(key, wildcard_tokens(v), cased=False))
                elif isinstance(v, int | float) and not isinstance(v, bool):
                    alts.append(Equals(key, v))
                else:
                    raise ConfigError(f"fields mapping: {where}.{key}: bad value {v!r}")
            parts.append(or_(*alts))
        return and_(*parts)

    def _check_cycles(self) -> None:
        def visit(name: str, seen: tuple[str, ...]) -> None:
            canon = self._canonical.get(name, name)
            if canon in seen:
                raise ConfigError(f"fields mapping: derivation cycle through {canon!r}")
            for d in self._derive.get(canon, ()):
                if isinstance(d, _Basename | _Copy | _WhenPresent):
                    visit(d.source, (*seen, canon))
                    for u in d.unless if isinstance(d, _WhenPresent) else ():
                        visit(u, (*seen, canon))
                else:
                    visit(CHANNEL, (*seen, canon))
                    visit(EVENT_ID, (*seen, canon))

        for name in self._derive:
            visit(name, ())

    # ----------------------------------------------------------------- resolution

    def _plan(self, field: str) -> _Plan:
        plan = self._plans.get(field)
        if plan is not None:
            return plan
        canon = self._canonical.get(field, field)
        names = self._groups.get(field, (field,))
        paths: list[str] = []
        have: set[str] = set()  # the members of ``paths`` (which keeps their order)

        def add(path: str) -> None:
            if path not in have:
                have.add(path)
                paths.append(path)

        for n in (field, *names, *self._extra.get(canon, ())):
            add(n)
        for n in names if field in self._groups else (field,):
            if "." not in n:
                for p in self._prefixes:
                    add(f"{p}.{n}")
        for row in self._prefix_aliases:
            for n in list(paths):
                for prefix in row:
                    if n.startswith(prefix + ".") and len(n) > len(prefix) + 1:
                        rest = n[len(prefix) :]
                        for other in row:
                            add(other + rest)
        derive = self._derive.get(canon, ())
        plan = _Plan(
            tuple(tuple(p.split(".")) for p in paths),
            derive,
            tuple(paths),
            tuple(_spec(d, self._events) for d in derive),
        )
        self._plans[field] = plan
        return plan

    def view(self, record: Mapping[str, object]) -> RecordView:
        """A lazy view of ``record``: nothing is computed until a field is asked for."""
        return RecordView(self, record)

    def paths(self, field: str) -> tuple[str, ...]:
        """The dotted record paths read directly for ``field`` (derivations excluded)."""
        return tuple(".".join(p) for p in self._plan(field).paths)

    @property
    def planned_count(self) -> int:
        """How many fields have a plan so far (each field read gets one, once)."""
        return len(self._plans)

    def planned(self) -> dict[str, tuple[tuple[str, ...], tuple[tuple[object, ...], ...]]]:
        """The fields planned so far -> their plan's dotted paths and derivations
        (:attr:`_Plan.dotted`, :attr:`_Plan.spec`), as the C record view reads them.

        Safe while another thread plans fields (a matcher's tuning thread builds tables):
        the plans are copied in one step first."""
        return {f: (p.dotted, p.spec) for f, p in list(self._plans.items())}

    def raw_keys(self, field: str) -> frozenset[str]:
        """Record key names of which at least one occurs in any record where ``field`` has a
        value: the last component of every path that can supply it, directly or through a
        derivation (a key of a dotted literal key ``"a.b"`` contains ``b`` as a substring)."""
        return self._raw_keys(field, frozenset())

    def _raw_keys(self, field: str, seen: frozenset[str]) -> frozenset[str]:
        plan = self._plan(field)
        keys = {parts[-1] for parts in plan.paths}
        seen = seen | {field}
        for d in plan.derive:
            # ``unless`` fields only take a value away: a record without them still qualifies
            src = CHANNEL if isinstance(d, _WindowsEvent) else d.source
            if src not in seen:
                keys |= self._raw_keys(src, seen)
        return frozenset(keys)

    def verbatim(self, field: str) -> bool:
        """True when every *string* value the view yields for ``field`` is (a substring of) a
        string present in the record as is: direct paths and basenames are, looked-up or
        constant values are not. Non-string values (numbers, bools) are yielded unchanged."""
        plan = self._plan(field)
        for d in plan.derive:
            if isinstance(d, _Basename | _Copy):
                if not self.verbatim(d.source):
                    return False
            else:
                return False
        return True

    def derived(self, field: str) -> bool:
        """True when ``field`` can get a value through a derivation."""
        return bool(self._plan(field).derive)

    def direct_keys(self, field: str) -> frozenset[str]:
        """The last component of every direct path of ``field`` (derivations excluded)."""
        return frozenset(parts[-1] for parts in self._plan(field).paths)

    def derivations(self, field: str) -> tuple[tuple[str, str, str], ...]:
        """``field``'s derivations as ``(kind, source, value)``: ``("basename", source, "")``,
        ``("when_present", source, value)``, ``("windows_event", "category"|"type", "")``.

        What they need of a record, which is what the raw pre-filter reads them for: a copy is
        reported as a basename (both yield substrings of the source's values), and a constant
        with ``unless`` fields as a plain ``when_present`` (it needs the source too)."""
        out: list[tuple[str, str, str]] = []
        for d in self._plan(field).derive:
            if isinstance(d, _Basename | _Copy):
                out.append(("basename", d.source, ""))
            elif isinstance(d, _WhenPresent):
                out.append(("when_present", d.source, d.value))
            else:
                out.append(("windows_event", d.attr, ""))
        return tuple(out)

    def windows_events(self) -> tuple[tuple[str, int, tuple[str, ...], tuple[str, ...]], ...]:
        """Every ``windows_events`` row: (channel, event id, ECS categories, ECS types)."""
        return tuple(
            (e.channel, e.event_id, e.ecs_category, e.ecs_type) for e in self._events.values()
        )

    # ----------------------------------------------------------------- logsources

    def logsource_condition(self, logsource: Logsource | None) -> Node | None:
        """The condition a record must meet to be in this logsource; None = no restriction
        (also for no logsource).

        Known parts (product, category, service) are ANDed; an unknown part adds nothing.
        Windows categories hold either a Windows event-log record (channel + event id, flat
        or Winlogbeat shape) or, for records without a channel, the ECS equivalent.
        """
        if logsource is None:
            return None
        product = (logsource.product or "").lower() or None
        category = (logsource.category or "").lower() or None
        service = (logsource.service or "").lower() or None
        parts: list[Node] = []
        if product is not None and product in self._products:
            parts.append(self._products[product])
        if category is not None:
            cond = self._category_condition(product, category)
            if cond is not None:
                parts.append(cond)
        if service is not None:
            cond = self._services.get((product or "", service))
            if cond is None and product is None:
                cond = self._services.get(("windows", service))
            if cond is not None:
                parts.append(cond)
        if not parts:
            return None
        return and_(*parts)

    def _category_condition(self, product: str | None, category: str) -> Node | None:
        ecs = self._ecs_categories.get(category)
        rows = self._by_category.get(category, []) if product in (None, "windows") else []
        if not rows:
            return ecs
        win = or_(*(_event_row(r) for r in rows))
        if ecs is None:
            return win
        return or_(win, and_(not_(Exists(CHANNEL)), ecs))

    @property
    def version(self) -> str:
        """Content hash of the mapping (part of the table cache key)."""
        return self._version


def _event_row(row: _WinEvent) -> Node:
    return and_(
        Match(CHANNEL, wildcard_tokens(row.channel), cased=False), Equals(EVENT_ID, row.event_id)
    )


@cache
def _default() -> FieldMap:
    text = resources.files("ruletag").joinpath("data/fields.yaml").read_bytes()
    return FieldMap.from_bytes(text, "ruletag/data/fields.yaml")
