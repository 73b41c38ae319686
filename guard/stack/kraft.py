"""KRaft layout of the local stack: a controller process (node 100) and a broker process (node 1).

Until stack-18 the stack ran one combined node (``process.roles=broker,controller``). When that node was
SIGKILLed and restarted, its controller replayed a metadata log in which the dead incarnation of broker 1 was
still registered and unfenced, and gave it a fresh session; the restarted broker acted on that stale image
(leader of every partition, transaction coordinator completing PREPARE_COMMIT/PREPARE_ABORT transactions by
sending markers) until the controller fenced the stale incarnation ``broker.session.timeout.ms`` later. For
~1.5 s every partition was then leaderless, markers pending at that moment were skipped ("Couldn't find leader
endpoint ... likely deleted already and hence can be skipped") while the coordinator still wrote
COMPLETE_COMMIT: the data partitions kept an open transaction forever (a *hanging transaction*).

With the controller in its own process a broker crash does not restart the controller, and
`guard.stack.broker.Broker.start` waits until the controller has fenced the dead incarnation
(`fence_wait_seconds`) before it launches a new one, so the new broker never acts on a stale registration.

This module holds the pure parts (rendering both properties files, the wait arithmetic, recognising the old
combined layout) and the one JVM call both processes share, formatting storage.
"""

from __future__ import annotations

import base64
import subprocess
import uuid
from pathlib import Path

from guard.stack.assets import render_asset
from guard.stack.config import StackConfig
from guard.stack.errors import StackError
from guard.stack.jvm import classpath, java, logging_opts
from guard.stack.procs import progress, tail

#: Added to ``broker.session.timeout.ms`` before a crashed broker is started again: the controller checks
#: sessions periodically, and a fresh controller needs a moment after its start to replay its log.
FENCE_MARGIN_S = 3.0


def new_cluster_id() -> str:
    """Same format as ``kafka-storage random-uuid`` (url-safe base64 of 16 bytes), without a JVM start."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


#: Certificate subjects (``CN=<name>,O=...`` in RFC 2253 order, guard.stack.tls) map to the principal
#: ``User:<name>`` on the mutual-TLS listeners.
PRINCIPAL_MAPPING = r"RULE:^CN=([a-zA-Z0-9._-]+),.*$/$1/,DEFAULT"


def tls_properties(cfg: StackConfig, node: str) -> str:
    """The node's PEM keystore (its key and certificate chain) and truststore (the stack's CA)."""
    tls = cfg.tls_dir
    return "\n".join([
        "ssl.keystore.type=PEM",
        f"ssl.keystore.location={tls / (node + '.pem')}",
        "ssl.truststore.type=PEM",
        f"ssl.truststore.location={tls / 'ca.crt'}",
        "ssl.endpoint.identification.algorithm=https",
        f"ssl.principal.mapping.rules={PRINCIPAL_MAPPING}",
    ])


def authorizer_properties() -> str:
    """KRaft's StandardAuthorizer, deny by default; super users: the admin and the two nodes' certificates."""
    from guard.stack.kafka_auth import super_users

    return "\n".join([
        "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "allow.everyone.if.no.acl.found=false",
        f"super.users={super_users()}",
    ])


def broker_properties(cfg: StackConfig, data_dir: Path) -> str:
    """``server.properties`` of the broker-only node."""
    return render_asset(
        "server.properties", kafka_version=cfg.kafka_version, host=cfg.host, kafka_port=cfg.kafka_port,
        controller_port=cfg.controller_port, controller_id=cfg.controller_node_id, data_dir=data_dir,
        session_timeout_ms=cfg.broker_session_timeout_ms, internal_port=cfg.internal_port,
        tls=tls_properties(cfg, "broker"), authorizer=authorizer_properties())


def controller_properties(cfg: StackConfig, data_dir: Path) -> str:
    """``controller.properties`` of the controller-only node (the single static voter)."""
    return render_asset(
        "controller.properties", kafka_version=cfg.kafka_version, host=cfg.host,
        controller_port=cfg.controller_port, controller_id=cfg.controller_node_id, data_dir=data_dir,
        session_timeout_ms=cfg.broker_session_timeout_ms, tls=tls_properties(cfg, "controller"),
        authorizer=authorizer_properties())


def parse_properties(text: str) -> dict[str, str]:
    """``key=value`` lines of a Java properties file (comments and blank lines skipped; enough for ours)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#!" or "=" not in line:
            continue
        k, v = line.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def meta_node_id(data_dir: Path) -> int | None:
    """``node.id`` in a formatted log dir's ``meta.properties``, or None when it is not formatted."""
    try:
        raw = parse_properties((data_dir / "meta.properties").read_text(encoding="utf-8")).get("node.id")
    except OSError:
        return None
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


def is_combined_layout(broker_data: Path, controller_data: Path, rendered_server_properties: Path) -> bool:
    """True when the broker's log dir holds a combined broker+controller node (the layout before stack-18).

    Either the last rendered ``server.properties`` said ``process.roles=broker,controller``, or the broker's
    log dir is formatted while the controller's is not (a broker-only node always comes with a controller).
    Only a *formatted* broker log dir counts: without data there is nothing to migrate.
    """
    if meta_node_id(broker_data) is None:
        return False
    try:
        roles = parse_properties(rendered_server_properties.read_text(encoding="utf-8")).get("process.roles", "")
    except OSError:
        roles = ""
    if "controller" in {r.strip() for r in roles.split(",")}:
        return True
    return meta_node_id(controller_data) is None


def fence_wait_seconds(now: float, died_at: float | None, controller_since: float | None,
                       session_timeout_ms: int, margin_s: float = FENCE_MARGIN_S) -> float:
    """Seconds to wait before a crashed broker may start again; 0 when the controller has fenced it.

    The controller fences the dead incarnation ``session_timeout_ms`` after its last heartbeat, which is at
    most the time of death (``died_at``, wall clock) — or, if the controller itself started later, after the
    controller's start (a fresh controller gives every registered broker a fresh session when it replays its
    log; ``controller_since``). An unknown time of death (``None``) counts as *now*: the full timeout.
    """
    base = now if died_at is None else min(died_at, now)
    if controller_since is not None:
        base = max(base, controller_since)
    return max(0.0, base + session_timeout_ms / 1000.0 + margin_s - now)


def format_storage(cfg: StackConfig, lib: Path, properties: Path, data_dir: Path, log_config: Path,
                   who: str, cluster_id: str, extra_args: list[str] | None = None) -> None:
    """``kafka.tools.StorageTool format`` for one node (static quorum: no --standalone/--initial-controllers).

    `extra_args`: the controller's ``--add-scram`` users (their passwords are on this short-lived command
    line for the format's duration; `guard.stack.kafka_auth` upserts them again at every `up` anyway).
    """
    progress(f"{who}: formatting KRaft storage in {data_dir} (cluster {cluster_id})"
             + (" with the SCRAM users" if extra_args else ""))
    log = cfg.logs / "kafka-format.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        rc = subprocess.run(
            [java(), *logging_opts(cfg.kafka_version, log_config), "-cp", classpath(lib),
             "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(properties), "--ignore-formatted",
             *(extra_args or [])],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=False).returncode
    if rc != 0:
        raise StackError(f"{who}: formatting storage failed (exit {rc}).\n{tail(log)}\n"
                         f"If {data_dir} holds data from another Kafka version, run "
                         f"`guard stack down` and remove it.")


def cluster_id(kafka_dir: Path) -> str:
    """The stack's cluster id, created once in ``<home>/kafka/cluster.id`` (both nodes are formatted with it)."""
    id_file = kafka_dir / "cluster.id"
    if not id_file.exists():
        kafka_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(new_cluster_id() + "\n", encoding="utf-8")
    return id_file.read_text(encoding="utf-8").strip()
