"""The reveal API's order of checks and its answers, around a fake service (no stack), and the service's audit
of a call that fails unexpectedly.

* The token is checked before the body is parsed: FastAPI parses a route's JSON body before it runs the
  route's dependencies, so a call without a token but with malformed JSON was answered 422 and never audited,
  although docs/reveal.md says an unauthenticated malformed call is answered 401 and audited.
* Every answer carries `X-Request-Id` (the audit records' `trace_id`): the body limit's 413, validation's 422
  and the 500 of an unexpected failure had none.
* An integer search value beyond 64 bits passed validation, counted against the rate limit, then failed
  with a 500 and no audit record (the blind index is computed over its JSON, which can't encode it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
import pytest
from starlette.testclient import TestClient

from guard.classify.catalog import Catalog
from guard.config import Settings
from guard.policy import Decision, Request
from guard.records.builders import OutRecord
from guard.records.codec import decode
from guard.reveal.app import create_app
from guard.reveal.ratelimit import RateDecision
from guard.reveal.service import RecordRef, RevealService, SearchResult
from guard.reveal.tokens import TokenInfo

GOOD = "bgr_0123abcd_" + "A" * 43
WHO = TokenInfo("0123abcd", "Staff::m0101", 0, None)
AUTH = {"Authorization": f"Bearer {GOOD}"}
MOBILE = "13800138000"


class FakeService:
    """What the API calls of a `RevealService`: one good token; every unauthenticated call recorded."""

    def __init__(self) -> None:
        self.unauthenticated: list[tuple[str, str, str]] = []
        self.searched: list[Sequence[str | int]] = []
        self.fail: Exception | None = None

    def authenticate(self, token: str | None) -> TokenInfo | None:
        return WHO if token == GOOD else None

    def audit_unauthenticated(self, action: str, reason: str, request_id: str, client: str | None) -> None:
        self.unauthenticated.append((action, reason, request_id))

    def reveal(self, principal: str, purpose: str, refs: Sequence[RecordRef], request_id: str) -> list[Any]:
        if self.fail is not None:
            raise self.fail
        return []

    def search(self, principal: str, purpose: str, table: str, column: str, values: Sequence[str | int],
               request_id: str) -> SearchResult:
        self.searched.append(values)
        return SearchResult("allowed", ["t"] * len(values), [])


@pytest.fixture
def service() -> FakeService:
    return FakeService()


@pytest.fixture
def client(service: FakeService) -> TestClient:
    return TestClient(create_app(service, max_body_bytes=1_000), raise_server_exceptions=False)  # type: ignore[arg-type]


MALFORMED = b'{"purpose": "kyc_review", "records": [' + MOBILE.encode()


@pytest.mark.parametrize("headers, reason", [({}, "no_token"), ({"Authorization": "Bearer bgr_nope"}, "unknown_token")])
def test_an_unauthenticated_call_with_malformed_json_is_refused_401_and_audited(
        client: TestClient, service: FakeService, headers: dict[str, str], reason: str) -> None:
    for path, action in (("/v1/reveal", "reveal"), ("/v1/search", "search")):
        resp = client.post(path, content=MALFORMED, headers={**headers, "Content-Type": "application/json"})
        assert resp.status_code == 401, (path, resp.status_code)
        assert resp.headers["WWW-Authenticate"] == "Bearer" and resp.json()["error"] == "unauthenticated"
        assert service.unauthenticated[-1] == (action, reason, resp.headers["X-Request-Id"])
        assert MOBILE not in resp.text
    assert len(service.unauthenticated) == 2


def test_an_authenticated_malformed_call_is_422_with_its_request_id(client: TestClient, service: FakeService) -> None:
    resp = client.post("/v1/reveal", content=MALFORMED, headers={**AUTH, "Content-Type": "application/json"})
    assert resp.status_code == 422 and resp.json()["error"] == "invalid_request"
    assert resp.headers["X-Request-Id"] == resp.json()["request_id"] and MOBILE not in resp.text
    assert service.unauthenticated == []


def test_every_answer_carries_a_request_id(client: TestClient, service: FakeService) -> None:
    too_large = client.post("/v1/reveal", content=b"x" * 1_001, headers=AUTH)
    assert too_large.status_code == 413 and too_large.headers["X-Request-Id"]
    assert client.get("/nowhere").headers["X-Request-Id"] and client.get("/healthz").headers["X-Request-Id"]
    service.fail = RuntimeError(MOBILE)
    failed = client.post("/v1/reveal", headers=AUTH, json={"purpose": "kyc_review", "records": [
        {"topic": "sanitized.br0101.public.customers", "partition": 0, "offset": 1, "fields": ["mobile"]}]})
    assert failed.status_code == 500 and failed.json()["error"] == "internal" and MOBILE not in failed.text
    assert failed.headers["X-Request-Id"] == failed.json()["request_id"]
    ids = [r.headers["X-Request-Id"] for r in (too_large, failed)]
    assert len(set(ids)) == 2 and all(len(i) == 32 for i in ids)


def test_integer_search_values_are_bounded_to_64_bits(client: TestClient, service: FakeService) -> None:
    def search(values: list[Any]) -> Any:
        return client.post("/v1/search", headers=AUTH, json={"purpose": "customer_service",
                                                             "table": "public.customers", "column": "mobile",
                                                             "values": values})

    for beyond in (10**30, 2**64, -(2**63) - 1):
        resp = search([beyond])
        assert resp.status_code == 422 and "body.values.0: " in resp.json()["detail"], beyond
        assert str(beyond) not in resp.text
    assert service.searched == []  # refused before the service: nothing counted, nothing to audit
    assert search([2**64 - 1, -(2**63), MOBILE]).status_code == 200
    assert service.searched == [[2**64 - 1, -(2**63), MOBILE]]


# --- the service: a call that fails after the rate limit is audited before the error goes on ---------------


class AllowAll:
    def decide_batch(self, requests: Sequence[Request], *, entities: Any = None) -> list[Decision]:
        return [Decision(True, ("test-allows",)) for _ in requests]

    def maybe_reload(self, *, force: bool = False) -> bool:
        return False


class Sink:
    def __init__(self) -> None:
        self.records: list[OutRecord] = []

    def write(self, records: list[OutRecord]) -> None:
        self.records += records

    def decoded(self) -> list[dict[str, Any]]:
        return [decode(r.value) for r in self.records]


class Broken:
    """A fetcher whose read fails with an error nobody expected (a bug, not Kafka being down)."""

    def allowed_topic(self, topic: str) -> bool:
        return True

    def fetch(self, topic: str, partition: int, offset: int) -> Any:
        raise RuntimeError(MOBILE)


class Keys:
    def search_token(self, column: str, value: bytes) -> str:
        return "token-" + column


class Unlimited:
    window_s = 60

    def hit(self, principal: str, cost: int) -> RateDecision:
        return RateDecision(True, cost, 600, 0)


def _service(sink: Sink) -> RevealService:
    return RevealService(Settings(), Keys(), Catalog.load(None), AllowAll(), Broken(), sink,  # type: ignore[arg-type]
                         None, Unlimited(), search_limiter=Unlimited())  # type: ignore[arg-type]


def test_a_search_that_fails_unexpectedly_is_audited_as_an_error_first() -> None:
    sink = Sink()
    with pytest.raises(TypeError):  # orjson can't encode it: what a 65-bit value did behind the API
        _service(sink).search("Staff::m0101", "customer_service", "public.customers", "mobile", [MOBILE, 10**30],
                              "rid-1")
    [audit] = sink.decoded()
    why = orjson.loads(audit["reason"])
    assert audit["op"] == "search" and audit["decision"] == "search_error" and audit["trace_id"] == "rid-1"
    assert why["why"] == "internal" and why["given"] == [] and why["values"] == 2 and why["asked"] == ["mobile"]
    assert audit["actions"] == {"asked": 2, "given": 0}
    assert MOBILE not in orjson.dumps(audit).decode() and "token-" not in orjson.dumps(audit).decode()


def test_a_reveal_that_fails_unexpectedly_is_audited_as_an_error_of_each_record() -> None:
    sink = Sink()
    refs = [RecordRef("sanitized.br0101.public.customers", 0, n, ("mobile", "name")) for n in (1, 2)]
    with pytest.raises(RuntimeError):
        _service(sink).reveal("Staff::m0101", "kyc_review", refs, "rid-2")
    audits = sink.decoded()
    assert [(a["decision"], a["source_offset"], a["trace_id"]) for a in audits] == [
        ("reveal_error", 1, "rid-2"), ("reveal_error", 2, "rid-2")]
    why = orjson.loads(audits[0]["reason"])
    assert why["why"] == "internal" and why["given"] == [] and why["asked"] == ["mobile", "name"]
    assert all(MOBILE not in orjson.dumps(a).decode() for a in audits)
