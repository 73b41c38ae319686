"""The second branch, on MariaDB (branch 0202), end to end on the real stack: the checks the PostgreSQL branch
passes, on the values Debezium's MariaDB connector emits.

`guard stack up` runs MariaDB 10.11 (binlog ROW, full row images, GTID) and Debezium's MariaDB connector
3.5.0.Final beside the PostgreSQL one; raw topics are `br0202.branch_0202.<table>`. One `guard run` worker
serves the branch (GUARD_BRANCH=0202, GUARD_RAW_TOPIC_PREFIX=br0202, a group of its own), started once for
the module. What is checked:

- the server: loopback only, binlog settings, no anonymous account, the CDC account's grants exactly the
  least Debezium needs and its password in a 0600 file; a login without the password is refused;
- the connector registered is the one rendered from the catalog (branch_0202's C3 columns), the plugin runs
  as 3.5.0.Final beside the 3.6.1 PostgreSQL plugin;
- C3: no query PIN or password hash of the workload in any byte of any raw topic of the branch;
- snapshot reads (op `r`) of the seeded rows: every protected field sealed, nothing in clear that the
  catalog does not allow, every image opens to exactly the raw image (binary columns as base64, DATETIME as
  epoch microseconds, TIMESTAMP as an ISO string, DECIMAL as a string, DATE as days);
- a workload (inserts, updates, balance updates, deletes) flows through protected: every row's last
  sanitized record opens to what MariaDB holds, column by column; deleted rows end in delete + tombstone;
  no plaintext in any output topic; subject tokens are branch 0202's;
- deleting a customer shreds its key (branch 0202) and confirms on guard.deletions.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import re
import stat
import time
import uuid
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pymysql
import pytest

from guard.classify.catalog import Action, Catalog
from guard.classify.source import is_source_hash, source_rules
from guard.config import load_settings
from guard.errors import KeyShreddedError
from guard.pipeline.runtime import build_keys, build_sanitizer
from guard.protect.reveal import open_image
from guard.records.codec import decode
from guard.stack.config import StackConfig
from guard.stack.connector import (
    connector_hash_salt,
    placeholder_values,
    render_connector,
    resolve_connector,
    rest_auth,
)
from guard.stack.connector import connectors_dir as _connectors_dir
from guard.stack.mariadb import MariaDB
from guard.workload.branch import MariaConnection, run_workload
from tests.integration.kafka_helpers import (
    GuardProcess,
    LeakScanner,
    admin_kafka_settings,
    kafka_conf,
    read_all,
    wait_for,
)

pytestmark = pytest.mark.integration

BRANCH = "0202"
PREFIX = "br0202"
DB = "branch_0202"
TABLES = ("customers", "accounts", "transactions", "customer_auth")
PRIMARY_KEYS = {"customers": "customer_id", "accounts": "account_no", "transactions": "txn_id",
                "customer_auth": "customer_id"}
EPOCH = date(1970, 1, 1)
#: A decimal in a string (balances, amounts), blanked before the C3 scan: its integer part could equal a PIN.
_DECIMAL = re.compile(rb'"-?\d+\.\d+"')


def raw_topic(table: str) -> str:
    return f"{PREFIX}.{DB}.{table}"


def sanitized_topic(table: str) -> str:
    return f"sanitized.{raw_topic(table)}"


def same(db: Any, dbz: Any) -> bool:
    """Whether a PyMySQL value and its Debezium JSON form (MariaDB connector, as configured) are one datum.

    DATE: days since 1970-01-01. TIMESTAMP(6) (an instant; the session's zone is UTC): an ISO-8601 string
    with a zone. DATETIME(6) (wall-clock, no zone): epoch microseconds (`io.debezium.time.MicroTimestamp`).
    DECIMAL: a string with the column's scale. VARBINARY: base64. Anything else fails naming the type.
    """
    if db is None:
        return dbz is None
    if isinstance(db, datetime):
        if isinstance(dbz, str):  # TIMESTAMP
            try:
                parsed = datetime.fromisoformat(dbz)
            except ValueError:
                return False
            return parsed.tzinfo is not None and parsed == db.replace(tzinfo=UTC)
        if type(dbz) is int:  # DATETIME
            delta = db - datetime(1970, 1, 1)
            return dbz == (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
        return False
    if isinstance(db, date):
        return type(dbz) is int and dbz == (db - EPOCH).days
    if isinstance(db, Decimal):
        if not isinstance(dbz, str):
            return False
        try:
            value = Decimal(dbz)
        except ArithmeticError:
            return False
        return value == db and value.as_tuple().exponent == db.as_tuple().exponent
    if isinstance(db, bytes):
        return isinstance(dbz, str) and base64.b64decode(dbz) == db
    if isinstance(db, bool):
        return dbz is db
    if isinstance(db, int):
        return type(dbz) is int and dbz == db
    if isinstance(db, str):
        return isinstance(dbz, str) and dbz == db
    raise TypeError(f"no normalisation for a MariaDB value of type {type(db).__name__}")


def test_same_normalises_the_mariadb_connectors_forms_and_nothing_else():
    assert same(datetime(2026, 1, 2, 3, 4, 5, 678901), "2026-01-02T03:04:05.678901Z")
    assert not same(datetime(2026, 1, 2, 3, 4, 5, 678901), "2026-01-02T03:04:05.678901")  # no zone
    assert same(datetime(2023, 1, 1, 23, 35, 29), 1672616129000000)
    assert not same(datetime(2023, 1, 1, 23, 35, 29), 1672616129000)  # milliseconds are not microseconds
    assert same(date(1984, 8, 3), 5328) and not same(date(1984, 8, 3), "1984-08-03")
    assert same(Decimal("117024.47"), "117024.47") and not same(Decimal("1.50"), "1.5")
    assert same(b"\x00\xff", "AP8=") and not same(b"\x00\xff", "AP4=")
    assert same(7, 7) and not same(7, "7") and same(None, None) and not same(None, "")
    with pytest.raises(TypeError, match="float"):
        same(1.5, 1.5)


def _db(stack: dict[str, str]) -> MariaConnection:
    return MariaConnection(stack["GUARD_BRANCH2_DSN"])


@pytest.fixture(scope="module")
def keys(stack: dict[str, str]):
    return build_keys(load_settings(None, redis_url=stack["GUARD_REDIS_URL"]), listen=False)


@pytest.fixture(scope="module")
def branch_worker(stack: dict[str, str], tmp_path_factory: pytest.TempPathFactory, catalog_without_grace: Path):
    """One guard worker for branch 0202, in a group of its own, from the current end of the raw topics; an
    erasure happens at the delete (no grace period), so the erasure test need not wait 30 s for it."""
    group = f"maria-{uuid.uuid4().hex[:8]}"
    worker = GuardProcess(stack, worker_id=f"{group}-w1", group_id=group,
                          log_dir=tmp_path_factory.mktemp("guard-logs"),
                          extra_env={"GUARD_BRANCH": BRANCH, "GUARD_RAW_TOPIC_PREFIX": PREFIX,
                                     "GUARD_CATALOG": str(catalog_without_grace)}).start(from_end=True)
    time.sleep(2)
    assert worker.alive(), worker.log()
    yield worker
    worker.stop()
    print(worker.log()[-3000:])


# --- the server and the connector ---------------------------------------------------------------------------
def test_mariadb_runs_on_loopback_with_the_binlog_debezium_needs_and_least_privilege(stack: dict[str, str]):
    cfg = StackConfig.from_env()
    server = MariaDB(cfg)
    settings = server.admin("SELECT @@bind_address, @@log_bin, @@binlog_format, @@binlog_row_image, @@server_id, "
                            "@@gtid_strict_mode").split()
    assert settings == ["127.0.0.1", "1", "ROW", "FULL", str(cfg.mariadb_server_id), "1"]
    users = server.admin("SELECT user, host FROM mysql.user ORDER BY user, host").splitlines()
    assert not [u for u in users if u.split("\t")[0] == ""], "an anonymous account exists"
    grants = server.admin(f"SHOW GRANTS FOR '{cfg.mariadb_cdc_user}'@'127.0.0.1'")
    assert "GRANT RELOAD, REPLICATION SLAVE, BINLOG MONITOR ON *.*" in grants
    assert f"GRANT SELECT ON `{DB}`.*" in grants
    assert "ALL PRIVILEGES" not in grants and "SUPER" not in grants and "SHOW DATABASES" not in grants
    for secret in (cfg.mariadb_cdc_password_file, cfg.mariadb_app_password_file, cfg.mariadb_connect_cdc_file,
                   cfg.mariadb_truststore_properties):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    password = cfg.mariadb_cdc_password_file.read_text().strip()
    assert password not in stack["GUARD_BRANCH2_DSN"] and "password_file=" in stack["GUARD_BRANCH2_DSN"]
    tls = {"ssl_ca": str(cfg.ca_file), "ssl_verify_cert": True, "ssl_verify_identity": True}
    where = {"host": cfg.host, "port": cfg.mariadb_port, "connect_timeout": 5}
    # the CDC account logs in with its password over verified TLS, and without it (or anonymously) nobody does
    pymysql.connect(**where, **tls, user=cfg.mariadb_cdc_user, password=password).close()
    for user, pw in ((cfg.mariadb_cdc_user, ""), (cfg.mariadb_cdc_user, "wrong-" + password[:6]), ("", ""),
                     ("root", "")):
        with pytest.raises(pymysql.err.OperationalError) as err:
            pymysql.connect(**where, **tls, user=user, password=pw)
        assert err.value.args[0] in (1045, 1698)  # access denied (1698: root is unix_socket only)
    # without TLS, not even the right password gets in (PyMySQL would use TLS unasked: refused explicitly)
    with pytest.raises(pymysql.err.OperationalError):
        pymysql.connect(**where, user=cfg.mariadb_cdc_user, password=password, ssl_disabled=True)
    # the CDC account cannot write the branch database
    with pymysql.connect(**where, **tls, user=cfg.mariadb_cdc_user, password=password,
                         database=DB) as conn, conn.cursor() as cur, pytest.raises(pymysql.err.OperationalError):
        cur.execute("DELETE FROM customers WHERE customer_id = -1")


def test_stack_registers_the_rendered_mariadb_connector_beside_the_postgres_one(stack: dict[str, str]):
    cfg = StackConfig.from_env()
    template = _connectors_dir() / "branch-mariadb.json"
    name, expected = resolve_connector(render_connector(Catalog.load(), template, DB),
                                       placeholder_values(cfg, engine="mariadb"))
    url, auth = stack["GUARD_CONNECT_URL"], rest_auth(cfg)
    running = httpx.get(f"{url}/connectors/{name}/config", timeout=10, auth=auth).json()
    assert running == expected
    assert running["column.exclude.list"] == rf"{DB}\.customer_auth\.query_pin"
    hashed = [v for k, v in running.items() if k.startswith("column.mask.hash.v2.SHA-256.with.salt.")]
    assert hashed == [rf"{DB}\.customer_auth\.password_hash"]
    status = httpx.get(f"{url}/connectors/{name}/status", timeout=10, auth=auth).json()
    assert status["connector"]["state"] == "RUNNING" and [t["state"] for t in status["tasks"]] == ["RUNNING"]
    plugins = {p["class"]: p["version"] for p in httpx.get(f"{url}/connector-plugins", timeout=10, auth=auth).json()}
    assert plugins["io.debezium.connector.mariadb.MariaDbConnector"] == "3.5.0.Final"
    assert plugins["io.debezium.connector.postgresql.PostgresConnector"] == "3.6.1.Final"


# --- C3 at the source ---------------------------------------------------------------------------------------
def test_no_c3_value_of_the_workload_in_any_raw_topic_of_the_branch(stack: dict[str, str]):
    bootstrap = stack["GUARD_KAFKA_BOOTSTRAP"]
    result = run_workload(stack["GUARD_BRANCH2_DSN"], customers=8, update=2, delete=2, seed=random.randrange(1 << 30),
                          branch_code=BRANCH)
    ids, deleted = set(result.customers), set(result.deleted_customers)
    records = wait_for(bootstrap, raw_topic("customer_auth"), lambda rs: {
        orjson.loads(r.key)["customer_id"] for r in rs if r.key and r.value and orjson.loads(r.value)["op"] == "d"
    } >= deleted and {orjson.loads(r.key)["customer_id"] for r in rs if r.key} >= ids, timeout=120)
    images = [img for r in records if r.key and r.value and orjson.loads(r.key)["customer_id"] in ids
              for img in (orjson.loads(r.value)["before"], orjson.loads(r.value)["after"]) if img]
    assert images
    assert all("query_pin" not in img and is_source_hash(img["password_hash"]) for img in images)
    scanner = LeakScanner.of(result.c3_values)
    topics = sorted(t for t in _topics(bootstrap) if t.startswith(f"{PREFIX}."))
    assert raw_topic("customer_auth") in topics
    scanned = 0
    for topic in topics:
        for rec in read_all(bootstrap, topic, timeout=30):
            scanned += 1
            # decimals blanked: the integer part of a balance could equal a 6-digit PIN as a whole token
            blob = _DECIMAL.sub(b'"0.0"', (rec.key or b"") + b"\x00" + (rec.value or b""))
            assert scanner.find(blob) is None, f"a C3 value of the workload is in {topic}[{rec.partition}]@{rec.offset}"
    assert scanned > 1000


# --- snapshot reads -----------------------------------------------------------------------------------------
def test_snapshot_reads_are_sealed_and_open_to_the_raw_image(stack: dict[str, str], keys):
    """Every seeded row's snapshot record (op r) of every table, through the guard: sealed and reversible."""
    catalog = Catalog.load()
    settings = load_settings(None, kafka_bootstrap=stack["GUARD_KAFKA_BOOTSTRAP"], redis_url=stack["GUARD_REDIS_URL"],
                             worker_id="test-mariadb-snapshot").for_branch(BRANCH, PREFIX)
    sanitizer = build_sanitizer(settings)
    sanitizer.act_on_deletes = False
    checked: dict[str, int] = {}
    for table in TABLES:
        policy = catalog.table(f"{DB}.{table}")
        assert policy is not None
        snapshot = [r for r in read_all(stack["GUARD_KAFKA_BOOTSTRAP"], raw_topic(table), timeout=30)
                    if r.value and orjson.loads(r.value)["op"] == "r"][:60]
        assert snapshot, f"no snapshot records of {table}"
        for rec in snapshot:
            raw = orjson.loads(rec.value)
            assert raw["source"]["connector"] == "mariadb" and raw["source"]["db"] == DB
            out = sanitizer.process(rec.topic, rec.partition, rec.offset, rec.key, rec.value)
            assert out.decision == "protected", out.decision
            main = out.records[0]
            doc = decode(main.value)
            assert doc["branch"] == BRANCH and doc["table"] == f"{DB}.{table}" and doc["op"] == "r"
            assert doc["position"].startswith("binlog:") and not doc["unclassified"]
            after = doc["after"]
            sealed = set(after["sealed"]["fields"])
            for column, value in raw["after"].items():
                col = policy.columns[column]
                if col.action is Action.ENCRYPT:
                    assert column in sealed and column not in after["clear"], column
                elif col.action is Action.CLEAR:
                    assert after["clear"][column] == value, column
                elif col.action is Action.HASH:
                    assert column in after["hashed"] and column not in sealed, column
            # no value the catalog protects is in any byte the guard writes
            protected = [str(v) for c, v in raw["after"].items()
                         if policy.columns[c].action is not Action.CLEAR and v is not None and len(str(v)) >= 6]
            blob = b"".join((r.key or b"") + (r.value or b"") for r in out.records)
            assert not [v for v in protected if v.encode() in blob]
            opened = open_image(keys, doc, "after", topic=main.topic, row_key=main.key)
            assert opened == {c: v for c, v in raw["after"].items() if c in sealed}
        checked[table] = len(snapshot)
    print(checked)


# --- the workload through a worker --------------------------------------------------------------------------
def _database(stack: dict[str, str], table: str, customers: set[int]) -> dict[Any, dict[str, Any]]:
    with _db(stack) as conn:
        cur = conn.conn.cursor(pymysql.cursors.DictCursor)
        cur.execute(f"SELECT * FROM {table} WHERE customer_id IN ({', '.join(['%s'] * len(customers))})",  # noqa: S608
                    sorted(customers))
        return {row[PRIMARY_KEYS[table]]: row for row in cur.fetchall()}


def test_the_workload_flows_through_protected_and_opens_to_what_mariadb_holds(stack, branch_worker, keys):
    bootstrap = stack["GUARD_KAFKA_BOOTSTRAP"]
    catalog = Catalog.load()
    salt = connector_hash_salt(StackConfig.from_env())
    c3 = {(r.table, r.column): r.action for r in source_rules(catalog, DB)}
    result = run_workload(stack["GUARD_BRANCH2_DSN"], customers=6, update=2, delete=2, seed=random.randrange(1 << 30),
                          branch_code=BRANCH)
    ids, deleted = set(result.customers), set(result.deleted_customers)
    survivors = sorted(ids - deleted)
    with _db(stack) as conn:
        assert conn.execute("UPDATE accounts SET balance = balance + 1.25 WHERE customer_id IN (%s, %s)",
                            survivors[:2]).rowcount > 0
    expected = _database(stack, "customers", ids)
    assert set(expected) == set(survivors)

    # every customer's create, the updates, the deletes and their tombstones arrive sanitized
    def customers_done(rs: list) -> bool:
        seen = {(orjson.loads(r.key)["customer_id"], decode(r.value)["op"] if r.value else "tombstone")
                for r in rs if r.key and orjson.loads(r.key).get("customer_id") in ids}
        want = ({(c, "c") for c in ids} | {(c, "u") for c in result.updated} | {(c, "d") for c in deleted}
                | {(c, "tombstone") for c in deleted})
        return seen >= want
    wait_for(bootstrap, sanitized_topic("customers"), customers_done, timeout=180)

    problems: list[str] = []
    counts: dict[str, int] = {}

    def compare() -> bool:
        problems.clear()
        for table in TABLES:
            pk_column = PRIMARY_KEYS[table]
            database = _database(stack, table, ids)
            policy = catalog.table(f"{DB}.{table}")
            assert policy is not None
            last: dict[bytes, Any] = {}
            for rec in read_all(bootstrap, sanitized_topic(table)):
                if rec.key is None:
                    problems.append(f"{table}: a record without a key")
                    continue
                if rec.value is None:
                    last[rec.key] = None
                    continue
                doc = decode(rec.value)
                if doc["after"] is not None and doc["after"]["clear"].get("customer_id") in ids or (
                        doc["before"] is not None and doc["before"]["clear"].get("customer_id") in ids):
                    last[rec.key] = (rec, doc)
            matched = set()
            for entry in last.values():
                if entry is None:
                    continue  # a tombstone: checked below through the deleted rows
                rec, doc = entry
                if doc["subject"] != keys.subject_token(BRANCH, _customer(doc)):
                    problems.append(f"{table}: subject is not branch {BRANCH}'s token of the customer")
                if doc["op"] == "d":
                    problems.append(f"{table}: a delete without its tombstone after it")
                    continue
                opened = open_image(keys, doc, "after", topic=rec.topic, row_key=rec.key)
                img = doc["after"]
                values = {**img["clear"], **opened}
                pk = values.get(pk_column)
                row = database.get(pk)
                if row is None:
                    problems.append(f"{table}: a sanitized row that MariaDB does not hold")
                    continue
                matched.add(pk)
                for column, value in row.items():
                    col = policy.columns[column]
                    if col.action is Action.CLEAR and not same(value, img["clear"].get(column, "<missing>")):
                        problems.append(f"{table}.{column}: clear value differs")
                    elif col.action is Action.ENCRYPT and (column not in img["sealed"]["fields"]
                                                          or not same(value, opened.get(column, "<missing>"))):
                        problems.append(f"{table}.{column}: sealed value differs or is not sealed")
                    elif col.action is Action.HASH:
                        digest = value if (f"{DB}.{table}", column) not in c3 else hashlib.sha256(
                            (salt + value).encode()).hexdigest()
                        if img["hashed"].get(column) != keys.keyed_hash.digest(column, digest.encode()):
                            problems.append(f"{table}.{column}: keyed hash differs")
                    elif col.action is Action.DROP and (column in values or column in img["hashed"]):
                        problems.append(f"{table}.{column}: a dropped column is carried")
            missing = set(database) - matched
            if missing:
                problems.append(f"{table}: {len(missing)} rows of MariaDB have no sanitized record (lost)")
            counts[table] = len(matched)
        return not problems

    deadline = time.monotonic() + 150
    while not compare() and time.monotonic() < deadline:
        time.sleep(3)
    assert not problems, "\n".join(problems[:30]) + "\n" + branch_worker.log()[-2000:]
    assert all(counts[t] > 0 for t in TABLES), counts
    # deleted customers' rows end in delete + tombstone, under their sanitized key
    records = read_all(bootstrap, sanitized_topic("customers"))
    for cid in deleted:
        mine = [r for r in records if r.key and orjson.loads(r.key)["customer_id"] == cid]
        assert mine[-1].value is None and decode(mine[-2].value)["op"] == "d"
    # no plaintext of the workload in any output topic
    scanner = LeakScanner.of(result.sensitive_values)
    for topic in [*(sanitized_topic(t) for t in TABLES), "guard.audit", "guard.dlq", "guard.anomalies",
                  "guard.deletions"]:
        for rec in read_all(bootstrap, topic):
            found = scanner.find((rec.key or b"") + b"\x00" + (rec.value or b""))
            assert found is None, f"plaintext leaked into {topic}[{rec.partition}]@{rec.offset}"
    print(json.dumps(counts))


def _customer(doc: dict[str, Any]) -> Any:
    image = doc["after"] or doc["before"]
    return image["clear"]["customer_id"]


def test_deleting_a_mariadb_customer_shreds_its_key_and_confirms(stack, branch_worker, keys):
    bootstrap = stack["GUARD_KAFKA_BOOTSTRAP"]
    result = run_workload(stack["GUARD_BRANCH2_DSN"], customers=2, update=0, delete=0, branch_code=BRANCH)
    victim, survivor = result.customers
    topic = sanitized_topic("customers")
    records = wait_for(bootstrap, topic, lambda rs: len(_created(rs, {victim, survivor})) >= 2, timeout=120)
    victim_rec = _created(records, {victim})[0]
    record = decode(victim_rec.value)
    assert record["subject"] == keys.subject_token(BRANCH, victim) != keys.subject_token("0101", victim)
    assert open_image(keys, record, "after", topic=topic, row_key=victim_rec.key)["name"]
    with _db(stack) as conn, conn.transaction():
        for table in ("transactions", "accounts", "customer_auth", "customers"):
            conn.execute(f"DELETE FROM {table} WHERE customer_id = %s", (victim,))  # noqa: S608 - fixed names
    confirmations = wait_for(bootstrap, "guard.deletions", lambda rs: any(
        orjson.loads(r.value)["subject"] == record["subject"] for r in rs if r.value), timeout=180)
    confirmation = next(orjson.loads(r.value) for r in confirmations
                        if r.value and orjson.loads(r.value)["subject"] == record["subject"])
    assert confirmation["outcome"] == "shredded" and confirmation["keys_destroyed"]
    assert confirmation["branch"] == BRANCH and topic in confirmation["unreadable_topics"]
    keys.forget(BRANCH, record["subject"])
    with pytest.raises(KeyShreddedError):
        open_image(keys, record, "after", topic=topic, row_key=victim_rec.key)
    other = _created(records, {survivor})[0]
    assert open_image(keys, decode(other.value), "after", topic=topic, row_key=other.key)["name"]
    # the delete's tombstone passed with the sanitized key
    wait_for(bootstrap, topic, lambda rs: any(r.value is None and r.key and orjson.loads(r.key)["customer_id"] == victim
                                              for r in rs))


def _created(records: list, ids: set[int]) -> list:
    return [r for r in records if r.key and r.value and orjson.loads(r.key).get("customer_id") in ids
            and decode(r.value)["op"] in ("c", "r")]


def _topics(bootstrap: str) -> list[str]:
    from confluent_kafka.admin import AdminClient

    return list(AdminClient(kafka_conf(bootstrap)).list_topics(timeout=10).topics)



# --- guard doctor -------------------------------------------------------------------------------------------
def test_doctor_checks_the_mariadb_branch_and_names_what_is_wrong(stack: dict[str, str], tmp_path):
    from confluent_kafka.admin import AdminClient

    from guard.config import Settings
    from guard.doctor.c3 import check_c3_absent
    from guard.doctor.mariadb import check_mariadb

    cfg = StackConfig.from_env()
    settings = Settings(**admin_kafka_settings(), kafka_bootstrap=stack["GUARD_KAFKA_BOOTSTRAP"], branch2=BRANCH,
                        branch2_raw_topic_prefix=PREFIX,
                        branch2_dsn=stack["GUARD_BRANCH2_DSN"],
                        branch2_cdc_password_file=stack["GUARD_BRANCH2_CDC_PASSWORD_FILE"])
    checks = check_mariadb(settings)
    assert [(c.name, c.ok) for c in checks] == [("mariadb", True), ("mariadb binlog", True),
                                                ("mariadb logins", True), ("mariadb tls", True),
                                                ("mariadb cdc account", True)], [c.line() for c in checks]
    assert "BINLOG MONITOR, RELOAD, REPLICATION SLAVE on *.*, SELECT on `branch_0202`.*" in checks[4].detail
    c3 = check_c3_absent(AdminClient(kafka_conf(settings.kafka_bootstrap)),
                         settings.for_branch(BRANCH, PREFIX))
    assert [c.ok for c in c3] == [True] and "of 1 raw topics with C3 columns" in c3[0].detail, c3[0].line()

    bad_password = tmp_path / "wrong.password"
    bad_password.write_text("not-the-password\n")
    wrong = dict(settings.__dict__, branch2_dsn=stack["GUARD_BRANCH2_DSN"].replace(
        str(cfg.mariadb_app_password_file), str(bad_password)))
    assert [(c.ok, "refused" in c.detail) for c in check_mariadb(Settings(**wrong))] == [(False, True)]
    down = dict(settings.__dict__, branch2_dsn=f"mysql://branch_app@127.0.0.1:1/{DB}?password_file={bad_password}")
    assert [(c.ok, "does not answer" in c.detail) for c in check_mariadb(Settings(**down))] == [(False, True)]

    server = MariaDB(cfg)
    try:
        server.admin("CREATE USER ''@'127.0.0.1' REQUIRE SSL; GRANT SHOW DATABASES ON *.* TO 'cdc'@'127.0.0.1';")
        failed = {c.name: c for c in check_mariadb(settings) if not c.ok}
        assert set(failed) == {"mariadb logins", "mariadb cdc account"}, [c.line() for c in failed.values()]
        assert "without a password" in failed["mariadb logins"].detail
        assert "extra global privileges ['SHOW DATABASES']" in failed["mariadb cdc account"].detail
    finally:
        server.admin("DROP USER IF EXISTS ''@'127.0.0.1'; REVOKE SHOW DATABASES ON *.* FROM 'cdc'@'127.0.0.1';")
    assert all(c.ok for c in check_mariadb(settings))
