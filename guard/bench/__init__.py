"""`guard bench`: the benchmark of the guard against a plain exactly-once loop, outside the product's core.

Owns: `run` (`run_bench`, `main`: the command line), `trials` (phases and trials, `BenchOptions`),
`workload` (the input records), `topics` (topics, groups, keys; filling and pacing), `workers` (the
measured processes, RSS, committed progress), `latency` (the latency probe), `dblatency` (latency from the
database commit), `scale` (memory and key state at scale), `report` (checks, table,
JSON), `profile` (the local hot-path profile), `common` (logger, error, targets, durations), and
`worker` (one measured worker process, started as `python -m guard.bench.worker`).
`python -m guard.bench` runs `main`. This file imports nothing, so a worker process's memory is the worker's alone.
May import: the product (layers 0-6), `guard.workload`, `guard.stack`. Tools side of
docs/architecture.md; no product module imports it.
"""
