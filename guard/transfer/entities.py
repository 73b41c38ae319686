"""The policy entities a transfer changes (policy/entities.json, Cedar JSON), and writing them safely.

* `start`: the branch becomes `transferring` with the plan's `cutoff` and `freeze_from` (= the cut-off);
  its owner stays the outgoing organisation. From then until the cut-over's policy step, the policy's
  freeze (`freeze-between-cutoff-and-cutover`) denies everybody, compliance included: neither owner's staff act
  on the branch in between, whenever the cut-over actually runs. (A branch made `transferring` by hand,
  without `freeze_from`, is not frozen: its owner keeps working after the cut-off.)
* the cut-over's `policy` step: `owner` → the incoming organisation, `previous_owner` → the outgoing one,
  `transfer_state` → `transferred`, `freeze_from` removed, the branch a member of its new owner; the
  incoming staff the plan names become `Staff` entities of the branch (organisation: the incoming owner).
  The former owner's staff keep their entities (organisation: the former owner):
  `nobody-outside-owner-after-cutoff` denies them from the cut-off on, and decisions name that policy (the
  analyzer's `access_after_transfer_cutoff`).

The engine reloads a changed directory within a second (`PolicyEngine.maybe_reload`); the file is replaced
atomically (write a temporary file, fsync, rename), so a reader never sees half a file.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from guard.errors import GuardError
from guard.policy.engine import validate_directory
from guard.policy.model import cedar_datetime, entity, ref

NS = "BranchGuard::"


def _is(e: dict[str, Any], kind: str, ident: str | None = None) -> bool:
    uid = e.get("uid") or {}
    return str(uid.get("type", "")).removeprefix(NS) == kind and (ident is None or uid.get("id") == ident)


def branch_entity(docs: list[dict[str, Any]], branch: str) -> dict[str, Any]:
    found = [e for e in docs if _is(e, "Branch", branch)]
    if not found:
        raise GuardError(f"branch {branch} is not an entity of the policy directory (entities.json)")
    return found[0]


def owner_of(docs: list[dict[str, Any]], branch: str) -> str | None:
    return ((branch_entity(docs, branch).get("attrs") or {}).get("owner") or {}).get("__entity", {}).get("id")


def at_start(docs: list[dict[str, Any]], branch: str, from_org: str, cutoff_ms: int) -> list[dict[str, Any]]:
    """The entities with the branch `transferring` from its owner `from_org`, cut-off set."""
    out = copy.deepcopy(docs)
    b = branch_entity(out, branch)
    owner = owner_of(out, branch)
    if owner != from_org:
        raise GuardError(f"branch {branch} is owned by {owner}, not by the plan's outgoing owner {from_org}")
    b["attrs"]["transfer_state"] = "transferring"
    b["attrs"]["cutoff"] = cedar_datetime(cutoff_ms / 1000)
    b["attrs"]["freeze_from"] = cedar_datetime(cutoff_ms / 1000)
    return out


def at_cutover(docs: list[dict[str, Any]], branch: str, from_org: str, to_org: str, cutoff_ms: int,
               staff: list[tuple[str, list[str]]]) -> list[dict[str, Any]]:
    """The entities after the cut-over's policy step (idempotent: applying it twice gives the same list)."""
    out = copy.deepcopy(docs)
    if not any(_is(e, "Organisation", to_org) for e in out):
        out.append(entity("Organisation", to_org, {"name": to_org}))
    b = branch_entity(out, branch)
    b["attrs"].update({"owner": ref("Organisation", to_org), "previous_owner": ref("Organisation", from_org),
                       "transfer_state": "transferred", "cutoff": cedar_datetime(cutoff_ms / 1000)})
    b["attrs"].pop("freeze_from", None)  # handed over: the freeze ends
    b["parents"] = [p for p in b.get("parents") or [] if not str(p.get("type", "")).endswith("Organisation")]
    b["parents"].append({"type": NS + "Organisation", "id": to_org})
    for sid, roles in staff:
        out = [e for e in out if not _is(e, "Staff", sid)]
        out.append(entity("Staff", sid, {"branch": ref("Branch", branch), "organisation": ref("Organisation", to_org),
                                         "active": True}, [("Role", r) for r in roles] + [("Branch", branch)]))
    return out


def not_frozen(docs: list[dict[str, Any]], branch: str, from_org: str, to_org: str, cutoff_ms: int, *,
               handed_over_ok: bool) -> str | None:
    """Why the branch is not as `start` left it (`transferring`, `freeze_from` = the cut-off), or None.

    Without that freeze the former owner's staff keep working after the cut-off (the forbid needs both), so
    the cut-over must not run on such a branch. `handed_over_ok`: the entities the policy step writes are
    fine too (a crash after its write, before it was recorded: only the policy step is left).
    """
    attrs = branch_entity(docs, branch).get("attrs") or {}
    state, freeze = attrs.get("transfer_state"), attrs.get("freeze_from")
    if state == "transferring" and freeze == cedar_datetime(cutoff_ms / 1000):
        return None
    owner = (attrs.get("owner") or {}).get("__entity", {}).get("id")
    previous = (attrs.get("previous_owner") or {}).get("__entity", {}).get("id")
    if handed_over_ok and state == "transferred" and (owner, previous) == (to_org, from_org):
        return None
    found = (freeze.get("__extn") or {}).get("arg") if isinstance(freeze, dict) else freeze
    return f"transfer_state {state!r}, freeze_from {found!r}, owner {owner!r}"


def check_loads(directory: Path, after: str) -> None:
    """Raise unless the policy directory loads as the engines will load it. An engine that can't load a
    changed directory keeps its last good policy, so a change that breaks it is silently not in force
    (at the policy step: the former owner would still own the branch)."""
    errors = validate_directory(directory)
    if errors:
        raise GuardError(f"the policy directory {directory} does not load after {after} ({errors[0]}); the "
                         "guard's engines keep their last good policy, so the change is not in force: fix the "
                         f"directory (`guard policy validate {directory}`), then run the command again")


def read(directory: Path) -> list[dict[str, Any]]:
    path = directory / "entities.json"
    try:
        docs = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise GuardError(f"the policy entities {path} can't be read ({exc})") from None
    if not isinstance(docs, list):
        raise GuardError(f"the policy entities {path} are not a list")
    return docs


def write(directory: Path, docs: list[dict[str, Any]]) -> bool:
    """Replace entities.json atomically if its content changes; True if it did."""
    path = directory / "entities.json"
    text = json.dumps(docs, ensure_ascii=False, indent=1) + "\n"
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except OSError:
        pass
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".entities.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dirfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)
    return True
