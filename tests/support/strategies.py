"""Hypothesis strategies for arbitrary msgpack values (the codec fuzzers and the entry walk)."""

from __future__ import annotations

import msgpack
from hypothesis import strategies as st

#: every msgpack scalar type: nil, bool, ints at both ends, floats (NaN, inf), str, bin, ext
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.binary(max_size=20),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=12)),
)
#: scalars nested in arrays and maps (keys: text, ints, bin), up to 12 leaves
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.one_of(st.text(max_size=8), st.integers(-9, 2**40), st.binary(max_size=4)),
            inner,
            max_size=4,
        ),
    ),
    max_leaves=12,
)
