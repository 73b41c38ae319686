"""BranchGuard: a Kafka CDC guard that classifies, protects, polices and audits branch change streams.

One package per concern, imports pointing down only (docs/architecture.md; tests/unit/test_layers.py):

  0  errors, config, telemetry   the foundation
  1  cdc/  keys/                 Debezium input; the key store
  2  protect/                    masks, sealed images' associated data, reveal, the compiled-path bridge
  3  classify/                   catalog, detectors, table plans, the classify report
  4  records/                    Avro codec and encoders, the record builders (emit stage)
  5  pipeline/                   the Sanitizer and its stages decode -> plan -> protect -> emit
  6  kafka/  erasure/            the exactly-once loop and recovery; erasure and retention
  tools: workload/ (synthetic data) < stack/ < demo/, bench/ < cli/
"""
