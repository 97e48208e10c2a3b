"""``ruletag.rules.regex.needs_non_ascii``: which RE2 patterns an ASCII value can skip.

The matcher leaves a regex out of an ASCII value's scan when this says the regex needs a
non-ASCII character; a wrong "yes" would lose matches, so the property test below tries
to make RE2 match an ASCII text with a pattern judged to need one.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ruletag.rules.regex import compile_re2, needs_non_ascii

#: non-ASCII characters, among them two whose case folds onto ASCII (Kelvin sign: k,
#: long s: s) and one whose upper case is ASCII (dotless i: I)
ODD = ["é", "Ü", "\u212a", "\u017f", "\u0131", "ʰ", "Ā", "ж"]


@pytest.mark.parametrize(
    ("pattern", "needs"),
    [
        ("^.*[\u02b0-\u02ff\u1d2c-\u1dbb]+.*$", True),
        ("é", True),
        ("(?i)é", True),  # its other case, É, is not ASCII either
        ("aé", True),
        ("é|ü", True),
        ("(?:é|ö)+x", True),
        ("x{0,2}é{2}", True),
        ("[éü]", True),
        ("[\u0100-\uffff]", True),
        ("(?i)\u212a", False),  # the Kelvin sign matches k and K
        ("(?i)\u017f", False),  # the long s matches s and S
        ("(?i:\u212a)", False),
        ("(?i)[\u0100-\u2200]", False),  # holds the Kelvin sign
        ("a|é", False),
        ("é?", False),
        ("é*x", False),
        ("[éa]", False),
        ("[^a]", False),
        ("[^\\x00-\\x7f]", False),  # needs one, but negated classes are not walked
        (".", False),
        ("\\w", False),
        ("\\pL", False),  # Python's parser refuses it: possibly ASCII
        ("(", False),
        ("abc", False),
    ],
)
def test_needs_non_ascii(pattern: str, needs: bool) -> None:
    assert needs_non_ascii(pattern) is needs


_atom = st.one_of(
    st.sampled_from([*ODD, "a", "k", "s", "i", "K", "S", "I", "1", ".", "\\w", "\\s"]),
    st.lists(st.sampled_from([*ODD, "a", "k", "s", "z", "A-Z", "\u00c0-\u0250"]), min_size=1).map(
        lambda xs: "[" + "".join(xs) + "]"
    ),
)


def _patterns(depth: int) -> st.SearchStrategy[str]:
    if depth == 0:
        return _atom
    sub = _patterns(depth - 1)
    return st.one_of(
        _atom,
        st.lists(sub, min_size=1, max_size=4).map("".join),
        st.lists(sub, min_size=2, max_size=3).map(lambda xs: "(?:" + "|".join(xs) + ")"),
        st.tuples(sub, st.sampled_from(["?", "*", "+", "{2}", "{0,1}", "{1,3}"])).map(
            lambda t: "(?:" + t[0] + ")" + t[1]
        ),
        sub.map(lambda x: "(?i:" + x + ")"),
    )


@settings(max_examples=600, deadline=None)
@given(
    st.sampled_from(["", "(?i)", "(?s)", "(?is)"]),
    _patterns(3),
    st.lists(st.text(alphabet="akszAKSZiI1 .\n\\", max_size=12), min_size=1, max_size=8),
)
def test_a_pattern_said_to_need_non_ascii_matches_no_ascii_text(
    flags: str, body: str, texts: list[str]
) -> None:
    pattern = flags + body
    if not needs_non_ascii(pattern):
        return
    rx = compile_re2(pattern)
    for text in texts:
        assert rx.search(text) is None, (pattern, text)
