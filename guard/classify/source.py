"""What the source may emit: the catalog's C3 columns as Debezium column filters.

JR/T 0171-2020 says C3 authentication data (passwords, PINs) is never stored in clear; a raw CDC topic is
storage. So every column the catalog marks C3 is removed or hashed by Debezium *in the connector*, before
its value reaches Kafka, and the guard only ever sees what is left. The catalog's action decides how:

* ``drop``  -> ``column.exclude.list``: the value never leaves PostgreSQL. Used for low-entropy secrets
  (a 6-digit query PIN): any hash of one is reversed by trying 10^6 values, and Debezium's hash would
  even be cut to the column's declared length (``varchar(6)``: 6 hex digits).
* ``hash``  -> ``column.mask.hash.v2.SHA-256.with.salt.<salt>``: Debezium replaces the value by the
  lower-case hex SHA-256 of ``salt || value`` (64 characters). Used for high-entropy verifiers (a bcrypt
  password hash): the digest cannot be reversed, equal verifiers still give equal digests, so a change of
  the password stays visible to the guard (which keys-hashes the digest again, as before). The salt is a
  secret (a 0600 file of the deployment, never in the repository); the rendered document names it only by
  the placeholder :data:`SALT_PLACEHOLDER`.

Debezium hashes only character columns (``char``, ``varchar``, ``text``, ...) and passes any other type
through *unchanged*, and it truncates the digest to a declared length below 64: a ``hash`` column must be
text or at least ``varchar(64)``. :func:`hash_column_problem` says whether a column type qualifies; the
stack checks the database before it registers the connector, and ``guard doctor`` checks the raw records.

Columns the catalog does not know are not touched here: they reach the guard, which protects them (fail
closed, ``[defaults].unknown_column_action``).

May import: `guard.classify.catalog` only (pure: no I/O, no secret).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from guard.classify.catalog import Action, Catalog

__all__ = [
    "ATTRIBUTION_DATABASE",
    "ATTRIBUTION_MESSAGE_PREFIX",
    "ATTRIBUTION_TABLE",
    "MESSAGE_PREFIX_OPTION",
    "EXCLUDE_OPTION",
    "HASH_ALGORITHM",
    "HASH_HEX_LENGTH",
    "SALT_PLACEHOLDER",
    "SourceRule",
    "column_pattern",
    "hash_column_problem",
    "hash_option",
    "is_source_hash",
    "source_options",
    "source_rules",
]

#: Debezium's option naming the logical decoding message prefixes it publishes on `<topic.prefix>.message`,
#: and the one prefix the guard needs: the attribution of deletes (docs/policy.md, "Attribution contract").
MESSAGE_PREFIX_OPTION = "message.prefix.include.list"
ATTRIBUTION_MESSAGE_PREFIX = "guard.principal"
#: MariaDB has no logical decoding messages: its delete triggers insert the attribution into this table of a
#: guard-owned database the application can't write (docs/policy.md), which the MariaDB connector captures and
#: routes to `<topic.prefix>.message`, where PostgreSQL's messages go.
ATTRIBUTION_DATABASE = "guard_admin"
ATTRIBUTION_TABLE = "principal_messages"

#: Debezium's option for columns left out of change events (comma-separated regexes, full match).
EXCLUDE_OPTION = "column.exclude.list"
#: The JCA name of Debezium's hash (``MessageDigest.getInstance``) and the hex length of its digest.
HASH_ALGORITHM = "SHA-256"
HASH_HEX_LENGTH = 64
#: Placeholder for the salt in the rendered document; the stack fills it in from the salt file.
SALT_PLACEHOLDER = "${CONNECTOR_HASH_SALT}"

#: PostgreSQL and MariaDB types Debezium's hash mask applies to (JDBC CHAR/VARCHAR/LONGVARCHAR/N*/CLOB families).
_HASHABLE_TYPES = frozenset({"text", "character varying", "varchar", "character", "char", "bpchar", "citext",
                             "tinytext", "mediumtext", "longtext"})
_HEX_DIGEST = re.compile(rf"[0-9a-f]{{{HASH_HEX_LENGTH}}}")


@dataclass(frozen=True, slots=True)
class SourceRule:
    """What Debezium does with one C3 column (``schema.table.column``) and why."""

    table: str
    column: str
    action: Action  # DROP (excluded) or HASH (salted SHA-256 by Debezium)
    why: str

    @property
    def pattern(self) -> str:
        return column_pattern(self.table, self.column)

    @property
    def option(self) -> str:
        return EXCLUDE_OPTION if self.action is Action.DROP else hash_option(SALT_PLACEHOLDER)


def column_pattern(table: str, column: str) -> str:
    """Debezium's fully-qualified column regex: ``schema.table.column`` with the dots escaped.

    Debezium matches the whole identifier (``Pattern.matcher(id).matches()``), so no anchors are needed;
    an escaped dot keeps ``public.customer_auth.pin`` from also matching ``public.customer_authXpin``.
    """
    return r"\.".join(re.escape(part) for part in (*table.split(".", 1), column))


def hash_option(salt: str) -> str:
    """The option name of Debezium's v2 hash mask with `salt` (v2 hashes the value's string form, so the
    digest does not depend on Java serialization)."""
    return f"column.mask.hash.v2.{HASH_ALGORITHM}.with.salt.{salt}"


def is_source_hash(value: object) -> bool:
    """Whether a raw value looks like Debezium's digest (64 lower-case hex digits)."""
    return isinstance(value, str) and _HEX_DIGEST.fullmatch(value) is not None


def source_rules(catalog: Catalog, namespace: str | None = None) -> list[SourceRule]:
    """One rule per C3 column of the catalog, sorted by table and column; with `namespace` (a PostgreSQL
    schema or a MariaDB database), only that namespace's tables: one connector's share."""
    rules = []
    for table in catalog.tables():
        if namespace is not None and table.partition(".")[0] != namespace:
            continue
        policy = catalog.table(table)
        assert policy is not None
        for name, col in sorted(policy.columns.items()):
            if col.data_class != "C3":
                continue
            if col.action is Action.DROP:
                why = "catalog action 'drop': excluded at the source, the value never leaves the database"
            else:  # the catalog allows only drop or hash for C3
                why = (f"catalog action 'hash': Debezium sends the salted {HASH_ALGORITHM} digest; a change stays "
                       f"visible, the value cannot be recovered (needs a text column)")
            rules.append(SourceRule(table, name, col.action, why))
    return rules


def source_options(catalog: Catalog, namespace: str | None = None) -> dict[str, str]:
    """The connector options that keep the catalog's C3 columns out of the raw topics (salt as placeholder).

    Empty when the catalog has no C3 column (the options are then absent, not empty strings, which
    Debezium would read as "exclude nothing" anyway). `namespace` limits them to one connector's tables.
    """
    out: dict[str, list[str]] = {}
    for rule in source_rules(catalog, namespace):
        out.setdefault(rule.option, []).append(rule.pattern)
    return {option: ",".join(patterns) for option, patterns in out.items()}


def hash_column_problem(data_type: str, max_length: int | None) -> str | None:
    """Why Debezium would not hash a column of this PostgreSQL or MariaDB type (information_schema ``data_type``,
    ``character_maximum_length``), or None when it would send the full digest."""
    if data_type.lower() not in _HASHABLE_TYPES:
        return (f"type {data_type!r} is not a character type: Debezium's hash mask would pass the value through "
                f"in clear; mark the column action = \"drop\" in the catalog")
    if max_length is not None and max_length < HASH_HEX_LENGTH:
        return (f"{data_type}({max_length}) would cut the {HASH_HEX_LENGTH}-character digest to {max_length} "
                f"characters (guessable); mark the column action = \"drop\" in the catalog")
    return None
