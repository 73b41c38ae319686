"""Register the branch database's Debezium connector through the Connect REST API, idempotently.

The connector config is rendered: the template ``connectors/branch-postgres.json`` (documented option by
option in ``connectors/README.md``) plus the options that keep the catalog's C3 columns out of the raw
topics (``guard.classify.source``). It has ``${NAME}`` placeholders, resolved here (in option names too:
the hash salt is part of one), so the same template serves the local stack (127.0.0.1:15432) and
docker-compose (postgres:5432). ``guard connector render`` prints the rendered document, secrets still
placeholders.
"""

from __future__ import annotations

import json
import os
import secrets
import string
import time
from pathlib import Path
from typing import Any

import httpx

from guard.classify.catalog import Catalog
from guard.classify.source import (
    ATTRIBUTION_DATABASE,
    ATTRIBUTION_MESSAGE_PREFIX,
    ATTRIBUTION_TABLE,
    MESSAGE_PREFIX_OPTION,
    source_options,
    source_rules,
)
from guard.secretfile import create_private, read_private_text
from guard.stack.config import StackConfig
from guard.stack.errors import StackError
from guard.stack.kafka_auth import client_config as kafka_client_config
from guard.stack.procs import progress, quiet_probe_logger

CONFIG_FILE = "branch-postgres.json"
MARIADB_CONFIG_FILE = "branch-mariadb.json"
#: The engines of the stack's branch databases: the PostgreSQL branch (0101) and the MariaDB branch (0202).
ENGINES = ("postgres", "mariadb")


def config_file(engine: str) -> str:
    """The connector template of an engine's branch."""
    if engine not in ENGINES:
        raise StackError(f"unknown branch engine {engine!r}; choose one of {', '.join(ENGINES)}")
    return CONFIG_FILE if engine == "postgres" else MARIADB_CONFIG_FILE


def namespace(cfg: StackConfig, engine: str) -> str:
    """Where the branch's tables live: the PostgreSQL schema or the MariaDB database (the catalog's
    ``<namespace>.<table>`` and the raw topics' ``<prefix>.<namespace>.<table>``)."""
    return "public" if engine == "postgres" else cfg.mariadb_db


def topic_prefix(cfg: StackConfig, engine: str) -> str:
    return cfg.topic_prefix if engine == "postgres" else cfg.mariadb_topic_prefix


def connector_name(cfg: StackConfig, engine: str) -> str:
    return cfg.connector_name if engine == "postgres" else cfg.mariadb_connector_name


def connectors_dir() -> Path:
    """``$GUARD_CONNECTORS_DIR`` or the repository's ``connectors/`` (editable installs, the image)."""
    override = os.environ.get("GUARD_CONNECTORS_DIR")
    path = Path(override) if override else Path(__file__).resolve().parents[2] / "connectors"
    if not (path / CONFIG_FILE).exists():
        raise StackError(f"{path / CONFIG_FILE} not found; "
                         f"set GUARD_CONNECTORS_DIR to the repository's connectors/ directory")
    return path


def placeholder_values(cfg: StackConfig, db_host: str | None = None, db_port: int | None = None,
                       bootstrap: str | None = None, engine: str = "postgres", *,
                       cdc_password_file: str | None = None, ca_file: str | None = None) -> dict[str, str]:
    """Values for the ``${...}`` placeholders in the connector file of an engine's branch."""
    if engine == "mariadb":
        return {
            "DB_HOST": db_host or cfg.host,
            "DB_PORT": str(db_port or cfg.mariadb_port),
            "DB_NAME": cfg.mariadb_db,
            "CDC_USER": cfg.mariadb_cdc_user,
            # access (issue 20): the password stays in a 0600 file that Connect's FileConfigProvider reads
            "CDC_PASSWORD": "${file:" + str(cdc_password_file or cfg.mariadb_connect_cdc_file) + ":password}",
            # TLS to MariaDB, verified (certificate chain and host name) against the stack CA as PKCS#12
            "DB_SSL_MODE": "verify-full",
            "DB_TRUSTSTORE": str(cfg.mariadb_truststore),
            "DB_TRUSTSTORE_PASSWORD": "${file:" + str(cfg.mariadb_truststore_properties) + ":password}",
            # the id the connector reads the binlog as: another server's than the branch server's own
            "CONNECTOR_SERVER_ID": str(cfg.mariadb_server_id * 100 + 1),
            "TOPIC_PREFIX": cfg.mariadb_topic_prefix,
            "CONNECTOR_NAME": cfg.mariadb_connector_name,
            "KAFKA_BOOTSTRAP": bootstrap or cfg.bootstrap,
            # the schema history's Kafka clients log in as Connect does; the JAAS line (with Connect's password)
            # is read from the worker's own 0600 properties file by the FileConfigProvider
            "KAFKA_JAAS": "${file:" + str(cfg.home / "connect" / "connect-distributed.properties")
                          + ":sasl.jaas.config}",
            "KAFKA_CA_FILE": str(ca_file or cfg.ca_file),
            "CONNECTOR_HASH_SALT": connector_hash_salt(cfg),
        }
    return {
        "DB_HOST": db_host or cfg.host,
        "DB_PORT": str(db_port or cfg.pg_port),
        "DB_NAME": cfg.branch_db,
        "CDC_USER": cfg.cdc_user,
        # access (issue 20): the password stays in a 0600 file that Connect's FileConfigProvider reads
        # when it starts the task; the connector config (REST, the configs topic) holds only the reference
        "CDC_PASSWORD": "${file:" + str(cdc_password_file or cfg.secrets_dir / "connect-cdc.properties")
                        + ":password}",
        "DB_SSLMODE": "verify-full",
        "DB_SSLROOTCERT": str(ca_file or cfg.ca_file),
        "TOPIC_PREFIX": cfg.topic_prefix,
        "SLOT_NAME": cfg.slot_name,
        "PUBLICATION_NAME": cfg.publication_name,
        "CONNECTOR_NAME": cfg.connector_name,
        "KAFKA_BOOTSTRAP": bootstrap or cfg.bootstrap,
        "CONNECTOR_HASH_SALT": connector_hash_salt(cfg),
    }


def load_connector(values: dict[str, str], path: Path | None = None) -> tuple[str, dict[str, str]]:
    """Read the connector file and resolve placeholders; returns (name, config)."""
    path = path or connectors_dir() / CONFIG_FILE
    doc = json.loads(path.read_text(encoding="utf-8"))
    try:
        name = string.Template(doc["name"]).substitute(values)
        config = {k: string.Template(str(v)).substitute(values) for k, v in doc["config"].items()}
    except KeyError as exc:
        raise StackError(f"{path}: unknown placeholder ${{{exc.args[0]}}}") from exc
    config["name"] = name
    return name, config


# --- access (issue 20): every REST call authenticates ------------------------------------------------------
def rest_auth(cfg: StackConfig | None = None) -> tuple[str, str] | None:
    """(user, password) for Connect's REST API: GUARD_CONNECT_CREDENTIALS_FILE, else the stack's own file."""
    from guard.config import connect_credentials

    found = connect_credentials()
    if found is None and cfg is not None and (cfg.secrets_dir / "connect-rest.credentials").exists():
        found = connect_credentials(str(cfg.secrets_dir / "connect-rest.credentials"))
    return found


def restart_connector(cfg: StackConfig, connect_url: str | None = None) -> None:
    """Restart the connector and its tasks (they re-read ${file:...} secrets, e.g. after a rotation)."""
    with httpx.Client(base_url=connect_url or cfg.connect_url, timeout=30.0, auth=rest_auth(cfg)) as http:
        r = http.post(f"/connectors/{cfg.connector_name}/restart", params={"includeTasks": "true"})
        if r.status_code >= 400:
            raise StackError(f"restarting connector {cfg.connector_name}: HTTP {r.status_code} {r.text[:500]}")
# --- end access (issue 20) -----------------------------------------------------------------------------


def connector_state(http: httpx.Client, name: str) -> tuple[str, list[str], str]:
    """(connector state, task states, first error trace line) or ("MISSING", [], "")."""
    r = http.get(f"/connectors/{name}/status")
    if r.status_code == 404:
        return "MISSING", [], ""
    r.raise_for_status()
    st = r.json()
    tasks = st.get("tasks", [])
    trace = next((t.get("trace", "") for t in tasks if t.get("state") == "FAILED"), "")
    trace = trace or st["connector"].get("trace", "")
    return st["connector"]["state"], [t["state"] for t in tasks], trace.splitlines()[0] if trace else ""


def ensure_connector(cfg: StackConfig | None = None, *, connect_url: str | None = None,
                     db_host: str | None = None, db_port: int | None = None,
                     timeout: float = 180.0, catalog: Catalog | None = None, check_db: bool = True,
                     db_dsn: str | None = None, engine: str = "postgres", bootstrap: str | None = None,
                     cdc_password_file: str | None = None, ca_file: str | None = None,
                     auth: tuple[str, str] | None = None) -> str:
    """Create or update the connector (only if its config differs) and wait until it and its task run.

    Every REST call authenticates (`auth`, default `rest_auth`: HTTP basic, issue 20).
    The config is rendered from the template and the catalog (``render_connector``); a catalog change
    therefore updates the running connector (``PUT /connectors/<name>/config``). Before that, the
    database's C3 columns to be hashed are checked (``check_hash_columns``, through ``db_dsn``, default the
    branch DSN) unless ``check_db`` is false.
    Returns what was done: "created", "updated" or "unchanged".

    A FAILED connector/task is restarted once, since the usual cause on a laptop is the database
    having been down while Connect started. `engine` picks the branch: ``postgres`` (0101, the default) or
    ``mariadb`` (0202, ``connectors/branch-mariadb.json``).
    """
    cfg = cfg or StackConfig.from_env()
    url = connect_url or cfg.connect_url
    catalog = catalog or Catalog.load()
    ns = namespace(cfg, engine)
    if check_db:
        default_dsn = cfg.branch_dsn if engine == "postgres" else cfg.mariadb_dsn
        check_hash_columns(db_dsn or default_dsn, catalog, ns)
    template = connectors_dir() / config_file(engine)
    name, config = resolve_connector(render_connector(catalog, template, ns), placeholder_values(
        cfg, db_host, db_port, bootstrap, engine, cdc_password_file=cdc_password_file, ca_file=ca_file))
    with httpx.Client(base_url=url, timeout=30.0, auth=auth or rest_auth(cfg)) as http:
        current = http.get(f"/connectors/{name}/config")
        if current.status_code == 200 and current.json() == config:
            outcome = "unchanged"
            progress(f"connector {name}: config unchanged")
        else:
            r = http.put(f"/connectors/{name}/config", json=config)
            if r.status_code >= 400:
                raise StackError(f"Connect rejected connector {name}: HTTP {r.status_code} "
                                 f"{redact(r.text[:2000], config)}")
            outcome = "created" if r.status_code == 201 else "updated"
            progress(f"connector {name}: {outcome} ({describe_source_rules(catalog, ns)})")
        restarted = False
        deadline = time.monotonic() + timeout
        # Connect applies a PUT asynchronously (through its config topic): until the connector reads its new
        # config back, its state is the old config's, and a second call saw the old config and put it again.
        applied = outcome == "unchanged"
        while True:
            if not applied:
                running = http.get(f"/connectors/{name}/config")
                applied = running.status_code == 200 and running.json() == config
            state, tasks, trace = connector_state(http, name)
            trace = redact(trace, config)
            if applied and state == "RUNNING" and tasks and all(t == "RUNNING" for t in tasks):
                progress(f"connector {name}: RUNNING (tasks {tasks})")
                return outcome
            if "FAILED" in (state, *tasks) and not restarted:
                progress(f"connector {name}: FAILED ({trace}); restarting it once")
                http.post(f"/connectors/{name}/restart",
                          params={"includeTasks": "true", "onlyFailed": "true"})
                restarted = True
            elif "FAILED" in (state, *tasks) and restarted and time.monotonic() > deadline - timeout / 2:
                raise StackError(f"connector {name} FAILED: {trace}. See {cfg.logs / 'connect.log'}; "
                                 f"after fixing the cause run `guard stack up` again.")
            if time.monotonic() > deadline:
                what = "its new config not applied" if not applied else f"state {state}, tasks {tasks}"
                raise StackError(f"connector {name} not RUNNING after {timeout:.0f}s ({what}). "
                                 f"See {cfg.logs / 'connect.log'}.")
            time.sleep(1.0)


def topic_message_count(client: dict[str, Any], topic: str) -> int:
    """Sum of high watermarks over the topic's partitions (0 if the topic does not exist yet).

    `client`: bootstrap and security settings (the stack's admin: `guard.stack.kafka_auth.client_config`).
    """
    from confluent_kafka import Consumer, TopicPartition
    from confluent_kafka.admin import AdminClient

    common: dict[str, Any] = {**client, "logger": quiet_probe_logger}
    # List *all* topics: a metadata request naming the topic would auto-create it (producer-type
    # librdkafka handles allow auto-creation) with 1 partition, before Debezium creates it with 3.
    md = AdminClient(common).list_topics(timeout=5)
    t = md.topics.get(topic)
    if t is None or t.error is not None or not t.partitions:
        return 0
    c = Consumer({**common, "group.id": "branchguard-stack-probe", "enable.auto.commit": False})
    try:
        return sum(c.get_watermark_offsets(TopicPartition(topic, p), timeout=5)[1] for p in t.partitions)
    finally:
        c.close()


def wait_snapshot(cfg: StackConfig, table: str = "customers", timeout: float = 180.0,
                  engine: str = "postgres") -> int:
    """Wait until Debezium's initial snapshot has produced to ``<prefix>.<namespace>.<table>``."""
    topic = f"{topic_prefix(cfg, engine)}.{namespace(cfg, engine)}.{table}"
    deadline = time.monotonic() + timeout
    while True:
        n = topic_message_count(kafka_client_config(cfg, "admin"), topic)
        if n > 0:
            progress(f"snapshot: {topic} has {n} records")
            return n
        if time.monotonic() > deadline:
            raise StackError(f"no records on {topic} after {timeout:.0f}s; is the table seeded? "
                             f"See {cfg.logs / 'connect.log'}.")
        time.sleep(1.0)


# ---- rendering from the catalog (issue 20: C3 never leaves the database in clear) ----------------------

#: Where the salt of Debezium's hash mask is read from (default: ``<stack home>/secrets/connector-hash.salt``).
SALT_FILE_ENV = "GUARD_CONNECTOR_SALT_FILE"
_CATALOG_OWNED = ("column.exclude.list", "column.include.list", "column.mask.hash.")


def salt_file(cfg: StackConfig) -> Path:
    override = os.environ.get(SALT_FILE_ENV)
    return Path(override) if override else cfg.home / "secrets" / "connector-hash.salt"


def connector_hash_salt(cfg: StackConfig) -> str:
    """The salt of the connector's hash mask: read from a 0600 file, created (64 hex characters) if missing.

    A file readable by group or others is refused, not used: the salt is what keeps a hashed C3 value from
    being checked against guesses. It reaches Connect inside the connector config (an option *name*, so no
    config provider can stand in for it); Connect keeps it in its config topic.
    """
    path = salt_file(cfg)
    if create_private(path, secrets.token_hex(32) + "\n"):  # False: it exists (or another process won)
        progress(f"connector: created the hash salt {path} (mode 0600)")
    salt = read_private_text(path, "the connector's hash salt", StackError)
    if not salt or not all(c in "0123456789abcdefABCDEF" for c in salt) or len(salt) < 32:
        raise StackError(f"{path} must hold at least 32 hex characters (the connector's hash salt); "
                         f"remove it to have a new one made")
    return salt


def render_connector(catalog: Catalog, template: Path | None = None, namespace: str = "public") -> dict[str, Any]:
    """The connector document of the template plus the catalog's C3 options of `namespace`'s tables (the
    PostgreSQL schema or MariaDB database the connector captures), placeholders unresolved.

    Nothing secret is in it: the CDC password and the hash salt stay ``${CDC_PASSWORD}`` and
    ``${CONNECTOR_HASH_SALT}``. A template that sets a column filter itself is refused: the catalog owns them.
    """
    path = template or connectors_dir() / CONFIG_FILE
    doc = json.loads(path.read_text(encoding="utf-8"))
    owned = [k for k in doc["config"] if k.startswith(_CATALOG_OWNED)]
    if owned:
        raise StackError(f"{path} sets {owned}: column filters are rendered from the catalog "
                         f"({catalog.source}); remove them from the template")
    config = dict(doc["config"])
    config.update(source_options(catalog, namespace))
    if config.get("connector.class", "").endswith("PostgresConnector"):
        # Deletes are attributed by a logical decoding message (guard.principal) the connector must publish;
        # any other message stays out of Kafka (docs/policy.md). PostgreSQL only: MariaDB has no such messages.
        config[MESSAGE_PREFIX_OPTION] = ATTRIBUTION_MESSAGE_PREFIX
    elif config.get("connector.class", "").endswith("MariaDbConnector"):
        config.update(mariadb_attribution_options(config))
    return {"name": doc["name"], "config": config}


#: The Kafka Connect transform that routes the MariaDB attribution table's events to `<topic.prefix>.message`.
ATTRIBUTION_TRANSFORM = "attribution"


def mariadb_attribution_options(config: dict[str, str]) -> dict[str, str]:
    """What the MariaDB connector needs to publish the attribution of deletes (docs/policy.md): the guard-owned
    database holding the attribution table among the captured databases, and the table's events routed
    (Kafka Connect's `RegexRouter`, a full match of the one topic) to `<topic.prefix>.message`, where the
    PostgreSQL branch's logical decoding messages go. Rendered by the stack, not taken from the template.
    """
    databases = [d for d in config.get("database.include.list", "").split(",") if d]
    transforms = [t for t in config.get("transforms", "").split(",") if t]
    if ATTRIBUTION_TRANSFORM in transforms:
        raise StackError(f"the connector template already has a transform named {ATTRIBUTION_TRANSFORM!r}: "
                         "it is rendered by the stack (guard/stack/connector.py); remove it from the template")
    prefix = "${TOPIC_PREFIX}"
    route = f"transforms.{ATTRIBUTION_TRANSFORM}"
    return {
        "database.include.list": ",".join([*databases, ATTRIBUTION_DATABASE]),
        "transforms": ",".join([*transforms, ATTRIBUTION_TRANSFORM]),
        f"{route}.type": "org.apache.kafka.connect.transforms.RegexRouter",
        f"{route}.regex": f"{prefix}\\.{ATTRIBUTION_DATABASE}\\.{ATTRIBUTION_TABLE}",
        f"{route}.replacement": f"{prefix}.message",
    }


def resolve_connector(doc: dict[str, Any], values: dict[str, str]) -> tuple[str, dict[str, str]]:
    """Fill the ``${...}`` placeholders of a rendered document (names and values); returns (name, config)."""
    try:
        name = string.Template(doc["name"]).substitute(values)
        config = {string.Template(k).substitute(values): string.Template(str(v)).substitute(values)
                  for k, v in doc["config"].items()}
    except KeyError as exc:
        raise StackError(f"connector document: unknown placeholder ${{{exc.args[0]}}}") from None
    config["name"] = name
    return name, config


def redact(text: str, config: dict[str, str]) -> str:
    """`text` (an error from Connect) without the password or the hash salt of `config`."""
    for key, value in config.items():
        if key.startswith("column.mask.hash."):
            salt = key.rsplit(".with.salt.", 1)[-1]
            text = text.replace(salt, "<salt>")
        if key.endswith("password") and value:
            text = text.replace(value, "<password>")
    return text


def describe_source_rules(catalog: Catalog, namespace: str | None = None) -> str:
    """One phrase per C3 column: what Debezium does with it."""
    rules = source_rules(catalog, namespace)
    if not rules:
        return "the catalog has no C3 column"
    return "; ".join(f"{r.table}.{r.column}: {'excluded' if r.action.value == 'drop' else 'hashed'}"
                     for r in rules)


def check_hash_columns(dsn: str, catalog: Catalog, namespace: str = "public") -> None:
    """Refuse to register when a C3 column to be hashed would not be hashed by Debezium in full.

    Debezium's hash mask passes non-character columns through in clear and cuts the digest to a declared
    length below 64 (``guard.classify.source.hash_column_problem``). Columns missing from the database
    are fine (nothing to send). Raises StackError naming the column and what to change in the catalog.
    """
    import psycopg

    from guard.classify.source import hash_column_problem
    from guard.workload.branch import connect, is_mariadb

    hashed = [r for r in source_rules(catalog, namespace) if r.action.value == "hash"]
    if not hashed:
        return
    problems = []
    opened = connect(dsn) if is_mariadb(dsn) else psycopg.connect(dsn, connect_timeout=10)
    with opened as conn:
        for rule in hashed:
            schema, table = rule.table.split(".", 1)
            row = conn.execute("SELECT data_type, character_maximum_length FROM information_schema.columns "
                               "WHERE table_schema = %s AND table_name = %s AND column_name = %s",
                               (schema, table, rule.column)).fetchone()
            if row is None:
                continue
            problem = hash_column_problem(str(row[0]), row[1])
            if problem:
                problems.append(f"{rule.table}.{rule.column}: {problem}")
    if problems:
        raise StackError("the connector was not registered, a C3 column would reach Kafka in clear or "
                         "guessable: " + "; ".join(problems))


# --- raw records written before the C3 filter (local stack) ----------------------------------------------
def c3_filter_marker(cfg: StackConfig, engine: str = "postgres") -> Path:
    """Where the stack remembers which C3 filter its raw topics have been cleaned for."""
    return cfg.run / ("c3-filter.applied" if engine == "postgres" else f"c3-filter-{engine}.applied")


def purge_raw_written_before_filter(cfg: StackConfig, catalog: Catalog, outcome: str,
                                    engine: str = "postgres") -> list[str]:
    """Delete the raw records of C3 tables that a connector without today's C3 filter wrote (local stack).

    A connector registered before the catalog's C3 columns were filtered at the source (or with fewer of
    them) left those values in clear in the raw topics, where they would stay for the raw retention (3
    days). On the local stack, whose database still holds every row, the stack removes them once:
    when the filter it registers differs from the one it last cleaned for, every record of the raw topics
    of tables with C3 columns up to their current end is deleted (Admin API DeleteRecords) after the
    connector runs with the new filter. A stack whose connector was just created has nothing to clean.
    In production the raw topics age out instead (connectors/README.md).
    """
    from confluent_kafka import TopicPartition
    from confluent_kafka.admin import AdminClient

    marker = c3_filter_marker(cfg, engine)
    ns = namespace(cfg, engine)
    digest = json.dumps(source_options(catalog, ns), sort_keys=True)
    if marker.exists() and marker.read_text(encoding="utf-8") == digest:
        return []
    cleaned: list[str] = []
    if outcome != "created":
        admin = AdminClient(kafka_client_config(cfg))
        topics = admin.list_topics(timeout=15).topics
        for table in sorted({rule.table for rule in source_rules(catalog, ns)}):
            name = f"{topic_prefix(cfg, engine)}.{table}"
            meta = topics.get(name)
            if meta is None or meta.error is not None:
                continue
            ends = [TopicPartition(name, p, _partition_end(cfg, name, p)) for p in meta.partitions]
            ends = [tp for tp in ends if tp.offset > 0]
            if not ends:
                continue
            for fut in admin.delete_records(ends, request_timeout=30).values():
                fut.result(timeout=60)
            cleaned.append(name)
            progress(f"connector: {name} held records written before the C3 filter; deleted them "
                     f"(the branch database keeps the rows; the guard's outputs keep their sanitized form)")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(digest, encoding="utf-8")
    return cleaned


def _partition_end(cfg: StackConfig, topic: str, partition: int) -> int:
    """High watermark of one partition (read as the stack's admin)."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({**kafka_client_config(cfg), "group.id": "branchguard-stack-probe",
                         "logger": quiet_probe_logger})
    try:
        return int(consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=15)[1])
    finally:
        consumer.close()
