"""The entity model's names and the JSON forms Cedar reads (entity references, datetimes, contexts).

Every type lives in the `BranchGuard` namespace of `policy/schema.cedarschema`:

* principals: `Staff` (member of `Role`s; attributes `branch`, `organisation`, `active`) and `Service`
  (a downstream system; `organisation`, member of `Role`s);
* `Organisation`, `Role`, `Branch` (`owner`, `transfer_state`, optional `cutoff`);
* resources: `Table` (a branch table whose CDC changes are written: `branch`, `name`, `subject_root`),
  `DataSubject` (a customer: `branch`, `consent`, `legal_hold`, optional `retention_until`);
* `FieldClass` (`C1`, `C2`, `C3`, JR/T 0171-2020), named by the context of reveals;
* actions `write`, `delete`, `reveal`, `export`, `search`, `shred`;
* the context of every request: `time` (Cedar has no clock: the caller says when), `purpose`, `volume`
  (records concerned), `source` (`cdc`, `reveal-api`, `cli`, ...), optional `field_class` and `fields`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

NAMESPACE = "BranchGuard"
ACTIONS = ("write", "delete", "reveal", "export", "search", "shred")
FIELD_CLASSES = ("C1", "C2", "C3")


def entity_uid(kind: str, ident: str) -> dict[str, str]:
    """A Cedar entity reference of the BranchGuard namespace, e.g. `entity_uid("Staff", "t0101")`."""
    return {"type": kind if "::" in kind else f"{NAMESPACE}::{kind}", "id": ident}


def action_uid(action: str) -> dict[str, str]:
    return {"type": f"{NAMESPACE}::Action", "id": action}


def ref(kind: str, ident: str) -> dict[str, Any]:
    """An entity reference as an attribute value (`__entity`)."""
    return {"__entity": entity_uid(kind, ident)}


def cedar_datetime(when: datetime | float) -> dict[str, Any]:
    """A Cedar `datetime` extension value (UTC, millisecond precision) from a datetime or unix seconds."""
    if not isinstance(when, datetime):
        when = datetime.fromtimestamp(float(when), UTC)
    elif when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    text = when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"
    return {"__extn": {"fn": "datetime", "arg": text}}


def context(time: datetime | float, *, purpose: str, source: str, volume: int = 1,
            field_class: str | None = None, fields: Iterable[str] | None = None) -> dict[str, Any]:
    """The context of a request: when (Cedar has no clock), why, how many records, through what."""
    out: dict[str, Any] = {"time": cedar_datetime(time), "purpose": purpose, "volume": int(volume), "source": source}
    if field_class is not None:
        out["field_class"] = ref("FieldClass", field_class)
    if fields is not None:
        out["fields"] = sorted(fields)
    return out


def entity(kind: str, ident: str, attrs: Mapping[str, Any] | None = None,
           parents: Iterable[tuple[str, str]] = ()) -> dict[str, Any]:
    """An entity document (`uid`, `attrs`, `parents`) for an entities file or `PolicyEngine.add_entities`."""
    return {"uid": entity_uid(kind, ident), "attrs": dict(attrs or {}),
            "parents": [entity_uid(k, i) for k, i in parents]}


def subject_entity(branch: str, customer_id: str | int, *, consent: Iterable[str] = (), legal_hold: bool = False,
                   retention_until: datetime | float | None = None) -> dict[str, Any]:
    """The `DataSubject` entity of a customer (id `<branch>:<customer id>`), for requests about one customer
    (reveal, export, search, shred): pass it in `PolicyEngine.decide(..., entities=[...])`. Consent is the
    set of purposes the customer agreed to; legal hold from the key store (`RedisKeyStore.is_held`)."""
    attrs: dict[str, Any] = {"branch": ref("Branch", branch), "consent": sorted(consent), "legal_hold": legal_hold}
    if retention_until is not None:
        attrs["retention_until"] = cedar_datetime(retention_until)
    return entity("DataSubject", f"{branch}:{customer_id}", attrs, [("Branch", branch)])
