"""Writes checked against the access policy: who made a CDC change, and whether the policy allowed it.

Every change (create, update, delete) of a branch table names its principal (the attribution contract,
docs/policy.md): a create or update carries it in the row's `updated_by` column (filled by the branch
database's trigger from the transaction's principal: PostgreSQL's `guard.principal` setting, MariaDB's
`@guard_principal` session variable); a delete carries it in an attribution message of its transaction,
joined here on the transaction's id through the key store (`prepare`: a batch's messages recorded and its
deletes looked up in one round trip; the message and the delete may be read by different workers, in any
order). On PostgreSQL the message is a
transactional logical decoding message (prefix `guard.principal`, op `m`) joined on `source.txId`; on
MariaDB it is a row inserted by the delete trigger into the guard-owned BLACKHOLE table
`guard_admin.principal_messages` (op `c`) joined on `source.gtid`. The connector publishes both on
`<topic.prefix>.message`.

The decision is one of `allow`, `deny` (the Cedar policy's, naming its policies) or `unattributed` (no
principal: never allowed silently). A snapshot read (`r`), a truncate and a tombstone are no writes of
anybody and get no write decision.

`WriteChecker` keeps a memo of decisions per (principal, action, table, second): the engine's own cache
works per request; this one skips building the request at all, and is dropped with the engine's
generation (any policy or entity change).
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from guard.cdc.envelope import ChangeEvent
from guard.classify.source import ATTRIBUTION_DATABASE
from guard.classify.source import ATTRIBUTION_TABLE as ATTRIBUTION_TABLE_NAME
from guard.config import Settings
from guard.keys.store import RedisKeyStore
from guard.policy.engine import PolicyEngine, PolicyError, default_directory
from guard.policy.model import entity, ref
from guard.policy.sources import database_source

#: The column a create or update carries its principal in.
PRINCIPAL_COLUMN = "updated_by"
#: The prefix of the logical decoding messages that attribute deletes (PostgreSQL).
ATTRIBUTION_PREFIX = "guard.principal"
#: The table whose inserted rows attribute deletes on MariaDB (`<database>.<table>` as in the change event):
#: a BLACKHOLE table in a database the application can't write, filled by the delete triggers.
ATTRIBUTION_TABLE = f"{ATTRIBUTION_DATABASE}.{ATTRIBUTION_TABLE_NAME}"
WRITE_OPS = frozenset({"c", "u", "d"})


@dataclass(frozen=True, slots=True)
class WriteDecision:
    """A write's decision: `allow`, `deny` or `unattributed`, who, and the policies behind it."""

    decision: str
    principal: str | None
    action: str
    policies: tuple[str, ...] = ()
    reason: str = ""
    errors: tuple[str, ...] = ()

    @property
    def allowed(self) -> bool:
        return self.decision == "allow"

    def as_dict(self) -> dict[str, Any]:
        return {"decision": self.decision, "principal": self.principal, "action": self.action,
                "policies": list(self.policies), "reason": self.reason, "errors": list(self.errors)}


#: `WriteChecker.scan`'s answer for a record that is no write of anybody (a snapshot read).
NOT_A_WRITE = WriteDecision("none", None, "none")


class AttributionPending(Exception):  # noqa: N818 - a condition, not an error: the runner waits for it
    """A delete whose attribution message has not been read yet: hold it back and try again later."""


def principal_uid(text: str) -> tuple[str, str] | None:
    """`Staff:t0101-01` → ("Staff", "t0101-01"); a bare id is a member of staff; None when unusable."""
    text = text.strip()
    if not text or len(text) > 200:
        return None
    kind, sep, ident = text.partition(":")
    if not sep:
        return ("Staff", kind)
    if kind not in ("Staff", "Service") or not ident:
        return None
    return (kind, ident)


def message_principal(event: ChangeEvent) -> str | None:
    """The principal an attribution message names ("" when it names none), or None if it is not one.

    PostgreSQL: a logical decoding message (op `m`) of prefix `guard.principal`, its content the JSON
    `{"principal": ...}`. MariaDB: an insert (op `c`) into `guard_admin.principal_messages`, its row
    `{"principal": ...}`.
    """
    if event.op == "c" and event.schema_table == ATTRIBUTION_TABLE:
        principal = (event.after or {}).get("principal")
        return principal if isinstance(principal, str) else ""
    if event.op != "m":
        return None
    message = event.message or {}
    if message.get("prefix") != ATTRIBUTION_PREFIX:
        return None
    content = message.get("content")
    try:
        raw = base64.b64decode(content, validate=True) if isinstance(content, str) else b""
        doc = orjson.loads(raw)
    except (binascii.Error, ValueError, orjson.JSONDecodeError):
        return ""
    principal = doc.get("principal") if isinstance(doc, dict) else None
    return principal if isinstance(principal, str) else ""


def scan_write(value: bytes) -> tuple[str, bytes | None, int | None] | None:
    """(op, the principal's raw bytes, source ts_ms) of a raw Debezium JSON value, read without decoding
    it; None when it can't be read this way. `r` (a snapshot read) comes back as ("r", None, None).

    Reads the last `"op":"`, the `updated_by` of the `after` image (the last `"updated_by":` after the first
    `"after":{`: a string without escapes, or null) and the first `"ts_ms":` of the source; in Debezium's
    compact JSON a key can't occur inside a string value (its quotes would be escaped). Anything else (a
    delete, another op, an escaped or non-string principal) is None. This is the reference of the native
    path's `guard_native.scan_write` (`native/src/scan.rs`), which the tests hold to the same answers.
    """
    i = value.rfind(b'"op":"')
    if i < 0:
        return None
    op = value[i + 6:i + 7]
    if op == b"r":
        return "r", None, None
    if op != b"c" and op != b"u":
        return None
    after = value.find(b'"after":{')
    j = value.rfind(b'"updated_by":')
    principal: bytes | None = None
    if after >= 0 and j > after:
        k = j + 13
        if value.startswith(b'"', k):
            end = value.find(b'"', k + 1)
            if end < 0:
                return None
            raw = value[k + 1:end]
            if b"\\" in raw:
                return None
            principal = raw or None
        elif not value.startswith(b"null", k):
            return None
    source = value.find(b'"source":{')
    t = value.find(b'"ts_ms":', source) if source >= 0 else -1
    when = None
    if t > 0:
        digits = value[t + 8:t + 24]
        n = 0
        for ch in digits:
            if 48 <= ch <= 57:
                n = n * 10 + ch - 48
            else:
                break
        when = n or None
    return op.decode(), principal, when


def principal_text(raw: bytes | None) -> str | None:
    """The principal `scan_write` read, as the decision takes it (undecodable bytes replaced; "": None)."""
    return (raw.decode("utf-8", "replace") or None) if raw is not None else None


class WriteChecker:
    """Decides each CDC write with the policy engine; shared by the Python and the native path."""

    def __init__(self, settings: Settings, engine: PolicyEngine, store: RedisKeyStore | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.engine = engine
        self.store = store
        self.branch = settings.branch
        self.policy_branch = settings.policy_branch or settings.branch
        self.wait_s = settings.attribution_wait_s
        self._clock = clock
        self._memo: dict[tuple[str | None, str, str, int], WriteDecision] = {}
        self._generation = engine.generation
        self._tables: set[str] = set()
        #: (topic, partition, offset) → when this worker first held the delete back.
        self._waiting: dict[tuple[str, int, int], float] = {}
        #: The batch's deletes → the principals their transactions' messages named when the batch began
        #: (None: no message yet), and the (tx_id, principal) pairs the batch's messages recorded (`prepare`).
        self._prepared: dict[tuple[str, int, int], set[str] | None] = {}
        self._recorded: set[tuple[int | str, str]] = set()
        self.message_topic = f"{settings.raw_topic_prefix}.message"

    @classmethod
    def from_settings(cls, settings: Settings, store: RedisKeyStore | None) -> WriteChecker | None:
        """The checker of the settings (`policy = "off"`: None). `PolicyError` if the policy doesn't load."""
        if settings.policy == "off":
            return None
        if settings.policy != "on":
            raise PolicyError(f"setting policy must be on or off, got {settings.policy!r}")
        source = database_source(settings.branch_dsn) if settings.policy_staff == "db" else None
        engine = PolicyEngine(settings.policy_dir or default_directory(), entity_source=source,
                              bucket_s=settings.policy_bucket_s)
        return cls(settings, engine, store)

    def refresh(self) -> None:
        """Per batch: reload the policy if its directory changed (cheap), drop the memo on any change."""
        self.engine.maybe_reload()
        if self.engine.generation != self._generation:
            self._generation = self.engine.generation
            self._memo.clear()

    def decide(self, op: str, principal: str | None, schema_table: str, when_ms: int | None,
               *, subject_root: bool = False) -> WriteDecision:
        """The decision on a write by `principal` (None: unattributed) of `schema_table` at `when_ms`."""
        action = "delete" if op == "d" else "write"
        if principal is None:
            return WriteDecision("unattributed", None, action, (), "the change names no principal "
                                 "(no guard.principal / @guard_principal set in its transaction)")
        second = (when_ms or int(time.time() * 1000)) // 1000
        key = (principal, action, schema_table, second)
        memo = self._memo
        hit = memo.get(key)
        if hit is not None:
            return hit
        uid = principal_uid(principal)
        if uid is None:
            made = WriteDecision("unattributed", principal, action, (), "the principal is not of the form "
                                 "Staff:<id> or Service:<id>")
        else:
            resource = f"{self.policy_branch}:{schema_table}"
            if schema_table not in self._tables:
                self.engine.add_entities([entity("Table", resource, {"branch": ref("Branch", self.policy_branch),
                                                                     "name": schema_table,
                                                                     "subject_root": subject_root},
                                                 [("Branch", self.policy_branch)])])
                self._tables.add(schema_table)
                self.refresh()
            d = self.engine.decide(uid, action, ("Table", resource),
                                   {"time": float(second), "purpose": "branch_operation", "source": "cdc",
                                    "volume": 1})
            made = WriteDecision(d.decision, principal, action, d.policies, d.reason, d.errors)
        if len(memo) > 100_000:
            memo.clear()
        memo[key] = made
        return made

    def scan(self, value: bytes, schema_table: str) -> tuple[str, WriteDecision] | None:
        """(op, decision) of a raw Debezium JSON value read without decoding it (`scan_write`); None when
        it can't be read this way (the record then takes the Python path, which decodes it and decides).
        Deletes always return None: they are joined with their message. The native path reads a whole run
        at once (`guard_native.scan_writes`, the same reading) and calls `decide` once per distinct write.
        """
        found = scan_write(value)
        if found is None:
            return None
        op, principal, when = found
        if op == "r":
            return "r", NOT_A_WRITE
        return op, self.decide(op, principal_text(principal), schema_table, when)

    def decide_event(self, event: ChangeEvent, where: tuple[str, int, int], *,
                     subject_root: bool = False) -> WriteDecision | None:
        """The decision on a decoded change (None: not a write). A delete whose attribution message has
        not been read yet raises `AttributionPending` until `attribution_wait_s` after it was first met."""
        if event.op not in WRITE_OPS:
            return None
        when = event.source_ts_ms or event.ts_ms
        if event.op != "d":
            value = (event.after or {}).get(PRINCIPAL_COLUMN)
            return self.decide(event.op, value if isinstance(value, str) and value else None, event.schema_table,
                               when, subject_root=subject_root)
        named = self._delete_principals(event, where)
        if named is None:
            first = self._waiting.setdefault(where, self._clock())
            if self._clock() - first < self.wait_s:
                raise AttributionPending(where)
            self._waiting.pop(where, None)
            return WriteDecision("unattributed", None, "delete", (), f"no attribution message of its "
                                 f"transaction arrived within {self.wait_s:g} s")
        self._waiting.pop(where, None)
        if len(self._waiting) > 10_000:
            self._waiting.clear()
        principals = {p for p in named if p}
        if len(principals) > 1:
            return WriteDecision("unattributed", None, "delete", (), "its transaction named several "
                                 "principals; a delete can't be attributed to one")
        return self.decide("d", next(iter(principals)) if principals else None, event.schema_table, when,
                           subject_root=subject_root)

    def prepare(self, messages: list[ChangeEvent], deletes: list[tuple[tuple[str, int, int], ChangeEvent]]) -> None:
        """Per batch, before it is processed: record the batch's attribution messages and look up its deletes'
        transactions, in one key-store round trip (`RedisKeyStore.exchange_attributions`).

        Without it each message and each delete costs a round trip of its own, and a delete read before its
        message in the same batch waits (`AttributionPending`: its partition is sought back and fetched
        again). Recording a message before its place in the batch changes nothing: records are idempotent
        and already happen before the transaction commits; another worker's record could as well have come
        first. A delete's answer holds for that record of this batch only (`_delete_principals`); one the
        batch's messages don't settle is looked up again when the delete is fetched again.
        """
        self._prepared.clear()
        self._recorded.clear()
        if self.store is None:
            return
        recorded: set[tuple[int | str, str]] = set()
        for event in messages:
            principal = message_principal(event)
            if principal is not None and event.tx_id is not None:
                recorded.add((event.tx_id, principal))
        wanted = {where: event.tx_id for where, event in deletes if event.op == "d" and event.tx_id is not None}
        if not recorded and not wanted:
            return
        found = self.store.exchange_attributions(self.branch, recorded, set(wanted.values()))
        self._recorded = recorded
        self._prepared = {where: found.get(tx_id) for where, tx_id in wanted.items()}

    def _delete_principals(self, event: ChangeEvent, where: tuple[str, int, int]) -> set[str] | None:
        if event.tx_id is None:
            return set()  # no transaction id to join on: unattributed at once
        if self.store is None:
            return set()
        if where in self._prepared:
            return self._prepared.pop(where)
        return self.store.attributions(self.branch, [event.tx_id]).get(event.tx_id)

    def record_message(self, event: ChangeEvent) -> str | None:
        """Remember the principal an attribution message names for its transaction (None: not one)."""
        principal = message_principal(event)
        if principal is None or event.tx_id is None or self.store is None:
            return principal
        if (event.tx_id, principal) not in self._recorded:  # else recorded with the batch (`prepare`)
            self.store.record_attribution(self.branch, event.tx_id, principal)
        return principal
