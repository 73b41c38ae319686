"""The key store's TLS context: made once per process, trusting only the configured CA (`guard.keys.redis_tls`)."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from redis.connection import Connection

from guard.keys import redis_tls
from guard.keys.redis_client import redis_client
from guard.keys.redis_tls import PinnedSSLConnection, pinned_context
from guard.stack.tls import ensure_ca, ensure_server_cert


def _subjects(context: ssl.SSLContext) -> list[str]:
    return [dict(pair[0] for pair in cert["subject"])["commonName"] for cert in context.get_ca_certs()]


def test_context_trusts_only_the_configured_ca_and_is_shared(tmp_path: Path) -> None:
    ca, _ = ensure_ca(tmp_path / "one")
    first = pinned_context(ca_certs=str(ca))
    assert pinned_context(ca_certs=str(ca)) is first
    # exactly the file's CA: the system's trust store (a hundred-odd public CAs) is not loaded beside it
    assert len(first.get_ca_certs()) == 1
    assert first.check_hostname and first.verify_mode == ssl.CERT_REQUIRED
    assert first.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_a_replaced_ca_file_gets_a_new_context(tmp_path: Path) -> None:
    ca, _ = ensure_ca(tmp_path / "one")
    other, _ = ensure_ca(tmp_path / "two")
    before = pinned_context(ca_certs=str(ca))
    old_subjects = _subjects(before)
    ca.write_bytes(other.read_bytes())
    stat = os.stat(ca)
    os.utime(ca, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    after = pinned_context(ca_certs=str(ca))
    assert after is not before
    assert len(after.get_ca_certs()) == 1
    assert _subjects(after) == _subjects(pinned_context(ca_certs=str(other)))
    assert old_subjects == _subjects(before)


def test_no_ca_named_means_the_system_trust_store(tmp_path: Path) -> None:
    context = pinned_context(ca_certs=None)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert pinned_context(ca_certs=None) is context


def test_redis_client_uses_the_pinned_connection_for_tls_only(tmp_path: Path) -> None:
    ca, _ = ensure_ca(tmp_path / "one")
    password = tmp_path / "password"
    password.write_text("x")
    password.chmod(0o600)
    tls = redis_client(f"rediss://guard@127.0.0.1:1/0?ssl_ca_certs={ca}&ssl_cert_reqs=required", str(password))
    assert tls.connection_pool.connection_class is PinnedSSLConnection
    plain = redis_client("redis://guard@127.0.0.1:1/0", str(password))
    assert plain.connection_pool.connection_class is Connection


def _touch_later(path: Path) -> None:
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))


def test_rotated_files_replace_their_context_instead_of_piling_up(tmp_path: Path) -> None:
    """A long-lived worker whose CA and client certificate rotate keeps one context per set of settings."""
    ca, _ = ensure_ca(tmp_path / "ca")
    cert, key = ensure_server_cert(tmp_path / "ca", "guard-client")
    settings = {"ca_certs": str(ca), "certfile": str(cert), "keyfile": str(key)}
    first = pinned_context(**settings)
    before = len(redis_tls._contexts)
    seen = {id(first)}
    contexts = [first]
    for rotated in (ca, cert, cert, key, ca, cert):
        _touch_later(rotated)
        contexts.append(pinned_context(**settings))
        seen.add(id(contexts[-1]))
        assert pinned_context(**settings) is contexts[-1]
    # every rotation was read again (a new context each time) ...
    assert len(seen) == 7
    # ... and replaced the one before it: the cache did not grow
    assert len(redis_tls._contexts) == before
