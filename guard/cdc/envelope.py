"""Decoding of Debezium change events (JSON converter, with or without the `schema`/`payload` wrapper).

The decoder is the guard's input boundary: everything that is not a well-formed change event raises
`DecodeError` with a short reason code, so the sanitizer can put it on the DLQ and keep going. It never
guesses: an unknown op, a non-object image or a missing source table is an error, not a pass-through.

Shapes handled:
- ops `c` (create), `u` (update), `d` (delete), `r` (snapshot read), `t` (truncate), `m` (logical message);
- tombstones (a null Kafka value after a delete) are reported as `None`;
- the `schema`/`payload` wrapper of `value.converter.schemas.enable=true`, with Kafka Connect `Decimal`
  and Debezium `VariableScaleDecimal` fields turned back into exact decimal strings (up to
  `MAX_DECIMAL_BYTES` and `MAX_DECIMAL_SCALE`; larger ones are refused with `decimal_too_large`, because
  decoding them costs quadratic time);
- PostgreSQL (`schema`, `table`, `lsn`) and MariaDB/MySQL (`db`, `table`, `file`, `pos`) `source` blocks.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import orjson

from guard.errors import DecodeError

VALID_OPS = frozenset({"c", "u", "d", "r", "t", "m"})
#: Largest change-event value accepted, in bytes. Kafka's default max message size is 1 MiB; larger values
#: are almost certainly a misconfiguration or an attack on the decoder's memory.
MAX_VALUE_BYTES = 4 * 1024 * 1024

#: Largest unscaled value of a decimal column, in bytes (two's complement): 512 bytes is 1,233 decimal
#: digits, more than PostgreSQL's largest declared precision (1,000). Turning the bytes into decimal text
#: costs time quadratic in their length, so a larger value is refused (`decimal_too_large`), not decoded.
MAX_DECIMAL_BYTES = 512
#: Largest scale (digits after the point, either sign) of a decimal column; PostgreSQL's is 16,383.
MAX_DECIMAL_SCALE = 16_383

Row = dict[str, Any]


@dataclass(slots=True)
class ChangeEvent:
    """One decoded change event; `before`/`after` are column → value maps (None where absent)."""

    op: str
    before: Row | None
    after: Row | None
    schema_table: str
    database: str
    connector: str
    ts_ms: int | None
    source_ts_ms: int | None
    position: str
    message: Row | None = None
    #: The source transaction's id: what joins a delete with the attribution message naming its principal
    #: (docs/policy.md). PostgreSQL: the xid (`source.txId`, an int); MariaDB: the transaction's GTID
    #: (`source.gtid`, e.g. "0-1-42", on every row event of the transaction). None when the connector gives none
    #: (a snapshot read).
    tx_id: int | str | None = None

    @property
    def table(self) -> str:
        return self.schema_table.rpartition(".")[2]


def decode_value(raw: bytes | None) -> ChangeEvent | None:
    """Decode a Kafka record value into a change event; `None` means a tombstone."""
    if raw is None:
        return None
    return decode_document(parse_value(raw))


def parse_value(raw: bytes) -> Any:
    """The JSON document of a non-null record value, within the decoder's limits (else `DecodeError`)."""
    if len(raw) > MAX_VALUE_BYTES:
        raise DecodeError("too_large", f"value of {len(raw)} bytes exceeds the {MAX_VALUE_BYTES}-byte limit")
    if not raw:
        raise DecodeError("empty", "empty record value (not a tombstone: tombstones have a null value)")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        reason = "invalid_utf8" if "utf-8" in str(exc).lower() else "invalid_json"
        raise DecodeError(reason, f"value is not valid JSON at byte {getattr(exc, 'pos', '?')}") from None
    return doc


def decode_document(doc: Any) -> ChangeEvent | None:
    """Decode an already-parsed JSON document (used by `guard sanitize` and by `decode_value`)."""
    if doc is None:
        return None
    if not isinstance(doc, dict):
        raise DecodeError("wrong_shape", f"value is a JSON {type(doc).__name__}, expected an object")
    schema = None
    if "payload" in doc and "schema" in doc and "op" not in doc:
        schema = doc["schema"]
        doc = doc["payload"]
        if doc is None:
            return None
        if not isinstance(doc, dict):
            raise DecodeError("wrong_shape", "schema wrapper's payload is not an object")
    op = doc.get("op")
    if not isinstance(op, str):
        raise DecodeError("missing_op", "no 'op' field: not a Debezium change event envelope")
    if op not in VALID_OPS:
        raise DecodeError("unknown_op", f"unknown op code {op[:8]!r}")
    source = doc.get("source")
    if not isinstance(source, dict):
        raise DecodeError("missing_source", "no 'source' block")
    table = source.get("table")
    if op != "m" and not isinstance(table, str):
        raise DecodeError("missing_table", "source block names no table")
    before = _image(doc, "before")
    after = _image(doc, "after")
    if schema is not None and isinstance(schema, dict):
        decimals = _decimal_fields(schema)
        if decimals:
            before = _restore_decimals(before, decimals.get("before", {}))
            after = _restore_decimals(after, decimals.get("after", {}))
    if op in ("c", "r") and after is None:
        raise DecodeError("wrong_shape", f"op {op!r} without an 'after' image")
    if op == "u" and after is None:
        raise DecodeError("wrong_shape", "update without an 'after' image")
    if op == "d" and before is None:
        raise DecodeError("wrong_shape", "delete without a 'before' image")
    message = doc.get("message") if op == "m" else None
    if op == "m" and not isinstance(message, dict):
        raise DecodeError("wrong_shape", "logical message event without a 'message' block")
    namespace = source.get("schema") or source.get("db") or ""
    if not isinstance(namespace, str):
        raise DecodeError("wrong_shape", "source schema/db is not a string")
    ts_ms = doc.get("ts_ms")
    source_ts = source.get("ts_ms")
    return ChangeEvent(
        op=op,
        before=before,
        after=after,
        schema_table=f"{namespace}.{table}" if table else f"{namespace}.<message>",
        database=str(source.get("db") or ""),
        connector=str(source.get("connector") or ""),
        ts_ms=ts_ms if isinstance(ts_ms, int) else None,
        source_ts_ms=source_ts if isinstance(source_ts, int) else None,
        position=_position(source),
        message=message,
        tx_id=_tx_id(source),
    )


def _tx_id(source: dict[str, Any]) -> int | str | None:
    """The source transaction's id: PostgreSQL's `txId` (an int), else MariaDB's/MySQL's `gtid` (a string)."""
    tx_id = source.get("txId")
    if isinstance(tx_id, int) and not isinstance(tx_id, bool):
        return tx_id
    gtid = source.get("gtid")
    if isinstance(gtid, str) and gtid and len(gtid) <= 200:
        return gtid
    return None


def _image(doc: dict[str, Any], name: str) -> Row | None:
    value = doc.get(name)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise DecodeError("wrong_shape", f"'{name}' image is a {type(value).__name__}, expected an object")
    return value


def _position(source: dict[str, Any]) -> str:
    """A connector-neutral source position string (PostgreSQL LSN or binlog file:pos) for audit."""
    if "lsn" in source and source["lsn"] is not None:
        return f"lsn:{source['lsn']}"
    if "file" in source and "pos" in source:
        return f"binlog:{source['file']}:{source['pos']}"
    return ""


def _decimal_fields(schema: dict[str, Any]) -> dict[str, dict[str, int | None]]:
    """Map image name → {column: scale} for Decimal columns (scale None = VariableScaleDecimal)."""
    found: dict[str, dict[str, int | None]] = {}
    for image in schema.get("fields") or ():
        if not isinstance(image, dict) or image.get("field") not in ("before", "after"):
            continue
        columns: dict[str, int | None] = {}
        for col in image.get("fields") or ():
            if not isinstance(col, dict):
                continue
            name = col.get("name")
            if name == "org.apache.kafka.connect.data.Decimal":
                params = col.get("parameters") or {}
                try:
                    columns[str(col.get("field"))] = int(params.get("scale", 0))
                except (TypeError, ValueError):
                    raise DecodeError("wrong_shape", "Decimal field with a non-integer scale") from None
            elif name == "io.debezium.data.VariableScaleDecimal":
                columns[str(col.get("field"))] = None
        if columns:
            found[str(image["field"])] = columns
    return found


def _restore_decimals(row: Row | None, columns: dict[str, int | None]) -> Row | None:
    if row is None or not columns:
        return row
    out = dict(row)
    for column, scale in columns.items():
        value = out.get(column)
        if value is None:
            continue
        if scale is None:
            if not isinstance(value, dict):
                raise DecodeError("wrong_shape", f"VariableScaleDecimal column {column!r} is not an object")
            out[column] = _decode_decimal(value.get("value"), value.get("scale"), column)
        elif isinstance(value, str):
            out[column] = _decode_decimal(value, scale, column)
    return out


def _decode_decimal(encoded: Any, scale: Any, column: str) -> str:
    if not isinstance(encoded, str) or not isinstance(scale, int):
        raise DecodeError("wrong_shape", f"decimal column {column!r} is not base64 with an integer scale")
    # 4 base64 characters per 3 bytes: anything longer can't decode to MAX_DECIMAL_BYTES or fewer.
    if len(encoded) > 4 * -(-MAX_DECIMAL_BYTES // 3) or abs(scale) > MAX_DECIMAL_SCALE:
        raise DecodeError("decimal_too_large", f"decimal column {column!r} exceeds {MAX_DECIMAL_BYTES} bytes "
                          f"or a scale of {MAX_DECIMAL_SCALE}")
    try:
        unscaled = int.from_bytes(base64.b64decode(encoded, validate=True), "big", signed=True)
    except ValueError:
        raise DecodeError("wrong_shape", f"decimal column {column!r} is not valid base64") from None
    if unscaled.bit_length() > 8 * MAX_DECIMAL_BYTES:
        raise DecodeError("decimal_too_large", f"decimal column {column!r} exceeds {MAX_DECIMAL_BYTES} bytes")
    # Exponent set directly: `scaleb` would round to the decimal context's 28 significant digits.
    sign, digits, _exp = Decimal(unscaled).as_tuple()
    return str(Decimal((sign, digits, -scale)))
