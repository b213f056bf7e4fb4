"""The Binance stream definitions pointed at a test topic, for driving the real stream sensor, in
either sink mode.

The deployed sink (`k2 run`, compose) follows a topic with one long-running run
(``K2_STREAM_FOLLOW_SECONDS``, k2_resources/sink/follow.py); without it the sensor requests one run
per offset range. The stream fault tests run in both modes (``@both_sink_modes``, parameter
``sink_mode``). A follower in a test follows for ``FOLLOW_SECONDS`` only: it ends soon after it
has caught up, so the next tick sees the lag at 0 and a driven test can end.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance, Definitions, SensorResult

from k2_assets.binance import defs as binance_defs
from k2_assets.resources import build_resources
from k2_resources.catalog.resource import IcebergResource
from k2_resources.degradation.resource import RESOURCE_KEY as DEGRADATION_KEY
from k2_resources.degradation.resource import DegradationResource
from k2_resources.sink.resource import TradeSinkResource
from k2_sensors.binance.driver import drive, execute_requests

FOLLOWER = "follower"
PER_RANGE = "per_range"
SINK_MODES = (FOLLOWER, PER_RANGE)
both_sink_modes = pytest.mark.parametrize("sink_mode", SINK_MODES)

FOLLOW_SECONDS = 3.0  # a test's follower: short, so a driven test ends soon after the lag is 0
FOLLOW_INTERVAL_SECONDS = 0.2


def sink_resource(
    topic: str, max_batch: int, sink_mode: str = PER_RANGE, follow_seconds: float = FOLLOW_SECONDS
) -> TradeSinkResource:
    """The sink of ``topic`` in ``sink_mode`` (explicit either way: K2_STREAM_FOLLOW_SECONDS is not read)."""
    if sink_mode not in SINK_MODES:
        raise ValueError(f"unknown sink mode {sink_mode!r}: one of {SINK_MODES}")
    following = sink_mode == FOLLOWER
    return TradeSinkResource(
        topic=topic,
        max_batch_messages=max_batch,
        follow_seconds=follow_seconds if following else 0.0,
        follow_interval_seconds=FOLLOW_INTERVAL_SECONDS,
    )


def stream_defs(
    topic: str,
    max_batch: int,
    sink_mode: str = PER_RANGE,
    *,
    follow_seconds: float = FOLLOW_SECONDS,
    degradation: DegradationResource | None = None,
) -> Definitions:
    """The stream sensor, its checks and micro-batch job, reading ``topic`` in ranges of at most
    ``max_batch`` (a follower: at most ``max_batch`` per partition and commit)."""
    resources = build_resources()
    resources["sink"] = sink_resource(topic, max_batch, sink_mode, follow_seconds)
    if degradation is not None:
        resources[DEGRADATION_KEY] = degradation
    return Definitions.merge(binance_defs, Definitions(resources=resources))


def requested_modes(result: SensorResult) -> list[str]:
    """The mode (ingest, recover, follow) of each run a tick requested."""
    return [r.run_config["ops"]["binance_trades"]["config"]["mode"] for r in result.run_requests or []]


def range_commits(table, topic: str) -> list[tuple[int, int, int]]:
    """(partition, start, end) of every snapshot that committed a range of ``topic``, oldest first."""
    commits = []
    for snapshot in table.snapshots():
        props = snapshot.summary.additional_properties if snapshot.summary else {}
        if props.get("k2.kafka.topic") == topic and "k2.kafka.start-offset" in props:
            commits.append(
                (
                    int(props["k2.kafka.partition"]),
                    int(props["k2.kafka.start-offset"]),
                    int(props["k2.kafka.end-offset"]),
                )
            )
    return commits


def assert_contiguous(commits: list[tuple[int, int, int]]) -> None:
    """Each partition's committed ranges follow one another from offset 0: no gap, no overlap."""
    for partition in sorted({p for p, _, _ in commits}):
        ranges = sorted((start, end) for p, start, end in commits if p == partition)
        assert ranges[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])), (partition, ranges)


def follower_endings(instance: DagsterInstance) -> list[str]:
    """Why each follower run of the instance ended (its summary materialisation's ``ended_because``)."""
    records = instance.fetch_materializations(AssetKey("binance_trades"), limit=10_000).records
    return [
        str(r.asset_materialization.metadata["ended_because"].value)
        for r in reversed(records)
        if r.asset_materialization is not None and "ended_because" in r.asset_materialization.metadata
    ]


@dataclass
class Background:
    """A tick's runs executing in a thread (a follower that runs while the test changes the world)."""

    thread: threading.Thread
    outcome: dict = field(default_factory=dict)

    def join(self, timeout_s: float) -> tuple[int, list[str]]:
        """Wait for the runs to end; (runs, why each failed run failed). Fails if still running at the deadline."""
        self.thread.join(timeout=timeout_s)
        assert not self.thread.is_alive(), f"the runs were still running after {timeout_s:.0f} s"
        if "error" in self.outcome:
            raise self.outcome["error"]
        return self.outcome["counts"]


def execute_in_background(instance: DagsterInstance, defs: Definitions, result: SensorResult) -> Background:
    """Start executing ``result``'s run requests (``driver.execute_requests``) in a thread."""
    outcome: dict = {}

    def work() -> None:
        try:
            outcome["counts"] = execute_requests(instance, defs, result)
        except BaseException as exc:  # re-raised by join()
            outcome["error"] = exc

    thread = threading.Thread(target=work, name="sink-runs", daemon=True)
    thread.start()
    return Background(thread, outcome)


def drain_in_each_mode(topic: str, lakes: Path, monkeypatch: pytest.MonkeyPatch, max_batch: int = 1_000):
    """Sink ``topic`` to lag 0 once per sink mode, each into a lake of its own under ``lakes``; yields
    (sink_mode, the lake's IcebergResource, the drive's report).

    For faults on the producer side (a streamer or broker killed): the topic they left is the
    fault's outcome, and sinking it again in the other mode costs seconds, where streaming it again
    would double the test."""
    for sink_mode in SINK_MODES:
        lake = lakes / f"lake-{sink_mode}"
        lake.mkdir(parents=True)
        monkeypatch.setenv("K2_HOME", str(lake))
        with DagsterInstance.ephemeral() as instance:
            defs = stream_defs(topic, max_batch=max_batch, sink_mode=sink_mode)
            report = drive(instance, defs, until=lambda r: r.lag == 0, timeout_s=600)
        yield sink_mode, IcebergResource(), report
