"""Display masks: the documented forms, and the invariant that a mask never reveals its input."""

from __future__ import annotations

import random

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from guard.protect.masking import MASK_KINDS, mask
from guard.workload import synth


@pytest.mark.parametrize(
    ("kind", "value", "expected"),
    [
        ("mobile", "13812345678", "138****5678"),
        ("mobile", "138-1234-5678", "138****5678"),
        ("mobile", "+86 138 1234 5678", "+86 138****5678"),
        ("mobile", "008613812345678", "+86 138****5678"),
        ("bank_card", "6225881414207430", "622588******7430"),
        ("bank_card", "6222 0212 3456 7890 123", "622202*********0123"),
        ("bank_card", "01012860129040479", "010128*******0479"),  # account numbers use the card rule
        ("resident_id", "11010519491231002X", "110***********002X"),
        ("resident_id", "110105491231002", "110********1002"),
        ("name", "张三", "张*"),
        ("name", "王小明", "王**"),
        ("name", "欧阳娜娜", "欧阳**"),
        ("name", "司马光", "司马*"),
        ("address", "上海市浦东新区陆家嘴环路1000号12楼", "上海市浦东新区***"),
        ("address", "广东省深圳市南山区科技园路1号", "广东省深圳市南山区***"),
        ("address", "广西壮族自治区南宁市青秀区人民路1号", "广西壮族自治区南宁市青秀区***"),
        ("address", "浙江省杭州市桐庐县学院路88号", "浙江省杭州市桐庐县***"),
        ("address", "广东省东莞市长安镇沙头路100号", "广东省东莞市***"),
        ("email", "zhang.san@qq.com", "z***@qq.com"),
        ("landline", "021-68881234", "021-******34"),
        ("landline", "0755 88881234", "0755 ******34"),
        ("landline", "075588881234", "0755-******34"),
        ("passport", "E12345678", "E******78"),
        ("permit", "CA1234567", "C******67"),
        ("ipv4", "192.168.10.20", "192.168.*.*"),
        ("generic", "anything at all", "***"),
        ("generic", "a much longer value of sixteen+ chars", "******"),
    ],
)
def test_documented_forms(kind: str, value: str, expected: str) -> None:
    assert mask(kind, value) == expected


def test_kinds() -> None:
    assert {
        "mobile", "bank_card", "resident_id", "name", "address", "email", "landline", "passport", "generic",
    } <= MASK_KINDS
    assert isinstance(MASK_KINDS, frozenset)


@pytest.mark.parametrize("kind", ["password", "pin", "cvv", "auth_secret", "nope"])
def test_unknown_and_c3_kinds_raise_without_value(kind: str) -> None:
    value = "s3cr3t-value-123"
    with pytest.raises(ValueError) as info:
        mask(kind, value)
    assert value not in str(info.value)


def test_non_string_values() -> None:
    assert mask("mobile", 13812345678) == "138****5678"  # type: ignore[arg-type]
    assert mask("bank_card", b"6225881414207430") == "622588******7430"  # type: ignore[arg-type]


def test_already_masked_input_is_not_returned_as_is() -> None:
    for kind, value in [("mobile", "138****5678"), ("name", "张**"), ("bank_card", "622588******7430")]:
        out = mask(kind, value)
        assert out != value and value not in out


@pytest.mark.parametrize("kind", sorted(MASK_KINDS))
@given(value=st.text(min_size=4, max_size=40))
@example(value="****")
@example(value="1234")
@example(value="a@b.")
@example(value="欧阳娜娜")
@example(value="上海市浦东新区")
@example(value="+86 1")
@settings(max_examples=300, deadline=None)
def test_mask_never_reveals_input(kind: str, value: str) -> None:
    out = mask(kind, value)
    assert out != value
    assert value not in out


digitish = st.text(alphabet="0123456789 -+*xX", min_size=4, max_size=25)


@pytest.mark.parametrize("kind", sorted(MASK_KINDS))
@given(value=digitish)
@settings(max_examples=200, deadline=None)
def test_mask_never_reveals_digit_like_input(kind: str, value: str) -> None:
    out = mask(kind, value)
    assert out != value and value not in out


def test_synthetic_values_mask_to_expected_shape() -> None:
    rng = random.Random(11)
    for _ in range(500):
        m = synth.mobile(rng)
        assert mask("mobile", m) == m[:3] + "****" + m[7:]
        card = synth.bank_card(rng)
        masked = mask("bank_card", card)
        assert masked[:6] == card[:6] and masked[-4:] == card[-4:] and set(masked[6:-4]) == {"*"}
        idn = synth.resident_id(rng)
        masked = mask("resident_id", idn)
        assert idn[6:14] not in masked, "the birth date must be hidden"
        addr = synth.address(rng)
        masked = mask("address", addr)
        assert masked.endswith("***") and "号" not in masked
        assert not any(ch.isdigit() for ch in masked), "street numbers must be hidden"
