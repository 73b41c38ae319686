"""The Debezium connector rendered from the catalog: C3 columns excluded or hashed at the source, every
option documented, no secret in the rendered document (issue 20, item 5)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from guard.classify.catalog import Action, Catalog
from guard.classify.source import (
    MESSAGE_PREFIX_OPTION,
    SALT_PLACEHOLDER,
    column_pattern,
    hash_column_problem,
    hash_option,
    is_source_hash,
    source_options,
    source_rules,
)
from guard.doctor.c3 import c3_violations
from guard.stack.config import StackConfig
from guard.stack.connector import (
    connector_hash_salt,
    mariadb_attribution_options,
    redact,
    render_connector,
    resolve_connector,
)
from guard.stack.errors import StackError

REPO = Path(__file__).resolve().parents[2]
CATALOG = REPO / "schemas" / "catalog.toml"

EXTRA_C3 = """
[tables."public.staff_tokens"]
[tables."public.staff_tokens".columns]
staff_id = { class = "C1", category = "identifier", action = "clear" }
otp_seed = { class = "C3", category = "authentication", action = "drop" }
"""


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog.load(CATALOG)


@pytest.fixture
def cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> StackConfig:
    monkeypatch.delenv("GUARD_CONNECTOR_SALT_FILE", raising=False)
    return StackConfig.from_env({"GUARD_STACK_HOME": str(tmp_path / "home"), "GUARD_CACHE_DIR": str(tmp_path)})


def test_every_c3_column_of_the_catalog_gets_a_source_rule(catalog: Catalog) -> None:
    rules = {(r.table, r.column): r.action for r in source_rules(catalog)}
    c3 = {(t, c) for t in catalog.tables() for c, col in catalog.table(t).columns.items()  # type: ignore[union-attr]
          if col.data_class == "C3"}
    assert set(rules) == c3
    # the demo catalog: the PIN is dropped (excluded), the password verifier hashed, in both branches
    assert rules == {("public.customer_auth", "password_hash"): Action.HASH,
                     ("public.customer_auth", "query_pin"): Action.DROP,
                     ("branch_0202.customer_auth", "password_hash"): Action.HASH,
                     ("branch_0202.customer_auth", "query_pin"): Action.DROP}


def test_each_connector_gets_the_rules_of_its_own_namespace_only(catalog: Catalog) -> None:
    """The PostgreSQL connector (schema public) and the MariaDB one (database branch_0202) each filter their own
    tables' C3 columns: Debezium's patterns name `<schema or database>.<table>.<column>` for both."""
    assert all(p.startswith("public") for v in source_options(catalog, "public").values() for p in v.split(","))
    assert source_options(catalog, "branch_0202") == {
        "column.exclude.list": r"branch_0202\.customer_auth\.query_pin",
        f"column.mask.hash.v2.SHA-256.with.salt.{SALT_PLACEHOLDER}": r"branch_0202\.customer_auth\.password_hash",
    }
    template = json.loads((REPO / "connectors" / "branch-mariadb.json").read_text())
    doc = render_connector(catalog, REPO / "connectors" / "branch-mariadb.json", "branch_0202")
    attribution = mariadb_attribution_options(template["config"])
    assert {k: v for k, v in doc["config"].items() if k in template["config"] and k not in attribution} == {
        k: v for k, v in template["config"].items() if k not in attribution}
    assert set(doc["config"]) - set(template["config"]) == set(source_options(catalog, "branch_0202")) | (
        set(attribution) - set(template["config"]))
    assert doc["config"]["connector.class"] == "io.debezium.connector.mariadb.MariaDbConnector"
    assert "public" not in json.dumps(doc)


def test_the_mariadb_connector_captures_the_attribution_table_and_routes_it_to_the_message_topic(
        catalog: Catalog) -> None:
    """MariaDB has no logical decoding messages: the delete triggers' rows in guard_admin.principal_messages
    are the attribution (docs/policy.md); the connector captures that table too and its events go to
    `<prefix>.message`, where the PostgreSQL branch's messages go. Nothing else is routed."""
    doc = render_connector(catalog, REPO / "connectors" / "branch-mariadb.json", "branch_0202")
    _, config = resolve_connector(doc, {**dict.fromkeys(
        ("CONNECTOR_NAME", "DB_HOST", "DB_PORT", "CDC_USER", "CDC_PASSWORD", "CONNECTOR_SERVER_ID", "DB_SSL_MODE",
         "DB_TRUSTSTORE", "DB_TRUSTSTORE_PASSWORD", "KAFKA_BOOTSTRAP", "KAFKA_JAAS", "KAFKA_CA_FILE",
         "CONNECTOR_HASH_SALT"), "x"), "DB_NAME": "branch_0202", "TOPIC_PREFIX": "br0202"})
    assert config["database.include.list"] == "branch_0202,guard_admin"
    assert config["transforms"] == "attribution"
    assert config["transforms.attribution.type"] == "org.apache.kafka.connect.transforms.RegexRouter"
    regex = re.compile(config["transforms.attribution.regex"])
    routed = {t: regex.fullmatch(t) is not None for t in (
        "br0202.guard_admin.principal_messages", "br0202.branch_0202.customers",
        "br0202Xguard_admin.principal_messages", "br0202.guard_admin.principal_messages2")}
    assert routed == {"br0202.guard_admin.principal_messages": True, "br0202.branch_0202.customers": False,
                      "br0202Xguard_admin.principal_messages": False, "br0202.guard_admin.principal_messages2": False}
    assert config["transforms.attribution.replacement"] == "br0202.message"
    # the PostgreSQL connector has its logical messages instead, and no router
    assert "transforms" not in render_connector(catalog)["config"]
    with pytest.raises(StackError, match="already has a transform"):
        mariadb_attribution_options({"transforms": "attribution"})


def test_options_exclude_drop_columns_and_hash_hash_columns(catalog: Catalog) -> None:
    options = source_options(catalog, "public")
    assert options == {
        "column.exclude.list": r"public\.customer_auth\.query_pin",
        f"column.mask.hash.v2.SHA-256.with.salt.{SALT_PLACEHOLDER}": r"public\.customer_auth\.password_hash",
    }


def test_patterns_match_only_their_column() -> None:
    pattern = column_pattern("public.customer_auth", "query_pin")
    assert re.fullmatch(pattern, "public.customer_auth.query_pin")
    assert not re.fullmatch(pattern, "public.customer_authXquery_pin")
    assert not re.fullmatch(pattern, "public.customer_auth.query_pin2")


def test_a_catalog_change_changes_the_options(catalog: Catalog) -> None:
    more = Catalog.from_toml(CATALOG.read_text() + EXTRA_C3)
    assert source_options(more, "public")["column.exclude.list"] == (r"public\.customer_auth\.query_pin,"
                                                          r"public\.staff_tokens\.otp_seed")


def test_no_c3_column_no_options() -> None:
    plain = Catalog.from_toml('version = 1\n[tables."public.t".columns]\n'
                              'id = { class = "C1", category = "identifier", action = "clear" }\n')
    assert source_options(plain) == {}


def test_rendered_document_is_the_template_plus_the_catalog_options(catalog: Catalog) -> None:
    template = json.loads((REPO / "connectors" / "branch-postgres.json").read_text())
    doc = render_connector(catalog)
    assert doc["name"] == template["name"]
    assert {k: v for k, v in doc["config"].items() if k in template["config"]} == template["config"]
    assert set(doc["config"]) - set(template["config"]) == set(source_options(catalog)) | {MESSAGE_PREFIX_OPTION}
    assert doc["config"][MESSAGE_PREFIX_OPTION] == "guard.principal"  # the attribution of deletes


def test_every_rendered_option_is_documented(catalog: Catalog) -> None:
    readme = (REPO / "connectors" / "README.md").read_text()
    rendered = [*render_connector(catalog)["config"],
                *render_connector(catalog, REPO / "connectors" / "branch-mariadb.json", "branch_0202")["config"]]
    for option in rendered:
        documented = option.replace(SALT_PLACEHOLDER, "<salt>")
        assert f"`{documented}`" in readme, f"{documented} is not documented in connectors/README.md"


def test_no_secret_in_the_rendered_document(catalog: Catalog, cfg: StackConfig) -> None:
    salt = connector_hash_salt(cfg)
    text = json.dumps(render_connector(catalog))
    assert salt not in text
    assert '"database.password": "${CDC_PASSWORD}"' in text
    # ... and resolving puts the salt into the option name, the password into its value
    name, config = resolve_connector(render_connector(catalog), {
        "CONNECTOR_NAME": "c", "DB_HOST": "h", "DB_PORT": "1", "DB_NAME": "d", "CDC_USER": "u",
        "CDC_PASSWORD": "pw-secret", "TOPIC_PREFIX": "br", "SLOT_NAME": "s", "PUBLICATION_NAME": "p",
            "DB_SSLMODE": "verify-full", "DB_SSLROOTCERT": "/ca.crt",
        "CONNECTOR_HASH_SALT": salt})
    assert config[hash_option(salt)] == r"public\.customer_auth\.password_hash"
    assert config["database.password"] == "pw-secret" and name == "c"
    assert not any("${" in k or "${" in v for k, v in config.items())


def test_cli_render_prints_no_secret_and_says_what_each_c3_column_gets(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from guard.cli import main

    salt_file = tmp_path / "salt"
    salt_file.write_text("ab" * 32)
    os.chmod(salt_file, 0o600)
    monkeypatch.setenv("GUARD_CONNECTOR_SALT_FILE", str(salt_file))
    result = CliRunner().invoke(main, ["connector", "render", "--catalog", str(CATALOG)])
    assert result.exit_code == 0, result.output
    assert "ab" * 32 not in result.output
    doc = json.loads(result.stdout)
    assert doc["config"]["column.exclude.list"] == r"public\.customer_auth\.query_pin"
    assert "public.customer_auth.query_pin: catalog action 'drop'" in result.stderr
    assert "public.customer_auth.password_hash: catalog action 'hash'" in result.stderr


def test_a_template_may_not_set_column_filters(catalog: Catalog, tmp_path: Path) -> None:
    template = tmp_path / "t.json"
    template.write_text(json.dumps({"name": "x", "config": {"column.exclude.list": "public\\.x\\.y"}}))
    with pytest.raises(StackError, match="rendered from the catalog"):
        render_connector(catalog, template)


def test_salt_file_is_created_0600_and_reused(cfg: StackConfig) -> None:
    salt = connector_hash_salt(cfg)
    path = cfg.home / "secrets" / "connector-hash.salt"
    assert (path.stat().st_mode & 0o777) == 0o600
    assert (path.parent.stat().st_mode & 0o777) == 0o700
    assert re.fullmatch(r"[0-9a-f]{64}", salt)
    assert connector_hash_salt(cfg) == salt


def test_salt_file_readable_by_others_is_refused(cfg: StackConfig) -> None:
    connector_hash_salt(cfg)
    path = cfg.home / "secrets" / "connector-hash.salt"
    os.chmod(path, 0o644)
    with pytest.raises(StackError, match="chmod 600"):
        connector_hash_salt(cfg)


def test_short_salt_is_refused(cfg: StackConfig) -> None:
    path = cfg.home / "secrets" / "connector-hash.salt"
    path.parent.mkdir(parents=True)
    path.write_text("abc")
    os.chmod(path, 0o600)
    with pytest.raises(StackError, match="32 hex"):
        connector_hash_salt(cfg)


def test_connect_errors_are_redacted() -> None:
    config = {hash_option("feedface" * 8): "x", "database.password": "pw-secret"}
    text = redact(f"bad option column.mask.hash.v2.SHA-256.with.salt.{'feedface' * 8}, password pw-secret", config)
    assert "feedface" not in text and "pw-secret" not in text


@pytest.mark.parametrize(("data_type", "length", "ok"), [
    ("text", None, True), ("character varying", None, True), ("character varying", 64, True),
    ("character varying", 6, False), ("character", 6, False), ("integer", None, False), ("bytea", None, False),
])
def test_debezium_hashes_only_unbounded_or_long_character_columns(data_type: str, length: int | None,
                                                                  ok: bool) -> None:
    assert (hash_column_problem(data_type, length) is None) is ok


def test_source_hash_recognises_debeziums_digest_only() -> None:
    # Debezium v2: SHA-256 over the salt's bytes, then the value's string bytes; lower-case hex
    digest = hashlib.sha256(b"salt" + b"$2b$12$abcdefghijklmnopqrstuv").hexdigest()
    assert is_source_hash(digest)
    assert not is_source_hash("$2b$12$" + "a" * 53)
    assert not is_source_hash(digest.upper())
    assert not is_source_hash(digest[:6])


def test_doctor_sees_c3_columns_in_an_image() -> None:
    drop, hashed = {"query_pin"}, {"password_hash"}
    digest = hashlib.sha256(b"s" + b"v").hexdigest()
    assert c3_violations({"customer_id": 1, "password_hash": digest}, drop, hashed) == []
    assert c3_violations({"customer_id": 1, "password_hash": None}, drop, hashed) == []
    assert c3_violations(None, drop, hashed) == []
    assert c3_violations({"query_pin": "123456", "password_hash": "$2b$12$x"}, drop, hashed) == [
        "query_pin", "password_hash"]
    # an excluded column is a finding even when null: the filter is not applied
    assert c3_violations({"query_pin": None}, drop, hashed) == ["query_pin"]
