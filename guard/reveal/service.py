"""The reveal service's decisions: who may see which fields of which record, and the audit of every call.

`RevealService` is the HTTP-free core the API (`guard.reveal.app`) calls:

* `authenticate(token)`: the principal a bearer token belongs to (`tokens.TokenStore`), or None;
* `reveal(principal, purpose, refs)`: for each record reference (a sanitized topic, partition, offset,
  image and field names), read the committed record from Kafka, classify each asked field with the
  catalog (a column the catalog doesn't know is `unclassified` and never revealed), ask the policy engine
  once per field class (action `reveal`, resource the record's data subject in its branch, context time,
  purpose, volume = records in the call, source `reveal-api`, field class and fields), open the sealed
  image only when an allowed field is in it, and return the allowed fields only;
* `search(principal, purpose, table, column, values)`: the blind-index token of each value (action
  `search`), computed with the index key that stays in this process.

Every call, allowed or not, writes audit records (one per record reference or searched column) to
`guard.audit` through `RecordBuilder.audit` and waits for the broker's acknowledgement before anything is
returned: `op` is `reveal` or `search`, `decision` is `reveal_allowed`, `reveal_partial`,
`reveal_denied`, `reveal_not_found`, `reveal_error`, `search_allowed`, `search_denied` or `search_error`
(named like the write decisions, `write_allowed`, …; an unexpected failure after the rate limit is audited
too, as `reveal_error` of each record or `search_error` with `why` `internal`, before the error answer),
and `reason` is a JSON object naming the action, principal, purpose, fields asked and given, why each
other field was refused, the policies that decided, and the request id. Never a value, never a token.

Rate limits are counted per principal in records (reveal) or values (search) before anything is read or
computed: a reveal within `reveal_rate_limit`; a search within that budget and, in a counter of its own, within
`reveal_search_rate_limit` (much smaller: a masked value and its blind index let search confirm guesses).
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from guard.classify.catalog import Action, Catalog
from guard.config import Settings
from guard.errors import DecodeError, IntegrityError, KeyShreddedError, KeyUnavailableError, SubjectRestrictedError
from guard.keys.manager import KeyManager
from guard.policy import Decision, Request
from guard.policy.model import entity, ref
from guard.protect.reveal import image_subject, open_image
from guard.records.builders import OutRecord, RecordBuilder
from guard.records.codec import decode
from guard.reveal.kafka_io import FetchedRecord, RecordNotAuthorizedError, RecordUnavailableError
from guard.reveal.ratelimit import RateDecision
from guard.reveal.tokens import TokenInfo

log = logging.getLogger("guard.reveal")

SOURCE = "reveal-api"
#: The rate budget searches have of their own (`RateLimiter.budget`, the counters' key part).
SEARCH_BUDGET = "search-rate"
#: Why a field was not given (the audit's and the response's codes; never a value).
UNCLASSIFIED = "unclassified"  # the catalog doesn't know the column: fail closed
NOT_CARRIED = "not_carried"  # allowed, but the record doesn't carry it (absent, hashed or dropped)
POLICY = "policy"  # the policy engine denied its class


class Policy(Protocol):
    """What the service needs of `guard.policy.PolicyEngine`."""

    def decide_batch(self, requests: Sequence[Request], *,
                     entities: Sequence[Mapping[str, Any]] | None = None) -> list[Decision]: ...

    def maybe_reload(self, *, force: bool = False) -> bool: ...


class Fetcher(Protocol):
    def allowed_topic(self, topic: str) -> bool: ...

    def fetch(self, topic: str, partition: int, offset: int) -> FetchedRecord | None: ...


class Sink(Protocol):
    def write(self, records: list[OutRecord]) -> None: ...


class Limiter(Protocol):
    def hit(self, principal: str, cost: int) -> RateDecision: ...


class Tokens(Protocol):
    def verify(self, token: str) -> TokenInfo | None: ...


@dataclass(frozen=True, slots=True)
class RecordRef:
    """A sanitized record by position, the image to read and the fields asked."""

    topic: str
    partition: int
    offset: int
    fields: tuple[str, ...]
    image: str = "after"

    def where(self) -> dict[str, Any]:
        return {"topic": self.topic, "partition": self.partition, "offset": self.offset, "image": self.image}


@dataclass(slots=True)
class RevealResult:
    ref: RecordRef
    decision: str
    values: dict[str, Any] = field(default_factory=dict)
    #: field → why it was not given (`policy`, `unclassified`, `not_carried`)
    refused: dict[str, str] = field(default_factory=dict)
    policies: list[str] = field(default_factory=list)
    #: a code when the whole record could not be served: not_found, topic_not_allowed, erased, restricted, …
    reason: str | None = None
    table: str | None = None
    subject: str | None = None
    branch: str | None = None
    classes: dict[str, int] = field(default_factory=dict)
    #: field class → the policy's decision on it (`allow`/`deny`), the policies that made it, and why
    decisions: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: evaluation errors of those decisions (an unknown principal, say), by policy id; never a value
    errors: list[str] = field(default_factory=list)

    @property
    def given(self) -> list[str]:
        return [f for f in self.ref.fields if f in self.values]


@dataclass(slots=True)
class SearchResult:
    decision: str
    tokens: list[str | None]
    policies: list[str]
    reason: str | None = None


class Refused(Exception):  # noqa: N818 - a refusal, not a failure of the service
    """A whole call refused before any record was read (rate limit): audited, then answered with `status`."""

    def __init__(self, status: int, code: str, detail: str, retry_after_s: int | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.retry_after_s = retry_after_s


class RevealService:
    """Decides, opens and audits; one instance per process, shared by the API's worker threads."""

    def __init__(self, settings: Settings, keys: KeyManager, catalog: Catalog, policy: Policy, fetcher: Fetcher,
                 sink: Sink, tokens: Tokens, limiter: Limiter, *, search_limiter: Limiter,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.keys = keys
        self.catalog = catalog
        self.policy = policy
        self.fetcher = fetcher
        self.sink = sink
        self.tokens = tokens
        #: Reveals' budget; `search_limiter`: searches' own, counted with (within) the reveals' one.
        self.limiter = limiter
        self.search_limiter = search_limiter
        self._clock = clock
        self.worker = f"reveal@{socket.gethostname()}"
        self._builders: dict[str, RecordBuilder] = {}
        self._lock = threading.Lock()

    # --- authentication ------------------------------------------------------------------------------
    def authenticate(self, token: str | None) -> TokenInfo | None:
        return self.tokens.verify(token) if token else None

    def audit_unauthenticated(self, action: str, reason: str, request_id: str, client: str | None) -> None:
        """An audit record of a call refused before its principal was known (no or unknown token)."""
        detail = {"principal": None, "reason": reason, "client": client, "request": request_id}
        self.sink.write([self._audit(self.settings.branch, "reveal-api", 0, 0, None, action, None,
                                     "denied", detail, {}, {}, request_id)])

    # --- reveal --------------------------------------------------------------------------------------
    def reveal(self, principal: str, purpose: str, refs: Sequence[RecordRef], request_id: str) -> list[RevealResult]:
        self.policy.maybe_reload()
        now = self._clock()
        rate = self.limiter.hit(principal, len(refs))
        if not rate.allowed:
            records = [self._reveal_audit(RevealResult(r, "denied", reason="rate_limited"), principal, purpose,
                                          request_id) for r in refs]
            self.sink.write(records)
            raise Refused(429, "rate_limited", f"rate limit of {rate.limit} records per {rate.window_s} s "
                          "reached", rate.retry_after_s)
        try:
            results = [self._reveal_one(principal, purpose, r, len(refs), now) for r in refs]
        except Exception as exc:
            # Every call is audited, a failed one too: each record as an `error` of which nothing was given
            # (the answer is an error without any value), then the failure goes on to the API's handler.
            log.error("a reveal failed (%s): audited as an error of each record", type(exc).__name__)
            self.sink.write([self._reveal_audit(RevealResult(r, "error", reason="internal"), principal, purpose,
                                                request_id) for r in refs])
            raise
        self.sink.write([self._reveal_audit(res, principal, purpose, request_id) for res in results])
        return results

    def _reveal_one(self, principal: str, purpose: str, r: RecordRef, volume: int, now: float) -> RevealResult:
        if not self.fetcher.allowed_topic(r.topic):
            return RevealResult(r, "denied", reason="topic_not_allowed")
        try:
            fetched = self.fetcher.fetch(r.topic, r.partition, r.offset)
        except RecordNotAuthorizedError:
            return RevealResult(r, "error", reason="not_authorized")
        except RecordUnavailableError:
            return RevealResult(r, "error", reason="kafka_unavailable")
        if fetched is None or fetched.value is None:
            return RevealResult(r, "not_found", reason="not_found")
        try:
            doc = decode(fetched.value)
            table, branch = str(doc["table"]), str(doc["branch"])
        except (DecodeError, KeyError, TypeError):
            return RevealResult(r, "not_found", reason="not_a_sanitized_record")
        res = RevealResult(r, "denied", table=table, branch=branch)
        img = doc.get(r.image)
        if img is None:
            res.decision, res.reason = "not_found", "no_such_image"
            return res
        res.subject = image_subject(doc, r.image)
        by_class: dict[str, list[str]] = {}
        for name in r.fields:
            column = self.catalog.column(table, name)
            if column is None or column.data_class not in ("none", "C1", "C2", "C3"):
                res.refused[name] = UNCLASSIFIED
                continue
            by_class.setdefault(column.data_class, []).append(name)
            res.classes[column.data_class] = res.classes.get(column.data_class, 0) + 1
        allowed = self._decide(principal, "reveal", purpose, by_class, branch, res.subject, volume, now, res)
        sealed = img.get("sealed") or {}
        sealed_fields = set(sealed.get("fields") or [])
        clear = img.get("clear") or {}
        want_sealed = [f for f in allowed if f in sealed_fields]
        opened: dict[str, Any] = {}
        if want_sealed:
            try:
                opened = open_image(self.keys, doc, r.image, topic=r.topic, row_key=fetched.key)
            except KeyShreddedError:
                return self._unopened(res, "erased")
            except SubjectRestrictedError:
                return self._unopened(res, "restricted")
            except KeyUnavailableError:
                return self._unopened(res, "key_store_unavailable", "error")
            except IntegrityError:
                log.warning("a sealed image at %s [%d] @%d failed authentication", r.topic, r.partition, r.offset)
                return self._unopened(res, "integrity")
        for name in allowed:
            if name in opened:
                res.values[name] = opened[name]
            elif name in clear and self._clear_column(table, name):
                res.values[name] = clear[name]
            else:
                res.refused[name] = NOT_CARRIED
        opened.clear()  # the other fields of the image leave with it, unreturned
        res.decision = "allowed" if len(res.values) == len(r.fields) else "partial" if res.values else "denied"
        return res

    def _clear_column(self, table: str, name: str) -> bool:
        column = self.catalog.column(table, name)
        return column is not None and column.action is Action.CLEAR

    @staticmethod
    def _unopened(res: RevealResult, reason: str, decision: str = "denied") -> RevealResult:
        for name in res.ref.fields:
            res.refused.setdefault(name, reason)
        res.values.clear()
        res.decision, res.reason = decision, reason
        return res

    def _decide(self, principal: str, action: str, purpose: str, by_class: Mapping[str, list[str]], branch: str,
                subject: str | None, volume: int, now: float, res: RevealResult | None) -> list[str]:
        """The fields allowed: one decision per field class; records the policies and refusals on `res`."""
        if not by_class:
            return []
        kind, _, ident = principal.partition("::")
        resource_id = subject or f"{action}:{branch}"
        # The data subject exists for the engine only for this request: the service knows its token and branch,
        # not its consent, so it is decided without any (a policy that needs consent denies).
        entities = [entity("DataSubject", resource_id, {"branch": ref("Branch", branch), "consent": [],
                                                        "legal_hold": False}, parents=[("Branch", branch)])]
        classes = sorted(by_class)
        requests = [Request((kind, ident), action, ("DataSubject", resource_id), {
            "time": now, "purpose": purpose, "volume": volume, "source": SOURCE,
            **({"field_class": c} if c in ("C1", "C2", "C3") else {}), "fields": sorted(by_class[c])})
            for c in classes]
        decisions = self.policy.decide_batch(requests, entities=entities)
        allowed: list[str] = []
        policies: list[str] = []
        for c, d in zip(classes, decisions, strict=True):
            policies += [p for p in d.policies if p not in policies]
            if res is not None:
                res.decisions[c] = {"decision": d.decision, "policies": list(d.policies), "reason": d.reason}
                res.errors += [e for e in d.errors if e not in res.errors]
            if d.allowed:
                allowed += by_class[c]
            elif res is not None:
                for name in by_class[c]:
                    res.refused[name] = POLICY
        if res is not None:
            res.policies = policies
        return allowed

    # --- search --------------------------------------------------------------------------------------
    def search(self, principal: str, purpose: str, table: str, column: str, values: Sequence[str | int],
               request_id: str) -> SearchResult:
        """The blind-index tokens of `values` in `table.column` (sanitized images' `index` entries).

        A token is the tenant's, not a branch's, so the request names no branch: the policy sees the
        service's branch (`settings.branch`), never one the caller chose.

        The values count against the search budget (`search_limiter`) before anything else is computed: a
        sanitized record shows a masked value beside its blind index, so each searched value is a guess
        checked, and the reveals' budget alone let 10^4 candidates through in 17 minutes.
        """
        self.policy.maybe_reload()
        now = self._clock()
        branch = self.settings.branch
        detail: dict[str, Any] = {"principal": principal, "purpose": purpose, "asked": [column], "given": [],
                                  "values": len(values), "request": request_id}
        rate = self.search_limiter.hit(principal, len(values))
        if not rate.allowed:
            detail["why"] = "rate_limited"
            detail["budget"] = rate.budget
            self.sink.write([self._audit(branch, "reveal-api", 0, 0, table, "search", None, "denied", detail,
                                         {}, {"asked": len(values)}, request_id)])
            what = (f"search rate limit of {rate.limit} values" if rate.budget == SEARCH_BUDGET
                    else f"rate limit of {rate.limit} records and searched values")
            raise Refused(429, "rate_limited", f"{what} per {rate.window_s} s reached", rate.retry_after_s)
        result = SearchResult("denied", [None] * len(values), [])
        classes: dict[str, int] = {}
        try:
            policy = self.catalog.column(table, column)
            if policy is None or not policy.index:
                result.reason = "not_searchable"
            else:
                classes[policy.data_class] = 1
                probe = RevealResult(RecordRef("", 0, 0, (column,)), "denied")
                allowed = self._decide(principal, "search", purpose, {policy.data_class: [column]}, branch, None,
                                       len(values), now, probe)
                result.policies = probe.policies
                detail["decisions"] = probe.decisions
                if probe.errors:
                    detail["errors"] = probe.errors
                if allowed:
                    result.tokens = [self.keys.search_token(column, _value_bytes(v)) for v in values]
                    result.decision = "allowed"
                    detail["given"] = [column]
                else:
                    result.reason = "policy"
        except Exception as exc:
            # As for a reveal: the failed call is audited (`search_error`, nothing given, no value, no token).
            log.error("a search failed (%s): audited as an error", type(exc).__name__)
            detail.update(given=[], policies=result.policies, why="internal")
            self.sink.write([self._audit(branch, "reveal-api", 0, 0, table, "search", None, "error", detail,
                                         classes, {"asked": len(values), "given": 0}, request_id)])
            raise
        detail["policies"] = result.policies
        if result.reason:
            detail["why"] = result.reason
        self.sink.write([self._audit(branch, "reveal-api", 0, 0, table, "search", None, result.decision, detail,
                                     classes, {"asked": len(values), "given": len(values) if result.decision ==
                                               "allowed" else 0}, request_id)])
        return result

    # --- audit ---------------------------------------------------------------------------------------
    def _reveal_audit(self, res: RevealResult, principal: str, purpose: str, request_id: str) -> OutRecord:
        detail: dict[str, Any] = {"principal": principal, "purpose": purpose, "image": res.ref.image,
                                  "asked": list(res.ref.fields), "given": res.given, "refused": res.refused,
                                  "policies": res.policies, "request": request_id}
        if res.decisions:
            detail["decisions"] = res.decisions
        if res.errors:
            detail["errors"] = res.errors
        if res.reason:
            detail["why"] = res.reason
        return self._audit(res.branch or self.settings.branch, res.ref.topic, res.ref.partition, res.ref.offset,
                           res.table, "reveal", res.subject, res.decision, detail, res.classes,
                           {"asked": len(res.ref.fields), "given": len(res.values)}, request_id)

    def _audit(self, branch: str, topic: str, partition: int, offset: int, table: str | None, op: str,
               subject: str | None, decision: str, detail: Mapping[str, Any], classes: Mapping[str, int],
               actions: Mapping[str, int], request_id: str) -> OutRecord:
        # As the write decisions' audit records (`write_allowed`, …): the action in the decision's name, the
        # decision's details as JSON in `reason`.
        decision = f"{op}_{decision}"
        detail = {"action": op, **detail}
        with self._lock:  # a builder carries the trace id of the record in hand: one record at a time
            builder = self._builders.get(branch)
            if builder is None:
                if len(self._builders) > 1000:
                    self._builders.clear()
                builder = self._builders[branch] = RecordBuilder(
                    dataclasses.replace(self.settings, branch=branch, worker_id=self.worker), self.keys)
            builder.trace_id = request_id
            out = builder.audit(topic[:249], partition, offset, table, op, subject, decision,
                                orjson.dumps(detail).decode(), classes, actions)
        out.key = f"reveal:{branch}".encode()
        return out


def _value_bytes(value: str | int) -> bytes:
    """The bytes the sanitizer's blind index is computed over (`records.encoders._value_bytes`)."""
    return value.encode() if isinstance(value, str) else orjson.dumps(value)


__all__ = ["KeyUnavailableError", "Policy", "RecordRef", "Refused", "RevealResult", "RevealService",
           "SearchResult"]
