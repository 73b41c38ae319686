"""Output records: Avro schemas and framing, the hand-written encoders of the hot path, and the builders
of the sanitized, audit, anomaly, deletion-confirmation and DLQ records the guard produces.

Owns: `codec` (schemas/*.avsc, single-object and Confluent framing, `decode` for downstream readers),
`encoders` (byte-exact fast Avro encoders: `encode_change`, `ImageWriter`, `AuditTemplate`), `builders`
(`OutRecord` and `RecordBuilder`, the pipeline's emit stage).
May import: `guard.errors`, `guard.config`, `guard.cdc`, `guard.keys`, `guard.protect`, `guard.classify`.
Layer 4 of docs/architecture.md.
"""
