"""Who may do what on the local stack's Kafka: principals, their passwords, SCRAM credentials and ACLs.

Principals (SASL/SCRAM-SHA-512 users on the broker's ``SASL_SSL`` listener; `acl_plan` is the exact list):

* ``admin``: everything (a super user); what tests and the stack's own tools use.
* ``guard``: read the raw topics ``<prefix>.*``; write, create and describe ``sanitized.*`` and ``guard.*``,
  raise the configs of ``guard.*`` (the evidence topics' retention) and read ``guard.deletions`` back (pending
  deletion confirmations);
  its consumer groups and transactional ids (``branchguard-sanitizer*``); its tools' groups (``guard-*``:
  classify, demo); idempotent writes; describe the cluster, its configs and ACLs (for `guard doctor`) and
  ``__consumer_offsets`` (end offsets only: the hanging-transaction check); everything on ``bench*`` (the
  benchmark's own topics, groups and transactional ids) and reading and deleting ``sanitized.bench*``.
* ``connect``: write, create and describe the raw topics and Debezium's heartbeat topics; its internal topics
  ``_branchguard-connect-*`` and its group ``branchguard-connect``; idempotent writes; describe the cluster.
* ``downstream``: read ``sanitized.*`` and its own groups ``downstream-*``.
* ``reveal``: the reveal service (guard/reveal): read ``sanitized.*`` (assigned partitions, its own group
  ``branchguard-reveal`` named but never joined) and write ``guard.audit`` (idempotent); nothing else.
* ``oncall``: read ``guard.anomalies``, ``guard.audit``, ``guard.deletions`` and its own groups ``oncall-*``;
  describe (never read) the sanitizers' groups (``branchguard-sanitizer``, ``branchguard-sanitizer-<branch 2>``),
  the analyzer's (``branchguard-analyzer``), the raw topics and ``guard.facts``: the status page's group lag.
  No write.
* ``analyzer`` (the anomaly analyzer, `streams/analyzer.py`): read the evidence topics (``guard.audit``,
  ``guard.dlq``, ``guard.deletions``), ``guard.facts``, ``guard.anomalies`` (its own alerts: DLQ spikes of
  the alert topic) and the sanitized customers and staff topics; write and create ``guard.anomalies`` and
  ``guard.facts``; faust's own topics and consumer group (``branchguard-analyzer*``: the app id); describe the
  cluster. Nothing raw, no other sanitized topic.

Super users besides ``admin``: ``broker`` and ``controller``, the certificate principals of the two nodes on
their mutual-TLS listeners (no password; `guard.stack.tls`). ``allow.everyone.if.no.acl.found=false``: what is
not granted here is refused.

Credentials: one random password per user in ``<home>/secrets/kafka-<user>.password`` (0600), made once.
They reach KRaft at format time (``kafka-storage format --add-scram``, controller) and are upserted again at
every `guard stack up` through the Admin API as ``User:admin`` over the broker's mutual-TLS listener (client
certificate ``CN=admin``). Why both: a home formatted before SASL existed (CI reuses
``~/.local/share/branchguard``) gets its users without a reformat — no topic, offset or connector state is
lost and Debezium does not re-snapshot — and replacing a password file then running `guard stack up` rotates
that password (docs: guard/stack/README.md).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from guard.kafka_security import sasl_ssl_config
from guard.secretfile import read_private_text, write_private
from guard.stack.config import StackConfig
from guard.stack.errors import StackError
from guard.stack.procs import progress, quiet_probe_logger
from guard.stack.tls import LocalCA

USERS = ("admin", "guard", "connect", "downstream", "reveal", "oncall", "analyzer")
#: Certificate principals of the nodes and of the stack's own admin client (mutual TLS).
CERT_SUPER_USERS = ("admin", "broker", "controller")
SCRAM_MECHANISM = "SCRAM-SHA-512"
SCRAM_ITERATIONS = 8192
#: Topic names (the defaults of guard.config.Settings; the stack serves the default deployment).
SANITIZED_PREFIX = "sanitized."
GUARD_PREFIX = "guard."
DELETIONS_TOPIC = "guard.deletions"
ONCALL_TOPICS = ("guard.anomalies", "guard.audit", DELETIONS_TOPIC)
GUARD_GROUP = "branchguard-sanitizer"
GUARD_TOOL_GROUPS = "guard-"
BENCH_PREFIX = "bench"
CONNECT_GROUP = "branchguard-connect"
CONNECT_INTERNAL_PREFIX = "_branchguard-connect-"
HEARTBEAT_PREFIX = "__debezium-heartbeat"
DOWNSTREAM_GROUPS = "downstream-"
ONCALL_GROUPS = "oncall-"
#: The analyzer's inputs and outputs (guard.config / guard.anomaly.facts defaults) and its faust app id.
ANALYZER_READS = ("guard.audit", "guard.dlq", DELETIONS_TOPIC, "guard.facts", "guard.anomalies")
ANALYZER_WRITES = ("guard.anomalies", "guard.facts")
ANALYZER_SANITIZED_TABLES = ("customers", "staff")
ANALYZER_APP = "branchguard-analyzer"
#: The analyzer's group lag on the status page is counted on its facts topic.
ANALYZER_FACTS = "guard.facts"
AUDIT_TOPIC = "guard.audit"
REVEAL_GROUP = "branchguard-reveal"


def super_users() -> str:
    return ";".join(f"User:{u}" for u in CERT_SUPER_USERS)


# --- files ---------------------------------------------------------------------------------------------
def local_ca(cfg: StackConfig) -> LocalCA:
    return LocalCA(cfg.tls_dir)


def ensure_tls(cfg: StackConfig) -> LocalCA:
    """The CA, both nodes' keystores and the admin client certificate (idempotent)."""
    ca = local_ca(cfg)
    ca.ensure_leaf("broker", [cfg.host])
    ca.ensure_leaf("controller", [cfg.host])
    ca.ensure_leaf("admin", server=False)
    return ca


def ensure_passwords(cfg: StackConfig) -> dict[str, str]:
    """Every user's password, made once (0600); returns them (never printed).

    An existing password file that others can read is refused, as every secret file is
    (`guard.secretfile.refuse_loose`): quietly tightening it would hide that the password may be known."""
    out: dict[str, str] = {}
    for user in USERS:
        path = cfg.kafka_password_file(user)
        if not path.exists() or not path.read_text(encoding="utf-8").strip():
            write_private(path, secrets.token_hex(24).encode())
        out[user] = read_private_text(path, f"the Kafka password file of {user}", StackError)
    return out


def scram_format_args(cfg: StackConfig) -> list[str]:
    """``--add-scram`` arguments for ``kafka-storage format`` (the controller holds the metadata log)."""
    args: list[str] = []
    for user, password in ensure_passwords(cfg).items():
        args += ["--add-scram", f"{SCRAM_MECHANISM}=[name={user},password={password}]"]
    return args


# --- client configs ------------------------------------------------------------------------------------
def client_config(cfg: StackConfig, user: str = "admin") -> dict[str, Any]:
    """librdkafka settings of `user` on the broker's SASL_SSL listener (tests and tools use ``admin``)."""
    from guard.kafka_security import read_password

    password = read_password(cfg.kafka_password_file(user), f"Kafka password of {user}")
    return {"bootstrap.servers": cfg.bootstrap, **sasl_ssl_config(user, password, cfg.tls_dir / "ca.crt")}


def mtls_admin_config(cfg: StackConfig) -> dict[str, Any]:
    """``User:admin`` by client certificate on the broker's mutual-TLS listener (no SCRAM needed)."""
    ca = local_ca(cfg)
    return {"bootstrap.servers": cfg.internal_bootstrap, "security.protocol": "SSL",
            "ssl.ca.location": str(ca.ca_cert), "ssl.certificate.location": str(ca.cert("admin")),
            "ssl.key.location": str(ca.key("admin")), "ssl.endpoint.identification.algorithm": "https"}


def java_client_properties(cfg: StackConfig, user: str, prefix: str = "") -> str:
    """``security.protocol``/``sasl.*``/``ssl.truststore.*`` lines of a Java client (Connect, Kafka's tools)."""
    password = cfg.kafka_password_file(user).read_text(encoding="utf-8").strip()
    lines = [
        "security.protocol=SASL_SSL",
        f"sasl.mechanism={SCRAM_MECHANISM}",
        f'sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required '
        f'username="{user}" password="{password}";',
        "ssl.truststore.type=PEM",
        f"ssl.truststore.location={cfg.tls_dir / 'ca.crt'}",
    ]
    return "\n".join(prefix + line for line in lines) + "\n"


def write_command_config(cfg: StackConfig, user: str = "admin") -> Path:
    """A 0600 properties file for Kafka's command-line tools (``--command-config``)."""
    path = cfg.kafka_secrets_dir / f"kafka-{user}-client.properties"
    text = java_client_properties(cfg, user)
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        write_private(path, text.encode())
    return path


# --- ACLs ----------------------------------------------------------------------------------------------
def acl_plan(cfg: StackConfig) -> list[tuple[str, str, str, str, str]]:
    """(principal, resource type, pattern type, resource name, operation) of every grant, all ALLOW."""
    raws = (cfg.topic_prefix + ".", cfg.mariadb_topic_prefix + ".")  # the PostgreSQL and MariaDB branches
    plan: list[tuple[str, str, str, str, str]] = []

    def grant(user: str, rtype: str, ptype: str, name: str, *ops: str) -> None:
        plan.extend((f"User:{user}", rtype, ptype, name, op) for op in ops)

    # guard: read raw, write its outputs, its groups and transactional ids
    for raw in raws:
        grant("guard", "TOPIC", "PREFIXED", raw, "READ", "DESCRIBE")
    for prefix in (SANITIZED_PREFIX, GUARD_PREFIX):
        grant("guard", "TOPIC", "PREFIXED", prefix, "WRITE", "CREATE", "DESCRIBE", "DESCRIBE_CONFIGS")
    # the evidence topics' retention is raised by the worker at start (guard.kafka.evidence)
    grant("guard", "TOPIC", "PREFIXED", GUARD_PREFIX, "ALTER_CONFIGS")
    # a worker reads its deletion confirmations back before re-sending one (guard.kafka.confirmations)
    grant("guard", "TOPIC", "LITERAL", DELETIONS_TOPIC, "READ")
    grant("guard", "TOPIC", "LITERAL", "__consumer_offsets", "DESCRIBE")
    grant("guard", "GROUP", "PREFIXED", GUARD_GROUP, "READ", "DESCRIBE")
    grant("guard", "GROUP", "PREFIXED", GUARD_TOOL_GROUPS, "READ", "DESCRIBE")
    grant("guard", "TRANSACTIONAL_ID", "PREFIXED", GUARD_GROUP, "WRITE", "DESCRIBE")
    grant("guard", "CLUSTER", "LITERAL", "kafka-cluster", "IDEMPOTENT_WRITE", "DESCRIBE", "DESCRIBE_CONFIGS")
    # the benchmark's own topics (raw-like input, plain output, guard.* outputs), groups, transactional ids
    for rtype in ("TOPIC", "GROUP", "TRANSACTIONAL_ID"):
        grant("guard", rtype, "PREFIXED", BENCH_PREFIX, "ALL")
    # the bench's own sanitized topic: its latency probe reads it, its clean-up deletes it
    grant("guard", "TOPIC", "PREFIXED", SANITIZED_PREFIX + BENCH_PREFIX, "READ", "DELETE")
    # connect: produce the raw topics, its internal topics and group
    for raw in raws:
        grant("connect", "TOPIC", "PREFIXED", raw, "WRITE", "CREATE", "DESCRIBE", "DESCRIBE_CONFIGS")
    grant("connect", "TOPIC", "PREFIXED", HEARTBEAT_PREFIX, "WRITE", "CREATE", "DESCRIBE", "DESCRIBE_CONFIGS")
    grant("connect", "TOPIC", "PREFIXED", CONNECT_INTERNAL_PREFIX, "ALL")
    grant("connect", "GROUP", "LITERAL", CONNECT_GROUP, "READ", "DESCRIBE")
    # the MariaDB connector's schema history consumer (its group is named after its topic, under Connect's prefix)
    grant("connect", "GROUP", "PREFIXED", CONNECT_INTERNAL_PREFIX, "READ", "DESCRIBE")
    grant("connect", "CLUSTER", "LITERAL", "kafka-cluster", "IDEMPOTENT_WRITE", "DESCRIBE")
    # downstream: sanitized only
    grant("downstream", "TOPIC", "PREFIXED", SANITIZED_PREFIX, "READ", "DESCRIBE")
    grant("downstream", "GROUP", "PREFIXED", DOWNSTREAM_GROUPS, "READ", "DESCRIBE")
    # reveal: read sanitized records, write its audit decisions before any plaintext leaves
    grant("reveal", "TOPIC", "PREFIXED", SANITIZED_PREFIX, "READ", "DESCRIBE")
    grant("reveal", "GROUP", "LITERAL", REVEAL_GROUP, "READ", "DESCRIBE")
    grant("reveal", "TOPIC", "LITERAL", AUDIT_TOPIC, "WRITE", "DESCRIBE")
    grant("reveal", "CLUSTER", "LITERAL", "kafka-cluster", "IDEMPOTENT_WRITE")
    # on-call: the alert, audit and deletion topics, read only
    for topic in ONCALL_TOPICS:
        grant("oncall", "TOPIC", "LITERAL", topic, "READ", "DESCRIBE")
    grant("oncall", "GROUP", "PREFIXED", ONCALL_GROUPS, "READ", "DESCRIBE")
    # on-call's status page shows the lag of the sanitizers' and the analyzer's groups (guard/anomaly/status.py):
    # the groups' committed offsets (OffsetFetch: DESCRIBE on the group and on each topic) against the end of
    # their topics (ListOffsets: DESCRIBE on the topic). DESCRIBE only: no record of those topics is readable.
    for group in (GUARD_GROUP, f"{GUARD_GROUP}-{cfg.mariadb_branch}", ANALYZER_APP):
        grant("oncall", "GROUP", "LITERAL", group, "DESCRIBE")
    for raw in raws:
        grant("oncall", "TOPIC", "PREFIXED", raw, "DESCRIBE")
    grant("oncall", "TOPIC", "LITERAL", ANALYZER_FACTS, "DESCRIBE")
    # analyzer: the evidence, facts and alerts, the sanitized contact and staff topics; writes alerts and facts
    for topic in ANALYZER_READS:
        grant("analyzer", "TOPIC", "LITERAL", topic, "READ", "DESCRIBE")
    for table in ANALYZER_SANITIZED_TABLES:  # branch 0101 (PostgreSQL): customers and staff
        grant("analyzer", "TOPIC", "LITERAL", f"{SANITIZED_PREFIX}{cfg.topic_prefix}.public.{table}",
              "READ", "DESCRIBE")
    # branch 0202 (MariaDB, database branch_0202): customers only, it has no staff table
    grant("analyzer", "TOPIC", "LITERAL", f"{SANITIZED_PREFIX}{cfg.mariadb_topic_prefix}.branch_0202.customers",
          "READ", "DESCRIBE")
    for topic in ANALYZER_WRITES:
        grant("analyzer", "TOPIC", "LITERAL", topic, "WRITE", "CREATE", "DESCRIBE_CONFIGS")
    # faust's internal topics (<app id>-__assignor-__leader, ...) and its consumer group are named by the app id
    grant("analyzer", "TOPIC", "PREFIXED", ANALYZER_APP, "ALL")
    grant("analyzer", "GROUP", "PREFIXED", ANALYZER_APP, "READ", "DESCRIBE")
    grant("analyzer", "CLUSTER", "LITERAL", "kafka-cluster", "IDEMPOTENT_WRITE", "DESCRIBE")
    return plan


def acl_bindings(cfg: StackConfig) -> list[Any]:
    from confluent_kafka.admin import (
        AclBinding,
        AclOperation,
        AclPermissionType,
        ResourcePatternType,
        ResourceType,
    )

    # librdkafka calls Kafka's CLUSTER resource type BROKER (same wire value, 4)
    return [AclBinding(ResourceType["BROKER" if rtype == "CLUSTER" else rtype], name, ResourcePatternType[ptype],
                       principal, "*",
                       AclOperation[op], AclPermissionType.ALLOW)
            for principal, rtype, ptype, name, op in acl_plan(cfg)]


def _password_stamp(cfg: StackConfig) -> str:
    """When each password file last changed (mtime and size, no secret): a changed file means a new password."""
    parts = []
    for user in USERS:
        st = cfg.kafka_password_file(user).stat()
        parts.append(f"{user} {st.st_mtime_ns} {st.st_size}")
    return "\n".join(parts) + "\n"


def _stamp_file(cfg: StackConfig) -> Path:
    return cfg.kafka_secrets_dir / ".scram-applied"


def ensure_security(cfg: StackConfig, timeout: float = 30.0) -> None:
    """Upsert the SCRAM users whose password is new or missing in Kafka and create every ACL of the plan
    (idempotent), as admin over the broker's mutual-TLS listener.

    Credentials are upserted only when a password file changed since the last upsert (``secrets/.scram-applied``)
    or a user has no SCRAM-SHA-512 credential: upserting on every `up` would change the salt under clients that
    are authenticating at that moment.
    """
    from confluent_kafka.admin import (
        AdminClient,
        ScramCredentialInfo,
        ScramMechanism,
        UserScramCredentialAlteration,
        UserScramCredentialUpsertion,
    )

    conf: dict[str, Any] = {**mtls_admin_config(cfg), "logger": quiet_probe_logger}
    admin = AdminClient(conf)
    passwords = ensure_passwords(cfg)
    stamp = _password_stamp(cfg)
    try:
        known = _scram_users(admin, timeout)
        try:
            applied = _stamp_file(cfg).read_text(encoding="utf-8") == stamp
        except OSError:
            applied = False
        missing = [u for u in USERS if u not in known]
        todo = list(USERS) if not applied else missing
        if todo:
            info = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, SCRAM_ITERATIONS)
            upserts: list[UserScramCredentialAlteration] = [
                UserScramCredentialUpsertion(user, info, passwords[user].encode()) for user in todo]
            for fut in admin.alter_user_scram_credentials(upserts, request_timeout=timeout).values():
                fut.result()
            write_private(_stamp_file(cfg), stamp.encode())
        bindings = acl_bindings(cfg)
        for fut in admin.create_acls(bindings, request_timeout=timeout).values():
            fut.result()
    except Exception as exc:  # KafkaException and the futures' errors
        raise StackError(f"kafka: creating the SCRAM users and ACLs as admin on {cfg.internal_bootstrap} failed "
                         f"({exc}). See {cfg.logs / 'kafka-server.log'}.") from exc
    what = f"SCRAM users {', '.join(todo)} set" if todo else f"SCRAM users {', '.join(USERS)} unchanged"
    progress(f"kafka: {what}; {len(bindings)} ACLs in place (StandardAuthorizer, "
             f"allow.everyone.if.no.acl.found=false)")


def _scram_users(admin: Any, timeout: float) -> set[str]:
    """Users that have a SCRAM-SHA-512 credential."""
    from confluent_kafka import KafkaException

    out: set[str] = set()
    for user, fut in admin.describe_user_scram_credentials(list(USERS), request_timeout=timeout).items():
        try:
            desc = fut.result()
        except KafkaException:  # RESOURCE_NOT_FOUND: no credential yet
            continue
        if any(i.mechanism.name == "SCRAM_SHA_512" for i in desc.scram_credential_infos):
            out.add(user)
    return out


# --- docker-compose (docker-compose.yml's kafka-secrets and kafka-init one-shot services) -------------------
def compose_secrets(directory: Path, hosts: list[str], owners: dict[str, int]) -> None:
    """The CA, certificates and passwords for the compose stack, in `directory` (a volume).

    Each container runs as its own user, so each file belongs to the user of the container that reads it
    (`owners`: ``kafka`` = the apache/kafka image's user, ``connect`` = Debezium's, ``guard`` = the guard
    image's) and stays 0600; the CA certificate is public (0644) and the directories can be traversed (0711).
    Existing files are kept, so a password file put in the volume before the first start is used as given.
    """
    import dataclasses

    cfg = dataclasses.replace(StackConfig.from_env(), home=directory)
    ca = LocalCA(cfg.tls_dir)
    ca.ensure_leaf("broker", hosts)
    ca.ensure_leaf("controller", hosts)
    ca.ensure_leaf("admin", server=False)
    passwords = ensure_passwords(cfg)
    # Connect's clients read their credentials from a JAAS file (KAFKA_OPTS=-Djava.security.auth.login.config);
    # Java takes one such file, so it also holds the REST API's login section when `compose-secrets` (run
    # first, guard.stack.compose) made the REST users file
    jaas = cfg.kafka_secrets_dir / "connect.jaas"
    text = ('KafkaClient {\n  org.apache.kafka.common.security.scram.ScramLoginModule required\n'
            f'  username="connect" password="{passwords["connect"]}";\n}};\n')
    rest_users = directory / "connect-rest-users.properties"
    if rest_users.exists():
        text += ("KafkaConnect {\n  org.apache.kafka.connect.rest.basic.auth.extension.PropertyFileLoginModule "
                 f'required\n  file="{rest_users}";\n}};\n')
    write_private(jaas, text.encode())
    # the broker's health check: its own certificate on its mutual-TLS listener
    health = cfg.tls_dir / "broker-client.properties"
    write_private(health, ("security.protocol=SSL\nssl.keystore.type=PEM\n"
                            f"ssl.keystore.location={ca.keystore('broker')}\n"
                            f"ssl.truststore.type=PEM\nssl.truststore.location={ca.ca_cert}\n").encode())
    belongs = {
        "kafka": [ca.keystore("broker"), ca.keystore("controller"), health],
        "connect": [jaas, cfg.kafka_password_file("connect")],
        # the reveal service and the anomaly analyzer run from the guard image
        "guard": [cfg.kafka_password_file("guard"), cfg.kafka_password_file("reveal"),
                  cfg.kafka_password_file("analyzer")],
    }
    for who, files in belongs.items():
        if who in owners:
            for f in files:
                os.chown(f, owners[who], owners[who])
    os.chmod(ca.ca_cert, 0o644)  # noqa: S103 - a CA certificate is public
    for d in (directory, cfg.tls_dir, cfg.kafka_secrets_dir):
        os.chmod(d, 0o711)  # noqa: S103 - traverse only: the files inside stay 0600, each its reader's
    progress(f"kafka-secrets: CA, certificates ({', '.join(hosts)}) and passwords of {', '.join(USERS)} in "
             f"{directory}")


def compose_init(directory: Path, host: str, port: int, internal_port: int) -> None:
    """SCRAM users and ACLs on the compose broker (as admin over its mutual-TLS listener)."""
    import dataclasses

    cfg = dataclasses.replace(StackConfig.from_env(), home=directory, host=host, kafka_port=port,
                              kafka_internal_port=internal_port)
    ensure_security(cfg)
