"""The on-call status page: open alerts by severity, critical alerts the webhook has not accepted yet, each
branch's pipeline health and lag, transfer state, recent erasures. `guard alerts serve` runs it; `/` is HTML
(refreshes itself), `/api/status` the same as JSON.

Served by the standard library's `ThreadingHTTPServer`, not an ASGI server: the page is read-only, a few
on-call engineers look at it, and every request is a handful of Redis and Kafka admin calls (cached for a
few seconds), so an added dependency would buy nothing. It binds to 127.0.0.1 by default: it shows alert
scopes and subject tokens (never values), which still belong behind the operators' access control.
"""

from __future__ import annotations

import html
import http.server
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from guard.anomaly.alerts import SEVERITIES
from guard.anomaly.state import AnomalyState
from guard.config import Settings
from guard.kafka_security import client_config

#: A sanitizer group whose lag exceeds this many records is shown as lagging.
LAG_WARN = 10_000


@dataclass
class StatusSource:
    """Where the page's figures come from: the analyzers' state and the Kafka cluster."""

    settings: Settings
    state: AnomalyState
    #: Consumer groups whose lag is shown: (label, group id, topic regex prefix).
    groups: list[tuple[str, str, str]]

    def open_alerts(self) -> list[dict[str, Any]]:
        alerts = [a for a in (self.state.alert_state(i) for i in self.state.open_alert_ids())
                  if a is not None and a["state"] != "resolved"]
        rank = {s: n for n, s in enumerate(SEVERITIES)}
        return sorted(alerts, key=lambda a: (rank.get(a["severity"], 9), -int(a["last"])))

    def undelivered(self) -> list[dict[str, Any]]:
        """Critical alerts written to Kafka that the webhook has not accepted yet (the pager may be silent:
        whoever looks at the page must see them, oldest first)."""
        return sorted(self.state.pages(), key=lambda p: int(p["since"]))

    def pipeline(self) -> list[dict[str, Any]]:
        """Per group: committed offsets against the end of its topics (lag), and a health word."""
        s = self.settings
        consumer = Consumer(client_config(s, **{"group.id": f"oncall-status-{uuid.uuid4().hex[:8]}",
                                                "enable.auto.commit": False}))
        admin = AdminClient(client_config(s))
        rows = []
        try:
            topics = consumer.list_topics(timeout=10).topics
            for label, group, prefix in self.groups:
                parts = [TopicPartition(t, p) for t, meta in topics.items() if t.startswith(prefix)
                         and meta.error is None for p in meta.partitions]
                committed = _committed(admin, group, parts)
                lag, known = 0, 0
                for tp in parts:
                    high = consumer.get_watermark_offsets(tp, timeout=5)[1]
                    done = committed.get((tp.topic, tp.partition))
                    if done is not None and done >= 0:
                        known += 1
                        lag += max(0, high - done)
                health = "no commits yet" if not known else ("lagging" if lag > LAG_WARN else "ok")
                rows.append({"branch": s.branch, "stage": label, "group": group, "partitions": len(parts),
                             "lag": lag if known else None, "health": health})
        finally:
            consumer.close()
        return rows

    def erasures(self, limit: int = 10) -> list[dict[str, Any]]:
        """The latest deletion confirmations (subject tokens, outcome, trigger; never a value)."""
        s = self.settings
        consumer = Consumer(client_config(s, **{"group.id": f"oncall-status-{uuid.uuid4().hex[:8]}",
                                                "enable.auto.commit": False}))
        out: list[dict[str, Any]] = []
        try:
            meta = consumer.list_topics(timeout=10).topics.get(s.deletions_topic)
            if meta is None or meta.error is not None:
                return []
            assign = []
            for p in meta.partitions:
                low, high = consumer.get_watermark_offsets(TopicPartition(s.deletions_topic, p), timeout=5)
                if high > low:
                    assign.append(TopicPartition(s.deletions_topic, p, max(low, high - limit)))
            if not assign:
                return []
            consumer.assign(assign)
            deadline = time.monotonic() + 5
            want = sum(1 for _ in assign)
            while time.monotonic() < deadline:
                msgs = consumer.consume(500, 0.5)
                for m in msgs:
                    value = m.value()
                    if m.error() or not value:
                        continue
                    doc = orjson.loads(value)
                    out.append({"at_ms": doc.get("at_ms"), "branch": doc.get("branch"), "subject": doc.get("subject"),
                                "outcome": doc.get("outcome"), "trigger": doc.get("trigger"),
                                "reason_code": doc.get("reason_code")})
                if not msgs and want:
                    break
        finally:
            consumer.close()
        return sorted(out, key=lambda d: -int(d.get("at_ms") or 0))[:limit]

    def snapshot(self) -> dict[str, Any]:
        alerts = self.open_alerts()
        by_severity = {s: sum(1 for a in alerts if a["severity"] == s) for s in SEVERITIES}
        return {"generated_ms": int(time.time() * 1000), "open_by_severity": by_severity, "alerts": alerts,
                "undelivered": self.undelivered(), "pipeline": self.pipeline(),
                "transfers": self.state.entities("transfer"), "erasures": self.erasures()}


def _committed(admin: AdminClient, group: str, parts: list[TopicPartition]) -> dict[tuple[str, int], int]:
    from confluent_kafka import ConsumerGroupTopicPartitions

    if not parts:
        return {}
    try:
        futures = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group, parts)])
        result = next(iter(futures.values())).result(timeout=10)
    except Exception:  # noqa: BLE001 - an unknown group or a broker error: "no commits yet"
        return {}
    return {(tp.topic, tp.partition): tp.offset for tp in result.topic_partitions}


def _fmt_ms(ms: Any) -> str:
    if not ms:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(int(ms) / 1000)) + "Z"


def render_html(snap: dict[str, Any]) -> str:
    """The page (escaped throughout; alert texts never hold values, but names come from facts)."""
    e = html.escape
    counts = " ".join(f'<span class="pill {s}">{s}: {n}</span>' for s, n in snap["open_by_severity"].items())
    alert_rows = "".join(
        f'<tr class="{e(a["severity"])}"><td>{e(a["severity"])}</td><td>{e(a["rule"])}</td><td>{e(a["branch"])}</td>'
        f'<td>{e(str(a.get("principal") or "-"))}</td><td>{a["count"]}/{a["threshold"]}</td>'
        f'<td>{e(a["summary"])}</td><td>{e(a["suggested_action"])}</td><td>{_fmt_ms(a["last"])}</td>'
        f'<td><code>{e(a["id"][:12])}</code></td></tr>' for a in snap["alerts"]) or \
        '<tr><td colspan="9">no open alerts</td></tr>'
    undelivered = snap.get("undelivered") or []
    page_rows = "".join(
        f'<tr class="critical"><td>{e(str(p["severity"]))}</td><td>{e(str(p["rule"]))}</td><td>{e(str(p["branch"]))}'
        f'</td><td>{e(str(p["summary"]))}</td><td>{p["version"]}</td><td>{_fmt_ms(int(p["since"]) * 1000)}</td>'
        f'<td>{p["tries"]}</td><td>{e(str(p["error"]) or "-")}</td><td>{_fmt_ms(int(p["next_at"] * 1000))}</td>'
        f'<td><code>{e(p["id"][:12])}</code></td></tr>' for p in undelivered)
    page_section = "" if not undelivered else f"""<h2 class="undelivered">Critical alerts NOT delivered to the pager
 ({len(undelivered)}): call on-call yourself</h2>
<table id="undelivered"><tr><th>severity</th><th>rule</th><th>branch</th><th>what</th><th>version</th><th>since</th>
<th>failed tries</th><th>last error</th><th>next try</th><th>id</th></tr>{page_rows}</table>"""
    pipe_rows = "".join(
        f'<tr><td>{e(p["branch"])}</td><td>{e(p["stage"])}</td><td>{e(p["group"])}</td><td>{p["partitions"]}</td>'
        f'<td>{"-" if p["lag"] is None else p["lag"]}</td><td class="h-{e(p["health"].split()[0])}">'
        f'{e(p["health"])}</td></tr>' for p in snap["pipeline"])
    transfer_rows = "".join(
        f'<tr><td>{e(b)}</td><td>{e(str(t.get("from_owner")))}</td><td>{e(str(t.get("to_owner")))}</td>'
        f'<td>{_fmt_ms(t.get("cutoff_ms"))}</td><td>{e(str(t.get("state") or "-"))}</td></tr>'
        for b, t in snap["transfers"].items()) or '<tr><td colspan="5">no transfer recorded</td></tr>'
    erasure_rows = "".join(
        f'<tr><td>{_fmt_ms(d["at_ms"])}</td><td>{e(str(d["branch"]))}</td><td><code>{e(str(d["subject"]))}</code>'
        f'</td><td>{e(str(d["outcome"]))}</td><td>{e(str(d["trigger"]))}</td><td>{e(str(d["reason_code"]))}</td></tr>'
        for d in snap["erasures"]) or '<tr><td colspan="6">no erasure yet</td></tr>'
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="10">
<title>BranchGuard on-call status</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; width: 100%; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; font-size: 14px; vertical-align: top; }}
th {{ background: #eee; }}
.pill {{ padding: 3px 10px; border-radius: 10px; margin-right: 6px; background: #ddd; }}
.pill.critical, tr.critical td:first-child {{ background: #c62828; color: white; }}
.pill.high, tr.high td:first-child {{ background: #ef6c00; color: white; }}
.pill.medium, tr.medium td:first-child {{ background: #f9a825; }}
h2.undelivered {{ color: #c62828; }}
.h-ok {{ color: #2e7d32; }} .h-lagging {{ color: #c62828; font-weight: bold; }}
</style></head><body>
<h1>BranchGuard on-call status</h1>
<p>Generated {_fmt_ms(snap["generated_ms"])}. Open alerts: {counts}</p>
{page_section}
<h2>Open alerts</h2>
<table id="alerts"><tr><th>severity</th><th>rule</th><th>branch</th><th>principal</th><th>count/threshold</th>
<th>what</th><th>what to do</th><th>last seen</th><th>id</th></tr>{alert_rows}</table>
<h2>Pipeline health and lag</h2>
<table id="pipeline"><tr><th>branch</th><th>stage</th><th>consumer group</th><th>partitions</th><th>lag (records)</th>
<th>health</th></tr>{pipe_rows}</table>
<h2>Branch transfers</h2>
<table id="transfers"><tr><th>branch</th><th>from</th><th>to</th><th>cut-off</th><th>state</th></tr>
{transfer_rows}</table>
<h2>Recent erasures</h2>
<table id="erasures"><tr><th>at</th><th>branch</th><th>subject token</th><th>outcome</th><th>trigger</th>
<th>reason</th></tr>{erasure_rows}</table>
</body></html>"""


class StatusServer:
    """The page on a `ThreadingHTTPServer` in a background thread (`serve_forever` for the command)."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]], host: str = "127.0.0.1", port: int = 0,
                 cache_s: float = 3.0) -> None:
        cache: dict[str, Any] = {"at": 0.0, "snap": None}
        lock = threading.Lock()

        def current() -> dict[str, Any]:
            with lock:
                if cache["snap"] is None or time.monotonic() - cache["at"] > cache_s:
                    cache["snap"], cache["at"] = snapshot(), time.monotonic()
                return dict(cache["snap"])

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path.split("?")[0] == "/api/status":
                    body, kind = orjson.dumps(current()), "application/json"
                elif self.path.split("?")[0] == "/":
                    body, kind = render_html(current()).encode(), "text/html; charset=utf-8"
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer((host, port), Handler)
        self.port = int(self.httpd.server_address[1])
        self._thread: threading.Thread | None = None

    def start(self) -> StatusServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
