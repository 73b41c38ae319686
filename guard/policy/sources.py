"""Entities from the branch database: staff (`public.staff`) and their roles (`public.staff_roles`).

The branch system owns who works where: a member of staff is a row of `staff` (`staff_id`, `branch_code`,
`organisation`, `active`) and one row of `staff_roles` per role. `staff_entities` turns those rows into
`Staff` entities (member of their roles and their branch); `database_source` returns a callable that
`PolicyEngine(entity_source=...)` reads at load and at every refresh, so a member of staff added, moved or
deactivated in the branch database counts from the next refresh on. Organisations, branches and tables
stay in the policy directory's `entities.json` (they change with a transfer, not with the branch's HR).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from guard.policy.model import entity, ref

STAFF_QUERY = ("SELECT s.staff_id, s.branch_code, s.organisation, s.active, "
               "coalesce(array_agg(r.role ORDER BY r.role) FILTER (WHERE r.role IS NOT NULL), '{}') "
               "FROM public.staff s LEFT JOIN public.staff_roles r ON r.staff_id = s.staff_id "
               "GROUP BY s.staff_id, s.branch_code, s.organisation, s.active ORDER BY s.staff_id")


def staff_entities(rows: Iterable[tuple[str, str, str, bool, Iterable[str]]]) -> list[dict[str, Any]]:
    """`Staff` entities of (staff_id, branch_code, organisation, active, roles) rows."""
    return [entity("Staff", str(staff_id), {"branch": ref("Branch", str(branch)),
                                            "organisation": ref("Organisation", str(org)), "active": bool(active)},
                   [("Role", str(role)) for role in roles] + [("Branch", str(branch))])
            for staff_id, branch, org, active, roles in rows]


def database_source(dsn: str, *, connect_timeout_s: int = 5) -> Callable[[], list[dict[str, Any]]]:
    """A callable reading the staff entities from the branch database at `dsn` (psycopg)."""

    def read() -> list[dict[str, Any]]:
        import psycopg  # the product reads the database only when configured to

        with psycopg.connect(dsn, connect_timeout=connect_timeout_s) as conn:
            return staff_entities(conn.execute(STAFF_QUERY).fetchall())

    return read
