"""`guard doctor`: checks a deployment the way an operator would, one line per check, with what to do.

Each check returns a `Check`; the command prints them and exits non-zero when any failed. Checks talk to
the real components with the guard's own settings, so a pass means the guard itself would get through.
"""

from __future__ import annotations

import logging
import stat
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
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
from guard.errors import ConfigError
from guard.kafka.hanging import Partition, StuckTracker, read_ends
from guard.kafka.partitioning import group_offsets_partition
from guard.kafka_security import api_versions_answered, ca_file, client_config, describe

_quiet = logging.getLogger("guard.doctor.probe")
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False


@dataclass(frozen=True)
class Check:
    """One finding: what was checked, whether it passed, what was seen, and what to do if not."""

    name: str
    ok: bool
    detail: str
    action: str = ""

    def line(self) -> str:
        text = f"{'ok  ' if self.ok else 'FAIL'}  {self.name}: {self.detail}"
        return text if self.ok or not self.action else f"{text}\n      do: {self.action}"


def output_partitions(admin: AdminClient, settings: Settings) -> list[Partition]:
    """The guard's output partitions that exist (guard.* and sanitized topics) and its group's offsets."""
    topics = admin.list_topics(timeout=10).topics
    named = {settings.audit_topic, settings.anomalies_topic, settings.deletions_topic, settings.dlq_topic,
             settings.facts_topic}
    out = [(name, p) for name, meta in topics.items() if meta.error is None
           and (name in named or name.startswith(settings.sanitized_prefix)) for p in meta.partitions]
    offsets = topics.get("__consumer_offsets")
    if offsets is not None and offsets.partitions:
        out.append(("__consumer_offsets", group_offsets_partition(settings.group_id, len(offsets.partitions))))
    return sorted(out)


def check_hanging_transactions(admin: AdminClient, settings: Settings, *, settle_s: float | None = None,
                               poll_s: float = 5.0, clock: Callable[[], float] = time.monotonic,
                               sleep: Callable[[float], None] = time.sleep) -> list[Check]:
    """Every output partition's LSO must reach its high watermark or move within the settle time.

    An open transaction of a live writer ends within its transaction timeout, so a partition whose last
    stable offset does not move for that long (plus the coordinator's clean-up margin) is hanging. Most
    runs return at once: nothing is unstable, or the unstable partitions move on the next poll.
    """
    limit = settle_s if settle_s is not None else settings.stuck_after_s
    partitions = output_partitions(admin, settings)
    tracker = StuckTracker(limit)
    start = clock()
    tracker.observe(start, read_ends(admin, partitions))
    while tracker.pending() and clock() - start <= limit:
        sleep(poll_s)
        hanging = tracker.observe(clock(), read_ends(admin, list(tracker.pending())))
        if hanging:
            return [Check("hanging transaction", False, h.describe(),
                          f"abort it: {h.abort_command} (local stack: `python -m guard.stack transactions "
                          f"--abort`); see docs/reliability.md") for h in hanging]
    return [Check("hanging transactions", True, f"none on {len(partitions)} output partitions (last stable "
                                                 "offsets reach the high watermarks or move)")]


def raw_topics(topics: Mapping[str, Any], settings: Settings) -> list[str]:
    """The raw topics the guard's workers subscribe to, sorted, of a cluster's topic metadata."""
    import re

    pattern = re.compile(settings.raw_topic_pattern)
    return sorted(t for t, meta in topics.items() if pattern.match(t) and meta.error is None)


def check_group_offsets(admin: AdminClient, settings: Settings, *, settle_s: float | None = None) -> list[Check]:
    """The group's committed offsets of the raw partitions must be readable the way its workers read them.

    A worker's consumer is `read_committed`, so it fetches them with `require_stable`, which the group
    coordinator answers with `UNSTABLE_OFFSET_COMMIT` while it holds offsets of the group pending in a
    transaction; librdkafka asks again until the call's timeout. A live worker's transaction holds them for
    milliseconds; for longer than the transaction timeout (plus the margin) they are stuck, and the group's
    workers hold their partitions and read nothing (`guard.kafka.fetching`, docs/reliability.md).
    """

    from confluent_kafka import Consumer, TopicPartition

    from guard.kafka.clients import consumer_config

    limit = settle_s if settle_s is not None else settings.stuck_after_s
    topics = admin.list_topics(timeout=10).topics
    partitions = [TopicPartition(t, p) for t in raw_topics(topics, settings) for p in sorted(topics[t].partitions)]
    name = f"committed offsets of group {settings.group_id}"
    if not partitions:
        return [Check(name, True, f"no raw topic matches {settings.raw_topic_pattern} yet")]
    offsets = topics.get("__consumer_offsets")
    where = (f"__consumer_offsets[{group_offsets_partition(settings.group_id, len(offsets.partitions))}]"
             if offsets is not None and offsets.partitions else "the group's __consumer_offsets partition")
    consumer = Consumer({**consumer_config(settings, "guard-doctor"), "logger": _quiet})  # never joins the group
    try:
        start = time.monotonic()
        consumer.committed(partitions, timeout=limit)
    except KafkaException as exc:
        error = exc.args[0]
        if isinstance(error, KafkaError) and error.code() == KafkaError._TIMED_OUT:
            return [Check(name, False, f"not readable by read_committed consumers within {limit:.0f} s "
                                       f"({len(partitions)} raw partitions): held as pending in a transaction (or "
                                       f"the group coordinator does not answer), so the group's workers hold their "
                                       f"partitions and read nothing",
                          f"if a hanging transaction on {where} is named above, abort it; otherwise restart the "
                          f"broker that leads {where} (or move its leadership): see docs/reliability.md")]
        return [Check(name, False, f"reading them failed: {error}",
                      "check that the guard's principal may describe and read its group and raw topics (the local "
                      "stack grants it: guard/stack/kafka_auth.py), and that the cluster answers")]
    finally:
        consumer.close()
    return [Check(name, True, f"readable ({len(partitions)} raw partitions, {time.monotonic() - start:.1f} s)")]


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


# ---- the MariaDB branch (issue 19) -------------------------------------------------------------------------
#: What the CDC account may hold and what it must: Debezium's MariaDB connector's needs (guard/stack/provision.py).
MARIADB_CDC_GLOBAL = frozenset({"RELOAD", "REPLICATION SLAVE", "BINLOG MONITOR"})
#: The binlog Debezium needs: ROW events with whole row images.
MARIADB_BINLOG = {"log_bin": "1", "binlog_format": "ROW", "binlog_row_image": "FULL"}


def check_mariadb(settings: Settings) -> list[Check]:
    """The second branch's MariaDB: reachable and authenticated (the DSN's account), anonymous and password-less
    logins refused, the binlog as Debezium needs it, and the CDC account (when its password file is set) with
    exactly its least privileges."""
    import pymysql

    from guard.config import mariadb_connect_args

    try:
        args = mariadb_connect_args(settings.branch2_dsn)
    except OSError as exc:
        return [Check("mariadb", False, f"cannot read the password file of GUARD_BRANCH2_DSN ({exc.strerror})",
                      "fix password_file in GUARD_BRANCH2_DSN (local stack: `guard stack env`)")]
    host, port = args["host"], args["port"]
    where = f"{host}:{port}"
    tls = {k: v for k, v in args.items() if k.startswith("ssl_")}
    common = {"host": host, "port": port, "connect_timeout": 5, **tls}
    try:
        conn = pymysql.connect(**args, connect_timeout=5)
    except pymysql.err.OperationalError as exc:
        code = exc.args[0] if exc.args else 0
        if code in (1045, 1698):
            return [Check("mariadb", False, f"{where} refused the account of GUARD_BRANCH2_DSN (error {code})",
                          "check the user and password in GUARD_BRANCH2_DSN (local stack: `guard stack env`)")]
        return [Check("mariadb", False, f"{where} does not answer (error {code})",
                      "start it (`guard stack up` locally) or fix GUARD_BRANCH2_DSN")]
    out = [Check("mariadb", True, f"{where} answers and authenticated the account of GUARD_BRANCH2_DSN")]
    with conn, conn.cursor() as cur:
        cur.execute("SELECT @@log_bin, @@binlog_format, @@binlog_row_image, @@server_id, @@bind_address")
        row = cur.fetchone()
    assert row is not None
    seen = dict(zip(("log_bin", "binlog_format", "binlog_row_image"), (str(v) for v in row[:3]), strict=True))
    wrong = {k: v for k, v in seen.items() if v != MARIADB_BINLOG[k]}
    if wrong or not row[3]:
        out.append(Check("mariadb binlog", False, ", ".join(f"{k}={v} (need {MARIADB_BINLOG[k]})"
                                                            for k, v in wrong.items()) or "server_id is 0",
                         "set log-bin, binlog_format=ROW, binlog_row_image=FULL and a server_id (see "
                         "guard/stack/assets/mariadb.cnf) and restart MariaDB"))
    else:
        out.append(Check("mariadb binlog", True, f"ROW, full row images, server_id {row[3]}, listening on {row[4]}"))
    refused = []
    for user in ("", "root", args["user"]):
        try:
            pymysql.connect(user=user, password="", **common).close()
        except pymysql.err.OperationalError as exc:
            if exc.args and exc.args[0] in (1045, 1698):
                refused.append(user or "anonymous")
                continue
            raise
        out.append(Check("mariadb logins", False, f"{where} let {user or 'an anonymous user'} in without a password",
                         f"DROP USER (or set a password for) {user or 'the anonymous account'!r}"))
    if len(refused) == 3:
        out.append(Check("mariadb logins", True, "anonymous, root and password-less logins refused over TCP"
                                                  + (" (with TLS)" if tls else "")))
    if tls:
        try:
            pymysql.connect(host=host, port=port, user=args["user"], password=args["password"],
                            connect_timeout=5, ssl_disabled=True).close()
            out.append(Check("mariadb tls", False, f"{where} let {args['user']} in without TLS",
                             "set require_secure_transport = ON (guard/stack/assets/mariadb.cnf) and REQUIRE SSL "
                             "on the accounts"))
        except pymysql.err.OperationalError:
            out.append(Check("mariadb tls", True, "TCP logins without TLS refused; the server's certificate "
                                                  "verifies against the CA of GUARD_BRANCH2_DSN"))
    if settings.branch2_cdc_password_file:
        out.append(_check_mariadb_cdc(settings, common))
    return out


def _check_mariadb_cdc(settings: Settings, common: dict[str, object]) -> Check:
    import re
    import stat
    from pathlib import Path

    import pymysql

    path = Path(settings.branch2_cdc_password_file)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        password = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        return Check("mariadb cdc account", False, f"cannot read {path} ({exc.strerror})",
                     "set GUARD_BRANCH2_CDC_PASSWORD_FILE to the CDC account's password file")
    if mode & 0o077:
        return Check("mariadb cdc account", False, f"{path} has mode {mode:04o}", f"chmod 600 {path}")
    try:
        conn = pymysql.connect(user="cdc", password=password, **common)
    except pymysql.err.OperationalError as exc:
        return Check("mariadb cdc account", False, f"login refused (error {exc.args[0] if exc.args else '?'})",
                     "re-provision the account (`guard stack up` locally)")
    with conn, conn.cursor() as cur:
        cur.execute("SHOW GRANTS FOR CURRENT_USER()")
        grants = [str(r[0]) for r in cur.fetchall()]
    global_privs: set[str] = set()
    databases: dict[str, str] = {}
    for grant in grants:
        m = re.match(r"GRANT (.+?) ON (\S+) TO", grant)
        if not m:
            continue
        if m.group(2) == "*.*":
            global_privs |= {p.strip() for p in m.group(1).split(",")}
        else:
            databases[m.group(2)] = m.group(1)
    extra = global_privs - MARIADB_CDC_GLOBAL - {"USAGE"}
    missing = MARIADB_CDC_GLOBAL - global_privs
    wide = {db: privs for db, privs in databases.items() if privs != "SELECT"}
    if extra or missing or wide or not databases:
        detail = "; ".join(filter(None, [f"extra global privileges {sorted(extra)}" if extra else "",
                                         f"missing {sorted(missing)}" if missing else "",
                                         f"more than SELECT on {sorted(wide)}" if wide else "",
                                         "no SELECT on a database" if not databases else ""]))
        return Check("mariadb cdc account", False, detail,
                     "grant exactly RELOAD, REPLICATION SLAVE, BINLOG MONITOR ON *.* and SELECT on the branch "
                     "database (guard/stack/provision.py)")
    return Check("mariadb cdc account", True, f"password file 0600, least privilege: {', '.join(sorted(global_privs))}"
                                              f" on *.*, SELECT on {', '.join(sorted(databases))}")


# ---- evidence retention and C3 in the raw topics (issue 20 items 5 and 7, issue 13 item 8) --------------

#: Records read from the end of each raw partition by the C3 check.
C3_SAMPLE = 200


def check_audit_signing_key(settings: Settings) -> Check:
    """The audit chain's Ed25519 key exists, is a regular file and only its owner can read it (0600).

    Without it the guard can't sign checkpoints or deletion confirmations (it refuses to run, docs/audit.md);
    a key others can read lets them forge checkpoints, so a wider mode fails too.
    """
    from guard.audit.writer import signing_key_path

    name = "audit signing key"
    path = signing_key_path(settings)
    try:
        st = path.lstat()
    except FileNotFoundError:
        return Check(name, False, f"{path} does not exist",
                     "run `guard stack up` (local stack) or `guard audit keygen`, or set GUARD_AUDIT_SIGNING_KEY")
    except OSError as exc:
        return Check(name, False, f"{path} can't be read ({type(exc).__name__})", "check the file's owner and mode")
    if not stat.S_ISREG(st.st_mode):
        return Check(name, False, f"{path} is not a regular file", "point GUARD_AUDIT_SIGNING_KEY at the key file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        return Check(name, False, f"{path} has mode {mode:04o}: others may read the key", f"chmod 600 {path}")
    return Check(name, True, f"{path} (mode {mode:04o})")


def check_evidence_topics(admin: AdminClient, settings: Settings) -> list[Check]:
    """`guard.audit` and `guard.deletions` keep at least the configured retention, on enough replicas."""
    from guard.errors import ConfigError
    from guard.kafka.evidence import describe_ms, evidence_policies, replication_factors, shortfalls, topic_configs

    try:
        policies = evidence_policies(settings)
    except ConfigError as exc:
        return [Check("evidence settings", False, str(exc), "fix the setting named above")]
    existing = set(admin.list_topics(timeout=10).topics)
    present = [p.topic for p in policies if p.topic in existing]
    configs = topic_configs(admin, present) if present else {}
    replicas = replication_factors(admin, present) if present else {}
    out = []
    for p in policies:
        name = f"retention of {p.topic}"
        if p.topic not in existing:
            out.append(Check(name, False, "the topic does not exist",
                             "start a guard worker once (`guard run`): it creates the topic with the configured "
                             "retention"))
            continue
        low = shortfalls(p, configs[p.topic])
        if p.replication_factor > 0 and replicas.get(p.topic, 0) < p.replication_factor:
            low["replicas"] = (str(replicas.get(p.topic, 0)), str(p.replication_factor))
        have = describe_ms(int(configs[p.topic].get("retention.ms", "604800000")))
        if low:
            what = ", ".join(f"{k} {cur} < {want}" if k != "cleanup.policy" else f"{k} {cur} (must be {want})"
                             for k, (cur, want) in low.items())
            out.append(Check(name, False, f"{what} (configured: {describe_ms(p.retention_ms)})",
                             "restart a guard worker (it raises retention and min.insync.replicas at start), or "
                             f"`kafka-configs.sh --alter --entity-type topics --entity-name {p.topic} --add-config "
                             f"retention.ms={p.retention_ms},retention.bytes=-1,cleanup.policy=delete`; fewer "
                             "replicas need kafka-reassign-partitions.sh"))
        else:
            out.append(Check(name, True, f"{have} (configured at least {describe_ms(p.retention_ms)}), "
                                         f"{replicas.get(p.topic, 0)} replica(s)"))
    return out


def _raw_table(settings: Settings, topic: str) -> str:
    """`br0101.public.customer_auth` -> `public.customer_auth`."""
    return topic[len(settings.raw_topic_prefix) + 1:]


def c3_violations(image: object, drop: set[str], hashed: set[str]) -> list[str]:
    """The C3 columns of one `before`/`after` image that reached Kafka in clear (pure; unit-tested)."""
    from guard.classify.source import is_source_hash

    if not isinstance(image, dict):
        return []
    found = sorted(c for c in drop if c in image)
    found += sorted(c for c in hashed if image.get(c) is not None and not is_source_hash(image[c]))
    return found


def latest_records(settings: Settings, topic: str, partitions: list[int], sample: int,
                   timeout: float = 20.0) -> list[tuple[int, int, bytes | None]]:
    """(partition, offset, value) of the last `sample` records of each partition."""
    import uuid

    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(client_config(settings, **{"group.id": f"guard-doctor-{uuid.uuid4()}",
                                                   "enable.auto.commit": False, "auto.offset.reset": "earliest"}))
    try:
        ends: dict[int, int] = {}
        starts = []
        for p in partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > low:
                ends[p] = high
                starts.append(TopicPartition(topic, p, max(low, high - sample)))
        out: list[tuple[int, int, bytes | None]] = []
        if not starts:
            return out
        consumer.assign(starts)
        done: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(done) < len(ends) and time.monotonic() < deadline:
            for msg in consumer.consume(500, 0.5):
                if msg.error():
                    continue
                part, off = msg.partition(), msg.offset()
                if part is None or off is None:
                    continue
                if off < ends[part]:
                    out.append((part, off, msg.value()))
                if off + 1 >= ends[part]:
                    done.add(part)
        return out
    finally:
        consumer.close()


def check_c3_absent(admin: AdminClient, settings: Settings, *, sample: int = C3_SAMPLE) -> list[Check]:
    """No C3 column of the catalog is in the latest records of a raw topic: `drop` columns are not keys of
    `before`/`after`, `hash` columns hold only Debezium's 64-hex digest."""

    import orjson

    from guard.classify.catalog import Action, Catalog
    from guard.errors import ConfigError

    try:
        catalog = Catalog.load(settings.catalog or None)
    except ConfigError as exc:
        return [Check("C3 in raw topics", False, str(exc), "fix the catalog (GUARD_CATALOG)")]
    topics = admin.list_topics(timeout=10).topics
    raw = raw_topics(topics, settings)
    out: list[Check] = []
    scanned = checked = 0
    for topic in raw:
        policy = catalog.table(_raw_table(settings, topic))
        if policy is None:
            continue
        drop = {c for c, col in policy.columns.items() if col.data_class == "C3" and col.action is Action.DROP}
        hashed = {c for c, col in policy.columns.items() if col.data_class == "C3" and col.action is Action.HASH}
        if not drop and not hashed:
            continue
        bad: dict[str, tuple[int, int]] = {}
        checked += 1
        records = latest_records(settings, topic, sorted(topics[topic].partitions), sample)
        scanned += len(records)
        for partition, offset, value in records:
            try:
                doc = orjson.loads(value) if value else None
            except orjson.JSONDecodeError:
                continue
            if isinstance(doc, dict) and isinstance(doc.get("payload"), dict):
                doc = doc["payload"]
            if not isinstance(doc, dict):
                continue
            for image in ("before", "after"):
                for column in c3_violations(doc.get(image), drop, hashed):
                    bad.setdefault(column, (partition, offset))
        for column, (partition, offset) in sorted(bad.items()):
            how = "excluded" if column in drop else "hashed"
            out.append(Check(f"C3 in {topic}", False,
                             f"column {column} is in clear in the raw records (first seen: partition {partition}, "
                             f"offset {offset}); the catalog says it is {how} at the source",
                             "render and register the connector from the catalog: `guard connector apply` (local "
                             "stack: `guard stack up`); records already written stay until the raw topics' "
                             "retention (3 days) removes them, or delete the raw topic"))
    if not out:
        out.append(Check(f"C3 in raw topics {settings.raw_topic_prefix}.*", True,
                         f"no C3 column of the catalog in the latest {sample} records of each partition ({scanned} "
                         f"records of {checked} raw topics with C3 columns; {len(raw)} raw topics)"))
    return out


# --- Kafka security (issue 20, kafka part) ---------------------------------------------------------------
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
    yield check_raw_readers(admin, settings)
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
    full: dict[str, Any] = {**conf, "logger": _quiet, "socket.timeout.ms": int(ANONYMOUS_TIMEOUT_S * 1000)}
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


def check_raw_readers(admin: AdminClient, settings: Settings) -> Check:
    name = "kafka: raw topics readable by the guard only"
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


# --- access (issue 20): Redis, PostgreSQL and the Connect REST API admit only who belongs --------------------
def _strip_userinfo(url: str, scheme: str | None = None) -> str:
    from urllib.parse import urlsplit, urlunsplit

    p = urlsplit(url)
    netloc = (p.hostname or "") + (f":{p.port}" if p.port else "")
    return urlunsplit((scheme or p.scheme, netloc, p.path, p.query if (scheme or p.scheme) == "rediss" else "",
                       p.fragment))


def check_redis_access(settings: Settings) -> Iterator[Check]:
    """TLS and the guard's own ACL user; anonymous and plaintext clients refused; no FLUSHALL, no other keys."""
    import redis

    from guard.keys.store import redis_client, tenant_prefix

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
# --- end access (issue 20) ---------------------------------------------------------------------------------
