"""Change data capture input: Debezium envelopes decoded into `ChangeEvent`s and their source positions.

Owns: `envelope` (the strict reading of a raw Debezium value, size limits, ops c/u/r/d/t/m, the source
position of each change).
May import: `guard.errors`, `guard.config` only. Layer 1 of docs/architecture.md.
"""
