"""Erasure: crypto-shredding a data subject on request (`guard erase`), legal holds, and the retention
sweep (`guard retention`), each confirmed by a deletion record and an audit record.

Owns: `service` (`erase_subject`, `sweep_retention`, the PIPL Art. 47 reason codes).
May import: layers 0-5 (`guard.errors`, `guard.config`, `guard.keys`, `guard.records`, `guard.pipeline`,
...). Not `guard.kafka`: it produces its few records with a plain producer. Layer 6 of
docs/architecture.md, beside `guard.kafka`.
"""
