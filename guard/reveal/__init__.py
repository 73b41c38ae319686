"""The reveal service: the only path from a sanitized record to plaintext for downstream systems and people.

Owns: `tokens` (bearer tokens stored as keyed hashes), `ratelimit` (per-principal sliding windows in the
key store's Redis), `kafka_io` (reading committed sanitized records by position; acknowledged audit
writes), `service` (`RevealService`: authenticate, decide with the policy engine, open, audit), `app`
(the FastAPI application: routes, bounds, errors without values, OpenAPI), `server` (`guard reveal
serve`: wiring and uvicorn), `client` (`RevealClient`, a thin httpx client).
May import: layers 0-6 (`keys`, `protect.reveal`, `classify`, `policy`, `records`, `pipeline.runtime`,
`kafka.clients`). Layer 6b of docs/architecture.md, above `kafka`; only the command line imports it.
"""
