"""BranchGuard's local stack: Kafka (KRaft), Kafka Connect + Debezium, PostgreSQL 15 and Redis, no Docker.

The CLI (``guard stack up|down|status|env``) and ``python -m guard.stack`` call these functions.
Downloads go to ``$GUARD_CACHE_DIR`` (default ``~/.cache/branchguard``); runtime data, logs and pid
files to ``$GUARD_STACK_HOME`` (default ``~/.local/share/branchguard``). See guard/stack/README.md.

May import: nothing of ``guard`` but ``guard.workload.synth`` (the demo database's seed data) and
``guard.classify`` (the catalog, from which ``connector`` renders the Debezium connector). Layer 8 of
docs/architecture.md (tools); no product module imports it.
"""

from guard.stack.connector import ensure_connector
from guard.stack.errors import StackError
from guard.stack.orchestrator import SERVICES, down, env, kill, restart, start, status, up
from guard.stack.service import ServiceStatus

__all__ = [
    "SERVICES",
    "ServiceStatus",
    "StackError",
    "down",
    "ensure_connector",
    "env",
    "kill",
    "restart",
    "start",
    "status",
    "up",
]
