"""Classification: which data class each column holds and which protection it gets, per table.

Owns: `catalog` (schemas/catalog.toml: classes, categories, actions, retention), `detectors` (value and
column-name detectors for columns the catalog does not know), `plans` (`Classifier` and the cached
`TablePlan` of a table's columns: fail closed for unknown ones), `report` (`guard classify`), `source` (the
catalog's C3 columns as Debezium column filters: excluded or hashed before they reach Kafka).
May import: `guard.errors`, `guard.config`, `guard.cdc`, `guard.protect` (the mask kinds it chooses
among). Layer 3 of docs/architecture.md.
"""
