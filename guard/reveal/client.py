"""A thin Python client of the reveal service (httpx): what a downstream system calls instead of a key.

    with RevealClient("http://127.0.0.1:8443", token) as client:
        out = client.reveal("kyc_review", [Ref("sanitized.br0101.public.customers", 0, 42, ["mobile"])])
        out.results[0]["fields"]["mobile"]
        client.search("customer_service", "public.customers", "mobile", ["13800138000"])  # → tokens

Answers of 401, 413, 422, 429 and 503 raise `RevealError` (with the service's error code, its detail,
the request id and, for 429, `retry_after_s`); a reveal answered 403 or 404 is returned like a 200, since
its per-record decisions say what happened. The token is sent as a bearer token and never logged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass(frozen=True, slots=True)
class Ref:
    """A sanitized record by position, and the fields wanted from one of its images."""

    topic: str
    partition: int
    offset: int
    fields: list[str]
    image: str = "after"

    def as_json(self) -> dict[str, Any]:
        return {"topic": self.topic, "partition": self.partition, "offset": self.offset, "image": self.image,
                "fields": list(self.fields)}


@dataclass(slots=True)
class RevealAnswer:
    status: int
    request_id: str
    results: list[dict[str, Any]] = field(default_factory=list)


class RevealError(Exception):
    """The service refused or failed a call; `code` is its error code (`unauthenticated`, `rate_limited`, …)."""

    def __init__(self, status: int, code: str, detail: str, request_id: str | None,
                 retry_after_s: int | None = None, policies: list[str] | None = None) -> None:
        super().__init__(f"HTTP {status} {code}: {detail}")
        self.status, self.code, self.detail, self.request_id = status, code, detail, request_id
        self.retry_after_s = retry_after_s
        self.policies = policies or []


class RevealClient:
    """Calls one reveal service with one token; thread-safe as httpx.Client is."""

    def __init__(self, base_url: str, token: str, *, timeout_s: float = 30.0, verify: Any = True,
                 cert: Any = None) -> None:
        self._http = httpx.Client(base_url=base_url, timeout=timeout_s, verify=verify, cert=cert,
                                  headers={"Authorization": f"Bearer {token}"})

    def __repr__(self) -> str:
        return f"RevealClient({self._http.base_url!s}, token=<hidden>)"

    def __enter__(self) -> RevealClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def reveal(self, purpose: str, refs: list[Ref]) -> RevealAnswer:
        """The allowed fields of each record (`results[i]["fields"]`) and why others were refused."""
        resp = self._http.post("/v1/reveal", json={"purpose": purpose, "records": [r.as_json() for r in refs]})
        if resp.status_code in (200, 403, 404) and "results" in resp.text:
            doc = resp.json()
            return RevealAnswer(resp.status_code, doc["request_id"], doc["results"])
        raise _error(resp)

    def search(self, purpose: str, table: str, column: str, values: list[str | int]) -> list[str]:
        """The blind-index token of each value (as in sanitized images' `index` entries)."""
        body: dict[str, Any] = {"purpose": purpose, "table": table, "column": column, "values": values}
        resp = self._http.post("/v1/search", json=body)
        if resp.status_code == 200:
            return list(resp.json()["tokens"])
        raise _error(resp)


def _error(resp: httpx.Response) -> RevealError:
    try:
        doc = resp.json()
    except ValueError:
        doc = {}
    retry = resp.headers.get("Retry-After")
    return RevealError(resp.status_code, str(doc.get("error", "http_error")), str(doc.get("detail", "")),
                       doc.get("request_id") or resp.headers.get("X-Request-Id"),
                       int(retry) if retry and retry.isdigit() else None, doc.get("policies"))
