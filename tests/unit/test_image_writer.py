"""`ImageWriter` (per-plan writer with memoised masks and tokens) must write the reference encoder's bytes."""

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st

from guard.records.encoders import ImageWriter, encode_change, encode_sanitized_change

COLUMNS = ["a", "b", "c", "d", "e"]
values = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=12)
rows = st.lists(st.fixed_dictionaries({c: values for c in COLUMNS}), min_size=1, max_size=6)


def _mask(kind: str, value: str) -> str:
    return f"{kind}:{value[:1]}***"


def _token(column: str, value: bytes) -> str:  # one key per column, like KeyManager.search_token
    return hashlib.blake2b(value, key=column.encode().ljust(16, b"k"), digest_size=16).hexdigest()


def _keyed_hash(column: str, value: bytes) -> str:
    return hashlib.sha256(column.encode() + value).hexdigest()


def _value_bytes(v):
    import orjson

    return v.encode() if type(v) is str else orjson.dumps(v)


def _reference_image(row: dict, ct: bytes | None) -> dict:
    """The image dict the reference encoder takes, computed without any memo."""
    erased = ct is None
    return {
        "clear": {"a": row["a"]} if row["a"] is None or type(row["a"]) in (str, bool, int, float) else {},
        "masked": {} if erased else {c: _mask("k" + c, v if type(v) is str else str(v))
                                     for c in ("b", "c") if (v := row[c]) is not None},
        "index": {} if erased else {c: _token(c, _value_bytes(v)) for c in ("c", "d") if (v := row[c]) is not None},
        "hashed": {c: _keyed_hash(c, _value_bytes(v)) for c in ("e",) if (v := row[c]) is not None},
        "dropped": [],
        "erased": ["b", "c"] if erased else [],
        "sealed": None if erased else {"fields": ["b", "c"], "ct": ct},
    }


@settings(max_examples=200, deadline=None)
@given(rows, st.booleans())
def test_writer_with_memo_matches_the_reference_encoder(batch, erased):
    writer = ImageWriter(clear=["a"], masks=[("b", "kb"), ("c", "kc")], index=["c", "d"], hashed=["e"],
                         dropped=[], sealed=["b", "c"], mask=_mask, token=_token, keyed_hash=_keyed_hash,
                         memo_limit=3)
    ct = None if erased else b"\x01ciphertext"
    for row in batch + batch:  # every row twice: the second pass is served from the memo
        if type(row["a"]) not in (str, bool, int, float) and row["a"] is not None:
            continue
        fast = encode_change(op="u", table="t", branch="b", db="d", ts_ms=1, source_ts_ms=2, position="p",
                             subject="s", before=None, after=writer.write(row, ct), unclassified=[])
        reference = encode_sanitized_change({
            "v": 2, "op": "u", "table": "t", "branch": "b", "db": "d", "ts_ms": 1, "source_ts_ms": 2,
            "position": "p", "subject": "s", "before": None, "after": _reference_image(row, ct), "unclassified": []})
        assert fast == reference


def test_equal_but_differently_typed_values_are_not_confused_by_the_memo():
    def fresh() -> ImageWriter:
        return ImageWriter(clear=[], masks=[("x", "k")], index=["x"], hashed=[], dropped=[], sealed=[],
                           mask=_mask, token=_token, keyed_hash=_keyed_hash)

    shared = fresh()
    for value in ("1", 1, True, 1.0, "1", 1.0, True, 1):  # 1 == True == 1.0 as dict keys
        assert shared.write({"x": value}, b"") == fresh().write({"x": value}, b"")
