"""A Hugging Face ref (refs/main) is recognized without re: the same bytes as the pattern says."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from safeload.audit_walk import _is_ref_text

REF = re.compile(rb"[0-9a-f]{40}\n?")
HEX = "0123456789abcdef"


@pytest.mark.parametrize(
    ("data", "ref"),
    [
        (b"a" * 40, True),
        (b"0123456789abcdef" * 2 + b"01234567\n", True),
        (b"a" * 39, False),
        (b"a" * 39 + b"\n", False),
        (b"a" * 41, False),
        (b"a" * 40 + b"\n\n", False),
        (b"a" * 40 + b"\r", False),
        (b"A" * 40, False),  # git writes lowercase
        (b"g" * 40, False),
        (b"\n" + b"a" * 40, False),
        (b"", False),
    ],
)
def test_refs_and_near_misses(data: bytes, ref: bool) -> None:
    assert _is_ref_text(data) is ref
    assert (REF.fullmatch(data) is not None) is ref


@given(
    st.one_of(
        st.binary(max_size=42),
        st.text(alphabet=HEX + "AG\n\r ", min_size=38, max_size=42).map(str.encode),
    )
)
def test_what_the_pattern_matches(data: bytes) -> None:
    assert _is_ref_text(data) is (REF.fullmatch(data) is not None)
