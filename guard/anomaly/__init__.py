"""Anomaly detection for security on-call: facts, rules, shared state, alerts, delivery, the status page.

The faust-streaming agents that run this are in `streams/analyzer.py`; docs/anomalies.md describes the
rules, the fact format and the delivery guarantees.
"""
