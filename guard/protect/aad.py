"""Associated data of sealed images: what binds a ciphertext to its topic, table, row, image, subject,
field list and key version. The sealing side (the pipeline) and the opening side (`reveal`) both use it."""

from __future__ import annotations


def image_aad(
    topic: str, table: str, row_key: bytes, image: str, subject: str, fields: list[str], version: int
) -> bytes:
    """Associated data of a sealed image; `guard.protect.reveal` rebuilds it from the record's location."""
    return b"|".join(
        (
            b"bg1",
            topic.encode(),
            table.encode(),
            row_key,
            image.encode(),
            subject.encode(),
            ",".join(fields).encode(),
            str(version).encode(),
        )
    )


class ImageAad:
    """`image_aad` for the hot path: the parts fixed per table and per field list are encoded once.

    Produces exactly `image_aad`'s bytes (tested); `fields` must be a list that is not mutated (a
    writer's sealed-field list), since its identity keys the cache.
    """

    __slots__ = ("_heads", "_tails")

    def __init__(self) -> None:
        self._heads: dict[tuple[str, str], bytes] = {}
        self._tails: dict[tuple[int, int], tuple[list[str], bytes]] = {}

    def __call__(self, topic: str, table: str, row_key: bytes, image: str, subject: str, fields: list[str],
                 version: int) -> bytes:
        head = self._heads.get((topic, table))
        if head is None:
            head = self._heads[(topic, table)] = b"bg1|" + topic.encode() + b"|" + table.encode() + b"|"
        cached = self._tails.get((id(fields), version))
        if cached is None or cached[0] is not fields:
            cached = self._tails[(id(fields), version)] = (
                fields, b"|" + ",".join(fields).encode() + b"|" + str(version).encode())
        return b"".join((head, row_key, b"|", image.encode(), b"|", subject.encode(), cached[1]))
