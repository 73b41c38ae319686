"""The transfer's state machine: phases, the cut-over's steps, what may run when. Pure logic, plus the
small persistence class that keeps the state as one JSON document in the key store (Redis, durable with
`appendfsync always`), next to the keys the steps change.

Phases: `started` (plan recorded, the incoming owner's key prepared, the branch `transferring`) →
`cutting_over` (some of `CUTOVER_STEPS` done) → `cut_over` (all done) → `completed`. Each step is
recorded done only after its effect is durable, and every step is written so that running it again
after a crash at any point finishes it without doing anything twice (docs/transfer.md, "Crashes").
"""

from __future__ import annotations

import copy
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import orjson

from guard.errors import GuardError

STARTED, CUTTING_OVER, CUT_OVER, COMPLETED = "started", "cutting_over", "cut_over", "completed"
PHASES = (STARTED, CUTTING_OVER, CUT_OVER, COMPLETED)
#: The cut-over's steps, in order (docs/transfer.md says what each does and what a crash in it leaves).
CUTOVER_STEPS = ("scope", "destroy", "retain", "key", "rewrap", "retire", "policy")


#: The branch lock's scripts: each acts only while ARGV[1] (a `<host> <pid>`) still holds the lock KEYS[1],
#: checked and done in one step (a GET then a DEL could delete a lock another process took in between).
RELEASE_LOCK = """if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0"""
RENEW_LOCK = """if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return 0"""
#: The state is saved only by the lock's holder (KEYS[2]: the state, ARGV[2]: its JSON): a run that lost
#: the lock (it hung past the TTL, another took over) must not overwrite the other run's progress.
SAVE_IF_HOLDER = """if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
return 1"""


class TransferStateError(GuardError):
    """A command that can't run in the transfer's current phase (or on another plan than the recorded one)."""


def new_state(plan: dict[str, Any], now_ms: int, prepared_kek: str) -> dict[str, Any]:
    """The state `start` records: the plan (`Plan.as_record`: its digest, no customer ids), the prepared key
    (wrapped by the master key; kept until the cut-over's `key` step is recorded, see `step_done`)."""
    return {"id": plan["id"], "branch": plan["branch"], "plan": plan, "phase": STARTED, "started_ms": now_ms,
            "prepared_kek": prepared_kek, "steps": {}, "scope": None, "destroyed": {}, "retained": {},
            "cutover_started_ms": None, "cutover_done_ms": None, "completed_ms": None, "runs": []}


def check_plan(state: dict[str, Any], plan: dict[str, Any]) -> None:
    """A later command must name the plan `start` recorded (same id and same file digest)."""
    if state["id"] != plan["id"] or state["plan"].get("digest") != plan.get("digest"):
        raise TransferStateError(
            f"transfer {state['id']} was started with another plan (digest {state['plan'].get('digest', '')[:12]}); "
            "a started transfer's plan can't change: complete it, or start a new transfer with a new id")


def can_start(existing: dict[str, Any] | None, active_id: str | None, plan_id: str) -> bool:
    """Whether `start` has anything to do: False for a rerun of the same start (idempotent); raises if
    another transfer of the branch is active or this id was used for a transfer already past `started`."""
    if active_id is not None and active_id != plan_id:
        raise TransferStateError(f"transfer {active_id} of this branch is not completed; complete it first")
    if existing is None:
        return True
    if existing["phase"] != STARTED:
        raise TransferStateError(f"transfer {plan_id} is already {existing['phase']}: start runs once")
    return False


def remaining_steps(state: dict[str, Any]) -> list[str]:
    """The cut-over steps not recorded done, in order; raises in a phase that has no cut-over to do."""
    if state["phase"] == COMPLETED:
        raise TransferStateError(f"transfer {state['id']} is completed")
    return [s for s in CUTOVER_STEPS if s not in state["steps"]]


def may_cut_over(state: dict[str, Any], now_ms: int) -> None:
    """The cut-over runs at or after the cut-off, never before: before it the former owner still owns the
    branch (its staff's access is lawful until then)."""
    cutoff_ms = cutoff_of(state)
    if now_ms < cutoff_ms and state["phase"] == STARTED:
        raise TransferStateError(f"the cut-off is {state['plan']['cutoff']}: the cut-over runs from then on "
                                 f"(in {(cutoff_ms - now_ms) / 1000:.0f} s)")


def cutoff_of(state: dict[str, Any]) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(state["plan"]["cutoff"].replace("Z", "+00:00")).timestamp() * 1000)


def begin_cutover(state: dict[str, Any], now_ms: int) -> dict[str, Any]:
    out = copy.deepcopy(state)
    if out["phase"] == STARTED:
        out["phase"], out["cutover_started_ms"] = CUTTING_OVER, now_ms
    out["runs"].append({"command": "cutover", "at_ms": now_ms})
    return out


def step_done(state: dict[str, Any], step: str, now_ms: int, took_ms: int, detail: dict[str, Any]) -> dict[str, Any]:
    """Record a cut-over step done (in order: an earlier step not done is a programming error)."""
    if step not in CUTOVER_STEPS:
        raise ValueError(f"unknown step {step}")
    missing = [s for s in CUTOVER_STEPS[:CUTOVER_STEPS.index(step)] if s not in state["steps"]]
    if missing:
        raise TransferStateError(f"step {step} before {', '.join(missing)}")
    out = copy.deepcopy(state)
    out["steps"][step] = {"done_ms": now_ms, "took_ms": took_ms, **detail}
    if step == "key":
        # Installed: the key store holds it now (as the branch key's current version). A copy left here
        # would outlive its retirement by a later transfer; until this record, a rerun needs it.
        out.pop("prepared_kek", None)
    if all(s in out["steps"] for s in CUTOVER_STEPS):
        out["phase"], out["cutover_done_ms"] = CUT_OVER, now_ms
    return out


def may_complete(state: dict[str, Any]) -> bool:
    """False if already completed (a rerun: nothing to do); raises before the cut-over is done."""
    if state["phase"] == COMPLETED:
        return False
    if state["phase"] != CUT_OVER:
        raise TransferStateError(f"transfer {state['id']} is {state['phase']}: run cutover to its end first "
                                 f"(steps left: {', '.join(remaining_steps(state))})")
    return True


def complete(state: dict[str, Any], now_ms: int, verification: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(state)
    out["phase"], out["completed_ms"], out["verification"] = COMPLETED, now_ms, verification
    out.pop("prepared_kek", None)  # a state whose key step was recorded before `step_done` dropped it
    return out


class StateStore:
    """The transfer's state in the key store: `transfer:<id>` (the JSON state), `transfer-active:<branch>`
    (the id of the branch's transfer in progress) and `transfer-lock:<branch>` (the process running a
    step: `<host> <pid>`, so a second process waits and a rerun after a SIGKILL takes over at once)."""

    def __init__(self, client: Any, name: Callable[..., str]) -> None:
        """`client`: a Redis client (get, set with ex/nx, delete, register_script); `name`: the key store's
        `name`."""
        self.client = client
        self.name = name
        self.owner = f"{socket.gethostname()} {os.getpid()}"
        self.ttl_s = 3600
        self._release = client.register_script(RELEASE_LOCK)
        self._renew = client.register_script(RENEW_LOCK)
        self._save = client.register_script(SAVE_IF_HOLDER)

    def load(self, transfer_id: str) -> dict[str, Any] | None:
        raw = self.client.get(self.name("transfer", transfer_id))
        return None if raw is None else orjson.loads(raw)

    def save(self, state: dict[str, Any]) -> None:
        """Save the state while this process holds the branch's lock (`lock`); raise if it no longer does."""
        lock = self.name("transfer-lock", state["branch"])
        if not self._save(keys=[lock, self.name("transfer", state["id"])], args=[self.owner, orjson.dumps(state)]):
            raise self._lost(state["branch"], f"transfer {state['id']}'s state was not saved")

    def active(self, branch: str) -> str | None:
        raw = self.client.get(self.name("transfer-active", branch))
        return None if raw is None else raw.decode() if isinstance(raw, bytes) else str(raw)

    def set_active(self, branch: str, transfer_id: str | None) -> None:
        if transfer_id is None:
            self.client.delete(self.name("transfer-active", branch))
        else:
            self.client.set(self.name("transfer-active", branch), transfer_id)

    def lock(self, branch: str, *, wait_s: float = 60.0, ttl_s: int = 3600) -> None:
        """Take the branch's transfer lock; a holder on this host whose process is gone is taken over. The
        lock expires `ttl_s` after it was taken or last renewed (`renew`), so a hung run frees it."""
        name = self.name("transfer-lock", branch)
        self.ttl_s = ttl_s
        deadline = time.monotonic() + wait_s
        while not self.client.set(name, self.owner, ex=ttl_s, nx=True):
            raw = self.client.get(name)
            text = raw.decode() if isinstance(raw, bytes) else str(raw or "")
            holder = text.split(" ")
            if len(holder) == 2 and holder[0] == socket.gethostname() and holder[1].isdigit() \
                    and not _alive(int(holder[1])):
                # a crashed run of this host: its rerun takes over, deleting only that holder's lock (another
                # rerun may have taken it over since this one read it)
                self._release(keys=[name], args=[text])
                continue
            if time.monotonic() >= deadline:
                raise TransferStateError(f"another process ({text}) runs a step of this branch's transfer; wait "
                                         "for it, or end it")
            time.sleep(0.5)

    def renew(self, branch: str) -> None:
        """Extend this process's lock by its TTL (between steps: a long cut-over outlives one TTL); raise if
        the lock is no longer this process's (it expired, and maybe another run took it)."""
        if not self._renew(keys=[self.name("transfer-lock", branch)], args=[self.owner, self.ttl_s]):
            raise self._lost(branch, "this run stops")

    def unlock(self, branch: str) -> None:
        """Release the lock if this process still holds it (never another run's)."""
        self._release(keys=[self.name("transfer-lock", branch)], args=[self.owner])

    def _lost(self, branch: str, what: str) -> TransferStateError:
        raw = self.client.get(self.name("transfer-lock", branch))
        holder = "nobody: it expired" if raw is None else raw.decode() if isinstance(raw, bytes) else str(raw)
        return TransferStateError(
            f"{what}: this process ({self.owner}) no longer holds branch {branch}'s transfer lock (held by "
            f"{holder}), so another run may have taken the transfer over; check `guard transfer status`, "
            "then run the command again")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
