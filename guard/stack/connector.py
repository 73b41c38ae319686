"""Register the branch database's Debezium connector through the Connect REST API, idempotently.

The connector config lives in ``connectors/branch-postgres.json`` (documented option by option in
``connectors/README.md``) with ``${NAME}`` placeholders, resolved here, so the same file serves the
local stack (127.0.0.1:15432) and docker-compose (postgres:5432).
"""

from __future__ import annotations

import json
import os
import string
import time
from pathlib import Path
from typing import Any

import httpx

from guard.stack.config import StackConfig
from guard.stack.errors import StackError
from guard.stack.procs import progress

CONFIG_FILE = "branch-postgres.json"


def connectors_dir() -> Path:
    """``$GUARD_CONNECTORS_DIR`` or the repository's ``connectors/`` (editable installs, the image)."""
    override = os.environ.get("GUARD_CONNECTORS_DIR")
    path = Path(override) if override else Path(__file__).resolve().parents[2] / "connectors"
    if not (path / CONFIG_FILE).exists():
        raise StackError(f"{path / CONFIG_FILE} not found; "
                         f"set GUARD_CONNECTORS_DIR to the repository's connectors/ directory")
    return path


def placeholder_values(cfg: StackConfig, db_host: str | None = None, db_port: int | None = None,
                       bootstrap: str | None = None, *, cdc_password_file: str | None = None,
                       ca_file: str | None = None) -> dict[str, str]:
    """Values for the ``${...}`` placeholders in the connector file."""
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
                     timeout: float = 180.0, cdc_password_file: str | None = None, ca_file: str | None = None,
                     auth: tuple[str, str] | None = None) -> None:
    """Create or update the connector (only if its config differs) and wait until it and its task run.

    A FAILED connector/task is restarted once, since the usual cause on a laptop is the database
    having been down while Connect started.
    """
    cfg = cfg or StackConfig.from_env()
    url = connect_url or cfg.connect_url
    name, config = load_connector(placeholder_values(cfg, db_host, db_port, cdc_password_file=cdc_password_file,
                                                     ca_file=ca_file))
    with httpx.Client(base_url=url, timeout=30.0, auth=auth or rest_auth(cfg)) as http:
        current = http.get(f"/connectors/{name}/config")
        if current.status_code == 200 and current.json() == config:
            progress(f"connector {name}: config unchanged")
        else:
            r = http.put(f"/connectors/{name}/config", json=config)
            if r.status_code >= 400:
                raise StackError(f"Connect rejected connector {name}: HTTP {r.status_code} {r.text[:2000]}")
            progress(f"connector {name}: {'created' if r.status_code == 201 else 'updated'}")
        restarted = False
        deadline = time.monotonic() + timeout
        while True:
            state, tasks, trace = connector_state(http, name)
            if state == "RUNNING" and tasks and all(t == "RUNNING" for t in tasks):
                progress(f"connector {name}: RUNNING (tasks {tasks})")
                return
            if "FAILED" in (state, *tasks) and not restarted:
                progress(f"connector {name}: FAILED ({trace}); restarting it once")
                http.post(f"/connectors/{name}/restart",
                          params={"includeTasks": "true", "onlyFailed": "true"})
                restarted = True
            elif "FAILED" in (state, *tasks) and restarted and time.monotonic() > deadline - timeout / 2:
                raise StackError(f"connector {name} FAILED: {trace}. See {cfg.logs / 'connect.log'}; "
                                 f"after fixing the cause run `guard stack up` again.")
            if time.monotonic() > deadline:
                raise StackError(f"connector {name} not RUNNING after {timeout:.0f}s (state {state}, "
                                 f"tasks {tasks}). See {cfg.logs / 'connect.log'}.")
            time.sleep(1.0)


def topic_message_count(bootstrap: str, topic: str) -> int:
    """Sum of high watermarks over the topic's partitions (0 if the topic does not exist yet)."""
    from confluent_kafka import Consumer, TopicPartition
    from confluent_kafka.admin import AdminClient

    from guard.stack.broker import _quiet

    common: dict[str, Any] = {"bootstrap.servers": bootstrap, "logger": _quiet}
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


def wait_snapshot(cfg: StackConfig, table: str = "customers", timeout: float = 180.0) -> int:
    """Wait until Debezium's initial snapshot has produced to ``<prefix>.public.<table>``."""
    topic = f"{cfg.topic_prefix}.public.{table}"
    deadline = time.monotonic() + timeout
    while True:
        n = topic_message_count(cfg.bootstrap, topic)
        if n > 0:
            progress(f"snapshot: {topic} has {n} records")
            return n
        if time.monotonic() > deadline:
            raise StackError(f"no records on {topic} after {timeout:.0f}s; is the table seeded? "
                             f"See {cfg.logs / 'connect.log'}.")
        time.sleep(1.0)
