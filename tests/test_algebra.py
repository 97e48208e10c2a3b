"""The IR algebra (rules/algebra.py) and the pre-filter's requirement type."""

from __future__ import annotations

import marshal

from ruletag.rules.algebra import (
    and_,
    equals_value,
    ip_of,
    not_,
    number_of,
    or_,
    simplify,
    tokens,
    wildcard_match,
    wildcard_tokens,
)
from ruletag.rules.compiler import prefilter
from ruletag.rules.compiler.prefilter import NEVER, AllOf, AnyOf, Pattern
from ruletag.rules.ir import And, Const, Exists, IsNull, Match, Not, Or, Wild

a, b, c = Match("a", ("1",)), Match("b", ("2",)), Match("c", ("3",))


def test_constructors_flatten_dedupe_and_fold() -> None:
    assert and_(a, and_(b, a), c) == And((a, b, c))
    assert or_(a, Or((b, a))) == Or((a, b))
    assert and_(a, Const(True)) == a
    assert and_(a, Const(False)) == Const(False)
    assert or_(a, Const(True)) == Const(True)
    assert or_(a, Const(False), a) == a
    assert and_() == Const(True) and or_() == Const(False)
    assert not_(not_(a)) == a and not_(Const(True)) == Const(False)
    assert not_(IsNull("f")) == Exists("f") and not_(a) == Not(a)


def test_simplify_whole_tree() -> None:
    tree = And((Or((a, Const(False))), Not(Not(b)), And((a, Const(True))), Not(IsNull("f"))))
    assert simplify(tree) == And((a, b, Exists("f")))
    assert simplify(Or((And((a, Const(False))), Const(False)))) == Const(False)


def test_wildcard_tokens() -> None:
    assert tokens("a", "", "b", Wild.ANY, Wild.ANY, "c") == ("ab", Wild.ANY, "c")
    assert wildcard_tokens("**x?y*") == (Wild.ANY, "x", Wild.ONE, "y", Wild.ANY)
    assert wildcard_tokens("") == ()
    assert wildcard_match("C:\\X.EXE", wildcard_tokens("*.exe"), cased=False)
    assert not wildcard_match("C:\\X.EXE", wildcard_tokens("*.exe"), cased=True)
    assert wildcard_match("a\nb", wildcard_tokens("a?b"), cased=True)


def test_value_coercions() -> None:
    assert number_of("42") == 42 and number_of(b"-1.5e3") == -1500.0
    assert number_of(True) is None and number_of("4 2") is None
    assert number_of("9" * 5000) is None  # too long for int(): not a number, no error
    assert equals_value("4688", 4688) and equals_value("true", True)
    assert not equals_value(1, True) and not equals_value("x", 1)
    assert str(ip_of(b" 10.0.0.1 ")) == "10.0.0.1" and ip_of("nope") is None
    assert equals_value(4688.0, 4688) and not equals_value(None, 0)


def test_requirement_algebra_and_plain_form() -> None:
    p1, p2, k = Pattern(1), Pattern(2), Pattern(3)
    assert prefilter._and([p1, None, prefilter._and([p2, k])]) == AllOf(frozenset((p1, p2, k)))
    assert prefilter._and([p1, NEVER]) is NEVER
    assert prefilter._or([p1, None]) is None
    assert prefilter._or([NEVER, p2]) == p2
    assert prefilter._or([]) is NEVER and prefilter._and([]) is None
    # (a & k) | (b & k) -> k & (a | b)
    got = prefilter._or([AllOf(frozenset((p1, k))), AllOf(frozenset((p2, k)))])
    assert got == AllOf(frozenset((k, AnyOf(frozenset((p1, p2))))))
    assert got != AnyOf(frozenset((k, AnyOf(frozenset((p1, p2))))))
    plain = marshal.loads(marshal.dumps(prefilter._plain(got, {})))
    assert plain == ("&", frozenset((3, ("|", frozenset((1, 2))))))
    assert prefilter._typed(plain, {}) == got
