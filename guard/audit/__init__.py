"""The audit trail that proves itself: RFC 6962 Merkle trees, C2SP signed notes, leaves and the verifier.

Pure logic (hashlib, `cryptography`), no Kafka and no Redis: `merkle` (hashing, roots, inclusion and
consistency proofs, the writer's compact frontier), `note` (Ed25519 keys, signed notes, tlog checkpoints,
signed deletion confirmations), `chain` (the leaf layout and one writer's chain state), `verify` (what
`guard audit verify` concludes from the records and checkpoints it read). docs/audit.md explains the design.
"""
