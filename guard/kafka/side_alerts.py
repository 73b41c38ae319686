"""Alerts a worker sends outside its transactions: when the transactions may be what is stuck.

The guard's anomaly alerts normally travel inside the worker's Kafka transaction, with the records they
are about. The watches of the Kafka plumbing itself (a hanging transaction on an output partition,
`guard.kafka.hanging`; assigned partitions the consumer never fetches, `guard.kafka.fetching`) report
exactly when that path may be blocked, so their alerts go out through an idempotent, non-transactional
producer of their own, created at the first alert. Each is sent to a partition of the anomalies topic that
is not known to be hanging: a record behind a hanging transaction is as unreadable as the rest.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Collection, Mapping
from typing import Any

import orjson
from confluent_kafka import Producer

from guard.kafka.partitioning import java_string_hash

log = logging.getLogger("guard.kafka.side_alerts")

#: How long a send waits for the broker's acknowledgement before the watch goes on (the record stays queued).
FLUSH_S = 10.0


class SideAlerts:
    """Sends alert records to the anomalies topic from any thread, avoiding partitions known to hang."""

    def __init__(self, producer_config: Mapping[str, Any], topic: str, *,
                 partitions_of: Callable[[str], int | None],
                 new_producer: Callable[[dict[str, Any]], Producer] = Producer) -> None:
        self.topic = topic
        self._producer_config = dict(producer_config)
        self._partitions_of = partitions_of
        self._new_producer = new_producer
        self._producer: Producer | None = None
        self._lock = threading.Lock()
        #: Partitions of `topic` the hanging-transaction watch last found hanging.
        self._hanging: frozenset[int] = frozenset()

    def hanging(self, partitions: Collection[int]) -> None:
        """The anomalies topic's partitions currently hanging (the hanging-transaction watch says so)."""
        self._hanging = frozenset(partitions)

    def send(self, key: bytes, value: bytes) -> bool:
        """Send one alert (keyed: the same key always lands on the same good partition); False if every
        partition of the topic is hanging, so none would make it readable."""
        count = self._partitions_of(self.topic) or 1
        good = [p for p in range(count) if p not in self._hanging]
        if not good:
            log.error("every partition of %s is hanging: the alert can't be made readable", self.topic)
            return False
        with self._lock:
            if self._producer is None:
                self._producer = self._new_producer(self._producer_config)
            producer = self._producer
        producer.produce(self.topic, value, key, partition=good[java_string_hash(key.decode()) % len(good)])
        if producer.flush(FLUSH_S):
            log.warning("an alert to %s is not acknowledged after %.0f s; it stays queued", self.topic, FLUSH_S)
        return True


def critical_alert(rule: str, scope: str, namespace: uuid.UUID, *, branch: str, worker: str, now: float,
                   **details: Any) -> tuple[bytes, bytes]:
    """Key and value of a watch's critical alert, in the shape of the guard's anomalies (table and column
    empty: it is about the stream, not a column). The id derives from `scope`, so the same finding
    reported again (a restarted worker, a retry) updates the alert instead of adding one."""
    alert = {
        "type": "anomaly",
        "id": str(uuid.uuid5(namespace, scope)),
        "rule": rule,
        "severity": "critical",
        "branch": branch,
        "table": None,
        "column": None,
        "at_ms": int(now * 1000),
        "worker": worker,
        **details,
    }
    return scope.encode(), orjson.dumps(alert)
