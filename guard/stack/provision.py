"""Bring a PostgreSQL server to the state the demo needs: roles, database, schema, CDC plumbing, rows.

Works on any server we have a superuser connection to — the local cluster (Unix socket) or the
docker-compose ``postgres`` service — so both stacks share one definition. Every step is idempotent.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from guard.stack.assets import read_asset
from guard.stack.config import StackConfig
from guard.stack.errors import StackError
from guard.stack.procs import progress

# insertion order respects the foreign key accounts.customer_id -> customers
SEED_TABLES = ("customers", "accounts", "transactions", "customer_auth")


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
        from guard.workload.synth import demo_dataset
    except ImportError as exc:
        raise StackError(f"guard.workload.synth.demo_dataset is not importable ({exc}); the demo database cannot "
                         f"be seeded. Pull the latest code and run `guard stack up` again.") from exc
    with psycopg.connect(dsn) as conn:
        count = conn.execute("SELECT count(*) FROM public.customers").fetchone()
        if count and count[0] > 0:
            progress(f"postgres: {cfg.branch_db} already seeded ({count[0]} customers)")
            return 0
        data = demo_dataset(seed=cfg.seed, customers=cfg.seed_customers)
        total = 0
        with conn.transaction(), conn.cursor() as cur:
            for table in SEED_TABLES:
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
