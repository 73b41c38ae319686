"""Settings: one place, environment variables first, an optional TOML file second, defaults last.

Every setting has a `GUARD_*` environment variable (what `guard stack env` prints) and the same name in
lower case in a `[guard]` table of the file named by `--config` or `GUARD_CONFIG`. Defaults match the
local stack, so `guard run` works straight after `guard stack up`.
"""

from __future__ import annotations

import os
import socket
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from guard.errors import ConfigError


@dataclass(frozen=True)
class Settings:
    #: Kafka bootstrap servers of the cluster carrying the raw CDC topics.
    kafka_bootstrap: str = "127.0.0.1:19092"
    #: Kafka Connect REST URL (for `guard stack`, `guard demo`, status).
    connect_url: str = "http://127.0.0.1:18083"
    #: libpq URL of the demo branch database (TLS verified against the stack CA, password from `passfile`).
    branch_dsn: str = field(default_factory=lambda: _default_branch_dsn())
    #: Redis URL of the shared, durable key store and windows (TLS, ACL user `guard`).
    redis_url: str = field(default_factory=lambda: _default_redis_url())
    #: Debezium `topic.prefix` of the branch connector; raw topics are `<prefix>.<schema>.<table>`.
    raw_topic_prefix: str = "br0101"
    #: The branch code the raw topics belong to (keys are per branch).
    branch: str = "0101"
    #: A second branch this deployment serves, on another engine (the local stack's MariaDB branch: `0202`,
    #: raw prefix `br0202`, `guard stack env` prints them). A worker serves one branch: run a second one with
    #: `guard run --branch <branch2> --raw-topic-prefix <branch2_raw_topic_prefix>`. `guard doctor` checks it.
    branch2: str = ""
    branch2_raw_topic_prefix: str = ""
    #: `mysql://user:password@host:port/db` of the second branch's MariaDB (the application account), for
    #: `guard doctor`'s database checks.
    branch2_dsn: str = ""
    #: File holding the password of the second branch's CDC account (`cdc`), mode 0600; `guard doctor` logs in
    #: with it to check the account's grants.
    branch2_cdc_password_file: str = ""
    #: The organisation owning the branch (blind indexes and C3 hashes are keyed per tenant).
    tenant: str = "demo-bank"
    #: Prefix of output topics: `sanitized.<raw topic>`.
    sanitized_prefix: str = "sanitized."
    audit_topic: str = "guard.audit"
    anomalies_topic: str = "guard.anomalies"
    deletions_topic: str = "guard.deletions"
    dlq_topic: str = "guard.dlq"
    #: Facts for the anomaly analyzers (docs/anomalies.md): the sanitizer writes `transaction` facts here
    #: (an amount band of a catalog column with `bands`, never the amount).
    facts_topic: str = "guard.facts"
    #: Consumer group of the sanitizer workers; scale out by starting more workers in the same group.
    group_id: str = "branchguard-sanitizer"
    #: Stable identity of this worker. It names the transactional id, so a restarted worker fences its
    #: crashed predecessor at once instead of waiting for the transaction timeout.
    worker_id: str = field(default_factory=lambda: socket.gethostname())
    #: Records per transaction at most, and the longest a transaction stays open (ms).
    batch_size: int = 2000
    batch_ms: int = 100
    #: Kilobytes of records a worker's consumer fetches ahead of it at most (librdkafka's
    #: `queued.max.messages.kbytes`, whose own default is 65536). A worker that falls behind (a stall, a
    #: backlog) would otherwise hold 64 MiB of prefetched records plus their per-record overhead that it can't
    #: use yet; 16 MiB is still several full batches ahead. Between 1024 and 2097151.
    prefetch_kb: int = 16384
    transaction_timeout_ms: int = 30_000
    #: Seconds past the transaction timeout before a partition whose last stable offset stands still is
    #: called hanging (an alert, `guard doctor`): Kafka's coordinator aborts timed-out transactions every
    #: 10 s (`transaction.abort.timed.out.transaction.cleanup.interval.ms`), so keep it well above that.
    #: The same limit applies to an assigned partition the consumer does not fetch (`guard.kafka.fetching`).
    hanging_margin_s: float = 30.0
    #: Path of the classification catalog (default: schemas/catalog.toml of the checkout).
    catalog: str = ""
    #: Optional Confluent-compatible schema registry; without it sanitized records use Avro single-object
    #: encoding, which is self-describing through its schema fingerprint.
    schema_registry_url: str = ""
    #: Seconds an unwrapped data key may stay cached in a worker (bound on shred lingering).
    key_cache_ttl: float = 60.0
    #: Seconds a worker lets erasures gather before it has the key store's append-only file rewritten (the
    #: rewrite removes the destroyed keys from Redis's disk; one covers every shred before it starts). A
    #: destroyed key stays on that disk this long plus one rewrite at most (plus a rewrite already running
    #: then, or a key-store outage); 0 rewrites after every shred,
    #: which on a stream that erases customers every second keeps a rewrite running all the time. At most
    #: 3600. `guard erase` rewrites at once whatever this says.
    aof_compaction_delay_s: float = 60.0
    #: Scheduled erasures (root deletes past their grace period) a worker carries out per transaction of
    #: their own, between the stream's transactions; when more are due, the next ones follow the next
    #: stream transaction instead of the next maintenance round (5 s). Each costs two key-store round
    #: trips and its records (~1.3 ms on the idle local stack, more under load), so this bounds how long the
    #: stream waits for them: 100 at once held it 246 ms (docs/benchmark.md, round 18).
    erasures_per_transaction: int = 16
    #: OTLP endpoint for traces and metrics (empty: no export).
    otlp_endpoint: str = ""
    #: Port of the local Prometheus metrics endpoint (0: off).
    metrics_port: int = 0
    #: Which transform handles ordinary change events: `auto` (the compiled `guard_native` path when it is
    #: installed, else Python), `native` (refuse to start without it) or `python` (the reference path).
    hot_path: str = "auto"
    # --- Kafka client security (issue 20, kafka part; read by guard.kafka_security) --------------------
    #: `SASL_SSL` (TLS + SASL, the local stack's only listener), `SSL`, `SASL_PLAINTEXT` or `PLAINTEXT`.
    kafka_security_protocol: str = "SASL_SSL"
    kafka_sasl_mechanism: str = "SCRAM-SHA-512"
    #: The guard's Kafka principal (the local stack's `guard` user: read raw topics, write its outputs).
    kafka_username: str = "guard"
    #: File holding the password (mode 0600); empty: `<stack home>/secrets/kafka-<username>.password`.
    kafka_password_file: str = ""
    #: CA certificate (PEM) the brokers' certificates are checked against; empty: `<stack home>/tls/ca.crt`.
    kafka_ca_file: str = ""
    #: The principal the guard's workers run as, the only one `guard doctor` accepts as a reader of the raw
    #: topics; empty: `User:<kafka_username>` (set it when doctor runs as another principal, e.g. an admin).
    kafka_guard_principal: str = ""
    # --- end of Kafka client security ---------------------------------------------------------------

    # ---- access policy (guard/policy, docs/policy.md)
    #: `on`: every CDC write is checked against the Cedar policy and the decision audited; `off`: not checked.
    policy: str = "on"
    #: The policy directory (schema.cedarschema, *.cedar, entities.json; default: policy/ of the checkout).
    policy_dir: str = ""
    #: Where staff entities come from: `db` (the branch database's staff and staff_roles tables, at
    #: `branch_dsn`, refreshed every 30 s) or `file` (entities.json only).
    policy_staff: str = "db"
    #: The `Branch` entity of the policy this worker's tables belong to (default: `branch`).
    policy_branch: str = ""
    #: Width of a decision-cache bucket in seconds: a decision holds for the bucket its time falls in.
    policy_bucket_s: float = 1.0
    #: How long a delete waits for the logical-decoding message naming its principal before it is
    #: decided `unattributed` (seconds since this worker first met it).
    attribution_wait_s: float = 10.0
    # ---- the branch transfer (guard/transfer, docs/transfer.md)
    #: Out-of-scope customers shredded per batch of `guard transfer cutover` (one Kafka write and one saved
    #: state per batch: a crash repeats at most one batch's confirmations, with the same ids).
    transfer_destroy_batch: int = 16
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

    # ---- the reveal service (guard/reveal/, docs/reveal.md)
    #: Address and port `guard reveal serve` listens on (loopback by default). Without the certificate below
    #: it refuses any address but loopback (`localhost`, 127.0.0.0/8, ::1): set it, or stay on loopback
    #: behind a TLS proxy.
    reveal_host: str = "127.0.0.1"
    reveal_port: int = 8443
    #: Server certificate and key (PEM) for HTTPS; empty: plain HTTP, on a loopback `reveal_host` only.
    reveal_tls_cert: str = ""
    reveal_tls_key: str = ""
    #: The 0600 file with the server key of token hashes (HMAC-SHA256); default
    #: ~/.config/branchguard/reveal-token.key, created by `guard reveal token create`.
    reveal_token_key_file: str = ""
    #: Records (reveal) or values (search) a principal may ask for per sliding window of `reveal_rate_window_s`.
    reveal_rate_limit: int = 600
    reveal_rate_window_s: int = 60
    #: Values a principal may search per sliding window of `reveal_search_rate_window_s`, counted apart and on
    #: top of the budget above. A sanitized record shows a masked value (`138****1234`) beside its blind index,
    #: so search confirms guesses: a mobile's 4 hidden digits are 10^4 candidates, 17 minutes under the shared
    #: budget, 100 hours under this one at its default. A counter's day is a few dozen searches.
    reveal_search_rate_limit: int = 100
    reveal_search_rate_window_s: int = 3600
    #: Largest request body accepted (bytes); larger ones are refused with 413 before they are parsed.
    reveal_max_body_bytes: int = 65_536
    # --- access (issue 20): where credentials are, never the credentials themselves -----------------
    #: File (0600) holding the password of the Redis user named in `redis_url` (`rediss://guard@host:port/0`);
    #: read at every (re)connection, so a rotated password is picked up without a restart.
    redis_password_file: str = field(default_factory=lambda: str(_stack_home() / "secrets/redis-guard.password"))
    #: File (0600) holding `user:password` for the Kafka Connect REST API (HTTP basic authentication).
    connect_credentials_file: str = field(
        default_factory=lambda: str(_stack_home() / "secrets/connect-rest.credentials"))
    # --- end access (issue 20) ------------------------------------------------------------------------

    @property
    def stuck_after_s(self) -> float:
        """How long a partition may stand still before the watches and `guard doctor` call it stuck (a hanging
        transaction, a partition never fetched): no working producer's transaction stays open longer than its
        timeout, and the coordinator's clean-up of late ones runs within the margin."""
        return self.transaction_timeout_ms / 1000 + self.hanging_margin_s

    @property
    def raw_topic_pattern(self) -> str:
        return "^" + self.raw_topic_prefix.replace(".", r"\.") + r"\.[^.]+\.[^.]+$"

    def sanitized_topic(self, raw_topic: str) -> str:
        return self.sanitized_prefix + raw_topic

    def transactional_id(self) -> str:
        return f"{self.group_id}-{self.worker_id}"

    def for_branch(self, branch: str, raw_topic_prefix: str) -> Settings:
        """The settings of a worker for another branch (the local stack's MariaDB branch 0202, `br0202`).

        A worker serves one branch: the branch id names its subject tokens, data keys and branch key, and
        the raw prefix its input topics. Its consumer group (and so its transactional id) is the branch's
        own, ``<group_id>-<branch>``, so the two branches' workers never fence each other or share offsets.
        """
        return replace(self, branch=branch, raw_topic_prefix=raw_topic_prefix,
                       group_id=f"{self.group_id}-{branch}")


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


# --- access (issue 20): secrets are read from 0600 files, never from command lines or printed ----------
def _stack_home() -> Path:
    """The local stack's home (guard.stack.config.StackConfig.home): defaults point at its CA and secrets."""
    return Path(os.environ.get("GUARD_STACK_HOME") or Path.home() / ".local/share/branchguard").expanduser()


def _default_branch_dsn() -> str:
    home = _stack_home()
    return (f"postgresql://branch_app@127.0.0.1:15432/branch_0101?sslmode=verify-full"
            f"&sslrootcert={home / 'tls/ca.crt'}&passfile={home / 'secrets/pgpass'}")


def _default_redis_url() -> str:
    return f"rediss://guard@127.0.0.1:16379/0?ssl_ca_certs={_stack_home() / 'tls/ca.crt'}&ssl_cert_reqs=required"


def read_secret_file(path: str | os.PathLike[str], what: str) -> str:
    """The first line of a secret file; refuses a file other users can read. Never echoes the content."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except OSError:
        raise ConfigError(f"{what}: {p} does not exist; run `guard stack up` (local stack) or create it "
                          f"with mode 0600") from None
    if mode & 0o077:
        raise ConfigError(f"{what}: {p} is readable by other users; run `chmod 600 {p}`")
    value = p.read_text(encoding="utf-8").strip()
    if not value:
        raise ConfigError(f"{what}: {p} is empty")
    return value


def connect_credentials(path: str | None = None) -> tuple[str, str] | None:
    """(user, password) for the Connect REST API from `path` or GUARD_CONNECT_CREDENTIALS_FILE; None if unset."""
    path = path or os.environ.get("GUARD_CONNECT_CREDENTIALS_FILE") or ""
    if not path:
        return None
    user, sep, password = read_secret_file(path, "Kafka Connect REST credentials").partition(":")
    if not sep or not user or not password:
        raise ConfigError(f"Kafka Connect REST credentials: {path} must hold one line `user:password`")
    return user, password
# --- end access (issue 20) ----------------------------------------------------------------------------


def mariadb_connect_args(dsn: str) -> dict[str, Any]:
    """PyMySQL's arguments for ``mysql://user[:password]@host:port/db?password_file=...&ssl_ca=...``.

    ``password_file``: the password is read from that file (the DSN then holds no secret); ``ssl_ca``: TLS,
    the server's certificate and host name verified against that CA."""
    url = urlsplit(dsn)
    query = parse_qs(url.query)
    password = unquote(url.password or "")
    if "password_file" in query:
        with open(query["password_file"][0], encoding="utf-8") as fh:
            password = fh.read().strip()
    args: dict[str, Any] = {"host": url.hostname or "127.0.0.1", "port": url.port or 3306,
                            "user": unquote(url.username or ""), "password": password,
                            "database": url.path.lstrip("/") or None}
    if "ssl_ca" in query:
        args.update(ssl_ca=query["ssl_ca"][0], ssl_verify_cert=True, ssl_verify_identity=True)
    return args
