"""The transfer's steps on the live deployment: `start`, `cutover` (its steps in order), `complete`,
`status`. Each step is idempotent and recorded in the state only once its effect is durable, so a rerun
after a crash anywhere finishes the step without doing anything twice (docs/transfer.md, "Crashes").

Every step writes an audit record to `guard.audit` (op `transfer`, decision `transfer_<what>`, source
topic `transfer/<id>`, the details as JSON in `reason`), chained and checkpointed like `guard erase`'s
(one chain per run); out-of-scope customers are crypto-shredded through the erasure path
(`Sanitizer.erase`, trigger `transfer`), whose signed confirmations go to `guard.deletions`.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import KafkaError, KafkaException, Message, Producer

from guard.audit.writer import OneShotChains
from guard.config import Settings
from guard.erasure.service import REASONS, erasure_sanitizer
from guard.errors import GuardError
from guard.kafka import confirmations
from guard.kafka_security import client_config
from guard.pipeline.erasure_records import pending_records
from guard.pipeline.sanitizer import Sanitizer
from guard.policy.engine import default_directory
from guard.records.builders import OutRecord
from guard.transfer import entities
from guard.transfer import state as sm
from guard.transfer.plan import DESTROY, MOVE, RETAIN, Plan, resolve

log = logging.getLogger(__name__)

class Publisher:
    """One transactional producer and one pair of audit chains for a run. Every batch (its records and the
    checkpoints of the chains after it) is one Kafka transaction: a run killed mid-batch leaves nothing of
    that batch for `read_committed` readers (its chain simply ends at the last committed checkpoint), and
    the rerun's producer, same transactional id, fences it. The checkpoints go to the second store after
    the commit."""

    def __init__(self, settings: Settings, sanitizer: Sanitizer, writer: str, transactional_id: str) -> None:
        self.settings, self.sanitizer = settings, sanitizer
        signer = sanitizer.emitter.signer
        if signer is None:
            raise GuardError("the audit signing key is needed to record a transfer (docs/audit.md)")
        self.chains = OneShotChains(settings, signer, writer)
        self.producer = Producer(client_config(settings, **{"enable.idempotence": True,
                                                            "transactional.id": transactional_id}))
        try:
            self.producer.init_transactions(60)
        except KafkaException as exc:
            raise GuardError(f"the transfer's Kafka producer could not start ({exc})") from None

    def publish(self, records: list[OutRecord]) -> None:
        if not records:
            return
        failures: list[str] = []

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                failures.append(f"{msg.topic()}: {err.str()}")

        stamped = [(r, self.chains.headers(r.topic, r.key, r.value, r.headers)) for r in records]
        checkpoints, notes = self.chains.checkpoints(self.sanitizer.emitter.checkpoint)
        stamped += [(r, r.headers) for r in checkpoints if isinstance(r, OutRecord)]
        problem = ""
        try:
            self.producer.begin_transaction()
            for rec, headers in stamped:
                self.producer.produce(rec.topic, rec.value, rec.key,
                                      partition=-1 if rec.partition is None else rec.partition,
                                      timestamp=rec.timestamp or 0, on_delivery=on_delivery, headers=headers)
            left = self.producer.flush(60)
            if left or failures:
                problem = "; ".join(failures) or f"{left} undelivered"
            else:
                self.producer.commit_transaction(60)
        except (KafkaException, BufferError) as exc:
            problem = str(exc)
        if problem:
            with contextlib.suppress(KafkaException):
                self.producer.abort_transaction(30)
            raise GuardError(f"the transfer's records were not written to Kafka ({problem}); nothing of this "
                             "batch is committed: run the command again")
        try:
            self.sanitizer.keys.store.put_audit_checkpoints(self.settings.audit_topic, notes)
        except GuardError as exc:
            log.warning("the transfer's audit checkpoints are on %s but not in the second store (%s)",
                        self.settings.audit_topic, exc)


class TransferService:
    """The transfer of one branch, as one process runs it (`guard transfer ...`)."""

    def __init__(self, settings: Settings, plan: Plan, *, policy_dir: Path | None = None,
                 customer_ids: Callable[[], Iterable[int]] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.plan = plan
        self.settings = dataclasses.replace(settings, branch=plan.branch)
        self.policy_dir = policy_dir or Path(settings.policy_dir or default_directory())
        self.customer_ids = customer_ids
        self.clock = clock
        self.sanitizer = erasure_sanitizer(self.settings)
        self.sanitizer.owner = f"transfer:{plan.id}#{uuid.uuid4()}"
        self.keys = self.sanitizer.keys
        self.store = self.keys.store
        self.states = sm.StateStore(self.store.client, self.store.name)
        self._publisher: Publisher | None = None
        self._seq = 0

    # --- helpers -------------------------------------------------------------------------------------
    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    @property
    def publisher(self) -> Publisher:
        if self._publisher is None:
            self._publisher = Publisher(self.settings, self.sanitizer, f"transfer-{self.plan.id}",
                                        f"{self.settings.group_id}-transfer-{self.plan.id}")
        return self._publisher

    @property
    def source(self) -> str:
        return f"transfer/{self.plan.id}"

    def _audit(self, what: str, detail: dict[str, Any], subject: str | None = None) -> OutRecord:
        self._seq += 1
        rec = self.sanitizer.emitter.audit(self.source, 0, self._seq, None, "transfer", subject, f"transfer_{what}",
                                           orjson.dumps({"transfer": self.plan.id, "by": self.plan.by, **detail},
                                                        option=orjson.OPT_SORT_KEYS).decode(), {}, {})
        rec.key = f"transfer:{self.plan.branch}".encode()
        return rec

    def load(self) -> dict[str, Any]:
        state = self.states.load(self.plan.id)
        if state is None:
            raise sm.TransferStateError(f"transfer {self.plan.id} was not started (guard transfer start)")
        sm.check_plan(state, self.plan.as_dict())
        return state

    # --- start -----------------------------------------------------------------------------------------
    def start(self) -> dict[str, Any]:
        """Record the plan, prepare the incoming owner's branch key, mark the branch `transferring`."""
        branch = self.plan.branch
        self.states.lock(branch)
        try:
            existing = self.states.load(self.plan.id)
            if existing is not None:
                sm.check_plan(existing, self.plan.as_dict())
            fresh = sm.can_start(existing, self.states.active(branch), self.plan.id)
            docs = entities.read(self.policy_dir)
            if fresh:
                entities.at_start(docs, branch, self.plan.from_org, self.plan.cutoff_ms)  # checks the owner
                prepared = self.keys.prepare_transfer_key(branch, self.plan.id)
                state = sm.new_state(self.plan.as_record(), self._now_ms(), base64.b64encode(prepared).decode())
                self.states.save(state)
                self.states.set_active(branch, self.plan.id)
            else:
                assert existing is not None
                state = existing
                self.states.set_active(branch, self.plan.id)  # a crash may have come between save and this
            changed = entities.write(self.policy_dir, entities.at_start(
                docs, branch, self.plan.from_org, self.plan.cutoff_ms)) if entities.owner_of(
                docs, branch) == self.plan.from_org else False
            entities.check_loads(self.policy_dir, "start's entities change (the branch transferring)")
            if fresh or changed:
                self.publisher.publish([self._audit("started", {
                    "plan": self.plan.as_record(), "policy_entities_changed": changed,
                    "incoming_key": "prepared (wrapped by the master key; installed at the cut-over)"})])
            return state
        finally:
            self.states.unlock(branch)

    # --- cutover ---------------------------------------------------------------------------------------
    def cutover(self) -> dict[str, Any]:
        """Run the cut-over's steps not yet done, in order; safe to rerun after a crash at any point."""
        branch = self.plan.branch
        self.states.lock(branch)
        try:
            state = self.load()
            remaining = sm.remaining_steps(state)
            if not remaining:
                return state
            sm.may_cut_over(state, self._now_ms())
            self._check_frozen(state, remaining)
            state = sm.begin_cutover(state, self._now_ms())
            self.states.save(state)
            for step in remaining:
                self.states.renew(branch)  # one TTL per step; raises if another run took the lock meanwhile
                began = self._now_ms()
                detail = getattr(self, f"_step_{step}")(state)
                state = self.states.load(self.plan.id) or state  # steps save progress of their own
                state = sm.step_done(state, step, self._now_ms(), self._now_ms() - began, detail)
                self.states.save(state)
                self.publisher.publish([self._audit(f"step_{step}", detail)])
            self.publisher.publish([self._audit("cut_over", {"steps": {s: state["steps"][s].get("took_ms")
                                                                      for s in sm.CUTOVER_STEPS}})])
            return state
        finally:
            self.states.unlock(branch)

    def _check_frozen(self, state: dict[str, Any], remaining: list[str]) -> None:
        """Refuse to cut over a branch `start` did not freeze from the cut-off (docs/transfer.md: a crash
        between start's state save and its entities write leaves it active; start's rerun re-applies it).
        Once only the policy step is left, its own entities (handed over) are fine too."""
        if "policy" not in remaining:
            return
        problem = entities.not_frozen(entities.read(self.policy_dir), self.plan.branch, self.plan.from_org,
                                      self.plan.to_org, self.plan.cutoff_ms, handed_over_ok=remaining == ["policy"])
        if problem is None:
            return
        where = self.policy_dir / "entities.json"
        if state["phase"] == sm.STARTED:
            todo = ("start's entities change is missing (a crash between its state save and its entities write, "
                    "or an edit since): run `guard transfer start` with this plan again (it re-applies it), then "
                    "cutover")
        else:
            todo = (f"restore the branch's transfer_state \"transferring\" and freeze_from = the cut-off "
                    f"{self.plan.as_dict()['cutoff']} in {where} (as start wrote them), then run cutover again")
        raise sm.TransferStateError(f"branch {self.plan.branch} is not frozen from the cut-off in {where} "
                                    f"({problem}): {todo}")

    def _step_policy(self, state: dict[str, Any]) -> dict[str, Any]:
        docs = entities.read(self.policy_dir)
        staff = [(s.id, list(s.roles)) for s in self.plan.incoming_staff]
        changed = entities.write(self.policy_dir, entities.at_cutover(
            docs, self.plan.branch, self.plan.from_org, self.plan.to_org, self.plan.cutoff_ms, staff))
        entities.check_loads(self.policy_dir, "the cut-over's policy step (the branch handed over)")
        former = self.former_staff(entities.read(self.policy_dir))
        return {"owner": self.plan.to_org, "previous_owner": self.plan.from_org, "transfer_state": "transferred",
                "incoming_staff": [s for s, _ in staff], "former_staff": former, "entities_changed": changed}

    def former_staff(self, docs: list[dict[str, Any]]) -> list[str]:
        """The outgoing owner's staff posted at the branch, from the policy entities and (policy_staff = db)
        the branch database's staff tables: the principals who lose access at the cut-off."""
        found = list(docs)
        if self.settings.policy_staff == "db" and self.settings.branch_dsn.startswith("postgres"):
            from guard.policy.sources import database_source

            try:
                found += database_source(self.settings.branch_dsn)()
            except Exception as exc:  # noqa: BLE001 - the entities file's staff still count; say so
                log.warning("the branch database's staff could not be read (%s); former staff from "
                            "entities.json only", type(exc).__name__)
        out = set()
        for e in found:
            attrs = e.get("attrs") or {}
            if (str(e["uid"]["type"]).endswith("Staff")
                    and (attrs.get("branch") or {}).get("__entity", {}).get("id") == self.plan.branch
                    and (attrs.get("organisation") or {}).get("__entity", {}).get("id") == self.plan.from_org):
                out.add(f"Staff:{e['uid']['id']}")
        return sorted(out)

    def _step_scope(self, state: dict[str, Any]) -> dict[str, Any]:
        """Each customer's disposition as subject tokens (never ids). The ids the plan names that the branch
        database does not have are kept apart too (`not_in_database`), so the report counts as moved only
        customers the branch has, not every id the plan names."""
        ids = list(self.customer_ids()) if self.customer_ids is not None else []
        in_database = set(ids)
        resolved = resolve(self.plan, ids)
        scope: dict[str, Any] = {MOVE: [], DESTROY: [], RETAIN: [], "not_in_database": []}
        for cid, disposition in resolved.items():
            token = self.keys.subject_token(self.plan.branch, cid)
            if cid not in in_database:
                scope["not_in_database"].append(token)
            if disposition == RETAIN:
                _, r = self.plan.disposition(cid)
                assert r is not None
                scope[RETAIN].append({"subject": token, "legal_basis": r.legal_basis,
                                      "until_ms": int(r.until.timestamp() * 1000) if r.until else None})
            else:
                scope[disposition].append(token)
        scope[MOVE].sort()
        scope[DESTROY].sort()
        scope[RETAIN].sort(key=lambda r: r["subject"])
        scope["not_in_database"].sort()
        state["scope"] = scope
        self.states.save(state)
        return {"customers_in_database": len(in_database), "customers": len(resolved), "move": len(scope[MOVE]),
                "destroy": len(scope[DESTROY]), "retain": len(scope[RETAIN]),
                "named_by_plan_not_in_database": len(scope["not_in_database"])}

    def _step_key(self, state: dict[str, Any]) -> dict[str, Any]:
        _, before = self.store.kek_versions(self.plan.branch)
        version = self.keys.install_transfer_key(self.plan.branch, self.plan.id,
                                                 base64.b64decode(state["prepared_kek"]))
        state["kek"] = {"incoming_version": version, "outgoing_versions": sorted(v for v in before if v < version)}
        self.states.save(state)
        return dict(state["kek"])

    def _step_destroy(self, state: dict[str, Any]) -> dict[str, Any]:
        """Shred every out-of-scope customer once, with a signed confirmation each (trigger `transfer`)."""
        branch, subjects = self.plan.branch, list(state["scope"][DESTROY])
        index = {s: i for i, s in enumerate(subjects)}
        self._deliver_pending(index)
        reason = (f"{REASONS[self.plan.destroy_reason]} (branch {branch} transferred to {self.plan.to_org} by "
                  f"transfer {self.plan.id}; the customer is out of its scope)")
        todo = [s for s in subjects if s not in state["destroyed"]]
        size = max(1, int(self.settings.transfer_destroy_batch))
        for start in range(0, len(todo), size):
            self.states.renew(branch)
            batch = todo[start:start + size]
            records: list[OutRecord] = []
            for subject in batch:
                records += self.sanitizer.erase(subject, trigger="transfer", reason_code=self.plan.destroy_reason,
                                                reason=reason, by=self.plan.by,
                                                source=(self.source, 0, index[subject]))
            self.publisher.publish(records)
            carried, self.sanitizer.pending_in_txn = dict(self.sanitizer.pending_in_txn), {}
            self.store.confirm_delivered(branch, carried)
            for subject in batch:
                state["destroyed"][subject] = self._outcome(subject, records)
            self.states.save(state)
        try:  # the destroyed keys leave Redis's append-only file too (docs/keys.md, lingering bounds)
            self.store.compact()
        except GuardError as exc:
            log.warning("the append-only-file rewrite after the shreds did not complete (%s); the key store keeps "
                        "it due and running workers finish it", exc)
        outcomes = [d["outcome"] for d in state["destroyed"].values()]
        return {"out_of_scope": len(subjects), "confirmations": len({d["id"] for d in state["destroyed"].values()
                                                                    if d["id"]}),
                **{o: outcomes.count(o) for o in sorted(set(outcomes))}}

    def _outcome(self, subject: str, records: list[OutRecord]) -> dict[str, Any]:
        """The confirmation of one subject: the one just written (or re-emitted), else the first one."""
        for rec in records:
            if rec.topic == self.settings.deletions_topic and rec.value:
                doc = orjson.loads(rec.value)
                if doc.get("subject") == subject:
                    return {"id": doc.get("id"), "outcome": doc.get("outcome")}
        first = self.store.erased_record(self.plan.branch, subject)
        if first is not None:  # a rerun after the confirmation was delivered, or an erasure before the transfer
            doc = orjson.loads(first)
            return {"id": doc.get("id"), "outcome": "shredded" if doc.get("trigger") == "transfer"
                    else "erased_before_transfer"}
        return {"id": None, "outcome": "not_erased"}

    def _deliver_pending(self, index: dict[str, int]) -> None:
        """Confirmations a crashed run shredded but may not have written: those already on the deletions
        topic are forgotten; the others are re-emitted (same id) by the rerun's `erase` of the same source."""
        pending = self.store.pending_confirmations(self.plan.branch)
        ours = {}
        for subject, raw in pending.items():
            entry = orjson.loads(raw)
            if subject in index and (entry.get("source") or [None])[0] == self.source:
                ours[subject] = entry
        if not ours:
            return
        found = confirmations.delivered(client_config(self.settings), self.settings.deletions_topic,
                                        {e["id"] for e in ours.values()}, min(int(e["at_ms"]) for e in ours.values()))
        self.store.confirm_delivered(self.plan.branch, {s: e["id"] for s, e in ours.items() if e["id"] in found})

    def _step_retain(self, state: dict[str, Any]) -> dict[str, Any]:
        records = []
        for r in state["scope"][RETAIN]:
            subject = r["subject"]
            if subject in state["retained"]:
                continue
            deferred = {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{self.source}/{subject}")),
                        "at_ms": self._now_ms(), "trigger": "transfer_retention",
                        "reason_code": "art47_2_retention_expired", "reason": r["legal_basis"], "by": self.plan.by,
                        "transfer": self.plan.id, "until_ms": r["until_ms"]}
            self.store.set_storage_only(self.plan.branch, subject, orjson.dumps(deferred))
            if r["until_ms"]:
                self.store.set_expiry(self.plan.branch, {subject: r["until_ms"] / 1000})
            state["retained"][subject] = {"legal_basis": r["legal_basis"], "until_ms": r["until_ms"]}
            records.append(self._audit("retained", {"legal_basis": r["legal_basis"], "until_ms": r["until_ms"]},
                                       subject))
        self.publisher.publish(records)
        self.states.save(state)
        return {"retained": len(state["retained"])}

    def _step_rewrap(self, state: dict[str, Any]) -> dict[str, Any]:
        """Re-wrap every data key of the branch under the incoming owner's key (the data keys themselves
        are unchanged: nothing is re-encrypted). The floor installed by the `key` step refuses new wraps
        under the outgoing versions, so a pass that finds none left is final."""
        branch = self.plan.branch
        passes = 0
        while True:
            passes += 1
            self.states.renew(branch)
            rewrapped = sum(self.keys.rewrap_subject(branch, subject)[1] == "rewrapped"
                            for subject in self.store.dek_subjects(branch))
            if not rewrapped and not self.outgoing_wrapped(branch):
                break
            if passes >= 5:
                raise GuardError("data keys under the outgoing branch key remain after five passes; run cutover "
                                 "again")
        # counted from the key store as it ends up (a rerun after a crash counts the same)
        with_keys = set(self.store.dek_subjects(branch))
        moving, retained = set(state["scope"][MOVE]), {r["subject"] for r in state["scope"][RETAIN]}
        return {"moved_with_keys": len(with_keys & moving), "retained_with_keys": len(with_keys & retained),
                "other_keys": len(with_keys - moving - retained), "passes": passes}

    def outgoing_wrapped(self, branch: str) -> list[str]:
        """Subjects with a data-key version still wrapped under a branch-key version below the floor."""
        floor, _ = self.store.kek_handover(branch)
        return [s for s in self.store.dek_subjects(branch)
                if any(self.keys.kek_version_of(w) < floor for w in self.store.dek_fields(branch, s).values())]

    def _step_retire(self, state: dict[str, Any]) -> dict[str, Any]:
        left = self.outgoing_wrapped(self.plan.branch)
        if left:
            raise GuardError(f"{len(left)} data keys are still wrapped under the outgoing branch key; the "
                             "outgoing key is kept; run cutover again")
        deleted = self.keys.retire_transfer_keys(self.plan.branch)
        _, now = self.store.kek_versions(self.plan.branch)
        return {"versions_deleted": deleted, "versions_left": sorted(now)}

    # --- complete --------------------------------------------------------------------------------------
    def complete(self, verify: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
        """Close the transfer: check what the cut-over promised, verify the audit chains over its span."""
        branch = self.plan.branch
        self.states.lock(branch)
        try:
            state = self.load()
            if not sm.may_complete(state):
                return state
            destroyed = list(state["scope"][DESTROY])
            held = {s for s, d in state["destroyed"].items() if d.get("outcome") == "held_storage_only"}
            not_erased = sorted(set(destroyed) - held - set(self.store.erased_among(branch, destroyed)))
            if not_erased:
                raise GuardError(f"{len(not_erased)} out-of-scope customers are not erased; run cutover again")
            index = {s: i for i, s in enumerate(destroyed)}
            self._deliver_pending(index)
            left = {s: orjson.loads(v) for s, v in self.store.pending_confirmations(branch).items()
                    if s in index and (orjson.loads(v).get("source") or [None])[0] == self.source}
            if left:  # shredded, confirmation written by nobody yet: write it now (same id)
                self.publisher.publish([r for e in left.values() for r in pending_records(e)])
                self.store.confirm_delivered(branch, {s: e["id"] for s, e in left.items()})
            if self.outgoing_wrapped(branch):
                raise GuardError("data keys are wrapped under the outgoing branch key; run cutover again")
            self.publisher.publish([self._audit("verifying", {"since_ms": state["started_ms"]})])
            verification = verify(state)
            self.states.renew(branch)  # reading the topics can take long
            if not verification.get("ok"):
                # Not closed: a completed transfer is never checked again (a rerun returns at once), and
                # ending the handover would lose the marker of the key it installed. The failed result
                # stays in the state (status and the provisional report show it) and on the audit topic.
                state["verification"] = verification
                self.states.save(state)
                breaks = list(verification.get("breaks") or [])
                self.publisher.publish([self._audit("verification_failed", {
                    "breaks": len(breaks), "chains_verified": verification.get("chains_verified")})])
                raise GuardError(
                    f"the audit chains over transfer {self.plan.id}'s span did not verify ({len(breaks)} breaks"
                    + (f"; first: {breaks[0]}" if breaks else "") + "); the transfer stays cut_over, its "
                    "handover open: find the cause with `guard audit verify`, then run complete again")
            self.store.end_kek_handover(branch, self.plan.id)
            state = sm.complete(state, self._now_ms(), verification)
            self.states.save(state)
            self.states.set_active(branch, None)
            self.publisher.publish([self._audit("completed", {"verification_ok": verification.get("ok")})])
            return state
        finally:
            self.states.unlock(branch)


def status(state: dict[str, Any]) -> dict[str, Any]:
    """What `guard transfer status` prints: phase, steps done and left, counts (no key material)."""
    steps = {s: state["steps"].get(s) for s in sm.CUTOVER_STEPS}
    scope = state.get("scope") or {}
    return {"id": state["id"], "branch": state["branch"], "phase": state["phase"],
            "from": state["plan"]["from"], "to": state["plan"]["to"], "cutoff": state["plan"]["cutoff"],
            "steps_done": [s for s, v in steps.items() if v], "steps_left": [s for s, v in steps.items() if not v],
            "scope": {k: len(v) for k, v in scope.items()},  # not_in_database: named by the plan only
            "destroyed": len(state.get("destroyed") or {}), "retained": len(state.get("retained") or {})}
