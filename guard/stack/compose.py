"""Credentials and certificates for docker-compose (`python -m guard.stack compose-secrets /stack`).

The compose file's one-shot `stack-secrets` service runs this in the guard image on a named volume
mounted at ``/stack`` by every service: the same CA (`guard.stack.tls`), passwords (`guard.stack.secrets`),
Redis ACL file and Connect REST users as the local stack, for the compose host names. Each service's
files are handed to the user its image runs as (uid/gid below), mode 0600, so no other container user
reads them. Idempotent: existing passwords and certificates are kept.
"""

from __future__ import annotations

import os
from pathlib import Path

from guard.stack.assets import write_if_changed
from guard.stack.config import StackConfig
from guard.stack.redisd import acl_text, stack_tenants
from guard.stack.secrets import CONNECT_REST_USER, StackSecrets, sha256_hex
from guard.stack.tls import ensure_server_cert

#: Users of the official images: redis:7 and postgres:15 run as uid 999, debezium/connect as kafka (1001).
UIDS = {"redis": 999, "postgres": 999, "connect": 1001, "guard": 10001}
HOSTS = ("127.0.0.1", "localhost", "redis", "postgres", "connect")

PG_HBA = """# docker-compose PostgreSQL: scram-sha-256 everywhere, TLS on every TCP connection (guard.stack.compose)
local     all          all                     scram-sha-256
hostssl   all          all     0.0.0.0/0       scram-sha-256
hostssl   replication  all     0.0.0.0/0       scram-sha-256
hostnossl all          all     0.0.0.0/0       reject
hostnossl replication  all     0.0.0.0/0       reject
"""


def _own(path: Path, service: str, chown: bool) -> None:
    os.chmod(path, 0o600)
    if chown:
        os.chown(path, UIDS[service], UIDS[service])


def compose_secrets(home: Path, *, chown: bool = True) -> None:
    cfg = StackConfig(home=home, cache=home / "cache", host="postgres", pg_port=5432)
    sec = StackSecrets(cfg)
    sec.write_client_files()
    for service in ("redis", "postgres"):
        crt, key = ensure_server_cert(home, service, HOSTS)
        for f in (crt, key):
            _own(f, service, chown)
    os.chmod(home / "tls" / "ca.crt", 0o644)  # noqa: S103  # the CA certificate is public; clients in every container verify servers with it
    acl = home / "redis-users.acl"
    write_if_changed(acl, acl_text([sha256_hex(sec.password("redis-guard"))], [sha256_hex(sec.password("redis-admin"))],
                                   stack_tenants()), 0o600)
    _own(acl, "redis", chown)
    hba = home / "pg_hba.conf"
    write_if_changed(hba, PG_HBA, 0o600)
    _own(hba, "postgres", chown)
    _own(sec.path("pg-superuser"), "postgres", chown)
    users = home / "connect-rest-users.properties"
    write_if_changed(users, f"{CONNECT_REST_USER}: {sec.password('connect-rest')}\n", 0o600)
    jaas = home / "connect-rest-jaas.conf"
    write_if_changed(jaas, "KafkaConnect {\n  org.apache.kafka.connect.rest.basic.auth.extension."
                           f"PropertyFileLoginModule required\n  file=\"{users}\";\n}};\n", 0o600)
    for f in (users, jaas, sec.connect_cdc_properties):
        _own(f, "connect", chown)
    for f in (sec.path("redis-guard"), sec.path("redis-admin"), sec.pgpass, sec.superuser_pgpass,
              sec.connect_rest_credentials, sec.path("pg-app"), sec.path("pg-cdc")):
        _own(f, "guard", chown)
    # search-only directories: each container user reaches only its own 0600 files inside
    for d in (home, sec.dir, home / "tls"):
        os.chmod(d, 0o711)  # noqa: S103
