"""K2's sink over a whole topic, as the stream benchmark times it: ``run_microbatch`` over every
partition in ranges of at most ``batch`` messages, one after another, in one process.

``python -m tests.support.k2_topic_sink TOPIC BATCH`` does the same in a new process (imports
included) and prints one JSON line with the rows and commits, so a benchmark can time K2 from
process start, as it times a JVM sink from JVM start. K2_HOME and K2_KAFKA_BOOTSTRAP come from
the environment.
"""

from __future__ import annotations

import json
import sys

from k2_resources.catalog.resource import IcebergResource
from k2_resources.kafka.resource import KafkaResource
from k2_resources.sink.microbatch import run_microbatch
from k2_resources.sink.offsets import OffsetRange


def sink_topic(kafka: KafkaResource, iceberg: IcebergResource, topic: str, batch: int) -> dict[str, int]:
    """Commit every message of ``topic`` to market.trades; the rows written and the commits made."""
    written = commits = 0
    for partition, end in sorted(kafka.end_offsets(topic).items()):
        for begin in range(0, end, batch):
            written += run_microbatch(
                kafka, iceberg, OffsetRange(topic, partition, begin, min(begin + batch, end))
            ).written
            commits += 1
    return {"written": written, "commits": commits}


if __name__ == "__main__":
    print(json.dumps(sink_topic(KafkaResource(), IcebergResource(), sys.argv[1], int(sys.argv[2]))), flush=True)
