"""Table plans: columns the catalog doesn't know are protected and get no display form (issue 13, finding 11)."""

from __future__ import annotations

from pathlib import Path

import pytest

from guard.classify.catalog import Action, Catalog
from guard.classify.plans import Classifier, infer_policy

REPO = Path(__file__).resolve().parents[2]

# One sampled value per column, as the classifier sees it when it first meets a table shape.
UNKNOWN_ROW = {
    "id": 7,
    "remark": "客户来电说明：请于下周联系 13812345678 办理",  # free text with an embedded mobile
    "phone_note": "13812345678",  # the name and the first value say "mobile", later values are free text
    "dz": "上海市浦东新区世纪大道100号",  # an address-shaped first value
    "mobile": "13912345678",
    "id_card": "11010519491231002X",
    "holder_name": "张三丰",
    "card_no": "6222021234567890128",
}


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog.load(REPO / "schemas" / "catalog.toml")


@pytest.mark.parametrize("action", [Action.ENCRYPT, Action.DROP, Action.HASH])
def test_unknown_columns_get_no_mask_whatever_the_detectors_see(action: Action) -> None:
    for column, value in UNKNOWN_ROW.items():
        policy = infer_policy(column, value, action)
        assert policy.mask is None, column
        assert policy.index is False, column
        assert policy.action is not Action.CLEAR, column


def test_a_table_the_catalog_does_not_know_has_no_masks_in_its_plan(catalog: Catalog) -> None:
    plan = Classifier(catalog).plan("public.drifted_table", UNKNOWN_ROW)
    assert plan.masks == ()
    assert plan.index == ()
    assert plan.clear == ()
    assert {p.name for p in plan.unclassified} == set(UNKNOWN_ROW)
    protected = set(plan.sealed) | set(plan.hashed) | set(plan.dropped)
    assert protected == set(UNKNOWN_ROW)


def test_new_columns_of_a_known_table_get_no_masks_but_catalogued_ones_keep_theirs(catalog: Catalog) -> None:
    row = {"customer_id": 1, "name": "张三", "mobile": "13812345678", "remark": "联系 13812345678",
           "phone_note": "13912345678", "dz": "北京市朝阳区建国路1号"}
    plan = Classifier(catalog).plan("public.customers", row)
    masks = dict(plan.masks)
    assert masks == {"name": "name", "mobile": "mobile"}
    assert {p.name for p in plan.unclassified} == {"remark", "phone_note", "dz"}
    assert {"remark", "phone_note", "dz"} <= set(plan.sealed)


def test_the_drift_description_still_says_what_the_detectors_saw(catalog: Catalog) -> None:
    plan = Classifier(catalog).plan("public.drifted_table", UNKNOWN_ROW)
    by_name = {p.name: p for p in plan.unclassified}
    assert by_name["mobile"].category == "contact"
    assert "mobile" in by_name["mobile"].detected_by
    assert "13912345678" not in by_name["mobile"].detected_by
