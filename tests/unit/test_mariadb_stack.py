"""The MariaDB branch's pieces that need no server: its configuration, accounts SQL, password file, the
settings of a second branch's worker, the plugin roots, values written to MariaDB."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest

from guard.config import Settings, mariadb_connect_args
from guard.stack.artifacts import Artifacts
from guard.stack.assets import render_asset
from guard.stack.config import StackConfig
from guard.stack.errors import StackError
from guard.stack.provision import MARIADB_CDC_GLOBAL_GRANTS, mariadb_bootstrap_sql
from guard.stack.secrets import read_secret
from guard.workload.branch import is_mariadb, mariadb_value


@pytest.fixture
def cfg(tmp_path: Path) -> StackConfig:
    return StackConfig.from_env({"GUARD_STACK_HOME": str(tmp_path / "home"), "GUARD_CACHE_DIR": str(tmp_path),
                                 "GUARD_MARIADB_PORT": "24306"})


def test_the_server_config_binds_loopback_and_writes_the_binlog_debezium_reads(cfg: StackConfig) -> None:
    text = render_asset("mariadb.cnf", data_dir="/d", socket="/s", pid_file="/p", log_error="/l", port=cfg.mariadb_port,
                        host=cfg.host, binlog="/d/binlog", server_id=cfg.mariadb_server_id, ssl_ca="/t/ca.crt",
                        ssl_cert="/t/server.crt", ssl_key="/t/server.key")
    lines = {line.split("=", 1)[0].strip(): line.split("=", 1)[1].strip() for line in text.splitlines()
             if "=" in line and not line.lstrip().startswith("#")}
    assert lines["bind-address"] == "127.0.0.1" and lines["port"] == "24306"
    assert (lines["binlog_format"], lines["binlog_row_image"], lines["server_id"]) == ("ROW", "FULL", "202")
    assert lines["log-bin"] == "/d/binlog" and lines["gtid_strict_mode"] == "ON"
    # TCP with TLS only, with the stack CA's certificate
    assert (lines["require_secure_transport"], lines["ssl_cert"], lines["ssl_key"]) == ("ON", "/t/server.crt",
                                                                                        "/t/server.key")


def test_accounts_sql_grants_the_cdc_account_only_what_debezium_needs(cfg: StackConfig) -> None:
    sql = mariadb_bootstrap_sql(cfg)
    cdc, app = (read_secret(cfg.mariadb_cdc_password_file), read_secret(cfg.mariadb_app_password_file))
    assert "DROP USER IF EXISTS ''@'localhost', ''@'%', ''@'127.0.0.1';" in sql
    assert "GRANT SELECT ON `branch_0202`.* TO 'cdc'@'127.0.0.1';" in sql
    assert "GRANT RELOAD, REPLICATION SLAVE, BINLOG MONITOR ON *.* TO 'cdc'@'127.0.0.1';" in sql
    assert set(MARIADB_CDC_GLOBAL_GRANTS) == {"RELOAD", "REPLICATION SLAVE", "BINLOG MONITOR"}
    assert f"'cdc'@'127.0.0.1' IDENTIFIED BY '{cdc}' REQUIRE SSL;" in sql
    assert f"'branch_app'@'127.0.0.1' IDENTIFIED BY '{app}' REQUIRE SSL;" in sql
    assert mariadb_bootstrap_sql(cfg) == sql  # the passwords are made once
    # the application account owns its database and nothing else
    assert "GRANT ALL PRIVILEGES ON `branch_0202`.* TO 'branch_app'@'127.0.0.1';" in sql
    assert sql.count("ON *.*") == 1
    # docker-compose: the accounts log in from other containers
    assert "TO 'cdc'@'%'" in mariadb_bootstrap_sql(cfg, client_host="%")
    # a quote in a value cannot end the literal
    cfg.mariadb_cdc_password_file.write_text("it's-a-long-password\n")
    assert "IDENTIFIED BY 'it''s-a-long-password'" in mariadb_bootstrap_sql(cfg)


def test_the_cdc_password_file_is_made_0600_and_a_readable_one_is_refused(cfg: StackConfig, tmp_path: Path) -> None:
    path = cfg.mariadb_cdc_password_file
    assert path == tmp_path / "home" / "secrets" / "mariadb-cdc.password"
    moved = StackConfig.from_env({"GUARD_STACK_HOME": str(tmp_path), "GUARD_BRANCH2_CDC_PASSWORD_FILE": "/keys/cdc"})
    assert moved.mariadb_cdc_password_file == Path("/keys/cdc")
    with pytest.raises(StackError, match="missing"):
        read_secret(path)
    first = read_secret(path, create=True)
    assert len(first) == 48 and (path.stat().st_mode & 0o777) == 0o600
    assert (path.parent.stat().st_mode & 0o777) == 0o700
    assert read_secret(path) == first
    os.chmod(path, 0o640)
    with pytest.raises(StackError, match="mode 0640"):
        read_secret(path)
    os.chmod(path, 0o600)
    path.write_text("short\n")
    with pytest.raises(StackError, match="no usable password"):
        read_secret(path)


def test_a_second_branch_worker_has_its_own_branch_topics_and_group() -> None:
    base = Settings(worker_id="w1")
    other = base.for_branch("0202", "br0202")
    assert (other.branch, other.raw_topic_prefix, other.group_id) == ("0202", "br0202", "branchguard-sanitizer-0202")
    assert other.transactional_id() != base.transactional_id()
    assert other.raw_topic_pattern == r"^br0202\.[^.]+\.[^.]+$"
    assert (base.branch, base.raw_topic_prefix) == ("0101", "br0101")


def test_stack_env_names_the_second_branch_for_the_guard(cfg: StackConfig) -> None:
    env = cfg.env()
    assert env["GUARD_BRANCH2"] == "0202" and env["GUARD_BRANCH2_RAW_TOPIC_PREFIX"] == "br0202"
    assert env["GUARD_BRANCH2_DSN"] == (f"mysql://branch_app@127.0.0.1:24306/branch_0202?password_file="
                                        f"{cfg.mariadb_app_password_file}&ssl_ca={cfg.ca_file}")
    assert env["GUARD_BRANCH2_CDC_PASSWORD_FILE"].endswith("/secrets/mariadb-cdc.password")
    # every one is a setting of the guard (`guard doctor` reads them)
    assert {k.removeprefix("GUARD_").lower() for k in env} <= set(Settings.__dataclass_fields__)
    assert is_mariadb(env["GUARD_BRANCH2_DSN"]) and not is_mariadb(env["GUARD_BRANCH_DSN"])


def test_connect_gets_both_plugin_roots() -> None:
    a = Artifacts(Path("/b"), Path("/c"), Path("/cache/debezium-3.6.1.Final/plugins"),
                  Path("/cache/debezium-3.5.0.Final/plugins"))
    assert a.plugin_paths == "/cache/debezium-3.6.1.Final/plugins,/cache/debezium-3.5.0.Final/plugins"
    assert Artifacts(Path("/b"), Path("/c"), Path("/p")).plugin_paths == "/p"


def test_aware_times_are_written_to_mariadb_as_utc_wall_clock() -> None:
    shanghai = dt.timezone(dt.timedelta(hours=8))
    assert mariadb_value(dt.datetime(2026, 1, 2, 8, 0, tzinfo=shanghai)) == dt.datetime(2026, 1, 2, 0, 0)
    assert mariadb_value(dt.date(2026, 1, 2)) == dt.date(2026, 1, 2)
    assert mariadb_value(b"\x00") == b"\x00"


def test_a_dsn_names_the_password_file_and_the_ca_never_the_password(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret-value\n")
    args = mariadb_connect_args(f"mysql://app@127.0.0.1:24306/db?password_file={secret}&ssl_ca=/tls/ca.crt")
    assert (args["user"], args["password"], args["database"], args["port"]) == ("app", "s3cret-value", "db", 24306)
    assert (args["ssl_ca"], args["ssl_verify_cert"], args["ssl_verify_identity"]) == ("/tls/ca.crt", True, True)
    assert "ssl_ca" not in mariadb_connect_args("mysql://app:pw@h:1/db")


def test_the_cdc_accounts_grants_are_exactly_its_least_privilege() -> None:
    """Doctor's least-privilege check accepted SELECT on any database (`mysql.*` holds the accounts' password
    hashes), a grant option and a granted role (whose privileges SHOW GRANTS does not list)."""
    from guard.doctor.mariadb import cdc_grant_problems

    exact = ["GRANT RELOAD, REPLICATION SLAVE, BINLOG MONITOR ON *.* TO `cdc`@`127.0.0.1` IDENTIFIED BY PASSWORD "
             "'*92' REQUIRE SSL", "GRANT SELECT ON `branch_0202`.* TO `cdc`@`127.0.0.1`",
             "GRANT SELECT ON `guard_admin`.`principal_messages` TO `cdc`@`127.0.0.1`"]
    problems, global_privs, objects = cdc_grant_problems(exact, "branch_0202")
    assert problems == [] and global_privs == {"RELOAD", "REPLICATION SLAVE", "BINLOG MONITOR"}
    assert objects == {"`branch_0202`.*", "`guard_admin`.`principal_messages`"}
    for wider, named in (("GRANT SELECT ON `mysql`.* TO `cdc`@`127.0.0.1`", "`mysql`.*"),
                         ("GRANT SELECT ON `branch_0202`.* TO `cdc`@`127.0.0.1` WITH GRANT OPTION", "grant"),
                         ("GRANT `dba` TO `cdc`@`127.0.0.1`", "a role"),
                         ("GRANT SELECT, INSERT ON `branch_0202`.* TO `cdc`@`127.0.0.1`", "more than SELECT"),
                         ("GRANT SUPER ON *.* TO `cdc`@`127.0.0.1`", "SUPER")):
        problems, _, _ = cdc_grant_problems([*exact, wider], "branch_0202")
        assert problems and any(named in p for p in problems), (wider, problems)
    assert cdc_grant_problems(exact[:1], "branch_0202")[0] == ["no SELECT on `branch_0202`.*"]
