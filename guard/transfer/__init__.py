"""The branch transfer (网点转让): `guard transfer plan | start | cutover | complete | status | report`.

Owns: the plan file and its validation (`plan`), the transfer's state machine and its persistence
(`state`: pure transitions, kept in the key store), the steps on the live deployment (`service`: the policy
entities, the incoming owner's branch key, re-wrapping, shredding with confirmations, storage-only marks,
retiring the outgoing key, every step on `guard.audit`), the policy entities' change (`entities`), and the
report (`report`: JSON and HTML, deterministic). docs/transfer.md.
May import: layers 0-6b (keys, policy, records, pipeline, kafka, erasure, anomaly's alert decoding).
"""
