"""The CLI as a user runs it: `guard sanitize` on change events it never saw, `guard classify`,
`guard stack env`."""

from __future__ import annotations

import base64
import json
import os
import random
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest

from guard.workload import synth
from tests.integration.kafka_helpers import REPO

pytestmark = pytest.mark.integration


def guard(env: dict[str, str], *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "guard.cli", *args], cwd=REPO, env={**os.environ, **env},
                          input=stdin, capture_output=True, timeout=120)


def envelope(table: str, op: str, before: dict | None, after: dict | None, wrapped: bool = False) -> dict:
    payload = {"before": before, "after": after, "op": op, "ts_ms": 1,
               "source": {"connector": "postgresql", "db": "branch_0101", "schema": "public", "table": table,
                          "lsn": 5, "ts_ms": 1}}
    return {"schema": {"type": "struct", "fields": []}, "payload": payload} if wrapped else payload


def test_sanitize_offline_in_order_with_failures_reported(stack):
    rng = random.Random()
    rows = []
    secrets: set[str] = set()
    for i in range(4):
        idn, mob, card, name = synth.resident_id(rng), synth.mobile(rng), synth.bank_card(rng), synth.chinese_name(rng)
        secrets |= {idn, mob, card, name}
        rows.append({"id": i, "zjhm": idn, "lxdh": mob, "kh": card, "xm": name})
    table = f"offline_{uuid.uuid4().hex[:6]}"
    lines = [
        json.dumps(envelope(table, "c", None, rows[0]), ensure_ascii=False),
        json.dumps(envelope(table, "u", rows[0], rows[1], wrapped=True), ensure_ascii=False),
        "{broken json",
        json.dumps(envelope(table, "d", rows[2], None), ensure_ascii=False),
        "null",
        json.dumps(envelope(table, "q", None, rows[3]), ensure_ascii=False),
        json.dumps(envelope("customers", "r", None, {"customer_id": 77, "name": rows[3]["xm"],
                                                    "mobile": rows[3]["lxdh"], "branch_code": "0101"}),
                   ensure_ascii=False),
    ]
    done = guard(stack, "sanitize", stdin=("\n".join(lines) + "\n").encode())
    assert done.returncode == 1
    out = [json.loads(line) for line in done.stdout.decode().splitlines()]
    assert [o["op"] if o else None for o in out] == ["c", "u", "d", None, "r"]
    errors = done.stderr.decode()
    assert "line 3: invalid_json" in errors and "line 6: unknown_op" in errors
    assert "2 line(s) could not be sanitized" in errors
    for secret in secrets:
        assert secret not in done.stdout.decode() and secret not in errors
    assert set(out[0]["unclassified"]) == {"id", "zjhm", "lxdh", "kh", "xm"}
    assert out[0]["after"]["masked"] == {} and out[1]["after"]["masked"] == {}  # no display form for unknown columns
    assert out[4]["after"]["clear"] == {"customer_id": 77, "branch_code": "0101"}
    assert out[4]["after"]["masked"]["mobile"].startswith(rows[3]["lxdh"][:3])
    base64.b64decode(out[0]["after"]["sealed"]["ct"])


def test_sanitize_dlq_file(stack, tmp_path):
    dlq = tmp_path / "dlq.jsonl"
    done = guard(stack, "sanitize", "--dlq", str(dlq), stdin=b'{"op": "c"}\n')
    assert done.returncode == 1
    assert json.loads(dlq.read_text()) == {"line": 1, "reason": "missing_source", "detail": "no 'source' block"}


def test_classify_table_reports_catalog_and_detections(stack):
    rng = random.Random()
    table = f"audit_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(stack["GUARD_BRANCH_DSN"], autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (id serial PRIMARY KEY, col_a text, col_b text, col_c text, qty int)")
        for _ in range(20):
            conn.execute(f"INSERT INTO {table} (col_a, col_b, col_c, qty) VALUES (%s, %s, %s, 3)",
                         (synth.resident_id(rng), synth.mobile(rng), synth.bank_card(rng)))
    done = guard(stack, "classify", "--table", f"public.{table}", "--json")
    assert done.returncode == 0, done.stderr
    report = {r["column"]: r for r in json.loads(done.stdout)}
    assert "resident_id" in report["col_a"]["why"] and report["col_a"]["action"] == "encrypt"
    assert "mobile" in report["col_b"]["why"]
    assert "bank_card" in report["col_c"]["why"]
    assert report["qty"]["action"] == "encrypt"  # unknown, undetected: still fail closed
    known = {r["column"]: r for r in json.loads(guard(stack, "classify", "--table", "public.customers",
                                                      "--json").stdout)}
    assert known["id_number"]["why"].startswith("catalog") and known["id_number"]["class"] == "C2"


def test_stack_env_prints_exports(stack):
    done = guard(stack, "stack", "env")
    lines = done.stdout.decode().splitlines()
    for name in ("GUARD_KAFKA_BOOTSTRAP", "GUARD_CONNECT_URL", "GUARD_BRANCH_DSN", "GUARD_REDIS_URL",
                 "GUARD_RAW_TOPIC_PREFIX", "GUARD_REDIS_PASSWORD_FILE", "GUARD_CONNECT_CREDENTIALS_FILE"):
        assert any(line.startswith(f"export {name}=") for line in lines)
    # issue 20: where the guard's Kafka credentials are, never the password itself
    exports = dict(line.removeprefix("export ").split("=", 1) for line in lines if line.startswith("export "))
    assert exports["GUARD_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL" and exports["GUARD_KAFKA_USERNAME"] == "guard"
    password_file = Path(exports["GUARD_KAFKA_PASSWORD_FILE"])
    assert password_file.stat().st_mode & 0o077 == 0
    assert password_file.read_text().strip() not in done.stdout.decode()
    assert Path(exports["GUARD_KAFKA_CA_FILE"]).is_file()
    # and where the other credentials are, never their values
    from guard.stack.config import StackConfig
    from guard.stack.secrets import StackSecrets

    secrets = StackSecrets(StackConfig.from_env())
    for name in ("redis-guard", "redis-admin", "pg-app", "pg-cdc", "pg-superuser", "connect-rest"):
        assert secrets.password(name) not in done.stdout.decode()


def test_classify_topic_sample(stack):
    done = guard(stack, "classify", "--topic", "br0101.public.customers", "--sample", "50", "--json")
    assert done.returncode == 0, done.stderr
    report = {r["column"]: r for r in json.loads(done.stdout)}
    assert report["mobile"]["why"].startswith("catalog") and report["mobile"]["action"] == "encrypt"
    assert report["customer_id"]["action"] == "clear"
