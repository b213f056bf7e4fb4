"""What ``GET /v1/health`` reports: the Iceberg catalog, Kafka, and the sink's lag per partition.

The catalog is read directly (it answers every query). Kafka is asked for its end offsets in a
worker thread with a deadline, so an unreachable broker makes the answer "degraded" within
``kafka_timeout_s`` instead of holding the request for the client's own timeout; while one
Kafka probe is still waiting, later requests report that rather than starting another.
Results are reused for ``ttl_s`` so that frequent probes cost one look-up.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from k2_resources.catalog.resource import IcebergResource
from k2_resources.kafka.resource import KafkaResource
from k2_resources.sink.offsets import committed_offsets


class HealthProbe:
    """Checks the catalog and Kafka and computes lag (end offset minus committed offset)."""

    def __init__(
        self,
        kafka: KafkaResource,
        iceberg: IcebergResource,
        topics: list[str],
        kafka_timeout_s: float = 3.0,
        ttl_s: float = 1.0,
    ) -> None:
        self.kafka = kafka
        self.iceberg = iceberg
        self.topics = list(topics)
        self.kafka_timeout_s = kafka_timeout_s
        self.ttl_s = ttl_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="k2-api-health")
        self._pending: Future | None = None
        self._pending_since = 0.0
        self._cached: tuple[float, dict[str, Any]] | None = None
        self._lock = threading.Lock()

    def check(self) -> dict[str, Any]:
        with self._lock:
            if self._cached is not None and time.monotonic() - self._cached[0] < self.ttl_s:
                return self._cached[1]
            report = self._check()
            self._cached = (time.monotonic(), report)
            return report

    def _check(self) -> dict[str, Any]:
        catalog: dict[str, Any] = {"ok": False}
        committed: dict[str, dict[int, int]] = {}
        started = time.perf_counter()
        try:
            table = self.iceberg.trades()
            snapshot = table.current_snapshot()
            committed = {topic: committed_offsets(table, topic) for topic in self.topics}
            catalog = {
                "ok": True,
                "table": "market.trades",
                "snapshot_id": snapshot.snapshot_id if snapshot else None,
                "latency_ms": round((time.perf_counter() - started) * 1000, 1),
            }
        except Exception as exc:  # reported, not raised: health must answer
            catalog = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}

        kafka: dict[str, Any] = {"ok": False, "bootstrap_servers": self.kafka.servers}
        ends: dict[str, dict[int, int]] | None = None
        started = time.perf_counter()
        if self._pending is not None and not self._pending.done():
            kafka["error"] = (
                f"the previous Kafka probe has been waiting for "
                f"{time.monotonic() - self._pending_since:.0f} s; the broker is not answering"
            )
        else:
            self._pending = self._executor.submit(self._end_offsets)
            self._pending_since = time.monotonic()
            try:
                ends = self._pending.result(timeout=self.kafka_timeout_s)
                kafka.update(ok=True, latency_ms=round((time.perf_counter() - started) * 1000, 1))
            except FutureTimeout:
                kafka["error"] = (
                    f"no answer within {self.kafka_timeout_s:g} s; start the broker with "
                    "`k2 kafka start` or point K2_KAFKA_BOOTSTRAP at a running cluster"
                )
            except Exception as exc:
                kafka["error"] = f"{type(exc).__name__}: {exc}"

        lag: dict[str, Any] = {}
        if ends is not None and catalog["ok"]:
            for topic in self.topics:
                done = committed.get(topic, {})
                partitions = {
                    str(p): {"end_offset": end, "committed_offset": done.get(p, 0), "lag": max(0, end - done.get(p, 0))}
                    for p, end in sorted(ends.get(topic, {}).items())
                }
                lag[topic] = {"total": sum(v["lag"] for v in partitions.values()), "partitions": partitions}
        status = "ok" if catalog["ok"] and kafka["ok"] else ("degraded" if catalog["ok"] else "down")
        return {"status": status, "catalog": catalog, "kafka": kafka, "lag": lag}

    def _end_offsets(self) -> dict[str, dict[int, int]]:
        return {topic: self.kafka.end_offsets(topic) for topic in self.topics}

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
