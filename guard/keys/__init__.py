"""The key store: per-subject data keys, their wrapping (KMS), caching, shredding and the Redis store.

Owns: `primitives` (AES-256-GCM, blind index, keyed hash, key wrapping), `kms` (the key-encryption keys),
`store` (Redis: wrapped keys, erasure records, activity, holds) with its Lua scripts (`scripts`) and its
connection (`redis_client`, `redis_tls`), `manager` (the cache and the per-subject key life cycle the pipeline
asks for). Nothing here knows about records, tables or Kafka.
May import: layer 0 only (`guard.errors`, `guard.config`, `guard.secretfile`). Layer 1 of docs/architecture.md.
"""
