"""The inverse mapping (write cutover): commerce row → the legacy columns the mapping maps.

Once commerce is the system of record, a reverse pipeline keeps legacy in sync for the rollback
window; it maps every commerce row back with the rules built here. Each transform class builds
its own inverse (:meth:`Transform.inverse <cutover.mapping.transforms.Transform.inverse>`) from
the step builders of this module, which depends on no other mapping module (the shared type
aliases live here for that reason). A column's inverse is derived
where the forward rule loses nothing (a rename is its own inverse; ``minor_units`` divides back
exactly, restoring the scale; an injective ``enum`` is inverted) and written next to the forward
rule where it is not (``reverse = ...`` in the column entry, ``reverse_delete`` on the table;
syntax in ``docs/MAPPING.md``). Legacy columns no rule names (the social ones, anything the
mapping drops) are never produced. :mod:`cutover.mapping.roundtrip` proves the rules are round
trips; ``cutover init`` refuses a mapping whose reverse is missing or is not one.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import MAX_EMAX, MAX_PREC, MIN_EMIN, Context, Decimal
from typing import TypeAlias

from cutover.errors import UnmappableRow
from cutover.values import UNCHANGED

Row: TypeAlias = Mapping[str, object]
Step: TypeAlias = Callable[[Row], object]
#: A value a predicate compares with, or a reverse rule writes: TOML strings, integers, booleans.
PredicateValue: TypeAlias = str | int | bool
# Exact decimal arithmetic: no rounding, whatever the number of digits.
EXACT = Context(prec=MAX_PREC, Emax=MAX_EMAX, Emin=MIN_EMIN)
#: Why a column needs no explicit reverse (the refusal of a superfluous one).
DERIVED = "is inverted automatically; remove its `reverse`"


def template_parts(template: str) -> Iterable[tuple[str, str | None]]:
    """(literal text, placeholder column or None) pairs; assumes a validated template."""
    for literal, name, _spec, _conv in string.Formatter().parse(template):
        yield literal, name


@dataclass(frozen=True, slots=True)
class ReverseRule:
    """An explicit ``reverse = ...`` of a column entry, as validated by the loader.

    ``lower`` (of ``upper``); ``pairs`` (commerce value → legacy value: an ``enum``'s table, or a
    predicate's ``true``/``false``); ``column`` + ``template`` (a template's legacy column and the
    text it is rebuilt with from the forward template's placeholders).
    """

    lower: bool = False
    pairs: tuple[tuple[object, PredicateValue], ...] = ()
    column: str | None = None
    template: str | None = None


@dataclass(frozen=True, slots=True)
class ReverseDelete:
    """``reverse_delete``: what a commerce delete does to legacy (``set`` empty: delete the row)."""

    set: tuple[tuple[str, PredicateValue], ...] = ()


@dataclass(frozen=True, slots=True)
class Inverse:
    """How one commerce column is written back.

    ``legacy`` is the legacy column written (None: nothing, the value is rebuilt by other
    columns), ``step`` computes it from the commerce row, ``lossy`` says the forward rule loses
    information (only the weak law holds), ``problem`` why there is no inverse (with the fix).
    """

    target: str
    legacy: str | None
    step: Step | None
    lossy: bool = False
    problem: str | None = None


def commerce_value(table: str, target: str, row: Row) -> object:
    try:
        return row[target]
    except KeyError:
        raise UnmappableRow(
            table, target, f"commerce column {target} is missing from the row"
        ) from None


def lookup_step(table: str, target: str, pairs: Mapping[object, object]) -> Step:
    def back(row: Row) -> object:
        value = commerce_value(table, target, row)
        if value is None or value is UNCHANGED:
            return value
        try:
            return pairs[value]
        except (KeyError, TypeError):
            raise UnmappableRow(
                table, target, f"value {value!r} has no reverse; add it to the reverse table"
            ) from None

    return back


def template_pattern(template: str) -> re.Pattern[str]:
    """A regex that parses a rendered ``template`` back into its placeholder values."""
    groups: dict[str, str] = {}
    out: list[str] = []
    for literal, name in template_parts(template):
        out.append(re.escape(literal))
        if name is None:
            continue
        if name in groups:  # a repeated placeholder must repeat the same text
            out.append(f"(?P={groups[name]})")
            continue
        groups[name] = f"p{len(groups)}"
        out.append(f"(?P<{groups[name]}>.*?)")
    return re.compile("".join(out), re.DOTALL)


def template_step(table: str, target: str, forward: str, reverse: str) -> Step:
    pattern = template_pattern(forward)
    index = {
        name: f"p{i}"
        for i, name in enumerate(dict.fromkeys(n for _, n in template_parts(forward) if n))
    }
    parts = tuple(template_parts(reverse))

    def back(row: Row) -> object:
        value = commerce_value(table, target, row)
        if value is None or value is UNCHANGED:
            return value
        found = pattern.fullmatch(value) if isinstance(value, str) else None
        if found is None:
            raise UnmappableRow(table, target, f"{value!r} does not match the template {forward}")
        return "".join(lit + (found[index[n]] if n else "") for lit, n in parts)

    return back


def copy_step(table: str, target: str) -> Step:
    """The inverse of a rename: the commerce value as it is."""
    return lambda row: commerce_value(table, target, row)


def decimal_step(table: str, target: str, places: int) -> Step:
    """The inverse of ``minor_units = places``: exact, with the legacy scale restored."""

    def decimal(row: Row) -> object:
        value = commerce_value(table, target, row)
        if type(value) is int:
            return Decimal(value).scaleb(-places, EXACT)  # 1500050 → Decimal('15000.50')
        return value

    return decimal


def lower_step(table: str, target: str) -> Step:
    """The inverse ``reverse = "lower"`` of ``upper``."""

    def lower(row: Row) -> object:
        value = commerce_value(table, target, row)
        return value.lower() if isinstance(value, str) else value

    return lower


def reverse_values(inverses: tuple[Inverse, ...], table: str, row: Row) -> dict[str, object]:
    """Legacy column → value for a commerce row (UNCHANGED values are left out).

    Only the legacy columns named by the inverses are produced; raises UnmappableRow for a
    value the reverse cannot map, and for a column without an inverse (init refuses those).
    """
    out: dict[str, object] = {}
    for inv in inverses:
        if inv.problem is not None:
            raise UnmappableRow(table, inv.target, f"no reverse: {inv.problem}")
        # A lossy inverse never overrides an exact one writing the same legacy column.
        if inv.step is None or inv.legacy is None or (inv.lossy and inv.legacy in out):
            continue
        value = inv.step(row)
        if value is not UNCHANGED:
            out[inv.legacy] = value
    return out
