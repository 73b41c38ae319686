"""`guard demo`: the guided end-to-end run on the local stack (workload in, sanitized records out, a
summary that shows what each column became).

Owns: `run` (`run_demo`).
May import: the product (layers 0-6), `guard.workload`, `guard.stack`. Tools side of
docs/architecture.md; no product module imports it.
"""
