"""The leak scanner: real leaks are found in every form an encoder gives them, chance matches are not."""

from __future__ import annotations

import base64
import io
import json
import random
from dataclasses import dataclass

from fastavro import schemaless_writer

from guard.protect.masking import mask
from guard.workload import synth
from tests.leak_scanner import LeakScanner, find_leak, sensitive_of


def _avro_string(value: str) -> bytes:
    out = io.BytesIO()
    schemaless_writer(out, "string", value)
    return out.getvalue()


def _avro_clear_map(entries: dict[str, object]) -> bytes:
    out = io.BytesIO()
    schemaless_writer(out, {"type": "map", "values": ["null", "boolean", "long", "double", "string"]}, entries)
    return out.getvalue()


@dataclass
class _Rec:
    key: bytes | None
    value: bytes | None


def test_a_short_pin_inside_a_log_position_or_hex_digest_is_not_a_leak():
    scanner = LeakScanner.of({"272723"})
    assert scanner.find(b"\x18lsn:27272368\x02@b3370ed23115cf210b4988291f788de9") is None
    assert scanner.find(b"@a272723f00") is None


def test_a_short_pin_equal_to_a_binlog_position_is_not_a_leak():
    scanner = LeakScanner.of({"443806"})
    source = b'"source":{"file":"mysql-bin.000003","pos":443806,"row":0,"thread":443806,"query":null}'
    assert scanner.find(source) is None
    assert scanner.find(b'{"after":{"query_pin":443806}}') is not None
    assert scanner.find(b'{"memo":"pin 443806"}') is not None


def test_a_short_pin_equal_to_a_row_id_is_not_a_leak():
    scanner = LeakScanner.of({"125837", 125838})
    assert scanner.find(b'{"txn_id":125837}\x00' + _avro_string("public.transactions")) is None
    assert scanner.find(b'{"after":{"id":125837,"account_id":125838,"customer_id": 125838}}') is None
    assert scanner.find(b'{"after":{"txn_id":1,"memo":125837}}') is not None
    assert scanner.find(b'{"after":{"txn_id":1,"amount":125838}}') is not None
    assert scanner.find(b'{"after":{"idle":125837}}') is not None
    assert scanner.find(b"\x00" + _avro_clear_map({"txn_id": 125838})) is None
    assert scanner.find(b"\x00" + _avro_clear_map({"amount": 125838})) is not None


def test_a_short_pin_as_a_value_is_a_leak():
    scanner = LeakScanner.of({"272723"})
    assert scanner.find(b'{"query_pin":"272723"}') is not None
    assert scanner.find(b"\x00" + _avro_string("272723") + b"\x00") is not None


def test_long_values_are_found_anywhere():
    scanner = LeakScanner.of({"6222021234567890123", "None", ""})
    assert scanner.find(b"xx6222021234567890123yy") == b"6222021234567890123"
    assert scanner
    assert not LeakScanner.of({"None", "", "x"})


def test_two_and_three_character_names_and_short_occupations_are_found_as_values():
    scanner = LeakScanner.of({"王五", "欧阳娜", "教师"})
    assert scanner.find(_avro_string("王五")) is not None
    assert scanner.find(b"\x02" + _avro_string("欧阳娜") + b"\x00") is not None
    assert scanner.find('{"occupation":"教师"}'.encode()) is not None
    assert scanner.find(json.dumps({"nm": "王五"}).encode()) is not None  # "\u738b\u4e94"


def test_a_short_name_inside_a_legitimate_masked_form_is_not_a_leak():
    scanner = LeakScanner.of({"石家", "王五", "教师"})
    masked = mask("address", "河北省石家庄市长安区建设路1号")
    assert "石家" in masked
    assert scanner.find(_avro_string(masked) + _avro_string(mask("name", "王五"))) is None
    assert scanner.find(json.dumps({"address": masked}, ensure_ascii=False).encode()) is None
    assert scanner.find("王五六".encode() + _avro_string("王五六")) is None


def test_dates_are_found_as_text_and_as_numbers():
    scanner = LeakScanner.of({"1990-05-17", 7441})
    assert scanner.find(b'{"birth_date":"1990-05-17"}') is not None
    assert scanner.find(b'{"birth_date": 7441}') is not None
    assert scanner.find(b"\x00" + _avro_clear_map({"birth_date": 7441, "gender": "F"})) is not None


def test_numbers_in_the_guards_own_metadata_or_other_columns_are_not_leaks():
    scanner = LeakScanner.of({7441})
    assert scanner.find(b'{"source":{"topic":"t","partition":0,"offset":7441},"value_bytes":7441}') is None
    assert scanner.find(_avro_clear_map({"customer_id": 74410, "qty": 744})) is None
    assert scanner.find(b'{"customer_id": 74410}') is None


def test_base64_hex_and_escaped_forms_are_found_at_any_alignment():
    value = synth.address(__import__("random").Random(7))
    scanner = LeakScanner.of({value, "13812345678"})
    for prefix in (b"", b"a", b"ab"):
        assert scanner.find(b'{"x":"' + base64.b64encode(prefix + value.encode() + b"tail") + b'"}') is not None
        assert scanner.find(base64.b64encode(prefix + b"13812345678")) is not None
    assert scanner.find(value.encode().hex().encode()) is not None
    assert scanner.find(value.encode().hex().upper().encode()) is not None
    assert scanner.find(json.dumps(value).encode()) is not None  # \uXXXX, lower case
    assert scanner.find(json.dumps(value).encode().replace(b"\\u", b"\\U").upper().replace(b"\\U", b"\\u")) is not None


def test_random_ciphertexts_and_blind_indexes_are_not_leaks():
    rng = __import__("random").Random(3)
    values = {synth.chinese_name(rng) for _ in range(300)} | {synth.mobile(rng) for _ in range(300)} | {"教师"}
    scanner = LeakScanner.of(values)
    for _ in range(300):
        blob = rng.randbytes(600)
        assert scanner.find(blob + base64.b64encode(blob) + blob.hex().encode()) is None


def test_random_ciphertexts_are_not_leaks_of_a_workloads_birth_dates():
    """A crash test's few thousand birth dates (days, dense among small varints) against ~3 MB of random
    bytes, as much ciphertext as one scan of its output: with any identifier as the map key, the Avro
    map-entry form matched by chance in about one such scan in ten (a false "plaintext leaked")."""
    rng = __import__("random").Random(11)
    days = {rng.randrange(20000) for _ in range(2400)}
    scanner = LeakScanner.of(days)
    for _ in range(5000):
        assert scanner.find(rng.randbytes(600)) is None
    # and the real form is still found, under a column's name
    assert scanner.find(b"\x00" + _avro_clear_map({"birth_date": max(days)})) is not None


def test_find_leak_names_the_record_and_sensitive_of_takes_every_customer_column():
    row = {"customer_id": 1, "name": "王五", "id_number": "11010519491231002X", "mobile": "13812345678",
           "email": "w@qq.com", "address": "北京市朝阳区建国路1号", "birth_date": 7441, "occupation": "教师",
           "gender": "F"}
    values = sensitive_of(row)
    assert values == {"王五", "11010519491231002X", "13812345678", "w@qq.com", "北京市朝阳区建国路1号", 7441, "教师"}
    records = [_Rec(b"k", b"clean"), _Rec(None, _avro_string("教师"))]
    assert find_leak(records, values) == (1, b"\x0c" + "教师".encode())
    assert find_leak(records[:1], values) is None


def test_a_short_pin_equal_to_a_masks_visible_digits_is_not_a_leak():
    """Branch 0101's account numbers show only 100 distinct first sixes when masked (`0101` + 2 digits):
    with 250 customers' PINs, one crash-test scan in twenty found a PIN there (CI, 2026-12-04)."""
    account, card = "01011200000000008200", synth.bank_card(random.Random(7))
    scanner = LeakScanner.of({"010112", card[:6], "8200"})
    for masked in (mask("bank_card", account), mask("bank_card", card)):
        assert "*" in masked and masked.startswith(account[:6] if masked[:4] == "0101" else card[:6])
        assert scanner.find(_avro_string(masked)) is None
        assert scanner.find(json.dumps({"account_no": masked}).encode()) is None
    # the same digits standing alone are still a leak
    assert scanner.find(b"\x00" + _avro_string("010112") + b"\x00") is not None
    assert scanner.find(b'{"memo":"pin 010112 end"}') is not None
