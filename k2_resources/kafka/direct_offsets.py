"""A topic's partitions, end offsets and offsets for a time, asked of the broker directly.

kafka-python's consumer does a lot before it answers its first question (bootstrap, version
probe, metadata of every topic in the cluster), most of a new process's first ``recent_trades``
once the sink keeps the tail short. The same three answers take one plain Metadata request for
the one topic and one ListOffsets request each, on a single connection to the bootstrap broker.

It covers the common case only and says so (:class:`FastFetchUnavailable`): the broker answers
with an error, does not lead every partition of the topic (a cluster: the leaders must be asked),
or does not speak these versions. The caller then asks kafka-python, which handles every case.
"""

from __future__ import annotations

from kafka.protocol.consumer import ListOffsetsRequest, ListOffsetsResponse
from kafka.protocol.metadata import MetadataRequest, MetadataResponse

from k2_resources.kafka.columnar_fetch import BrokerConnection
from k2_resources.kafka.errors import FastFetchUnavailable

METADATA_VERSION = 4  # Kafka 1.0 and later (4.x serves v0-v13)
LIST_OFFSETS_VERSION = 4  # Kafka 2.1 and later
_LATEST = -1  # ListOffsets' timestamp for the log end (the high watermark at read_uncommitted)
_NO_OFFSET = -1


class DirectOffsets:
    """Plain requests to the bootstrap broker for one topic's partitions and offsets; not thread-safe."""

    def __init__(self, servers: str, client_id: str, timeout_s: float) -> None:
        self._connection = BrokerConnection(servers, client_id, timeout_s)
        self._leaders: dict[str, list[int]] = {}

    def partitions(self, topic: str) -> list[int]:
        """The topic's partitions, when this broker leads them all."""
        request = MetadataRequest(
            topics=[MetadataRequest.MetadataRequestTopic(name=topic)], allow_auto_topic_creation=False
        )
        response = self._connection.send(request, METADATA_VERSION, MetadataResponse)
        if len(response.brokers) != 1 or len(response.topics) != 1:
            raise FastFetchUnavailable(f"{len(response.brokers)} brokers: ask each partition's leader")
        (broker,), (answer,) = response.brokers, response.topics
        if answer.error_code != 0 or not answer.partitions:
            raise FastFetchUnavailable(f"metadata of {topic}: error code {answer.error_code}")
        for partition in answer.partitions:
            if partition.error_code != 0 or partition.leader_id != broker.node_id:
                raise FastFetchUnavailable(
                    f"{topic}[{partition.partition_index}]: error code "
                    f"{partition.error_code}, leader {partition.leader_id}"
                )
        self._leaders[topic] = sorted(partition.partition_index for partition in answer.partitions)
        return self._leaders[topic]

    def end_offsets(self, topic: str, partitions: list[int]) -> dict[int, int]:
        """The log end (next offset) of each partition."""
        return {p: offset for p, offset in self._list_offsets(topic, partitions, _LATEST).items() if offset is not None}

    def offsets_for_time(self, topic: str, partitions: list[int], timestamp_ms: int) -> dict[int, int | None]:
        """Per partition, the first offset whose timestamp is >= timestamp_ms (None: none is)."""
        if timestamp_ms < 0:
            raise FastFetchUnavailable(f"timestamp {timestamp_ms} would ask for a special offset")
        return self._list_offsets(topic, partitions, timestamp_ms)

    def _list_offsets(self, topic: str, partitions: list[int], timestamp: int) -> dict[int, int | None]:
        if not set(partitions) <= set(self._leaders.get(topic) or self.partitions(topic)):
            raise FastFetchUnavailable(f"{topic} has no partition among {partitions} that this broker leads")
        request = ListOffsetsRequest(
            replica_id=-1,
            isolation_level=0,
            topics=[
                ListOffsetsRequest.ListOffsetsTopic(
                    name=topic,
                    partitions=[
                        ListOffsetsRequest.ListOffsetsTopic.ListOffsetsPartition(
                            partition_index=p, current_leader_epoch=-1, timestamp=timestamp
                        )
                        for p in partitions
                    ],
                )
            ],
        )
        response = self._connection.send(request, LIST_OFFSETS_VERSION, ListOffsetsResponse)
        found: dict[int, int | None] = {}
        for answer in response.topics:
            for partition in answer.partitions:
                if partition.error_code != 0:
                    raise FastFetchUnavailable(
                        f"offsets of {topic}[{partition.partition_index}]: error code {partition.error_code}"
                    )
                found[partition.partition_index] = None if partition.offset == _NO_OFFSET else partition.offset
        if set(found) != set(partitions):
            raise FastFetchUnavailable(f"offsets of {topic}: asked for {sorted(partitions)}, got {sorted(found)}")
        return found

    def close(self) -> None:
        self._connection.close()
