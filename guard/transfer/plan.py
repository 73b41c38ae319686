"""A transfer plan: which branch goes from which organisation to which, when, and what happens to each
customer (moves, destroyed, retained storage-only under a legal basis). Pure: no I/O but reading the file.

The file is TOML (docs/transfer.md lists every field):

    [transfer]
    id = "t-0101-2026q4"                  # letters, digits, '-', '_', '.'; names the transfer everywhere
    branch = "0101"
    from = "bank-a"                       # the outgoing owner (must own the branch when `start` runs)
    to = "bank-b"                         # the incoming owner
    cutoff = "2026-12-03T17:00:00Z"       # from this instant on the former owner's staff lose access
    by = "dpo@bank-a"                     # who orders it (in every audit record and confirmation)

    [scope]
    default = "move"                      # customers the lists below don't name: move | destroy
    classes = ["C1", "C2"]                # the classes that move with a moving customer
    move = [1, 2, "10-20"]                # customer ids (ranges "a-b", inclusive)
    destroy = ["21-30"]
    destroy_reason = "art47_1_purpose_achieved"   # PIPL Art. 47 reason of the shreds

    [[scope.retain]]                      # storage-only: kept sealed, never revealed, erased at `until`
    customers = [31, 32]
    legal_basis = "AML Law Art. 19: transaction records kept 5 years after the relationship ends"
    until = "2031-12-31T00:00:00Z"        # optional: the retention sweep erases them then

    [[incoming_staff]]                    # optional: the new owner's staff at the branch (policy entities)
    id = "m0101-b"
    roles = ["manager"]
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from guard.errors import ConfigError

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ORG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
MOVE, DESTROY, RETAIN = "move", "destroy", "retain"
#: Classes a moving customer can take: a data key seals all of an image's C1 and C2 fields together, so a
#: customer moves with both or not at all (moving a subset would need re-encryption); C3 is never carried.
MOVABLE_CLASSES = ("C1", "C2")
DESTROY_REASONS = ("art47_1_purpose_achieved", "art47_2_retention_expired", "art47_3_consent_withdrawn",
                   "art47_4_unlawful_processing", "art47_5_other_legal", "subject_request")
ROLES = ("teller", "manager", "compliance", "dpo", "auditor", "marketing", "batch")


@dataclass(frozen=True, slots=True)
class Retention:
    """Customers kept storage-only after the transfer, under a legal basis, until an optional date."""

    customers: frozenset[int]
    legal_basis: str
    until: datetime | None = None


@dataclass(frozen=True, slots=True)
class Staff:
    id: str
    roles: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Plan:
    id: str
    branch: str
    from_org: str
    to_org: str
    cutoff: datetime
    by: str
    default: str
    classes: tuple[str, ...]
    move: frozenset[int]
    destroy: frozenset[int]
    destroy_reason: str
    retain: tuple[Retention, ...] = ()
    incoming_staff: tuple[Staff, ...] = ()
    #: SHA-256 of the plan file's bytes: `start` records it, later steps refuse another plan under the same id.
    digest: str = ""
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def cutoff_ms(self) -> int:
        return int(self.cutoff.timestamp() * 1000)

    def disposition(self, customer_id: int) -> tuple[str, Retention | None]:
        """What happens to one customer: (move | destroy | retain, the retention if retained)."""
        for r in self.retain:
            if customer_id in r.customers:
                return RETAIN, r
        if customer_id in self.destroy:
            return DESTROY, None
        if customer_id in self.move:
            return MOVE, None
        return self.default, None

    def as_dict(self) -> dict[str, Any]:
        """The plan as the report and the state show it (ids as sorted lists)."""
        return {"id": self.id, "branch": self.branch, "from": self.from_org, "to": self.to_org,
                "cutoff": iso(self.cutoff), "by": self.by, "digest": self.digest,
                "scope": {"default": self.default, "classes": list(self.classes), "move": compact(self.move),
                          "destroy": compact(self.destroy), "destroy_reason": self.destroy_reason,
                          "retain": [{"customers": compact(r.customers), "legal_basis": r.legal_basis,
                                      "until": iso(r.until) if r.until else None} for r in self.retain]},
                "incoming_staff": [{"id": s.id, "roles": list(s.roles)} for s in self.incoming_staff]}


    def as_record(self) -> dict[str, Any]:
        """The plan as the state, the audit records and the report keep it: every field but the customer
        ids, each list counted instead. The key store and the audit topic (immutable) never hold customer
        ids; the ids stay in the operator's plan file, which every later command re-reads and checks against
        `digest`, so nothing after `start` needs them from the state."""
        out = self.as_dict()
        out["scope"] = {"default": self.default, "classes": list(self.classes), "destroy_reason": self.destroy_reason,
                        "move_named": len(self.move), "destroy_named": len(self.destroy),
                        "retain": [{"customers_named": len(r.customers), "legal_basis": r.legal_basis,
                                    "until": iso(r.until) if r.until else None} for r in self.retain]}
        return out


def compact(ids: Iterable[int]) -> list[int | str]:
    """Sorted ids with runs of three or more written as "a-b" ranges (the plan file's own form)."""
    out: list[int | str] = []
    run: list[int] = []
    for c in sorted(ids):
        if run and c != run[-1] + 1:
            out += run if len(run) < 3 else [f"{run[0]}-{run[-1]}"]
            run = []
        run.append(c)
    out += run if len(run) < 3 else [f"{run[0]}-{run[-1]}"]
    return out


def iso(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if when.microsecond == 0 else \
        when.astimezone(UTC).isoformat().replace("+00:00", "Z")


def load_plan(path: str | Path) -> Plan:
    """Read and validate a plan file; ConfigError naming every problem found."""
    raw = Path(path).read_bytes()
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"transfer plan {path}: not valid TOML ({exc})") from None
    return parse_plan(doc, digest=hashlib.sha256(raw).hexdigest())


def parse_plan(doc: Mapping[str, Any], *, digest: str = "") -> Plan:
    """A plan from its TOML document; ConfigError listing every problem (not only the first)."""
    errors: list[str] = []
    t = _table(doc, "transfer", errors)
    s = _table(doc, "scope", errors)
    unknown = set(doc) - {"transfer", "scope", "incoming_staff"}
    if unknown:
        errors.append(f"unknown sections: {', '.join(sorted(unknown))}")
    for name, table, known in (("transfer", t, {"id", "branch", "from", "to", "cutoff", "by"}),
                               ("scope", s, {"default", "classes", "move", "destroy", "destroy_reason", "retain"})):
        extra = set(table) - known
        if extra:
            errors.append(f"[{name}]: unknown fields {', '.join(sorted(extra))}")
    tid = _text(t, "id", errors, "transfer")
    if tid and not ID_RE.match(tid):
        errors.append("transfer.id: letters, digits, '-', '_', '.' only (at most 64)")
    branch = _text(t, "branch", errors, "transfer")
    if branch and not re.fullmatch(r"[0-9A-Za-z]{1,16}", branch):
        errors.append("transfer.branch: a branch code (letters and digits)")
    from_org, to_org = _text(t, "from", errors, "transfer"), _text(t, "to", errors, "transfer")
    for key, org in (("from", from_org), ("to", to_org)):
        if org and not ORG_RE.match(org):
            errors.append(f"transfer.{key}: an organisation id (letters, digits, '-', '_', '.', '@')")
    if from_org and from_org == to_org:
        errors.append("transfer.from and transfer.to are the same organisation")
    by = _text(t, "by", errors, "transfer")
    cutoff = _when(t.get("cutoff"), "transfer.cutoff", errors, required=True)
    default = s.get("default", MOVE)
    if default not in (MOVE, DESTROY):
        errors.append(f"scope.default: move or destroy, not {default!r} (retention needs a legal basis per "
                      "customer: list them under [[scope.retain]])")
    classes = s.get("classes", list(MOVABLE_CLASSES))
    if not isinstance(classes, list) or any(c not in ("C1", "C2", "C3") for c in classes):
        errors.append("scope.classes: a list of C1, C2")
        classes = list(MOVABLE_CLASSES)
    if "C3" in classes:
        errors.append("scope.classes: C3 (authentication data) never moves: the guard never carries it")
    elif sorted(set(classes)) != list(MOVABLE_CLASSES):
        errors.append("scope.classes: a moving customer takes C1 and C2 together (one data key seals both in "
                      "each image; moving only one would need re-encrypting every record)")
    move = _ids(s.get("move", []), "scope.move", errors)
    destroy = _ids(s.get("destroy", []), "scope.destroy", errors)
    reason = s.get("destroy_reason", "art47_1_purpose_achieved")
    if reason not in DESTROY_REASONS:
        errors.append(f"scope.destroy_reason: one of {', '.join(DESTROY_REASONS)}")
    retain: list[Retention] = []
    raw_retain = s.get("retain", [])
    if not isinstance(raw_retain, list):
        errors.append("scope.retain: an array of tables ([[scope.retain]])")
        raw_retain = []
    for i, r in enumerate(raw_retain):
        where = f"scope.retain[{i}]"
        if not isinstance(r, dict):
            errors.append(f"{where}: a table")
            continue
        extra = set(r) - {"customers", "legal_basis", "until"}
        if extra:
            errors.append(f"{where}: unknown fields {', '.join(sorted(extra))}")
        basis = r.get("legal_basis")
        if not isinstance(basis, str) or len(basis.strip()) < 8:
            errors.append(f"{where}.legal_basis: the law and article that require keeping them (a sentence)")
            basis = ""
        until = _when(r.get("until"), f"{where}.until", errors, required=False)
        if until is not None and cutoff is not None and until <= cutoff:
            errors.append(f"{where}.until: after the cut-off")
        ids = _ids(r.get("customers", []), f"{where}.customers", errors)
        if not ids:
            errors.append(f"{where}.customers: at least one customer")
        retain.append(Retention(ids, basis, until))
    named: dict[int, str] = {}
    for label, ids in [("move", move), ("destroy", destroy)] + [(f"retain[{i}]", r.customers)
                                                                for i, r in enumerate(retain)]:
        for c in sorted(ids):
            if c in named:
                errors.append(f"customer {c} is in both scope.{named[c]} and scope.{label}")
            else:
                named[c] = label
    staff: list[Staff] = []
    raw_staff = doc.get("incoming_staff", [])
    for i, entry in enumerate(raw_staff if isinstance(raw_staff, list) else []):
        sid, roles = (entry or {}).get("id"), (entry or {}).get("roles", [])
        if not isinstance(sid, str) or not ID_RE.match(sid):
            errors.append(f"incoming_staff[{i}].id: a staff id")
            continue
        if not isinstance(roles, list) or not roles or any(r not in ROLES for r in roles):
            errors.append(f"incoming_staff[{i}].roles: a non-empty list of {', '.join(ROLES)}")
            continue
        staff.append(Staff(sid, tuple(sorted(set(roles)))))
    if len({s.id for s in staff}) != len(staff):
        errors.append("incoming_staff: an id appears twice")
    if errors:
        raise ConfigError("transfer plan is not valid:\n  " + "\n  ".join(errors))
    assert cutoff is not None
    return Plan(tid, branch, from_org, to_org, cutoff, by, default, tuple(sorted(set(classes))), move, destroy,
                reason, tuple(retain), tuple(staff), digest, dict(doc))


def resolve(plan: Plan, customer_ids: Iterable[int]) -> dict[int, str]:
    """The disposition of every customer of the branch (the database's ids plus those the plan names)."""
    every = set(customer_ids) | set(plan.move) | set(plan.destroy)
    for r in plan.retain:
        every |= r.customers
    return {c: plan.disposition(c)[0] for c in sorted(every)}


def _table(doc: Mapping[str, Any], name: str, errors: list[str]) -> Mapping[str, Any]:
    value = doc.get(name)
    if not isinstance(value, dict):
        errors.append(f"[{name}] is missing")
        return {}
    return value


def _text(table: Mapping[str, Any], key: str, errors: list[str], section: str) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value.strip():
        errors.append(f"{section}.{key} is missing (text)")
        return ""
    return value.strip()


def _when(value: Any, where: str, errors: list[str], *, required: bool) -> datetime | None:
    if value is None:
        if required:
            errors.append(f"{where} is missing (an RFC 3339 time with its offset, e.g. 2026-12-03T17:00:00Z)")
        return None
    if isinstance(value, datetime):
        when = value
    elif isinstance(value, str):
        try:
            when = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            errors.append(f"{where}: not an RFC 3339 time ({value!r})")
            return None
    else:
        errors.append(f"{where}: an RFC 3339 time")
        return None
    if when.tzinfo is None:
        errors.append(f"{where}: give the offset (Z or +08:00): a cut-off without one is ambiguous")
        return None
    return when.astimezone(UTC)


def _ids(value: Any, where: str, errors: list[str]) -> frozenset[int]:
    """Customer ids: integers and "a-b" ranges (inclusive, at most 1,000,000 ids each)."""
    out: set[int] = set()
    if not isinstance(value, list):
        errors.append(f"{where}: a list of customer ids and \"a-b\" ranges")
        return frozenset()
    for item in value:
        if isinstance(item, bool):
            errors.append(f"{where}: {item!r} is not a customer id")
        elif isinstance(item, int) and item >= 0:
            out.add(item)
        elif isinstance(item, str) and (m := re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", item)):
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo or hi - lo >= 1_000_000:
                errors.append(f"{where}: range {item!r} is empty or too large")
            else:
                out.update(range(lo, hi + 1))
        elif isinstance(item, str) and item.strip().isdigit():
            out.add(int(item))
        else:
            errors.append(f"{where}: {item!r} is not a customer id or \"a-b\" range")
    return frozenset(out)
