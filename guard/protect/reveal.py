"""Opening sealed images of sanitized records: the only way back to plaintext.

This is the library half of the reveal path. It rebuilds the associated data from where the record sits
(topic, row key) and what it says (table, image, subject, field list, key version), so a ciphertext moved
to another row, topic, image or field list fails with `IntegrityError`, and a shredded subject fails with
`KeyShreddedError`. Callers that serve people must check policy and audit each reveal before calling it.
"""

from __future__ import annotations

from typing import Any

import orjson

from guard.errors import IntegrityError
from guard.keys.manager import KeyManager
from guard.keys.primitives import sealed_header
from guard.protect.aad import image_aad


def open_image(
    keys: KeyManager,
    record: dict[str, Any],
    image: str,
    *,
    topic: str,
    row_key: bytes | None,
) -> dict[str, Any]:
    """Decrypt the sealed fields of `record[image]` ("before" or "after") into column → value."""
    img = record.get(image)
    if not img or not img.get("sealed"):
        return {}
    sealed = img["sealed"]
    fields: list[str] = list(sealed["fields"])
    ct: bytes = sealed["ct"]
    subject = record.get("subject")
    if not subject:
        raise IntegrityError("record names no data subject, so no key can open it")
    _, version = sealed_header(ct)
    aead = keys.subject_aead_for(record["branch"], subject, ct)
    aad = image_aad(topic, record["table"], row_key or b"", image, subject, fields, version)
    values = orjson.loads(aead.open(ct, aad))
    if not isinstance(values, list) or len(values) != len(fields):
        raise IntegrityError("sealed payload does not match its field list")
    return dict(zip(fields, values, strict=True))
