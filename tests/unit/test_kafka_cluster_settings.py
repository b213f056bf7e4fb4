"""Cluster-sized Kafka settings, without a broker: topic replication from the cluster's size,
idempotent acks=all producers, the 3-node layout, the env file and `k2 cluster`'s service list."""

from __future__ import annotations

import pytest

import k2_assets.cli.cluster as cluster_cli
import k2_resources.kafka.resource as kafka_module
from k2_assets.cli import main as k2
from k2_resources.errors import K2Error
from k2_resources.kafka.resource import KafkaResource
from k2_resources.platform.cluster_env import ClusterService, read_env_file, write_env_file
from k2_resources.platform.kafka_broker import KafkaBroker
from k2_resources.platform.kafka_cluster import KafkaCluster, replication_for


@pytest.mark.parametrize(
    "brokers, expected",
    [
        (1, (1, {})),
        (2, (2, {})),
        (3, (3, {"min.insync.replicas": "2"})),
        (5, (3, {"min.insync.replicas": "2"})),
    ],
)
def test_replication_follows_the_cluster_size(brokers, expected):
    assert replication_for(brokers) == expected


class FakeAdmin:
    """Just enough of KafkaAdminClient for ensure_topic."""

    def __init__(self, brokers: int) -> None:
        self.brokers, self.created = brokers, []

    def list_topics(self):
        return []

    def describe_cluster(self):
        return {"brokers": [{"broker_id": n + 1, "is_fenced": n == 0} for n in range(self.brokers)]}

    def create_topics(self, topics):
        self.created.extend(topics)

    def describe_topics(self, names):
        # The first describe after creation finds no partitions yet (the brokers learn of it later).
        self.describes = getattr(self, "describes", 0) + 1
        partitions = (
            []
            if self.describes == 1
            else [{"partition_index": p, "leader_id": 1} for topic in self.created for p in range(topic.num_partitions)]
        )
        return [{"topic": name, "error_code": 0, "partitions": partitions} for name in names]

    def close(self):
        pass


@pytest.mark.parametrize("brokers, replication, min_insync", [(1, 1, None), (3, 3, "2")])
def test_ensure_topic_sizes_replication_by_the_registered_brokers(monkeypatch, brokers, replication, min_insync):
    admin = FakeAdmin(brokers)  # one broker fenced (down for now): it still counts toward the cluster's size
    monkeypatch.setattr(KafkaResource, "admin", lambda self: admin)
    KafkaResource(bootstrap_servers="127.0.0.1:1").ensure_topic("t", partitions=6, config={"retention.ms": "-1"})
    [topic] = admin.created
    assert admin.describes == 2  # ensure_topic waited until the topic was described with its leaders
    assert (topic.num_partitions, topic.replication_factor) == (6, replication)
    assert topic.topic_configs.get("min.insync.replicas") == min_insync
    assert topic.topic_configs["retention.ms"] == "-1"


def test_producers_are_idempotent_with_acks_all(monkeypatch):
    seen = {}
    monkeypatch.setattr(kafka_module, "KafkaProducer", lambda **config: seen.update(config))
    KafkaResource(bootstrap_servers="127.0.0.1:1").producer(linger_ms=50)
    assert seen["acks"] == "all" and seen["enable_idempotence"] is True and seen["linger_ms"] == 50


def test_three_nodes_share_one_quorum_and_keep_their_ports(tmp_path):
    nodes = KafkaCluster(home=tmp_path).nodes()
    assert [node.node_id for node in nodes] == [1, 2, 3]
    assert len({node.port for node in nodes} | {node.controller_port for node in nodes}) == 6
    assert len({node.quorum_voters for node in nodes}) == 1 and len({node.cluster_id for node in nodes}) == 1
    assert nodes[0].quorum_voters == ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in nodes)
    nodes[1].home.mkdir(parents=True)
    properties = dict(line.split("=", 1) for line in nodes[1]._properties().read_text().splitlines())
    assert properties["node.id"] == "2" and properties["default.replication.factor"] == "3"
    assert properties["min.insync.replicas"] == "2" and properties["offsets.topic.replication.factor"] == "3"
    # Secured by default (issue 24, docs/security.md "Kafka"): no PLAINTEXT listener, the file private.
    assert properties["listeners"].startswith("SASL_SSL://127.0.0.1:") and "PLAINTEXT" not in properties["listeners"]
    assert properties["authorizer.class.name"].endswith("StandardAuthorizer")
    assert oct(nodes[1]._properties().stat().st_mode & 0o777) == "0o600"
    # A later command (another process) finds the same nodes.
    again = KafkaCluster(home=tmp_path)
    assert (
        again.bootstrap_servers
        == KafkaCluster(home=tmp_path).bootstrap_servers
        == ",".join(node.bootstrap_servers for node in nodes)
    )
    assert (
        KafkaCluster(home=tmp_path / "fixed", base_port=41000).bootstrap_servers
        == "127.0.0.1:41000,127.0.0.1:41002,127.0.0.1:41004"
    )
    with pytest.raises(K2Error, match="has 3 Kafka nodes, not 5"):
        KafkaCluster(home=tmp_path, size=5).nodes()


def test_a_cluster_made_plaintext_stays_plaintext(tmp_path, monkeypatch):
    monkeypatch.setenv("K2_CLUSTER_KAFKA_SECURITY", "PLAINTEXT")
    cluster = KafkaCluster(home=tmp_path)
    node = cluster.nodes()[0]
    node.home.mkdir(parents=True)
    properties = dict(line.split("=", 1) for line in node._properties().read_text().splitlines())
    assert properties["listeners"].startswith("PLAINTEXT://127.0.0.1:") and "authorizer.class.name" not in properties
    monkeypatch.delenv("K2_CLUSTER_KAFKA_SECURITY")
    assert KafkaCluster(home=tmp_path).security == "PLAINTEXT"  # the choice is kept with the layout
    assert set(cluster.env()) == {"K2_KAFKA_BOOTSTRAP"}


def test_the_single_node_broker_keeps_its_settings(tmp_path):
    properties = KafkaBroker(home=tmp_path, port=1, controller_port=2)._properties().read_text()
    assert "node.id=1\n" in properties and "controller.quorum.voters=1@127.0.0.1:2\n" in properties
    assert "offsets.topic.replication.factor=1\n" in properties and "min.insync.replicas=1\n" in properties


def test_env_file_round_trips_and_a_missing_one_names_the_fix(tmp_path):
    with pytest.raises(K2Error, match="k2 cluster start"):
        read_env_file(tmp_path)
    values = {"K2_KAFKA_BOOTSTRAP": "127.0.0.1:1,127.0.0.1:2", "K2_S3_SECRET": "a b'c"}
    path = write_env_file(values, tmp_path)
    assert "export K2_KAFKA_BOOTSTRAP=127.0.0.1:1,127.0.0.1:2" in path.read_text()
    assert read_env_file(tmp_path) == values


def _service(name: str, events: list[str], fail: bool = False) -> ClusterService:
    def start():
        if fail:
            raise K2Error(f"{name} could not start")
        events.append(f"start {name}")
        return {f"K2_{name.upper()}": name}

    return ClusterService(name, start, lambda: events.append(f"stop {name}"), lambda: (True, [f"{name} fine"]))


def test_cluster_command_starts_services_in_order_and_writes_their_variables(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("K2_HOME", str(tmp_path))
    events: list[str] = []
    monkeypatch.setattr(cluster_cli, "services", lambda: [_service("kafka", events), _service("catalog", events)])
    assert k2(["cluster", "start"]) == 0
    assert read_env_file() == {"K2_KAFKA": "kafka", "K2_CATALOG": "catalog"}
    assert k2(["cluster", "status"]) == 0
    assert k2(["cluster", "stop"]) == 0
    assert events == ["start kafka", "start catalog", "stop catalog", "stop kafka"]
    assert not (tmp_path / "cluster" / "env.sh").exists()


def test_a_service_that_fails_to_start_stops_those_already_started(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("K2_HOME", str(tmp_path))
    events: list[str] = []
    monkeypatch.setattr(
        cluster_cli, "services", lambda: [_service("kafka", events), _service("catalog", events, fail=True)]
    )
    assert k2(["cluster", "start"]) == 2
    assert "catalog could not start" in capsys.readouterr().err
    assert events == ["start kafka", "stop kafka"]


def test_configured_base_port_places_every_node(tmp_path, monkeypatch):
    monkeypatch.setenv("K2_HOME", str(tmp_path))
    monkeypatch.setenv("K2_CLUSTER_KAFKA_BASE_PORT", "42000")
    cluster = KafkaCluster.default()
    assert cluster.home == tmp_path / "cluster"
    assert [(n.port, n.controller_port) for n in cluster.nodes()] == [(42000, 42001), (42002, 42003), (42004, 42005)]
    assert "K2_CLUSTER_KAFKA_BASE_PORT" in cluster.nodes()[0].port_fix


def test_stopping_a_cluster_never_started_creates_nothing(tmp_path):
    cluster = KafkaCluster(home=tmp_path / "cluster")
    cluster.stop()
    assert cluster.status() == (False, [f"not created (state would be in {tmp_path / 'cluster'})"])
    assert not (tmp_path / "cluster").exists()
