"""Kafka client security, in one place: every Kafka client the product builds gets its settings from here.

`client_config(settings, **extra)` is ``bootstrap.servers`` plus `security_config(settings)` plus the
caller's own settings. With the default ``SASL_SSL`` that is TLS verified against the CA file
(``ssl.ca.location``), SASL/SCRAM-SHA-512 with the configured user, and the password read from a file that
only its owner may read (0600). Nothing here logs or returns the password except inside the config dict
handed to librdkafka.

Defaults fit the local stack (`guard stack up`): user ``guard``, the password file
``<stack home>/secrets/kafka-<user>.password`` and the CA ``<stack home>/tls/ca.crt``, the stack home being
``$GUARD_STACK_HOME`` or ``~/.local/share/branchguard``. `guard stack env` prints all four settings (paths,
never the password).

Layer 0 (next to `guard.config`), because both layer-6 packages (`guard.kafka`, `guard.erasure`) and the
tools build Kafka clients; it imports only `guard.config` and `guard.errors`.
"""

from __future__ import annotations

import os
import socket
import ssl
import stat
import struct
from pathlib import Path
from typing import Any

from guard.config import Settings
from guard.errors import ConfigError

#: librdkafka's names, upper case; the broker of the local stack offers SASL_SSL only.
PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS = ("SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN")


def stack_home() -> Path:
    """The local stack's home (where `guard stack up` keeps the CA and the password files)."""
    return Path(os.environ.get("GUARD_STACK_HOME") or Path.home() / ".local/share/branchguard").expanduser()


def default_password_file(username: str, home: Path | None = None) -> Path:
    return (home or stack_home()) / "secrets" / f"kafka-{username}.password"


def default_ca_file(home: Path | None = None) -> Path:
    return (home or stack_home()) / "tls" / "ca.crt"


def password_file(settings: Settings) -> Path:
    return Path(settings.kafka_password_file).expanduser() if settings.kafka_password_file else \
        default_password_file(settings.kafka_username)


def ca_file(settings: Settings) -> Path:
    return Path(settings.kafka_ca_file).expanduser() if settings.kafka_ca_file else default_ca_file()


def read_password(path: Path, what: str = "Kafka password") -> str:
    """The secret in `path` (surrounding whitespace stripped); refuses a file others may read."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"{what} file {path} does not exist; run `guard stack up` (local stack) or set "
                          f"GUARD_KAFKA_PASSWORD_FILE to the file holding the password") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{what} file {path} may be read by others (mode {stat.S_IMODE(st.st_mode):o}); "
                          f"run `chmod 600 {path}`")
    secret = path.read_text(encoding="utf-8").strip()
    if not secret:
        raise ConfigError(f"{what} file {path} is empty")
    return secret


def sasl_ssl_config(username: str, password: str, ca: Path, *, protocol: str = "SASL_SSL",
                    mechanism: str = "SCRAM-SHA-512") -> dict[str, Any]:
    """librdkafka settings of one principal; the single place that spells them out."""
    protocol = protocol.upper()
    if protocol not in PROTOCOLS:
        raise ConfigError(f"GUARD_KAFKA_SECURITY_PROTOCOL={protocol!r}: use one of {', '.join(PROTOCOLS)}")
    conf: dict[str, Any] = {"security.protocol": protocol}
    if protocol.startswith("SASL"):
        if mechanism.upper() not in MECHANISMS:
            raise ConfigError(f"GUARD_KAFKA_SASL_MECHANISM={mechanism!r}: use one of {', '.join(MECHANISMS)}")
        conf.update({"sasl.mechanisms": mechanism.upper(), "sasl.username": username, "sasl.password": password})
    if protocol.endswith("SSL"):
        if not ca.is_file():
            raise ConfigError(f"Kafka CA file {ca} does not exist; run `guard stack up` (local stack) or set "
                              f"GUARD_KAFKA_CA_FILE to the CA certificate (PEM) that signed the brokers' certificates")
        conf.update({"ssl.ca.location": str(ca), "ssl.endpoint.identification.algorithm": "https"})
    return conf


def security_config(settings: Settings) -> dict[str, Any]:
    """The security part of a client config for `settings`' principal."""
    protocol = settings.kafka_security_protocol.upper()
    password = read_password(password_file(settings)) if protocol.startswith("SASL") else ""
    return sasl_ssl_config(settings.kafka_username, password, ca_file(settings), protocol=protocol,
                           mechanism=settings.kafka_sasl_mechanism)


def client_config(settings: Settings, **extra: Any) -> dict[str, Any]:
    """A complete client config: bootstrap servers, security, then `extra` (dotted names as keyword
    arguments are awkward, so callers usually pass a dict: ``client_config(s, **{"group.id": g})``)."""
    return {"bootstrap.servers": settings.kafka_bootstrap, **security_config(settings), **extra}


def settings_env(settings: Settings) -> dict[str, str]:
    """The `GUARD_KAFKA_*` security variables of `settings` (for child processes; paths, no password)."""
    return {
        "GUARD_KAFKA_SECURITY_PROTOCOL": settings.kafka_security_protocol,
        "GUARD_KAFKA_SASL_MECHANISM": settings.kafka_sasl_mechanism,
        "GUARD_KAFKA_USERNAME": settings.kafka_username,
        "GUARD_KAFKA_PASSWORD_FILE": str(password_file(settings)),
        "GUARD_KAFKA_CA_FILE": str(ca_file(settings)),
    }


def describe(settings: Settings) -> str:
    """How `settings` connect, for messages (never the password)."""
    protocol = settings.kafka_security_protocol.upper()
    who = f" as {settings.kafka_username}" if protocol.startswith("SASL") else ""
    return f"{settings.kafka_bootstrap} ({protocol}{who})"


# --- a protocol-level probe (the stack's controller readiness, `guard doctor`'s plaintext-listener check) --
#: ApiVersions (api key 18), version 0: every Kafka listener answers it, a controller's included.
_API_VERSIONS = 18


def api_versions_answered(host: str, port: int, timeout: float = 3.0,
                          tls: ssl.SSLContext | None = None) -> bool:
    """True when the listener at host:port answers a Kafka ApiVersions request with error code 0.

    librdkafka cannot talk to a controller listener, so this speaks the protocol directly: request header v1
    (api key, version 0, correlation id, client id) and the response's correlation id and error code. With
    `tls`, over TLS (the controller's listener wants the client certificate of the stack's admin); without,
    in plaintext — which is also how `guard doctor` finds a plaintext listener.
    """
    client = b"guard-stack"
    body = struct.pack(">hhih", _API_VERSIONS, 0, 7, len(client)) + client
    with socket.create_connection((host, port), timeout=timeout) as raw:
        s = tls.wrap_socket(raw, server_hostname=host) if tls is not None else raw
        s.settimeout(timeout)
        s.sendall(struct.pack(">i", len(body)) + body)
        head = _recv_exact(s, 4)
        size = struct.unpack(">i", head)[0]
        resp = _recv_exact(s, min(size, 64))
    correlation, error = struct.unpack(">ih", resp[:6])
    return correlation == 7 and error == 0


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the listener closed the connection")
        buf += chunk
    return buf
