"""`guard doctor`: checks a deployment the way an operator would, one line per check, with what to do.

Each check returns a `Check`; the command prints them and exits non-zero when any failed. Checks talk to
the real components with the guard's own settings, so a pass means the guard itself would get through.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from guard.config import Settings
from guard.kafka.hanging import COORDINATOR_MARGIN_S, Partition, StuckTracker, group_offsets_partition, read_ends


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
    named = {settings.audit_topic, settings.anomalies_topic, settings.deletions_topic, settings.dlq_topic}
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
    limit = settle_s if settle_s is not None else settings.transaction_timeout_ms / 1000 + COORDINATOR_MARGIN_S
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


def run_checks(settings: Settings, *, settle_s: float | None = None) -> Iterator[Check]:
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    try:
        brokers = admin.list_topics(timeout=10).brokers
    except KafkaException as exc:
        yield Check("kafka", False, f"{settings.kafka_bootstrap} does not answer ({exc.args[0]})",
                    "start the cluster (`guard stack up` locally) or set GUARD_KAFKA_BOOTSTRAP")
        return
    yield Check("kafka", True, f"{settings.kafka_bootstrap} answers ({len(brokers)} broker(s))")
    yield from check_evidence_topics(admin, settings)
    yield from check_c3_absent(admin, settings)
    if settings.branch2 and settings.branch2_raw_topic_prefix:
        yield from check_c3_absent(admin, settings.for_branch(settings.branch2, settings.branch2_raw_topic_prefix))
    if settings.branch2_dsn:
        yield from check_mariadb(settings)
    yield from check_hanging_transactions(admin, settings, settle_s=settle_s)


# ---- the MariaDB branch (issue 19) -------------------------------------------------------------------------
#: What the CDC account may hold and what it must: Debezium's MariaDB connector's needs (guard/stack/provision.py).
MARIADB_CDC_GLOBAL = frozenset({"RELOAD", "REPLICATION SLAVE", "BINLOG MONITOR"})
#: The binlog Debezium needs: ROW events with whole row images.
MARIADB_BINLOG = {"log_bin": "1", "binlog_format": "ROW", "binlog_row_image": "FULL"}


def check_mariadb(settings: Settings) -> list[Check]:
    """The second branch's MariaDB: reachable and authenticated (the DSN's account), anonymous and password-less
    logins refused, the binlog as Debezium needs it, and the CDC account (when its password file is set) with
    exactly its least privileges."""
    from urllib.parse import unquote, urlsplit

    import pymysql

    url = urlsplit(settings.branch2_dsn)
    host, port = url.hostname or "127.0.0.1", url.port or 3306
    where = f"{host}:{port}"
    common = {"host": host, "port": port, "connect_timeout": 5}
    try:
        conn = pymysql.connect(user=unquote(url.username or ""), password=unquote(url.password or ""),
                               database=url.path.lstrip("/") or None, **common)
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
    for user in ("", "root", unquote(url.username or "")):
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
        out.append(Check("mariadb logins", True, "anonymous, root and password-less logins refused over TCP"))
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

    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"guard-doctor-{uuid.uuid4()}",
                         "enable.auto.commit": False, "auto.offset.reset": "earliest"})
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
    import re

    import orjson

    from guard.classify.catalog import Action, Catalog
    from guard.errors import ConfigError

    try:
        catalog = Catalog.load(settings.catalog or None)
    except ConfigError as exc:
        return [Check("C3 in raw topics", False, str(exc), "fix the catalog (GUARD_CATALOG)")]
    pattern = re.compile(settings.raw_topic_pattern)
    topics = admin.list_topics(timeout=10).topics
    raw = sorted(t for t, meta in topics.items() if pattern.match(t) and meta.error is None)
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
