"""The classification catalog: what every known column is, and how the guard protects it.

The catalog (``schemas/catalog.toml``; format documented at the top of that file) tags each column
with its JR/T 0171-2020 class (C1/C2/C3, or ``none`` for non-personal data), a category, whether it is
PIPL Art. 28 sensitive PI, and a protection action.  It is validated when loaded so that a policy
mistake (a C2 column left in clear, a C3 secret encrypted instead of dropped, a typo in a mask name)
stops the guard at start-up with an error that names the table and column, rather than leaking data
at run time.  Columns the catalog does not know are handled by :mod:`guard.classify.plans` (fail closed).

Objects are frozen: the catalog is shared by every worker thread and cached in table plans.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any

from guard.errors import ConfigError
from guard.protect.masking import MASK_KINDS

__all__ = [
    "DATA_CLASSES",
    "Action",
    "Catalog",
    "CatalogDefaults",
    "CatalogError",
    "ColumnPolicy",
    "TablePolicy",
    "default_catalog_path",
]

DATA_CLASSES = ("none", "C1", "C2", "C3")
"""Classes from least to most sensitive (``none`` = not personal financial information)."""

ENV_VAR = "GUARD_CATALOG"


class CatalogError(ConfigError):
    """The catalog file is missing or invalid; the message names the file, table and column."""


class Action(StrEnum):
    """What the sanitizer does with a column's value."""

    CLEAR = "clear"  # pass through unchanged (non-PI, or C1 that identifies no one)
    ENCRYPT = "encrypt"  # AES-GCM under the data subject's key, optionally with mask and blind index
    DROP = "drop"  # never leaves the guard (C3 authentication data)
    HASH = "hash"  # keyed one-way hash: comparable, never recoverable (C3 where equality is needed)


@dataclass(frozen=True, slots=True)
class ColumnPolicy:
    """Protection policy of one column.

    ``mask`` is a :data:`guard.protect.masking.MASK_KINDS` kind for a display form carried next to the
    ciphertext; ``index`` asks for a deterministic blind index so downstream systems can join or search
    without decrypting.  ``detected_by`` is None for catalogued columns and the detector's reason
    for columns whose policy was inferred.
    """

    name: str
    data_class: str
    category: str
    sensitive: bool
    action: Action
    mask: str | None
    index: bool
    detected_by: str | None = None
    #: Amount bands (name, lower bound), ascending: a new row whose value reaches a band is reported to the
    #: anomaly analyzers as a fact naming the band, never the value (`bands` in the catalog; docs/anomalies.md).
    bands: tuple[tuple[str, Decimal], ...] = ()


#: The erasure reasons of PIPL Art. 47 a trigger may name (`guard erase --reason`, a table's `on_delete`).
ERASURE_REASONS: Mapping[str, str] = MappingProxyType({
    "art47_1_purpose_achieved": "processing purpose achieved, unachievable or no longer necessary",
    "art47_2_retention_expired": "service ended or retention period expired",
    "art47_3_consent_withdrawn": "the individual withdrew consent",
    "art47_4_unlawful_processing": "processing violated a law, regulation or agreement",
    "art47_5_other_legal": "another case provided by law",
    "subject_request": "the individual requested deletion (PIPL Art. 47, last sentence)",
})

#: What a delete of a root row can mean (`on_delete.meaning`).
DELETE_MEANINGS = ("erasure", "relationship_end", "none")


@dataclass(frozen=True, slots=True)
class OnDelete:
    """What a delete of one of the table's rows means (``[tables."…".on_delete]``).

    ``erasure``: the subject is crypto-shredded with ``reason_code``, ``grace_s`` seconds after the
    delete unless the row comes back (a re-insert cancels it). ``relationship_end``: the relationship
    ended; the subject's retention (the table's ``retention_days``) runs from the delete, and a
    re-insert within it stops it. ``none``: no effect on the subject's keys.
    """

    meaning: str
    reason_code: str | None = None
    grace_s: int = 0


@dataclass(frozen=True, slots=True)
class TablePolicy:
    """Policy of one table (``schema.table``).

    ``subject_column`` holds the data subject's identifier (the customer), whose key protects the
    row's fields.  ``subject_root`` marks the table whose row *is* the subject (deleting it is an
    erasure of the person, not just of a record).
    """

    table: str
    subject_column: str | None
    columns: Mapping[str, ColumnPolicy]
    retention_days: int | None
    subject_root: bool = False
    #: Root tables only: what a delete of a row means; None: nothing configured (audited, no erasure).
    on_delete: OnDelete | None = None
    #: Root tables only: the column that says when the relationship ended (null: it has not); the
    #: subject's retention runs from its value.
    relationship_end_column: str | None = None


@dataclass(frozen=True, slots=True)
class CatalogDefaults:
    """The ``[defaults]`` section: fail-closed action for unknown columns and retention per class."""

    unknown_column_action: Action
    retention_days: Mapping[str, int]


# ---- validation --------------------------------------------------------------------------------------

_TABLE_KEYS = frozenset({"subject_column", "subject_root", "retention_days", "columns", "description", "on_delete",
                         "relationship_end_column"})
_COLUMN_KEYS = frozenset({"class", "category", "sensitive", "action", "mask", "index", "description", "bands"})
_REQUIRED_COLUMN_KEYS = ("class", "category", "action")


def _fail(where: str, message: str) -> CatalogError:
    return CatalogError(f"{where}: {message}")


def _check_keys(where: str, data: Mapping[str, Any], allowed: frozenset[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise _fail(where, f"unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _action(where: str, raw: object) -> Action:
    try:
        return Action(str(raw))
    except ValueError:
        raise _fail(where, f"action {raw!r} is not one of {[a.value for a in Action]}") from None


def _rule_violation(
    data_class: str, sensitive: bool, action: Action, mask: str | None, index: bool
) -> str | None:
    """The JR/T 0171 storage/display rule a column policy breaks, or None.  These are the catalog's point."""
    if action is Action.CLEAR and data_class in ("C2", "C3"):
        return f"action 'clear' is not allowed for class {data_class} (JR/T 0171: store encrypted)"
    if action is Action.CLEAR and sensitive:
        return "sensitive personal information (PIPL Art. 28) cannot be passed in clear"
    if data_class == "C3" and action not in (Action.DROP, Action.HASH):
        return f"class C3 (authentication data) must be 'drop' or 'hash', not {action.value!r}"
    if mask is not None and action is not Action.ENCRYPT:
        return f"a mask is shown next to a ciphertext; it needs action 'encrypt', not {action.value!r}"
    if index and action is not Action.ENCRYPT:
        return f"a blind index goes with a ciphertext; it needs action 'encrypt', not {action.value!r}"
    return None


def _parse_column(where: str, name: str, data: object) -> ColumnPolicy:
    if not isinstance(data, Mapping):
        example = '{ class = "C2", category = "contact", action = "encrypt" }'
        raise _fail(where, f"must be an inline table like {example}")
    _check_keys(where, data, _COLUMN_KEYS)
    missing = [k for k in _REQUIRED_COLUMN_KEYS if k not in data]
    if missing:
        raise _fail(where, f"missing required key(s) {missing}")
    data_class = data["class"]
    if data_class not in DATA_CLASSES:
        raise _fail(where, f"class {data_class!r} is not one of {list(DATA_CLASSES)}")
    category = data["category"]
    if not isinstance(category, str) or not category:
        raise _fail(where, "category must be a non-empty string")
    sensitive = data.get("sensitive", False)
    index = data.get("index", False)
    if not isinstance(sensitive, bool) or not isinstance(index, bool):
        raise _fail(where, "sensitive and index must be true or false")
    action = _action(where, data["action"])
    mask = data.get("mask")
    if mask is not None and mask not in MASK_KINDS:
        raise _fail(where, f"unknown mask kind {mask!r}; expected one of {sorted(MASK_KINDS)}")

    problem = _rule_violation(data_class, sensitive, action, mask, index)
    if problem:
        raise _fail(where, problem)
    return ColumnPolicy(
        name=name,
        data_class=data_class,
        category=category,
        sensitive=sensitive,
        action=action,
        mask=mask,
        index=index,
        bands=_bands(where, data.get("bands")),
    )


def _bands(where: str, raw: object) -> tuple[tuple[str, Decimal], ...]:
    """`bands = { large = 50000, very_large = 500000 }`: names → positive lower bounds, sorted ascending."""
    if raw is None:
        return ()
    if not isinstance(raw, Mapping) or not raw:
        raise _fail(where, "bands must be a table of band name = lower bound, e.g. { large = 50000 }")
    out: list[tuple[str, Decimal]] = []
    for band, bound in raw.items():
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or bound <= 0:
            raise _fail(where, f"band {band!r} needs a positive number as its lower bound")
        out.append((str(band), Decimal(str(bound))))
    return tuple(sorted(out, key=lambda b: b[1]))


def _retention(where: str, raw: object) -> int | None:
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
        raise _fail(where, f"retention_days must be a non-negative integer, got {type(raw).__name__}")
    return raw


def _parse_table(source: str, name: str, data: object) -> TablePolicy:
    where = f"{source}: table {name!r}"
    schema, dot, table = name.partition(".")
    if not dot or not schema or not table or "." in table:
        raise CatalogError(f"{where}: table names are 'schema.table' (e.g. 'public.customers')")
    if not isinstance(data, Mapping):
        raise _fail(where, "must be a TOML table")
    _check_keys(where, data, _TABLE_KEYS)
    raw_columns = data.get("columns")
    if not isinstance(raw_columns, Mapping) or not raw_columns:
        raise _fail(where, "needs a non-empty [columns] table")
    columns = {
        col: _parse_column(f"{where}, column {col!r}", col, spec) for col, spec in raw_columns.items()
    }
    subject = data.get("subject_column")
    if subject is not None and subject not in columns:
        raise _fail(where, f"subject_column {subject!r} is not one of its columns")
    subject_root = data.get("subject_root", False)
    if not isinstance(subject_root, bool):
        raise _fail(where, "subject_root must be true or false")
    if subject_root and subject is None:
        raise _fail(where, "subject_root = true needs a subject_column")
    on_delete = _parse_on_delete(f"{where} on_delete", data.get("on_delete"))
    end_column = data.get("relationship_end_column")
    if (on_delete is not None or end_column is not None) and not subject_root:
        raise _fail(where, "on_delete and relationship_end_column are for root tables (subject_root = true): "
                           "only a root row's delete or end says something about the person")
    if end_column is not None and end_column not in columns:
        raise _fail(where, f"relationship_end_column {end_column!r} is not one of its columns")
    return TablePolicy(
        table=name,
        subject_column=subject,
        columns=MappingProxyType(columns),
        retention_days=_retention(where, data.get("retention_days")),
        subject_root=subject_root,
        on_delete=on_delete,
        relationship_end_column=end_column,
    )


def _parse_on_delete(where: str, data: object) -> OnDelete | None:
    if data is None:
        return None
    if not isinstance(data, Mapping):
        raise _fail(where, "must be a table: { meaning = \"erasure\", reason_code = \"art47_…\", grace_s = 0 }")
    _check_keys(where, data, frozenset({"meaning", "reason_code", "grace_s", "description"}))
    meaning = data.get("meaning")
    if meaning not in DELETE_MEANINGS:
        raise _fail(where, f"meaning must be one of {list(DELETE_MEANINGS)}, got {meaning!r}")
    reason = data.get("reason_code")
    if meaning == "erasure" and reason not in ERASURE_REASONS:
        raise _fail(where, f"meaning = \"erasure\" needs a reason_code, one of {list(ERASURE_REASONS)} "
                           f"(got {reason!r}); the guard never invents a reason")
    if meaning != "erasure" and reason is not None:
        raise _fail(where, "reason_code is only for meaning = \"erasure\"")
    grace = data.get("grace_s", 0)
    if isinstance(grace, bool) or not isinstance(grace, int) or grace < 0:
        raise _fail(where, "grace_s must be a non-negative integer (seconds)")
    if grace and meaning != "erasure":
        raise _fail(where, "grace_s is only for meaning = \"erasure\"")
    return OnDelete(meaning=str(meaning), reason_code=reason, grace_s=grace)


def _parse_defaults(source: str, data: object) -> CatalogDefaults:
    where = f"{source}: [defaults]"
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise _fail(where, "must be a TOML table")
    _check_keys(where, data, frozenset({"unknown_column_action", "retention_days"}))
    action = _action(where, data.get("unknown_column_action", "encrypt"))
    if action is Action.CLEAR:
        raise _fail(where, "unknown_column_action cannot be 'clear': unclassified columns must fail closed")
    raw_ret = data.get("retention_days", {})
    if not isinstance(raw_ret, Mapping):
        raise _fail(where, "retention_days must be a table of class = days")
    retention: dict[str, int] = {}
    for cls, days in raw_ret.items():
        if cls not in DATA_CLASSES:
            raise _fail(where, f"retention_days key {cls!r} is not one of {list(DATA_CLASSES)}")
        value = _retention(f"{where} retention_days.{cls}", days)
        if value is not None:
            retention[cls] = value
    return CatalogDefaults(unknown_column_action=action, retention_days=MappingProxyType(retention))


# ---- loading -----------------------------------------------------------------------------------------


def default_catalog_path() -> Path:
    """Where :meth:`Catalog.load` looks when given no path.

    ``$GUARD_CATALOG`` if set; else ``schemas/catalog.toml`` of the checkout this package lives in
    (editable installs and the repo); else ``schemas/catalog.toml`` under the working directory.
    """
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    beside_package = Path(__file__).resolve().parents[2] / "schemas" / "catalog.toml"
    if beside_package.is_file():
        return beside_package
    return Path.cwd() / "schemas" / "catalog.toml"


class Catalog:
    """Validated, immutable view of the catalog file; lookups are plain dict reads."""

    __slots__ = ("_tables", "defaults", "source")

    def __init__(
        self, tables: Mapping[str, TablePolicy], defaults: CatalogDefaults, source: str = "<memory>"
    ) -> None:
        self._tables: Mapping[str, TablePolicy] = MappingProxyType(dict(tables))
        self.defaults = defaults
        self.source = source

    @classmethod
    def load(cls, path: str | Path | None = None) -> Catalog:
        """Read and validate a catalog; ``path`` defaults to :func:`default_catalog_path`.

        Raises :class:`CatalogError` naming the file (and table/column) on any problem.
        """
        p = Path(path) if path is not None else default_catalog_path()
        try:
            raw = p.read_bytes()
        except OSError as exc:
            hint = f" (set {ENV_VAR} or the catalog setting to its path)" if path is None else ""
            raise CatalogError(f"cannot read catalog {str(p)!r}: {exc.strerror or exc}{hint}") from None
        return cls.from_toml(raw.decode("utf-8"), source=str(p))

    @classmethod
    def from_toml(cls, text: str, source: str = "<string>") -> Catalog:
        """Parse and validate catalog TOML text (used by tests and by :meth:`load`)."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise CatalogError(f"{source}: not valid TOML: {exc}") from None
        _check_keys(source, data, frozenset({"version", "defaults", "tables"}))
        version = data.get("version", 1)
        if version != 1:
            raise CatalogError(f"{source}: unsupported catalog version {version!r} (this guard reads 1)")
        defaults = _parse_defaults(source, data.get("defaults"))
        raw_tables = data.get("tables", {})
        if not isinstance(raw_tables, Mapping):
            raise CatalogError(f"{source}: [tables] must be a TOML table")
        tables = {name: _parse_table(source, name, spec) for name, spec in raw_tables.items()}
        return cls(tables, defaults, source)

    def table(self, schema_table: str) -> TablePolicy | None:
        """The policy of ``schema.table``, or None when the catalog does not know the table."""
        return self._tables.get(schema_table)

    def column(self, schema_table: str, column: str) -> ColumnPolicy | None:
        """The policy of one column, or None when table or column is unknown (caller fails closed)."""
        t = self._tables.get(schema_table)
        return t.columns.get(column) if t is not None else None

    def tables(self) -> list[str]:
        """Catalogued table names, sorted."""
        return sorted(self._tables)

    def retention_days(self, schema_table: str) -> int | None:
        """The table's retention, else the default of the most sensitive class among its columns."""
        t = self._tables.get(schema_table)
        if t is None:
            return None
        if t.retention_days is not None:
            return t.retention_days
        classes = {c.data_class for c in t.columns.values() if c.action is not Action.DROP}
        for cls in reversed(DATA_CLASSES):
            if cls in classes and cls in self.defaults.retention_days:
                return self.defaults.retention_days[cls]
        return None

    def __repr__(self) -> str:
        return f"Catalog(source={self.source!r}, tables={self.tables()!r})"
