"""Kafka security without a broker: client settings, the stack's certificates and properties, its ACL plan,
and the pure parts of `guard doctor`'s Kafka checks (issue 20)."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest
from confluent_kafka.admin import AclBinding, AclOperation, AclPermissionType, ResourcePatternType, ResourceType
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from guard.config import load_settings
from guard.doctor.kafka_security import answers_plaintext, parse_listeners, plaintext_listeners, raw_topic_readers
from guard.errors import ConfigError
from guard.kafka_security import client_config, read_password, sasl_ssl_config, settings_env
from guard.stack.config import StackConfig
from guard.stack.errors import StackError
from guard.stack.kafka_auth import USERS, acl_plan, ensure_passwords, scram_format_args
from guard.stack.kraft import broker_properties, controller_properties, parse_properties
from guard.stack.tls import LocalCA

KAFKA_VARS = ("GUARD_KAFKA_SECURITY_PROTOCOL", "GUARD_KAFKA_USERNAME", "GUARD_KAFKA_PASSWORD_FILE",
              "GUARD_KAFKA_CA_FILE", "GUARD_KAFKA_SASL_MECHANISM")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var in KAFKA_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("GUARD_STACK_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def cfg(tmp_path: Path) -> StackConfig:
    return StackConfig(home=tmp_path / "home", cache=tmp_path / "cache", kafka_port=29092, controller_port=29093)


def _secret(path: Path, text: str, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chmod(path, mode)
    return path


# --- client settings ------------------------------------------------------------------------------------
def test_default_client_is_sasl_ssl_as_guard_with_the_stack_files(home: Path) -> None:
    _secret(home / "secrets" / "kafka-guard.password", "s3cret\n")
    _secret(home / "tls" / "ca.crt", "-----BEGIN CERTIFICATE-----\n")
    conf = client_config(load_settings(None, kafka_bootstrap="h:1"), **{"group.id": "g"})
    assert conf == {"bootstrap.servers": "h:1", "security.protocol": "SASL_SSL", "sasl.mechanisms": "SCRAM-SHA-512",
                    "sasl.username": "guard", "sasl.password": "s3cret", "ssl.ca.location": str(home / "tls/ca.crt"),
                    "ssl.endpoint.identification.algorithm": "https", "group.id": "g"}


def test_settings_name_the_files_and_env_never_carries_the_password(home: Path, tmp_path: Path) -> None:
    pw = _secret(tmp_path / "pw", "other")
    ca = _secret(tmp_path / "ca.pem", "x")
    s = load_settings(None, kafka_username="downstream", kafka_password_file=str(pw), kafka_ca_file=str(ca))
    assert client_config(s)["sasl.password"] == "other"
    env = settings_env(s)
    assert env["GUARD_KAFKA_PASSWORD_FILE"] == str(pw) and env["GUARD_KAFKA_USERNAME"] == "downstream"
    assert "other" not in repr(env)


def test_a_password_file_others_may_read_is_refused(tmp_path: Path) -> None:
    pw = _secret(tmp_path / "pw", "s3cret", 0o644)
    with pytest.raises(ConfigError, match="chmod 600") as err:
        read_password(pw)
    assert "s3cret" not in str(err.value)


def test_missing_password_or_ca_says_what_to_do(home: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="guard stack up"):
        client_config(load_settings(None))
    with pytest.raises(ConfigError, match="GUARD_KAFKA_CA_FILE"):
        sasl_ssl_config("u", "p", tmp_path / "none.crt")
    with pytest.raises(ConfigError, match="one of"):
        sasl_ssl_config("u", "p", tmp_path / "none.crt", protocol="SASL_SSLX")


# --- the stack's certificates -----------------------------------------------------------------------------
def test_ca_and_leaves_are_0600_and_chain_to_the_ca(tmp_path: Path) -> None:
    ca = LocalCA(tmp_path / "tls")
    ca.ensure_leaf("broker", ["127.0.0.1"])
    ca.ensure_leaf("admin", server=False)
    for f in (tmp_path / "tls").iterdir():
        assert f.stat().st_mode & 0o077 == 0, f
    assert (tmp_path / "tls").stat().st_mode & 0o077 == 0
    root = x509.load_pem_x509_certificate(ca.ca_cert.read_bytes())
    broker = x509.load_pem_x509_certificate(ca.cert("broker").read_bytes())
    broker.verify_directly_issued_by(root)
    assert broker.subject.rfc4514_string().startswith("CN=broker,")  # the principal mapping rule relies on it
    san = broker.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "127.0.0.1" in {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    pem = ca.keystore("broker").read_text()
    assert pem.index("BEGIN PRIVATE KEY") < pem.index("BEGIN CERTIFICATE")  # Kafka's PEM keystore layout
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)


def test_certificates_are_made_once_and_again_for_a_new_host(tmp_path: Path) -> None:
    ca = LocalCA(tmp_path / "tls")
    ca.ensure_leaf("broker", ["127.0.0.1"])
    first = ca.cert("broker").read_bytes()
    ca.ensure_leaf("broker", ["127.0.0.1"])
    assert ca.cert("broker").read_bytes() == first
    ca.ensure_leaf("broker", ["kafka"])
    assert ca.cert("broker").read_bytes() != first


# --- the stack's properties, passwords and ACLs -------------------------------------------------------------
def test_no_listener_of_either_node_is_plaintext(cfg: StackConfig) -> None:
    broker = parse_properties(broker_properties(cfg, Path("/d")))
    controller = parse_properties(controller_properties(cfg, Path("/c")))
    for p in (broker, controller):
        protocols = {e.split(":")[1] for e in p["listener.security.protocol.map"].split(",")}
        assert protocols <= {"SSL", "SASL_SSL"}, p
        assert p["authorizer.class.name"] == "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
        assert p["allow.everyone.if.no.acl.found"] == "false"
        assert p["ssl.keystore.type"] == "PEM" and p["ssl.truststore.type"] == "PEM"
    assert controller["ssl.client.auth"] == "required"
    assert broker["listener.name.internal.ssl.client.auth"] == "required"
    assert broker["sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
    assert parse_listeners(broker["listeners"], broker["listener.security.protocol.map"])
    assert not plaintext_listeners(parse_listeners(broker["listeners"], broker["listener.security.protocol.map"]))


def test_passwords_are_made_once_0600_and_go_to_format(cfg: StackConfig) -> None:
    first = ensure_passwords(cfg)
    assert set(first) == set(USERS) and len(set(first.values())) == len(USERS)
    assert ensure_passwords(cfg) == first
    for user in USERS:
        assert cfg.kafka_password_file(user).stat().st_mode & 0o077 == 0
    args = scram_format_args(cfg)
    assert args.count("--add-scram") == len(USERS)
    assert f"SCRAM-SHA-512=[name=guard,password={first['guard']}]" in args


def test_a_password_file_others_can_read_is_refused_not_repaired(cfg: StackConfig) -> None:
    ensure_passwords(cfg)
    loose = cfg.kafka_password_file("guard")
    loose.chmod(0o644)
    with pytest.raises(StackError, match=r"readable by other users \(mode 0644\).*chmod 600"):
        ensure_passwords(cfg)
    assert loose.stat().st_mode & 0o777 == 0o644, "the mode is the operator's to fix, with the secret rotated"


def _grants(cfg: StackConfig, user: str) -> set[tuple[str, str, str, str]]:
    return {(r, pt, n, op) for p, r, pt, n, op in acl_plan(cfg) if p == f"User:{user}"}


def test_acl_plan_is_least_privilege(cfg: StackConfig) -> None:
    everything = acl_plan(cfg)
    raw_readers = {p for p, r, pt, n, op in everything if r == "TOPIC" and op in ("READ", "ALL")
                   and ("br0101.".startswith(n) or n.startswith("br0101.")) and pt != "LITERAL"}
    assert raw_readers == {"User:guard"}
    assert ("TOPIC", "PREFIXED", "br0101.", "WRITE") in _grants(cfg, "connect")
    assert ("TOPIC", "PREFIXED", "sanitized.", "READ") in _grants(cfg, "downstream")
    assert {op for r, pt, n, op in _grants(cfg, "downstream") if r == "TOPIC"} == {"READ", "DESCRIBE"}
    oncall = _grants(cfg, "oncall")
    assert {n for r, pt, n, op in oncall if r == "TOPIC" and op == "READ"} == {"guard.anomalies", "guard.audit",
                                                                             "guard.deletions"}
    assert {op for r, pt, n, op in oncall} == {"READ", "DESCRIBE"}
    assert ("TRANSACTIONAL_ID", "PREFIXED", "branchguard-sanitizer", "WRITE") in _grants(cfg, "guard")
    assert not [g for g in _grants(cfg, "guard") if g[2] == "sanitized." and g[3] == "READ"]
    # the reveal service: reads sanitized records, writes only its audit decisions, joins no other group
    assert _grants(cfg, "reveal") == {
        ("TOPIC", "PREFIXED", "sanitized.", "READ"), ("TOPIC", "PREFIXED", "sanitized.", "DESCRIBE"),
        ("GROUP", "LITERAL", "branchguard-reveal", "READ"), ("GROUP", "LITERAL", "branchguard-reveal", "DESCRIBE"),
        ("TOPIC", "LITERAL", "guard.audit", "WRITE"), ("TOPIC", "LITERAL", "guard.audit", "DESCRIBE"),
        ("CLUSTER", "LITERAL", "kafka-cluster", "IDEMPOTENT_WRITE")}


def test_the_analyzer_reads_evidence_and_writes_only_alerts_and_facts(cfg: StackConfig) -> None:
    analyzer = _grants(cfg, "analyzer")
    topics = {(pt, n, op) for r, pt, n, op in analyzer if r == "TOPIC"}
    written = {n for pt, n, op in topics if op in ("WRITE", "ALL")}
    assert written == {"guard.anomalies", "guard.facts", "branchguard-analyzer"}
    assert ("PREFIXED", "branchguard-analyzer", "ALL") in topics  # faust's internal topics only
    read = {n for pt, n, op in topics if op == "READ"}
    assert read == {"guard.audit", "guard.dlq", "guard.deletions", "guard.facts", "guard.anomalies",
                    "sanitized.br0101.public.customers", "sanitized.br0101.public.staff",
                    "sanitized.br0202.branch_0202.customers"}
    assert all(pt == "LITERAL" for pt, n, op in topics if n != "branchguard-analyzer")
    assert {n for r, pt, n, op in analyzer if r == "GROUP"} == {"branchguard-analyzer"}
    # on-call reads alerts and cannot write them; the analyzer is the only other principal that may
    assert not [g for g in _grants(cfg, "oncall") if g[3] in ("WRITE", "ALL", "CREATE")]


def test_oncall_may_describe_the_guard_groups_lag_and_read_nothing_more(cfg: StackConfig) -> None:
    """The status page's lag rows (guard/anomaly/status.py): the sanitizers' and the analyzer's committed offsets
    and their topics' ends. DESCRIBE on exactly those groups and topics; READ only on the three on-call topics
    and its own groups."""
    assert _grants(cfg, "oncall") == {
        *{("TOPIC", "LITERAL", t, op) for t in ("guard.anomalies", "guard.audit", "guard.deletions")
          for op in ("READ", "DESCRIBE")},
        ("GROUP", "PREFIXED", "oncall-", "READ"), ("GROUP", "PREFIXED", "oncall-", "DESCRIBE"),
        ("GROUP", "LITERAL", "branchguard-sanitizer", "DESCRIBE"),
        ("GROUP", "LITERAL", f"branchguard-sanitizer-{cfg.mariadb_branch}", "DESCRIBE"),
        ("GROUP", "LITERAL", "branchguard-analyzer", "DESCRIBE"),
        ("TOPIC", "PREFIXED", f"{cfg.topic_prefix}.", "DESCRIBE"),
        ("TOPIC", "PREFIXED", f"{cfg.mariadb_topic_prefix}.", "DESCRIBE"),
        ("TOPIC", "LITERAL", "guard.facts", "DESCRIBE")}


# --- guard doctor's pure parts ------------------------------------------------------------------------------
def test_listeners_map_to_their_protocols() -> None:
    listeners = parse_listeners("SASL_SSL://127.0.0.1:9092,INTERNAL://127.0.0.1:9094,PLAINTEXT://:9095,"
                                "OPEN://0.0.0.0:9096", "INTERNAL:SSL,SASL_SSL:SASL_SSL,OPEN:SASL_PLAINTEXT")
    assert [str(x) for x in plaintext_listeners(listeners)] == ["PLAINTEXT://:9095 (PLAINTEXT)",
                                                              "OPEN://0.0.0.0:9096 (SASL_PLAINTEXT)"]


def _binding(principal: str, name: str, ptype: ResourcePatternType, op: AclOperation = AclOperation.READ,
             rtype: ResourceType = ResourceType.TOPIC) -> AclBinding:
    return AclBinding(rtype, name, ptype, principal, "*", op, AclPermissionType.ALLOW)


def test_raw_topic_readers_cover_prefixes_literals_and_wildcards() -> None:
    bindings = [
        _binding("User:guard", "br0101.", ResourcePatternType.PREFIXED),
        _binding("User:downstream", "sanitized.", ResourcePatternType.PREFIXED),
        _binding("User:a", "br", ResourcePatternType.PREFIXED),
        _binding("User:b", "br0101.public.customers", ResourcePatternType.LITERAL, AclOperation.ALL),
        _binding("User:c", "*", ResourcePatternType.LITERAL),
        _binding("User:d", "br0101.", ResourcePatternType.PREFIXED, AclOperation.WRITE),
        _binding("User:e", "br0101.", ResourcePatternType.PREFIXED, rtype=ResourceType.GROUP),
    ]
    assert set(raw_topic_readers(bindings, "br0101")) == {"User:guard", "User:a", "User:b", "User:c"}


def test_a_plaintext_listener_is_detected_by_its_answer() -> None:
    """A fake plaintext listener that answers ApiVersions; a TLS-only one would not understand the request."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            size = int.from_bytes(conn.recv(4), "big")
            request = conn.recv(size)
            correlation = request[4:8]
            body = correlation + b"\x00\x00" + b"\x00\x00\x00\x00"
            conn.sendall(len(body).to_bytes(4, "big") + body)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        assert answers_plaintext("127.0.0.1", port)
    finally:
        server.close()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    free = closed.getsockname()[1]
    closed.close()
    assert not answers_plaintext("127.0.0.1", free)


# --- a stack still running with the configuration of before (CI keeps its stack up between runs) -----------
def _fake_running(stack, monkeypatch: pytest.MonkeyPatch, running: set[str], stopped: list[str]) -> None:
    for name in ("controller", "broker", "connect"):
        svc = stack.get(name)
        monkeypatch.setattr(svc, "pid", lambda n=name: 4242 if n in running else None)
        monkeypatch.setattr(svc, "stop", lambda n=name: stopped.append(n) or "stopped")


def test_a_running_plaintext_broker_is_stopped_to_start_with_tls(cfg: StackConfig,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from guard.stack.orchestrator import Stack, restart_stale_jvm_services

    stack = Stack(cfg)
    stack.controller.properties.parent.mkdir(parents=True, exist_ok=True)
    stack.controller.properties.write_text(controller_properties(cfg, stack.controller.data_dir))
    stack.broker.properties.write_text("process.roles=broker\nlisteners=PLAINTEXT://127.0.0.1:29092\n")
    stopped: list[str] = []
    _fake_running(stack, monkeypatch, {"controller", "broker"}, stopped)
    assert restart_stale_jvm_services(stack) == ["broker"]
    assert stopped == ["connect", "broker", "controller"]


def test_an_up_to_date_kafka_is_left_alone(cfg: StackConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    from guard.stack.orchestrator import Stack, restart_stale_jvm_services

    stack = Stack(cfg)
    stack.controller.properties.parent.mkdir(parents=True, exist_ok=True)
    stack.controller.properties.write_text(controller_properties(cfg, stack.controller.data_dir))
    stack.broker.properties.write_text(broker_properties(cfg, stack.broker.data_dir))
    stopped: list[str] = []
    _fake_running(stack, monkeypatch, {"controller", "broker"}, stopped)
    assert restart_stale_jvm_services(stack) == []
    assert stopped == []


def test_the_second_branchs_raw_topics_are_checked_too() -> None:
    """Doctor checked only the first branch's prefix: a READ grant on br0202. (MariaDB's raw topics, plaintext
    as much as br0101's) passed as "only User:guard"."""
    from types import SimpleNamespace

    from guard.config import Settings
    from guard.doctor.kafka_security import raw_reader_checks

    bindings = [_binding("User:guard", "br0101.", ResourcePatternType.PREFIXED),
                _binding("User:guard", "br0202.", ResourcePatternType.PREFIXED),
                _binding("User:downstream", "br0202.", ResourcePatternType.PREFIXED)]
    admin = SimpleNamespace(describe_acls=lambda *_a, **_k: SimpleNamespace(result=lambda: bindings))
    settings = Settings(raw_topic_prefix="br0101", branch2="0202", branch2_raw_topic_prefix="br0202",
                        kafka_username="guard")
    first, second = raw_reader_checks(admin, settings)  # type: ignore[arg-type]
    assert first.ok and first.name.endswith("(br0101.*)"), first
    assert not second.ok and "User:downstream" in second.detail and second.name.endswith("(br0202.*)"), second
