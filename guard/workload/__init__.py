"""Test and demo data, outside the product's core: the deterministic synthetic data generator and the
branch workload that writes it into the demo database (new customers, updates, deletes).

Owns: `synth` (fake but valid customers, accounts, transactions: check digits that the detectors
verify), `branch` (`run_workload` against a branch database).
May import: nothing of `guard` (the stack seeds its database from `synth`, so this sits below it).
Tools side of docs/architecture.md; no product module imports it.
"""
