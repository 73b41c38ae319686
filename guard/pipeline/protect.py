"""The protect stage: an event's images and Kafka key in their protected forms.

Per image: clear columns copied, display masks and blind indexes computed, and every protected column
sealed in **one** AES-256-GCM call whose associated data binds the ciphertext to its topic, table, row
key, image, data subject, op, source position, field list and key version (`guard.protect.aad`). The data
subject's key is resolved here too, with the rule for changes that meet an erased subject.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import orjson

from guard.cdc.envelope import ChangeEvent
from guard.classify.plans import Classifier, TablePlan
from guard.errors import KeyShreddedError
from guard.keys.manager import KeyManager
from guard.keys.primitives import Aead
from guard.protect.aad import ImageAad
from guard.protect.masking import mask
from guard.records.encoders import ImageWriter

_SCALARS = (str, int, float, bool, type(None))
#: The longest raw Kafka key the memo of sanitized keys keeps (native path: `KEY_MEMO_MAX_BYTES`): the memo is
#: bounded by entries, and long distinct keys would make it hold their whole bytes.
KEY_MEMO_MAX_BYTES = 1024


class Protector:
    """Seals, masks and indexes images, and replaces Kafka keys by their blind indexes."""

    def __init__(self, keys: KeyManager, classifier: Classifier, branch: str) -> None:
        self.keys = keys
        self.classifier = classifier
        self.branch = branch
        #: (table, raw Kafka key) -> sanitized key (a memo of customers' values: emptied with the value caches).
        self.key_cache: dict[tuple[str, bytes], bytes] = {}
        #: One image writer per table plan (its mask/index memos are emptied with the value caches).
        self.writers: dict[int, ImageWriter] = {}
        #: Called with each table plan that gets its first writer (the native path registers it).
        self.on_new_plan: Callable[[TablePlan], None] | None = None
        self._aad = ImageAad()
        self._erased_at: dict[str, int] = {}

    def image(
        self,
        plan: TablePlan,
        row: Mapping[str, Any] | None,
        aead: Aead | None,
        topic: str,
        table: str,
        row_key: bytes,
        image: str,
        subject: str,
        op: str,
        position: str,
    ) -> bytes | None:
        """One image as Avro bytes: one AES-GCM call seals every protected column (None: no image)."""
        if row is None:
            return None
        if tuple(row) != plan.columns:
            plan = self.classifier.plan(table, row)
        writer = self.writers.get(id(plan))
        if writer is None:
            writer = ImageWriter(clear=plan.clear, masks=plan.masks, index=plan.index, hashed=plan.hashed,
                                 dropped=plan.dropped, sealed=plan.sealed, mask=mask, token=self.keys.search_token,
                                 keyed_hash=self.keys.keyed_hash.digest)
            self.writers[id(plan)] = writer
            if self.on_new_plan is not None:
                self.on_new_plan(plan)
        ciphertext = None
        if aead is not None:
            fields = writer.sealed_fields
            if fields:
                aad = self._aad(topic, table, row_key, image, subject, op, position, fields, aead.version)
                ciphertext = aead.seal(orjson.dumps([row[c] for c in fields]), aad)
            else:
                ciphertext = b""
        return writer.write(row, ciphertext)

    def subject_aead(self, subject: str, event: ChangeEvent) -> tuple[Aead | None, str]:
        """(the subject's key, the decision): `protected`, or no key for a change that meets an erasure.

        Raises `KeyShreddedError` for a create/update committed after its subject was erased.
        """
        try:
            return self.keys.subject_aead(self.branch, subject), "protected"
        except KeyShreddedError:
            # Tables travel on separate topics, so a customer's root-row delete can be processed before
            # changes to its other rows that were committed earlier. Those belong to the erased subject:
            # they flow without their protected fields. Only changes committed after the erasure are
            # refused (DLQ + anomaly), because nothing should write an erased customer's data any more.
            if event.op != "d" and not self._committed_before_erasure(subject, event.source_ts_ms):
                raise
            return None, "erased_delete" if event.op == "d" else "erased_late"

    def other_image_aead(self, subject: str) -> Aead | None:
        """The key of a before image whose subject differs from the event's (a row moved between subjects):
        None if that subject was erased (its old image then flows without its protected fields)."""
        try:
            return self.keys.subject_aead(self.branch, subject)
        except KeyShreddedError:
            return None

    def _committed_before_erasure(self, subject: str, source_ts_ms: int | None) -> bool:
        """Whether a change committed at `source_ts_ms` predates the erasure of `subject`."""
        if source_ts_ms is None:
            return False
        effective = self._erased_at.get(subject)
        if effective is None:
            raw = self.keys.store.erased_record(self.branch, subject)
            doc = orjson.loads(raw) if raw else {}
            effective = int(doc.get("effective_ms") or doc.get("at_ms") or 0)
            if len(self._erased_at) > 100_000:
                self._erased_at.clear()
            self._erased_at[subject] = effective
        return source_ts_ms <= effective

    def sanitize_key(self, schema_table: str, key: bytes | None) -> bytes | None:
        """The Kafka key with every column the catalog doesn't allow in clear replaced by its blind index."""
        if key is None:
            return None
        cached = self.key_cache.get((schema_table, key))
        if cached is not None:
            return cached
        try:
            doc = orjson.loads(key)
        except orjson.JSONDecodeError:
            doc = None
        if isinstance(doc, dict) and "payload" in doc and "schema" in doc:
            doc = doc["payload"]
        if isinstance(doc, dict):
            out = {}
            for column, value in doc.items():
                policy = self.classifier.key_policy(schema_table, column)
                if policy is not None and policy.action.value == "clear" and isinstance(value, _SCALARS):
                    out[column] = value
                else:
                    out[column] = self.keys.key_token(column, orjson.dumps(value))
            result = orjson.dumps(out)
        else:
            result = orjson.dumps({"_key": self.keys.key_token("_key", key)})
        if len(key) <= KEY_MEMO_MAX_BYTES:
            if len(self.key_cache) > 100_000:
                self.key_cache.clear()
            self.key_cache[(schema_table, key)] = result
        return result
