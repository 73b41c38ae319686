"""What a worker does between the stream's transactions: scheduled erasures, and deletion confirmations.

Both write the guard's own records (an erasure's tombstones, audit records and confirmation; a confirmation
that a crash left undelivered) in a transaction of their own, which carries no consumed offsets: the runner
writes it (`SanitizerWorker._side_transaction`), and ends one that Kafka failed before it raises
`SideTransactionFailed`. This module decides what goes into those transactions and what the key store is
told afterwards.

- **Scheduled erasures** (a root row's delete plus the catalog's grace period): at most
  `erasures_per_transaction` per transaction, so the stream waits a bounded time for them; after a full batch
  `erasures_waiting` says the runner should come back after its next stream transaction, not 5 s later.
- **Pending confirmations**: written into the key store with each shred and removed once a committed
  transaction carried them. Those a crash or an error left behind are looked for on the deletions topic
  first (`guard.kafka.confirmations`): found ones are forgotten, the others re-emitted once, with their id.

Nothing here raises on a Kafka or key-store failure: it is logged, and what was pending stays pending for the
next round.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import orjson

from guard.config import Settings
from guard.errors import KeyUnavailableError
from guard.kafka import confirmations
from guard.kafka.stats import Stats
from guard.kafka_security import client_config
from guard.pipeline.erasure_records import pending_records
from guard.pipeline.sanitizer import Sanitizer
from guard.records.builders import OutRecord

log = logging.getLogger("guard.runner")


class SideTransactionFailed(Exception):
    """A side transaction Kafka failed (an error or a stuck call); the writer has already ended it, so
    nothing it carried is visible and what was pending stays pending."""


#: Writes records in a transaction of their own, committed before it returns; raises `SideTransactionFailed`,
#: with the transaction ended, when Kafka fails it.
SideWrite = Callable[[list[OutRecord]], None]


class Maintenance:
    """The between-transactions work of one worker; `write` is its runner's side transaction."""

    def __init__(self, settings: Settings, sanitizer: Sanitizer, stats: Stats, *, write: SideWrite) -> None:
        self.settings = settings
        self.sanitizer = sanitizer
        self.stats = stats
        self._write = write
        #: The last erasure pass claimed a full batch: more may be due (`run_due_erasures`).
        self.erasures_waiting = False

    def run(self) -> None:
        """One round: finish a compaction left due, deliver pending confirmations, carry out due erasures."""
        self.sanitizer.keys.start_compactor()
        self.redeliver_pending()
        self.run_due_erasures()

    def run_due_erasures(self) -> None:
        """Scheduled erasures that are due, at most `erasures_per_transaction`, in a transaction of their own."""
        sanitizer = self.sanitizer
        self.erasures_waiting = False  # a failure below waits for the next maintenance round
        try:
            records, more = sanitizer.run_due_erasures(limit=max(1, self.settings.erasures_per_transaction))
            if not records:
                return
            self._write(records)
            self.confirm_delivered(sanitizer.pending_in_txn)
            self.erasures_waiting = more
        except SideTransactionFailed as exc:
            log.warning("scheduled erasures: confirmations not delivered yet (%s); they stay pending", exc)
        except KeyUnavailableError as exc:
            log.warning("scheduled erasures not carried out yet (%s); retrying later", exc)
        finally:
            sanitizer.pending_in_txn.clear()

    def confirm_delivered(self, carried: dict[str, str]) -> None:
        """After a commit: the confirmations it carried are delivered; forget their pending entries.

        Best effort: if the key store can't be reached, the entries stay and `redeliver_pending` finds the
        confirmations on the deletions topic later and removes them then, without a second copy.
        """
        if not carried:
            return
        try:
            self.sanitizer.keys.store.confirm_delivered(self.sanitizer.branch, dict(carried))
        except KeyUnavailableError as exc:
            log.warning("%d delivered confirmations stay pending in the key store (%s); they are checked "
                        "against %s later", len(carried), exc, self.settings.deletions_topic)

    def redeliver_pending(self) -> None:
        """Deliver, once, the confirmations a crash or an error left pending (`guard.kafka.confirmations`).

        Entries already on the deletions topic are forgotten; the others are claimed (only if unchanged since
        they were read: `RedisKeyStore.claim_pending`), re-emitted with their id in a transaction of their own,
        then forgotten. A failure leaves them for the next round.
        """
        s, sanitizer = self.settings, self.sanitizer
        store = sanitizer.keys.store
        try:
            read = store.pending_confirmations(s.branch)
            entries = confirmations.due(read, owner=sanitizer.owner,
                                        carried=sanitizer.pending_in_txn, now_ms=int(time.time() * 1000),
                                        transaction_timeout_ms=s.transaction_timeout_ms)
            if not entries:
                return
            there: set[str] = set()
            # Each entry names the topic its confirmation goes to (the shredder's setting, maybe not ours).
            for topic, group in confirmations.by_topic(entries).items():
                there |= confirmations.delivered(client_config(s), topic, {e["id"] for e in group},
                                                 min(int(e["at_ms"]) for e in group))
            store.confirm_delivered(s.branch, {subj: e["id"] for subj, e in entries.items() if e["id"] in there})
            missing = {subj: e for subj, e in entries.items() if e["id"] not in there}
            if not missing:
                return
            # Claimed only if still as read: another worker that read the same entry re-emits it, not both.
            claimed_ms = int(time.time() * 1000)
            won = store.claim_pending(s.branch, {
                subj: (read[subj], orjson.dumps({**e, "owner": sanitizer.owner, "claimed_ms": claimed_ms}))
                for subj, e in missing.items()})
            missing = {subj: e for subj, e in missing.items() if subj in won}
            if not missing:
                return
            self._write([rec for entry in missing.values() for rec in pending_records(entry)])
            self.stats.confirmations_redelivered += len(missing)
            log.warning("re-emitted %d deletion confirmations that a crash or an error had left undelivered",
                        len(missing))
            self.confirm_delivered({subj: e["id"] for subj, e in missing.items()})
        except SideTransactionFailed as exc:
            log.warning("pending deletion confirmations not delivered yet (%s); retrying later", exc)
        except KeyUnavailableError as exc:
            log.warning("pending deletion confirmations not checked (%s); retrying later", exc)

