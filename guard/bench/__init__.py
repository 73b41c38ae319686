"""`guard bench`: the benchmark of the guard against a plain exactly-once loop, outside the product's core.

Owns: `run` (options, phases, trials, `run_bench`, `main`), `worker` (one measured worker process,
started as `python -m guard.bench.worker`), and the parts the run is made of. `python -m guard.bench`
runs `main`. This file imports nothing, so a worker process's memory is the worker's alone.
May import: the product (layers 0-6), `guard.workload`, `guard.stack`. Tools side of
docs/architecture.md; no product module imports it.
"""
