"""Recording what the hybrid read asks Kafka, to assert a code path instead of a duration.

The tail (:class:`k2_resources.trades.kafka_tail.KafkaTail`) first looks up the topic's partitions
and offsets, each look-up bounded by the resource's ``kafka_timeout_seconds``, then reads the
offset ranges (kafka-python's poll loop, bounded by a minute). "Answered without Kafka" means no
call at all; "fails fast" means it failed at the first look-up and never reached the read.
"""

from __future__ import annotations

import pytest

from k2_resources.kafka.resource import KafkaResource
from k2_resources.trades.kafka_tail import KafkaTail

TAIL_CALLS = ("partitions", "end_offsets", "offsets_for_time", "read")


def record_tail_calls(monkeypatch: pytest.MonkeyPatch, kafka: KafkaResource | None = None) -> list[str]:
    """The names of the KafkaTail calls made from now on, in order (each still goes to the real tail);
    only those of tails over ``kafka`` when it is given."""
    calls: list[str] = []

    def recording(name: str):
        original = getattr(KafkaTail, name)

        def call(self: KafkaTail, *args, **kwargs):
            if kafka is None or self.kafka is kafka:
                calls.append(name)
            return original(self, *args, **kwargs)

        return call

    for name in TAIL_CALLS:
        monkeypatch.setattr(KafkaTail, name, recording(name))
    return calls
