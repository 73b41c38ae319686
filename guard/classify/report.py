"""`guard classify`: what each column of a table or topic is classified as, and why.

Catalogued columns report the catalog's verdict; the others report what the content detectors found in a
sample and the fail-closed action the guard takes. No sampled value is ever printed.
"""

from __future__ import annotations

from typing import Any

import orjson
import psycopg
from confluent_kafka import Consumer, TopicPartition
from psycopg import sql

from guard.cdc.envelope import decode_value
from guard.classify.catalog import Catalog, ColumnPolicy
from guard.classify.detectors import detect_column
from guard.classify.plans import infer_policy
from guard.config import Settings
from guard.errors import ConfigError, DecodeError
from guard.kafka_security import client_config


def _report(catalog: Catalog, schema_table: str, samples: dict[str, list[Any]]) -> list[dict[str, Any]]:
    rows = []
    for column, values in samples.items():
        policy: ColumnPolicy | None = catalog.column(schema_table, column)
        if policy is not None:
            why = "catalog" + (f"; mask {policy.mask}" if policy.mask else "")
            why += "; blind index" if policy.index else ""
        else:
            detection = detect_column(column, [v for v in values if v is not None])
            policy = infer_policy(column, next((v for v in values if v is not None), None))
            if detection is not None:
                why = (f"not in catalog; detected {detection.kind} ({detection.confidence:.2f}): {detection.reason}; "
                       "fail closed")
            else:
                why = "not in catalog; no detector matched; fail closed"
        rows.append({"table": schema_table, "column": column, "class": policy.data_class,
                     "category": policy.category, "action": policy.action.value, "sensitive": policy.sensitive,
                     "why": why})
    return rows


def classify_table(settings: Settings, schema_table: str, sample: int) -> list[dict[str, Any]]:
    schema, _, table = schema_table.rpartition(".")
    schema = schema or "public"
    catalog = Catalog.load(settings.catalog or None)
    with psycopg.connect(settings.branch_dsn) as conn:
        cur = conn.execute(
            sql.SQL("SELECT * FROM {}.{} LIMIT %s").format(sql.Identifier(schema), sql.Identifier(table)), (sample,)
        )
        names = [d.name for d in cur.description or ()]
        if not names:
            raise ConfigError(f"table {schema}.{table} has no columns or does not exist")
        data = cur.fetchall()
    samples = {n: [row[i] for row in data] for i, n in enumerate(names)}
    return _report(catalog, f"{schema}.{table}", samples)


def classify_topic(settings: Settings, topic: str, sample: int) -> list[dict[str, Any]]:
    catalog = Catalog.load(settings.catalog or None)
    consumer = Consumer(client_config(settings, **{"group.id": "guard-classify", "enable.auto.commit": False}))
    samples: dict[str, list[Any]] = {}
    schema_table = topic.partition(".")[2]
    try:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or not meta.partitions:
            raise ConfigError(f"topic {topic} does not exist")
        consumer.assign([TopicPartition(topic, p, 0) for p in meta.partitions])
        seen, idle = 0, 0
        while seen < sample and idle < 3:
            msgs = consumer.consume(min(500, sample), 1.0)
            if not msgs:
                idle += 1
                continue
            for msg in msgs:
                if msg.error():
                    continue
                try:
                    event = decode_value(msg.value())
                except (DecodeError, orjson.JSONDecodeError):
                    continue
                if event is None:
                    continue
                schema_table = event.schema_table
                for column, value in (event.after or event.before or {}).items():
                    samples.setdefault(column, []).append(value)
                seen += 1
    finally:
        consumer.close()
    return _report(catalog, schema_table, samples)
