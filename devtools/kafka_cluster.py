"""A three-node KRaft cluster for the local stack: ``make up BROKERS=3``.

Each node is a combined broker + controller (``process.roles=broker,controller``); the three
controllers form the quorum (static ``controller.quorum.voters``), so the cluster keeps working
with one node down and stops electing leaders with two down, like a production cluster of three.
A node's settings are the single node's (:func:`devtools.stack._kafka_properties`, which
docker-compose.yml mirrors) with only what a cluster changes on top:

* its own ``node.id``, broker and controller ports, and the voters list of all three;
* the internal topics (consumer offsets, transaction state, share-group state) with replication
  factor 3 and ``min.insync.replicas`` 2, and the same as the broker default for any topic made
  without explicit settings (our topics take theirs from ``[kafka] replication_factor`` and
  ``[kafka] min_insync_replicas``).

All nodes are formatted with one cluster id (kept in ``state.json``). Node 1 lives in
``<stack>/kafka`` as the single node does, nodes 2 and 3 in ``<stack>/kafka-2`` and ``-3``. The JVM
heap per node is smaller than the single node's (three JVMs share a small machine).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

#: The sizes a cluster may have: one node (the default stack) or a quorum of three.
SIZES: Final = (1, 3)
#: Per node; three of them run next to two PostgreSQL clusters on a 2-core machine.
CLUSTER_HEAP: Final = os.environ.get("CUTOVER_KAFKA_CLUSTER_HEAP", "-Xms128m -Xmx384m")
REPLICATION: Final = 3
MIN_INSYNC: Final = 2

#: What a cluster of three changes in the single node's settings, besides addresses.
CLUSTER_SETTINGS: Final[dict[str, str]] = {
    "offsets.topic.replication.factor": str(REPLICATION),
    "transaction.state.log.replication.factor": str(REPLICATION),
    "transaction.state.log.min.isr": str(MIN_INSYNC),
    "share.coordinator.state.topic.replication.factor": str(REPLICATION),
    "share.coordinator.state.topic.min.isr": str(MIN_INSYNC),
    "default.replication.factor": str(REPLICATION),
    "min.insync.replicas": str(MIN_INSYNC),
}


def node_dir(root: Path, node: int) -> Path:
    """The folder of node ``node`` (1-based): configuration, data and logs."""
    return root / "kafka" if node == 1 else root / f"kafka-{node}"


def node_properties(single: str, ports: list[tuple[int, int]], node: int) -> str:
    """``server.properties`` of node ``node`` of the cluster whose (broker, controller) ports
    are ``ports``, from the single node's properties text ``single``."""
    props = dict(line.split("=", 1) for line in single.splitlines() if line)
    broker, controller = ports[node - 1]
    voters = ",".join(f"{i}@127.0.0.1:{c}" for i, (_, c) in enumerate(ports, 1))
    props.update(
        {
            "node.id": str(node),
            "controller.quorum.voters": voters,
            "listeners": f"PLAINTEXT://127.0.0.1:{broker},CONTROLLER://127.0.0.1:{controller}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{broker}",
            **CLUSTER_SETTINGS,
        }
    )
    return "".join(f"{k}={v}\n" for k, v in props.items())


def bootstrap(ports: list[tuple[int, int]]) -> str:
    """The bootstrap list of every broker (clients need only one that answers)."""
    return ",".join(f"127.0.0.1:{broker}" for broker, _ in ports)
