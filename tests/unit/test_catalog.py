"""The classification catalog: the shipped file covers the demo schema, and bad policies fail at load."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from guard.classify.catalog import Action, Catalog, CatalogError, ColumnPolicy, default_catalog_path
from guard.errors import ConfigError
from guard.protect.masking import MASK_KINDS
from guard.workload import synth

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog.load(REPO / "schemas" / "catalog.toml")


def test_default_location_is_the_repo_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GUARD_CATALOG", raising=False)
    assert default_catalog_path() == REPO / "schemas" / "catalog.toml"
    assert Catalog.load().tables() == Catalog.load(REPO / "schemas" / "catalog.toml").tables()


def test_env_var_overrides_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    alt = tmp_path / "alt.toml"
    alt.write_text(MINIMAL)
    monkeypatch.setenv("GUARD_CATALOG", str(alt))
    assert Catalog.load().tables() == ["public.t"]


def test_demo_schema_fully_catalogued(catalog: Catalog) -> None:
    assert catalog.tables() == ["branch_0202.accounts", "branch_0202.customer_auth", "branch_0202.customers",
                                "branch_0202.transactions", "guard_admin.principal_messages", "public.accounts",
                                "public.customer_auth", "public.customers", "public.staff", "public.staff_roles",
                                "public.transactions"]
    # the MariaDB branch's attribution rows (docs/policy.md): one column, who deleted, C1 in clear
    attribution = catalog.table("guard_admin.principal_messages")
    assert attribution is not None and list(attribution.columns) == ["principal"]
    assert (attribution.columns["principal"].data_class, attribution.columns["principal"].action) == ("C1",
                                                                                                      Action.CLEAR)
    data = synth.demo_dataset(1, 5)
    for table, rows in data.items():
        policy = catalog.table(f"public.{table}")
        assert policy is not None
        assert set(rows[0]) <= set(policy.columns), f"uncatalogued demo columns in {table}"
        assert policy.subject_column == "customer_id"
        assert catalog.column(f"public.{table}", "updated_by") is not None  # the attribution column
    for table, rows in synth.demo_staff().items():
        policy = catalog.table(f"public.{table}")
        assert policy is not None and set(rows[0]) | {"updated_by"} <= set(policy.columns)
    assert catalog.column("public.transactions", "txn_id") is not None  # bigserial key, not in synth rows
    assert catalog.table("public.customers").subject_root  # type: ignore[union-attr]


def test_the_mariadb_branch_tables_agree_with_the_postgresql_ones(catalog: Catalog) -> None:
    """Branch 0202 (MariaDB database branch_0202) has the same tables as branch 0101, classified the same way;
    its one extra column is the binary device fingerprint, sealed. Both have the attribution column `updated_by`
    (docs/policy.md), C1 in clear."""
    for table in ("customers", "accounts", "transactions", "customer_auth"):
        pg, maria = catalog.table(f"public.{table}"), catalog.table(f"branch_0202.{table}")
        assert pg is not None and maria is not None
        assert maria.columns["updated_by"].action is Action.CLEAR and maria.columns["updated_by"].data_class == "C1"
        assert {k: v for k, v in maria.columns.items() if k in pg.columns} == pg.columns, table
        extra = set(maria.columns) - set(pg.columns)
        assert extra == ({"device_fp"} if table == "customer_auth" else set()), table
        assert dataclasses.replace(maria, table=pg.table, columns=pg.columns) == pg, table
    device = catalog.column("branch_0202.customer_auth", "device_fp")
    assert device is not None and device.data_class == "C2" and device.action is Action.ENCRYPT


@pytest.mark.parametrize(
    ("table", "column", "data_class", "action", "mask", "index"),
    [
        ("customers", "id_number", "C2", Action.ENCRYPT, "resident_id", True),
        ("customers", "mobile", "C2", Action.ENCRYPT, "mobile", True),
        ("customers", "name", "C2", Action.ENCRYPT, "name", False),
        ("customers", "address", "C2", Action.ENCRYPT, "address", False),
        ("customers", "email", "C2", Action.ENCRYPT, "email", True),
        ("customers", "branch_code", "C1", Action.CLEAR, None, False),
        ("accounts", "account_no", "C2", Action.ENCRYPT, "bank_card", True),
        ("accounts", "card_no", "C2", Action.ENCRYPT, "bank_card", True),
        ("accounts", "balance", "C2", Action.ENCRYPT, None, False),
        ("accounts", "opened_at", "C1", Action.CLEAR, None, False),
        ("accounts", "currency", "none", Action.CLEAR, None, False),
        ("transactions", "amount", "C2", Action.ENCRYPT, None, False),
        ("transactions", "counterparty_name", "C2", Action.ENCRYPT, "name", False),
        ("transactions", "counterparty_account", "C2", Action.ENCRYPT, None, True),
        ("transactions", "memo", "C2", Action.ENCRYPT, None, False),
        ("transactions", "channel", "none", Action.CLEAR, None, False),
        ("customer_auth", "login_name", "C2", Action.ENCRYPT, None, True),
        ("customer_auth", "password_hash", "C3", Action.HASH, None, False),
        ("customer_auth", "query_pin", "C3", Action.DROP, None, False),
    ],
)
def test_demo_policies(
    catalog: Catalog, table: str, column: str, data_class: str, action: Action, mask: str | None, index: bool
) -> None:
    policy = catalog.column(f"public.{table}", column)
    assert policy is not None
    assert (policy.data_class, policy.action, policy.mask, policy.index) == (data_class, action, mask, index)
    assert policy.detected_by is None


def test_shipped_catalog_obeys_its_own_rules(catalog: Catalog) -> None:
    for name in catalog.tables():
        table = catalog.table(name)
        assert table is not None
        for col in table.columns.values():
            assert col.mask is None or col.mask in MASK_KINDS
            if col.data_class in ("C2", "C3") or col.sensitive:
                assert col.action is not Action.CLEAR, (name, col.name)
            if col.data_class == "C3":
                assert col.action in (Action.DROP, Action.HASH)


def test_defaults_and_retention(catalog: Catalog) -> None:
    assert catalog.defaults.unknown_column_action is Action.ENCRYPT
    assert catalog.defaults.retention_days["C2"] == 1825
    assert catalog.retention_days("public.transactions") == 1825
    assert catalog.retention_days("public.nope") is None


def test_unknown_lookups(catalog: Catalog) -> None:
    assert catalog.table("public.nope") is None
    assert catalog.column("public.nope", "x") is None
    assert catalog.column("public.customers", "nope") is None


def test_policies_are_immutable(catalog: Catalog) -> None:
    policy = catalog.column("public.customers", "mobile")
    assert isinstance(policy, ColumnPolicy)
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.action = Action.CLEAR  # type: ignore[misc]
    table = catalog.table("public.customers")
    assert table is not None
    with pytest.raises(TypeError):
        table.columns["mobile"] = policy  # type: ignore[index]


# ---- validation -------------------------------------------------------------------------------------

MINIMAL = """
version = 1
[defaults]
unknown_column_action = "encrypt"
[tables."public.t"]
subject_column = "cid"
[tables."public.t".columns]
cid = { class = "C1", category = "identifier", action = "clear" }
"""


def _with_column(spec: str, extra_table: str = "") -> str:
    return MINIMAL + f"col = {spec}\n" + extra_table


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ('{ class = "C2", category = "contact", action = "clear" }', "'clear' is not allowed for class C2"),
        ('{ class = "C3", category = "authentication", action = "clear" }', "not allowed for class C3"),
        ('{ class = "C3", category = "authentication", action = "encrypt" }', "must be 'drop' or 'hash'"),
        ('{ class = "C1", category = "x", sensitive = true, action = "clear" }', "sensitive"),
        ('{ class = "C2", category = "contact", action = "encrypt", mask = "phone" }', "unknown mask kind 'phone'"),
        ('{ class = "C3", category = "auth", action = "drop", mask = "generic" }', "needs action 'encrypt'"),
        ('{ class = "C3", category = "auth", action = "hash", index = true }', "blind index"),
        ('{ class = "C4", category = "x", action = "encrypt" }', "class 'C4'"),
        ('{ class = "C2", category = "x", action = "shred" }', "action 'shred'"),
        ('{ class = "C2", category = "x", acton = "encrypt" }', "unknown key(s) ['acton']"),
        ('{ class = "C2", action = "encrypt" }', "missing required key(s) ['category']"),
        ('{ class = "C2", category = "x", action = "encrypt", index = "yes" }', "true or false"),
    ],
)
def test_column_rule_violations_name_table_and_column(spec: str, fragment: str) -> None:
    with pytest.raises(CatalogError) as info:
        Catalog.from_toml(_with_column(spec), source="cat.toml")
    message = str(info.value)
    assert "cat.toml" in message and "'public.t'" in message and "'col'" in message
    assert fragment in message


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (MINIMAL.replace('subject_column = "cid"', 'subject_column = "customer"'), "subject_column 'customer'"),
        (MINIMAL.replace('"public.t"', '"t"'), "schema.table"),
        (MINIMAL.replace('unknown_column_action = "encrypt"', 'unknown_column_action = "clear"'), "fail closed"),
        (MINIMAL.replace("version = 1", "version = 2"), "unsupported catalog version"),
        (MINIMAL + "[tables.\"public.u\"]\nsubject_column = \"a\"\n", "non-empty [columns]"),
        (MINIMAL.replace("[defaults]", "[defaults]\nretention_days = { C2 = -1 }"), "non-negative"),
        (MINIMAL.replace("[defaults]", "[defaults]\nretention_days = { C9 = 1 }"), "'C9'"),
        ("tables = [", "not valid TOML"),
        ("surprise = 1\n" + MINIMAL, "unknown key(s) ['surprise']"),
        (MINIMAL + "surprise = 1\n", "must be an inline table"),
    ],
)
def test_table_and_file_errors(text: str, fragment: str) -> None:
    with pytest.raises(CatalogError) as info:
        Catalog.from_toml(text, source="cat.toml")
    assert fragment in str(info.value)


def test_catalog_error_is_a_config_error() -> None:
    assert issubclass(CatalogError, ConfigError)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CatalogError) as info:
        Catalog.load(tmp_path / "absent.toml")
    assert "absent.toml" in str(info.value)


def test_minimal_catalog_loads() -> None:
    cat = Catalog.from_toml(_with_column('{ class = "C2", category = "contact", action = "encrypt", mask = "mobile" }'))
    policy = cat.column("public.t", "col")
    assert policy is not None and policy.action is Action.ENCRYPT and policy.mask == "mobile"
    assert cat.defaults.unknown_column_action is Action.ENCRYPT
