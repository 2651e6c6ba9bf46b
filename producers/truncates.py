"""TRUNCATE on the source: the per-table policy and the way back after a deliberate stop (pure).

pgoutput sends one Truncate message per statement, naming every relation it emptied (CASCADE
included). Per table the mapping says (``on_truncate``):

* ``"apply"`` (default): the producer writes a truncate event (``cutover.Truncate``, op ``t``)
  to every partition of the table's domain topic, in commit order with the table's other
  changes; the appliers remove exactly the rows captured before it (a per-table horizon);
* ``"stop"``: the producer stops before the transaction, without advancing the slot past it,
  with a message naming the table, the commit LSN and the exact command that resumes:
  ``cutover produce --carry-truncate <schema.table>@<LSN>`` carries that one TRUNCATE (and only
  that one) as if the policy were "apply".

A deliberate stop leaves the TRUNCATE ahead in the slot: re-snapshotting then would empty
commerce and stop again at the same change, so ``cutover init --resnapshot`` refuses while the
stop is recorded (:func:`producers.slot_safety.check_no_pending_stop`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from cutover.envelope import lsn_to_str, str_to_lsn
from cutover.errors import DecodeError, TruncateStopped, UsageError

CARRY_OPTION: Final = "--carry-truncate"


@dataclass(frozen=True, slots=True)
class Carry:
    """One TRUNCATE to carry despite ``on_truncate = "stop"``: table and commit LSN."""

    table: str  # schema.table
    lsn: int

    def __str__(self) -> str:
        return f"{self.table}@{lsn_to_str(self.lsn)}"


def parse_carry(text: str) -> Carry:
    """``schema.table@LSN`` (what the stop message prints) → :class:`Carry`."""
    table, sep, lsn = text.rpartition("@")
    if not sep or "." not in table:
        raise UsageError(
            f"{CARRY_OPTION} {text!r}: expected SCHEMA.TABLE@LSN, e.g. shop.invoices@0/16B3748"
        )
    try:
        return Carry(table, str_to_lsn(lsn))
    except DecodeError as exc:
        raise UsageError(f"{CARRY_OPTION} {text!r}: {exc.message}") from None


def resume_command(tables: Iterable[str], lsn: int) -> str:
    """The command that carries the TRUNCATE of ``tables`` committed at ``lsn``."""
    carries = " ".join(f"{CARRY_OPTION} {Carry(t, lsn)}" for t in tables)
    return f"cutover produce {carries}"


def stopped(tables: list[str], lsn: int, xid: int) -> TruncateStopped:
    """The error of a stop before the TRUNCATE of ``tables`` (policy "stop")."""
    return TruncateStopped(
        f"TRUNCATE of {', '.join(tables)} (transaction {xid}, commit LSN {lsn_to_str(lsn)}): "
        'on_truncate = "stop" in the mapping, so the producer stopped before it, for every '
        "domain (one slot serves them all); nothing after it was produced and the slot was not "
        "advanced past it. To carry it (commerce then loses the rows captured before it, as "
        f"legacy did), resume with: {resume_command(tables, lsn)}. Do not re-snapshot first: "
        "the TRUNCATE would still be ahead in the slot",
        tables,
        lsn,
    )
