"""Kafka security (issue 20, the Kafka part): the connection, anonymous logins, plaintext listeners, raw readers."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import (
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ConfigResource,
    ResourcePatternType,
    ResourceType,
)

from guard.config import Settings
from guard.doctor.check import Check, probe_logger
from guard.kafka_security import api_versions_answered, ca_file

#: Protocols that carry the data in clear.
PLAINTEXT_PROTOCOLS = ("PLAINTEXT", "SASL_PLAINTEXT")
#: How long an anonymous client gets before it counts as refused.
ANONYMOUS_TIMEOUT_S = 4.0


@dataclass(frozen=True)
class Listener:
    name: str
    protocol: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.name}://{self.host}:{self.port} ({self.protocol})"


def parse_listeners(listeners: str, protocol_map: str) -> list[Listener]:
    """A broker's ``listeners`` with the protocol each maps to (``listener.security.protocol.map``; a listener
    named after a protocol, e.g. ``PLAINTEXT://``, uses that protocol when the map does not name it)."""
    protocols = {}
    for entry in protocol_map.split(","):
        if ":" in entry:
            name, proto = entry.split(":", 1)
            protocols[name.strip().upper()] = proto.strip().upper()
    out = []
    for item in listeners.split(","):
        item = item.strip()
        if "://" not in item:
            continue
        name, address = item.split("://", 1)
        host, _, port = address.rpartition(":")
        try:
            number = int(port)
        except ValueError:
            continue
        name = name.strip().upper()
        out.append(Listener(name, protocols.get(name, name), host.strip("[]"), number))
    return out


def plaintext_listeners(listeners: list[Listener]) -> list[Listener]:
    return [lis for lis in listeners if lis.protocol in PLAINTEXT_PROTOCOLS]


def _bootstrap_addresses(bootstrap: str) -> list[tuple[str, int]]:
    out = []
    for item in bootstrap.split(","):
        host, _, port = item.strip().rpartition(":")
        if host and port.isdigit():
            out.append((host.strip("[]"), int(port)))
    return out


def answers_plaintext(host: str, port: int, timeout: float = 2.0) -> bool:
    """True when host:port answers a Kafka request sent in clear (a plaintext listener)."""
    try:
        return api_versions_answered(host, port, timeout)
    except (OSError, ValueError, struct.error):
        return False


def raw_topic_readers(bindings: Iterable[AclBinding], raw_prefix: str) -> dict[str, list[str]]:
    """Principals allowed to READ some raw topic (``<raw_prefix>.*``), with the grants that allow it."""
    raw = raw_prefix + "."
    found: dict[str, list[str]] = {}
    for b in bindings:
        if b.restype != ResourceType.TOPIC or b.permission_type != AclPermissionType.ALLOW:
            continue
        if b.operation not in (AclOperation.READ, AclOperation.ALL):
            continue
        name, ptype = b.name, b.resource_pattern_type
        if ptype == ResourcePatternType.LITERAL:
            covers = name == "*" or name.startswith(raw)
        elif ptype == ResourcePatternType.PREFIXED:
            covers = raw.startswith(name) or name.startswith(raw)
        else:
            covers = False
        if covers:
            kind = getattr(ptype, "name", str(ptype))
            found.setdefault(b.principal, []).append(f"{b.operation.name} on {kind} {name!r}")
    return found


def check_kafka_security(admin: AdminClient, settings: Settings, brokers: list[int]) -> Iterator[Check]:
    yield check_connection(settings)
    yield check_anonymous_refused(settings)
    yield from raw_reader_checks(admin, settings)
    yield check_plaintext_listeners(admin, settings, brokers)


def check_connection(settings: Settings) -> Check:
    protocol = settings.kafka_security_protocol.upper()
    name = "kafka: encrypted and authenticated"
    if protocol == "SASL_SSL":
        return Check(name, True, f"TLS (CA {ca_file(settings)}) and SASL {settings.kafka_sasl_mechanism} as "
                                 f"User:{settings.kafka_username}")
    return Check(name, False, f"the guard connects with {protocol}: "
                              + ("not encrypted" if "SSL" not in protocol else "not authenticated by SASL"),
                 "use a SASL_SSL listener: GUARD_KAFKA_SECURITY_PROTOCOL=SASL_SSL with GUARD_KAFKA_USERNAME, "
                 "GUARD_KAFKA_PASSWORD_FILE and GUARD_KAFKA_CA_FILE (`guard stack env` prints the local stack's)")


def _anonymous_answers(conf: dict[str, Any]) -> bool:
    full: dict[str, Any] = {**conf, "logger": probe_logger, "socket.timeout.ms": int(ANONYMOUS_TIMEOUT_S * 1000)}
    admin = AdminClient(full)
    try:
        return bool(admin.list_topics(timeout=ANONYMOUS_TIMEOUT_S).brokers)
    except KafkaException:
        return False


def check_anonymous_refused(settings: Settings) -> Check:
    """A client without credentials, in clear and over TLS, must get nothing from the bootstrap servers."""
    name = "kafka: anonymous clients refused"
    tries = {"plaintext": {"bootstrap.servers": settings.kafka_bootstrap, "security.protocol": "PLAINTEXT"}}
    ca = ca_file(settings)
    if ca.is_file():
        tries["TLS without SASL"] = {"bootstrap.servers": settings.kafka_bootstrap, "security.protocol": "SSL",
                                     "ssl.ca.location": str(ca)}
    answered = [how for how, conf in tries.items() if _anonymous_answers(conf)]
    if answered:
        return Check(name, False, f"{settings.kafka_bootstrap} serves metadata to an anonymous client "
                                  f"({', '.join(answered)})",
                     "require SASL on every listener (listener.security.protocol.map: SASL_SSL only) and set "
                     "allow.everyone.if.no.acl.found=false")
    return Check(name, True, f"a client without credentials gets nothing ({', '.join(tries)})")


def raw_reader_checks(admin: AdminClient, settings: Settings) -> Iterator[Check]:
    """`check_raw_readers` for every branch the settings name: the second branch's raw topics (MariaDB's, for
    instance) hold plaintext as much as the first's, and were not checked."""
    yield check_raw_readers(admin, settings)
    if settings.branch2 and settings.branch2_raw_topic_prefix:
        yield check_raw_readers(admin, settings.for_branch(settings.branch2, settings.branch2_raw_topic_prefix))


def check_raw_readers(admin: AdminClient, settings: Settings) -> Check:
    name = f"kafka: raw topics readable by the guard only ({settings.raw_topic_prefix}.*)"
    expected = settings.kafka_guard_principal or f"User:{settings.kafka_username}"
    pattern = AclBindingFilter(ResourceType.TOPIC, None, ResourcePatternType.ANY, None, None,  # type: ignore[arg-type]
                               AclOperation.ANY, AclPermissionType.ANY)
    try:
        bindings = admin.describe_acls(pattern, request_timeout=10).result()
    except KafkaException as exc:
        err = exc.args[0]
        if err.code() == KafkaError.SECURITY_DISABLED:
            return Check(name, False, "the cluster has no authorizer: every client may read the raw topics",
                         "set authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer and "
                         "allow.everyone.if.no.acl.found=false on every broker and controller")
        return Check(name, False, f"the ACLs can't be listed as {expected} ({err.str()})",
                     f"grant DESCRIBE on the cluster to {expected} (`guard stack up` does locally) or run "
                     f"`guard doctor` as an administrator")
    readers = raw_topic_readers(bindings, settings.raw_topic_prefix)
    others = {p: grants for p, grants in readers.items() if p != expected}
    if others:
        named = "; ".join(f"{p} ({', '.join(g)})" for p, g in sorted(others.items()))
        return Check(name, False, f"besides {expected}, these may read {settings.raw_topic_prefix}.*: {named}",
                     "remove those grants (Admin API delete_acls, or kafka-acls.sh --remove ... --allow-principal "
                     "<principal> --operation Read --topic <pattern>); downstream systems read sanitized.* only")
    if expected not in readers:
        return Check(name, False, f"{expected} has no READ grant on {settings.raw_topic_prefix}.*",
                     f"grant READ and DESCRIBE on the PREFIXED topic pattern '{settings.raw_topic_prefix}.' to "
                     f"{expected} (`guard stack up` does locally)")
    return Check(name, True, f"only {expected} ({', '.join(readers[expected])}); super users (super.users) "
                             "are not ACLs and are not listed")


def check_plaintext_listeners(admin: AdminClient, settings: Settings, brokers: list[int]) -> Check:
    """No broker listener maps to a plaintext protocol, and no listener port on a broker host answers in clear."""
    name = "kafka: no plaintext listener"
    found: list[str] = []
    probe: set[tuple[str, int]] = set(_bootstrap_addresses(settings.kafka_bootstrap))
    hosts = {h for h, _ in probe}
    unreadable = ""
    for broker in brokers:
        resource = ConfigResource(ConfigResource.Type.BROKER, str(broker))
        try:
            configs = admin.describe_configs([resource], request_timeout=10)[resource].result()
        except KafkaException as exc:
            unreadable = f"broker {broker}'s listeners can't be read ({exc.args[0].str()}); ports probed only"
            continue
        listeners = parse_listeners(str(configs["listeners"].value or ""),
                                    str(configs["listener.security.protocol.map"].value or ""))
        found += [f"broker {broker}: {lis}" for lis in plaintext_listeners(listeners)]
        for lis in listeners:
            for host in ({lis.host} if lis.host not in ("", "0.0.0.0", "::") else hosts):  # noqa: S104
                probe.add((host, lis.port))
    for host, port in sorted(probe):
        if answers_plaintext(host, port):
            found.append(f"{host}:{port} answers a request sent in clear")
    if found:
        return Check(name, False, "; ".join(dict.fromkeys(found)),
                     "remove the listener (listeners / advertised.listeners / listener.security.protocol.map of the "
                     "broker; a dynamically added one: `kafka-configs.sh --alter --entity-type brokers --entity-name "
                     "<id> --delete-config listeners`) or make it SASL_SSL")
    checked = ", ".join(f"{h}:{p}" for h, p in sorted(probe))
    return Check(name, True, f"every listener is TLS (probed {checked} in clear: no answer)"
                 + (f"; {unreadable}" if unreadable else ""))
