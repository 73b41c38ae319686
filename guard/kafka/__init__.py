"""Kafka plumbing: the exactly-once consume-transform-produce loop around the sanitizer, batching and
commit pacing, client configuration, topics, and recovery from broker, producer and key-store faults.

Owns: `batching` (fetching a batch, when to commit, early offsets), `clients` (`consumer_config`,
`producer_config`, `TopicManager`: client configuration and output topics), `stats` (`Stats`, the open
batch's counters), `runner` (`SanitizerWorker`: the transactional loop, rebalance, abort and recovery),
`evidence` (retention and replication of `guard.audit` and `guard.deletions`), and the watches that keep a
stuck stream from being silent: `hanging` (transactions nobody will end), `membership` (a consumer out of its
group), `fetching` (assigned partitions never fetched), `rewinds` (seeks not carried out), with
`side_alerts` (their alerts, outside the worker's transactions) and `partitioning` (Kafka's `partitionFor`).
May import: everything in layers 0-5 (`guard.errors`, `guard.config`, `guard.telemetry`, `guard.cdc`,
`guard.keys`, `guard.protect`, `guard.classify`, `guard.records`, `guard.pipeline`). Layer 6 of
docs/architecture.md.
"""
