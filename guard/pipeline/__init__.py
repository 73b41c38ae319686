"""The sanitizer: one raw change record in, the records to produce out, with no Kafka client in sight.

Owns: the stages `decode` (`Decoder`), `plan` (`Planner`), `protect` (`Protector`) (the emit stage is
`guard.records.builders.RecordBuilder`); `sanitizer` (`Sanitizer`, which runs an event down
decode -> plan -> protect -> emit once, and hands ordinary events to the compiled path); `policy`
(`WriteChecker`: every write's access-policy decision, the attribution of deletes by their transaction's
message); `erasure_records` (what an erasure's confirmation says remains, and its pending copy); `values`
(what column values say beyond their protection: an amount's band, a relationship's end); `runtime` (wiring:
key manager, catalog, policy and sanitizer built from settings).
May import: `guard.errors`, `guard.config`, `guard.cdc`, `guard.keys`, `guard.protect`, `guard.classify`,
`guard.policy`, `guard.records`. Layer 5 of docs/architecture.md.
"""
