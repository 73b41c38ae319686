"""Access (issue 20): Redis, PostgreSQL and the Connect REST API admit only who belongs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from guard.config import Settings
from guard.doctor.check import Check


def _strip_userinfo(url: str, scheme: str | None = None) -> str:
    from urllib.parse import urlsplit, urlunsplit

    p = urlsplit(url)
    netloc = (p.hostname or "") + (f":{p.port}" if p.port else "")
    return urlunsplit((scheme or p.scheme, netloc, p.path, p.query if (scheme or p.scheme) == "rediss" else "",
                       p.fragment))


def check_redis_access(settings: Settings) -> Iterator[Check]:
    """TLS and the guard's own ACL user; anonymous and plaintext clients refused; no FLUSHALL, no other keys."""
    import redis

    from guard.keys.redis_client import redis_client
    from guard.keys.store import tenant_prefix

    url = settings.redis_url
    if not url.startswith("rediss://"):
        yield Check("redis tls", False, "GUARD_REDIS_URL is not rediss://: the key store is reached without TLS",
                    "serve Redis on a tls-port only and use rediss://<user>@host:port/0?ssl_ca_certs=<ca file> "
                    "(`guard stack env` prints the local stack's)")
        return
    client = redis_client(url, settings.redis_password_file or None, socket_timeout=5, socket_connect_timeout=5)
    try:
        user = client.execute_command("ACL", "WHOAMI")
        user = user.decode() if isinstance(user, bytes) else str(user)
    except redis.RedisError as exc:
        yield Check("redis tls+user", False, f"cannot log in over TLS ({type(exc).__name__}: {exc})",
                    "check GUARD_REDIS_URL (user, CA file) and GUARD_REDIS_PASSWORD_FILE; `guard stack up` locally")
        return
    ok = user != "default"
    yield Check("redis tls+user", ok, f"TLS, verified server certificate, ACL user {user!r}",
                "" if ok else "log in as the guard's own ACL user (rediss://guard@...), not the default user")
    anon = redis.Redis.from_url(_strip_userinfo(url), socket_timeout=5, socket_connect_timeout=5)
    try:
        anon.exists(f"{tenant_prefix(settings.tenant)}tenant")
        served = True
    except redis.RedisError:  # NOAUTH (default user off) or any refusal
        served = False
    finally:
        anon.close()
    yield Check("redis anonymous refused", not served, "a client without credentials was served (default user on)"
                if served else "a client without credentials is refused (NOAUTH)",
                "" if not served else "disable the default user: `user default off` in the ACL file (the local "
                                      "stack renders <home>/redis/users.acl), then `ACL LOAD`")
    plain = redis.Redis.from_url(_strip_userinfo(url, "redis"), socket_timeout=3, socket_connect_timeout=3)
    try:
        plain.ping()
        yield Check("redis plaintext refused", False, "the same port answers without TLS",
                    "set `port 0` and `tls-port <port>` in redis.conf")
    except redis.AuthenticationError:
        yield Check("redis plaintext refused", False, "the port accepts plaintext connections (then asks for a "
                    "password)", "set `port 0` and `tls-port <port>` in redis.conf")
    except redis.RedisError:
        yield Check("redis plaintext refused", True, "a plaintext connection to the port fails")
    finally:
        plain.close()
    yield from _redis_least_privilege(client, settings)
    client.close()


def _redis_least_privilege(client: Any, settings: Settings) -> Iterator[Check]:
    import redis

    from guard.keys.store import tenant_prefix

    # FLUSHALL is probed inside MULTI: Redis checks ACLs when it queues a command, so a refusal comes back
    # at once, and an allowed FLUSHALL is only QUEUED and then DISCARDed (never run by this check).
    conn = client.connection_pool.get_connection()
    try:
        conn.send_command("MULTI")
        conn.read_response()
        conn.send_command("FLUSHALL")
        try:
            reply = conn.read_response()
        except redis.exceptions.NoPermissionError:
            reply = None
        except redis.ResponseError as exc:
            reply = None if "NOPERM" in str(exc) else str(exc)
        conn.send_command("DISCARD")
        conn.read_response()
    finally:
        client.connection_pool.release(conn)
    yield Check("redis no FLUSHALL", reply is None, "the guard's user is refused FLUSHALL" if reply is None
                else "the guard's user may run FLUSHALL (it was queued and discarded, not run)",
                "" if reply is None else "limit the guard's ACL user: -@dangerous -flushall -flushdb -config "
                                         "-debug -keys -shutdown (guard/stack/redisd.py GUARD_COMMANDS)")
    other = tenant_prefix(settings.tenant + "-doctor-probe") + "tenant"
    try:
        client.exists(other)
        yield Check("redis key patterns", False, f"the guard's user can read {other} (another tenant's prefix)",
                    f"limit the guard's ACL user to its keys: resetkeys ~{tenant_prefix(settings.tenant)}*")
    except redis.RedisError as exc:
        ok = "NOPERM" in str(exc) or isinstance(exc, redis.exceptions.NoPermissionError)
        yield Check("redis key patterns", ok, f"the guard's user is limited to {tenant_prefix(settings.tenant)}*",
                    "" if ok else f"unexpected error {type(exc).__name__}")


def check_postgres_access(settings: Settings) -> Iterator[Check]:
    """TLS in use (pg_stat_ssl) and verified; connections without TLS or without a password refused."""

    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    dsn = settings.branch_dsn
    mode = str(conninfo_to_dict(dsn).get("sslmode") or "prefer")
    try:
        with psycopg.connect(dsn, connect_timeout=5) as conn:
            row = conn.execute("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
    except psycopg.Error as exc:
        yield Check("postgres tls", False, f"cannot connect ({type(exc).__name__}: {str(exc).strip()[:120]})",
                    "check GUARD_BRANCH_DSN (sslrootcert, passfile); `guard stack up` locally")
        return
    ok = bool(row and row[0]) and mode in ("verify-full", "verify-ca")
    yield Check("postgres tls", ok, f"pg_stat_ssl: ssl={row[0] if row else None} {row[1] if row else ''}, "
                                    f"sslmode={mode}",
                "" if ok else "serve TLS (ssl=on, hostssl lines) and connect with sslmode=verify-full and "
                              "sslrootcert=<CA file>")
    for name, override, what in (("postgres plaintext refused", {"sslmode": "disable"}, "without TLS"),
                                 ("postgres password required", {"password": "", "passfile": "/dev/null/none"},
                                  "without a password")):
        try:
            with psycopg.connect(make_conninfo(dsn, connect_timeout=5, **override)):
                pass
            yield Check(name, False, f"a connection {what} was accepted",
                        "pg_hba.conf: `hostssl ... scram-sha-256` lines only, `hostnossl ... reject`, no trust")
        except psycopg.OperationalError as exc:
            reason = str(exc).strip().split("failed: ")[-1][:90]
            yield Check(name, True, f"a connection {what} is refused ({reason})")


def check_connect_access(settings: Settings) -> Iterator[Check]:
    """The REST API refuses anonymous requests (401), accepts the configured user, and listens on loopback only."""
    import ipaddress
    import socket
    from urllib.parse import urlsplit

    import httpx
    import psutil

    from guard.config import connect_credentials
    from guard.errors import GuardError

    url = settings.connect_url.rstrip("/")
    try:
        anon = httpx.get(url + "/connectors", timeout=5).status_code
    except httpx.HTTPError as exc:
        yield Check("connect rest", False, f"{url} does not answer ({type(exc).__name__})",
                    "start Kafka Connect (`guard stack up` locally) or set GUARD_CONNECT_URL")
        return
    yield Check("connect anonymous refused", anon == 401, f"an unauthenticated request gets HTTP {anon}",
                "" if anon == 401 else "enable rest.extension.classes=org.apache.kafka.connect.rest.basic.auth."
                                       "extension.BasicAuthSecurityRestExtension with a JAAS users file")
    status: object
    try:
        auth = connect_credentials(settings.connect_credentials_file or None)
        status = httpx.get(url + "/connectors", timeout=5, auth=auth).status_code if auth else "no credentials"
    except (GuardError, httpx.HTTPError) as exc:
        status = f"error {exc}"
    ok = status == 200
    yield Check("connect credentials", ok, f"the configured user gets HTTP {status}",
                "" if ok else "set GUARD_CONNECT_CREDENTIALS_FILE to a 0600 file `user:password` Connect knows")
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 8083
    try:
        local = ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        local = False
    if not local:
        yield Check("connect loopback only", True, f"{host} is remote: its exposure is that network's to check")
        return
    exposed = []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.settimeout(1)
                    if s.connect_ex((a.address, port)) == 0:
                        exposed.append(a.address)
    yield Check("connect loopback only", not exposed,
                f"port {port} answers on {', '.join(exposed)}" if exposed else
                f"port {port} answers on loopback only",
                "" if not exposed else f"listeners=http://127.0.0.1:{port} in the worker's properties")


def access_checks(settings: Settings) -> Iterator[Check]:
    yield from check_redis_access(settings)
    yield from check_postgres_access(settings)
    yield from check_connect_access(settings)
