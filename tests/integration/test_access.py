"""Issue 20 on the real stack: Redis, PostgreSQL and the Connect REST API admit only who belongs.

Who may do what: the guard's Redis user only its tenant's keys and never FLUSHALL; nobody without TLS or a
password; the Connect REST API only with credentials and only on loopback; a missing tenant key stops the
workers instead of being minted again; services' environments hold no secrets of their caller; passwords
rotate on the running stack; `guard doctor` passes, and names the cause when one thing is weakened.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import psutil
import psycopg
import pytest
import redis
from psycopg.conninfo import make_conninfo

from guard.keys.redis_client import redis_client
from guard.keys.store import tenant_prefix
from guard.stack.config import StackConfig
from guard.stack.redisd import Redis
from guard.stack.secrets import StackSecrets
from guard.stack.tls import ensure_ca
from tests.integration.kafka_helpers import GUARD, REPO, GuardProcess, kafka_conf, produce_raw, wait_for

pytestmark = pytest.mark.integration

TENANT = "demo-bank"
MISSING_KEY_MESSAGE = "are missing from Redis; the guard refuses to mint new ones"


@pytest.fixture(scope="module")
def cfg(stack: dict[str, str]) -> StackConfig:
    return StackConfig.from_env()


@pytest.fixture()
def admin(cfg: StackConfig):
    client = Redis(cfg).admin_client(socket_timeout=10)
    yield client
    client.close()


def _guard_client(stack: dict[str, str]) -> redis.Redis:
    return redis_client(stack["GUARD_REDIS_URL"], stack["GUARD_REDIS_PASSWORD_FILE"], socket_timeout=5)


# --- Redis ------------------------------------------------------------------------------------------------
def test_redis_guard_user_cannot_flushall_or_touch_other_keys(stack: dict[str, str], admin: redis.Redis) -> None:
    guard = _guard_client(stack)
    marker = f"bg:other-tenant:probe:{uuid.uuid4()}"
    admin.set(marker, "someone else's key")
    try:
        assert guard.execute_command("ACL", "WHOAMI") in (b"guard", "guard")
        for command in (("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "GET", "*"), ("DEBUG", "SLEEP", "0"), ("KEYS", "*"),
                        ("SHUTDOWN", "NOSAVE")):
            verdict = admin.execute_command("ACL", "DRYRUN", "guard", *command)
            assert b"no permissions" in verdict, (command, verdict)
        for command in (("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "GET", "*"), ("KEYS", "*")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                guard.execute_command(*command)
        with pytest.raises(redis.exceptions.NoPermissionError):
            guard.get(marker)
        with pytest.raises(redis.exceptions.NoPermissionError):
            guard.delete(marker)
        with pytest.raises(redis.exceptions.NoPermissionError):
            guard.get("test:unprefixed")
        assert admin.get(marker) == b"someone else's key"
        # its own keys it may use, including BGREWRITEAOF (erasure purges destroyed keys from the AOF)
        own = f"{tenant_prefix(TENANT)}test:{uuid.uuid4()}"
        assert guard.set(own, "x") and guard.delete(own) == 1
        try:
            guard.bgrewriteaof()
        except redis.ResponseError as exc:
            assert "NOPERM" not in str(exc)  # "already in progress" is fine
    finally:
        admin.delete(marker)
        guard.close()


def test_redis_refuses_anonymous_plaintext_and_wrong_password(stack: dict[str, str], cfg: StackConfig) -> None:
    tls = {"ssl": True, "ssl_ca_certs": str(cfg.ca_file), "ssl_cert_reqs": "required", "socket_timeout": 5}
    anon = redis.Redis(host=cfg.host, port=cfg.redis_port, **tls)
    with pytest.raises((redis.AuthenticationError, redis.ResponseError)) as refused:
        anon.get(f"{tenant_prefix(TENANT)}tenant")
    assert "NOAUTH" in str(refused.value) or isinstance(refused.value, redis.AuthenticationError)
    wrong = redis.Redis(host=cfg.host, port=cfg.redis_port, username="guard", password="not-the-password", **tls)  # noqa: S106
    with pytest.raises(redis.AuthenticationError):
        wrong.ping()
    default = redis.Redis(host=cfg.host, port=cfg.redis_port, username="default", password="", **tls)
    with pytest.raises(redis.AuthenticationError):
        default.ping()
    plain = redis.Redis(host=cfg.host, port=cfg.redis_port, socket_timeout=3, socket_connect_timeout=3)
    with pytest.raises(redis.ConnectionError):
        plain.ping()


def test_redis_client_trusts_only_the_stack_ca_with_one_context(stack: dict[str, str], tmp_path: Path) -> None:
    """Every connection of the guard's pool verifies the key store against the configured CA alone (not the
    system's trust store beside it) with one context per process; another CA's file is refused."""
    guard = _guard_client(stack)
    pool = guard.connection_pool
    connections = [pool.get_connection() for _ in range(3)]
    try:
        sockets = [c._sock for c in connections]  # noqa: SLF001 - the TLS socket is what is checked
        assert all(isinstance(s, ssl.SSLSocket) for s in sockets)
        contexts = {id(s.context) for s in sockets}  # type: ignore[union-attr]
        assert len(contexts) == 1
        assert len(sockets[0].context.get_ca_certs()) == 1  # type: ignore[union-attr]
    finally:
        for c in connections:
            pool.release(c)
        guard.close()
    other_ca, _ = ensure_ca(tmp_path)
    url = stack["GUARD_REDIS_URL"].split("?")[0] + f"?ssl_ca_certs={other_ca}&ssl_cert_reqs=required"
    stranger = redis_client(url, stack["GUARD_REDIS_PASSWORD_FILE"], socket_timeout=5, socket_connect_timeout=5)
    with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        stranger.ping()


def test_stack_admin_client_trusts_only_the_stack_ca(cfg: StackConfig) -> None:
    """The stack's admin connection to the key store (migration, rotation) is pinned to the stack's CA like the
    guard's: redis-py's own TLS connection trusted the system's public CAs beside it."""
    admin = Redis(cfg).admin_client(socket_timeout=10)
    pool = admin.connection_pool
    connection = pool.get_connection()
    try:
        sock = connection._sock  # noqa: SLF001 - the TLS socket is what is checked
        assert isinstance(sock, ssl.SSLSocket)
        assert len(sock.context.get_ca_certs()) == 1
        assert sock.context.verify_mode == ssl.CERT_REQUIRED and sock.context.check_hostname
        assert admin.acl_whoami() in ("admin", b"admin")
    finally:
        pool.release(connection)
        admin.close()


# --- PostgreSQL -------------------------------------------------------------------------------------------
def _refused(dsn: str) -> str:
    with pytest.raises(psycopg.OperationalError) as exc, psycopg.connect(dsn, connect_timeout=5):
        pass
    return str(exc.value)


def test_postgres_requires_tls_and_a_password(stack: dict[str, str], cfg: StackConfig) -> None:
    dsn = stack["GUARD_BRANCH_DSN"]
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
        assert row == (True,)
    assert "no encryption" in _refused(make_conninfo(dsn, sslmode="disable"))
    assert "password" in _refused(make_conninfo(dsn, password="", passfile="/dev/null/none"))
    assert "password authentication failed" in _refused(make_conninfo(dsn, password="wrong",  # noqa: S106
                                                                                passfile="/dev/null/none"))
    for user in ("postgres", "cdc"):  # the superuser over TCP, Debezium's user without its password
        _refused(make_conninfo(dsn, user=user, password="", passfile="/dev/null/none"))
    # the Unix socket trusts nobody either
    _refused(f"host={cfg.home / 'postgres' / 'run'} port={cfg.pg_port} user=postgres dbname=postgres "
             f"passfile={os.devnull}")


def test_postgres_cdc_role_is_least_privilege_and_logical_messages_are_revoked(stack: dict[str, str],
                                                                                cfg: StackConfig) -> None:
    cdc_password = StackSecrets(cfg).password("pg-cdc")
    cdc_dsn = make_conninfo(stack["GUARD_BRANCH_DSN"], user=cfg.cdc_user, password=cdc_password,
                            passfile="/dev/null/none")
    with psycopg.connect(cdc_dsn, autocommit=True) as conn:
        attrs = conn.execute("SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls "
                             "FROM pg_roles WHERE rolname = current_user").fetchone()
        assert attrs == (False, False, False, True, False)
        published = {r[0] for r in conn.execute(
            "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = %s",
            (cfg.publication_name,))}
        readable = {r[0] for r in conn.execute(
            "SELECT table_schema || '.' || table_name FROM information_schema.table_privileges "
            "WHERE grantee = current_user AND privilege_type = 'SELECT'")}
        assert readable and readable <= published, readable - published
        other = {r[0] for r in conn.execute(
            "SELECT DISTINCT privilege_type FROM information_schema.table_privileges WHERE grantee = current_user")}
        assert other == {"SELECT"}
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE TABLE public.cdc_may_not_create (x int)")
    with psycopg.connect(stack["GUARD_BRANCH_DSN"], autocommit=True) as conn:
        for args in ("true, 'guard', 'spoofed'", "true, 'guard', 'spoofed'::bytea"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(f"SELECT pg_logical_emit_message({args})")


# --- Connect REST -----------------------------------------------------------------------------------------
def test_connect_rest_requires_credentials_and_listens_on_loopback_only(stack: dict[str, str],
                                                                        cfg: StackConfig) -> None:
    url = stack["GUARD_CONNECT_URL"]
    assert httpx.get(url + "/connectors", timeout=10).status_code == 401
    assert httpx.get(url + "/connectors", timeout=10, auth=("guard-admin", "wrong")).status_code == 401
    user, _, password = Path(stack["GUARD_CONNECT_CREDENTIALS_FILE"]).read_text().strip().partition(":")
    assert sorted(httpx.get(url + "/connectors", timeout=10, auth=(user, password)).json()) == sorted(
        [cfg.connector_name, cfg.mariadb_connector_name])
    listening = {c.laddr.ip for c in psutil.net_connections(kind="tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == cfg.connect_port}
    import ipaddress

    def loopback(ip: str) -> bool:
        addr = ipaddress.ip_address(ip)
        mapped = getattr(addr, "ipv4_mapped", None)  # Java listens on ::ffff:127.0.0.1
        return (mapped or addr).is_loopback

    assert listening and all(loopback(ip) for ip in listening), listening


# --- secrets stay out of the services' environments ------------------------------------------------------
def test_services_inherit_no_secrets(stack: dict[str, str], cfg: StackConfig) -> None:
    """Restart the Kafka nodes and Connect from a shell full of secrets; their environments hold none of them."""
    from guard.stack.orchestrator import Stack

    canaries = {"GUARD_MASTER_KEY": "Y2FuYXJ5LW1hc3Rlci1rZXktY2FuYXJ5LW1hc3Rlci0=",
                "GUARD_PG_ADMIN_DSN": "postgresql://postgres:canary-admin@127.0.0.1/postgres",
                "PGPASSWORD": "canary-pgpassword", "REDISCLI_AUTH": "canary-redis"}
    env = {**os.environ, **stack, **canaries}
    for service in ("controller", "broker", "connect"):
        done = subprocess.run([sys.executable, "-m", "guard.stack", "restart", service], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    stack_obj = Stack(cfg)
    secret_values = [*canaries.values(), *(StackSecrets(cfg).password(n) for n in
                                           ("redis-guard", "redis-admin", "pg-app", "pg-cdc", "pg-superuser"))]
    for service in (stack_obj.broker, stack_obj.connect, stack_obj.controller):
        pid = service.pid()
        assert pid is not None, service.name
        environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
        names = {item.partition("=")[0] for item in environ.split("\0") if item}
        assert not names & set(canaries), (service.name, names & set(canaries))
        assert not [n for n in names if n.startswith("GUARD_")], (service.name, names)
        for value in secret_values:
            assert value not in environ, service.name
    # the connector still runs after Connect's restart (its password comes from the 0600 file)
    from guard.stack.connector import ensure_connector

    ensure_connector(cfg, timeout=120)


# --- the tenant key must never be minted again ------------------------------------------------------------
def _customer_event(cid: int) -> bytes:
    row = {"customer_id": cid, "name": "测试", "id_number": "110101199003074514", "mobile": "13800138000",
           "branch_code": "0101"}
    return json.dumps({"before": None, "after": row, "op": "c", "ts_ms": 2,
                       "source": {"connector": "postgresql", "name": "t", "db": "branch_0101", "schema": "public",
                                  "table": "customers", "ts_ms": 1, "lsn": cid}}).encode()


def test_missing_tenant_key_stops_workers_and_is_not_minted(stack: dict[str, str], admin: redis.Redis,
                                                            tmp_path: Path) -> None:
    """A running worker stops within seconds; a new worker refuses to start; the key stays absent."""
    prefix = f"tk{uuid.uuid4().hex[:8]}"
    raw = f"{prefix}.public.customers"
    env = {**stack, "GUARD_RAW_TOPIC_PREFIX": prefix}
    index = f"{tenant_prefix(TENANT)}tkey:index"
    produce_raw(stack["GUARD_KAFKA_BOOTSTRAP"], raw, _customer_event(1), b'{"customer_id": 1}')
    running = GuardProcess(env, worker_id=f"{prefix}-a", group_id=f"{prefix}-group", log_dir=tmp_path).start()
    saved: bytes | None = None
    try:
        wait_for(stack["GUARD_KAFKA_BOOTSTRAP"], f"sanitized.{raw}", lambda rs: len(rs) >= 1, timeout=120)
        assert running.alive(), running.log()
        saved = admin.dump(index)
        assert saved is not None
        admin.delete(index)
        stopped_at = time.monotonic()
        for cid in range(2, 40):  # keep batches coming: the worker checks its tenant keys once per batch
            produce_raw(stack["GUARD_KAFKA_BOOTSTRAP"], raw, _customer_event(cid), b'{"customer_id": %d}' % cid)
            if not running.alive():
                break
            time.sleep(0.5)
        assert running.proc is not None
        running.proc.wait(30)
        assert running.proc.returncode != 0
        assert MISSING_KEY_MESSAGE in running.log(), running.log()[-2000:]
        assert time.monotonic() - stopped_at < 40
        fresh = subprocess.run([*GUARD, "run", "--worker-id", f"{prefix}-b"], cwd=REPO,
                               env={**os.environ, **env, "GUARD_GROUP_ID": f"{prefix}-group"}, capture_output=True,
                               text=True, timeout=120)
        assert fresh.returncode != 0
        assert MISSING_KEY_MESSAGE in fresh.stderr and "index" in fresh.stderr, fresh.stderr[-2000:]
        assert "Restore the key(s)" in fresh.stderr
        assert admin.exists(index) == 0, "a tenant key was minted again"
    finally:
        running.kill()
        if saved is not None and not admin.exists(index):
            admin.restore(index, 0, saved)


# --- rotation -------------------------------------------------------------------------------------------
def _server_side_id(cfg: StackConfig, client: redis.Redis) -> int:
    """Redis's id of `client`'s one pooled connection (CLIENT LIST, read by the admin, matched by the client's
    port): the same id after a rotation means the same connection, never closed and opened again."""
    [conn] = client.connection_pool._available_connections  # noqa: SLF001 (the test's own single connection)
    port = conn._sock.getsockname()[1]  # noqa: SLF001
    admin = Redis(cfg).admin_client(socket_timeout=10)  # the current password file's
    try:
        mine = [c for c in admin.client_list() if c["addr"].rsplit(":", 1)[1] == str(port)]
    finally:
        admin.close()
    assert len(mine) == 1, mine
    return int(mine[0]["id"])


def test_up_reloads_the_acl_only_when_it_changed(stack: dict[str, str], cfg: StackConfig) -> None:
    """`up` on a running stack whose ACL already holds loads nothing (on Redis 7.0 a load closes every connection,
    workers' included); a rule changed by hand is replaced by the file's."""
    redis_svc = Redis(cfg)
    redis_svc.reload_acl()  # whatever happened before, the file's rules are now the live ones
    long_lived = _guard_client(stack)
    assert long_lived.ping()
    connection = _server_side_id(cfg, long_lived)
    redis_svc.reload_acl()
    assert long_lived.ping()
    assert _server_side_id(cfg, long_lived) == connection, "an unchanged ACL was loaded again"
    admin = redis_svc.admin_client(socket_timeout=10)  # made after the first reload, which may close connections
    try:
        admin.execute_command("ACL", "SETUSER", "default", "on", "nopass")
    finally:
        admin.close()
    try:
        redis_svc.reload_acl()
        fresh = Redis(cfg).admin_client(socket_timeout=10)
        try:
            flags = fresh.acl_getuser("default")["flags"]
        finally:
            fresh.close()
        assert "off" in flags and "nopass" not in flags, flags
    finally:
        Redis(cfg).reload_acl()


def test_password_rotation_on_the_running_stack(stack: dict[str, str], cfg: StackConfig) -> None:
    sec = StackSecrets(cfg)
    old = {n: sec.password(n) for n in ("redis-guard", "redis-admin", "pg-app", "pg-cdc")}
    long_lived = _guard_client(stack)
    assert long_lived.ping()
    connection = _server_side_id(cfg, long_lived)
    for what in ("redis", "postgres"):
        done = subprocess.run([*GUARD, "stack", "rotate", what], cwd=REPO, env={**os.environ, **stack},
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        for value in old.values():
            assert value not in done.stdout + done.stderr
    new = {n: sec.password(n) for n in old}
    assert all(new[n] != old[n] for n in old)
    # new connections use the new files; the old passwords are refused
    fresh = _guard_client(stack)
    assert fresh.ping()
    tls = {"ssl": True, "ssl_ca_certs": str(cfg.ca_file), "ssl_cert_reqs": "required", "socket_timeout": 5}
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host=cfg.host, port=cfg.redis_port, username="guard", password=old["redis-guard"], **tls).ping()
    assert long_lived.ping()  # an established connection survives; reconnects read the new file
    assert _server_side_id(cfg, long_lived) == connection, "the rotation closed an established connection"
    long_lived.connection_pool.disconnect()
    assert long_lived.ping()
    with psycopg.connect(stack["GUARD_BRANCH_DSN"]) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    _refused(make_conninfo(stack["GUARD_BRANCH_DSN"], password=old["pg-app"], passfile="/dev/null/none"))
    # Debezium reconnected with its new password: a new row reaches its raw topic
    from guard.stack.connector import ensure_connector, topic_message_count

    ensure_connector(cfg, timeout=120)
    topic = f"{cfg.topic_prefix}.public.customers"
    before = topic_message_count(kafka_conf(stack["GUARD_KAFKA_BOOTSTRAP"]), topic)
    with psycopg.connect(stack["GUARD_BRANCH_DSN"], autocommit=True) as conn:
        conn.execute("UPDATE customers SET occupation = occupation WHERE customer_id = "
                     "(SELECT min(customer_id) FROM customers)")
    deadline = time.monotonic() + 60
    while topic_message_count(kafka_conf(stack["GUARD_KAFKA_BOOTSTRAP"]), topic) <= before:
        assert time.monotonic() < deadline, "Debezium did not stream after the cdc password rotation"
        time.sleep(1)


# --- guard doctor -----------------------------------------------------------------------------------------
def _doctor(stack: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GUARD, "doctor", "--settle", "5"], cwd=REPO, env={**os.environ, **stack},
                          capture_output=True, text=True, timeout=300)


def test_doctor_passes_and_names_a_reenabled_default_user(stack: dict[str, str], admin: redis.Redis) -> None:
    ok = _doctor(stack)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    for name in ("redis tls+user", "redis anonymous refused", "redis no FLUSHALL", "redis key patterns",
                 "postgres tls", "postgres plaintext refused", "postgres password required",
                 "connect anonymous refused", "connect loopback only"):
        assert f"ok    {name}:" in ok.stdout, (name, ok.stdout)
    admin.execute_command("ACL", "SETUSER", "default", "on", "nopass", "~*", "+@all")
    try:
        weak = _doctor(stack)
    finally:
        admin.execute_command("ACL", "LOAD")
    assert weak.returncode == 1
    assert "FAIL  redis anonymous refused: a client without credentials was served" in weak.stdout, weak.stdout
    assert "user default off" in weak.stdout
    assert _doctor(stack).returncode == 0


# --- migration of a key store from before issue 20 ---------------------------------------------------------
def test_old_layout_keys_survive_a_restart_and_all_move_under_the_tenant_prefix(
        stack: dict[str, str], cfg: StackConfig, admin: redis.Redis, capsys: pytest.CaptureFixture[str]) -> None:
    """Every kind of the old layout moves, a branch key written in MULTI/EXEC included, after Redis replayed
    it from the AOF under the ACL (a `-@all` default user once dropped that transaction: 4 of 5 keys moved);
    a key whose new name is taken stays where it is and is named."""
    from guard.stack import kill, start
    from guard.stack.redisd import OLD_KINDS

    branch, owner = f"m{uuid.uuid4().hex[:8]}", f"mig{uuid.uuid4().hex[:6]}"
    new = tenant_prefix(TENANT)
    with admin.pipeline(transaction=True) as pipe:  # as the old create_kek_if_absent wrote it
        pipe.hsetnx(f"bg:kek:{branch}", "v1", b"wrapped").hsetnx(f"bg:kek:{branch}", "current", 1).execute()
    old = {f"bg:kek:{branch}": f"{new}kek:{branch}", f"bg:tkey:{owner}:index": f"{tenant_prefix(owner)}tkey:index"}
    admin.set(f"bg:tkey:{owner}:index", b"wrapped-index")
    for kind in OLD_KINDS:
        if kind != "kek":
            name = f"bg:{kind}:{branch}:s1"
            admin.set(name, kind)
            old[name] = f"{new}{kind}:{branch}:s1"
    taken = f"bg:hold:{branch}"
    admin.set(taken, "old")
    admin.set(f"{new}hold:{branch}", "new")
    kill("redis")
    start("redis")
    admin = Redis(cfg).admin_client(socket_timeout=10)
    try:
        assert all(admin.exists(name) for name in old), "a key of the old layout was lost on the restart"
        moved = Redis(cfg).migrate_keys()
        assert moved >= len(old)
        for name, target in old.items():
            assert not admin.exists(name) and admin.exists(target), (name, target)
        assert admin.hget(f"{tenant_prefix(owner)}tenant", "index") is not None
        assert admin.sismember(f"{new}branches", branch)
        assert admin.get(taken) == b"old" and admin.get(f"{new}hold:{branch}") == b"new"
        assert taken in capsys.readouterr().out
    finally:
        admin.delete(taken, f"{new}hold:{branch}", f"{tenant_prefix(owner)}tenant", *old.values())
        admin.srem(f"{new}branches", branch)
        admin.close()
