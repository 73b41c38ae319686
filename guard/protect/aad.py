"""Associated data of sealed images: what binds a ciphertext to its place and to the change it belongs to.

Format 2 (`AAD_VERSION`), the only one sealed and opened: one version byte, then each part as a 4-byte
big-endian length and its bytes, in this order:

    topic | table | row key | image ("before"/"after") | subject | op | source position | field list | key version

where the field list is itself the count (u32) and each name length-prefixed, and the key version is its
4-byte big-endian encoding. Every part is length-prefixed, so no two different part lists give the same
bytes (format 1 joined them with `|`, so a `|` inside a part could shift the boundary). The op and the
source position (Debezium's LSN or binlog position, carried in clear as `position`) bind the image to the
change that produced it: a reader rebuilds all of it from where the record sits (topic, Kafka key) and what
it says (table, image, subject of that image, op, position, sealed field list, key version in the
ciphertext header), so an older image of the same row can't be replayed into a newer record.

The sealing side (the pipeline, in Python and in `native/`) and the opening side (`reveal`) both use it.
"""

from __future__ import annotations

import struct

#: Version byte of the associated data; sanitized records that use it say `v = 2` (`RECORD_VERSION`).
AAD_VERSION = 2
#: The `v` of sanitized change records whose images are sealed with this associated data.
RECORD_VERSION = 2

_U32 = struct.Struct(">I")


def _part(data: bytes) -> bytes:
    return _U32.pack(len(data)) + data


def field_list_part(fields: list[str]) -> bytes:
    """The field-list part, with its own length prefix (what `native/` precomputes per table plan)."""
    return _part(_U32.pack(len(fields)) + b"".join(_part(f.encode()) for f in fields))


def version_part(version: int) -> bytes:
    return _part(_U32.pack(version))


def image_aad(
    topic: str, table: str, row_key: bytes, image: str, subject: str, op: str, position: str, fields: list[str],
    version: int,
) -> bytes:
    """Associated data of a sealed image; `guard.protect.reveal` rebuilds it from the record."""
    return b"".join((
        bytes((AAD_VERSION,)),
        _part(topic.encode()),
        _part(table.encode()),
        _part(row_key),
        _part(image.encode()),
        _part(subject.encode()),
        _part(op.encode()),
        _part(position.encode()),
        field_list_part(fields),
        version_part(version),
    ))


class ImageAad:
    """`image_aad` for the hot path: the parts fixed per table and per field list are encoded once.

    Produces exactly `image_aad`'s bytes (tested); `fields` must be a list that is not mutated (a
    writer's sealed-field list), since its identity keys the cache.
    """

    __slots__ = ("_heads", "_tails")

    def __init__(self) -> None:
        self._heads: dict[tuple[str, str], bytes] = {}
        self._tails: dict[tuple[int, int], tuple[list[str], bytes]] = {}

    def __call__(self, topic: str, table: str, row_key: bytes, image: str, subject: str, op: str, position: str,
                 fields: list[str], version: int) -> bytes:
        head = self._heads.get((topic, table))
        if head is None:
            if len(self._heads) > 10_000:
                self._heads.clear()
            head = self._heads[(topic, table)] = (
                bytes((AAD_VERSION,)) + _part(topic.encode()) + _part(table.encode()))
        cached = self._tails.get((id(fields), version))
        if cached is None or cached[0] is not fields:
            cached = self._tails[(id(fields), version)] = (fields, field_list_part(fields) + version_part(version))
        return b"".join((head, _part(row_key), _part(image.encode()), _part(subject.encode()), _part(op.encode()),
                         _part(position.encode()), cached[1]))
