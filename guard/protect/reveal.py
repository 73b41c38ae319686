"""Opening sealed images of sanitized records: the only way back to plaintext.

This is the library half of the reveal path. It rebuilds the associated data (`guard.protect.aad`, format
2) from where the record sits (topic, row key) and what it says (table, image, the image's subject, op,
source position, field list, key version), so a ciphertext moved to another row, topic, image, field list
or change (an older image of the same row replayed into a newer record) fails with `IntegrityError`, and
a shredded subject fails with `KeyShreddedError`. Callers that serve people must check policy and audit
each reveal before calling it.

Records of format 1 (`v = 1`: associated data joined with `|`, not bound to op or position) are refused
with an `IntegrityError` that says so: their images could have been replayed, so they are not trusted.
Re-sanitize them from the raw topic if they must be read.

Only data keys are used here: build the key manager with `indexes=False`
(`guard.pipeline.runtime.build_keys(settings, indexes=False)`), so an image-only reader never holds a blind-index
key. Search by identifier goes through the guard (a rate-limited, audited reveal service), never through an
index key held outside the guard's processes.
"""

from __future__ import annotations

from typing import Any

import orjson

from guard.errors import IntegrityError
from guard.keys.manager import KeyManager
from guard.keys.primitives import sealed_header
from guard.protect.aad import RECORD_VERSION, image_aad


def image_subject(record: dict[str, Any], image: str) -> str | None:
    """The data subject whose key sealed `record[image]`: the before image names its own when it differs."""
    if image == "before" and record.get("before_subject"):
        return str(record["before_subject"])
    subject = record.get("subject")
    return str(subject) if subject else None


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
    version_of_record = record.get("v")
    if version_of_record != RECORD_VERSION:
        raise IntegrityError(
            f"sanitized record format v={version_of_record} is not opened: only v={RECORD_VERSION} images are "
            "bound to their op and source position (older images could be replayed); re-sanitize the change "
            "from the raw topic to read it")
    sealed = img["sealed"]
    fields: list[str] = list(sealed["fields"])
    ct: bytes = sealed["ct"]
    subject = image_subject(record, image)
    if not subject:
        raise IntegrityError("record names no data subject, so no key can open it")
    _, version = sealed_header(ct)
    aead = keys.subject_aead_for(record["branch"], subject, ct)
    aad = image_aad(topic, record["table"], row_key or b"", image, subject, str(record["op"]),
                    str(record["position"]), fields, version)
    values = orjson.loads(aead.open(ct, aad))
    if not isinstance(values, list) or len(values) != len(fields):
        raise IntegrityError("sealed payload does not match its field list")
    return dict(zip(fields, values, strict=True))
