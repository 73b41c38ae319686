"""Delivery of critical alerts to a webhook (the on-call pager), with retries.

The POST body is the alert record as JSON; the `Idempotency-Key` header is `{id}:{version}`, so a
receiver that sees a retry or a replay of the same version drops it. Retries: tenacity, exponential
back-off from 0.5 s up to 8 s, at most `attempts` tries, on connection errors, time-outs, 429 and 5xx;
a 4xx other than 429 is not retried (the receiver refuses this request as it is).
"""

from __future__ import annotations

from typing import Any

import httpx
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential


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
