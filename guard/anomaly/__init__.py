"""Anomaly detection for security on-call: facts, rules, shared state, alerts, delivery, the status page,
and the rehearsal day with planted abuses that checks them end to end.

The faust-streaming agents that run this are in `streams/analyzer.py`; docs/anomalies.md describes the
rules, the fact format and the delivery guarantees.
May import: layers 0-6 (records for the Avro codec, keys for the key store's Redis client and legal holds,
kafka for creating its own topics, classify for the catalog's data categories of revealed fields); nothing
below imports it but `guard.cli` and `streams/`.
"""
