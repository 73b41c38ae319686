"""The tests' leak scanner: finds a workload's sensitive plaintext in the raw bytes of output records.

Pure (no Kafka client): the integration tests feed it the records they read, the unit tests feed it bytes
(tests/unit/test_leak_scanner.py). A value is looked for in every form an encoder on the way out could
give it, not only as its UTF-8 bytes:

* as UTF-8 (Avro strings, orjson), as JSON ``\\u`` escapes (``json.dumps`` with ``ensure_ascii``, lower- or
  upper-case hex), as hex and as base64 of its UTF-8 bytes (at each of the three byte alignments, only the
  base64 characters that depend on the value alone);
* short values (2-3 characters: names, occupations; digit strings shorter than 10) are matched only as a
  whole token, because as bare substrings they occur by chance inside legitimate output (a district name
  inside a masked address, digits inside ``lsn:27272368`` or a hex blind index): a JSON string
  (``"教师"``), an Avro string (its zig-zag length prefix followed by exactly its bytes), or for digits a run
  that no letter, digit or mask ``*`` touches (a mask's visible digits are part of a longer value);
* integers (a birth date as days, an amount) of 4 digits or more: as a JSON number under any key other
  than the guard's own metadata (offsets, timestamps, sizes) or a row's identifier (`id`, `*_id`), and as
  an Avro ``long`` in a map entry (the sanitized record's ``clear`` map: key string, union branch 2,
  zig-zag varint) whose key looks like a column name (lower-case snake case, 6+ characters; see
  `_AVRO_LONG_IN_MAP` for why) and is not an identifier.

Values of one character and integers below 1000 are not looked for: they are everywhere.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

#: Columns of a customer row whose values must never appear in any output.
CUSTOMER_SENSITIVE = ("name", "id_number", "mobile", "email", "address", "birth_date", "occupation")
#: Digit strings shorter than this are matched only as whole tokens.
SHORT_NUMERIC = 10
#: Shortest hex / base64 form looked for (shorter ones turn up by chance in blind indexes and ciphertexts).
MIN_ENCODED = 8
#: JSON keys whose numbers are the guard's own metadata, never a column value.
METADATA_KEYS = frozenset({
    "offset", "partition", "source_offset", "source_partition", "at_ms", "ts_ms", "source_ts_ms", "value_bytes",
    "effective_ms", "v", "keys_destroyed", "count", "events", "until_ms", "tombstones_written",
    # Debezium's source and transaction blocks: a binlog position, row, thread, server id, LSN, transaction id
    "pos", "row", "thread", "server_id", "lsn", "txId", "xmin", "ts_us", "ts_ns", "total_order",
    "data_collection_order",
})
#: JSON keys that name a row's identifier (`id`, `txn_id`, `customer_id`): no sensitive column is one, and the
#: guard passes them in clear. Their numbers grow with every row a long run writes: past 100,000 a transaction
#: id equals one of a workload's 6-digit PINs by chance (CI: `{"txn_id":125837}` in a sanitized record's key).
_IDENTIFIER_KEY = re.compile(r"(?:^|_)id$")
#: What a mask puts in place of the characters it hides (guard.protect.masking).
MASK_CHAR = b"*"
#: `"key":` just before a number (looked for backwards from the number's first digit).
_KEY_BEFORE = re.compile(rb'"([A-Za-z_][A-Za-z0-9_]*)"\s*:\s*$')
_ANCHOR = 4
#: A map key here is a column name: lower-case snake case of at least 6 characters. Any identifier would do
#: for a leak, but the pattern is short enough to turn up by chance in ciphertext: with 1-character keys
#: and a workload's few thousand birth dates (dense among small varints), about one position in 20 million
#: matched, i.e. a false leak in one scan of a crash test's output in ten. With this key shape the chance
#: is below one in 10^11 per position. (Every integer column of the demo schema is named so.)
_AVRO_LONG_IN_MAP = re.compile(rb"([\x0c-\x7e])([a-z_][a-z0-9_]{5,62})\x04([\x80-\xff]{0,9}[\x00-\x7f])")
_JSON_NUMBER = re.compile(rb'"([A-Za-z_][A-Za-z0-9_]*)"\s*:\s*(-?\d+)(?![\d.eE])')


class _Record(Protocol):
    key: bytes | None
    value: bytes | None


def sensitive_of(row: Mapping[str, Any], columns: Iterable[str] = CUSTOMER_SENSITIVE) -> set[Any]:
    """The sensitive values of a row (strings as they are, integers as integers), without None."""
    return {row[c] for c in columns if c in row and row[c] is not None}


def _varint(n: int) -> bytes:
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while True:
        byte = z & 0x7F
        z >>= 7
        if z:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _unvarint(data: bytes) -> int:
    z = 0
    for shift, byte in enumerate(data):
        z |= (byte & 0x7F) << (7 * shift)
    return (z >> 1) ^ -(z & 1)


def _escaped(s: str, upper: bool) -> bytes:
    out = []
    for ch in s:
        if ch.isascii():
            out.append(ch)
            continue
        units = ch.encode("utf-16-be")
        for i in range(0, len(units), 2):
            code = f"{int.from_bytes(units[i:i + 2], 'big'):04x}"
            out.append("\\u" + (code.upper() if upper else code))
    return "".join(out).encode()


def _base64_cores(data: bytes) -> set[bytes]:
    """The base64 characters determined by `data` alone, wherever it sits in a longer base64 text."""
    cores = set()
    for k in range(3):
        encoded = base64.b64encode(b"\x00" * k + data + b"\x00\x00")
        first = -(-8 * k // 6)
        last = (8 * (k + len(data)) - 6) // 6
        if last - first + 1 >= MIN_ENCODED:
            cores.add(encoded[first:last + 1])
    return cores


@dataclass(frozen=True)
class _Needle:
    form: bytes
    #: "any": a leak wherever it is; "token": only where no letter or digit touches it.
    where: str


class LeakScanner:
    """Looks for many values in many records in time linear in the bytes scanned (not in the values)."""

    def __init__(self, needles: list[_Needle], numbers: frozenset[int]) -> None:
        self._anchors: dict[bytes, list[_Needle]] = {}
        for needle in needles:
            self._anchors.setdefault(needle.form[:_ANCHOR], []).append(needle)
        self._numbers = numbers
        self._count = len(needles) + len(numbers)

    @classmethod
    def of(cls, values: Iterable[Any]) -> LeakScanner:
        needles: dict[bytes, str] = {}
        numbers: set[int] = set()
        for value in values:
            if isinstance(value, bool) or value is None:
                continue
            if isinstance(value, int):
                if abs(value) < 1000:
                    continue
                numbers.add(value)
                # besides the number forms of `find`: the number as a JSON or Avro string
                forms = [(b'"%d"' % value, "any"), (_varint(len(str(value))) + str(value).encode(), "any")]
            else:
                text = str(value)
                if len(text) < 2 or text == "None":
                    continue
                forms = _forms(text)
            for form, where in forms:
                if len(form) >= _ANCHOR and needles.get(form) != "any":
                    needles[form] = where
        return cls([_Needle(f, w) for f, w in sorted(needles.items())], frozenset(numbers))

    def __bool__(self) -> bool:
        return self._count > 0

    def find(self, blob: bytes) -> bytes | None:
        """The first form of a sensitive value found in `blob`, or None."""
        anchors = self._anchors
        if anchors:
            for i in range(len(blob) - _ANCHOR + 1):
                bucket = anchors.get(blob[i:i + _ANCHOR])
                if bucket is None:
                    continue
                for needle in bucket:
                    form = needle.form
                    if blob.startswith(form, i) and (needle.where == "any" or _a_value(blob, i, len(form))):
                        return form
        if self._numbers:
            for m in _JSON_NUMBER.finditer(blob):
                if _a_column(m.group(1).decode()) and int(m.group(2)) in self._numbers:
                    return m.group(2)
            for m in _AVRO_LONG_IN_MAP.finditer(blob):
                if (m.group(1)[0] == 2 * len(m.group(2)) and _a_column(m.group(2).decode())
                        and _unvarint(m.group(3)) in self._numbers):
                    return m.group(0)
        return None


def _a_value(blob: bytes, start: int, length: int) -> bool:
    """Whether the digits at `start` stand alone (no letter, digit or mask character touches them) and are
    not a JSON number under a metadata or identifier key: a 6-digit PIN equals a MariaDB binlog position
    (`"pos":443806`) by chance in about one raw-topic scan in thirty, and a transaction id once the
    database's sequence passes 100,000. Digits a mask's `*` touches are the
    visible part of a longer masked value (a card's BIN, an account number's first six: `010112******8200`),
    whose length the mask chose: a PIN equals one of them by chance in about one crash-test scan in twenty
    (250 customers; branch 0101's account numbers show only 100 distinct first sixes)."""
    before = blob[start - 1:start] if start else b""
    after = blob[start + length:start + length + 1]
    if before.isalnum() or after.isalnum() or MASK_CHAR in (before, after):
        return False
    key = _KEY_BEFORE.search(blob, max(0, start - 70), start)
    return key is None or _a_column(key.group(1).decode())


def _a_column(key: str) -> bool:
    """Whether a JSON key could hold a sensitive column's value: not the guard's metadata, not a row id."""
    return key not in METADATA_KEYS and _IDENTIFIER_KEY.search(key) is None


def _forms(text: str) -> list[tuple[bytes, str]]:
    raw = text.encode()
    escaped = {_escaped(text, False), _escaped(text, True)} - {raw}
    short_digits = text.isdigit() and text.isascii() and len(text) < SHORT_NUMERIC
    forms: list[tuple[bytes, str]] = []
    if len(text) >= 4 and not short_digits:
        forms += [(raw, "any"), *((e, "any") for e in escaped)]
    else:
        forms += [(b'"' + raw + b'"', "any"), *((b'"' + e + b'"', "any") for e in escaped)]
        if len(raw) >= 4:  # an Avro string is its zig-zag length, then exactly its bytes
            forms.append((_varint(len(raw)) + raw, "any"))
        if short_digits:
            forms.append((raw, "token"))
    if len(raw) * 2 >= MIN_ENCODED:
        forms += [(raw.hex().encode(), "any"), (raw.hex().upper().encode(), "any")]
    forms += [(core, "any") for core in _base64_cores(raw)]
    return forms


def find_leak(records: Iterable[_Record], values: Iterable[Any]) -> tuple[int, bytes] | None:
    """(index of the first record that leaks a value, the form found), or None. Key and value are scanned."""
    scanner = LeakScanner.of(values)
    for i, rec in enumerate(records):
        found = scanner.find((rec.key or b"") + b"\x00" + (rec.value or b""))
        if found is not None:
            return i, found
    return None
