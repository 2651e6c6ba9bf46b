"""The round-trip check of the inverse mapping, run by ``cutover init``.

For every mapped column the reverse must exist and undo the forward rule, over generated legacy
rows (seeded, so a refusal is reproducible) of the rows the forward rule can produce (a row
``delete_when`` deletes has no commerce row). Two laws, per column:

* exact columns (rename, minor_units, an injective enum, a template's legacy column):
  ``reverse(forward(row)) == row`` for the legacy column, value, type and decimal scale alike;
* lossy columns (a predicate, ``upper``, a non-injective enum: the forward rule folds several
  legacy values into one): ``forward(reverse(forward(row))) == forward(row)``; the reverse picks
  one legacy value per commerce value, and forwarding it gives the same commerce row.

A missing inverse, or one breaking its law, raises MappingError (exit 2) naming the file, the
line, the table, the column and the fix.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from cutover.errors import UnmappableRow
from cutover.mapping.engine import map_row, map_row_reverse
from cutover.mapping.model import MappingSpec, TableMapping
from cutover.mapping.reverse import Inverse, Row
from cutover.mapping.transforms import EnumMap, Flag, MinorUnits, Template, Upper

#: Generated rows per table; enough to hit every enum value and both flags many times.
SAMPLES = 200
_SEED = 11
# Text with what breaks naive code: accents, CJK, emoji, combining marks, quotes, separators.
_ALPHABET = "abcxyz019-_/ .'\"éßøñ中文字🙂\u0301ǅİ"


def _text(rnd: random.Random) -> str:
    return "".join(rnd.choice(_ALPHABET) for _ in range(rnd.randint(0, 12)))


def _value(table: TableMapping, column: str, rnd: random.Random) -> object:
    """A legacy value of ``column`` the forward rules reading it accept."""
    transforms = [c.transform for c in table.columns if column in c.source_columns()]
    for t in transforms:
        if isinstance(t, EnumMap):
            return rnd.choice(t.pairs)[0]
    for t in transforms:
        if isinstance(t, Flag):
            return rnd.choice([*t.values, _text(rnd), None])
    for t in transforms:
        if isinstance(t, MinorUnits):
            return Decimal(rnd.randint(-(10**12), 10**12)).scaleb(-t.places)
    if any(isinstance(t, Upper) for t in transforms):
        return _text(rnd).lower()  # `reverse = "lower"` says legacy holds lower case text
    if any(isinstance(t, Template) for t in transforms):
        return _text(rnd)
    kind = rnd.randrange(5)
    if kind == 0:
        return rnd.randint(-(2**63), 2**63 - 1)
    if kind == 1:
        return _text(rnd)
    if kind == 2:
        return Decimal(rnd.randint(-(10**9), 10**9)).scaleb(-rnd.randint(0, 4))
    if kind == 3:
        return datetime(2020, 1, 1, tzinfo=UTC) + timedelta(microseconds=rnd.randint(0, 10**15))
    return None


def sample_rows(table: TableMapping, n: int = SAMPLES, seed: int = _SEED) -> Iterator[Row]:
    """``n`` generated legacy rows the forward mapping produces a commerce row for."""
    rnd = random.Random(f"{seed}:{table.source_table}")
    columns = sorted(table.source_columns_used())
    made = 0
    while made < n:
        row = {c: _value(table, c, rnd) for c in columns}
        for c in {*table.primary_key, table.aggregate_key}:  # keys always have a value
            while row[c] is None:
                row[c] = _value(table, c, rnd)
        pred = table.delete_when
        if pred is not None and pred.matches(row[pred.column]):
            continue
        made += 1
        yield row


def same_value(a: object, b: object) -> bool:
    """Equal, with the same type and (for decimals) the same scale: what legacy would store."""
    if type(a) is not type(b) or a != b:
        return False
    if isinstance(a, Decimal) and isinstance(b, Decimal):
        return a.as_tuple().exponent == b.as_tuple().exponent
    return True


def _expected(table: TableMapping, inv: Inverse, row: Row) -> object:
    """The legacy value the exact law expects for ``inv``'s column."""
    column = table.column(inv.target)
    rule = column.reverse
    if rule is not None and rule.template is not None:
        return Template(rule.template).step(table.source_table, inv.target)(row)
    assert inv.legacy is not None
    return row[inv.legacy]


def check_round_trip(spec: MappingSpec) -> None:
    """Raise MappingError at the first column (in file order) whose reverse is missing or wrong."""
    for name, table in spec.tables.items():
        _check_table(spec, name, table)


def _check_table(spec: MappingSpec, name: str, table: TableMapping) -> None:
    where = f"{spec.source_schema}.{name} → {spec.target_schema}.{table.target_table}"
    written = {i.legacy for i in table._inverses if i.legacy is not None}
    for inv in table._inverses:
        key = ("tables", name, "columns", inv.target)
        if inv.problem is not None:
            raise spec.error(key, f"{where}.{inv.target}: no reverse: {inv.problem}")
        lost = [c for c in table.column(inv.target).source_columns() if c not in written]
        if lost:
            raise spec.error(
                key,
                f"{where}.{inv.target}: no reverse for {', '.join(lost)}: the write cutover "
                f"could not rebuild it; map {lost[0]} by a plain rename too, or give this "
                f'column reverse = {{ column = "{lost[0]}", template = "..." }}',
            )
    for row in sample_rows(table):
        _check_row(spec, name, table, where, row)
    _check_delete(spec, name, table, where)


def _check_row(spec: MappingSpec, name: str, table: TableMapping, where: str, row: Row) -> None:
    forward = map_row(table, row)
    for inv in table._inverses:
        if inv.step is None or inv.legacy is None:
            continue
        key = ("tables", name, "columns", inv.target)
        try:
            back = inv.step(forward)
            again = map_row(table, {**row, inv.legacy: back})[inv.target] if inv.lossy else None
        except UnmappableRow as exc:
            raise spec.error(
                key,
                f"{where}.{inv.target}: the reverse cannot map {forward[inv.target]!r} "
                f"({exc.problem}); fix its `reverse`",
            ) from None
        if inv.lossy:
            ok, law = again == forward[inv.target], "forward(reverse(v)) == v"
        else:
            ok, law = same_value(back, _expected(table, inv, row)), "reverse(forward(row)) == row"
        if not ok:
            raise spec.error(
                key,
                f"{where}.{inv.target}: the reverse is not a round trip ({law} fails): legacy "
                f"{row} → commerce {forward[inv.target]!r} → legacy {inv.legacy} = {back!r}; "
                "fix its `reverse`",
            )
    map_row_reverse(table, forward)


def _check_delete(spec: MappingSpec, name: str, table: TableMapping, where: str) -> None:
    pred = table.delete_when
    if pred is None:
        return
    key = ("tables", name, "delete_when")
    rule = table.reverse_delete
    if rule is None:
        raise spec.error(
            key,
            f"{where}: a commerce delete has no reverse: add reverse_delete = {{ set = "
            f"{{ {pred.column} = {pred.values[0]!r} }} }} (mark the legacy row) or "
            'reverse_delete = "delete"',
        )
    if rule.set and not pred.matches(dict(rule.set).get(pred.column)):
        raise spec.error(
            ("tables", name, "reverse_delete"),
            f"{where}: reverse_delete sets a legacy row delete_when does not match, so the "
            f"forward pipeline would bring it back; set {pred.column} to one of "
            f"{', '.join(repr(v) for v in pred.values)}",
        )
