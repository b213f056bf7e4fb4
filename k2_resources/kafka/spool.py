"""A stand-in for a KafkaProducer that never loses a record while the broker is away.

``SpoolingKafkaProducer`` sends every topic through a :class:`~k2_resources.kafka.outbox.TopicOutbox`
of its own (log-before-publish: a bounded in-memory window, then an append-only spool on disk,
replayed in order). The pieces:

- :mod:`k2_resources.kafka.spool_store`: the spool on disk (record framing, segments, fsync policy);
- :mod:`k2_resources.kafka.spool_replay`: the replay of a topic's spool, in order, within the window;
- :mod:`k2_resources.kafka.outbox`: one topic's window, acknowledgements and spooling;
- this module: the KafkaProducer stand-in over all topics.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kafka.errors import KafkaTimeoutError

from k2_resources.kafka.outbox import DEFAULT_MAX_BUFFERED, TopicOutbox
from k2_resources.kafka.spool_store import SpoolStats
from k2_resources.platform.failover import CLOSE_TIMEOUT_S

log = logging.getLogger(__name__)


class _Accepted:
    """What ``SpoolingKafkaProducer.send`` returns: the record is taken (in memory or in the spool).

    It looks enough like kafka-python's future for callers that check ``is_done``/``failed()`` and
    add an errback: errbacks are kept per topic and called for records Kafka refuses for good.
    """

    is_done = True

    def __init__(self, owner: SpoolingKafkaProducer, topic: str) -> None:
        self._owner, self._topic = owner, topic

    def failed(self) -> bool:
        return False

    def succeeded(self) -> bool:
        return True

    def add_errback(self, handler: Callable[[BaseException], Any], *args: Any, **kwargs: Any) -> _Accepted:
        self._owner._add_error_handler(handler)
        return self

    def add_callback(self, handler: Callable[..., Any], *args: Any, **kwargs: Any) -> _Accepted:
        return self


class SpoolingKafkaProducer:
    """A stand-in for a KafkaProducer that sends every topic through a TopicOutbox of its own.

    ``send(topic, value, key, headers)`` never blocks for long and never loses a record; ``flush``
    waits at most ``close_timeout_s`` for Kafka; ``close`` leaves what Kafka did not take in the
    spool (``<root>/<topic>/``) for the next run, then closes the underlying producer.
    """

    def __init__(
        self,
        producer: Any,
        root: Path,
        *,
        max_buffered: int = DEFAULT_MAX_BUFFERED,
        close_timeout_s: float = CLOSE_TIMEOUT_S,
        on_spooled: Callable[[str, int], None] | None = None,
        topics: tuple[str, ...] = (),
        **options: Any,
    ) -> None:
        self.producer = producer
        self.root = Path(root)
        self.max_buffered = max_buffered
        self.close_timeout_s = close_timeout_s
        self.on_spooled = on_spooled
        self.options = options
        self.outboxes: dict[str, TopicOutbox] = {}
        self.undelivered = 0
        self._give_up_at: float | None = None
        self._handlers: list[Callable[[BaseException], Any]] = []
        self._lock = threading.Lock()
        for topic in topics:  # opened now, so a spool left by an earlier run is replayed at once
            self.outbox(topic)

    def outbox(self, topic: str) -> TopicOutbox:
        """The topic's spooled producer (opened, and its leftover spool replayed, on first use)."""
        with self._lock:
            if topic not in self.outboxes:
                self.outboxes[topic] = TopicOutbox(
                    self.producer,
                    topic,
                    self.root / topic,
                    max_buffered=self.max_buffered,
                    on_error=self._report,
                    **self.options,
                )
            return self.outboxes[topic]

    def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        **_: Any,
    ) -> _Accepted:
        outbox = self.outbox(topic)
        before = outbox.stats.spooled
        outbox.send(value or b"", key=key, headers=headers)
        if self.on_spooled is not None and outbox.stats.spooled != before:
            self.on_spooled(topic, outbox.stats.spooled - before)
        return _Accepted(self, topic)

    def buffered(self) -> int:
        return sum(outbox.buffered() for outbox in list(self.outboxes.values()))

    def spool_pending(self) -> int:
        return sum(outbox.spool_pending() for outbox in list(self.outboxes.values()))

    def totals(self) -> SpoolStats:
        """The stats of every topic added up."""
        total = SpoolStats()
        for outbox in list(self.outboxes.values()):
            for name in vars(total):
                setattr(total, name, getattr(total, name) + getattr(outbox.stats, name))
        return total

    def flush(self, timeout: float | None = None) -> bool:
        """Wait (at most ``timeout`` or close_timeout_s) until Kafka acknowledged every record."""
        deadline = self._deadline(timeout)
        return all(
            outbox.wait_drained(max(0.0, deadline - time.monotonic())) for outbox in list(self.outboxes.values())
        )

    def close(self, timeout: float | None = None) -> bool:
        """Stop the replays, keep what Kafka did not take in the spool, close the producer; True if all
        was delivered."""
        deadline = self._deadline(timeout)
        delivered = True
        for topic, outbox in list(self.outboxes.items()):
            if not outbox.close(timeout_s=max(0.0, deadline - time.monotonic())):
                delivered = False
                pending = outbox.spool_pending()
                self.undelivered += pending
                log.warning(
                    "Kafka did not take every record of %s in time; %d wait in %s for the next run",
                    topic,
                    pending,
                    outbox.directory,
                )
        try:
            self.producer.close(timeout=None if delivered else 0)
        except KafkaTimeoutError:
            # kafka-python's close flushes before it forces the sender down, and raises when that
            # flush times out. What Kafka did not take is in the spool already: stop the sender.
            sender = getattr(self.producer, "_sender", None)
            if sender is not None and sender.is_alive():
                sender.force_close()
            delivered = False
        return delivered

    def _deadline(self, timeout: float | None) -> float:
        """One close_timeout_s for a flush and the close after it together (the end of a run)."""
        if timeout is not None:
            return time.monotonic() + timeout
        if self._give_up_at is None:
            self._give_up_at = time.monotonic() + self.close_timeout_s
        return self._give_up_at

    def _add_error_handler(self, handler: Callable[[BaseException], Any]) -> None:
        with self._lock:
            if handler not in self._handlers:
                self._handlers.append(handler)

    def _report(self, exc: BaseException) -> None:
        for handler in list(self._handlers):
            handler(exc)
