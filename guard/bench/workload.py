"""The bench's input: pre-encoded Debezium change events, generated once and replayed by byte splicing.

Two workloads (`--workload`):

- `realistic` (the default): a branch day over every table of the demo schema (`customers`, `accounts`,
  `transactions`, `customer_auth`, whose C3 columns arrive as the connector sends them: `password_hash`
  as the connector's salted SHA-256 digest, `query_pin` excluded). Events are drawn for customers of a
  population of `customers` (default `REALISTIC_CUSTOMERS`) with a Zipf-like skew: the customer of
  popularity rank k is drawn with probability proportional to k^-`ZIPF_S`, ranks scattered over the ids
  by a multiplicative permutation. With s = 0.8 and a million customers the busiest customer has ~0.3%
  of the draws and most customers of a 200,000-event window are drawn once or twice (the report gives
  the distinct count). Each draw is one of a branch day's changes (`MIX`): a posting (a transaction
  inserted and its account's balance updated), a contact-detail update, a password change, a new
  customer (customer, 1-2 accounts, authentication row: keys the key store has never seen), or a
  customer leaving (one transaction: authentication row, accounts, then the customer deleted, each delete
  followed by its tombstone, as the connector sends them, and each DELETE statement by its attribution
  message on `<prefix>.message`; the customer delete schedules the customer's erasure).
  A customer drawn before it exists in the branch already existed before the day began (its rows are
  derived from its id, so its updates carry whole before images, REPLICA IDENTITY FULL).
- `hot`: the cache-friendly workload of the earlier benches: `customers` only, 4,000 customers, ~85%
  creates and ~15% updates drawn uniformly, so nearly every key lookup hits a cache.

In both, every event names its principal as the attribution contract has it (docs/policy.md): creates
and updates carry `updated_by` = `BENCH_PRINCIPAL` on every table, and each delete's transaction has its
`guard.principal` logical decoding message naming `BENCH_DELETER` (`message_envelope`), so the guard's
policy checks allow every write and no delete waits for its attribution.

`templates[i]` is (table, key, value without its closing `ts_ms}`; None for a tombstone; table
`MESSAGE_TOPIC` for a logical decoding message); `order` is the sequence of templates the raw topics are
filled with; `replay` is what the paced phases (latency, soak) send over and over: `order` without the
events of customers who leave (their deletes' messages included), so a replay never writes for a
customer whose key was destroyed.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import math
import random
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import orjson

from guard.bench.common import EPOCH_DAY, TS_SENTINEL, TS_TAIL, BenchError
from guard.pipeline.policy import ATTRIBUTION_PREFIX, PRINCIPAL_COLUMN
from guard.workload import synth

WORKLOADS = ("realistic", "hot")
#: Default population of the realistic workload.
REALISTIC_CUSTOMERS = 1_000_000
HOT_CUSTOMERS = 4000
#: Exponent of the Zipf-like popularity of customers (see the module docstring).
ZIPF_S = 0.8
#: A branch day's changes, per draw of a customer (shares sum to 1).
MIX = (("posting", 0.76), ("contact_update", 0.12), ("password_change", 0.05), ("new_customer", 0.067),
       ("customer_leaves", 0.003))
TABLES = ("public.customers", "public.accounts", "public.transactions", "public.customer_auth")
#: Who the bench's changes are attributed to (the attribution contract, docs/policy.md): every create and
#: update names a teller of the branch in `updated_by` (policy/branch.cedar: a teller writes her branch);
#: every delete is named by its transaction's logical decoding message, as the branch manager (only a
#: manager may delete). So the guard decides every write `allow`, none `unattributed`.
BENCH_PRINCIPAL = "Staff:t0101-01"
BENCH_DELETER = "Staff:m0101-01"
#: The "table" of a template that is a logical decoding message: its raw topic is `<prefix>.message`,
#: where Debezium publishes them (and where the guard reads the attribution of deletes).
MESSAGE_TOPIC = "message"
#: The most events a customer leaving writes: 3-4 deletes with their tombstones and 3 messages.
_LEAVING_MAX_EVENTS = 11
_ISO = "%Y-%m-%dT%H:%M:%S.%fZ"


# --- the records ------------------------------------------------------------------------------------
@dataclass
class Workload:
    """Pre-encoded change events: `templates[i]` is (table, key, value without its closing `ts_ms}`)."""

    templates: list[tuple[str, bytes, bytes | None]]
    order: list[int]
    customers: int
    updates: int
    kind: str = "hot"
    replay: list[int] = field(default_factory=list)
    #: Counts of what the workload holds: events per table and op, distinct customers, customers created
    #: and customers leaving (each leaving customer is erased after its table's grace period).
    facts: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.replay:
            self.replay = self.order

    @property
    def tables(self) -> list[str]:
        """The tables the change events are of, in first-seen order (one raw topic each)."""
        seen: dict[str, None] = {}
        for table, _, _ in self.templates:
            if table != MESSAGE_TOPIC:
                seen.setdefault(table, None)
        return list(seen)

    @property
    def has_messages(self) -> bool:
        """Whether the workload has logical decoding messages (the attribution of its deletes)."""
        return any(table == MESSAGE_TOPIC for table, _, _ in self.templates)

    @property
    def topics(self) -> list[str]:
        """What `Names.input` makes the raw topics of: the tables, then `MESSAGE_TOPIC` if there are messages."""
        return [*self.tables, MESSAGE_TOPIC] if self.has_messages else self.tables

    def value(self, template: int, ts_ms: int) -> bytes | None:
        """The event's value with the envelope's `ts_ms` set (the latency phase stamps the send time)."""
        prefix = self.templates[template][2]
        return None if prefix is None else prefix + b"%d}" % ts_ms

    def mean_value_bytes(self) -> float:
        sample = [i for i in self.order[:4000] if self.templates[i][2] is not None]
        return sum(len(self.templates[i][2] or b"") + TS_TAIL for i in sample) / max(len(sample), 1)


def _iso(ts: dt.datetime) -> str:
    return ts.astimezone(dt.UTC).strftime(_ISO)


def _debezium_row(row: dict[str, object], created_at: str | None = None) -> dict[str, object]:
    """A row as the PostgreSQL connector emits it: a date is days since the epoch (adaptive time), a
    timestamptz an ISO string in UTC, a numeric a string (decimal.handling.mode=string)."""
    out: dict[str, object] = {}
    for column, value in row.items():
        if isinstance(value, dt.datetime):
            out[column] = _iso(value)
        elif isinstance(value, dt.date):
            out[column] = (value - EPOCH_DAY).days
        elif isinstance(value, Decimal):
            out[column] = str(value)
        else:
            out[column] = value
    if created_at is not None:
        out["created_at"] = created_at
    return out


def _source(lsn: int, ts_ms: int, schema: str, table: str, tx_id: int | None) -> dict[str, object]:
    return {
        "version": "3.6.1.Final", "connector": "postgresql", "name": "br0101", "ts_ms": ts_ms,
        "snapshot": "false", "db": "branch_0101", "sequence": f'["{lsn - 8}","{lsn}"]',
        "ts_us": ts_ms * 1000, "ts_ns": ts_ms * 1_000_000, "schema": schema, "table": table,
        "txId": lsn // 64 if tx_id is None else tx_id, "lsn": lsn, "xmin": None,
    }


def _spliceable(event: dict[str, object]) -> bytes:
    """`event` encoded without its closing `ts_ms}` (the last key), so `Workload.value` can splice it."""
    value = orjson.dumps(event)
    if not value.endswith(b'"ts_ms":%d}' % TS_SENTINEL):
        raise BenchError("internal: change event does not end with the ts_ms sentinel")
    return value[:-TS_TAIL]


def _envelope(op: str, before: dict[str, object] | None, after: dict[str, object] | None, lsn: int, ts_ms: int,
              table: str = "customers", tx_id: int | None = None) -> bytes:
    """One change event, `ts_ms` last so it can be replaced by byte splicing (see `Workload.value`).

    `tx_id` is the source transaction's id (`source.txId`); None: one of its own, derived from `lsn`.
    """
    source = _source(lsn, ts_ms, "public", table, tx_id)
    return _spliceable({"before": before, "after": after, "source": source, "transaction": None, "op": op,
                        "ts_ms": TS_SENTINEL})


#: The key Debezium gives a logical decoding message record (its prefix).
MESSAGE_KEY = orjson.dumps({"prefix": ATTRIBUTION_PREFIX})


def message_envelope(principal: str, tx_id: int, lsn: int, ts_ms: int) -> bytes:
    """The attribution of a delete statement as Debezium publishes it on `<prefix>.message` (without the
    closing `ts_ms}`, like `_envelope`): the transactional logical decoding message that the branch
    database's statement trigger writes after each DELETE (`guard_admin.emit_principal`,
    branch_bootstrap.sql), prefix `guard.principal`, content `json_build_object('principal', ...)::text`
    (PostgreSQL's spacing) base64-encoded, `source.txId` the deleting transaction's (what the guard joins
    the delete on), empty schema and table.
    """
    content = b'{"principal" : ' + orjson.dumps(principal) + b"}"
    return _spliceable({"op": "m", "source": _source(lsn, ts_ms, "", "", tx_id),
                        "message": {"prefix": ATTRIBUTION_PREFIX, "content": base64.b64encode(content).decode()},
                        "ts_ms": TS_SENTINEL})


def build_workload(records: int, *, customers: int | None = None, kind: str = "realistic", update_share: float = 0.15,
                   seed: int = 7) -> Workload:
    """`records` change events of the `kind` workload (see the module docstring)."""
    if kind == "hot":
        return build_hot(records, customers=customers or HOT_CUSTOMERS, update_share=update_share, seed=seed)
    if kind == "realistic":
        return BranchDay(customers or REALISTIC_CUSTOMERS, seed=seed).build(records)
    raise BenchError(f"unknown workload {kind!r}: one of {', '.join(WORKLOADS)}")


def build_hot(records: int, *, customers: int = HOT_CUSTOMERS, update_share: float = 0.15, seed: int = 7) -> Workload:
    """`records` events over `customers` distinct synth customers (~85% creates, ~15% updates).

    Each customer has one create and one update template (new mobile and address, before and after
    images); records pick a customer at random, so the guard's key caches miss once per customer and
    worker, as they would on a branch with a few thousand active customers.
    """
    rng = random.Random(seed)
    now_ms = int(time.time() * 1000)
    templates: list[tuple[str, bytes, bytes | None]] = []
    for cid in range(1, customers + 1):
        created = dt.datetime.fromtimestamp(now_ms / 1000 - rng.randint(0, 86_400 * 365), dt.UTC)
        row = _debezium_row(synth.new_customer(rng, cid), created.strftime(_ISO))
        row[PRINCIPAL_COLUMN] = BENCH_PRINCIPAL  # the live schema's attribution column (trigger-filled)
        changed = dict(row, mobile=synth.mobile(rng), address=synth.address(rng))
        key = orjson.dumps({"customer_id": cid})
        lsn = 26_735_008 + cid * 4096
        for value in (_envelope("c", None, row, lsn, now_ms), _envelope("u", row, changed, lsn + 512, now_ms)):
            templates.append(("public.customers", key, value))
    order = [2 * rng.randrange(customers) + (rng.random() < update_share) for _ in range(records)]
    updates = sum(i % 2 for i in order)
    return Workload(templates, order, customers, updates, "hot",
                    facts={"distinct_customers": len({i // 2 for i in order}), "tables": ["public.customers"],
                           "events": {"public.customers": {"c": records - updates, "u": updates}}})


# --- the realistic branch day ----------------------------------------------------------------------------
class _Personas:
    """Pools of synth values (names, addresses, counterparties, memos), generated once, lazily.

    `synth` makes every value valid (check digits, real area codes) at about a millisecond per customer;
    a million customers would take many minutes. Customers are therefore built from a persona of the
    pool plus the values that identify a person, derived from the customer id so they are unique per
    customer (mobile, resident ID with its check digit, e-mail, account and Luhn-valid card numbers):
    the guard's per-value caches (masks, blind indexes) then see as many distinct values as customers.
    """

    def __init__(self, size: int = 2048, seed: int = 17) -> None:
        self.size, self.seed = size, seed
        self._built = False

    def _build(self) -> None:
        rng = random.Random(self.seed)
        self.customers = [synth.new_customer(rng, 0) for _ in range(self.size)]
        self.addresses = [synth.address(rng) for _ in range(self.size)]
        self.counterparties = [(synth.chinese_name(rng), synth.bank_card(rng)) for _ in range(self.size)]
        memo_rng = random.Random(self.seed + 1)
        account = {"account_no": "0", "customer_id": 0, "opened_at": dt.datetime(2020, 1, 1, tzinfo=dt.UTC)}
        self.memos = [str(synth.new_transaction(memo_rng, account)["memo"]) for _ in range(self.size)]
        self.bins = [b for b in ("622202", "621700", "622848", "621226", "622588", "620522")]
        self._built = True

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or self._built:
            raise AttributeError(name)
        self._build()
        return getattr(self, name)


_PERSONAS = _Personas()


def _mobile(n: int) -> str:
    return f"1{3 + n % 7}{n % 10}{n % 10**8:08d}"


def customer_rows(cid: int, seed: int, now_ms: int) -> list[Any]:
    """[customers row, accounts rows, customer_auth row] of customer `cid`, as the connector sends them
    (`updated_by`, the last column since the attribution contract added it, names `BENCH_PRINCIPAL`)."""
    h = (cid * 2_654_435_761 + seed) & 0xFFFFFFFF
    persona = _PERSONAS.customers[h % _PERSONAS.size]
    idn17 = str(persona["id_number"])[:14] + f"{(cid * 7 + h) % 1000:03d}"
    idn = idn17 + synth.resident_id_check_char(idn17)
    created = dt.datetime.fromtimestamp(now_ms / 1000 - 86_400 - h % (86_400 * 3650), dt.UTC)
    customer = {"customer_id": cid, "name": persona["name"], "id_number": idn, "mobile": _mobile(cid * 48_271 + h),
                "email": f"c{cid}.{h % 997}@{('qq.com', '163.com', 'example.cn')[h % 3]}",
                "address": _PERSONAS.addresses[(h >> 11) % _PERSONAS.size], "gender": "M" if int(idn[16]) % 2 else "F",
                "birth_date": (dt.date(int(idn[6:10]), int(idn[10:12]), int(idn[12:14])) - EPOCH_DAY).days,
                "occupation": persona["occupation"], "risk_level": 1 + h % 5, "branch_code": "0101",
                "created_at": created.strftime(_ISO), PRINCIPAL_COLUMN: BENCH_PRINCIPAL}
    accounts = []
    for k in range(1 + (h % 3 == 0)):
        card = _PERSONAS.bins[(h + k) % len(_PERSONAS.bins)] + f"{cid:09d}{k}"
        accounts.append({"account_no": f"0101{cid:011d}{k:02d}", "customer_id": cid,
                         "card_no": card + synth.luhn_check_digit(card),
                         "account_type": ("savings", "savings", "current", "credit")[(h >> 3) % 4],
                         "balance": f"{(h >> 5) % 50_000_000 / 100:.2f}", "currency": "CNY",
                         "status": "active" if h % 50 else "dormant", "branch_code": "0101",
                         "opened_at": created.strftime(_ISO), PRINCIPAL_COLUMN: BENCH_PRINCIPAL})
    auth = {"customer_id": cid, "login_name": f"u{cid:09d}{h % 100:02d}",
            "password_hash": hashlib.sha256(b"$2b$12$%d.%d" % (cid, h)).hexdigest(), "updated_at": _iso(created),
            PRINCIPAL_COLUMN: BENCH_PRINCIPAL}
    return [customer, accounts, auth]


class ZipfRanks:
    """Popularity ranks 1..n drawn with P(k) ~ k^-s (inverse CDF of the continuous law, then floored)."""

    def __init__(self, n: int, s: float) -> None:
        if not 0 < s < 1:
            raise BenchError("the Zipf exponent must be between 0 and 1 (exclusive)")
        self.n, self.s = n, s
        self._a = n ** (1 - s) - 1
        self._inv = 1 / (1 - s)

    def draw(self, u: float) -> int:
        return min(int((self._a * u + 1) ** self._inv), self.n)


def _coprime_step(n: int) -> int:
    step = 2_654_435_761 % n or 1
    while math.gcd(step, n) != 1:
        step += 1
    return step


class BranchDay:
    """Generates a branch day's change events for a population of `population` customers."""

    def __init__(self, population: int, *, seed: int = 7, zipf_s: float = ZIPF_S) -> None:
        if population < 1:
            raise BenchError("--customers must be positive")
        self.population = population
        self.rng = random.Random(seed)
        self.seed = seed
        self.ranks = ZipfRanks(population, zipf_s)
        self.step = _coprime_step(population)
        self.now_ms = int(time.time() * 1000)
        self.lsn = 26_735_008
        self.next_txn = 10_000_001
        self.next_new = population + 1
        #: customer id -> [customer row, accounts, auth row] (Debezium form) of customers seen so far.
        self.state: dict[int, list[Any]] = {}
        self.gone: set[int] = set()
        self.templates: list[tuple[str, bytes, bytes | None]] = []
        self.owner: list[int] = []  # customer of each template
        self.ops: list[str] = []  # op of each template ("tombstone" for a tombstone)

    # rows ----------------------------------------------------------------------------------------
    def _rows(self, cid: int) -> list[Any]:
        """A customer's rows: derived from its id for a customer that existed before the day."""
        return customer_rows(cid, self.seed, self.now_ms)

    @staticmethod
    def _digest(rng: random.Random) -> str:
        """`password_hash` as the connector sends it: column.mask.hash.v2 SHA-256 (hex) of a bcrypt verifier."""
        return hashlib.sha256(f"$2b$12${rng.getrandbits(256):064x}".encode()).hexdigest()

    def _emit(self, cid: int, table: str, op: str, key: dict[str, object], before: Any, after: Any,
              tx_id: int | None = None) -> None:
        self.lsn += 96
        key_b = orjson.dumps(key)
        schema_table = f"public.{table}"
        self.templates.append((schema_table, key_b,
                               _envelope(op, before, after, self.lsn, self.now_ms, table, tx_id)))
        self.owner.append(cid)
        self.ops.append(op)
        if op == "d":  # tombstones.on.delete=true: the connector follows a delete with a tombstone
            self.templates.append((schema_table, key_b, None))
            self.owner.append(cid)
            self.ops.append("tombstone")

    def _attribute(self, cid: int, tx_id: int) -> None:
        """The message the branch database's statement trigger writes after a DELETE statement of
        transaction `tx_id` (`message_envelope`): what attributes its deletes to `BENCH_DELETER`."""
        self.lsn += 96
        self.templates.append((MESSAGE_TOPIC, MESSAGE_KEY, message_envelope(BENCH_DELETER, tx_id, self.lsn,
                                                                             self.now_ms)))
        self.owner.append(cid)
        self.ops.append("m")

    # changes -------------------------------------------------------------------------------------
    def _posting(self, cid: int, rows: list[Any]) -> None:
        rng = self.rng
        account = rng.choice(rows[1])
        name, counterparty = rng.choice(_PERSONAS.counterparties)
        txn = {"account_no": account["account_no"], "customer_id": cid,
               "amount": f"{rng.randrange(100, 2_000_000) / 100:.2f}", "direction": rng.choice("DC"),
               "counterparty_name": name, "counterparty_account": counterparty,
               "channel": rng.choice(("counter", "atm", "mobile", "online")), "memo": rng.choice(_PERSONAS.memos),
               "created_at": _iso(dt.datetime.fromtimestamp(self.now_ms / 1000, dt.UTC)), "txn_id": self.next_txn,
               PRINCIPAL_COLUMN: BENCH_PRINCIPAL}
        self.next_txn += 1
        self._emit(cid, "transactions", "c", {"txn_id": txn["txn_id"]}, None, txn)
        sign = 1 if txn["direction"] == "C" else -1
        balance = Decimal(str(account["balance"])) + sign * Decimal(str(txn["amount"]))
        updated = dict(account, balance=str(balance))
        self._emit(cid, "accounts", "u", {"account_no": account["account_no"]}, account, updated)
        rows[1][rows[1].index(account)] = updated

    def _contact_update(self, cid: int, rows: list[Any]) -> None:
        before = rows[0]
        after = dict(before, mobile=_mobile(self.rng.randrange(10**8)), address=self.rng.choice(_PERSONAS.addresses))
        self._emit(cid, "customers", "u", {"customer_id": cid}, before, after)
        rows[0] = after

    def _password_change(self, cid: int, rows: list[Any]) -> None:
        before = rows[2]
        after = dict(before, password_hash=self._digest(self.rng),
                     updated_at=_iso(dt.datetime.fromtimestamp(self.now_ms / 1000, dt.UTC)))
        self._emit(cid, "customer_auth", "u", {"customer_id": cid}, before, after)
        rows[2] = after

    def _new_customer(self) -> None:
        cid = self.next_new
        self.next_new += 1
        rows = self._rows(cid)
        self.state[cid] = rows
        self._emit(cid, "customers", "c", {"customer_id": cid}, None, rows[0])
        for account in rows[1]:
            self._emit(cid, "accounts", "c", {"account_no": account["account_no"]}, None, account)
        self._emit(cid, "customer_auth", "c", {"customer_id": cid}, None, rows[2])

    def _customer_leaves(self, cid: int, rows: list[Any]) -> None:
        """One transaction of three DELETE statements (authentication row, accounts, customer), each
        followed by its attribution message with the transaction's id."""
        tx_id = (self.lsn + 96) // 64  # as `_envelope` derives ids: no other event of the day has this one
        self._emit(cid, "customer_auth", "d", {"customer_id": cid}, rows[2], None, tx_id)
        self._attribute(cid, tx_id)
        for account in rows[1]:
            self._emit(cid, "accounts", "d", {"account_no": account["account_no"]}, account, None, tx_id)
        self._attribute(cid, tx_id)
        self._emit(cid, "customers", "d", {"customer_id": cid}, rows[0], None, tx_id)
        self._attribute(cid, tx_id)
        self.gone.add(cid)
        del self.state[cid]

    def _draw_customer(self) -> int:
        while True:
            rank = self.ranks.draw(self.rng.random())
            cid = (rank - 1) * self.step % self.population + 1
            if cid not in self.gone:
                return cid

    def build(self, records: int) -> Workload:
        """Exactly `records` events (the last change may be cut short at `records`, but never a customer
        leaving: a delete cut off from its attribution message would wait for it in vain)."""
        rng = self.rng
        cumulative, acc = [], 0.0
        for name, share in MIX:
            acc += share
            cumulative.append((acc, name))
        while len(self.templates) < records:
            u = rng.random()
            change = next((name for bound, name in cumulative if u < bound), MIX[0][0])
            if change == "new_customer":
                self._new_customer()
                continue
            if change == "customer_leaves" and records - len(self.templates) < _LEAVING_MAX_EVENTS:
                continue
            cid = self._draw_customer()
            rows = self.state.get(cid)
            if rows is None:
                rows = self.state[cid] = self._rows(cid)
            getattr(self, f"_{change}")(cid, rows)
        del self.templates[records:], self.owner[records:], self.ops[records:]
        order = list(range(len(self.templates)))
        replay = [i for i in order if self.owner[i] not in self.gone]
        counts: dict[str, dict[str, int]] = {t: {} for t in TABLES}
        for (table, _, _), op in zip(self.templates, self.ops, strict=True):
            ops = counts.setdefault(table, {})  # MESSAGE_TOPIC: the attribution messages ("m")
            ops[op] = ops.get(op, 0) + 1
        updates = sum(c.get("u", 0) for c in counts.values())
        customers = counts["public.customers"]
        facts = {"distinct_customers": len(set(self.owner)), "customers_created": customers.get("c", 0),
                 "customers_leaving": customers.get("d", 0), "zipf_s": self.ranks.s,
                 "tables": list(TABLES), "events": counts, "replayed_events": len(replay)}
        return Workload(self.templates, order, self.population, updates, "realistic", replay, facts)
