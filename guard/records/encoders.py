"""A writer specialised to the two schemas the hot path emits (`SanitizedChange`, `AuditRecord`).

Why not just fastavro: its generic writer resolves every union and map value against the schema on each
call, which costs ~60 µs for one sanitized customer record, more than all the cryptography of that
record together. These schemas are fixed, so this writer emits the same bytes with straight-line code and
memoised encodings of the strings that repeat (column names, table names, field lists, tokens of the
branch), about 10x faster. fastavro stays the reference: the tests check that both produce identical
bytes for generated records, and every reader (`guard.records.codec.decode`) uses fastavro.

Avro binary encoding in brief: int/long are zig-zag varints; strings and bytes are a long length then
the bytes; a union is the branch index then the value; maps and arrays are one block (count, items) then
a 0 terminator, or just 0 when empty; records are their fields in order.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson

from guard.protect.aad import RECORD_VERSION

_DOUBLE = struct.Struct("<d")
_memo: dict[str, bytes] = {}
_MEMO_LIMIT = 200_000
#: The longest string value the mask and index memos keep (native path: `MEMO_MAX_BYTES`, in bytes there):
#: the memos are bounded by entries, and long distinct values (200-KB addresses) kept whole as keys grew a
#: worker by hundreds of MB a minute. Longer values are computed each time.
MEMO_MAX_CHARS = 256


def _varint(n: int) -> bytes:
    n = (n << 1) ^ (n >> 63)
    if n < 0x80:
        return bytes((n,))
    out = []
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL = [_varint(i) for i in range(1024)]


def _long(n: int) -> bytes:
    return _SMALL[n] if 0 <= n < 1024 else _varint(n)


_ts_memo: dict[int, bytes] = {}


def _ts(n: int) -> bytes:
    """A millisecond timestamp as a long: memoised, since the events of a batch share a few milliseconds."""
    enc = _ts_memo.get(n)
    if enc is None:
        if len(_ts_memo) > 4096:
            _ts_memo.clear()
        enc = _ts_memo[n] = _long(n)
    return enc


def _opt_ts(v: int | None) -> bytes:
    return b"\x00" if v is None else b"\x02" + _ts(v)


def _len(n: int) -> bytes:
    return _SMALL[n] if n < 1024 else _long(n)


def _str(s: str) -> bytes:
    b = s.encode()
    return _len(len(b)) + b


def _name(s: str) -> bytes:
    """Encoding of a string that repeats across records (memoised)."""
    enc = _memo.get(s)
    if enc is None:
        enc = _str(s)
        if len(_memo) < _MEMO_LIMIT:
            _memo[s] = enc
    return enc


def _str_map(m: dict[str, str]) -> bytes:
    if not m:
        return b"\x00"
    parts = [_len(len(m))]
    for k, v in m.items():
        parts.append(_name(k))
        parts.append(_str(v))
    parts.append(b"\x00")
    return b"".join(parts)


def _name_array(items: list[str]) -> bytes:
    if not items:
        return b"\x00"
    return _len(len(items)) + b"".join(_name(i) for i in items) + b"\x00"


def _scalar(v: Any) -> bytes:
    # union ["null", "boolean", "long", "double", "string"]
    if v is None:
        return b"\x00"
    t = type(v)
    if t is str:
        return b"\x08" + _str(v)
    if t is bool:
        return b"\x02\x01" if v else b"\x02\x00"
    if t is int:
        return b"\x04" + _long(v)
    if t is float:
        return b"\x06" + _DOUBLE.pack(v)
    raise TypeError(f"clear value of type {t.__name__} is not an Avro scalar")


def _clear_map(m: dict[str, Any]) -> bytes:
    if not m:
        return b"\x00"
    parts = [_len(len(m))]
    for k, v in m.items():
        parts.append(_name(k))
        parts.append(_scalar(v))
    parts.append(b"\x00")
    return b"".join(parts)


def _image(img: dict[str, Any] | None) -> bytes:
    if img is None:
        return b"\x00"
    sealed = img["sealed"]
    if sealed is None:
        sealed_enc = b"\x00"
    else:
        ct = sealed["ct"]
        sealed_enc = b"\x02" + _name_array(sealed["fields"]) + _len(len(ct)) + ct
    return b"".join((
        b"\x02",
        _clear_map(img["clear"]),
        _str_map(img["masked"]),
        _str_map(img["index"]),
        _str_map(img["hashed"]),
        _name_array(img["dropped"]),
        _name_array(img["erased"]),
        sealed_enc,
    ))


def _opt_long(v: int | None) -> bytes:
    return b"\x00" if v is None else b"\x02" + _long(v)


def _opt_str(v: str | None) -> bytes:
    return b"\x00" if v is None else b"\x02" + _str(v)


def encode_sanitized_change(r: dict[str, Any]) -> bytes:
    return b"".join((
        _long(r["v"]),
        _name(r["op"]),
        _name(r["table"]),
        _name(r["branch"]),
        _name(r["db"]),
        _opt_long(r["ts_ms"]),
        _opt_long(r["source_ts_ms"]),
        _str(r["position"]),
        b"\x00" if r["subject"] is None else b"\x02" + _str(r["subject"]),
        _image(r["before"]),
        _image(r["after"]),
        _name_array(r["unclassified"]),
        _opt_str(r.get("before_subject")),
    ))


def _int_map(m: dict[str, int]) -> bytes:
    if not m:
        return b"\x00"
    parts = [_len(len(m))]
    for k, v in m.items():
        parts.append(_name(k))
        parts.append(_long(v))
    parts.append(b"\x00")
    return b"".join(parts)


def encode_audit_record(r: dict[str, Any]) -> bytes:
    return b"".join((
        _long(r["v"]),
        _long(r["ts_ms"]),
        _name(r["worker"]),
        _name(r["branch"]),
        _name(r["source_topic"]),
        _long(r["source_partition"]),
        _long(r["source_offset"]),
        b"\x00" if r["table"] is None else b"\x02" + _name(r["table"]),
        b"\x00" if r["op"] is None else b"\x02" + _name(r["op"]),
        _opt_str(r["subject"]),
        _name(r["decision"]),
        _opt_str(r["reason"]),
        _int_map(r["classes"]),
        _int_map(r["actions"]),
        _name_array(r["unclassified"]),
        _opt_str(r["trace_id"]),
    ))


class AuditTemplate:
    """Pre-encoded constant parts of audit records that differ only in time, offset, subject and trace.

    Per event the sanitizer then encodes four values instead of sixteen fields; the bytes are identical
    to `encode_audit_record` (tested). A change whose write the access policy decided carries the
    decision in its own record's `reason` (`encode(..., reason=)`, audit format 2, docs/policy.md).
    """

    __slots__ = ("_v", "_a", "_b", "_d", "_r", "_e")

    def __init__(self, *, worker: str, branch: str, source_topic: str, source_partition: int, table: str | None,
                 op: str | None, decision: str, reason: str | None, classes: dict[str, int],
                 actions: dict[str, int], unclassified: list[str], version: int) -> None:
        self._v = _long(version)
        self._a = b"".join((_name(worker), _name(branch), _name(source_topic), _long(source_partition)))
        self._b = b"".join((b"\x00" if table is None else b"\x02" + _name(table),
                            b"\x00" if op is None else b"\x02" + _name(op)))
        self._d = _name(decision)
        self._r = _opt_str(reason)
        self._e = b"".join((_int_map(classes), _int_map(actions), _name_array(unclassified)))

    @property
    def parts(self) -> tuple[bytes, bytes, bytes, bytes, bytes]:
        """The constant runs of the record, for writers that assemble it elsewhere (`guard_native`): the
        version, the head up to the offset, the table and op, the decision, and what follows the reason
        (the template's reason must be null there: a writer puts the per-event reason between them)."""
        if self._r != b"\x00":
            raise ValueError("a template with a reason has no native parts")
        return self._v, self._a, self._b, self._d, self._e

    def encode(self, ts_ms: int, offset: int, subject: str | None, trace_id: str | None,
               reason: str | None = None) -> bytes:
        """The record's body; `reason` (the change's write decision as JSON text) replaces the template's."""
        # Subjects repeat (a customer's every change), so their encoding comes from the shared memo.
        return b"".join((self._v, _ts(ts_ms), self._a, _long(offset), self._b,
                         b"\x00" if subject is None else b"\x02" + _name(subject), self._d,
                         self._r if reason is None else b"\x02" + _str(reason), self._e,
                         b"\x00" if trace_id is None else b"\x02" + _str(trace_id)))


WRITERS = {"sanitized_change": encode_sanitized_change, "audit_record": encode_audit_record}


_LONG_MIN, _LONG_MAX = -(2**63), 2**63 - 1


def _clear_value(v: Any) -> bytes:
    """A clear column as the ["null","boolean","long","double","string"] union; anything else as JSON text."""
    t = type(v)
    if t is int and not _LONG_MIN <= v <= _LONG_MAX:
        return b"\x08" + _str(str(v))
    if v is None or t in (str, bool, int, float):
        return _scalar(v)
    return b"\x08" + _str(orjson.dumps(v).decode())


class ImageWriter:
    """Writes one image (before/after) of a `SanitizedChange` for one table plan straight to Avro bytes.

    Built once per table shape: the encoded column names, the field list of the sealed part and the
    arrays that never change are computed here, so per event only the values are encoded. The output is
    the same as `encode_sanitized_change` on the equivalent dict (tested).

    Display masks and blind-index tokens are pure functions of the value under keys that don't change for
    the writer's life, and CDC repeats values all the time (an update's before and after images, a
    customer's rows in every table, the same account on every transaction). Their encoded map entries
    are therefore memoised per column, up to `memo_limit` entries per writer (the memo is dropped when
    full). C3 keyed hashes are never memoised: authentication secrets are not kept in memory longer
    than the event that carries them.
    """

    __slots__ = ("_clear", "_masks", "_index", "_hashed", "_dropped", "_sealed", "_sealed_head", "_erased",
                 "_mask", "_token", "_keyed_hash", "_mask_memo", "_index_memo", "_memo_limit")

    def __init__(self, *, clear: Sequence[str], masks: Sequence[tuple[str, str]], index: Sequence[str],
                 hashed: Sequence[str], dropped: Sequence[str], sealed: Sequence[str],
                 mask: Callable[[str, str], str], token: Callable[[str, bytes], str],
                 keyed_hash: Callable[[str, bytes], str], memo_limit: int = 100_000) -> None:
        self._clear = [(c, _name(c)) for c in clear]
        self._masks = [(c, kind, _name(c)) for c, kind in masks]
        self._index = [(c, _name(c)) for c in index]
        self._hashed = [(c, _name(c)) for c in hashed]
        self._dropped = _name_array(list(dropped))
        self._sealed = list(sealed)
        self._sealed_head = b"\x02" + _name_array(list(sealed))
        self._erased = _name_array(list(sealed))
        self._mask, self._token, self._keyed_hash = mask, token, keyed_hash
        #: (column slot, string value) -> encoded map entry, one memo per kind of entry.
        self._mask_memo: dict[tuple[int, str], bytes] = {}
        self._index_memo: dict[tuple[int, str], bytes] = {}
        self._memo_limit = memo_limit

    @property
    def sealed_fields(self) -> list[str]:
        return self._sealed

    @property
    def memo_size(self) -> int:
        return len(self._mask_memo) + len(self._index_memo)

    def clear_memo(self) -> None:
        """Forget memoised entries: their keys are plaintext values (see `Sanitizer.expire_value_caches`)."""
        self._mask_memo.clear()
        self._index_memo.clear()

    def write(self, row: Mapping[str, Any], ciphertext: bytes | None) -> bytes:
        """Encode `row`; `ciphertext` is the sealed part, or None when the subject was erased."""
        parts: list[bytes] = [b"\x02"]
        clear = self._clear
        if clear:
            parts.append(_len(len(clear)))
            for column, key in clear:
                parts.append(key)
                parts.append(_clear_value(row[column]))
        parts.append(b"\x00")
        erased = ciphertext is None
        if self.memo_size > self._memo_limit:
            self.clear_memo()
        for entries in (() if erased else self._mask_entries(row),
                        () if erased else self._index_entries(row),
                        self._hash_entries(row)):
            if entries:
                parts.append(_len(len(entries)))
                parts.extend(entries)
            parts.append(b"\x00")
        parts.append(self._dropped)
        if erased:
            parts.append(self._erased)
            parts.append(b"\x00")
        else:
            parts.append(b"\x00")
            if self._sealed:
                parts.append(self._sealed_head)
                parts.append(_len(len(ciphertext)))  # type: ignore[arg-type]
                parts.append(ciphertext)  # type: ignore[arg-type]
            else:
                parts.append(b"\x00")
        return b"".join(parts)

    def _mask_entries(self, row: Mapping[str, Any]) -> list[bytes]:
        memo, mask, out = self._mask_memo, self._mask, []
        for slot, (column, kind, key) in enumerate(self._masks):
            v = row[column]
            if v is None:
                continue
            if type(v) is str:  # only strings are memoised: 1, 1.0 and True are equal as dict keys
                entry = memo.get((slot, v))
                if entry is None:
                    entry = key + _str(mask(kind, v))
                    if len(v) <= MEMO_MAX_CHARS:
                        memo[(slot, v)] = entry
            else:
                entry = key + _str(mask(kind, str(v)))
            out.append(entry)
        return out

    def _index_entries(self, row: Mapping[str, Any]) -> list[bytes]:
        memo, token, out = self._index_memo, self._token, []
        for slot, (column, key) in enumerate(self._index):
            v = row[column]
            if v is None:
                continue
            if type(v) is str:
                entry = memo.get((slot, v))
                if entry is None:
                    entry = key + _str(token(column, v.encode()))
                    if len(v) <= MEMO_MAX_CHARS:
                        memo[(slot, v)] = entry
            else:
                entry = key + _str(token(column, _value_bytes(v)))
            out.append(entry)
        return out

    def _hash_entries(self, row: Mapping[str, Any]) -> list[bytes]:
        keyed_hash = self._keyed_hash
        return [key + _str(keyed_hash(column, _value_bytes(v)))
                for column, key in self._hashed if (v := row[column]) is not None]


def _value_bytes(v: Any) -> bytes:
    return v.encode() if type(v) is str else orjson.dumps(v)


_RECORD_V = bytes((RECORD_VERSION * 2,))  # `v`, an Avro int (zig-zag): images sealed with AAD format 2


def encode_change(*, op: str, table: str, branch: str, db: str, ts_ms: int | None, source_ts_ms: int | None,
                  position: str, subject: str | None, before: bytes | None, after: bytes | None,
                  unclassified: list[str], before_subject: str | None = None) -> bytes:
    """A `SanitizedChange` from images already written by `ImageWriter` (None = no image)."""
    return b"".join((
        _RECORD_V,
        _name(op),
        _name(table),
        _name(branch),
        _name(db),
        _opt_ts(ts_ms),
        _opt_ts(source_ts_ms),
        _str(position),
        b"\x00" if subject is None else b"\x02" + _name(subject),
        before or b"\x00",
        after or b"\x00",
        _name_array(unclassified),
        b"\x00" if before_subject is None else b"\x02" + _name(before_subject),
    ))
