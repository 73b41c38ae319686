"""Issue 20, pure logic: CA and certificates, secret files, the Redis ACL text, services' environments."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography import x509

from guard.config import connect_credentials, read_secret_file
from guard.errors import ConfigError
from guard.keys.redis_client import redis_client
from guard.keys.store import tenant_prefix
from guard.stack.config import StackConfig
from guard.stack.procs import child_env
from guard.stack.redisd import acl_text
from guard.stack.secrets import StackSecrets
from guard.stack.tls import ensure_ca, ensure_server_cert


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_ensure_ca_is_idempotent_private_and_signs_server_certs(tmp_path: Path) -> None:
    crt, key = ensure_ca(tmp_path)
    first = crt.read_bytes()
    assert ensure_ca(tmp_path) == (crt, key) and crt.read_bytes() == first
    assert _mode(tmp_path / "tls") == 0o700 and _mode(crt) == 0o600 and _mode(key) == 0o600
    scrt, skey = ensure_server_cert(tmp_path, "redis")
    again = ensure_server_cert(tmp_path, "redis")
    assert again == (scrt, skey) and _mode(skey) == 0o600
    cert = x509.load_pem_x509_certificate(scrt.read_bytes())
    ca = x509.load_pem_x509_certificate(first)
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    # other names: a new certificate from the same CA
    other, _ = ensure_server_cert(tmp_path, "redis", ("127.0.0.1", "localhost", "redis"))
    assert x509.load_pem_x509_certificate(other.read_bytes()).serial_number != cert.serial_number


def test_stack_secrets_are_random_private_and_stable(tmp_path: Path) -> None:
    cfg = StackConfig(home=tmp_path, cache=tmp_path / "cache")
    sec = StackSecrets(cfg)
    sec.write_client_files()
    assert _mode(sec.dir) == 0o700
    files = list(sec.dir.iterdir())
    assert files and all(_mode(f) == 0o600 for f in files)
    assert sec.password("pg-app") == sec.password("pg-app") != sec.password("pg-cdc")
    assert len(sec.password("redis-guard")) >= 32
    env = cfg.env()
    assert env["GUARD_REDIS_PASSWORD_FILE"] == str(sec.path("redis-guard"))
    printed = "\n".join(env.values())
    for name in ("redis-guard", "redis-admin", "pg-app", "pg-cdc", "pg-superuser", "connect-rest"):
        assert sec.password(name) not in printed
    assert "sslmode=verify-full" in env["GUARD_BRANCH_DSN"] and "passfile=" in env["GUARD_BRANCH_DSN"]
    assert env["GUARD_REDIS_URL"].startswith("rediss://guard@")
    assert connect_credentials(env["GUARD_CONNECT_CREDENTIALS_FILE"]) == ("guard-admin", sec.password("connect-rest"))


def test_read_secret_file_refuses_files_others_can_read(tmp_path: Path) -> None:
    p = tmp_path / "s"
    p.write_text("pw\n")
    os.chmod(p, 0o644)
    with pytest.raises(ConfigError, match="chmod 600") as exc:
        read_secret_file(p, "test")
    assert "pw" not in str(exc.value).replace(str(p), "")
    os.chmod(p, 0o600)
    assert read_secret_file(p, "test") == "pw"


def test_acl_disables_default_user_and_limits_the_guard() -> None:
    text = acl_text(["aa"], ["bb"], ["demo-bank"])
    lines = {line.split()[1]: line for line in text.splitlines()}
    default = lines["default"].split()
    # off and no password at all (resetpass, never nopass): nobody logs in as it; its rules (~* &* +@all) are
    # only what Redis 7.0's AOF-loading client is checked against when it replays a MULTI/EXEC
    assert default[:4] == ["user", "default", "off", "resetpass"] and "nopass" not in default
    assert not any(w.startswith((">", "#")) for w in default)
    guard = lines["guard"]
    assert "~bg:demo-bank:*" in guard and "&bg:demo-bank:*" in guard and "~*" not in guard
    for cmd in ("flushall", "flushdb", "config", "debug", "keys", "shutdown"):
        assert f"-{cmd}" in guard.split()
    assert "+bgrewriteaof" in guard.split() and "#aa" in guard and ">" not in guard
    assert "#bb" in lines["admin"]


def test_tenant_prefix_refuses_glob_characters() -> None:
    assert tenant_prefix("demo-bank") == "bg:demo-bank:"
    for bad in ("", "a:b", "a*", "x?", "[x]", "a b"):
        with pytest.raises(ValueError):
            tenant_prefix(bad)


def test_redis_client_takes_the_password_from_the_file(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    os.chmod(pw, 0o600)
    client = redis_client("rediss://guard@127.0.0.1:1/0?ssl_cert_reqs=required", str(pw))
    kwargs = client.connection_pool.connection_kwargs
    assert "password" not in kwargs or kwargs["password"] is None
    assert kwargs["credential_provider"].get_credentials() == ("guard", "s3cret")
    assert "s3cret" not in repr(client)


def test_services_get_no_inherited_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUARD_MASTER_KEY", "secret")
    monkeypatch.setenv("GUARD_PG_ADMIN_DSN", "postgresql://postgres:x@h/db")
    monkeypatch.setenv("PGPASSWORD", "x")
    env = child_env({"LANG": "C.UTF-8"})
    assert "GUARD_MASTER_KEY" not in env and "GUARD_PG_ADMIN_DSN" not in env and "PGPASSWORD" not in env
    assert env["LANG"] == "C.UTF-8" and env.get("PATH") == os.environ.get("PATH")


class _Store:
    """Stand-in for RedisKeyStore's tenant-key calls (the Lua script itself is tested on the real stack)."""

    def __init__(self) -> None:
        self.missing: list[str] = []
        self.checks = 0

    def tenant_keys(self, wrapped: dict[str, bytes]) -> dict[str, bytes]:
        return wrapped

    def missing_tenant_keys(self, purposes: list[str]) -> list[str]:
        self.checks += 1
        return [p for p in purposes if p in self.missing]


def test_running_key_manager_stops_when_a_tenant_key_vanishes(monkeypatch: pytest.MonkeyPatch) -> None:
    from guard.errors import TenantKeyMissingError
    from guard.keys.kms import LocalKeyring
    from guard.keys.manager import KeyManager

    store = _Store()
    now = [1000.0]
    km = KeyManager(LocalKeyring(os.urandom(32)), store, "demo-bank", listen=False,  # type: ignore[arg-type]
                    tenant_check_s=5.0)
    import guard.keys.manager as manager

    monkeypatch.setattr(manager.time, "monotonic", lambda: now[0])
    km._tenant_checked = now[0]
    km.check_tenant_keys()
    assert store.checks == 0  # at most every 5 s
    now[0] += 6
    km.check_tenant_keys()
    assert store.checks == 1
    store.missing = ["index"]
    km.check_tenant_keys()  # throttled: the next check is due 5 s later
    assert store.checks == 1
    now[0] += 6
    with pytest.raises(TenantKeyMissingError, match="index are missing from Redis; the guard refuses"):
        km.check_tenant_keys()
