"""Transaction facts (issue 15): the catalog's amount bands, the band of a value, and the fact the sanitizer
writes for the anomaly analyzers: the band's name, never the amount. No Kafka, no Redis."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import orjson
import pytest

from guard.anomaly.facts import Fact
from guard.classify.catalog import Catalog, CatalogError
from guard.config import Settings
from guard.pipeline.values import amount_band
from guard.records.builders import RecordBuilder
from tests.unit.test_erasure_records import _Keys as RecordKeys  # the attributes the record builder reads

REPO = Path(__file__).resolve().parents[2]
BANDS = (("large", Decimal(50000)), ("very_large", Decimal(500000)))


def test_the_shipped_catalog_bands_transaction_amounts() -> None:
    catalog = Catalog.load(REPO / "schemas" / "catalog.toml")
    for table in ("public.transactions", "branch_0202.transactions"):
        amount = catalog.column(table, "amount")
        assert amount is not None and amount.bands == BANDS, table
    mobile = catalog.column("public.customers", "mobile")
    assert mobile is not None and mobile.bands == ()


@pytest.mark.parametrize(("value", "band"), [
    ("49999.99", None), ("50000.00", "large"), ("102922.65", "large"), ("500000", "very_large"),
    ("-60000.00", "large"), (60000, "large"), (None, None), ("not a number", None), ("NaN", None), (True, None),
    # beyond the decimal context's exponent (a text column): abs() raised Overflow, which the native path's band
    # facts did not catch, and the worker died on the record at every restart
    ("1e1000000", "very_large"), ("-1e1000000", "very_large"), ("1e-1000000", None), ("Infinity", None),
])
def test_amount_band(value: object, band: str | None) -> None:
    assert amount_band(value, BANDS) == band


def test_bands_are_validated_at_load() -> None:
    base = '[tables."t.x"]\nsubject_column = "id"\n[tables."t.x".columns]\nid = { class = "C1", category = "i", ' \
           'action = "clear" }\n'
    with pytest.raises(CatalogError, match="positive number"):
        Catalog.from_toml(base + 'amount = { class = "C2", category = "transaction", action = "encrypt", '
                          'bands = { large = "many" } }\n')
    with pytest.raises(CatalogError, match="bands must be a table"):
        Catalog.from_toml(base + 'amount = { class = "C2", category = "transaction", action = "encrypt", '
                          'bands = 5 }\n')


def test_the_band_fact_names_the_band_and_the_subject_only() -> None:
    builder = RecordBuilder(Settings(worker_id="w1", facts_topic="x.facts"), RecordKeys(),  # type: ignore[arg-type]
                            clock=lambda: 1_800_000_000.0)
    rec = builder.band_fact(("br0101.public.transactions", 2, 77), "public.transactions", "amount", "subj-tok",
                            "large", 1_799_999_000_000)
    assert rec.topic == "x.facts" and rec.key == b"subj-tok"
    doc = orjson.loads(rec.value or b"")
    fact = Fact.from_mapping(doc)  # what the analyzer reads (guard/anomaly/facts.py)
    assert (fact.kind, fact.subject, fact.attrs["amount_band"], fact.branch) == ("transaction", "subj-tok", "large",
                                                                                 "0101")
    assert fact.id == "br0101.public.transactions:2:77:band", "the source position: the same on every replay"
    assert set(doc["attrs"]) == {"amount_band", "column"}, "no amount, no other value"


def test_docker_compose_runs_the_analyzer_as_its_own_principal() -> None:
    """The compose file's `analyzer` service: the guard image, `guard alerts analyze`, the analyzer's
    credentials (a text check: no YAML parser is a dependency, and no Docker engine runs in the tests)."""
    text = (REPO / "docker-compose.yml").read_text()
    start = text.index("\n  analyzer:\n")
    end = text.index("\nvolumes:\n", start)
    block = text[start:end]
    assert "build: ." in block
    assert 'entrypoint: ["python", "-m", "guard.cli", "alerts", "analyze"]' in block
    assert "GUARD_KAFKA_USERNAME: analyzer" in block
    assert "GUARD_KAFKA_PASSWORD_FILE: /stack/secrets/kafka-analyzer.password" in block
    assert "GUARD_KAFKA_SECURITY_PROTOCOL: SASL_SSL" in block
    assert "redis-guard.password" in block and "master.key" not in block, "no data key: it reads tokens only"
