"""The bench's input: pre-encoded Debezium change events of synthetic customers (creates and updates)."""

from __future__ import annotations

import datetime as dt
import random
import time
from dataclasses import dataclass

import orjson

from guard.bench.common import EPOCH_DAY, TS_SENTINEL, TS_TAIL, BenchError
from guard.workload import synth


# --- the records ------------------------------------------------------------------------------------
@dataclass
class Workload:
    """Pre-encoded change events: `templates[i]` is (key, value without its closing `ts_ms}`)."""

    templates: list[tuple[bytes, bytes]]
    order: list[int]
    customers: int
    updates: int

    def value(self, template: int, ts_ms: int) -> bytes:
        """The event's value with the envelope's `ts_ms` set (the latency phase stamps the send time)."""
        return self.templates[template][1] + b"%d}" % ts_ms

    def mean_value_bytes(self) -> float:
        sample = self.order[:2000]
        return sum(len(self.templates[i][1]) + TS_TAIL for i in sample) / max(len(sample), 1)


#: Who the bench's changes are attributed to (policy/branch.cedar allows a teller to write her branch).
BENCH_PRINCIPAL = "Staff:t0101-01"


def _debezium_row(row: dict[str, object], created_at: str) -> dict[str, object]:
    """A synth customer as the PostgreSQL connector emits it (adaptive time: a date is days since epoch)."""
    out = dict(row)
    birth = row["birth_date"]
    if isinstance(birth, dt.date):
        out["birth_date"] = (birth - EPOCH_DAY).days
    out["created_at"] = created_at
    # The attribution column of the live schema: a teller of the branch, whom the demo policy allows.
    out["updated_by"] = BENCH_PRINCIPAL
    return out


def _envelope(op: str, before: dict[str, object] | None, after: dict[str, object], lsn: int, ts_ms: int) -> bytes:
    """One change event, `ts_ms` last so it can be replaced by byte splicing (see `Workload.value`)."""
    source = {
        "version": "3.6.1.Final", "connector": "postgresql", "name": "br0101", "ts_ms": ts_ms,
        "snapshot": "false", "db": "branch_0101", "sequence": f'["{lsn - 8}","{lsn}"]',
        "ts_us": ts_ms * 1000, "ts_ns": ts_ms * 1_000_000, "schema": "public", "table": "customers",
        "txId": lsn // 64, "lsn": lsn, "xmin": None,
    }
    event = {"before": before, "after": after, "source": source, "transaction": None, "op": op,
             "ts_ms": TS_SENTINEL}
    return orjson.dumps(event)


def build_workload(records: int, *, customers: int = 4000, update_share: float = 0.15, seed: int = 7) -> Workload:
    """`records` events over `customers` distinct synth customers (~85% creates, ~15% updates).

    Each customer has one create and one update template (new mobile and address, before and after
    images); records pick a customer at random, so the guard's key caches miss once per customer and
    worker, as they would on a branch with a few thousand active customers.
    """
    rng = random.Random(seed)
    now_ms = int(time.time() * 1000)
    templates: list[tuple[bytes, bytes]] = []
    for cid in range(1, customers + 1):
        created = dt.datetime.fromtimestamp(now_ms / 1000 - rng.randint(0, 86_400 * 365), dt.UTC)
        row = _debezium_row(synth.new_customer(rng, cid), created.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
        changed = dict(row, mobile=synth.mobile(rng), address=synth.address(rng))
        key = orjson.dumps({"customer_id": cid})
        lsn = 26_735_008 + cid * 4096
        for value in (_envelope("c", None, row, lsn, now_ms), _envelope("u", row, changed, lsn + 512, now_ms)):
            if not value.endswith(b'"ts_ms":%d}' % TS_SENTINEL):
                raise BenchError("internal: change event does not end with the ts_ms sentinel")
            templates.append((key, value[:-TS_TAIL]))
    order = [2 * rng.randrange(customers) + (rng.random() < update_share) for _ in range(records)]
    return Workload(templates, order, customers, sum(i % 2 for i in order))
