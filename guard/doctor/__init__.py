"""`guard doctor`: checks a deployment the way an operator would, one line per check, with what to do.

Each check returns a `Check` (`guard.doctor.check`); the command prints them and exits non-zero when any
failed. Checks talk to the real components with the guard's own settings, so a pass means the guard itself
would get through. One module per concern: `access` (Redis, PostgreSQL, the Connect REST API),
`kafka_security`, `evidence` (the audit signing key, the evidence topics' retention), `c3`, `mariadb`,
`transactions` (hanging transactions, the group's offsets); `run_checks` runs them all, the checks that need
no Kafka first, and stops at a cluster that does not answer.
"""

from __future__ import annotations

from collections.abc import Iterator

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from guard.config import Settings
from guard.doctor.access import access_checks
from guard.doctor.c3 import check_c3_absent
from guard.doctor.check import Check
from guard.doctor.evidence import check_audit_signing_key, check_evidence_topics
from guard.doctor.kafka_security import check_kafka_security
from guard.doctor.mariadb import check_mariadb
from guard.doctor.transactions import check_group_offsets, check_hanging_transactions
from guard.errors import ConfigError
from guard.kafka_security import client_config, describe


def run_checks(settings: Settings, *, settle_s: float | None = None) -> Iterator[Check]:
    yield from access_checks(settings)  # Redis, PostgreSQL, Connect REST (issue 20)
    yield check_audit_signing_key(settings)
    try:
        admin = AdminClient(client_config(settings))
    except ConfigError as exc:
        yield Check("kafka", False, f"no client configuration for {describe(settings)}: {exc}",
                    "fix the GUARD_KAFKA_* settings (`guard stack env` prints the local stack's)")
        return
    try:
        brokers = admin.list_topics(timeout=10).brokers
    except KafkaException as exc:
        yield Check("kafka", False, f"{describe(settings)} does not answer ({exc.args[0]})",
                    "start the cluster (`guard stack up` locally) or check GUARD_KAFKA_BOOTSTRAP, the username, "
                    "the password file and the CA file")
        return
    yield Check("kafka", True, f"{settings.kafka_bootstrap} answers ({len(brokers)} broker(s))")
    yield from check_kafka_security(admin, settings, list(brokers))
    yield from check_evidence_topics(admin, settings)
    yield from check_c3_absent(admin, settings)
    if settings.branch2 and settings.branch2_raw_topic_prefix:
        yield from check_c3_absent(admin, settings.for_branch(settings.branch2, settings.branch2_raw_topic_prefix))
    if settings.branch2_dsn:
        yield from check_mariadb(settings)
    yield from check_hanging_transactions(admin, settings, settle_s=settle_s)
    yield from check_group_offsets(admin, settings, settle_s=settle_s)
