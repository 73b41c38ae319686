"""The integration tests' leak scanner: real leaks are found, chance digit runs are not."""

import io

from fastavro import schemaless_writer

from tests.integration.kafka_helpers import LeakScanner


def _avro_string(value: str) -> bytes:
    out = io.BytesIO()
    schemaless_writer(out, "string", value)
    return out.getvalue()


def test_a_short_pin_inside_a_log_position_or_hex_digest_is_not_a_leak():
    scanner = LeakScanner.of({"272723"})
    assert scanner.find(b"\x18lsn:27272368\x02@b3370ed23115cf210b4988291f788de9") is None
    assert scanner.find(b"@a272723f00") is None


def test_a_short_pin_as_a_value_is_a_leak():
    scanner = LeakScanner.of({"272723"})
    assert scanner.find(b'{"query_pin":"272723"}') == b"272723"
    assert scanner.find(b"\x00" + _avro_string("272723") + b"\x00") == b"272723"


def test_long_values_are_found_anywhere_and_tiny_ones_are_ignored():
    scanner = LeakScanner.of({"6222021234567890123", "王五", "None", ""})
    assert scanner.find(b"xx6222021234567890123yy") == b"6222021234567890123"
    assert scanner.find("王五".encode()) is None
    assert scanner
    assert not LeakScanner.of({"王五"})
