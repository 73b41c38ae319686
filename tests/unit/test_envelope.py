import base64
import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guard.cdc.envelope import MAX_VALUE_BYTES, _decode_decimal, decode_value
from guard.errors import DecodeError

PG_SOURCE = {"version": "3.6.1.Final", "connector": "postgresql", "name": "br0101", "ts_ms": 1700000000000,
             "db": "branch_0101", "schema": "public", "table": "customers", "lsn": 123456, "txId": 77}
MARIA_SOURCE = {"connector": "mariadb", "name": "m", "db": "app", "table": "orders", "file": "bin.000003",
                "pos": 4455, "ts_ms": 1}


def env(op="c", before=None, after=None, source=None, **extra):
    doc = {"before": before, "after": after, "source": source or PG_SOURCE, "op": op, "ts_ms": 1700000000123}
    doc.update(extra)
    return json.dumps(doc, ensure_ascii=False).encode()


def test_create_without_schema_wrapper():
    ev = decode_value(env(after={"customer_id": 1, "name": "张三"}))
    assert ev is not None
    assert ev.op == "c" and ev.schema_table == "public.customers" and ev.after == {"customer_id": 1, "name": "张三"}
    assert ev.position == "lsn:123456" and ev.ts_ms == 1700000000123 and ev.source_ts_ms == 1700000000000


@pytest.mark.parametrize("op", ["c", "r", "u", "d"])
def test_ops(op):
    row = {"customer_id": 1}
    ev = decode_value(env(op=op, before=row if op in "ud" else None, after=row if op != "d" else None))
    assert ev is not None and ev.op == op


def test_tombstone_is_none():
    assert decode_value(None) is None


def test_truncate_and_message():
    assert decode_value(env(op="t")).op == "t"
    ev = decode_value(env(op="m", source=dict(PG_SOURCE, table=None), message={"prefix": "x", "content": "YQ=="}))
    assert ev.op == "m" and ev.message == {"prefix": "x", "content": "YQ=="}


def test_mariadb_source():
    ev = decode_value(env(after={"id": 1}, source=MARIA_SOURCE))
    assert ev.schema_table == "app.orders" and ev.position == "binlog:bin.000003:4455"


def test_schema_wrapper_with_decimals():
    unscaled = (-123456).to_bytes(3, "big", signed=True)
    schema = {"type": "struct", "fields": [
        {"field": "before", "type": "struct", "optional": True, "fields": []},
        {"field": "after", "type": "struct", "optional": True, "fields": [
            {"field": "balance", "type": "bytes", "name": "org.apache.kafka.connect.data.Decimal",
             "parameters": {"scale": "2"}},
            {"field": "rate", "type": "struct", "name": "io.debezium.data.VariableScaleDecimal"}]}]}
    payload = {"before": None, "after": {"balance": base64.b64encode(unscaled).decode(),
                                         "rate": {"scale": 3, "value": base64.b64encode(b"\x04\xd2").decode()}},
               "source": PG_SOURCE, "op": "c", "ts_ms": 1}
    ev = decode_value(json.dumps({"schema": schema, "payload": payload}).encode())
    assert ev.after == {"balance": "-1234.56", "rate": "1.234"}


def test_schema_wrapper_tombstone_payload():
    assert decode_value(b'{"schema": {"type": "struct"}, "payload": null}') is None


@pytest.mark.parametrize(("raw", "reason"), [
    (b"{not json", "invalid_json"),
    (b"\xff\xfe\x00garbage", "invalid_utf8"),
    (b"[1,2,3]", "wrong_shape"),
    (b'"text"', "wrong_shape"),
    (b"{}", "missing_op"),
    (env(op="x"), "unknown_op"),
    (env(after=[1, 2]), "wrong_shape"),
    (env(op="c", after=None), "wrong_shape"),
    (env(op="d", before=None), "wrong_shape"),
    (json.dumps({"op": "c", "after": {}}).encode(), "missing_source"),
    (env(after={"a": 1}, source={"db": "x"}), "missing_table"),
    (b"", "empty"),
])
def test_bad_input_raises_decode_error_with_reason(raw, reason):
    with pytest.raises(DecodeError) as info:
        decode_value(raw)
    assert info.value.reason == reason


def test_huge_value_rejected_without_parsing():
    with pytest.raises(DecodeError) as info:
        decode_value(b" " * (MAX_VALUE_BYTES + 1))
    assert info.value.reason == "too_large"


def test_error_messages_never_echo_values():
    secret = "110105194912310021"  # noqa: S105 - a synthetic resident ID, not a password
    with pytest.raises(DecodeError) as info:
        decode_value(env(op="c", after=None, id=secret))
    assert secret not in str(info.value)
    with pytest.raises(DecodeError) as info:
        decode_value(("{\"op\": \"" + secret + "\"}").encode())
    assert secret not in str(info.value)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=20)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_bytes_never_crash(raw):
    with contextlib.suppress(DecodeError):
        decode_value(raw)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(["op", "before", "after", "source", "payload", "schema", "message", "ts_ms"]),
                       json_values, max_size=8))
def test_fuzz_shapes_never_crash(doc):
    with contextlib.suppress(DecodeError):
        decode_value(json.dumps(doc).encode())


@pytest.mark.parametrize(("unscaled", "scale", "text"), [
    (10**40 + 1, 2, "100000000000000000000000000000000000000.01"),
    (-(10**30) - 7, 0, "-1000000000000000000000000000007"),
    (123456789012345678901234567890123, 33, "0.123456789012345678901234567890123"),
    (-123456, 2, "-1234.56"),
    (0, 3, "0.000"),
    (5, -2, "5E+2"),
])
def test_decimals_keep_every_digit(unscaled, scale, text):
    encoded = base64.b64encode(unscaled.to_bytes(20, "big", signed=True)).decode()
    assert _decode_decimal(encoded, scale, "amount") == text


def test_a_mariadb_connector_event_as_debezium_3_5_writes_it():
    """A snapshot read of the MariaDB branch as the connector wrote it (values pass through as they are)."""
    value = (b'{"before":null,"after":{"customer_id":1,"login_name":"haoli9366","password_hash":"37f6bb0a89622f1c7b08b6'
             b'58c9dcfbb2c2dbdb925df8db05553fcc176ce26020","device_fp":"Mb6Nw9G7smL6WRClFksMeBzv0GhTR4Hfw9u1Mpd9KzI=",'
             b'"updated_at":1672616129000000},"source":{"version":"3.5.0.Final","connector":"mariadb","name":"br0202",'
             b'"ts_ms":1796302969000,"snapshot":"first_in_data_collection","db":"branch_0202","sequence":null,'
             b'"ts_us":1796302969000000,"ts_ns":1796302969000000000,"table":"customer_auth","server_id":0,"gtid":null,'
             b'"file":"binlog.000001","pos":369287,"row":0,"thread":null,"query":null},"transaction":null,"op":"r",'
             b'"ts_ms":1796302969588,"ts_us":1796302969588670,"ts_ns":1796302969588670623}')
    ev = decode_value(value)
    assert ev is not None
    assert (ev.op, ev.schema_table, ev.database, ev.connector) == ("r", "branch_0202.customer_auth", "branch_0202",
                                                                   "mariadb")
    assert ev.position == "binlog:binlog.000001:369287" and ev.source_ts_ms == 1796302969000
    assert ev.after == {"customer_id": 1, "login_name": "haoli9366",
                        "password_hash": "37f6bb0a89622f1c7b08b658c9dcfbb2c2dbdb925df8db05553fcc176ce26020",
                        "device_fp": "Mb6Nw9G7smL6WRClFksMeBzv0GhTR4Hfw9u1Mpd9KzI=", "updated_at": 1672616129000000}
