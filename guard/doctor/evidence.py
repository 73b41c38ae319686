"""Evidence retention (issue 20 items 5 and 7): the audit signing key and the evidence topics' retention."""

from __future__ import annotations

import stat

from confluent_kafka.admin import AdminClient

from guard.config import Settings
from guard.doctor.check import Check
from guard.errors import ConfigError


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
