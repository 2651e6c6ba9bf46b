"""The control store: the tables that hold the pipeline's and the cutover's own state, in the
database it is told to use, with one schema file (``schema.sql``, one section per role).

A :class:`ControlStore` is a connection, the schema holding the tables, and which side that
database is. In the forward direction the producer's store is legacy's schema ``cutover``
(:data:`LEGACY_SCHEMA`); the consumers' and the cutover commands' store is commerce's
``[target] control_schema``. The reverse direction constructs the same stores the other way round.

One module per table group, each taking the store:

* :mod:`~cutover.control_store.offsets`: ``consumer_offsets`` (the apply path's positions);
* :mod:`~cutover.control_store.dead_letters`: ``dead_letters``;
* :mod:`~cutover.control_store.domains`: ``domain_state`` and ``transitions``;
* :mod:`~cutover.control_store.producer`: ``producer_state``, ``table_schemas`` and snapshots.

``tombstones`` and ``truncates`` belong to the apply statements (:mod:`consumers.sql`),
``verify_runs``, ``verify_chunks`` and ``audit`` to their commands; the store only creates them.
"""

from __future__ import annotations

from cutover.control_store import dead_letters, domains, offsets, producer
from cutover.control_store.domains import (
    COMMERCE_READS,
    COMMERCE_WRITES,
    COMPLETED,
    COMPLETING,
    IN_FLIGHT,
    READS_SWITCHED,
    REPLICATING,
    ROLLING_BACK,
    ROLLING_BACK_WRITES,
    STABLE,
    STATES,
    SWITCHING_READS,
    SWITCHING_WRITES,
    WRITES_SWITCHED,
    DomainState,
    Transition,
    abandon_transition,
    begin_transition,
    ensure_domains,
    finish_transition,
    load_states,
    mark_published,
    record_step,
)
from cutover.control_store.store import (
    COMMAND_TABLES,
    CONSUMER_TABLES,
    LEGACY_SCHEMA,
    PRODUCER_TABLES,
    REVERSE_TABLES,
    ROLE_TABLES,
    Conn,
    ControlStore,
    Role,
    Side,
    db_error,
    ddl,
    ensure_control_plane,
    qualified,
)

#: The schema file's text (the name the state machine has always exported).
control_plane_ddl = ddl

__all__ = [
    "COMMAND_TABLES",
    "COMMERCE_READS",
    "COMMERCE_WRITES",
    "COMPLETED",
    "COMPLETING",
    "CONSUMER_TABLES",
    "IN_FLIGHT",
    "LEGACY_SCHEMA",
    "PRODUCER_TABLES",
    "READS_SWITCHED",
    "REPLICATING",
    "REVERSE_TABLES",
    "ROLE_TABLES",
    "ROLLING_BACK",
    "ROLLING_BACK_WRITES",
    "STABLE",
    "STATES",
    "SWITCHING_READS",
    "SWITCHING_WRITES",
    "WRITES_SWITCHED",
    "Conn",
    "ControlStore",
    "DomainState",
    "Role",
    "Side",
    "Transition",
    "abandon_transition",
    "begin_transition",
    "control_plane_ddl",
    "db_error",
    "ddl",
    "dead_letters",
    "domains",
    "ensure_control_plane",
    "ensure_domains",
    "finish_transition",
    "load_states",
    "mark_published",
    "offsets",
    "producer",
    "qualified",
    "record_step",
]
