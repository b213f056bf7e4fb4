"""FollowReport: a follower's commits become one materialisation per report window, contiguous per
partition, the run's result closing the last window; nothing committed is left out."""

from __future__ import annotations

import json

from k2_assets.binance.follow_report import FollowReport
from k2_resources.sink.microbatch import BatchResult
from k2_resources.sink.offsets import OffsetRange


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def commit(partition: int, start: int, end: int, *, snapshot: int, gaps=None, already=False) -> BatchResult:
    return BatchResult(
        OffsetRange("t", partition, start, end),
        written=0 if already else end - start,
        dead_lettered=0,
        already_committed=already,
        snapshot_id=None if already else snapshot,
        commit_seconds=0.2,
        sequence_gaps=gaps or {},
    )


def follow(report: FollowReport, clock: Clock, seconds: int, partitions: int = 2) -> list[tuple[int, int, int]]:
    """One commit of 10 offsets per partition each second for ``seconds``; the ranges committed."""
    committed = []
    for second in range(seconds):
        for partition in range(partitions):
            start = second * 10
            report.add(commit(partition, start, start + 10, snapshot=1000 + second * partitions + partition))
            committed.append((partition, start, start + 10))
        clock.now += 1.0
    return committed


def test_one_event_per_window_whose_ranges_cover_every_commit_once():
    clock, emitted = Clock(), []
    report = FollowReport("t", "NORMAL", 60, emitted.append, run_for_s=600, clock=clock)
    committed = follow(report, clock, 600)
    last = report.close()
    windows = [*emitted, last]
    assert len(windows) == 10  # ceil(600 / 60): nine windows, then the run's result closes the tenth
    assert sum(w["window_commits"] for w in windows) == len(committed)
    assert sum(w["rows_written"] for w in windows) == 10 * len(committed)
    for partition in range(2):
        spans = [w["offset_ranges"].value[str(partition)] for w in windows]
        assert spans[0][0] == 0 and spans[-1][1] == 6000
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), spans  # contiguous, no overlap
    # the first window closes at the first commit 60 s after it opened (that commit included)
    assert emitted[0]["snapshot_ids"].value == "1000..1120"
    assert report.close() == {}  # nothing left open


def test_a_window_as_long_as_the_run_gives_one_event_per_run():
    clock, emitted = Clock(), []
    report = FollowReport("t", "NORMAL", 600, emitted.append, run_for_s=600, clock=clock)
    follow(report, clock, 605)  # the follower's last cycle ends a little after its 600 s
    assert emitted == []
    assert report.close()["window_commits"] == 1210


def test_gaps_are_summed_per_partition_and_already_committed_ranges_add_nothing():
    clock, emitted = Clock(), []
    report = FollowReport("t", "NORMAL", 10, emitted.append, clock=clock)
    report.add(commit(0, 0, 10, snapshot=1, gaps={"BTCUSDT": 2}))
    report.add(commit(0, 10, 20, snapshot=2, gaps={"BTCUSDT": 1, "ETHUSDT": 4}))
    report.add(commit(1, 0, 5, snapshot=3, already=True))
    window = report.close()
    assert window["window_commits"] == 2 and window["sequence_gaps"] == 7
    assert json.loads(window["sequence_gaps_by_partition"].value) == {
        "0": {"range": "0-20", "gaps": {"BTCUSDT": 3, "ETHUSDT": 4}}
    }
    assert window["offset_ranges"].value == {"0": [0, 20]}


def test_a_window_closes_on_time_when_the_stream_goes_quiet():
    clock, emitted = Clock(), []
    report = FollowReport("t", "NORMAL", 60, emitted.append, run_for_s=3600, clock=clock)
    report.add(commit(0, 0, 10, snapshot=1))
    for _ in range(59):  # the follower's cycles with nothing new to commit
        clock.now += 1
        report.due()
    assert emitted == []
    clock.now += 1
    report.due()
    assert [w["window_commits"] for w in emitted] == [1] and report.close() == {}


def test_an_idle_follower_reports_nothing():
    clock, emitted = Clock(), []
    report = FollowReport("t", "NORMAL", 1, emitted.append, clock=clock)
    for _ in range(5):
        report.add(commit(0, 0, 10, snapshot=1, already=True))
        clock.now += 2
    assert emitted == [] and report.close() == {}


def test_the_readers_of_the_windows_see_every_row_commit_and_partition_gap():
    """The sequence-gap check's reader and `k2 metrics` on a real (in-memory) Dagster instance."""
    from dagster import AssetMaterialization, DagsterInstance

    from k2_resources.metrics import REGISTRY
    from k2_resources.operations.exporter import MetricsPoller
    from k2_sensors.binance.observe import BINANCE_TRADES, latest_batch_gaps

    clock, emitted = Clock(), []
    report = FollowReport("t", "NORMAL", 60, emitted.append, clock=clock)
    report.add(commit(0, 0, 10, snapshot=1, gaps={"BTCUSDT": 2}))
    clock.now = 61
    report.add(commit(1, 0, 30, snapshot=2))  # closes the first window: both commits
    report.add(commit(0, 10, 15, snapshot=3, gaps={"ETHUSDT": 1}))
    emitted.append(report.close())

    def sample(name: str) -> float:
        return REGISTRY.get_sample_value(name) or 0.0

    rows_before, commits_before = sample("k2_microbatch_messages_total"), sample("k2_iceberg_commit_seconds_count")
    with DagsterInstance.ephemeral() as instance:
        for metadata in emitted:
            instance.report_runless_asset_event(AssetMaterialization(asset_key=BINANCE_TRADES, metadata=metadata))
        assert latest_batch_gaps(instance, "t") == {
            0: {"range": "10-15", "gaps": {"ETHUSDT": 1}},  # the newest window's, per partition
            1: {"range": "0-30", "gaps": {}},
        }
        MetricsPoller(topic="t", instance=instance)._dagster()
    assert sample("k2_microbatch_messages_total") - rows_before == 45  # each row once
    assert sample("k2_iceberg_commit_seconds_count") - commits_before == 3  # each commit once
