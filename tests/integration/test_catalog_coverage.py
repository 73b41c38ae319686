"""The demo branch schema is fully catalogued: no column of it relies on the fail-closed default."""

import psycopg
import pytest

from guard.classify.catalog import Catalog

pytestmark = pytest.mark.integration

DEMO_TABLES = ("customers", "accounts", "transactions", "customer_auth")


def test_every_demo_column_is_in_the_catalog(stack):
    catalog = Catalog.load()
    with psycopg.connect(stack["GUARD_BRANCH_DSN"]) as conn:
        for table in DEMO_TABLES:
            columns = [r[0] for r in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = 'public' "
                "AND table_name = %s", (table,))]
            assert columns, table
            missing = [c for c in columns if catalog.column(f"public.{table}", c) is None]
            assert not missing, f"public.{table} columns missing from schemas/catalog.toml: {missing}"


def test_every_column_of_the_mariadb_branch_is_in_the_catalog(stack):
    from guard.workload.branch import MariaConnection

    catalog = Catalog.load()
    with MariaConnection(stack["GUARD_BRANCH2_DSN"]) as conn:
        for table in DEMO_TABLES:
            columns = [r[0] for r in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = 'branch_0202' "
                "AND table_name = %s", (table,)).fetchall()]
            assert columns, table
            missing = [c for c in columns if catalog.column(f"branch_0202.{table}", c) is None]
            assert not missing, f"branch_0202.{table} columns missing from schemas/catalog.toml: {missing}"
