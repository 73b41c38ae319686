"""Settings: one place, environment variables first, an optional TOML file second, defaults last.

Every setting has a `GUARD_*` environment variable (what `guard stack env` prints) and the same name in
lower case in a `[guard]` table of the file named by `--config` or `GUARD_CONFIG`. Defaults match the
local stack, so `guard run` works straight after `guard stack up`.
"""

from __future__ import annotations

import os
import socket
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from guard.errors import ConfigError


@dataclass(frozen=True)
class Settings:
    #: Kafka bootstrap servers of the cluster carrying the raw CDC topics.
    kafka_bootstrap: str = "127.0.0.1:19092"
    #: Kafka Connect REST URL (for `guard stack`, `guard demo`, status).
    connect_url: str = "http://127.0.0.1:18083"
    #: libpq URL of the demo branch database.
    branch_dsn: str = "postgresql://branch_app:branch_app@127.0.0.1:15432/branch_0101"
    #: Redis URL of the shared, durable key store and windows.
    redis_url: str = "redis://127.0.0.1:16379/0"
    #: Debezium `topic.prefix` of the branch connector; raw topics are `<prefix>.<schema>.<table>`.
    raw_topic_prefix: str = "br0101"
    #: The branch code the raw topics belong to (keys are per branch).
    branch: str = "0101"
    #: The organisation owning the branch (blind indexes and C3 hashes are keyed per tenant).
    tenant: str = "demo-bank"
    #: Prefix of output topics: `sanitized.<raw topic>`.
    sanitized_prefix: str = "sanitized."
    audit_topic: str = "guard.audit"
    anomalies_topic: str = "guard.anomalies"
    deletions_topic: str = "guard.deletions"
    dlq_topic: str = "guard.dlq"
    #: Consumer group of the sanitizer workers; scale out by starting more workers in the same group.
    group_id: str = "branchguard-sanitizer"
    #: Stable identity of this worker. It names the transactional id, so a restarted worker fences its
    #: crashed predecessor at once instead of waiting for the transaction timeout.
    worker_id: str = field(default_factory=lambda: socket.gethostname())
    #: Records per transaction at most, and the longest a transaction stays open (ms).
    batch_size: int = 2000
    batch_ms: int = 100
    transaction_timeout_ms: int = 30_000
    #: Path of the classification catalog (default: schemas/catalog.toml of the checkout).
    catalog: str = ""
    #: Optional Confluent-compatible schema registry; without it sanitized records use Avro single-object
    #: encoding, which is self-describing through its schema fingerprint.
    schema_registry_url: str = ""
    #: Seconds an unwrapped data key may stay cached in a worker (bound on shred lingering).
    key_cache_ttl: float = 60.0
    #: OTLP endpoint for traces and metrics (empty: no export).
    otlp_endpoint: str = ""
    #: Port of the local Prometheus metrics endpoint (0: off).
    metrics_port: int = 0
    #: Which transform handles ordinary change events: `auto` (the compiled `guard_native` path when it is
    #: installed, else Python), `native` (refuse to start without it) or `python` (the reference path).
    hot_path: str = "auto"

    # ---- the audit chain (guard/audit, guard/kafka/audit_chain.py, docs/audit.md)
    #: The Ed25519 private key (PKCS#8 PEM, mode 0600) that signs checkpoints and deletion confirmations
    #: (empty: `<stack home>/secrets/audit-signing.key`, which `guard stack up` creates).
    audit_signing_key: str = ""
    #: A writer checkpoints a chain after this many new records, or after `audit_checkpoint_s` seconds
    #: (idle included), whichever comes first.
    audit_checkpoint_records: int = 1000
    audit_checkpoint_s: float = 30.0

    # ---- evidence topics: retention and replication of guard.audit and guard.deletions (guard/kafka/evidence.py)
    #: How long `guard.audit` keeps its records, in ms (-1: forever). Default 7 years: PIPL Art. 56 asks for at
    #: least 3 years for processing records, and the AML identity and transaction records they account for are
    #: kept at least 5 years after the relationship ends (PBOC 2022 Order No. 1), with a margin.
    audit_retention_ms: int = 7 * 365 * 86_400_000
    #: How long `guard.deletions` keeps destruction records, in ms (-1: forever); never shorter than the audit
    #: topic's. Default 10 years: a destruction record proves what was erased for as long as anyone may ask,
    #: and the revised AML law may lengthen the 5-year period to 10 (docs/reliability.md, "Evidence topics").
    deletions_retention_ms: int = 10 * 365 * 86_400_000
    #: Replication factor of the evidence topics when the guard creates them (-1: the cluster's
    #: `default.replication.factor`). Production: 3.
    evidence_replication_factor: int = -1
    #: `min.insync.replicas` of the evidence topics (0: the broker's default). Production: 2 with 3 replicas.
    evidence_min_insync_replicas: int = 0

    @property
    def raw_topic_pattern(self) -> str:
        return "^" + self.raw_topic_prefix.replace(".", r"\.") + r"\.[^.]+\.[^.]+$"

    def sanitized_topic(self, raw_topic: str) -> str:
        return self.sanitized_prefix + raw_topic

    def transactional_id(self) -> str:
        return f"{self.group_id}-{self.worker_id}"


def load_settings(path: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Build settings from (lowest to highest precedence) defaults, the TOML file, env vars, overrides."""
    values: dict[str, Any] = {}
    path = path or os.environ.get("GUARD_CONFIG")
    if path:
        try:
            doc = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        values.update(doc.get("guard", {}))
    known = {f.name: f for f in fields(Settings)}
    unknown = set(values) - set(known)
    if unknown:
        raise ConfigError(f"unknown settings in {path}: {', '.join(sorted(unknown))}")
    for name in known:
        env = os.environ.get("GUARD_" + name.upper())
        if env is not None and env != "":
            values[name] = env
    values.update({k: v for k, v in overrides.items() if v is not None})
    typed: dict[str, Any] = {}
    for name, value in values.items():
        kind = type(getattr(Settings(), name))
        try:
            typed[name] = kind(value)
        except (TypeError, ValueError):
            raise ConfigError(f"setting {name} must be a {kind.__name__}, got {value!r}") from None
    return Settings(**typed)
