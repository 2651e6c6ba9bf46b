"""The three-node stack's settings (devtools/kafka_cluster.py) and init's replication check."""

from __future__ import annotations

from pathlib import Path

from cutover.config import KafkaSettings
from devtools import kafka_cluster, stack
from producers.init_checks import replication_problem


def _props(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line)


def _cluster_state() -> stack.StackState:
    state = stack.StackState(9001, 9002, 5433, 5434, "x")
    state.brokers = 3
    state.more_ports = [[9011, 9012], [9021, 9022]]
    state.more_pids = [None, None]
    return state


def test_three_nodes_form_one_quorum_with_replicated_internal_topics() -> None:
    state = _cluster_state()
    single = _props(stack._kafka_properties(state, Path("/d")))
    nodes = [
        _props(kafka_cluster.node_properties(stack._kafka_properties(state, Path("/d")),
                                             state.node_ports(), n))
        for n in (1, 2, 3)
    ]  # fmt: skip
    voters = "1@127.0.0.1:9002,2@127.0.0.1:9012,3@127.0.0.1:9022"
    assert [n["node.id"] for n in nodes] == ["1", "2", "3"]
    assert all(n["controller.quorum.voters"] == voters for n in nodes)
    assert [n["advertised.listeners"] for n in nodes] == [
        "PLAINTEXT://127.0.0.1:9001", "PLAINTEXT://127.0.0.1:9011", "PLAINTEXT://127.0.0.1:9021"
    ]  # fmt: skip
    assert nodes[1]["listeners"] == "PLAINTEXT://127.0.0.1:9011,CONTROLLER://127.0.0.1:9012"
    for n in nodes:
        assert n["offsets.topic.replication.factor"] == "3"
        assert n["transaction.state.log.replication.factor"] == "3"
        assert n["transaction.state.log.min.isr"] == "2"
        assert n["min.insync.replicas"] == "2"
        # Everything else is the single node's (which docker-compose.yml mirrors).
        changed = {"node.id", "controller.quorum.voters", "listeners", "advertised.listeners"}
        changed |= set(kafka_cluster.CLUSTER_SETTINGS)
        assert {k: v for k, v in n.items() if k not in changed} == {
            k: v for k, v in single.items() if k not in changed
        }


def test_bootstrap_lists_every_broker() -> None:
    env = _cluster_state().env()
    assert env["CUTOVER_KAFKA_BOOTSTRAP"] == "127.0.0.1:9001,127.0.0.1:9011,127.0.0.1:9021"
    assert stack.StackState(9001, 9002, 1, 2, "x").env()["CUTOVER_KAFKA_BOOTSTRAP"] == (
        "127.0.0.1:9001"
    )


def test_init_refuses_more_replicas_than_brokers() -> None:
    settings = KafkaSettings(bootstrap="b:1", replication_factor=3)
    problem = replication_problem(settings, 1)
    assert problem is not None
    assert "[kafka] replication_factor = 3" in problem and "the 1 broker(s)" in problem
    assert replication_problem(settings, 3) is None
    assert replication_problem(KafkaSettings(), 1) is None
