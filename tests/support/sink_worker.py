"""A micro-batch sink of one partition in a process of its own, for the parallel-partition benchmark.

``python -m tests.support.sink_worker TOPIC PARTITION END BATCH`` imports everything and loads
the table, prints ``ready``, waits for a line on stdin, then commits [0, END) of the partition in
ranges of BATCH messages with ``run_microbatch`` (as the daemon's runs would, one after another)
and prints one JSON line: the wall-clock start and end of that work, the CPU seconds this process
spent on it, and the rows written. The
parent starts one per partition and releases them together, so process start-up is not counted.
K2_HOME and K2_KAFKA_BOOTSTRAP come from the environment.
"""

from __future__ import annotations

import json
import sys
import time

from k2_resources.iceberg import IcebergResource
from k2_resources.kafka import KafkaResource
from k2_resources.trades.microbatch import run_microbatch
from k2_resources.trades.offsets import OffsetRange


def main(topic: str, partition: int, end: int, batch: int) -> None:
    kafka, iceberg = KafkaResource(), IcebergResource()
    iceberg.trades()  # the table exists in steady state: opening the catalog is not the sink's work
    print("ready", flush=True)
    sys.stdin.readline()
    started, cpu_started = time.time(), time.process_time()
    written = 0
    for begin in range(0, end, batch):
        written += run_microbatch(kafka, iceberg, OffsetRange(topic, partition, begin, min(begin + batch, end))).written
    print(json.dumps({"partition": partition, "started": started, "ended": time.time(),
                      "cpu_s": time.process_time() - cpu_started, "written": written}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
