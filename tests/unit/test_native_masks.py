"""The native display masks (`guard_native.fast_mask`, native/src/mask.rs) against their definition,
`guard.protect.masking.mask`.

The native path computes the masks of common shapes itself and asks the Python function for the rest;
whatever it answers must be exactly what the Python function gives, and the shapes a branch's traffic
has must be answered natively (else the speed-up is gone without a test noticing).
"""

from __future__ import annotations

import os
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guard.protect import fastpath
from guard.protect.masking import COMPOUND_SURNAMES, MASK_KINDS, MAX_MASK_CHARS, mask
from guard.workload import synth

pytestmark = pytest.mark.skipif(os.environ.get("NATIVE") == "0",
                                reason="NATIVE=0: built without the compiled hot path")

NATIVE_KINDS = ("mobile", "bank_card", "resident_id", "name", "email", "generic")


@pytest.fixture(scope="module")
def fast_mask() -> Any:
    assert fastpath.native_available(), "guard_native is not installed: run `make venv` (needs cargo), or NATIVE=0"
    import guard_native
    return guard_native.fast_mask


def _agrees(fast_mask: Any, kind: str, value: str) -> bool:
    """Whether the native answer, if any, is the Python mask; True if it answered."""
    got = fast_mask(kind, value)
    if got is not None:
        assert got == mask(kind, value), (kind, value)
    return got is not None


# Characters where the rules' edges are: ASCII digits and letters, separators, whitespace of both
# definitions (Python's `str.isspace` counts U+001C-U+001F, Rust's `char::is_whitespace` doesn't),
# stars (already-masked input), `@`, `+`, CJK (surnames, compound surnames), non-ASCII digits and letters.
_EDGE_CHARS = st.sampled_from(list("0123456789Xx@+-* \t\n\u00a0\u3000\u001c\u001f\u0085\u2028")
                              + list("欧阳王五司马娜") + ["\u0661", "\uff11", "é", "\U0001f600"])
_VALUES = st.one_of(
    st.text(_EDGE_CHARS, max_size=24),
    st.text(max_size=24),
    st.from_regex(r"\A1[3-9]\d{9}\Z"),
    st.from_regex(r"\A\d{1,24}\Z"),
    st.from_regex(r"\A[0-9A-Za-z]{1,20}\Z"),
    st.from_regex(r"\A[a-z0-9._]{0,12}@[a-z0-9.]{0,12}\Z"),
    st.builds(lambda s, rest: s + rest, st.sampled_from(sorted(COMPOUND_SURNAMES)), st.text(max_size=4)),
)


@given(kind=st.sampled_from(sorted(MASK_KINDS)), value=_VALUES)
@settings(max_examples=3000, deadline=None)
def test_every_native_mask_is_the_python_mask(fast_mask: Any, kind: str, value: str) -> None:
    _agrees(fast_mask, kind, value)


def test_long_values_and_already_masked_values_get_the_generic_mask_as_in_python(fast_mask: Any) -> None:
    for kind in NATIVE_KINDS:
        for value in ("1" * (MAX_MASK_CHARS + 1), "王" * (MAX_MASK_CHARS + 3), "138****5678", "王*", "***@qq.com",
                      "a***@qq.com", "11", "1", ""):
            _agrees(fast_mask, kind, value)


def test_the_values_of_a_branch_are_masked_natively(fast_mask: Any) -> None:
    rng = random.Random(11)
    for n in range(300):
        customer = synth.new_customer(rng, n)
        for kind, column in (("name", "name"), ("mobile", "mobile"), ("resident_id", "id_number"),
                             ("email", "email")):
            assert _agrees(fast_mask, kind, str(customer[column])), (kind, customer[column])
        assert _agrees(fast_mask, "bank_card", synth.bank_card(rng))
        assert _agrees(fast_mask, "bank_card", synth.account_no(rng))


def test_other_kinds_are_left_to_python(fast_mask: Any) -> None:
    for kind in sorted(MASK_KINDS - set(NATIVE_KINDS)):
        assert fast_mask(kind, "上海市浦东新区世纪大道100号") is None
    assert fast_mask("mobile", "+86 138 1234 5678") is None
    assert fast_mask("name", " 王五") is None
