"""The tiered snapshot policy keeps what it says; the commit window hands over between two threads."""

from __future__ import annotations

import threading
import time

from pyiceberg.table.snapshots import Snapshot

from k2_resources.operations.commit_window import CommitWindow
from k2_resources.operations.snapshot_policy import HOUR_MS, SnapshotPolicy, kept_snapshot_ids

NOW = 1_800_000_000_000  # ms
MINUTE = 60_000


def snap(snapshot_id: int, age_ms: int) -> Snapshot:
    return Snapshot(
        snapshot_id=snapshot_id,
        timestamp_ms=NOW - age_ms,
        manifest_list=f"/m/{snapshot_id}.avro",
        sequence_number=10_000_000 - age_ms // 1000,
    )


def test_recent_window_is_exact_older_history_keeps_one_point_per_hour_then_per_day():
    policy = SnapshotPolicy(exact_window_s=300, max_exact_snapshots=1000, hourly_for_s=6 * 3600, retention_s=3 * 86400)
    snapshots = [snap(i, i * 20_000) for i in range(15 * 3 * 60 * 24 * 4)]  # every 20 s for four days
    kept = kept_snapshot_ids(snapshots, {0}, policy, NOW)
    ages = sorted(NOW - s.timestamp_ms for s in snapshots if s.snapshot_id in kept)
    recent = [a for a in ages if a <= 5 * MINUTE]
    assert len(recent) == 16  # every snapshot of the last five minutes (0, 20 s, ..., 300 s)
    hourly = [a for a in ages if 5 * MINUTE < a <= 6 * HOUR_MS]
    assert 6 <= len(hourly) <= 7  # one per clock hour of the hourly tier
    daily = [a for a in ages if a > 6 * HOUR_MS]
    assert 3 <= len(daily) <= 4  # one per day up to the retention
    assert max(ages) <= 3 * 24 * HOUR_MS  # nothing past the retention


def test_the_exact_window_is_capped_and_protected_snapshots_always_stay():
    policy = SnapshotPolicy(exact_window_s=600, max_exact_snapshots=10, hourly_for_s=3600, retention_s=3600)
    snapshots = [snap(i, i * 1000) for i in range(100)]  # one a second
    old_tag = snap(999, 30 * 86_400_000)
    kept = kept_snapshot_ids([*snapshots, old_tag], {0, 999}, policy, NOW)
    assert {s.snapshot_id for s in snapshots[:10]} <= kept
    assert 999 in kept  # a tag or branch head outlives the retention
    assert len(kept) == 11


def test_policy_round_trips_through_its_table_property():
    policy = SnapshotPolicy(120, 50, 7200, 86400)
    assert SnapshotPolicy.from_property(policy.to_property()) == policy
    assert "hourly points for 2 h" in policy.describe()


def test_commit_window_lets_the_maintainer_commit_between_follower_cycles():
    window = CommitWindow(hold_s=2.0, wait_s=2.0)
    order: list[str] = []
    stop = threading.Event()

    def follower() -> None:
        while not stop.is_set():
            order.append("commit")
            window.between_cycles()
            time.sleep(0.01)

    thread = threading.Thread(target=follower)
    thread.start()
    try:
        time.sleep(0.05)
        with window.exclusive() as granted:
            before = len(order)
            time.sleep(0.1)  # the maintainer's commit: the follower stands still meanwhile
            assert len(order) == before
        assert granted
    finally:
        stop.set()
        thread.join()
    assert window.granted >= 1


def test_commit_window_without_a_follower_waits_only_its_wait():
    window = CommitWindow(hold_s=1.0, wait_s=0.1)
    started = time.perf_counter()
    with window.exclusive() as granted:
        pass
    assert not granted and time.perf_counter() - started < 1.0
