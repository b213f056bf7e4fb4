"""A micro-batch sink of one partition in a process of its own, for the parallel-partition benchmark.

``python -m tests.support.sink_worker TOPIC PARTITION END BATCH`` imports everything and loads
the table, prints ``ready``, waits for a line on stdin, then commits [0, END) of the partition in
ranges of BATCH messages with ``run_microbatch`` (as the daemon's runs would, one after another)
and prints one JSON line: the wall-clock start and end of that work, the CPU seconds this process
spent on it, the rows written, and where the time went, to show what (if anything) makes two
workers wait for each other:

- ``runqueue_wait_s``: time this process was ready to run but had no core (``/proc/self/schedstat``),
  i.e. other processes on the machine had the CPU;
- ``commit_s``: the commits' seconds as ``run_microbatch`` reports them (Parquet files + catalog);
- ``catalog_commit_s`` / ``catalog_commits``: time inside the SQLite catalog's ``commit_table``
  (its database lock is the one thing two workers share besides the broker);
- ``conflicts`` / ``catalog_locked``: commits retried because the other worker committed first,
  or because its catalog transaction held the lock.

The parent starts one per partition and releases them together, so process start-up is not counted.
K2_HOME and K2_KAFKA_BOOTSTRAP come from the environment.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from pyiceberg.catalog.sql import SqlCatalog

from k2_resources.catalog.resource import IcebergResource
from k2_resources.kafka.resource import KafkaResource
from k2_resources.sink.microbatch import run_microbatch
from k2_resources.sink.offsets import OffsetRange


def _runqueue_wait_s() -> float:
    """Seconds this process has waited for a core so far (0 where the kernel does not say)."""
    try:
        return int(Path("/proc/self/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


class _CatalogCommits:
    """Times every ``SqlCatalog.commit_table`` call in this process."""

    def __init__(self) -> None:
        self.seconds, self.count = 0.0, 0
        original = SqlCatalog.commit_table

        def timed(catalog, *args, **kwargs):
            started = time.perf_counter()
            try:
                return original(catalog, *args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started
                self.count += 1

        SqlCatalog.commit_table = timed


class _Retries(logging.Handler):
    """Counts the micro-batch's commit retries (a conflict, or the catalog locked by the other writer)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.conflicts = self.locked = 0

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.conflicts += "conflicted" in message
        self.locked += "catalog is locked" in message


def main(topic: str, partition: int, end: int, batch: int) -> None:
    kafka, iceberg = KafkaResource(), IcebergResource()
    iceberg.trades()  # the table exists in steady state: opening the catalog is not the sink's work
    catalog_commits, retries = _CatalogCommits(), _Retries()
    microbatch_log = logging.getLogger("k2_resources.catalog.commit")
    microbatch_log.addHandler(retries)
    microbatch_log.setLevel(logging.INFO)
    print("ready", flush=True)
    sys.stdin.readline()
    started, cpu_started, waited = time.time(), time.process_time(), _runqueue_wait_s()
    written, commit_s = 0, 0.0
    for begin in range(0, end, batch):
        result = run_microbatch(kafka, iceberg, OffsetRange(topic, partition, begin, min(begin + batch, end)))
        written += result.written
        commit_s += result.commit_seconds
    print(
        json.dumps(
            {
                "partition": partition,
                "started": started,
                "ended": time.time(),
                "cpu_s": time.process_time() - cpu_started,
                "written": written,
                "runqueue_wait_s": _runqueue_wait_s() - waited,
                "commit_s": commit_s,
                "catalog_commit_s": catalog_commits.seconds,
                "catalog_commits": catalog_commits.count,
                "conflicts": retries.conflicts,
                "catalog_locked": retries.locked,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
