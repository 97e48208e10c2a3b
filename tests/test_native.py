"""The C helpers (``ruletag.rules._native``) against their pure-Python references.

Each helper is run side by side with its reference on the same input (hypothesis-generated
records and values, real Hyperscan scans), and the matcher's differential suites are run
again in a child process with ``RULETAG_PURE_PYTHON=1``: both implementations must give the
same answers. The table cache key must tell the two builds apart.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import types
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import hyperscan
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ruletag.rules import fields, native
from ruletag.rules.compiler.codegen import (
    ALL,
    AND,
    ANY,
    LAZY,
    NOT,
    OR,
    CodeGen,
    Formula,
    Program,
    exec_formulas,
)
from ruletag.rules.ir import (
    And,
    Cidr,
    Compare,
    Const,
    Equals,
    Exists,
    FieldRef,
    IsNull,
    Node,
    Not,
    Or,
)
from ruletag.rules.matcher import table as table_mod
from support.paths import REPO

NATIVE = native.native_module()
needs_native = pytest.mark.skipif(
    NATIVE is None,
    reason="the C helpers are not built here (no C compiler when ruletag was installed, or "
    "RULETAG_PURE_PYTHON is set); the pure-Python reference runs instead",
)


def test_the_extension_is_built_wherever_a_compiler_is() -> None:
    """`make setup` on a machine with a C compiler must give the C helpers (else the fast
    path silently goes missing)."""
    if os.environ.get("RULETAG_PURE_PYTHON", "") not in ("", "0"):
        assert native.IMPLEMENTATION == "python"
        return
    compiler = sysconfig.get_config_var("CC") or "cc"
    if shutil.which(compiler.split()[0]) is None:
        pytest.skip(f"no C compiler ({compiler}) on this machine: the reference path runs")
    assert NATIVE is not None, "a C compiler is here but ruletag.rules._native is not built"
    assert f"c{NATIVE.ABI}" == native.IMPLEMENTATION


def test_an_older_build_is_not_used(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A C module built from older sources (another ABI) is never called with arguments it
    does not know: the reference runs, and the log says how to rebuild (once)."""
    import ruletag.rules

    monkeypatch.delenv("RULETAG_PURE_PYTHON", raising=False)
    monkeypatch.setattr(native, "_warned", [])
    monkeypatch.setattr(ruletag.rules, "_native", types.SimpleNamespace(ABI=native.ABI - 1), False)
    with caplog.at_level("WARNING", logger="ruletag.rules.native"):
        assert native.native_module() is None
        assert native.native_module() is None
    warned = [r.getMessage() for r in caplog.records if r.name == "ruletag.rules.native"]
    assert len(warned) == 1 and "make setup" in warned[0]
    monkeypatch.setattr(ruletag.rules, "_native", types.SimpleNamespace(ABI=native.ABI), False)
    assert native.native_module() is not None


# --------------------------------------------------------------------------- flatten_record

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.binary(max_size=6),
)
keys = st.one_of(
    st.sampled_from(["a", "b", "a.b", "b.c", "process", "name", "", "."]),
    st.integers(0, 3),
    st.text(max_size=4),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(keys, inner, max_size=4),
    ),
    max_leaves=30,
)
records = st.dictionaries(keys, values, max_size=6)


def _same(a: dict, b: dict) -> None:
    """Equal, in the same key order, with values of the same types (1 == 1.0 == True)."""
    assert list(a) == list(b)
    for k in a:
        assert [(type(v), v) for v in a[k]] == [(type(v), v) for v in b[k]], k


@needs_native
@settings(max_examples=400, deadline=None)
@given(records)
def test_flatten_record_is_the_reference(record: dict) -> None:
    _same(NATIVE.flatten_record(record), fields.py_flatten_record(record))


class _Items(Mapping):
    """A Mapping that is not a dict (records may come as any Mapping)."""

    def __init__(self, d: dict) -> None:
        self._d = d

    def __getitem__(self, k: object) -> object:
        return self._d[k]

    def __iter__(self) -> Iterator[object]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)


@needs_native
def test_flatten_record_walks_any_mapping_and_shares_no_state() -> None:
    inner = {"name": "cmd.exe", "args": ["/c", None, ["x"]], "none": None}
    record = {
        "process": _Items(inner),
        "proxy": types.MappingProxyType({"k": 1}),
        "list": [{"a": 1}, [{"a": 2}], None],
        "process.name": "dup.exe",
        3: "int key",
    }
    for rec in (record, _Items(record)):
        got = NATIVE.flatten_record(rec)
        _same(got, fields.py_flatten_record(rec))
    assert got["process.name"] == ["cmd.exe", "dup.exe"]
    assert got["list.a"] == [1, 2]
    assert inner["args"] == ["/c", None, ["x"]]  # the input is not touched


@needs_native
def test_deep_nesting_raises_recursion_error_not_a_crash() -> None:
    deep: dict = {}
    cur = deep
    for _ in range(200_000):
        cur["a"] = {}
        cur = cur["a"]
    with pytest.raises(RecursionError):
        NATIVE.flatten_record(deep)
    lst: list = []
    for _ in range(200_000):
        lst = [lst]
    with pytest.raises(RecursionError):
        NATIVE.flatten_record({"x": lst})


# --------------------------------------------------------------------------- scan handlers


@pytest.fixture(scope="module")
def db() -> hyperscan.Database:
    d = hyperscan.Database()
    d.compile(expressions=[b"abc", b"bc", b"x+", b"\\d{2}"], ids=[1, 2, 3, 4])
    return d


@needs_native
@pytest.mark.parametrize("only", [None, frozenset({2, 4}), {3}])
def test_adder_collects_what_the_reference_collects(db: hyperscan.Database, only: object) -> None:
    for data in (b"", b"abc xx 12 abcabc", b"zzz", b"x" * 1000 + b"99"):
        a: set[int] = set()
        b: set[int] = set()
        db.scan(data, match_event_handler=NATIVE.Adder(a, only))
        db.scan(data, match_event_handler=native.PyAdder(b, only))  # type: ignore[arg-type]
        assert a == b
    with pytest.raises(TypeError):
        NATIVE.Adder([], None)


@needs_native
@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(0, 20), max_size=12),
    st.lists(st.tuples(st.integers(0, 9), st.integers(0, 300)), max_size=40),
)
def test_entry_hits_files_matches_like_the_reference(lengths: list[int], calls: list) -> None:
    spans, pos = [], 0
    for n in lengths:
        spans.append((pos, pos + n))
        pos += n + (n % 3)  # gaps between entries too
    c, p = NATIVE.EntryHits(spans), native.PyEntryHits(spans)
    for i, to in calls:
        c(i, 0, to, 0, None)
        p(i, 0, to, 0, None)
    assert c.per_entry == p.per_entry


@needs_native
def test_entry_hits_refuses_unordered_or_malformed_spans() -> None:
    with pytest.raises(ValueError):
        NATIVE.EntryHits([(10, 20), (0, 5)])
    with pytest.raises(TypeError):
        NATIVE.EntryHits([(0, "x")])
    with pytest.raises(TypeError):
        NATIVE.EntryHits([[0, 5]])
    for wrong_size in ((0,), (0, 5, 9)):
        with pytest.raises(TypeError):
            NATIVE.EntryHits([wrong_size])
    with pytest.raises(OverflowError):
        NATIVE.EntryHits([(0, 2**70)])


texts = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.text(max_size=12),
    st.binary(max_size=8),
    st.binary(max_size=8).map(bytearray),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    st.lists(st.integers(), max_size=2),
)


@needs_native
@settings(max_examples=300, deadline=None)
@given(
    st.lists(texts, max_size=12),
    st.lists(st.sampled_from([9, 3, 2**40]), min_size=1, max_size=3),
    st.integers(0, 6),
    st.integers(1, 4),
)
def test_scan_cached_is_the_reference(
    vals: list, keys: list[int], limit: int, max_entries: int
) -> None:
    """Several field groups share one cache (a text's entry holds a (key, hits) pair per
    group): lookups, scans, the pairs added and the emptying, C against the reference."""

    def run(fn: object) -> tuple:
        calls: list[tuple[int, str]] = []
        hits: set[int] = {-1}
        cache: dict = {"pre": (9, (5,)), "a": (3, (6, 7), 2**40, ())}
        for key in keys:

            def miss(s: str, into: set[int], key: int = key) -> None:
                calls.append((key, s))
                into.update({len(s), hash(s) % 7 + 100, key % 11})

            fn(key, [*vals, "pre", "a"], hits, cache, miss, limit, max_entries)  # type: ignore[operator]
        return calls, hits, cache

    assert run(NATIVE.scan_cached) == run(table_mod.py_scan_cached)


@needs_native
def test_scan_cached_passes_errors_of_the_scan_on() -> None:
    def miss(s: str, into: set[int]) -> None:
        raise RuntimeError("scan failed")

    with pytest.raises(RuntimeError, match="scan failed"):
        NATIVE.scan_cached(0, ["a"], set(), {}, miss, 10, 10)
    with pytest.raises(TypeError):
        NATIVE.scan_cached(0, ["a"], [], {}, miss, 10, 10)
    for bad in ((0,), [0, (1,)], (0, [1]), "x"):  # a damaged cache entry: an error, not a crash
        with pytest.raises(TypeError, match="scan cache"):
            NATIVE.scan_cached(0, ["a"], set(), {"a": bad}, miss, 10, 10)
    cache = {"a": (1, (2,))}  # another group's entry: scanned for this one
    with pytest.raises(RuntimeError, match="scan failed"):
        NATIVE.scan_cached(0, ["a"], set(), cache, miss, 10, 10)
    assert cache == {"a": (1, (2,))}


# --------------------------------------------------------------------------- both builds


def _child(env_extra: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **env_extra}
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
    )


def test_the_cache_key_tells_the_two_builds_apart() -> None:
    code = (
        "from ruletag.rules import native, fields\n"
        "from ruletag.rules.fingerprint import compiler_fingerprint\n"
        "print(native.IMPLEMENTATION, fields.flatten_record is fields.py_flatten_record,"
        " compiler_fingerprint())"
    )
    pure = _child({"RULETAG_PURE_PYTHON": "1"}, "-c", code)
    assert pure.returncode == 0, pure.stderr
    impl, is_ref, key_py = pure.stdout.split()
    assert (impl, is_ref) == ("python", "True")
    if NATIVE is not None:
        built = _child({"RULETAG_PURE_PYTHON": ""}, "-c", code)
        assert built.returncode == 0, built.stderr
        impl, is_ref, key_c = built.stdout.split()
        assert (impl, is_ref) == (native.IMPLEMENTATION, "False")
        assert key_c != key_py


@pytest.mark.slow
# seven suites in one child, in pure Python: 2.4 min alone, over 5 min inside a full run on
# a slow day of a 2-core machine
@pytest.mark.timeout(900)
def test_differential_suites_pass_on_the_pure_python_reference(tmp_path: Path) -> None:
    """The matcher's differential and reference suites, run with the C helpers off."""
    suites = [
        "tests/test_differential.py",
        "tests/test_reference.py",
        "tests/test_table.py",
        "tests/test_fields.py",
        "tests/test_prefilter.py",
        "tests/test_corpus_sample.py",
        "tests/test_cli_match.py",  # every JSON line parsed with ujson, as without _jsonpack.c
        "tests/test_cli_match_workers.py",
    ]
    got = _child(
        {"RULETAG_PURE_PYTHON": "1", "XDG_CACHE_HOME": str(tmp_path)},
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-x",
        *suites,
    )
    assert got.returncode == 0, got.stdout[-3000:] + got.stderr[-2000:]
    assert " passed" in got.stdout


@needs_native
@settings(max_examples=200, deadline=None)
@given(records, st.lists(st.integers(0, 4), max_size=6), st.integers(0, 6))
def test_scan_groups_is_the_reference(record: dict, todo: list[int], limit: int) -> None:
    """Group skipping, value resolution through the record view (direct paths, derived
    fields, the view's cache) and the scan, C against the reference."""
    fm = fields.FieldMap.default()
    names = ["a", "a.b", "process.name", "b.c", "event.category"]

    def spec_of(log: list) -> tuple:
        def miss_of(name: str):
            def miss(s: str, into: set[int]) -> None:
                log.append((name, s))
                into.add(len(s) + 10 * names.index(name))

            return miss

        return tuple(
            (
                None if fm.derived(n) else frozenset(fm.paths(n)),
                n,
                fm.paths(n),
                i,
                miss_of(n),
            )
            for i, n in enumerate(names)
        )

    def run(fn: object) -> tuple:
        log: list = []
        view = fm.view(record)
        view.values("b.c")  # something already in the view's cache
        hits: set[int] = set()
        cache: dict = {}
        fn(todo, spec_of(log), view, view.flat(), view.value_cache, hits, cache, limit, 3)  # type: ignore[operator]
        return log, hits, cache, dict(view.value_cache)

    assert run(NATIVE.scan_groups) == run(table_mod.py_scan_groups)


# --------------------------------------------------------------------------- RecordView

_FM = fields.FieldMap.default()
#: every field with a derivation, the fields those read, and some direct ones
_FIELDS = sorted(
    set(_FM._derive)
    | {
        getattr(d, "source", "")
        for ds in _FM._derive.values()
        for d in ds
        if getattr(d, "source", "")
    }
    | {fields.CHANNEL, fields.EVENT_ID, "Image", "CommandLine", "EventID", "User", "a.b"}
)
_view_keys = st.sampled_from(
    [
        "Image",
        "ParentImage",
        "process.executable",
        "process.parent.executable",
        "file.path",
        "TargetFilename",
        "Channel",
        "EventID",
        "winlog.channel",
        "winlog.event_id",
        "aws.cloudtrail.error_code",
        "aws.cloudtrail.event_version",
        "azure.activitylogs.result_type",
        "azure.activitylogs.properties.result",
        "okta.event_type",
        "authenticationContext",
        "process",
        "winlog",
        "a.b",
    ]
)
_view_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 5000),
    st.sampled_from(
        [
            "C:\\Windows\\System32\\cmd.exe",
            "/usr/bin/curl",
            "no_separator",
            "trailing\\",
            "Security",
            "Microsoft-Windows-Sysmon/Operational",
            "4688",
            " 1 ",
            "\u0663",  # Arabic-Indic three: int() reads it
            "\u00b2",  # superscript two: a digit int() refuses
            b"3",
            "SUCCESS",
            "failure",
            "Unknown",
            "",
        ]
    ),
    st.text(max_size=6),
)
_view_values = st.recursive(
    _view_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(_view_keys, inner, max_size=3)
    ),
    max_leaves=12,
)


@needs_native
@settings(max_examples=400, deadline=None)
@given(
    st.dictionaries(_view_keys, _view_values, max_size=6),
    st.permutations(_FIELDS),
)
def test_record_view_values_are_the_reference(record: dict, order: list[str]) -> None:
    """The C ``values`` (plans, derivations, the cache) gives what the reference gives, for
    every derived field and what it reads, asked in any order."""
    assert fields.RecordView is not fields.PyRecordView
    ref = fields.PyRecordView(_FM, record)
    got = fields.RecordView(_FM, record)
    for f in order:
        want = ref.values(f)
        have = got.values(f)
        assert [(type(v), v) for v in have] == [(type(v), v) for v in want], f
        assert got.values(f) is have  # cached
    assert got.value_cache.keys() == ref.value_cache.keys()
    assert got.flat() == ref.flat() and got.strings() == ref.strings()
    assert got.record is record


@needs_native
def test_record_view_survives_odd_records_and_deep_derivations() -> None:
    """Bad plans raise clear errors, not crashes; a record without the fields gives []."""
    view = fields.RecordView(_FM, {})
    assert all(view.values(f) == [] for f in _FIELDS)
    with pytest.raises(AttributeError):
        fields.RecordView(object(), {})  # not a field map: no plans
    deep: dict = {}
    node = deep
    for _ in range(10_000):
        node["a"] = {}
        node = node["a"]
    with pytest.raises(RecursionError):
        fields.RecordView(_FM, deep).values("Image")


# --------------------------------------------------------------------------- holding

#: leaves 0-5 are scanned atoms (``i in h``), 6-9 lazy leaves (``L(i)``)
LEAVES = [Exists(f"f{i}") for i in range(10)]
EAGER = frozenset(range(6))


def _formulas(depth: int) -> st.SearchStrategy[Node]:
    leaf = st.one_of(st.sampled_from(LEAVES), st.builds(Const, st.booleans()))
    if depth == 0:
        return leaf
    sub = _formulas(depth - 1)
    return st.one_of(
        leaf,
        st.builds(Not, sub),
        st.builds(And, st.lists(sub, min_size=1, max_size=5).map(tuple)),
        st.builds(Or, st.lists(sub, min_size=1, max_size=5).map(tuple)),
    )


def _generated(formulas: list[Node]) -> tuple[tuple[Formula, ...], tuple[Program, ...]]:
    """The formulas as generated Python functions and as programs (one code generator)."""
    gen = CodeGen({n: i for i, n in enumerate(LEAVES)}, EAGER)
    code = compile(gen.module(formulas), "<test>", "exec")
    programs = tuple(gen.program(f) for f in formulas)
    return exec_formulas(code, gen.consts), programs


@needs_native
@settings(max_examples=400, deadline=None)
@given(
    st.lists(_formulas(3), min_size=1, max_size=6).map(lambda f: [*f, And(()), Or(())]),
    st.frozensets(st.integers(0, 5)),
    st.frozensets(st.integers(6, 9)),
)
def test_holding_is_the_generated_code(
    formulas: list[Node], hits: frozenset[int], true_lazies: frozenset[int]
) -> None:
    """The C walk of the programs selects the rules the generated functions select, and
    evaluates the same lazy leaves, each once (same short-circuit order)."""
    assert NATIVE is not None
    funcs, programs = _generated(formulas)
    calls: list[tuple[str, int]] = []

    def lazy_of(i: int, who: str) -> Callable[[object, dict[int, Any]], bool]:
        def leaf(view: object, cache: dict[int, Any]) -> bool:
            assert view == "view"
            calls.append((who, i))
            return i in true_lazies

        return leaf

    rules = list(range(len(formulas)))
    ref_cache: dict[int, Any] = {}
    ref_lazy = {i: lazy_of(i, "ref") for i in range(6, 10)}

    def L(i: int) -> bool:
        r = ref_cache.get(i)
        if r is None:
            r = ref_cache[i] = ref_lazy[i]("view", ref_cache)
        return r

    want = [k for k in rules if funcs[k](set(hits), L)]
    cache: dict[int, Any] = {}
    got = NATIVE.holding(
        rules, programs, set(hits), {i: lazy_of(i, "c") for i in range(6, 10)}, "view", cache
    )
    assert got == want
    assert cache == ref_cache
    assert [i for who, i in calls if who == "c"] == [i for who, i in calls if who == "ref"]


@needs_native
def test_holding_passes_errors_on_and_refuses_bad_programs() -> None:
    """A lazy leaf's exception reaches the caller; a malformed or absurdly deep program is a
    clear error, never a crash."""
    assert NATIVE is not None

    def boom(view: object, cache: object) -> bool:
        raise ValueError("leaf failed")

    with pytest.raises(ValueError, match="leaf failed"):
        NATIVE.holding([0], ((OR, 1, (LAZY, 7)),), set(), {7: boom}, None, {})
    assert NATIVE.holding([0], ((OR, 1, (LAZY, 7)),), {1}, {7: boom}, None, {}) == [0]
    with pytest.raises(KeyError):
        NATIVE.holding([0], ((LAZY, 8),), set(), {}, None, {})
    assert NATIVE.holding([0, 1], ((AND,), (OR,)), set(), {}, None, {}) == [0]
    for bad in ("x", (NOT,), (99, 1), None, 1.5):
        with pytest.raises((TypeError, ValueError)):
            NATIVE.holding([0], (bad,), set(), {}, None, {})
    with pytest.raises(IndexError):
        NATIVE.holding([1], (True,), set(), {}, None, {})
    deep: Program = 1
    for _ in range(100_000):
        deep = (NOT, deep)
    with pytest.raises(RecursionError):
        NATIVE.holding([0], (deep,), set(), {}, None, {})
    assert NATIVE.holding(
        [0, 1, 2], (True, False, (ALL, frozenset({1, 2}))), {1, 2}, {}, None, {}
    ) == [0, 2]
    assert NATIVE.holding(
        [0, 1], ((ANY, frozenset({3, 4})), (ANY, frozenset({5}))), {4}, {}, None, {}
    ) == [0]
    many = set(range(100))  # the smaller side is walked, whichever it is
    anys = ((ANY, frozenset({99})), (ANY, frozenset({100, 101})), (ANY, frozenset(range(90, 200))))
    assert NATIVE.holding([0, 1, 2], anys, many, {}, None, {}) == [0, 2]
    assert NATIVE.holding([0, 1, 2], anys, set(), {}, None, {}) == []
    assert NATIVE.holding([0, 1], ((ANY, (7, 8)), (ANY, [9])), {8}, {}, None, {}) == [0]


@needs_native
def test_evaluate_refuses_bad_context_and_passes_errors_on() -> None:
    """The one-call evaluation: a malformed context or view is a clear error; a lazy leaf's
    exception reaches the caller; no groups means no scan (the view is not even flattened)."""
    assert NATIVE is not None
    fm = fields.FieldMap.default()

    def boom(view: object, cache: object) -> bool:
        raise ValueError("leaf failed")

    ctx = ((), {}, ((OR, 1, (LAZY, 7)), (ALL, frozenset())), {7: boom}, 16, 16)
    view = fields.RecordView(fm, {"a": 1})
    with pytest.raises(ValueError, match="leaf failed"):
        NATIVE.evaluate(ctx, view, [0], frozenset())
    assert NATIVE.evaluate(ctx, view, [1], frozenset()) == [1]
    assert view._flat is None  # nothing scanned: the record was not flattened
    for bad in (None, (), ctx[:5], ((), [], *ctx[2:]), (*ctx[:4], "16", 16)):
        with pytest.raises(TypeError):
            NATIVE.evaluate(bad, view, [1], frozenset())
    with pytest.raises(IndexError):  # group 0 of an empty spec
        NATIVE.evaluate(ctx, view, [1], frozenset({0}))
    with pytest.raises(AttributeError):  # neither a record view nor anything like one
        NATIVE.evaluate(ctx, object(), [1], frozenset({0}))
    with pytest.raises(TypeError):
        NATIVE.evaluate(ctx, view, [1])
    with pytest.raises(TypeError, match="not initialised"):
        NATIVE.evaluate(ctx, fields.RecordView.__new__(fields.RecordView), [1], frozenset({0}))


@needs_native
def test_match_loop_refuses_bad_arguments() -> None:
    """The entry loop: a span outside the entries or a malformed plan is a clear error."""
    assert NATIVE is not None
    fm = fields.FieldMap.default()

    def ev(view: object, rules: tuple, groups: frozenset) -> list[int]:
        return list(rules)

    def loop(
        spans: list,
        plan: object,
        records: object = None,
        cands: object = None,
        paths: object = None,
    ) -> dict:
        out: dict = {}
        NATIVE.match_loop(
            [0],
            {0: (1,)} if cands is None else cands,
            {},
            lambda rules: plan,
            b"\x92\x01\x81\xa1a\x01",
            spans,
            records,
            fields.RecordView,
            fm,
            ev,
            None,
            msgpack.unpackb,
            table_mod._record_of,
            out,
            paths,
        )
        return out

    good = (None, (), frozenset(), (), (1,), frozenset())
    assert loop([(0, 6)], good) == {0: [1]}
    assert loop([(0, 6)], good, paths=NATIVE.PathTable({"a": 1})) == {0: [1]}
    with pytest.raises(TypeError, match="PathTable"):
        loop([(0, 6)], good, paths={"a": 1})
    assert loop([(0, 6)], good, records=[{"a": 1}]) == {0: [1]}
    assert loop([(0, 6)], good, records=[None]) == {}
    for span in ((0, 7), (-1, 3), (4, 2), (0,), "xx"):
        with pytest.raises((ValueError, TypeError)):
            loop([span], good)
    for plan in (None, good[:5], (None, (), frozenset(), (), [1], frozenset())):
        with pytest.raises(TypeError, match="plan"):
            loop([(0, 6)], plan)
    with pytest.raises(IndexError):  # an often-passed rule with no number back
        loop([(0, 6)], (ev, (3,), frozenset(), (), (), frozenset()))
    with pytest.raises(TypeError):
        loop([(0, 6)], good, cands=[])


# --------------------------------------------------------------------------- lazy leaves

_LEAF_FIELDS = ["EventID", "Initiated", "a.b", "n"]
_C_LEAVES: list[Node] = [
    *(Exists(f) for f in _LEAF_FIELDS),
    *(IsNull(f) for f in _LEAF_FIELDS),
    Equals("EventID", 4688),
    Equals("EventID", 0),
    Equals("n", 1.5),
    Equals("n", -3),
    Equals("Initiated", True),
    Equals("Initiated", False),
    *(
        Compare(f, op, v)
        for f in ("EventID", "n")
        for op in ("<", "<=", ">", ">=")
        for v in (3, 2.5)
    ),
    *(
        FieldRef(f, g, how, cased)  # type: ignore[arg-type]
        for f, g in (("n", "a.b"), ("a.b", "EventID"), ("n", "n"))
        for how in ("eq", "startswith", "endswith", "contains")
        for cased in (False, True)
    ),
]
_leaf_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5000),
    st.sampled_from([4688, 2**70, 1.5, 2.5, float("nan"), float("inf"), -0.0, 3.0]),
    st.sampled_from(
        ["4688", " 4688", "4688.0", "1e3", "-3", "+3", "2.5", "nan", "true", "True", "false"]
    ),
    st.sampled_from([b"4688", b"true", bytearray(b"3"), "\u0663", "x", "X", "Xy", "İ", "ß", "ẞ"]),
    st.text(max_size=4),
)
_leaf_records = st.dictionaries(
    st.sampled_from(["EventID", "Initiated", "a", "n", "a.b"]),
    st.one_of(
        _leaf_scalars,
        st.lists(_leaf_scalars, max_size=3),
        st.dictionaries(st.sampled_from(["b", "c"]), _leaf_scalars, max_size=2),
    ),
    max_size=4,
)


@needs_native
@settings(max_examples=400, deadline=None)
@given(_leaf_records)
def test_lazy_leaves_in_c_are_the_reference(record: dict) -> None:
    """Exists, IsNull, Equals (numbers and bools), Compare and FieldRef leaves in C give what
    the Python leaf functions give, on the C record view and on the reference view."""
    from ruletag.rules.matcher.leaves import lazy_fn, py_lazy_fn

    def kw(view: object, cache: object) -> set[int]:
        raise AssertionError("no keyword leaf here")

    fm = fields.FieldMap.default()
    for leaf in _C_LEAVES:
        c_leaf = lazy_fn(leaf, kw, 0)
        assert type(c_leaf).__name__ == "LazyLeaf"
        want = py_lazy_fn(leaf, kw, 0)(fields.PyRecordView(fm, record), {})
        assert c_leaf(fields.RecordView(fm, record), {}) is want, leaf
        assert c_leaf(fields.PyRecordView(fm, record), {}) is want, leaf


_IP_VALUES: list[object] = [
    "10.1.2.3",
    "010.1.2.3",
    "10.01.2.3",
    " 10.1.2.3 ",
    "10.1.2.3\n",
    "0.0.0.0",
    "00.0.0.0",
    "255.255.255.255",
    "255.255.255.254",
    "256.1.1.1",
    "1.2.3",
    "1.2.3.4.5",
    "1.2.3.4a",
    "1..2.3",
    "",
    ".1.2.3",
    "1.2.3.",
    "1.2.3.0004",
    "1.2.3.255",
    "1.2.3.256",
    "9.255.255.255",
    "11.0.0.0",
    "\u0661.\u0662.\u0663.\u0664",
    "::1",
    "fc00::1",
    "fe00::1",
    "::ffff:10.0.0.1",
    "::",
    "::0.0.0.1",
    b"10.1.2.3",
    167838211,
    10,
    None,
    1.5,
    True,
    "192.168.1.300",
    "192.168.001.1",
    "1.2.3.4 ",
    "1.2.3.4\x00",
    "1234.1.1.1",
    "1.2.3.-4",
    "+1.2.3.4",
]
_CIDRS = [
    ("10.0.0.0/8",),
    ("10.0.0.0/8", "fc00::/7"),
    ("0.0.0.0/32", "255.255.255.255/32"),
    ("255.255.255.0/24", "::/128"),  # merged across the IPv4/IPv6 boundary
    ("::/0",),
    ("0.0.0.0/0",),
    ("1.2.3.0/24", "1.2.3.128/25", "9.0.0.0/8", "11.0.0.0/8", "bad"),
    ("::ffff:0:0/96",),
    (),
]


@needs_native
def test_cidr_leaves_in_c_are_the_reference() -> None:
    """Cidr leaves in C (dotted-quad texts read here, anything else through _ip_int) give
    what the Python leaf gives: leading zeros, white space, non-ASCII digits, IPv6, ranges
    merged across the IPv4/IPv6 boundary, values that are not texts."""
    from ruletag.rules.matcher.leaves import lazy_fn, py_lazy_fn

    def kw(view: object, cache: object) -> set[int]:
        raise AssertionError("no keyword leaf here")

    fm = fields.FieldMap.default()
    seen = set()
    for nets in _CIDRS:
        leaf = Cidr("ip", nets)
        c_leaf = lazy_fn(leaf, kw, 0)
        assert type(c_leaf).__name__ == "LazyLeaf"
        py = py_lazy_fn(leaf, kw, 0)
        for v in _IP_VALUES:
            rec = {"ip": v}
            want = py(fields.PyRecordView(fm, rec), {})
            assert c_leaf(fields.RecordView(fm, rec), {}) is want, (nets, v)
            assert c_leaf(fields.PyRecordView(fm, rec), {}) is want, (nets, v)
            seen.add(want)
        rec = {"ip": list(_IP_VALUES)}
        assert c_leaf(fields.RecordView(fm, rec), {}) is py(fields.PyRecordView(fm, rec), {})
    assert seen == {True, False}
    for bad in ((), ((1,), ()), ((1,), (0,)), ((-1,), (2,)), (("a",), (1,)), [(1,), (2,)]):
        with pytest.raises(ValueError, match="LazyLeaf"):
            NATIVE.LazyLeaf(6, "ip", bad, None, abs)  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="LazyLeaf"):
        NATIVE.LazyLeaf(6, "ip", ((1,), (2,)))  # type: ignore[union-attr]


@needs_native
def test_lazy_leaves_in_c_refuse_bad_arguments() -> None:
    assert NATIVE is not None
    fm = fields.FieldMap.default()
    view = fields.RecordView(fm, {"n": "x"})
    for args in (
        (9, "n"),
        (2, "n", True),
        (3, "n", 1),
        (4, "n", 1, "==", abs),
        (4, "n", 1, "<"),
        (5, "n", "m", "like", abs),
        (5, "n", 3, "eq", abs),
        (5, "n", "m", "eq"),
    ):
        with pytest.raises(ValueError, match="LazyLeaf"):
            NATIVE.LazyLeaf(*args)
    leaf = NATIVE.LazyLeaf(4, "n", 1, "<", lambda v: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # the fallback's error reaches the caller
        leaf(view, {})
    with pytest.raises(TypeError):
        leaf(view)
    with pytest.raises(TypeError, match="not initialised"):
        NATIVE.LazyLeaf.__new__(NATIVE.LazyLeaf)(view, {})


# --------------------------------------------------------------------------- follow_triggers


@needs_native
@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.integers(0, 40), st.sets(st.integers(0, 5), min_size=1, max_size=3)),
    st.dictionaries(
        st.frozensets(st.integers(0, 5), min_size=1, max_size=3),
        st.tuples(st.tuples(st.integers(0, 9)), st.integers(0, 4), st.booleans(), st.booleans()),
    ),
    st.booleans(),
)
def test_follow_triggers_is_the_reference(per_entry: dict, triggered: dict, count: bool) -> None:
    """The tuned pre-filter's pass over the triggered entries: what the memo settles, what
    is left (in order, with its pattern set) and the pattern sets counted."""
    from collections import Counter

    from ruletag.rules.matcher import prefilter

    assert NATIVE is not None

    def run(fn: Callable[..., list]) -> tuple:
        out: dict = {-1: (0,)}
        fires: Counter | None = Counter({frozenset({9}): 2}) if count else None
        left = fn(per_entry, triggered, fires, out)
        return left, out, fires

    assert run(NATIVE.follow_triggers) == run(prefilter.py_follow_triggers)


@needs_native
def test_follow_triggers_refuses_bad_arguments() -> None:
    assert NATIVE is not None
    for args in (
        ([], {}, None, {}),
        ({}, {}, [], {}),
        ({0: {1}}, {frozenset({1}): (1,)}, None, {}),
    ):
        with pytest.raises(TypeError):
            NATIVE.follow_triggers(*args)
    with pytest.raises(TypeError):  # a pattern set that is no set
        NATIVE.follow_triggers({0: 5}, {}, None, {})


@needs_native
def test_fieldref_leaves_in_c_on_one_text_a_side() -> None:
    """The FieldRef case C answers itself (one text on each side): every operator, cased
    and caseless, against the reference."""
    from ruletag.rules.matcher.leaves import lazy_fn, py_lazy_fn

    fm = fields.FieldMap.default()
    texts = ["Xy", "X", "y", "xY", "", "İx", "ix", "STRASSE", "straße", "a\u0000b"]
    seen = set()
    for x in texts:
        for y in texts:
            record = {"n": x, "m": [y]}
            for how in ("eq", "startswith", "endswith", "contains"):
                for cased in (False, True):
                    leaf = FieldRef("n", "m", how, cased)  # type: ignore[arg-type]
                    want = py_lazy_fn(leaf, None, 0)(fields.PyRecordView(fm, record), {})  # type: ignore[arg-type]
                    got = lazy_fn(leaf, None, 0)(fields.RecordView(fm, record), {})  # type: ignore[arg-type]
                    assert got is want, (x, y, how, cased)
                    seen.add(want)
    assert seen == {True, False}


@needs_native
def test_match_loop_hands_out_views_that_keep_the_entries() -> None:
    """The entry a decoder is handed stays readable after the loop, whatever it kept: it is a
    slice of a view of the entries, not of their raw memory."""
    assert NATIVE is not None
    kept: list[memoryview] = []

    def decode(mv: memoryview) -> None:
        kept.append(mv)

    entries = bytes(msgpack.packb(["no number time", {"a": 1}])) * 2
    half = len(entries) // 2
    NATIVE.match_loop(
        [0, 1],
        {},
        {(): (None, (), frozenset(), (), (), frozenset())},
        None,
        entries,
        [(0, half), (half, len(entries))],
        None,
        fields.RecordView,
        fields.FieldMap.default(),
        None,
        None,
        msgpack.unpackb,
        decode,
        {},
        NATIVE.PathTable({"a": 1}),
    )
    want = entries[:half]
    del entries
    assert [bytes(mv) for mv in kept] == [want, want]


# --------------------------------------------------------------------------- flat_of

_KEYS = ["a", "b", "a.b", "c", "b.c", "\u0130", "x"]
_PATHS = ["a", "b", "a.b", "a.b.c", "b.c", "c", "a.a", "\u0130", "b.a.b", "\u0130.x", "a.x"]


class _Pairs(list):
    """A msgpack map as its (key, value) pairs, repeated keys included."""


class _Raw(bytes):
    """Bytes packed as they are (a key that is not UTF-8, an encoding msgpack does not pick)."""


def _pk(obj: Any) -> bytes:
    if isinstance(obj, _Raw):
        return bytes(obj)
    if isinstance(obj, _Pairs):
        n = len(obj)
        head = bytes([0x80 | n]) if n < 16 else b"\xde" + n.to_bytes(2, "big")
        return head + b"".join(_pk(k) + _pk(v) for k, v in obj)
    if isinstance(obj, list):
        return bytes([0x90 | len(obj)]) + b"".join(_pk(x) for x in obj)
    return bytes(msgpack.packb(obj))


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=4),
    st.binary(max_size=3),
    st.sampled_from(
        [
            _Raw(b"\xca\x3f\xc0\x00\x00"),  # float32 1.5
            _Raw(b"\xcf" + (7).to_bytes(8, "big")),  # a uint64 holding 7
            _Raw(b"\xd3" + (-1).to_bytes(8, "big", signed=True)),
            _Raw(b"\xd9\x02hi"),  # str8
            _Raw(b"\xa2\xff\xfe"),  # a text that is not UTF-8
            _Raw(b"\xc4\x00"),  # empty bin8
        ]
    ),
)
_keys = st.one_of(
    st.sampled_from(_KEYS),
    st.sampled_from([_Raw(b"\xa2\xff."), _Raw(b"\xa1\xc3"), 1, None, 2.5, b"a"]),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(st.tuples(_keys, inner), max_size=4).map(_Pairs),
    ),
    max_leaves=12,
)
_records = st.lists(st.tuples(_keys, _values), max_size=6).map(_Pairs)


def _same(a: object, b: object) -> bool:
    """Equal, with the same types throughout (NaN equal to NaN, -0.0 apart from 0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(map(_same, a, b))  # type: ignore[arg-type]
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)  # type: ignore[attr-defined,index]
    return repr(a) == repr(b)


@needs_native
@settings(max_examples=600, deadline=None)
@given(_records, st.sets(st.sampled_from(_PATHS), min_size=1), st.booleans())
def test_flat_of_is_the_reference(rec: _Pairs, wanted: set[str], plain: bool) -> None:
    """A record's values at the wanted paths, read from its bytes, are what decoding and
    flattening it gives there; where flat_of does not decide (None), it is for a reason
    the full decoding must settle: a repeated key on a wanted path, an extension type, a
    container as a key."""
    assert NATIVE is not None
    if plain:  # no repeated keys: flat_of always decides
        rec = _Pairs({k if isinstance(k, str) else "x": v for k, v in rec}.items())
    data = _pk(rec)
    paths = table_mod.path_table(wanted)
    assert paths.covered == frozenset(wanted)
    got = NATIVE.flat_of(paths, data, msgpack.unpackb)
    want = table_mod.py_flat_of(wanted, data)
    if got is not None:  # (paths below a wanted map may be there too: never read)
        got = {p: v for p, v in got.items() if p in wanted}
        assert want is not None and got.keys() == want.keys(), (got, want)
        assert all(_same(got[p], want[p]) for p in want), (got, want)
    elif plain:
        assert want is None or _has_ext_or_odd(rec), data


def _has_ext_or_odd(obj: Any) -> bool:
    if isinstance(obj, _Raw):
        return False
    if isinstance(obj, _Pairs):
        keys = [k for k, _ in obj]
        return len(keys) != len(set(map(repr, keys))) or any(_has_ext_or_odd(v) for _, v in obj)
    if isinstance(obj, list):
        return any(_has_ext_or_odd(x) for x in obj)
    return False


@needs_native
def test_flat_of_leaves_to_unpackb_what_it_cannot_decide() -> None:
    """flat_of answers None, never a guess, for what the full decoding settles: repeated
    keys on a read path, extension types anywhere, unhashable keys, bytes after the record,
    cut-short or malformed bytes, too deep a record; and refuses bad arguments."""
    assert NATIVE is not None
    paths = table_mod.path_table({"a", "b.c"})
    up = msgpack.unpackb

    def flat(data: bytes) -> object:
        return NATIVE.flat_of(paths, data, up)

    assert flat(_pk(_Pairs([("a", 1), ("z", 2), ("z", 3)]))) == {"a": [1]}  # z is not read
    deep: Any = 1
    for _ in range(70):
        deep = [deep]
    for data in (
        _pk(_Pairs([("a", 1), ("a", 2)])),
        _pk(_Pairs([("b", _Pairs([("c", 1), ("c", 2)]))])),
        _pk(_Pairs([("a", 1), ("z", msgpack.ExtType(1, b"x"))])),
        _pk(_Pairs([("a", 1), ("z", [msgpack.Timestamp(1)])])),
        _pk(_Pairs([("a", 1), ("z", _Pairs([(_Raw(b"\x91\x01"), 1)]))])),
        _pk(_Pairs([(_Raw(b"\x81\x01\x02"), 1)])),
        _pk(_Pairs([("a", 1)])) + b"\x00",
        _pk(_Pairs([("a", "text")]))[:-1],
        b"\xc1",
        b"\x91\x01",
        b"\xdf\xff\xff\xff\xff",
        _pk(_Pairs([("z", deep)])),
    ):
        assert flat(data) is None, data
    assert up(_pk(_Pairs([("a", 1), ("a", 2)]))) == {"a": 2}  # what the full decoding says
    with pytest.raises(TypeError):
        NATIVE.flat_of({"a": 1}, b"\x80", up)
    with pytest.raises(TypeError):
        NATIVE.PathTable({"a": 4})
    with pytest.raises(TypeError):
        NATIVE.PathTable({1: 1})
    # a path no record key decodes to, or too long to look up, is never covered, and a
    # plan reading one is not taken (its view checks each path, and decodes the record)
    plans = {"B": (("b",), ()), "Odd": (("b", "\ud800"), ()), "Long": (("a" * 2000,), ())}
    odd = NATIVE.PathTable({"\ud800": 1, "a" * 2000: 1, "b": 1}, plans)
    assert odd.covered == frozenset({"b"})
    assert odd.plans == {"B": (("b",), ())}
    for bad in ({"B": ("b", ())}, {"B": (("b",),)}, {1: (("b",), ())}):
        with pytest.raises(TypeError, match="plans"):
            NATIVE.PathTable({"b": 1}, bad)


@needs_native
def test_flat_of_reads_every_scalar_encoding() -> None:
    """Each msgpack scalar encoding, read from the bytes, is the value unpackb gives: ints of
    every width and sign (minimal or not), float32 and float64, texts (UTF-8 or not), bin."""
    assert NATIVE is not None
    encodings = [
        b"\x05",
        b"\xe0",
        b"\xff",
        b"\xcc\xff",
        b"\xcd\xff\xfe",
        b"\xce\xff\xff\xff\xfd",
        b"\xcf\xff\xff\xff\xff\xff\xff\xff\xfc",
        b"\xcf\x00\x00\x00\x00\x00\x00\x00\x07",
        b"\xd0\x80",
        b"\xd0\x7f",
        b"\xd1\x80\x00",
        b"\xd2\x80\x00\x00\x00",
        b"\xd3\x80\x00\x00\x00\x00\x00\x00\x00",
        b"\xd3\xff\xff\xff\xff\xff\xff\xff\xff",
        b"\xca\x3f\xc0\x00\x00",
        b"\xca\x7f\xc0\x00\x00",
        b"\xca\x80\x00\x00\x00",
        b"\xcb\x40\x09\x21\xfb\x54\x44\x2d\x18",
        b"\xc2",
        b"\xc3",
        b"\xa0",
        b"\xa3abc",
        b"\xd9\x02hi",
        b"\xda\x00\x01z",
        b"\xdb\x00\x00\x00\x01y",
        b"\xa2\xff\xfe",
        b"\xa3\xed\xb3\x80",
        b"\xc4\x00",
        b"\xc5\x00\x02ab",
        b"\xc6\x00\x00\x00\x01c",
    ]
    keys = [f"k{i}" for i in range(len(encodings))]
    data = bytes([0xDE]) + len(keys).to_bytes(2, "big")
    data += b"".join(_pk(k) + e for k, e in zip(keys, encodings, strict=True))
    got = NATIVE.flat_of(table_mod.path_table(keys), data, msgpack.unpackb)
    want = table_mod.py_flat_of(keys, data)
    assert got is not None and want is not None and got.keys() == want.keys() == set(keys)
    for k in keys:
        assert _same(got[k], want[k]), (k, got[k], want[k])
