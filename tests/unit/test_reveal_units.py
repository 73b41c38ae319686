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
