"""The reveal service's pieces that need no stack: the token key file, token and principal formats, the
request-body limit (declared or streamed), and the OpenAPI bounds the API declares."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from guard.errors import ConfigError
from guard.reveal.app import MAX_FIELDS, MAX_RECORDS, MAX_VALUES, BodyLimit, RevealIn, SearchIn
from guard.reveal.tokens import _TOKEN_RE, PRINCIPAL_RE, load_token_key


def test_token_key_file_is_created_0600_and_refused_when_others_can_read_it(tmp_path: Path) -> None:
    path = tmp_path / "k" / "reveal-token.key"
    with pytest.raises(ConfigError, match="no reveal token key"):
        load_token_key(path)
    key = load_token_key(path, create=True)
    assert len(key) == 32 and oct(path.stat().st_mode & 0o777) == "0o600"
    assert load_token_key(path) == key  # created once, then read
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="readable by other users"):
        load_token_key(path)
    os.chmod(path, 0o600)
    path.write_text(base64.b64encode(b"short").decode())
    with pytest.raises(ConfigError, match="32 bytes"):
        load_token_key(path)


def test_principals_are_cedar_entity_references() -> None:
    for good in ("Staff::m0101", "Service::crm", "Staff::t0101-01", "Staff::a.b@c"):
        assert PRINCIPAL_RE.match(good), good
    for bad in ("m0101", "Staff::", 'Staff::"m0101"', "staff::m0101", "Staff::a b", "Staff::" + "x" * 65):
        assert not PRINCIPAL_RE.match(bad), bad
    assert _TOKEN_RE.match("bgr_0123abcd_" + "A" * 43)
    assert not _TOKEN_RE.match("bgr_0123abcd_" + "A" * 42) and not _TOKEN_RE.match("Bearer x")


def _echo_app(limit: int) -> TestClient:
    async def echo(request: Request) -> JSONResponse:
        return JSONResponse({"bytes": len(await request.body())})

    app = Starlette(routes=[Route("/", echo, methods=["POST"])])
    return TestClient(BodyLimit(app, max_bytes=limit))  # type: ignore[arg-type]


def test_body_limit_refuses_declared_and_streamed_bodies_over_the_limit() -> None:
    client = _echo_app(100)
    assert client.post("/", content=b"x" * 100).json() == {"bytes": 100}
    declared = client.post("/", content=b"x" * 101)
    assert declared.status_code == 413 and declared.json()["error"] == "too_large"

    def chunks():  # no Content-Length: the limit counts what arrives
        for _ in range(5):
            yield b"Q" * 30

    streamed = client.post("/", content=chunks())
    assert streamed.status_code == 413 and b"Q" not in streamed.content


def test_request_models_bound_the_work_of_a_call() -> None:
    """The bounds are in the models, so the OpenAPI document states them and FastAPI enforces them."""
    records = RevealIn.model_json_schema()["properties"]["records"]
    assert records["maxItems"] == MAX_RECORDS
    ref = RevealIn.model_json_schema()["$defs"]["RecordRefIn"]["properties"]["fields"]
    assert ref["maxItems"] == MAX_FIELDS
    assert SearchIn.model_json_schema()["properties"]["values"]["maxItems"] == MAX_VALUES


def test_a_principal_that_may_not_read_the_topic_is_named_at_once_not_after_a_timeout() -> None:
    """Found by issue 14's acceptance scenario: served as the guard's principal (the docs' quick start said
    `guard reveal serve` with `guard stack env`'s settings), every reveal waited 10 s and answered
    `kafka_unavailable`, because the fetch loop skipped the broker's authorization error."""
    import time as _time

    from confluent_kafka import KafkaError

    from guard.reveal.kafka_io import RecordFetcher, RecordNotAuthorizedError

    class Msg:
        def error(self) -> KafkaError:
            return KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED)

        def topic(self) -> str:
            return "sanitized.br0101.public.customers"

    class Consumer:
        def poll(self, _timeout: float) -> Msg:
            return Msg()

    fetcher = RecordFetcher.__new__(RecordFetcher)
    fetcher._consumer = Consumer()  # type: ignore[assignment]
    fetcher._timeout_s = 10.0
    fetcher.principal = "guard"
    started = _time.monotonic()
    with pytest.raises(RecordNotAuthorizedError, match="guard may not read sanitized.br0101.public.customers"):
        fetcher._read(0)
    assert _time.monotonic() - started < 1.0
