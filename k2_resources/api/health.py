"""What ``GET /v1/health`` reports: the Iceberg catalog, Kafka, and the sink's lag per partition.

The catalog is read directly (it answers every query). Kafka is asked for its end offsets in a
worker thread with a deadline, so an unreachable broker makes the answer "degraded" within
``kafka_timeout_s`` instead of holding the request for the client's own timeout; while one
Kafka probe is still waiting, later requests report that rather than starting another.
Results are reused for ``ttl_s`` so that frequent probes cost one look-up.

The report names the platform's degradation level (``degradation``): the stream path's own rule
(:class:`~k2_resources.degradation.levels.DegradationManager`: lag and memory, escalation at once,
recovery with hysteresis and a cooldown) over the lag seen here and this machine's memory. The
admission control of the API reads :meth:`HealthProbe.current_level` to shed expensive queries
first when it rises; that refreshes in the background, never on a request's path.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from k2_resources.catalog.resource import IcebergResource
from k2_resources.degradation.levels import DegradationLevel, DegradationManager, describe_level, system_memory_percent
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
        self._manager = DegradationManager()
        self.level = DegradationLevel.NORMAL
        self._level_checked = 0.0
        self._refresher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="k2-api-level")
        self._refreshing = False

    def current_level(self, max_age_s: float = 5.0) -> DegradationLevel:
        """The last level computed; when it is older than ``max_age_s`` a check starts in the
        background (the caller never waits for the catalog or Kafka)."""
        if time.monotonic() - self._level_checked > max_age_s and not self._refreshing:
            self._refreshing = True
            self._refresher.submit(self._refresh)
        return self.level

    def _refresh(self) -> None:
        try:
            self.check()
        finally:
            self._refreshing = False

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
        memory = system_memory_percent()
        self.level = self._manager.evaluate(sum(t["total"] for t in lag.values()), memory)
        self._level_checked = time.monotonic()
        degradation = {
            "level": int(self.level),
            "name": self.level.name,
            "description": describe_level(self.level),
            "memory_percent": round(memory, 1),
        }
        return {"status": status, "catalog": catalog, "kafka": kafka, "lag": lag, "degradation": degradation}

    def _end_offsets(self) -> dict[str, dict[int, int]]:
        return {topic: self.kafka.end_offsets(topic) for topic in self.topics}

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._refresher.shutdown(wait=False, cancel_futures=True)
