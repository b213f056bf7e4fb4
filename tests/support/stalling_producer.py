"""A real KafkaProducer in front of which one partition can stall, for the spool's retriable-failure paths.

While partition ``p`` stalls, its records are held in the order they were sent (not handed to the
broker); ``expire_held`` fails the oldest with KafkaTimeoutError, which is what kafka-python does to
a partition's queued batches when its delivery timeout passes (a retriable error: the outbox keeps
the record), and ``release`` ends the stall: what is still held goes to the broker in order, ahead
of every later record, as a partition's queue does when its leader is back. Every other record goes
to the real producer and broker at once.
Records carry the key ``p<partition>`` so the partition is known before the send.
"""

from __future__ import annotations

import threading
from typing import Any

from kafka.errors import KafkaTimeoutError
from kafka.future import Future


def key_for(partition: int) -> bytes:
    return f"p{partition}".encode()


class StallingProducer:
    def __init__(self, producer: Any) -> None:
        self.producer = producer
        self.stalled: set[int] = set()
        self.no_metadata = False  # every send raises as when no broker answers within max_block_ms
        self._held: list[tuple[bytes, Future, tuple[str, bytes, dict[str, Any]]]] = []
        self._lock = threading.Lock()

    def send(self, topic: str, key: bytes | None = None, value: bytes | None = None, **options: Any) -> Any:
        if self.no_metadata:
            raise KafkaTimeoutError("Failed to update metadata after 2.0 secs.")
        assert key is not None and key.startswith(b"p"), key
        partition = int(key[1:])
        with self._lock:
            if partition in self.stalled:
                future = Future()
                self._held.append((value or b"", future, (topic, key, options)))
                return future
            return self.producer.send(topic, key=key, value=value, partition=partition, **options)

    def release(self) -> None:
        """End every stall: held records go to the broker in the order they were sent, before any later one."""
        with self._lock:
            self.stalled.clear()
            held, self._held = self._held, []
            for value, future, (topic, key, options) in held:
                sent = self.producer.send(topic, key=key, value=value, partition=int(key[1:]), **options)
                sent.add_callback(future.success)
                sent.add_errback(future.failure)

    def held(self) -> list[bytes]:
        """Values of the held records, oldest first."""
        with self._lock:
            return [value for value, _, _ in self._held]

    def expire_held(self, count: int | None = None) -> list[bytes]:
        """Fail the oldest ``count`` held records (all by default) with a delivery timeout; their values."""
        with self._lock:
            chosen = self._held if count is None else self._held[:count]
            self._held = self._held[len(chosen) :]
        for _, future, _ in chosen:
            future.failure(KafkaTimeoutError("Expiring 1 record(s): delivery timeout elapsed"))
        return [value for value, _, _ in chosen]

    def close(self, timeout: float | None = None) -> None:
        self.producer.close(timeout=timeout)
