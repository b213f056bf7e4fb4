"""KafkaResource: idempotent producers, consumers and an admin client for one cluster."""

from __future__ import annotations

import os
import time
from typing import Any

from dagster import ConfigurableResource
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError
from pydantic import Field

from k2_resources.errors import KafkaUnavailableError
from k2_resources.kafka.security import PROTOCOL_VARIABLE, ClientSecurity, client_security
from k2_resources.platform.failover import (
    DELIVERY_TIMEOUT_MS,
    RECONNECT_BACKOFF_MAX_MS,
    REQUEST_TIMEOUT_MS,
    RETRY_BACKOFF_MS,
)
from k2_resources.platform.kafka_broker import DEFAULT_PORT
from k2_resources.platform.kafka_cluster import replication_for


def _registered_broker_count(admin: KafkaAdminClient) -> int:
    """The cluster's size: every registered broker, fenced (down for now) ones included, so a topic
    created while one broker is away still gets full replication (or Kafka's own clear refusal)."""
    return len(admin.describe_cluster()["brokers"])


def default_bootstrap_servers() -> str:
    """``$K2_KAFKA_BOOTSTRAP``, else the embedded broker on 127.0.0.1."""
    return os.environ.get("K2_KAFKA_BOOTSTRAP") or f"127.0.0.1:{os.environ.get('K2_KAFKA_PORT', DEFAULT_PORT)}"


def _wait_for_leaders(admin: KafkaAdminClient, topic: str, timeout_s: float = 30.0) -> None:
    """Wait until the cluster describes every partition of a new ``topic`` with a leader.

    Creating a topic returns once the controller has it; the other brokers learn of it a moment
    later, and a client asking one of them in between sees no partitions (on a loaded 3-broker
    cluster, long enough for a caller's next request to fail)."""
    deadline = time.monotonic() + timeout_s
    state = "not described"
    while True:
        try:
            [described] = admin.describe_topics([topic])
            found = described.get("partitions") or []
            if described.get("error_code", 0) == 0 and found and all(p["leader_id"] >= 0 for p in found):
                return
            state = f"{len(found)} partitions, leaders {[p['leader_id'] for p in found]}"
        except KafkaError as exc:
            state = str(exc)
        if time.monotonic() >= deadline:
            raise KafkaUnavailableError(
                f"topic {topic} was created but after {timeout_s:.0f} s the brokers still describe it as: {state}; "
                "check that every broker is up (`k2 cluster status`) and that the topic's replication fits them"
            )
        time.sleep(0.05)


class KafkaResource(ConfigurableResource):
    """Kafka clients built from one set of bootstrap settings.

    Producers are idempotent with acks=all, so a retried send never writes a record twice;
    consumers never auto-commit, because K2 commits offsets only after Iceberg has the data.
    """

    bootstrap_servers: str | None = Field(
        default=None, description="host:port list; defaults to $K2_KAFKA_BOOTSTRAP or the embedded broker"
    )
    client_id: str = Field(default="k2", description="client.id prefix sent to the brokers")
    role: str | None = Field(
        default=None,
        description="the role whose principal this client uses on a secured cluster (k2_resources/kafka/security.py)",
    )
    request_timeout_ms: int = Field(
        default=REQUEST_TIMEOUT_MS, description="longer than a broker's failover (k2_resources/platform/failover.py)"
    )

    @property
    def servers(self) -> str:
        return self.bootstrap_servers or default_bootstrap_servers()

    def security(self) -> ClientSecurity:
        """This client's security settings, from the environment (PLAINTEXT when none is set)."""
        return client_security(self.role)

    def as_role(self, role: str) -> KafkaResource:
        """The same cluster, as the principal of ``role`` (on a secured cluster; no change otherwise)."""
        return self.model_copy(update={"role": role})

    def _unreachable(self, exc: Exception) -> KafkaUnavailableError:
        settings = self.security()
        if settings.secured:
            return settings.failure(self.servers, exc)
        return KafkaUnavailableError(
            f"cannot reach Kafka at {self.servers} ({type(exc).__name__}: {exc}); start the embedded "
            "broker with `k2 kafka start` or set K2_KAFKA_BOOTSTRAP to a running cluster (this client spoke "
            f"PLAINTEXT: a secured cluster needs {PROTOCOL_VARIABLE}=SASL_SSL and its CA and principal)"
        )

    def producer(self, **overrides: Any) -> KafkaProducer:
        """An idempotent producer (acks=all) that batches for throughput; its timeouts outlast a
        broker's failover (k2_resources/platform/failover.py)."""
        config: dict[str, Any] = {
            "bootstrap_servers": self.servers,
            "client_id": f"{self.client_id}-producer",
            "acks": "all",
            "enable_idempotence": True,
            "linger_ms": 5,
            "batch_size": 256 * 1024,
            "max_in_flight_requests_per_connection": 5,
            "request_timeout_ms": self.request_timeout_ms,
            "delivery_timeout_ms": DELIVERY_TIMEOUT_MS,
            "retry_backoff_ms": RETRY_BACKOFF_MS,
            # kafka-python backs off up to 30 s between reconnects to a broker that went away, so a
            # restarted broker (or the leader it hands back) was reached again only that late, past
            # the end-of-run flush; a second at most keeps a failover's stall to about that.
            "reconnect_backoff_max_ms": RECONNECT_BACKOFF_MAX_MS,
        }
        config.update({**self.security().kafka_python(), **overrides})
        try:
            return KafkaProducer(**config)
        except (KafkaError, OSError) as exc:
            raise self._unreachable(exc) from exc

    def consumer(self, group_id: str | None = None, **overrides: Any) -> KafkaConsumer:
        """A consumer with auto-commit off; subscribe or assign it yourself."""
        config: dict[str, Any] = {
            "bootstrap_servers": self.servers,
            "client_id": f"{self.client_id}-consumer",
            "group_id": group_id,
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            "max_poll_records": 5000,
            "fetch_max_bytes": 64 * 1024 * 1024,
            "max_partition_fetch_bytes": 16 * 1024 * 1024,
            "request_timeout_ms": max(self.request_timeout_ms, 30_000),
        }
        config.update({**self.security().kafka_python(), **overrides})
        try:
            return KafkaConsumer(**config)
        except (KafkaError, OSError) as exc:
            raise self._unreachable(exc) from exc

    def admin(self) -> KafkaAdminClient:
        """An admin client; close it when done."""
        try:
            return KafkaAdminClient(
                bootstrap_servers=self.servers,
                client_id=f"{self.client_id}-admin",
                request_timeout_ms=self.request_timeout_ms,
                bootstrap_timeout_ms=self.request_timeout_ms,
                **self.security().kafka_python(),
            )
        except (KafkaError, OSError) as exc:
            raise self._unreachable(exc) from exc

    def ensure_topic(self, name: str, partitions: int = 1, config: dict[str, str] | None = None) -> None:
        """Create the topic unless it exists (a no-op then, whatever its settings).

        Its replication follows the cluster's size (replication_for), so the same call makes a
        single-replica topic on the embedded broker and a 3-replica one on a cluster.
        """
        admin = self.admin()
        try:
            if name in admin.list_topics():
                return
            replication, settings = replication_for(_registered_broker_count(admin))
            try:
                admin.create_topics(
                    [
                        NewTopic(
                            name=name,
                            num_partitions=partitions,
                            replication_factor=replication,
                            topic_configs={**settings, **(config or {})},
                        )
                    ]
                )
            except TopicAlreadyExistsError:
                pass
            _wait_for_leaders(admin, name)
        finally:
            admin.close()

    def offset_bounds(self, topic: str) -> tuple[dict[int, int], dict[int, int]]:
        """(log-start offsets, log-end offsets) of each partition of the topic, with one consumer.

        The log start is the oldest offset Kafka still holds: retention (or delete-records) moves it up.
        """
        consumer = self.consumer()
        try:
            partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or set()]
            if not partitions:
                return {}, {}
            starts = consumer.beginning_offsets(partitions)
            ends = consumer.end_offsets(partitions)
            return ({tp.partition: o for tp, o in starts.items()}, {tp.partition: o for tp, o in ends.items()})
        finally:
            consumer.close()

    def end_offsets(self, topic: str) -> dict[int, int]:
        """The log-end offset (high watermark) of each partition of the topic."""
        consumer = self.consumer()
        try:
            partitions = consumer.partitions_for_topic(topic) or set()
            ends = consumer.end_offsets([TopicPartition(topic, p) for p in partitions])
            return {tp.partition: offset for tp, offset in ends.items()}
        finally:
            consumer.close()
