"""Pages of critical alerts against the real Redis of the stack and a real local webhook: a page survives a
receiver that fails for a long time (5xx, then a refusal) and a worker restart, and arrives once, with the
Idempotency-Key of the version written to Kafka. Time is the analyzer's injected clock, never the wall clock.
"""

from __future__ import annotations

import http.server
import json
import threading
import tomllib
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from guard.anomaly.delivery import Pager, deliver
from guard.anomaly.engine import Analyzer
from guard.anomaly.facts import Fact
from guard.anomaly.rules import RuleConfig, default_rules_path
from guard.anomaly.state import AnomalyState
from guard.anomaly.status import StatusSource, render_html
from guard.keys.store import RedisKeyStore
from tests.integration.kafka_helpers import admin_redis_env

pytestmark = pytest.mark.integration

T0 = 1_795_000_000_000  # a fact time; windows and back-off use the injected clock below


class Hook(http.server.BaseHTTPRequestHandler):
    """Answers each POST with the next status of `statuses` (the last one repeats) and records it."""

    statuses: list[int] = []
    posts: list[tuple[int, str, dict[str, Any]]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        cls = type(self)
        status = cls.statuses.pop(0) if len(cls.statuses) > 1 else cls.statuses[0]
        cls.posts.append((status, self.headers["Idempotency-Key"], body))
        self.send_response(status)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture()
def hook() -> Iterator[str]:
    Hook.statuses, Hook.posts = [503], []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    finally:
        server.shutdown()
        server.server_close()


def test_a_page_is_retried_until_the_webhook_takes_it_once(stack: dict[str, str], hook: str) -> None:
    env = {**stack, **admin_redis_env(stack)}
    store = RedisKeyStore(env["GUARD_REDIS_URL"], "demo-bank", password_file=env["GUARD_REDIS_PASSWORD_FILE"])
    state = AnomalyState(store.client, f"t{uuid.uuid4().hex[:10]}")
    rules = RuleConfig(tomllib.loads(default_rules_path().read_text() + f'\n[branches."0101".delivery]\n'
                                     f'webhook_url = "{hook}"\n'))
    clock = [T0 / 1000]
    a = Analyzer(state, rules, clock=lambda: clock[0])

    def once(url: str, alert: dict[str, Any]) -> int:  # one POST per attempt: no tenacity sleeps in the test
        return deliver(url, alert, attempts=1)

    pager = Pager(state, rules, send=once, clock=lambda: clock[0])
    cutoff = T0 + 60_000
    for f in (Fact("principal", "reg:old", T0, "0101", principal="old-teller",
                   attrs={"state": "active", "owner": "bank-old"}),
              Fact("transfer", "transfer:0101", T0, "0101",
                   attrs={"from_owner": "bank-old", "to_owner": "bank-a", "cutoff_ms": cutoff})):
        a.process(f)
    [emit] = [e for e in a.process(Fact("access", "late-1", cutoff + 1000, "0101", principal="old-teller",
                                        action="reveal", categories={"contact": 1}))
              if e.record["rule"] == "access_after_transfer_cutoff"]
    assert emit.severity == "critical"
    # what streams/analyzer.py does once Kafka acknowledged the alert: queue the page, mark written, try once
    assert pager.queue(emit.record)
    a.emitted(emit)
    assert not pager.deliver_due([emit.id]), "503: not delivered"
    assert [p["id"] for p in StatusSource(None, state, []).undelivered()] == [emit.id]  # type: ignore[arg-type]
    # the worker restarts (a new pager); the receiver stays down well past the old 5 tries, then refuses (400)
    pager = Pager(state, rules, send=once, clock=lambda: clock[0])
    Hook.statuses = [503] * 8 + [400, 200]
    for _ in range(9):
        clock[0] += 3600
        assert not pager.deliver_due()
    [page] = state.pages()
    assert page["tries"] == 10 and "HTTPStatusError" in page["error"]
    snap = {"generated_ms": T0, "open_by_severity": {}, "alerts": [], "undelivered": state.pages(), "pipeline": [],
            "transfers": {}, "erasures": []}
    assert 'id="undelivered"' in render_html(snap) and emit.id[:12] in render_html(snap)
    assert not pager.deliver_due(), "the next try is not due yet"
    clock[0] += 3600  # the receiver recovered
    assert pager.deliver_due() == [(emit.id, 1)]
    for _ in range(3):
        clock[0] += 86_400
        assert not pager.deliver_due()
    accepted = [(key, body) for status, key, body in Hook.posts if status == 200]
    assert accepted == [(f"{emit.id}:1", json.loads(json.dumps(emit.record)))], "exactly once, the written version"
    assert {key for _, key, _ in Hook.posts} == {f"{emit.id}:1"}, "every try had the same Idempotency-Key"
    assert len(Hook.posts) == 11  # the first try, 9 failed retries (the last a 400), the accepted one
    assert not state.pages()
    st = state.alert_state(emit.id)
    assert st is not None and st["delivered"] == 1 == st["emitted"]
