"""The declarative mapping: the model, its loader, the transforms and the engine.

The mapping file (TOML, documented in ``docs/MAPPING.md``) says, per source table, which target
table it feeds, which Kafka topic (domain) and message key it travels with, which columns are
never published (``exclude``), and how each target column is computed from the source row; it
also declares the domains with their progress weights and the scenario's invariants. One file
drives the producers (publication column lists, message keys), the apply consumers
(:func:`map_row`, :func:`is_delete`, :func:`target_key`), verify (:func:`source_sql`, the
invariants) and ``cutover init``'s type check (:func:`check_column_types`).

Modules: :mod:`~cutover.mapping.model` (the frozen model), :mod:`~cutover.mapping.loader` (TOML →
model, with line-numbered errors), :mod:`~cutover.mapping.transforms` (one class per transform:
Python form, SQL form, column types), :mod:`~cutover.mapping.engine` (map a row),
:mod:`~cutover.mapping.typecheck` (transforms against the databases' column types),
:mod:`~cutover.mapping.reverse` and :mod:`~cutover.mapping.roundtrip` (the inverse mapping of the
write cutover, and its round-trip check). This module re-exports the public API.
"""

from cutover.mapping.engine import (
    aggregate_key,
    delete_reverse,
    is_delete,
    legacy_key,
    map_row,
    map_row_reverse,
    predicate_sql,
    source_sql,
    target_key,
)
from cutover.mapping.loader import MAX_MINOR_UNITS, load_mapping, parse_mapping
from cutover.mapping.model import (
    BOOKKEEPING_COLUMNS,
    TRANSFORM_KEYS,
    ColumnMapping,
    Invariant,
    MappingSpec,
    TableMapping,
)
from cutover.mapping.reverse import PredicateValue, ReverseDelete, ReverseRule
from cutover.mapping.roundtrip import check_round_trip
from cutover.mapping.transforms import Predicate, TransformKind
from cutover.mapping.typecheck import check_column_types, check_types

__all__ = [
    "BOOKKEEPING_COLUMNS",
    "MAX_MINOR_UNITS",
    "TRANSFORM_KEYS",
    "ColumnMapping",
    "Invariant",
    "MappingSpec",
    "Predicate",
    "PredicateValue",
    "ReverseDelete",
    "ReverseRule",
    "TableMapping",
    "TransformKind",
    "aggregate_key",
    "check_column_types",
    "check_round_trip",
    "check_types",
    "delete_reverse",
    "is_delete",
    "legacy_key",
    "load_mapping",
    "map_row",
    "map_row_reverse",
    "parse_mapping",
    "predicate_sql",
    "source_sql",
    "target_key",
]
