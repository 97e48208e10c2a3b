"""Differential test: the compiled table must agree with the reference evaluator, and the raw
pre-filtered path (match_entries) with match(). Any disagreement is a bug in one of them."""

from __future__ import annotations

import random
import re
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ruletag.rules.compiler import build
from ruletag.rules.fields import FieldMap
from ruletag.rules.ir import (
    Call,
    Literal_,
    Match,
    Node,
    Predicate,
    Regex,
    Rule,
    ValueExpr,
    Wild,
    fields_of,
)
from ruletag.rules.matcher import Matcher
from ruletag.rules.reference import reference_match
from support import paths
from support.codec import pack_records
from support.paths import SEED_RULES, needs_corpus
from test_table import RULES


def _walk(n: Node, out: list[Node]) -> None:
    args = getattr(n, "args", None)
    if isinstance(args, tuple) and all(not isinstance(a, str | int) for a in args):
        for a in args:
            if hasattr(a, "__dataclass_fields__") and not hasattr(a, "name"):
                _walk(a, out)
    elif hasattr(n, "arg"):
        _walk(n.arg, out)  # type: ignore[union-attr]
    else:
        out.append(n)


def _material(rules: Sequence[Rule], fm: FieldMap) -> tuple[list[str], list[str]]:
    """Field names and value texts taken from the rules (logsource conditions included)."""
    fields: set[str] = {"Image", "CommandLine", "EventID", "Channel", "message"}
    texts: set[str] = {"", "4688", "true", "10.1.2.3", "::1", "8.8.8.8"}
    for r in rules:
        cond = r.condition
        if r.logsource is not None:
            ls = fm.logsource_condition(r.logsource)
            if ls is not None:
                leaves: list[Node] = []
                _walk(ls, leaves)
                fields |= fields_of(ls)
                for leaf in leaves:
                    _texts_of(leaf, texts)
        fields |= fields_of(cond)
        leaves = []
        _walk(cond, leaves)
        for leaf in leaves:
            _texts_of(leaf, texts)
    return sorted(fields), sorted(texts)


def _texts_of(leaf: Node, out: set[str]) -> None:
    if isinstance(leaf, Match):
        out.add("".join("x" if t is Wild.ONE else "" if t is Wild.ANY else t for t in leaf.pattern))
        out.update(t for t in leaf.pattern if isinstance(t, str))
    elif isinstance(leaf, Regex):
        out.add("".join(c for c in leaf.pattern if c.isalnum()))
        # the words of a KQL text-field phrase, as a sentence
        words = re.split(r"\\p[LN]|\\x\{[0-9a-f]+\}|\W+", leaf.pattern)
        out.add(" ".join(w for w in words if w))
    elif isinstance(leaf, Predicate):  # the literals of computed comparisons (EQL, ES|QL)
        _literal_texts(leaf.left, out)
        for r in leaf.right if isinstance(leaf.right, tuple) else (leaf.right,):
            _literal_texts(r, out)
    for attr in ("value",):
        v = getattr(leaf, attr, None)
        if isinstance(v, int | float | bool):
            out.add(str(v))
    for net in getattr(leaf, "networks", ()) or ():
        out.add(net.split("/")[0])


def _literal_texts(v: ValueExpr, out: set[str]) -> None:
    if isinstance(v, Literal_) and isinstance(v.value, str) and len(v.value) < 200:
        out.add("".join(c for c in v.value if c.isalnum() or c in " ./-_:") or v.value)
    elif isinstance(v, Call):
        for a in v.args:
            _literal_texts(a, out)


def _mutate(draw: st.DrawFn, text: str) -> object:
    how = draw(
        st.sampled_from(
            [
                "same",
                "upper",
                "swap",
                "prefix",
                "suffix",
                "both",
                "num",
                "list",
                "unicode",
                "newline",
            ]
        )
    )
    if how == "upper":
        return text.upper()
    if how == "swap":
        return text.swapcase()
    if how == "prefix":
        return draw(st.sampled_from(["C:\\x\\", "a", " ", "\u212a"])) + text
    if how == "suffix":
        return text + draw(st.sampled_from(["\\", "x", " ", ".exe"]))
    if how == "both":
        return "Z" + text + "Z"
    if how == "num":
        try:
            return int(text)
        except ValueError:
            return text == "true" if text in ("true", "false") else text
    if how == "list":
        return [text, draw(st.sampled_from(["other", 1, None]))]
    if how == "unicode":
        return text.replace("i", "\u0130").replace("a", "ä")
    if how == "newline":
        return text + "\n"
    return text


def records_from(fields: list[str], texts: list[str]) -> st.SearchStrategy[dict]:
    @st.composite
    def build(draw: st.DrawFn) -> dict:
        rec: dict[str, object] = {}
        for _ in range(draw(st.integers(1, 6))):
            name = draw(st.sampled_from(fields))
            value = _mutate(draw, draw(st.sampled_from(texts)))
            if draw(st.booleans()) and "." in name:
                head, _, tail = name.partition(".")  # nested form of a dotted name
                sub = rec.setdefault(head, {})
                if isinstance(sub, dict):
                    sub[tail] = value
            else:
                rec[name] = value
        return rec

    return build()


def _check(table: Matcher, fm: FieldMap, records: list[dict]) -> None:
    rules = table.table.rules
    for rec in records:
        got = [rules[i].id for i in table.match(rec)]
        assert got == reference_match(rules, rec, fm), rec
    buf, spans = pack_records(records)
    want = {k: table.match(r) for k, r in enumerate(records)}
    assert table.match_entries(buf, spans) == {k: v for k, v in want.items() if v}


def _rules_small() -> list[Rule]:
    from ruletag.rules.loader import load_rules

    seeds = load_rules([SEED_RULES]).rules
    assert len(seeds) == 2, "the two seed rules did not load"
    return [*RULES, *seeds]


FM = FieldMap.default()
SMALL = _rules_small()
SMALL_TABLE = Matcher(build(SMALL, FM))
SMALL_FIELDS, SMALL_TEXTS = _material(SMALL, FM)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(records_from(SMALL_FIELDS, SMALL_TEXTS), min_size=1, max_size=8))
def test_table_agrees_with_reference_on_hand_built_and_seed_rules(records: list[dict]) -> None:
    _check(SMALL_TABLE, FM, records)


def _tuned(table: Matcher, fields: list[str], texts: list[str], n: int) -> Matcher:
    """``table`` after its pre-filter re-tuned on ``n`` random records of ``fields``/``texts``
    (triggers by measured frequency, common patterns dropped, the table of often-passed
    rules): the tuned path must agree exactly like the compiled one."""
    rng = random.Random(7)
    records = [
        {rng.choice(fields): rng.choice(texts) for _ in range(rng.randint(1, 6))} for _ in range(n)
    ]
    buf, spans = pack_records(records)
    table.set_tune_after(n)
    deadline = time.monotonic() + 120
    while "raw_tuned_on_records" not in table.stats:
        assert table.raw is not None and table.raw.tune_error is None
        assert time.monotonic() < deadline, "the pre-filter did not re-tune"
        table.match_entries(buf, spans)
        time.sleep(0.01)
    return table


TUNED_TABLE = _tuned(Matcher(build(SMALL, FM)), SMALL_FIELDS, SMALL_TEXTS, 400)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(records_from(SMALL_FIELDS, SMALL_TEXTS), min_size=1, max_size=8))
def test_retuned_table_agrees_with_reference(records: list[dict]) -> None:
    _check(TUNED_TABLE, FM, records)


@pytest.fixture(scope="module")
def corpus() -> tuple[Matcher, list[str], list[str]]:
    from ruletag.rules.loader import load_rules

    rules = load_rules([paths.corpus("sigma"), paths.corpus("elastic")]).rules
    assert len(rules) > 4000, f"the front-ends loaded only {len(rules)} corpus rules"
    fields, texts = _material(rules, FM)
    return Matcher(build(rules, FM)), fields, texts


@needs_corpus
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_table_agrees_with_reference_on_whole_corpus(
    corpus: tuple[Matcher, list[str], list[str]],
) -> None:
    table, fields, texts = corpus

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(records_from(fields, texts), min_size=1, max_size=4))
    def run(records: list[dict]) -> None:
        _check(table, FM, records)

    run()
    _tuned(table, fields, texts, 2000)
    run()


@needs_corpus
def test_table_agrees_with_reference_on_corpus_esql_rules() -> None:
    """The ES|QL rules of the corpus alone: their computed values (REPLACE, DISSECT, GROK, ...)
    run through the reference evaluator in both paths, so a small table shows disagreements
    quickly."""
    from ruletag.rules.loader import load_rules

    rules = [
        r
        for r in load_rules([paths.corpus("elastic")]).rules
        if 'language = "esql"' in Path(r.path).read_text(encoding="utf-8")
    ]
    assert len(rules) >= 30, f"only {len(rules)} ES|QL corpus rules loaded"
    fields, texts = _material(rules, FM)
    table = Matcher(build(rules, FM))

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(records_from(fields, texts), min_size=1, max_size=4))
    def run(records: list[dict]) -> None:
        _check(table, FM, records)

    run()
