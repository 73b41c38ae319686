"""Per-value work has a bounded cost: no input can stall a worker (issue 13, finding 12).

Timing tests are written for a slow, shared CPU: they compare the cost of the same step at N and 4N
(linear: ~4x, the old quadratic patterns: 13x and more) with a wide margin, or bound one call by a
budget that the old code missed by a factor of 40 or more. Each cost is the best of several calls (a
preempted call says nothing about the code), and the budget grows with the cost of a fixed reference
workload measured in the same run, so a machine slowed down by other work doesn't fail them.
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Callable

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from guard.cdc.envelope import MAX_DECIMAL_BYTES, MAX_DECIMAL_SCALE, decode_value
from guard.classify.detectors import detect_column, detect_value
from guard.errors import DecodeError
from guard.protect import masking
from guard.protect.masking import MASK_KINDS, MAX_MASK_CHARS, mask


def _cost(fn: Callable[..., object], *args: object, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - start)
    return best


def _reference_work() -> None:
    sum(len(str(i)) for i in range(5_000))


#: What one bounded call may cost: 50 ms on a quiet machine, more when the same run measures the
#: reference workload as slower (a loaded or slower CPU). The old patterns took seconds.
BUDGET_S = max(0.05, 60 * _cost(_reference_work, repeat=7))


def _within_budget(fn: Callable[..., object], *args: object) -> bool:
    return _cost(fn, *args, repeat=3) < BUDGET_S


def _adversarial(n: int) -> list[str]:
    """Inputs that make backtracking patterns explode: long runs a quantifier can split many ways."""
    return [" " * n + "x", "1" + " " * n + "x", "+86" + " " * n + "x", "010-12345678" + " " * n + "x",
            "1-" * (n // 2) + "x", "1" * n + "@", "-" * n + "1", "省" * n, "a." * (n // 2) + "@", "\u3000" * n + "1"]


@pytest.mark.parametrize("kind", sorted(MASK_KINDS))
def test_every_mask_rule_is_linear_in_its_input(kind: str) -> None:
    rule = masking._MASKERS[kind]  # the rule itself, without the length cap of `mask`
    n = 4000
    for value_n, value_4n in zip(_adversarial(n), _adversarial(4 * n), strict=True):
        small, large = _cost(rule, value_n), _cost(rule, value_4n)
        assert large <= 8 * small + 0.005, (kind, value_n[:12], small, large)


@pytest.mark.parametrize("kind", sorted(MASK_KINDS))
@pytest.mark.parametrize("size", [MAX_MASK_CHARS, MAX_MASK_CHARS + 1, 16_000])
def test_mask_cost_is_bounded_at_and_beyond_the_length_limit(kind: str, size: int) -> None:
    for value in _adversarial(size):
        assert _within_budget(mask, kind, value[:size]), (kind, size, value[:12])


@pytest.mark.parametrize("kind", sorted(MASK_KINDS))
def test_a_megabyte_value_is_masked_at_once_and_shows_nothing(kind: str) -> None:
    for value in ("张" * 1_000_000, "1" * 1_000_000, "上海市浦东新区" + "路" * 1_000_000, "a" * 1_000_000 + "@qq.com"):
        assert _within_budget(mask, kind, value), kind
        assert mask(kind, value) == "******", kind


def test_values_over_the_limit_get_the_generic_mask() -> None:
    long_mobile = "138" + " " * MAX_MASK_CHARS + "12345678"
    assert mask("mobile", long_mobile) == "******"
    assert mask("address", "上海市浦东新区" + "某" * MAX_MASK_CHARS) == "******"
    assert mask("name", "张" * (MAX_MASK_CHARS + 1)) == "******"
    # at the limit the rule still applies
    assert mask("name", "张" * MAX_MASK_CHARS) == "张" + "*" * (MAX_MASK_CHARS - 1)


# The mobile rule's former pattern (quadratic on runs of spaces): the new one must give the same masks.
_OLD_MOBILE = re.compile(r"^\s*(\+\s*86|0086|86(?=1[3-9]\d{9}$))?[\s\-]*(\d[\d\s\-]*\d)\s*$")


def _old_mask_mobile(value: str) -> str:
    if len(value) == 11 and value.isdigit():
        return value[:3] + "****" + value[7:]
    m = _OLD_MOBILE.match(value)
    if m:
        digits = masking._SEPARATORS.sub("", m.group(2))
        body = masking._edges(digits, 3, 4, 4)
        return "+86 " + body if m.group(1) else body
    return masking._edges(value, 3, 4, 4)


_mobile_like = st.text(alphabet=st.sampled_from(list("0123456789+-  \n\t\u3000８x86138")), max_size=40)


@given(value=_mobile_like)
@example("8613812345678")
@example("8613812345678\n")
@example("8613812345678 ")
@example(" +86 138 1234 5678 ")
@example("\n0086-138-1234-5678\n\n")
@example("+ 86  13812345678")
@example("138 1234 5678 \u3000")
@settings(max_examples=1000, deadline=None)
def test_the_linear_mobile_rule_masks_exactly_like_the_old_one(value: str) -> None:
    assert masking._mask_mobile(value) == _old_mask_mobile(value)


# --- decimals of schema-wrapped events ---------------------------------------------------------------

def _wrapped_decimal_event(unscaled: bytes, scale: int) -> bytes:
    schema = {"type": "struct", "fields": [
        {"field": "after", "type": "struct", "optional": True, "fields": [
            {"field": "amount", "type": "struct", "name": "io.debezium.data.VariableScaleDecimal"}]}]}
    amount = {"scale": scale, "value": base64.b64encode(unscaled).decode()}
    payload = {"before": None, "after": {"id": 1, "amount": amount},
               "source": {"connector": "postgresql", "db": "d", "schema": "public", "table": "t", "lsn": 1},
               "op": "c", "ts_ms": 1}
    return orjson.dumps({"schema": schema, "payload": payload})


def test_a_decimal_at_the_size_limit_decodes_quickly_and_exactly() -> None:
    unscaled = b"\x7f" + b"\xff" * (MAX_DECIMAL_BYTES - 1)
    raw = _wrapped_decimal_event(unscaled, 2)
    assert _within_budget(decode_value, raw)
    event = decode_value(raw)
    assert event is not None and event.after is not None
    digits = str(int.from_bytes(unscaled, "big", signed=True))
    assert event.after["amount"] == digits[:-2] + "." + digits[-2:]


@pytest.mark.parametrize(("size", "scale"), [(MAX_DECIMAL_BYTES + 1, 2), (100_000, 0), (2_000_000, 0),
                                             (4, MAX_DECIMAL_SCALE + 1), (4, -MAX_DECIMAL_SCALE - 1)])
def test_a_decimal_over_the_limit_is_refused_at_once_with_a_reason(size: int, scale: int) -> None:
    raw = _wrapped_decimal_event(b"\x7f" + b"\x01" * (size - 1), scale)
    def refused() -> None:
        with pytest.raises(DecodeError) as err:
            decode_value(raw)
        assert err.value.reason == "decimal_too_large"
        assert "\x01" not in err.value.detail

    assert _cost(refused, repeat=3) < 4 * BUDGET_S  # parsing a 2.7 MB JSON value is most of it
    with pytest.raises(DecodeError) as err:
        decode_value(raw)
    assert err.value.reason == "decimal_too_large"
    assert "\x01" not in err.value.detail


# --- detectors (run once per table shape, on one sampled value) -----------------------------------------

@pytest.mark.parametrize("n", [16_000, 1_000_000])
def test_detectors_cost_is_bounded_on_adversarial_values(n: int) -> None:
    for value in _adversarial(n):
        assert _within_budget(detect_value, value), value[:12]
        assert _within_budget(detect_column, "remark", [value]), value[:12]
