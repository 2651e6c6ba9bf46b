"""The transform engine: pure functions from a decoded source row to the target row and keys.

Row values come typed from the decoder: ``int``, ``str``, ``Decimal``, ``datetime``, ``bool``,
``None`` or :data:`~cutover.values.UNCHANGED` (an unchanged TOAST value PostgreSQL did not send).
Rules of the engine, for every transform:

* a target column whose source value is ``UNCHANGED`` (for a template: any placeholder) is left
  out of the result, so the commerce row keeps the value it holds;
* ``None`` maps to ``None`` (rename, upper, enum, minor_units, template with a NULL placeholder),
  except a boolean predicate, which is ``False`` on ``None`` (as ``COALESCE(col = x, false)``);
* data the mapping cannot map (a missing source column, an enum value not in the table, a money
  value with more decimal places than ``minor_units``, a float where exact numbers are required,
  a value out of bigint range) raises :class:`~cutover.errors.UnmappableRow` and nothing else:
  the consumer sends that event to the dead-letter topic.

The SQL twins (:func:`source_sql`, :func:`predicate_sql`) compute the same values inside the
source database, for verify.
"""

from __future__ import annotations

from psycopg import sql

from cutover.errors import UnmappableRow
from cutover.mapping.model import ColumnMapping, TableMapping
from cutover.mapping.reverse import Row, reverse_values
from cutover.mapping.transforms import ColumnRef, Predicate, as_text, missing
from cutover.values import UNCHANGED


def map_row(table: TableMapping, row: Row) -> dict[str, object]:
    """Map a source row (column → decoded value) to the target row (target column → value).

    Target columns whose source value is ``UNCHANGED`` are omitted: the target keeps its value.
    Source columns the mapping does not read are ignored. Raises only
    :class:`~cutover.errors.UnmappableRow`.
    """
    out: dict[str, object] = {}
    for target, step in table._plan:
        value = step(row)
        if value is not UNCHANGED:
            out[target] = value
    return out


def is_delete(table: TableMapping, row: Row) -> bool:
    """True when the row matches the table's ``delete_when`` (then its target row is deleted).

    ``None`` and ``UNCHANGED`` never match. A missing ``delete_when`` column is unmappable.
    """
    pred = table.delete_when
    if pred is None:
        return False
    try:
        value = row[pred.column]
    except KeyError:
        raise missing(table.source_table, None, pred.column, "delete_when") from None
    return pred.matches(value)


def target_key(table: TableMapping, row: Row) -> tuple[object, ...]:
    """The target primary key values (in ``table.target_key`` order) from the source pk values."""
    key: list[object] = []
    for col in table.primary_key:
        try:
            value = row[col]
        except KeyError:
            raise missing(table.source_table, None, col, "primary key") from None
        if value is None or value is UNCHANGED:
            raise UnmappableRow(
                table.source_table, col, f"primary key column {col} has no value ({value!r})"
            )
        key.append(value)
    return tuple(key)


def aggregate_key(table: TableMapping, row: Row) -> str:
    """The Kafka message key of the row, as text (the value of its ``aggregate_key`` column)."""
    col = table.aggregate_key
    try:
        value = row[col]
    except KeyError:
        raise missing(table.source_table, None, col, "aggregate key") from None
    if value is None or value is UNCHANGED:
        raise UnmappableRow(
            table.source_table, col, f"aggregate key column {col} has no value ({value!r})"
        )
    if type(value) is int or type(value) is str:
        return str(value)
    return as_text(table.source_table, col, col, value)


def _ref(qualifier: str | None) -> ColumnRef:
    if qualifier:
        return lambda name: sql.Identifier(qualifier, name)
    return sql.Identifier


def source_sql(column: ColumnMapping, *, qualifier: str | None = None) -> sql.Composable:
    """An SQL expression over the SOURCE table computing ``column``'s mapped value.

    ``qualifier`` (a table alias) prefixes the column references. The expression agrees with
    :func:`map_row` on every mappable value; where map_row raises UnmappableRow the SQL yields
    NULL (enum) or a rounded value (minor_units), which verify then reports as a difference.
    """
    return column.transform.sql(_ref(qualifier))


def predicate_sql(predicate: Predicate, *, qualifier: str | None = None) -> sql.Composable:
    """SQL that is true exactly when :meth:`Predicate.matches` is (never NULL)."""
    return predicate.sql(_ref(qualifier))


# ---------------------------------------------------------------------------------------------
# The reverse direction (write cutover): commerce row → legacy columns
# ---------------------------------------------------------------------------------------------


def map_row_reverse(table: TableMapping, row: Row) -> dict[str, object]:
    """Map a commerce row (target column → value) back to legacy (source column → value).

    Only the legacy columns the mapping's inverses name are produced: never an excluded (social)
    column unless a ``reverse`` rule names it on purpose (the legacy invoice url). Commerce
    values that are ``UNCHANGED`` are left out. Raises only UnmappableRow.
    """
    return reverse_values(table._inverses, table.target_table, row)


def legacy_key(table: TableMapping, row: Row) -> tuple[object, ...]:
    """The legacy primary key values (in ``table.primary_key`` order) from a commerce row."""
    key: list[object] = []
    for col in table.target_key:
        value = row.get(col)
        if value is None or value is UNCHANGED:
            raise UnmappableRow(
                table.target_table, col, f"key column {col} has no value ({value!r})"
            )
        key.append(value)
    return tuple(key)


def delete_reverse(table: TableMapping) -> dict[str, object] | None:
    """What a commerce delete does to the legacy row: the columns to set, or None to delete it.

    A table with ``delete_when`` marks the legacy row (``reverse_delete = { set = {...} }``)
    rather than deleting it; init refuses such a table without ``reverse_delete``.
    """
    rule = table.reverse_delete
    if rule is None or not rule.set:
        return None
    return dict(rule.set)
