"""Avro encoding of sanitized and audit records, self-describing or in Confluent wire format.

Two framings, both readable by `decode`:

- **Self-describing** (default, no registry): Avro single-object encoding from the Avro specification,
  `0xC3 0x01` + the 8-byte little-endian CRC-64-AVRO fingerprint of the schema's canonical form + the
  Avro binary body. Any Avro library finds the schema by fingerprint among the files in `schemas/`.
- **Confluent wire format** (when `schema_registry_url` is set): `0x00` + 4-byte big-endian schema id +
  body, with the schema registered under `<topic>-value`.
"""

from __future__ import annotations

import io
import json
import os
import struct
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import fastavro
import orjson
from fastavro.schema import fingerprint, parse_schema, to_parsing_canonical_form

from guard.errors import ConfigError, DecodeError
from guard.records.encoders import WRITERS

SINGLE_OBJECT_MAGIC = b"\xc3\x01"
CONFLUENT_MAGIC = b"\x00"


def schemas_dir() -> Path:
    env = os.environ.get("GUARD_SCHEMAS_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parents[2] / "schemas"
    if here.is_dir():
        return here
    raise ConfigError("cannot find the schemas/ directory; set GUARD_SCHEMAS_DIR")


@cache
def load_schema(name: str) -> dict[str, Any]:
    path = schemas_dir() / f"{name}.avsc"
    parsed: Any = parse_schema(json.loads(path.read_text()))
    return dict(parsed)


@cache
def schema_fingerprint(name: str) -> bytes:
    canonical = to_parsing_canonical_form(load_schema(name))
    return int(fingerprint(canonical, "CRC-64-AVRO"), 16).to_bytes(8, "little")


@cache
def _schemas_by_fingerprint() -> dict[bytes, str]:
    return {schema_fingerprint(p.stem): p.stem for p in schemas_dir().glob("*.avsc")}


class AvroCodec:
    """Encodes one record type; `registry` (a confluent_kafka SchemaRegistryClient) switches framing."""

    def __init__(self, schema_name: str, *, registry: Any = None, subject: str | None = None) -> None:
        self.schema_name = schema_name
        self.schema = load_schema(schema_name)
        self._buf = io.BytesIO()
        self._fast = WRITERS.get(schema_name)
        if registry is not None:
            from confluent_kafka.schema_registry import Schema

            schema_id = registry.register_schema(
                subject or f"{schema_name}-value", Schema(json.dumps(self.schema), "AVRO")
            )
            self.header = CONFLUENT_MAGIC + struct.pack(">I", schema_id)
        else:
            self.header = SINGLE_OBJECT_MAGIC + schema_fingerprint(schema_name)

    def encode(self, record: dict[str, Any]) -> bytes:
        if self._fast is not None:
            return self.header + self._fast(record)
        return self.encode_reference(record)

    def encode_reference(self, record: dict[str, Any]) -> bytes:
        """fastavro's encoding: the reference the specialised writers are tested against."""
        buf = self._buf
        buf.seek(0)
        buf.truncate()
        buf.write(self.header)
        fastavro.schemaless_writer(buf, self.schema, record)
        return buf.getvalue()


def decode(data: bytes, *, registry: Any = None) -> dict[str, Any]:
    """Decode a record in either framing (the downstream consumer's entry point)."""
    if data[:2] == SINGLE_OBJECT_MAGIC:
        name = _schemas_by_fingerprint().get(data[2:10])
        if name is None:
            raise DecodeError("unknown_schema", "no schema in schemas/ has this record's fingerprint")
        schema, body = load_schema(name), data[10:]
    elif data[:1] == CONFLUENT_MAGIC and registry is not None:
        (schema_id,) = struct.unpack(">I", data[1:5])
        schema = dict(parse_schema(json.loads(registry.get_schema(schema_id).schema_str)))  # type: ignore[arg-type]
        body = data[5:]
    else:
        raise DecodeError("unknown_framing", "not Avro single-object encoding nor Confluent wire format")
    record: Any = fastavro.schemaless_reader(io.BytesIO(body), schema, None)
    return dict(record)


#: The access policy's write decisions as audit decisions (docs/policy.md), by the policy's decision.
WRITE_DECISIONS = {"allow": "write_allowed", "deny": "write_denied", "unattributed": "unattributed"}


def write_reason(decision: Mapping[str, Any]) -> str:
    """The `reason` of a change's audit record that carries its write decision (audit format 2): the
    decision's JSON ({"decision", "principal", "action", "policies", "reason", "errors"}) with its audit
    name (`write_allowed`, `write_denied`, `unattributed`) first, under `write`."""
    name = WRITE_DECISIONS.get(str(decision.get("decision")), "unattributed")
    return orjson.dumps({"write": name, **decision}).decode()


def write_decision_of(record: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """(audit name, decision JSON) of the write decision a decoded audit record carries, else None.

    Both formats: 2 (`v` >= 2), the change's own record carries it in `reason` (`write_reason`); 1, a
    record of its own at the change's source offset, with the audit name as `decision` and the JSON as
    `reason` (no subject). An unreadable JSON reads as an empty decision, never as a guess.
    """
    decision, reason = record.get("decision"), record.get("reason")
    if decision in WRITE_DECISIONS.values():
        return str(decision), _json_object(reason)
    if int(record.get("v") or 1) >= 2 and isinstance(reason, str) and reason.startswith('{"write":'):
        detail = _json_object(reason)
        name = detail.pop("write", None)
        if name in WRITE_DECISIONS.values():
            return str(name), detail
    return None


def _json_object(text: Any) -> dict[str, Any]:
    try:
        doc = orjson.loads(text or "{}")
    except orjson.JSONDecodeError:
        return {}
    return doc if isinstance(doc, dict) else {}
