"""Bring a PostgreSQL server to the state the demo needs: roles, database, schema, CDC plumbing, rows.

Works on any server we have a superuser connection to — the local cluster (Unix socket) or the
docker-compose ``postgres`` service — so both stacks share one definition. Every step is idempotent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql

from guard.classify.source import ATTRIBUTION_DATABASE, ATTRIBUTION_TABLE
from guard.stack.assets import read_asset
from guard.stack.config import StackConfig
from guard.stack.errors import StackError
from guard.stack.procs import progress
from guard.stack.secrets import read_secret

# insertion order respects the foreign key accounts.customer_id -> customers
SEED_TABLES = ("customers", "accounts", "transactions", "customer_auth")
#: Who the seed's writes are attributed to (the branch's batch service, policy/entities.json).
SEED_PRINCIPAL = "Service:eod-batch"


def _ensure_role(cur: psycopg.Cursor[Any], role: str, password: str, replication: bool) -> None:
    exists = cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
    verb = "ALTER" if exists else "CREATE"
    # least privilege, stated explicitly (an older cluster's roles are brought to it too)
    attrs = sql.SQL("LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS "
                    + ("REPLICATION" if replication else "NOREPLICATION"))
    # passwords are sent as literals (DDL takes no bind parameters); statements are never logged
    cur.execute(sql.SQL("{} ROLE {} WITH {} PASSWORD {}").format(
        sql.SQL(verb), sql.Identifier(role), attrs, sql.Literal(password)))


def revoke_logical_messages(conn: psycopg.Connection[Any]) -> None:
    """`pg_logical_emit_message` (every overload) is no longer executable by PUBLIC in this database.

    Logical messages reach Debezium's stream as they are; the policy work attributes writes with them,
    so an ordinary role must not be able to emit (spoof) one. Superusers keep it.
    """
    rows = conn.execute("SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = "
                        "p.pronamespace WHERE n.nspname = 'pg_catalog' AND p.proname = "
                        "'pg_logical_emit_message'").fetchall()
    for (signature,) in rows:
        conn.execute(sql.SQL("REVOKE EXECUTE ON FUNCTION {} FROM PUBLIC").format(sql.SQL(signature)))


def bootstrap(cfg: StackConfig, admin_conninfo: str, admin_conninfo_db: str, superuser: str,
              app_password: str, cdc_password: str) -> None:
    """Roles ``branch_app`` (owner) and ``cdc`` (REPLICATION), database, publication, event trigger."""
    with psycopg.connect(admin_conninfo, autocommit=True) as conn, conn.cursor() as cur:
        _ensure_role(cur, cfg.app_user, app_password, replication=False)
        _ensure_role(cur, cfg.cdc_user, cdc_password, replication=True)
        revoke_logical_messages(conn)
        if not cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (cfg.branch_db,)).fetchone():
            progress(f"postgres: creating database {cfg.branch_db}")
            cur.execute(sql.SQL("CREATE DATABASE {} OWNER {} ENCODING 'UTF8'").format(
                sql.Identifier(cfg.branch_db), sql.Identifier(cfg.app_user)))
    with psycopg.connect(admin_conninfo_db, autocommit=True) as conn:
        # 1) event trigger first, so even the seed tables pass through it
        boot = sql.SQL(read_asset("branch_bootstrap.sql")).format(
            db=sql.Identifier(cfg.branch_db), cdc=sql.Identifier(cfg.cdc_user),
            app=sql.Identifier(cfg.app_user), superuser=sql.Identifier(superuser),
            publication=sql.Identifier(cfg.publication_name),
            publication_literal=sql.Literal(cfg.publication_name))
        conn.execute(boot)
        revoke_logical_messages(conn)
        # 2) schema as the owner role, so branch_app owns the tables it writes (and the default
        #    privileges granted above give cdc SELECT on them)
        with conn.transaction():
            conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(cfg.app_user)))
            conn.execute(read_asset("branch_schema.sql"))


def seed(cfg: StackConfig, dsn: str) -> int:
    """Insert the synthetic demo rows when ``customers`` is empty; returns rows inserted (0 if seeded)."""
    try:
        from guard.workload.synth import demo_dataset, demo_staff
    except ImportError as exc:
        raise StackError(f"guard.workload.synth.demo_dataset is not importable ({exc}); the demo database cannot "
                         f"be seeded. Pull the latest code and run `guard stack up` again.") from exc
    with psycopg.connect(dsn) as conn:
        count = conn.execute("SELECT count(*) FROM public.customers").fetchone()
        if count and count[0] > 0:
            progress(f"postgres: {cfg.branch_db} already seeded ({count[0]} customers)")
            added = add_missing_staff(conn, demo_staff())
            if added:
                progress(f"postgres: added {added} members of staff (or roles) the demo's staff directory gained")
            return 0
        data = {**demo_dataset(seed=cfg.seed, customers=cfg.seed_customers), **demo_staff()}
        total = 0
        with conn.transaction(), conn.cursor() as cur:
            cur.execute("SELECT set_config('guard.principal', %s, true)", (SEED_PRINCIPAL,))
            for table in (*SEED_TABLES, "staff", "staff_roles"):
                rows = data.get(table, [])
                if not rows:
                    continue
                cols = list(rows[0].keys())
                stmt = sql.SQL("COPY public.{} ({}) FROM STDIN").format(
                    sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, cols)))
                with cur.copy(stmt) as copy:
                    for row in rows:
                        copy.write_row([row[c] for c in cols])
                total += len(rows)
            if "txn_id" in data.get("transactions", [{}])[0]:
                cur.execute("SELECT setval(pg_get_serial_sequence('public.transactions', 'txn_id'), "
                            "(SELECT max(txn_id) FROM public.transactions))")
        progress(f"postgres: seeded {total} rows into {cfg.branch_db} "
                 + ", ".join(f"{t}={len(data.get(t, []))}" for t in SEED_TABLES))
        return total


def add_missing_staff(conn: psycopg.Connection[Any], staff: dict[str, list[dict[str, object]]]) -> int:
    """Insert the demo's members of staff and roles a database seeded by an older version lacks (e.g. branch
    0202's, the MariaDB branch's staff); rows already there are left as they are. Returns the rows inserted."""
    total = 0
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("SELECT set_config('guard.principal', %s, true)", (SEED_PRINCIPAL,))
        for table, key in (("staff", "staff_id"), ("staff_roles", "staff_id, role")):
            for row in staff.get(table, []):
                cols = list(row)
                cur.execute(sql.SQL("INSERT INTO public.{} ({}) VALUES ({}) ON CONFLICT ({}) DO NOTHING").format(
                    sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, cols)),
                    sql.SQL(", ").join(sql.Placeholder() * len(cols)), sql.SQL(key)), [row[c] for c in cols])
                total += cur.rowcount
    return total


# --- the MariaDB branch (branch 0202) ------------------------------------------------------------------------
#: What Debezium's MariaDB connector needs and nothing more (its documentation lists SELECT, RELOAD, SHOW
#: DATABASES, REPLICATION SLAVE, REPLICATION CLIENT): SELECT on the branch database only (the snapshot reads
#: it), RELOAD for the snapshot's FLUSH TABLES ... WITH READ LOCK (snapshot.locking.mode=minimal), REPLICATION
#: SLAVE to read the binlog, BINLOG MONITOR (MariaDB's name of REPLICATION CLIENT since 10.5) for SHOW MASTER
#: STATUS / SHOW BINARY LOGS. Not SHOW DATABASES: without it the account sees the databases it has a grant
#: on, which is exactly the branch database the connector captures.
MARIADB_CDC_GLOBAL_GRANTS = ("RELOAD", "REPLICATION SLAVE", "BINLOG MONITOR")


def sql_statements(script: str) -> list[str]:
    """The statements of an SQL script whose statements end with `;` at the end of a line, without comment
    lines (what the MariaDB client library runs one at a time)."""
    out = []
    for statement in script.split(";\n"):
        body = "\n".join(line for line in statement.splitlines() if not line.strip().startswith("--")).strip()
        if body:
            out.append(body.removesuffix(";"))
    return out


def _sql_str(value: str) -> str:
    """A MariaDB string literal (DDL takes no bind parameters); the values here are our own names and hex."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _sql_ident(value: str) -> str:
    return "`" + value.replace("`", "``") + "`"


def mariadb_bootstrap_sql(cfg: StackConfig, client_host: str = "127.0.0.1") -> str:
    """The idempotent SQL that makes the branch database, its two accounts and their grants; the accounts'
    passwords are read from (or made in) their 0600 files (``guard.stack.secrets.read_secret``).

    ``client_host`` is where the accounts may log in from: 127.0.0.1 on the local stack (the server listens
    there only), '%' in docker-compose (Connect and the guard are other containers). Anonymous accounts are
    removed: every login names a user and proves a password (or, for root, is the OS root on the socket).
    """
    app_password = read_secret(cfg.mariadb_app_password_file, create=True)
    cdc_password = read_secret(cfg.mariadb_cdc_password_file, create=True)
    db = _sql_ident(cfg.mariadb_db)
    app = f"{_sql_str(cfg.mariadb_app_user)}@{_sql_str(client_host)}"
    cdc = f"{_sql_str(cfg.mariadb_cdc_user)}@{_sql_str(client_host)}"
    return "\n".join([
        "DROP USER IF EXISTS ''@'localhost', ''@'%', ''@'127.0.0.1';",
        f"CREATE DATABASE IF NOT EXISTS {db} CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;",
        f"CREATE USER IF NOT EXISTS {app} IDENTIFIED BY {_sql_str(app_password)} REQUIRE SSL;",
        f"ALTER USER {app} IDENTIFIED BY {_sql_str(app_password)} REQUIRE SSL;",
        f"GRANT ALL PRIVILEGES ON {db}.* TO {app};",
        f"CREATE USER IF NOT EXISTS {cdc} IDENTIFIED BY {_sql_str(cdc_password)} REQUIRE SSL;",
        f"ALTER USER {cdc} IDENTIFIED BY {_sql_str(cdc_password)} REQUIRE SSL;",
        f"GRANT SELECT ON {db}.* TO {cdc};",
        f"GRANT {', '.join(MARIADB_CDC_GLOBAL_GRANTS)} ON *.* TO {cdc};",
        *_attribution_store_sql(cfg, cdc),
        "FLUSH PRIVILEGES;",
    ]) + "\n"


# --- the attribution of deletes on MariaDB (docs/policy.md, "Attribution") ------------------------------------
#: The account the delete triggers run as (their DEFINER): locked (nobody logs in as it), with INSERT on the
#: attribution table and TRIGGER on the branch database only. The application account has no privilege on the
#: attribution database, so it can't write an attribution itself, and it can't make a trigger run as another
#: account (that takes SUPER or SET USER): what reaches the table is what the delete triggers insert.
MARIADB_ATTRIBUTION_DEFINER = ("guard_attribution", "localhost")
#: The attribution table: BLACKHOLE (every insert is written to the binlog as a row event, in the deleting
#: transaction, and nothing is stored), one column, the principal (NULL: the session named none).
MARIADB_ATTRIBUTION_ENGINE = "BLACKHOLE"
MARIADB_ATTRIBUTION_COLUMNS = "principal VARCHAR(255) NULL"
MARIADB_ATTRIBUTION_DEFINER_GRANTS = "INSERT"
MARIADB_ATTRIBUTION_INSERT = (f"INSERT INTO {_sql_ident(ATTRIBUTION_DATABASE)}.{_sql_ident(ATTRIBUTION_TABLE)} "
                              "(principal) VALUES (LEFT(NULLIF(@guard_principal, ''), 255))")
#: What the BEFORE INSERT/UPDATE triggers do: the row names the session's principal, whatever the statement wrote.
MARIADB_STAMP = "SET NEW.updated_by = LEFT(NULLIF(@guard_principal, ''), 255)"
#: The tables whose writes are attributed (the demo schema's; guard/stack/assets/branch_schema_mariadb.sql).
MARIADB_ATTRIBUTED_TABLES = SEED_TABLES


def _definer() -> str:
    user, host = MARIADB_ATTRIBUTION_DEFINER
    return f"{_sql_str(user)}@{_sql_str(host)}"


def _attribution_store_sql(cfg: StackConfig, cdc: str) -> list[str]:
    """The guard-owned attribution database and table, the triggers' definer account, and the CDC account's
    SELECT on the table (Debezium reads its definition; it holds no row). Run as root, before the schema."""
    db, table = _sql_ident(ATTRIBUTION_DATABASE), _sql_ident(ATTRIBUTION_TABLE)
    return [
        f"CREATE DATABASE IF NOT EXISTS {db} CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;",
        attribution_table_ddl(replace=False),
        f"CREATE USER IF NOT EXISTS {_definer()} ACCOUNT LOCK;",
        f"ALTER USER {_definer()} ACCOUNT LOCK;",
        f"GRANT {MARIADB_ATTRIBUTION_DEFINER_GRANTS} ON {db}.{table} TO {_definer()};",
        f"GRANT TRIGGER ON {_sql_ident(cfg.mariadb_db)}.* TO {_definer()};",
        f"GRANT SELECT ON {db}.{table} TO {cdc};",
    ]


def attribution_table_ddl(*, replace: bool) -> str:
    """`CREATE TABLE IF NOT EXISTS` the attribution table, or `CREATE OR REPLACE` it: a connector that captured
    its database only after the table was made never saw its DDL (its schema history keeps only captured
    databases' DDL) and fails on the table's first row event; the stack re-creates the table (it holds no row)
    after such a connector update, so the DDL passes through the binlog into the connector's history."""
    verb = "CREATE OR REPLACE TABLE" if replace else "CREATE TABLE IF NOT EXISTS"
    return (f"{verb} {_sql_ident(ATTRIBUTION_DATABASE)}.{_sql_ident(ATTRIBUTION_TABLE)} "
            f"({MARIADB_ATTRIBUTION_COLUMNS}) ENGINE={MARIADB_ATTRIBUTION_ENGINE};")


def mariadb_attribution_sql(cfg: StackConfig) -> str:
    """The attribution triggers of the branch tables (run as root, after the schema exists; idempotent), all
    running as the definer account: BEFORE INSERT and BEFORE UPDATE set `updated_by` from the session's
    `@guard_principal` (the definer may update that one column and no other), AFTER DELETE inserts it into the
    attribution table, in the deleting transaction. Trigger names are per database: each names its table."""
    db = _sql_ident(cfg.mariadb_db)
    out = []
    for table in MARIADB_ATTRIBUTED_TABLES:
        out.append(f"GRANT UPDATE (updated_by) ON {db}.{_sql_ident(table)} TO {_definer()};")
        for when in ("insert", "update"):
            out.append(f"CREATE OR REPLACE DEFINER = {_definer()} TRIGGER {db}."
                       f"{_sql_ident(f'{table}_guard_principal_{when}')} BEFORE {when.upper()} ON {db}."
                       f"{_sql_ident(table)} FOR EACH ROW {MARIADB_STAMP};")
        out.append(f"CREATE OR REPLACE DEFINER = {_definer()} TRIGGER {db}."
                   f"{_sql_ident(table + '_guard_principal_delete')} AFTER DELETE ON {db}.{_sql_ident(table)} "
                   f"FOR EACH ROW {MARIADB_ATTRIBUTION_INSERT};")
    return "\n".join(out) + "\n"


def seed_mariadb(cfg: StackConfig, dsn: str, admin: Callable[[str], object]) -> int:
    """Create the MariaDB branch's tables, have `admin` (root) install their attribution triggers
    (`mariadb_attribution_sql`), and insert its synthetic customers when ``customers`` is empty.

    Other customers than branch 0101's (another seed, branch code 0202), each login with a binary device
    fingerprint, written as the branch's batch service (SEED_PRINCIPAL). Returns the rows inserted (0 if
    already seeded).
    """
    import random

    from guard.workload.branch import MariaConnection, attribute, device_fingerprint, mariadb_value
    from guard.workload.synth import demo_dataset

    with MariaConnection(dsn) as conn:
        for body in sql_statements(read_asset("branch_schema_mariadb.sql")):
            conn.execute(body)
        admin(mariadb_attribution_sql(cfg))
        count = conn.execute("SELECT count(*) FROM customers").fetchone()
        if count and count[0] > 0:
            progress(f"mariadb: {cfg.mariadb_db} already seeded ({count[0]} customers)")
            return 0
        data = demo_dataset(seed=cfg.mariadb_seed, customers=cfg.seed_customers, branch_code=cfg.mariadb_branch)
        rng = random.Random(cfg.mariadb_seed)
        for row in data["customer_auth"]:
            row["device_fp"] = device_fingerprint(rng)
        total = 0
        with conn.transaction():
            attribute(conn, SEED_PRINCIPAL)
            for table in SEED_TABLES:
                rows = data.get(table, [])
                if not rows:
                    continue
                cols = list(rows[0].keys())
                stmt = (f"INSERT INTO {table} ({', '.join(cols)}) "  # noqa: S608 - fixed names
                        f"VALUES ({', '.join(['%s'] * len(cols))})")
                conn.conn.cursor().executemany(stmt, [[mariadb_value(r[c]) for c in cols] for r in rows])
                total += len(rows)
        progress(f"mariadb: seeded {total} rows into {cfg.mariadb_db} "
                 + ", ".join(f"{t}={len(data.get(t, []))}" for t in SEED_TABLES))
        return total
