"""The reveal service's HTTP API (FastAPI on uvicorn): routes, request bounds, errors that echo no value.

Routes (the OpenAPI document is served at `/openapi.json`):

* `POST /v1/reveal`: named fields of sanitized records, for a stated purpose;
* `POST /v1/search`: blind-index tokens of values of a searchable column;
* `GET /healthz`: liveness, no authentication, no data.

Every call to `/v1/*` needs `Authorization: Bearer <token>`; a missing or unknown token is refused (401)
and audited, whatever the body (the token is checked before the body is parsed). Every answer carries
`X-Request-Id`, the audit records' `trace_id`. Request bounds: at most `MAX_RECORDS` records per reveal,
`MAX_FIELDS` fields per record, `MAX_VALUES` values per search (integers of at most 64 bits), and a body of
at most `reveal_max_body_bytes` (413 before it is parsed).
Errors say what was wrong (which part of the request, which code) and never repeat what was sent: the
validation handler keeps only the location (known field names and list positions) and the error type.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations at run time, and the
# dependency `principal` is local to `create_app`.
import logging
import uuid
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from guard.errors import KeyUnavailableError
from guard.reveal.kafka_io import AuditUnavailableError
from guard.reveal.service import RecordRef, Refused, RevealService
from guard.reveal.tokens import TokenInfo

log = logging.getLogger("guard.reveal")

MAX_RECORDS = 100
MAX_FIELDS = 32
MAX_VALUES = 100
_NAME = r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$"
_PURPOSE = r"^[a-z][a-z0-9_]{0,62}$"
_TABLE = r"^[A-Za-z_][A-Za-z0-9_$]{0,62}\.[A-Za-z_][A-Za-z0-9_$]{0,62}$"

FieldName = Annotated[str, Field(pattern=_NAME, description="A column of the record's table.")]
Purpose = Annotated[str, Field(pattern=_PURPOSE, description="Why the fields are needed (e.g. `kyc_review`); "
                                                             "the policy decides which purposes allow what.")]


#: An integer search value: a database column's integer is at most 64 bits, signed or unsigned, and the blind
#: index is computed over its JSON, which can't encode more: a larger one is refused here (422), not after
#: it counted against the rate limit.
SearchInt = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RecordRefIn(_Strict):
    """A committed sanitized record, by its position in Kafka, and the fields wanted from one image."""

    topic: str = Field(min_length=1, max_length=249, description="A sanitized topic (`sanitized.<raw topic>`).")
    partition: int = Field(ge=0, le=100_000)
    offset: int = Field(ge=0, le=2**63 - 1)
    image: Literal["after", "before"] = "after"
    fields: list[FieldName] = Field(min_length=1, max_length=MAX_FIELDS)


class RevealIn(_Strict):
    purpose: Purpose
    records: list[RecordRefIn] = Field(min_length=1, max_length=MAX_RECORDS,
                                       description="Each record counts once against the rate limit.")


class RecordOut(BaseModel):
    topic: str
    partition: int
    offset: int
    image: str
    decision: Literal["allowed", "partial", "denied", "not_found", "error"]
    fields: dict[str, Any] = Field(description="The allowed fields asked, in plaintext (absent when refused).")
    refused: dict[str, str] = Field(description="Field → why it was not given: policy, unclassified, "
                                                "not_carried, erased, restricted, …")
    policies: list[str] = Field(description="The policies (their @id) that decided.")
    reason: str | None = Field(None, description="Why the record as a whole was not served.")


class RevealOut(BaseModel):
    request_id: str
    results: list[RecordOut]


class SearchIn(_Strict):
    purpose: Purpose
    table: str = Field(pattern=_TABLE, description="`schema.table` of the catalog, e.g. `public.customers`.")
    column: FieldName
    values: list[Annotated[str, Field(max_length=1024)] | SearchInt] = Field(min_length=1, max_length=MAX_VALUES)


class SearchOut(BaseModel):
    request_id: str
    column: str
    tokens: list[str] = Field(description="The blind-index token of each value, in order: compare with the "
                                          "`index` entries of sanitized images.")
    policies: list[str]


class ErrorOut(BaseModel):
    error: str
    detail: str
    request_id: str | None = None
    policies: list[str] | None = None


_bearer = HTTPBearer(auto_error=False, description="A reveal token (`guard reveal token create`).")
_KNOWN_LOC = set(RecordRefIn.model_fields) | set(RevealIn.model_fields) | set(SearchIn.model_fields) | {"body"}


def create_app(service: RevealService, *, max_body_bytes: int = 65_536) -> FastAPI:
    """The ASGI application around one `RevealService`."""
    app = FastAPI(title="BranchGuard reveal service", version="1",
                  description="The only path from a sanitized record to plaintext: authenticated, decided by the "
                              "access policy, rate-limited and audited on `guard.audit`.",
                  docs_url=None, redoc_url=None)

    def request_id(request: Request) -> str:
        rid: str = getattr(request.state, "request_id", None) or uuid.uuid4().hex
        request.state.request_id = rid
        return rid

    def authenticate(request: Request) -> TokenInfo:
        """The principal of the request's bearer token; a missing or unknown token is audited and refused."""
        rid = request_id(request)
        scheme, token = get_authorization_scheme_param(request.headers.get("Authorization"))
        token = token if scheme.lower() == "bearer" else ""  # as HTTPBearer reads it
        try:
            info = service.authenticate(token or None)
        except KeyUnavailableError:
            raise _Problem(503, "key_store_unavailable", "tokens can't be checked: the key store does not answer",
                           rid, headers={"Retry-After": "5"}) from None
        if info is None:
            action = "search" if request.url.path.endswith("/search") else "reveal"
            client = request.client.host if request.client else None
            try:
                service.audit_unauthenticated(action, "unknown_token" if token else "no_token", rid, client)
            except AuditUnavailableError:
                raise _Problem(503, "audit_unavailable", "the audit trail can't be written", rid,
                               headers={"Retry-After": "5"}) from None
            raise _Problem(401, "unauthenticated", "a valid bearer token is required", rid,
                           headers={"WWW-Authenticate": "Bearer"})
        return info

    def principal(request: Request,
                  creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> TokenInfo:
        """The principal `Authenticate` found before the body was read (`_bearer` states the scheme in OpenAPI)."""
        info = getattr(request.state, "principal", None)
        return info if isinstance(info, TokenInfo) else authenticate(request)

    @app.post("/v1/reveal", response_model=RevealOut, responses={
        401: {"model": ErrorOut}, 403: {"model": RevealOut}, 404: {"model": RevealOut}, 413: {"model": ErrorOut},
        422: {"model": ErrorOut}, 429: {"model": ErrorOut}, 503: {"model": ErrorOut}})
    def reveal(body: RevealIn, request: Request, who: Annotated[TokenInfo, Depends(principal)]) -> JSONResponse:
        """Named fields of sanitized records in plaintext, where the policy allows them for the purpose.

        Answers 200 when at least one field was given, 403 when every record was refused, 404 when none
        was found; each record's `decision` and `refused` say what happened to it.
        """
        rid = request_id(request)
        refs = [RecordRef(r.topic, r.partition, r.offset, tuple(dict.fromkeys(r.fields)), r.image)
                for r in body.records]
        results = _call(service.reveal, rid, who.principal, body.purpose, refs, rid)
        out = RevealOut(request_id=rid, results=[RecordOut(
            **res.ref.where(), decision=res.decision, fields=res.values, refused=res.refused,
            policies=res.policies, reason=res.reason) for res in results])
        decisions = {res.decision for res in results}
        status = (200 if any(res.values for res in results) else 404 if decisions == {"not_found"}
                  else 503 if decisions == {"error"} else 403)
        return JSONResponse(out.model_dump(), status_code=status, headers={"X-Request-Id": rid})

    @app.post("/v1/search", response_model=SearchOut, responses={
        401: {"model": ErrorOut}, 403: {"model": ErrorOut}, 413: {"model": ErrorOut}, 422: {"model": ErrorOut},
        429: {"model": ErrorOut}, 503: {"model": ErrorOut}})
    def search(body: SearchIn, request: Request, who: Annotated[TokenInfo, Depends(principal)]) -> JSONResponse:
        """The blind-index token of each value: find records by identifier without any index key leaving
        the guard. Each value counts once against the rate limit."""
        rid = request_id(request)
        result = _call(service.search, rid, who.principal, body.purpose, body.table, body.column, body.values, rid)
        if result.decision != "allowed":
            raise _Problem(403, "denied", f"search refused: {result.reason}", rid, policies=result.policies)
        out = SearchOut(request_id=rid, column=body.column, tokens=[t for t in result.tokens if t is not None],
                        policies=result.policies)
        return JSONResponse(out.model_dump(), headers={"X-Request-Id": rid})

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """Liveness: the process answers (no authentication, no data)."""
        return {"status": "ok"}

    @app.exception_handler(_Problem)
    def problem(request: Request, exc: _Problem) -> JSONResponse:
        return exc.answer()

    @app.exception_handler(RequestValidationError)
    def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors()[:20]:
            loc = [p for p in err.get("loc", ()) if isinstance(p, int) or p in _KNOWN_LOC]
            problems.append(".".join(str(p) for p in loc) + f": {err.get('type', 'invalid')}")
        return JSONResponse({"error": "invalid_request", "detail": "; ".join(problems) or "invalid request",
                             "request_id": request_id(request)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": "http_error", "detail": f"HTTP {exc.status_code}"},
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    def internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("reveal request failed: %s", type(exc).__name__)  # never the message: it could hold a value
        # Answered outside the middleware that stamps request ids (Starlette's outermost layer): stamp it here.
        rid = request_id(request)
        return JSONResponse({"error": "internal", "detail": "internal error (logged by type)", "request_id": rid},
                            status_code=500, headers={"X-Request-Id": rid})

    # Outermost last: a request id first (every answer carries it), then the body limit (413 before anything
    # else), then the token, checked before the body is parsed.
    app.add_middleware(Authenticate, check=authenticate)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(RequestIds)
    return app


class _Problem(Exception):  # noqa: N818 - an HTTP answer, raised to leave a dependency
    def __init__(self, status: int, code: str, detail: str, request_id: str | None, *,
                 headers: dict[str, str] | None = None, policies: list[str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.request_id = status, code, detail, request_id
        self.headers = headers or {}
        self.policies = policies

    def answer(self) -> JSONResponse:
        body = ErrorOut(error=self.code, detail=self.detail, request_id=self.request_id, policies=self.policies)
        headers = {**self.headers, **({"X-Request-Id": self.request_id} if self.request_id else {})}
        return JSONResponse(body.model_dump(exclude_none=True), status_code=self.status, headers=headers)


def _call(fn: Any, rid: str, *args: Any) -> Any:
    """Run a service call, turning its refusals and outages into answers that name no value."""
    try:
        return fn(*args)
    except Refused as exc:
        headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s else None
        raise _Problem(exc.status, exc.code, exc.detail, rid, headers=headers) from None
    except AuditUnavailableError:
        raise _Problem(503, "audit_unavailable", "the audit trail can't be written: nothing is revealed", rid,
                       headers={"Retry-After": "5"}) from None
    except KeyUnavailableError:
        raise _Problem(503, "key_store_unavailable", "the key store does not answer", rid,
                       headers={"Retry-After": "5"}) from None


class RequestIds:
    """Gives every request its id (the audit records' `trace_id`) and every answer an `X-Request-Id` with it,
    those no route wrote (the body limit's 413, validation's 422, 404, 405) included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = scope.setdefault("state", {}).setdefault("request_id", uuid.uuid4().hex)

        async def stamped(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                if not any(name.lower() == b"x-request-id" for name, _ in headers):
                    message = {**message, "headers": [*headers, (b"x-request-id", rid.encode())]}
            await send(message)

        await self.app(scope, receive, stamped)


class Authenticate:
    """Checks the bearer token of a `/v1/` call before the application reads its body.

    FastAPI parses a route's JSON body before it runs the route's dependencies, so with the token checked in
    a dependency a call without a valid token but with malformed JSON was answered 422 and never audited.
    Here a missing or unknown token is audited and answered 401 whatever the body; the principal found is
    handed to the route on `request.state`. The check talks to Redis and Kafka: it runs in a worker thread.
    """

    def __init__(self, app: ASGIApp, check: Callable[[Request], TokenInfo]) -> None:
        self.app = app
        self.check = check

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            request = Request(scope)
            try:
                request.state.principal = await run_in_threadpool(self.check, request)
            except _Problem as exc:
                await exc.answer()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuses request bodies over `max_bytes` (413) before the application sees them, declared or not.

    The body is read here first (at most `max_bytes`, which is small) and handed on in one piece, so the
    application is never called with a body that turns out too large halfway.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._too_large(send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client went away: let the application see it
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._too_large(send)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return message
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send) -> None:
        body = b'{"error":"too_large","detail":"request body over the limit"}'
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
