"""Alerts: the id derived from rule, scope and window, the Avro record (schemas/alert.avsc), the terminal line.

An alert's id is `sha256(rule | branch | scope | window start)`: the same condition in the same window
always gets the same id, so a replayed fact, a second worker or a continuing condition update one alert
(state `updated`, version +1) instead of opening another. The Kafka key of an alert is its id.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

from guard.records.codec import AvroCodec, decode

SEVERITIES = ("critical", "high", "medium", "low")
ALERT_VERSION = 1


def alert_id(rule: str, branch: str, scope: str, window_start_ms: int) -> str:
    """The stable id of the alert of `rule` over `scope` in the window starting at `window_start_ms`."""
    return hashlib.sha256(f"{rule}|{branch}|{scope}|{window_start_ms}".encode()).hexdigest()[:32]


@dataclass(slots=True)
class Condition:
    """What a rule found for one fact: the alert it opens or updates (before the state merge)."""

    rule: str
    severity: str
    branch: str
    scope: str
    count: int
    threshold: int
    window_start_ms: int
    window_end_ms: int
    first_ms: int
    last_ms: int
    summary: str
    suggested_action: str
    principal: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    evidence: list[tuple[str, str]] = field(default_factory=list)

    @property
    def id(self) -> str:
        return alert_id(self.rule, self.branch, self.scope, self.window_start_ms)

    def static(self) -> dict[str, Any]:
        """The fields that do not change over the alert's life (stored once with its state)."""
        return {"id": self.id, "rule": self.rule, "severity": self.severity, "branch": self.branch,
                "principal": self.principal, "scope": self.scope, "threshold": self.threshold,
                "window_start_ms": self.window_start_ms, "window_end_ms": self.window_end_ms,
                "summary": self.summary, "suggested_action": self.suggested_action, "counts": self.counts}


class AlertCodec:
    """Encodes alerts as Avro single-object records (self-describing against schemas/)."""

    def __init__(self, registry: Any = None) -> None:
        self.codec = AvroCodec("alert", registry=registry)

    def record(self, static: dict[str, Any], *, version: int, count: int, first_ms: int, last_ms: int, state: str,
               evidence: list[tuple[str, str]], ts_ms: int | None = None) -> dict[str, Any]:
        return {
            "v": ALERT_VERSION, "type": "alert", "id": static["id"], "rule": static["rule"],
            "severity": static["severity"], "branch": static["branch"], "principal": static.get("principal"),
            "scope": static["scope"], "count": count, "threshold": int(static["threshold"]),
            "counts": {k: int(v) for k, v in (static.get("counts") or {}).items()},
            "window_start_ms": int(static["window_start_ms"]), "window_end_ms": int(static["window_end_ms"]),
            "first_seen_ms": first_ms, "last_seen_ms": last_ms,
            "state": "resolved" if state == "resolved" else ("updated" if version > 1 else "open"),
            "version": version,
            "evidence": [{"kind": k, "ref": r} for k, r in evidence],
            "summary": static["summary"], "suggested_action": static["suggested_action"],
            "ts_ms": int(time.time() * 1000) if ts_ms is None else ts_ms,
        }

    def encode(self, record: dict[str, Any]) -> bytes:
        return self.codec.encode(record)


def read_anomaly(value: bytes) -> dict[str, Any]:
    """An alert (Avro) or one of the sanitizer's JSON anomalies, as a dict (for `guard alerts tail`)."""
    if value[:1] == b"{":
        import orjson

        doc = dict(orjson.loads(value))
        doc.setdefault("state", "open")
        doc.setdefault("summary", doc.get("what") or doc.get("rule"))
        doc.setdefault("last_seen_ms", doc.get("at_ms"))
        return doc
    return decode(value)


def render_line(alert: dict[str, Any]) -> str:
    """One readable terminal line: time, severity, state, rule, branch, principal, count, summary, id."""
    ts = alert.get("last_seen_ms") or alert.get("ts_ms") or 0
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(int(ts) / 1000)) + "Z"
    sev = str(alert.get("severity") or "?").upper()
    parts = [when, f"{sev:<8}", f"{alert.get('state', 'open'):<8}", str(alert.get("rule")),
             f"branch={alert.get('branch')}"]
    if alert.get("principal"):
        parts.append(f"principal={alert['principal']}")
    if alert.get("count") is not None and alert.get("threshold") is not None:
        parts.append(f"count={alert['count']}/{alert['threshold']}")
    parts.append(str(alert.get("summary") or ""))
    if alert.get("id"):
        parts.append(f"[{str(alert['id'])[:12]}]")
    line = "  ".join(parts)
    if alert.get("suggested_action"):
        line += f"\n    → {alert['suggested_action']}"
    return line
