"""Continuous maintenance keeps market.trades small and exact: compaction, expiry and clean-up
change no row and no committed offset, a re-run of every committed range writes nothing
afterwards, and maintenance killed mid-rewrite, mid-commit or mid-delete leaves the table exact.

Real Iceberg (SQLite catalog, file warehouse), the sink's own commit path (``commit_range``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from k2_resources.catalog.resource import IcebergResource
from k2_resources.catalog.tables import TRADES
from k2_resources.operations.continuous_maintenance import (
    ContinuousMaintenance,
    MaintenanceSettings,
    TableMaintainer,
    sweep_orphans,
)
from k2_resources.operations.errors import TimeTravelExpiredError
from k2_resources.operations.settled_compaction import CompactionSettings
from k2_resources.operations.snapshot_policy import ReferenceCache, SnapshotPolicy, snapshot_as_of
from k2_resources.operations.table_health import measure
from k2_resources.paths import PROJECT_ROOT
from k2_resources.sink.offset_commit import commit_range
from k2_resources.sink.offsets import OffsetRange, committed_offsets
from tests.support.soak_rows import second_of_trades
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

TOPIC = "market.trades.binance"
ROWS = 10
START = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)

EVERYTHING_SETTLED = MaintenanceSettings(
    compaction=CompactionSettings(settle_window_s=0, min_files=2),
    snapshots=SnapshotPolicy(exact_window_s=0, max_exact_snapshots=1, hourly_for_s=0, retention_s=0),
    orphan_grace_s=0,
    measure_health=False,
)


def batch(partition: int, index: int) -> tuple[OffsetRange, list[dict]]:
    start = index * ROWS
    rows = second_of_trades(partition, start, ROWS, START + timedelta(seconds=index))
    return OffsetRange(TOPIC, partition, start, start + ROWS), rows


def commit_batches(iceberg: IcebergResource, count: int, first: int = 0) -> list[tuple[OffsetRange, list[dict]]]:
    done = []
    for index in range(first, first + count):
        for partition in range(3):
            item = batch(partition, index)
            result = commit_range(iceberg, *item)
            assert not result.already_committed
            done.append(item)
    return done


def assert_exact(iceberg: IcebergResource, batches: list[tuple[OffsetRange, list[dict]]]) -> None:
    table = iceberg.trades()
    ids = Counter(table.scan(selected_fields=("trade_id",)).to_arrow().column("trade_id").to_pylist())
    assert ids == Counter(row["trade_id"] for _, rows in batches for row in rows)  # each once, none missing
    ends = {p: max(b.end for b, _ in batches if b.partition == p) for p in range(3)}
    assert committed_offsets(table, TOPIC) == ends


def rerun_writes_nothing(iceberg: IcebergResource, batches: list[tuple[OffsetRange, list[dict]]]) -> None:
    before = iceberg.trades().current_snapshot()
    for item in batches:
        assert commit_range(iceberg, *item).already_committed
    after = iceberg.trades().current_snapshot()
    assert before is not None and after is not None and after.snapshot_id == before.snapshot_id


def maintainer(iceberg: IcebergResource, settings: MaintenanceSettings = EVERYTHING_SETTLED) -> TableMaintainer:
    return TableMaintainer(lambda: iceberg.table(TRADES), TRADES.identifier, settings)


def test_rerun_of_every_committed_range_writes_nothing_after_compaction_and_expiry(k2_home):
    iceberg = IcebergResource()
    batches = commit_batches(iceberg, 12)
    files_before = len(list(iceberg.trades().scan().plan_files()))
    first = maintainer(iceberg).run_pass(sweep=True)
    assert first.error is None, first.error
    assert first.compaction is not None and first.compaction.commits >= 1
    assert first.expiry is not None and first.expiry.expired > 0
    table = iceberg.trades()
    assert len(list(table.scan().plan_files())) < files_before
    assert len(table.snapshots()) <= 2  # the policy keeps only the current one (and nothing newer came)
    assert_exact(iceberg, batches)
    rerun_writes_nothing(iceberg, batches)
    # the stream goes on from the committed offsets, and a second pass compacts the new files in
    more = commit_batches(iceberg, 4, first=12)
    assert maintainer(iceberg).run_pass(sweep=True).error is None
    assert_exact(iceberg, batches + more)
    rerun_writes_nothing(iceberg, batches + more)
    # nothing under the table's folders is left that the table does not reference
    assert sweep_orphans(iceberg.trades(), 0, ReferenceCache()).deleted == 0


def test_time_travel_before_the_oldest_kept_snapshot_names_the_setting(k2_home):
    iceberg = IcebergResource()
    commit_batches(iceberg, 3)
    assert maintainer(iceberg).run_pass().error is None
    table = iceberg.trades()
    with pytest.raises(TimeTravelExpiredError, match="K2_SNAPSHOT_RETENTION_HOURS"):
        snapshot_as_of(table, START - timedelta(days=1))
    assert snapshot_as_of(table, datetime.now(UTC)).snapshot_id == table.current_snapshot().snapshot_id


@pytest.mark.parametrize("kill_at", ["rewrite", "commit", "delete"])
def test_maintenance_killed_mid_way_leaves_the_table_exact(k2_home, kill_at):
    iceberg = IcebergResource()
    batches = commit_batches(iceberg, 8)
    process = subprocess.run(
        [sys.executable, "-m", "tests.support.maintenance_kill", kill_at],
        cwd=PROJECT_ROOT,
        env={**os.environ, "K2_HOME": str(k2_home)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode == -9, process.stdout + process.stderr  # SIGKILLed where asked
    assert "PASS-ENDED" not in process.stdout
    assert_exact(iceberg, batches)
    rerun_writes_nothing(iceberg, batches)
    # the next pass finishes the work and the sweep removes what the killed one left behind
    after = maintainer(iceberg).run_pass(sweep=True)
    assert after.error is None, after.error
    assert after.orphans is not None and after.orphans.deleted > 0  # what the killed pass left behind
    assert_exact(iceberg, batches)
    more = commit_batches(iceberg, 2, first=8)
    assert_exact(iceberg, batches + more)
    assert sweep_orphans(iceberg.trades(), 0, ReferenceCache()).deleted == 0


def test_compaction_and_a_follower_committing_without_pause_both_progress(k2_home):
    """A writer committing back to back (the follower catching up) and maintenance every second:
    the writer grants the commit window between cycles, compaction is not starved, and the writer
    waits at most one maintenance commit per window."""
    iceberg = IcebergResource()
    settings = MaintenanceSettings(
        interval_s=1.0,
        compaction=CompactionSettings(settle_window_s=2, min_files=4),
        snapshots=SnapshotPolicy(exact_window_s=5, max_exact_snapshots=100, hourly_for_s=3600, retention_s=3600),
        orphan_interval_s=5,
        orphan_grace_s=5,
    )
    maintenance = ContinuousMaintenance(iceberg, settings, tables=(TRADES,))
    done: list[tuple[OffsetRange, list[dict]]] = []
    stop = threading.Event()

    def follower() -> None:
        index = 0
        while not stop.is_set():
            done.extend(commit_batches(iceberg, 1, first=index))
            index += 1
            maintenance.window.between_cycles()

    with maintenance:
        thread = threading.Thread(target=follower)
        thread.start()
        # Both sides make progress: the follower commits and maintenance compacts beside it.
        wait_for(
            lambda: len(done) >= 30 and sum(p.compaction.commits for p in maintenance.passes if p.compaction) >= 2,
            timeout_s=300,
            what="30 follower commits and 2 compactions beside them",
        )
        # and compaction keeps up with it: while the follower goes on committing, the settled files of
        # the partition come down to a handful (right after start-up they may still be catching up)
        healths = []

        def healthy() -> bool:
            healths.append(measure(iceberg.trades(), settings.compaction.settle_window_s + settings.interval_s))
            return healths[-1].max_settled_files_per_partition <= 8 and healths[-1].manifests <= 32

        wait_for(healthy, timeout_s=120, what="at most 8 settled files and 32 manifests while the follower commits")
        committed_before = len(done)
        wait_for(lambda: len(done) > committed_before, timeout_s=60, what="the follower to commit again")
        stop.set()
        thread.join(120)
    compactions = sum(p.compaction.commits for p in maintenance.passes if p.compaction)
    assert compactions >= 2, [p.as_metadata() for p in maintenance.passes]
    assert len(done) >= 30
    assert_exact(iceberg, done)
    print(
        f"{len(done)} follower commits, {compactions} compactions; settled files per measure:",
        [h.max_settled_files_per_partition for h in healths],
    )
