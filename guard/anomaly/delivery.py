"""Delivery of critical alerts to a webhook (the on-call pager), with retries.

The POST body is the alert record as JSON; the `Idempotency-Key` header is `{id}:{version}`, so a
receiver that sees a retry or a replay of the same version drops it. Retries: tenacity, exponential
back-off from 0.5 s up to 8 s, at most `attempts` tries, on connection errors, time-outs, 429 and 5xx;
a 4xx other than 429 is not retried (the receiver refuses this request as it is).

`deliver` is one attempt's burst of retries; `Pager` makes a page survive longer outages, refusals and
crashes: a written critical version is queued in Redis (`AnomalyState.queue_page`) before anything is
sent, and stays queued until the webhook accepted it, retried with back-off (any failure, 4xx included: a
refusal is often a rotated credential or a moved endpoint, fixed later, and the page must still arrive).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import httpx
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential

from guard.anomaly.rules import RuleConfig
from guard.anomaly.state import AnomalyState

log = logging.getLogger("branchguard.analyzer")


class WebhookError(Exception):
    """The webhook did not accept the alert after every retry (or refused it)."""


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code == 429 or exc.response.status_code >= 500
    return isinstance(exc, httpx.TransportError)


def deliver(url: str, alert: dict[str, Any], *, attempts: int = 5, timeout_s: float = 5.0,
            wait_max_s: float = 8.0) -> int:
    """POST `alert` to `url`; returns the number of attempts it took. Raises WebhookError when it gave up."""
    tries = 0

    @retry(stop=stop_after_attempt(attempts), wait=wait_exponential(multiplier=0.5, max=wait_max_s),
           retry=retry_if_exception(_retryable), reraise=True)
    def post() -> None:
        nonlocal tries
        tries += 1
        response = httpx.post(url, json=alert, timeout=timeout_s,
                              headers={"Idempotency-Key": f"{alert['id']}:{alert['version']}"})
        response.raise_for_status()

    try:
        post()
    except (httpx.HTTPError, httpx.HTTPStatusError) as exc:
        raise WebhookError(f"webhook refused alert {alert['id']} after {tries} attempt(s): "
                           f"{type(exc).__name__}") from None
    return tries


class Pager:
    """Delivers queued critical alerts until the webhook accepts them (at least once; the receiver drops a
    repeated `Idempotency-Key`).

    Each attempt first claims the page in Redis for `lease_s` (longer than one `deliver` burst), so two
    workers, or a worker's agent and its timer, do not send it at once. After a failure the next attempt is
    `retry_base_s` × 2^(tries-1) later, at most `retry_max_s` (the branch's `[delivery]` settings, defaults
    15 s and 300 s): an outage of hours costs a dozen POSTs an hour, and the page arrives within
    `retry_max_s` of the receiver's recovery.
    """

    def __init__(self, state: AnomalyState, rules: RuleConfig, *, send: Callable[[str, dict[str, Any]], int] = deliver,
                 clock: Callable[[], float] = time.time, lease_s: float = 120.0) -> None:
        self.state = state
        self.rules = rules
        self.send = send
        self.clock = clock
        self.lease_s = lease_s

    def webhook_url(self, branch: str) -> str:
        return str(self.rules.rule(branch, "delivery").get("webhook_url") or "")

    def queue(self, record: dict[str, Any]) -> bool:
        """Queue a critical alert's written version (call it before recording the version as written, so a
        crash in between re-queues it on replay); nothing when its branch has no webhook."""
        if record.get("severity") != "critical" or not self.webhook_url(str(record["branch"])):
            return False
        return self.state.queue_page(str(record["id"]), int(record["version"]), record, self.clock())

    def deliver_due(self, ids: list[str] | None = None) -> list[tuple[str, int]]:
        """Send the pages that are due (only `ids` when given); the (id, version) pairs the webhook accepted."""
        done = []
        for aid, version, record, tries in self.state.claim_pages(self.clock(), self.lease_s, ids=ids):
            cfg = self.rules.rule(str(record["branch"]), "delivery")
            url = str(cfg.get("webhook_url") or "")
            try:
                if not url:
                    raise WebhookError(f"no webhook_url for branch {record['branch']}")
                attempts = self.send(url, record)
            except WebhookError as exc:
                tries += 1
                delay = min(float(cfg.get("retry_base_s", 15)) * 2 ** (tries - 1), float(cfg.get("retry_max_s", 300)))
                self.state.page_failed(aid, tries, str(exc), self.clock() + delay)
                log.error("%s (try %d; next in %.0f s)", exc, tries, delay)
                continue
            self.state.page_delivered(aid, version)
            done.append((aid, version))
            print(f"WEBHOOK {aid} v{version} delivered after {attempts} attempt(s)"
                  f"{f' ({tries} earlier failures)' if tries else ''}", flush=True)
        return done
