"""Associated data of sealed images (format 2): length-prefixed parts, bound to op and source position.

The hot path's cached associated data must be byte-identical to `image_aad` (which `reveal` uses), and
`reveal.open_image` must refuse an image replayed from another change of the same row.
"""

import struct

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guard.errors import IntegrityError
from guard.keys.primitives import Aead, random_key
from guard.protect.aad import AAD_VERSION, ImageAad, image_aad
from guard.protect.reveal import open_image

text = st.text(max_size=20)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(text, text, st.binary(max_size=20), st.sampled_from(["before", "after"]), text,
                          st.sampled_from(list("cudr")), text, st.integers(0, 3), st.integers(1, 5)),
                min_size=1, max_size=8))
def test_cached_aad_equals_the_reference(calls):
    field_lists = [["a"], ["a", "b"], ["name", "id_number"], []]
    aad = ImageAad()
    for topic, table, row_key, image, subject, op, position, which, version in calls + calls:
        fields = field_lists[which]
        assert aad(topic, table, row_key, image, subject, op, position, fields, version) == \
            image_aad(topic, table, row_key, image, subject, op, position, fields, version)


def test_layout_is_a_version_byte_then_length_prefixed_parts():
    got = image_aad("tp", "tb", b"k", "after", "s", "u", "lsn:7", ["a", "bc"], 3)

    def part(b: bytes) -> bytes:
        return struct.pack(">I", len(b)) + b

    fields = part(struct.pack(">I", 2) + part(b"a") + part(b"bc"))
    assert got == bytes((AAD_VERSION,)) + b"".join(
        part(p) for p in (b"tp", b"tb", b"k", b"after", b"s", b"u", b"lsn:7")) + fields + part(struct.pack(">I", 3))


def test_a_separator_inside_a_part_cannot_shift_the_boundary():
    # Format 1 joined the parts with `|`: these two part lists gave the same bytes.
    assert image_aad("t|x", "y", b"k", "after", "s", "c", "p", ["a"], 1) != \
        image_aad("t", "x|y", b"k", "after", "s", "c", "p", ["a"], 1)
    assert image_aad("t", "y", b"k", "after", "s", "c", "p", ["a,b"], 1) != \
        image_aad("t", "y", b"k", "after", "s", "c", "p", ["a", "b"], 1)


@given(st.lists(text, max_size=4), st.lists(text, max_size=4))
def test_different_field_lists_give_different_associated_data(a, b):
    if a != b:
        assert image_aad("t", "y", b"k", "after", "s", "c", "p", a, 1) != \
            image_aad("t", "y", b"k", "after", "s", "c", "p", b, 1)


class _Keys:
    """Pure-logic stand-in for the key manager: one subject key."""

    def __init__(self, aead: Aead) -> None:
        self.aead = aead

    def subject_aead_for(self, branch, subject, ct):
        return self.aead


def _record(aead: Aead, *, op: str, position: str, name: str, v: int = 2) -> dict:
    fields = ["name"]
    aad = image_aad("sanitized.t", "public.customers", b'{"id":"x"}', "after", "subj", op, position, fields,
                    aead.version)
    return {"v": v, "op": op, "table": "public.customers", "branch": "0101", "position": position,
            "subject": "subj", "before": None,
            "after": {"sealed": {"fields": fields, "ct": aead.seal(orjson.dumps([name]), aad)}}}


def test_an_older_image_of_the_same_row_cannot_replace_a_newer_one():
    keys = _Keys(Aead(random_key(), 1))
    old = _record(keys.aead, op="u", position="lsn:100", name="old name")
    new = _record(keys.aead, op="u", position="lsn:200", name="new name")
    where = {"topic": "sanitized.t", "row_key": b'{"id":"x"}'}
    assert open_image(keys, new, "after", **where) == {"name": "new name"}
    replayed = {**new, "after": old["after"]}  # the old ciphertext in the newer record
    with pytest.raises(IntegrityError):
        open_image(keys, replayed, "after", **where)
    relabelled_op = {**new, "op": "c"}
    with pytest.raises(IntegrityError):
        open_image(keys, relabelled_op, "after", **where)


def test_format_1_records_are_refused_with_a_clear_error():
    keys = _Keys(Aead(random_key(), 1))
    record = _record(keys.aead, op="c", position="lsn:1", name="n", v=1)
    with pytest.raises(IntegrityError, match="v=1 is not opened.*re-sanitize"):
        open_image(keys, record, "after", topic="sanitized.t", row_key=b'{"id":"x"}')
