"""Observability on the real stack: a change followed by its trace id from the raw topic to the sanitized
and audit records and to the exported span; metrics on the Prometheus endpoint."""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from guard.errors import DecodeError
from guard.records.codec import decode
from tests.integration.kafka_helpers import GuardProcess, produce_raw, wait_for

pytestmark = pytest.mark.integration


class OtlpSink(BaseHTTPRequestHandler):
    """A minimal OTLP/HTTP receiver: keeps every span it is sent."""

    spans: list = []

    def do_POST(self) -> None:  # noqa: N802 - http.server API
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        if self.path == "/v1/traces":
            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
            for resource_spans in request.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    OtlpSink.spans.extend(scope_spans.spans)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_change_is_followable_by_trace_id_and_metrics_are_served(stack, tmp_path):
    server = HTTPServer(("127.0.0.1", free_port()), OtlpSink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    metrics_port = free_port()
    group = f"otel-{uuid.uuid4().hex[:8]}"
    worker = GuardProcess(stack, worker_id=group, group_id=group, log_dir=tmp_path, extra_env={
        "GUARD_OTLP_ENDPOINT": f"http://127.0.0.1:{server.server_port}",
        "GUARD_METRICS_PORT": str(metrics_port)}).start(from_end=True)
    try:
        bootstrap = stack["GUARD_KAFKA_BOOTSTRAP"]
        table = f"trace_{uuid.uuid4().hex[:8]}"
        trace_id, parent_span = uuid.uuid4().hex, uuid.uuid4().hex[:16]
        event = {"before": None, "after": {"id": 1, "note": "x"}, "op": "c", "ts_ms": 1,
                 "source": {"connector": "postgresql", "db": "branch_0101", "schema": "public", "table": table}}
        produce_raw(bootstrap, f"br0101.public.{table}", json.dumps(event).encode(), b'{"id": 1}',
                    headers=[("traceparent", f"00-{trace_id}-{parent_span}-01".encode())])
        sanitized = wait_for(bootstrap, f"sanitized.br0101.public.{table}", lambda rs: len(rs) >= 1, timeout=90)
        header = dict(sanitized[0].headers or [])["traceparent"].decode()
        assert header.split("-")[1] == trace_id and header.split("-")[2] != parent_span
        audit = wait_for(bootstrap, "guard.audit", lambda rs: any(
            _source_topic(r.value) == f"br0101.public.{table}" for r in rs))
        mine = next(r for r in audit if _source_topic(r.value) == f"br0101.public.{table}")
        assert decode(mine.value)["trace_id"] == trace_id
        assert dict(mine.headers or [])["traceparent"].decode() == header
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(s.trace_id.hex() == trace_id for s in OtlpSink.spans):
            time.sleep(0.5)
        span = next(s for s in OtlpSink.spans if s.trace_id.hex() == trace_id)
        assert span.parent_span_id.hex() == parent_span and span.name == "guard.sanitize"
        assert span.span_id.hex() == header.split("-")[2]
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        assert f'guard_events_total{{decision="protected",table="public.{table}"}}' in text
        assert "guard_latency_ms_bucket" in text and "guard_fields_protected_total" in text
    finally:
        worker.stop()
        server.shutdown()


def _source_topic(value: bytes | None) -> str | None:
    """An audit record's source topic; None for a record the guard did not write (the topic is shared)."""
    try:
        return decode(value or b"")["source_topic"]
    except DecodeError:
        return None
