"""The sanitizer: one raw change record in, the records to produce out, with no Kafka client in sight.

Owns: `sanitizer` (`Sanitizer`, which runs an event down the stages decode -> plan -> protect -> emit,
and its native shortcut), `runtime` (wiring: key manager, catalog and sanitizer built from settings).
May import: `guard.errors`, `guard.config`, `guard.cdc`, `guard.keys`, `guard.protect`, `guard.classify`,
`guard.records`. Layer 5 of docs/architecture.md.
"""
