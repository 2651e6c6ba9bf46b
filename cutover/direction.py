"""Which way the pipeline runs: forward (legacy → commerce) or reverse (commerce → legacy).

The write cutover (docs/ARCHITECTURE.md, "Reverse replication") runs the same producer and the
same apply consumer the other way round. Everything that differs between the two ways is data,
gathered here once, at the entry point, and handed to the existing classes:

* the **capture side**: the database the producer reads (:attr:`Direction.capture`, shaped as
  ``[source]`` settings: DSN, slot, publication, and the ``[source]`` tuning knobs), the schema
  of its producer tables, and what it captures (:meth:`Direction.routes`: for reverse, a view of
  the mapping whose "source" tables are the commerce tables, keyed by their target key);
* the **apply side**: the database the appliers write (:attr:`Direction.apply_target`), the
  schema of their offsets and dead letters, the consumer group;
* the topics: ``<prefix>.<domain>`` forward, ``<prefix>.reverse.<domain>`` reverse.

Reverse never snapshots (legacy already holds every row when writes move) and does not watch
its captured set against the mapping: its publication shrinks on purpose when a domain completes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from cutover.config import Settings, SourceSettings, TargetSettings
from cutover.control_store import LEGACY_SCHEMA, Side
from cutover.mapping import MappingSpec, TableMapping

Way = Literal["forward", "reverse"]


@dataclass(frozen=True, slots=True)
class Direction:
    """The settings of one direction of the pipeline (see the module docstring)."""

    way: Way
    #: The database the producer reads, its slot and publication (as ``[source]`` settings).
    capture: SourceSettings = field(repr=False)
    capture_side: Side
    #: Schema of the producer's tables (producer_state, ...) in the capture database.
    producer_schema: str
    #: The database the appliers write, and the schema of their offsets and dead letters.
    apply_target: TargetSettings = field(repr=False)
    apply_side: Side
    group_id: str
    topic: Callable[[str], str] = field(repr=False, compare=False)
    #: Queue initial snapshots of never-snapshotted tables (forward only).
    snapshots: bool = True
    #: Stop the producer when a mapped table or column leaves the publication (forward only).
    watch_capture: bool = True

    @property
    def reverse(self) -> bool:
        return self.way == "reverse"

    def topics(self, mapping: MappingSpec) -> list[str]:
        return [self.topic(d) for d in mapping.domains]

    def routes(self, mapping: MappingSpec) -> MappingSpec:
        """What the producer captures, as a mapping keyed by the capture side's tables."""
        return reverse_view(mapping) if self.reverse else mapping

    def settings_for_capture(self, settings: Settings) -> Settings:
        """``settings`` seen from the producer of this direction (``[source]`` = capture)."""
        return dataclasses.replace(settings, source=self.capture)

    def settings_for_apply(self, settings: Settings) -> Settings:
        """``settings`` seen from the appliers of this direction (``[target]`` = apply side)."""
        return dataclasses.replace(
            settings,
            target=self.apply_target,
            apply=dataclasses.replace(settings.apply, group_id=self.group_id),
        )


def forward(settings: Settings) -> Direction:
    """legacy → commerce: the configuration as written."""
    return Direction(
        way="forward",
        capture=settings.source,
        capture_side="source",
        producer_schema=LEGACY_SCHEMA,
        apply_target=settings.target,
        apply_side="target",
        group_id=settings.apply.group_id,
        topic=settings.kafka.topic,
    )


def reverse(settings: Settings) -> Direction:
    """commerce → legacy: ``[reverse]`` slot and publication on commerce, appliers on legacy."""
    rev = settings.reverse
    return Direction(
        way="reverse",
        capture=dataclasses.replace(
            settings.source,
            dsn=settings.target.dsn,
            slot=rev.slot,
            publication=rev.publication,
        ),
        capture_side="target",
        producer_schema=settings.target.control_schema,
        apply_target=TargetSettings(dsn=settings.source.dsn, control_schema=rev.control_schema),
        apply_side="source",
        group_id=rev.group_id,
        topic=settings.kafka.reverse_topic,
        snapshots=False,
        watch_capture=False,
    )


def of(settings: Settings, *, reverse_way: bool) -> Direction:
    """The direction a command's ``--reverse`` flag asks for."""
    return reverse(settings) if reverse_way else forward(settings)


def reverse_table(tm: TableMapping) -> TableMapping:
    """The producer's view of one commerce table: its key, its domain, no transforms.

    The message key is the first column of the commerce primary key: it never changes for a
    row, so every change of a row lands in one partition in commit order, and a DELETE (whose
    old tuple carries only the primary key) can always be routed.
    """
    return TableMapping(
        source_table=tm.target_table,
        target_table=tm.source_table,
        domain=tm.domain,
        aggregate_key=tm.target_key[0],
        primary_key=tm.target_key,
        target_key=tm.primary_key,
        columns=(),
    )


def reverse_view(mapping: MappingSpec) -> MappingSpec:
    """The mapping seen from commerce: tables keyed by commerce table, in the target schema."""
    return MappingSpec(
        source_schema=mapping.target_schema,
        target_schema=mapping.source_schema,
        domains=mapping.domains,
        tables={tm.target_table: reverse_table(tm) for tm in mapping.tables.values()},
    )


def reverse_columns(tm: TableMapping) -> tuple[str, ...]:
    """The commerce columns the reverse publication lists for ``tm``'s target table: the key and
    every mapped column the inverse reads (never the bookkeeping columns)."""
    return tuple(dict.fromkeys((*tm.target_key, *tm.target_columns)))
