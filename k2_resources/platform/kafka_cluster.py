"""A local Apache Kafka cluster of three KRaft nodes: the scale-out topology on one machine.

Each node is a broker and a controller in one process (a 3-voter quorum), run by the same
launcher and jars as the embedded broker (k2_resources/platform/kafka_broker.py), on 127.0.0.1. New topics
get replication factor 3 and ``min.insync.replicas=2``, so with idempotent ``acks=all`` producers a
write survives one node dying. State lives in ``K2_HOME/cluster/kafka-<n>``; the ports and the
cluster id are kept in ``K2_HOME/cluster/kafka-cluster.json`` so `k2 cluster stop|status`, run
later by another process, find the nodes again.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kafka import KafkaAdminClient
from kafka.errors import KafkaError

from k2_resources.errors import KafkaUnavailableError
from k2_resources.platform.cluster_env import ClusterService, cluster_home
from k2_resources.platform.failover import CLUSTER_TIMING
from k2_resources.platform.kafka_acls import PLAINTEXT, SASL_SSL, SECURITY_VARIABLE, ClusterSecurity, apply_acls
from k2_resources.platform.kafka_broker import KafkaBroker, free_port, new_cluster_id, resolve_classpath

DEFAULT_SIZE = 3
MAX_REPLICATION_FACTOR = 3
MIN_INSYNC_REPLICAS = 2  # with acks=all: a write is on two brokers before it is acknowledged
LAYOUT_FILE = "kafka-cluster.json"
BASE_PORT_VARIABLE = "K2_CLUSTER_KAFKA_BASE_PORT"


def replication_for(brokers: int) -> tuple[int, dict[str, str]]:
    """(replication factor, topic settings) for a cluster of ``brokers``: min(3, brokers) replicas,
    and ``min.insync.replicas=2`` once there are 3, so one broker may die without losing a write."""
    replication = max(1, min(MAX_REPLICATION_FACTOR, brokers))
    settings = {"min.insync.replicas": str(MIN_INSYNC_REPLICAS)} if replication == MAX_REPLICATION_FACTOR else {}
    return replication, settings


@dataclass
class KafkaCluster:
    """``size`` combined broker/controller nodes under ``home`` (K2_HOME/cluster by default).

    Ports are free ones chosen at the first start, or ``base_port`` upwards (node n: client port
    base + 2(n-1), controller port the next one); either way they are kept for later starts.
    """

    home: Path
    size: int = DEFAULT_SIZE
    base_port: int | None = None
    heap: str = "384m"
    started_in_s: float | None = field(default=None, init=False)  # how long the last start() took
    _nodes: list[KafkaBroker] = field(default_factory=list, init=False, repr=False)

    @classmethod
    def default(cls) -> KafkaCluster:
        """The cluster of this K2_HOME; ports from $K2_CLUSTER_KAFKA_BASE_PORT when set, else free ones."""
        base_port = os.environ.get(BASE_PORT_VARIABLE)
        return cls(home=cluster_home(), base_port=int(base_port) if base_port else None)

    @property
    def layout_file(self) -> Path:
        return self.home / LAYOUT_FILE

    # -- layout ---------------------------------------------------------------------------

    def _layout(self) -> dict:
        """Node ids, ports and cluster id: read back, or chosen now and kept for later commands."""
        if self.layout_file.exists():
            layout = json.loads(self.layout_file.read_text())
            if len(layout["nodes"]) != self.size:
                raise KafkaUnavailableError(
                    f"the cluster in {self.home} has {len(layout['nodes'])} Kafka nodes, not {self.size}; "
                    f"stop it and delete {self.home} to make a new one"
                )
            return layout
        if self.base_port is not None:
            ports = [(self.base_port + 2 * n, self.base_port + 2 * n + 1) for n in range(self.size)]
        else:
            ports = [(free_port(), free_port()) for _ in range(self.size)]
        layout = {
            "cluster_id": new_cluster_id(),
            "security": os.environ.get(SECURITY_VARIABLE, SASL_SSL).upper(),
            "nodes": [
                {"node_id": n + 1, "port": port, "controller_port": controller}
                for n, (port, controller) in enumerate(ports)
            ],
        }
        self.home.mkdir(parents=True, exist_ok=True)
        self.layout_file.write_text(json.dumps(layout, indent=2) + "\n")
        return layout

    def nodes(self) -> list[KafkaBroker]:
        """One KafkaBroker per node, all in one quorum and with the cluster's replication settings."""
        if not self._nodes:
            layout = self._layout()
            voters = ",".join(f"{n['node_id']}@127.0.0.1:{n['controller_port']}" for n in layout["nodes"])
            replication, settings = replication_for(self.size)
            self._nodes = [
                KafkaBroker(
                    home=self.home / f"kafka-{n['node_id']}",
                    port=n["port"],
                    controller_port=n["controller_port"],
                    heap=self.heap,
                    node_id=n["node_id"],
                    quorum_voters=voters,
                    cluster_id=layout["cluster_id"],
                    replication_factor=replication,
                    min_insync_replicas=int(settings.get("min.insync.replicas", 1)),
                    extra_properties=dict(CLUSTER_TIMING),
                    classpath_cache=self.home / "kafka-classpath.txt",
                    port_fix=f"stop the cluster, delete {self.layout_file} and start it again on free "
                    f"ports, or set {BASE_PORT_VARIABLE}",
                )
                for n in layout["nodes"]
            ]
            if self.security == SASL_SSL:
                self._secure(self._nodes)
        return self._nodes

    # -- security (k2_resources/platform/kafka_acls.py) ----------------------------------------

    @property
    def security(self) -> str:
        """SASL_SSL for a cluster made with security (the default), PLAINTEXT for one made without
        (``K2_CLUSTER_KAFKA_SECURITY=PLAINTEXT``, or made before K2 secured its clusters)."""
        return str(self._layout().get("security", PLAINTEXT))

    def _secure(self, nodes: list[KafkaBroker]) -> None:
        """SASL_SSL listeners, mTLS between controllers, SCRAM principals and the authorizer on each node."""
        secured = ClusterSecurity(self.home)
        node_ids = [broker.node_id for broker in nodes]
        for broker in nodes:
            broker.security_properties = secured.broker_properties(
                broker.node_id, broker.port, broker.controller_port, node_ids
            )
            broker.format_arguments = tuple(secured.format_arguments())
            broker.client_settings = secured.admin_settings()

    def client_settings(self) -> dict[str, Any]:
        """kafka-python settings of the cluster's own admin checks (the admin principal when secured)."""
        return ClusterSecurity(self.home).admin_settings() if self.security == SASL_SSL else {}

    def node(self, node_id: int) -> KafkaBroker:
        for broker in self.nodes():
            if broker.node_id == node_id:
                return broker
        raise KafkaUnavailableError(f"no Kafka node {node_id} in the cluster (nodes 1..{self.size})")

    @property
    def bootstrap_servers(self) -> str:
        return ",".join(broker.bootstrap_servers for broker in self.nodes())

    # -- life cycle -----------------------------------------------------------------------

    def live_brokers(self, timeout_s: float = 3.0) -> list[int]:
        """Ids of the brokers the cluster reports registered and not fenced ([] when none answers)."""
        try:
            admin = KafkaAdminClient(
                bootstrap_servers=self.bootstrap_servers,
                request_timeout_ms=int(timeout_s * 1000),
                bootstrap_timeout_ms=int(timeout_s * 1000),
                **self.client_settings(),
            )
        except (KafkaError, OSError, ValueError):
            return []
        try:
            brokers = admin.describe_cluster()["brokers"]
            return sorted(b["broker_id"] for b in brokers if not b.get("is_fenced", False))
        except (KafkaError, OSError, KeyError):
            return []
        finally:
            admin.close()

    def wait_until_live(self, expected: int | None = None, timeout_s: float = 120.0) -> None:
        """Return once ``expected`` (default: every) broker is registered and unfenced."""
        expected = self.size if expected is None else expected
        deadline = time.monotonic() + timeout_s
        live: list[int] = []
        while time.monotonic() < deadline:
            live = self.live_brokers()
            if len(live) >= expected:
                return
            time.sleep(0.3)
        raise KafkaUnavailableError(
            f"only brokers {live} of the {self.size}-node Kafka cluster registered within {timeout_s:.0f}s; "
            f"see the logs in {self.home}/kafka-*/broker.log"
        )

    def start(self, timeout_s: float = 180.0) -> float:
        """Start every node at once (a KRaft quorum needs a majority up to elect a leader) and return
        the seconds until all brokers were registered. Nodes that already run are left alone."""
        started = time.monotonic()
        nodes = self.nodes()
        resolve_classpath(self.home / "kafka-classpath.txt")  # once, before the nodes read the cache
        with ThreadPoolExecutor(max_workers=len(nodes), thread_name_prefix="kafka-node") as pool:
            futures = {broker.node_id: pool.submit(broker.start, timeout_s) for broker in nodes}
        failures = {node_id: future.exception() for node_id, future in futures.items() if future.exception()}
        if failures:
            self.stop()
            detail = "\n".join(f"node {node_id}: {exc}" for node_id, exc in sorted(failures.items()))
            raise KafkaUnavailableError(f"the local Kafka cluster did not start (all nodes stopped again):\n{detail}")
        self.wait_until_live(timeout_s=max(10.0, timeout_s - (time.monotonic() - started)))
        if self.security == SASL_SSL:
            apply_acls(self.bootstrap_servers, self.client_settings())
        self.started_in_s = time.monotonic() - started
        return self.started_in_s

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop every node at once (SIGTERM, then SIGKILL after ``timeout_s``); nothing to do if never started."""
        if not self.layout_file.exists():
            return
        with ThreadPoolExecutor(max_workers=self.size, thread_name_prefix="kafka-node-stop") as pool:
            for future in [pool.submit(broker.stop, timeout_s) for broker in self.nodes()]:
                future.result()

    def kill(self, node_id: int) -> None:
        """kill -9 one node, as a crash would: for fault tests."""
        self.node(node_id).kill()

    def restart(self, node_id: int, timeout_s: float = 120.0) -> None:
        """Start one node again and wait until the cluster has every broker back."""
        self.node(node_id).start(timeout_s)
        self.wait_until_live(timeout_s=timeout_s)

    def running(self) -> list[int]:
        """Ids of the nodes whose process runs."""
        return [broker.node_id for broker in self.nodes() if broker.pid() is not None]

    def status(self) -> tuple[bool, list[str]]:
        """Whether every node runs and is registered, and one line per node."""
        if not self.layout_file.exists():
            return False, [f"not created (state would be in {self.home})"]
        live = set(self.live_brokers()) if self.running() else set()
        lines = []
        for broker in self.nodes():
            pid = broker.pid()
            if pid is None:
                lines.append(f"node {broker.node_id}: stopped (state in {broker.home})")
            else:
                state = "registered" if broker.node_id in live else "not registered"
                lines.append(f"node {broker.node_id}: running, pid {pid}, {state}, on {broker.bootstrap_servers}")
        return len(live) == self.size, lines

    def env(self) -> dict[str, str]:
        """The variables K2 needs to use this cluster."""
        env = {"K2_KAFKA_BOOTSTRAP": self.bootstrap_servers}
        if self.security == SASL_SSL:
            env.update(ClusterSecurity(self.home).client_env())  # names files; no secret is in the env file
        return env


def kafka_service(cluster: KafkaCluster | None = None) -> ClusterService:
    """The Kafka brokers as a service of `k2 cluster` (the default cluster under K2_HOME/cluster)."""

    def the_cluster() -> KafkaCluster:
        return cluster or KafkaCluster.default()

    def start() -> dict[str, str]:
        chosen = the_cluster()
        chosen.start()
        return chosen.env()

    return ClusterService(
        name="kafka", start=start, stop=lambda: the_cluster().stop(), status=lambda: the_cluster().status()
    )
