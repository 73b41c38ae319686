"""Traces and metrics, kept off the per-event path where possible.

Traces: each change event gets a span (`guard.sanitize`) whose parent is the W3C `traceparent` Kafka
header of the raw record, if any; the span's context is written into the `traceparent` header of every
record the event produced (sanitized, audit, DLQ, alerts, deletions) and its trace id into the audit
record, so a change can be followed across topics. Spans are exported over OTLP/HTTP when
`otlp_endpoint` is set; without it no spans are made, but an incoming `traceparent` is still carried
through to the outputs.

Metrics: the runner keeps plain counters per batch (cheap dict increments); `Telemetry.on_commit`
turns each committed batch's deltas into OpenTelemetry instruments (exported over OTLP when configured)
and Prometheus metrics (served on `metrics_port` when set). Nothing here ever sees field values:
attributes are table names, classes, decisions and reason codes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from guard.config import Settings

Headers = list[tuple[str, str | bytes | None]]
TRACEPARENT = "traceparent"


def trace_id_of(traceparent: bytes | str | None) -> str | None:
    """The trace id of a W3C traceparent value (`00-<32 hex>-<16 hex>-<2 hex>`), if well formed."""
    if traceparent is None:
        return None
    text = traceparent.decode("ascii", "replace") if isinstance(traceparent, bytes) else traceparent
    parts = text.split("-")
    if len(parts) != 4 or len(parts[1]) != 32:
        return None
    return parts[1]


def incoming_traceparent(headers: Sequence[tuple[str, Any]] | None) -> bytes | None:
    if not headers:
        return None
    for name, value in headers:
        if name == TRACEPARENT:
            return value if isinstance(value, bytes) else None
    return None


class Telemetry:
    """Everything observability for one worker; a no-op when nothing is configured."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.tracer: Any = None
        self._propagator: Any = None
        self._otel: dict[str, Any] = {}
        self._prom: dict[str, Any] = {}
        self.lag: dict[str, int] = {}
        self._lag_lock = threading.Lock()
        #: Output partitions whose last stable offset is stuck (hanging transactions), with the records
        #: read_committed consumers can't reach (`on_hanging`, from the worker's hanging-transaction watch).
        self.hanging: dict[str, int] = {}
        #: Assigned partitions not fetched for longer than the limit -> seconds (`on_not_fetching`).
        self.not_fetching: dict[str, float] = {}
        if settings.otlp_endpoint:
            self._setup_otlp(settings)
        if settings.metrics_port:
            self._setup_prometheus(settings.metrics_port)

    @property
    def tracing(self) -> bool:
        return self.tracer is not None

    # --- tracing --------------------------------------------------------------------------------
    def _setup_otlp(self, settings: Settings) -> None:
        from opentelemetry import metrics as otel_metrics
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        endpoint = settings.otlp_endpoint.rstrip("/")
        resource = Resource.create({"service.name": "branchguard-sanitizer",
                                    "service.instance.id": settings.worker_id, "branchguard.branch": settings.branch})
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces")))
        self._tracer_provider = provider
        self.tracer = provider.get_tracer("guard.sanitizer")
        self._propagator = TraceContextTextMapPropagator()
        reader = PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=f"{endpoint}/v1/metrics"),
                                               export_interval_millis=5000)
        self._meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
        meter = self._meter_provider.get_meter("guard.sanitizer")
        self._otel = {
            "events": meter.create_counter("guard.events", description="Change events consumed"),
            "records_out": meter.create_counter("guard.records.out", description="Records produced"),
            "fields": meter.create_counter("guard.fields.protected", description="Fields protected, by class"),
            "decisions": meter.create_counter("guard.decisions", description="Decisions, by outcome"),
            "dlq": meter.create_counter("guard.dlq", description="Records sent to the DLQ, by reason"),
            "latency": meter.create_histogram("guard.latency", unit="ms",
                                              description="Change timestamp to committed output"),
        }
        meter.create_observable_gauge("guard.consumer.lag", callbacks=[self._observe_lag],
                                      description="Records behind the end of each raw partition")
        meter.create_observable_gauge("guard.hanging.transactions", callbacks=[self._observe_hanging],
                                      description="Records stuck behind a hanging transaction, per output "
                                                  "partition (0 once resolved)")
        meter.create_observable_gauge("guard.partitions.not_fetching", callbacks=[self._observe_not_fetching],
                                      unit="s", description="Seconds an assigned partition has gone without "
                                                            "fetching, once past the limit")
        del otel_metrics

    def _observe_lag(self, _options: Any) -> Any:
        from opentelemetry.metrics import Observation

        with self._lag_lock:
            return [Observation(v, {"partition": k}) for k, v in self.lag.items()]

    def _observe_hanging(self, _options: Any) -> Any:
        from opentelemetry.metrics import Observation

        with self._lag_lock:
            return [Observation(v, {"partition": k}) for k, v in self.hanging.items()]

    def _observe_not_fetching(self, _options: Any) -> Any:
        from opentelemetry.metrics import Observation

        with self._lag_lock:
            return [Observation(v, {"partition": k}) for k, v in self.not_fetching.items()]

    def start_event(self, headers: Any, topic: str, partition: int,
                    offset: int) -> tuple[Any, Headers | None, str | None]:
        """Open the event's span; returns (span or None, headers for outputs, trace id for audit)."""
        parent_header = incoming_traceparent(headers)
        if self.tracer is None:
            if parent_header is None:
                return None, None, None
            return None, [(TRACEPARENT, parent_header)], trace_id_of(parent_header)
        from opentelemetry.trace import SpanKind, set_span_in_context

        carrier = {TRACEPARENT: parent_header.decode("ascii", "replace")} if parent_header else {}
        parent = self._propagator.extract(carrier)
        span = self.tracer.start_span("guard.sanitize", context=parent, kind=SpanKind.CONSUMER, attributes={
            "messaging.system": "kafka", "messaging.source.name": topic,
            "messaging.kafka.source.partition": partition, "messaging.kafka.message.offset": offset,
        })
        out: dict[str, str] = {}
        self._propagator.inject(out, context=set_span_in_context(span))
        value = out.get(TRACEPARENT)
        return span, [(TRACEPARENT, value.encode())] if value else None, trace_id_of(value)

    @staticmethod
    def end_event(span: Any, table: str | None, decision: str) -> None:
        if span is not None:
            span.set_attribute("db.collection.name", table or "")
            span.set_attribute("branchguard.decision", decision)
            span.end()

    # --- metrics --------------------------------------------------------------------------------
    def _setup_prometheus(self, port: int) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

        registry = CollectorRegistry()
        self._prom = {
            "events": Counter("guard_events", "Change events consumed", ["table", "decision"], registry=registry),
            "records_out": Counter("guard_records_out", "Records produced", registry=registry),
            "fields": Counter("guard_fields_protected", "Fields protected, by class", ["data_class"],
                              registry=registry),
            "dlq": Counter("guard_dlq", "Records sent to the DLQ, by reason", ["reason"], registry=registry),
            "transactions": Counter("guard_transactions", "Committed transactions", registry=registry),
            "latency": Histogram("guard_latency_ms", "Change timestamp to committed output (ms)",
                                 buckets=(5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000), registry=registry),
            "lag": Gauge("guard_consumer_lag", "Records behind the end of each raw partition", ["partition"],
                         registry=registry),
            "hanging": Gauge("guard_hanging_transaction_records",
                             "Records stuck behind a hanging transaction, per output partition (0: resolved)",
                             ["partition"], registry=registry),
            "not_fetching": Gauge("guard_partition_not_fetching_seconds",
                                  "Seconds an assigned partition has gone without fetching, once past the limit "
                                  "(0: fetched again)", ["partition"], registry=registry),
        }
        start_http_server(port, addr="127.0.0.1", registry=registry)

    def on_commit(self, events: Mapping[tuple[str, str], int], fields: Mapping[str, int],
                  dlq: Mapping[str, int], records_out: int, timestamps_ms: Sequence[int]) -> None:
        """Publish one committed batch: events by (table, decision), fields by class, DLQ by reason."""
        if not self._otel and not self._prom:
            return
        now_ms = time.time() * 1000
        latencies = [now_ms - ts for ts in timestamps_ms if ts > 0]
        if self._otel:
            o = self._otel
            for (table, decision), n in events.items():
                o["events"].add(n, {"table": table, "decision": decision})
                o["decisions"].add(n, {"decision": decision})
            for cls, n in fields.items():
                o["fields"].add(n, {"data_class": cls})
            for reason, n in dlq.items():
                o["dlq"].add(n, {"reason": reason})
            o["records_out"].add(records_out)
            for latency in latencies:
                o["latency"].record(latency)
        if self._prom:
            p = self._prom
            for (table, decision), n in events.items():
                p["events"].labels(table, decision).inc(n)
            for cls, n in fields.items():
                p["fields"].labels(cls).inc(n)
            for reason, n in dlq.items():
                p["dlq"].labels(reason).inc(n)
            p["records_out"].inc(records_out)
            p["transactions"].inc()
            for latency in latencies:
                p["latency"].observe(latency)

    def on_stats(self, stats: Mapping[str, Any]) -> None:
        """The consumer's parsed librdkafka statistics: keep each assigned partition's consumer lag."""
        lag: dict[str, int] = {}
        for topic, tstats in (stats.get("topics") or {}).items():
            for pid, pstats in (tstats.get("partitions") or {}).items():
                value = pstats.get("consumer_lag", -1)
                if pid != "-1" and isinstance(value, int) and value >= 0:
                    lag[f"{topic}[{pid}]"] = value
        with self._lag_lock:
            self.lag = lag
        if self._prom:
            for key, value in lag.items():
                self._prom["lag"].labels(key).set(value)

    def on_hanging(self, hanging: Mapping[str, int]) -> None:
        """The hanging-transaction watch's latest finding: output partition -> records stuck behind it."""
        with self._lag_lock:
            resolved = {key: 0 for key in self.hanging if key not in hanging}
            self.hanging = {**resolved, **hanging}
            current = dict(self.hanging)
            self.hanging = dict(hanging)
        if self._prom:
            for key, value in current.items():
                self._prom["hanging"].labels(key).set(value)

    def on_not_fetching(self, overdue: Mapping[str, float]) -> None:
        """The fetch watch's latest finding: assigned partition -> seconds it has gone without fetching (only
        partitions past the limit; 0 once fetched again)."""
        with self._lag_lock:
            if not overdue and not self.not_fetching:
                return
            current = {**{key: 0.0 for key in self.not_fetching if key not in overdue}, **overdue}
            self.not_fetching = dict(overdue)
        if self._prom:
            for key, value in current.items():
                self._prom["not_fetching"].labels(key).set(value)

    def shutdown(self) -> None:
        for name in ("_tracer_provider", "_meter_provider"):
            provider = getattr(self, name, None)
            if provider is not None:
                provider.shutdown()
