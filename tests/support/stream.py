"""The Binance stream definitions pointed at a test topic, for driving the real stream sensor."""

from __future__ import annotations

from dagster import Definitions

from k2_assets.binance import defs as binance_defs
from k2_assets.resources import build_resources
from k2_resources.sink.resource import TradeSinkResource


def stream_defs(topic: str, max_batch: int) -> Definitions:
    """The stream sensor, its checks and micro-batch job, reading ``topic`` in ranges of at most ``max_batch``."""
    resources = build_resources()
    resources["sink"] = TradeSinkResource(topic=topic, max_batch_messages=max_batch)
    return Definitions.merge(binance_defs, Definitions(resources=resources))
