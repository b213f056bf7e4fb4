"""Maintenance passes reach Dagster as one materialization and one table_health evaluation per
table and minute (sums of what they did), and health bounds turn into WARN and ERROR."""

from __future__ import annotations

from k2_assets.operations.health_checks import PassDigest, health_evaluation, table_asset_key
from k2_resources.operations.continuous_maintenance import MaintenancePass
from k2_resources.operations.settled_compaction import CompactionOutcome, PartitionRewrite
from k2_resources.operations.snapshot_policy import ExpiryOutcome
from k2_resources.operations.table_health import ERROR, OK, WARN, TableHealth, evaluate

MIB = 1024 * 1024


def a_pass(files_removed: int, expired: int, manifests: int = 3) -> MaintenancePass:
    compaction = CompactionOutcome(commits=1, conflicts=2, seconds=0.5)
    compaction.rewrites.append(
        PartitionRewrite("timestamp_day=2024-08-09/exchange=BINANCE", files_removed, 1, 100, 9, 5)
    )
    return MaintenancePass(
        "market.trades",
        "2024-08-09T00:00:00+00:00",
        compaction=compaction,
        expiry=ExpiryOutcome(snapshots_before=50, snapshots_after=50 - expired, expired=expired),
        health=TableHealth("market.trades", snapshots=40, manifests=manifests),
        seconds=1.0,
    )


def test_a_digest_sums_what_its_passes_did_and_keeps_the_latest_state():
    digest = PassDigest("market.trades")
    digest.add(a_pass(10, 5))
    digest.add(a_pass(7, 3, manifests=4))
    digest.add(MaintenancePass("market.trades", "2024-08-09T00:01:00+00:00", error="CommitConflictError: lost"))
    materialization, health = digest.take(0.0)
    assert materialization is not None and materialization.asset_key == table_asset_key("market.trades")
    values = {k: getattr(v, "value", v) for k, v in materialization.metadata.items()}
    assert values["passes"] == 3 and values["passes_that_changed"] == 2
    assert values["compaction_files_removed"] == 17 and values["compaction_commits"] == 2
    assert values["compaction_conflicts"] == 4 and values["expiry_expired"] == 8
    assert values["expiry_snapshots_after"] == 47  # the latest pass's state, not a sum
    assert values["failed_passes"] == 1 and "lost" in values["error"]
    assert health is not None and health.manifests == 4
    assert digest.take(1.0) == (None, None)  # nothing since


def test_health_bounds_give_ok_warn_and_error():
    assert evaluate(TableHealth("market.trades", manifests=10, metadata_file_bytes=MIB // 2))[0] == OK
    warn = TableHealth("market.trades", manifests=40)
    assert evaluate(warn)[0] == WARN
    error = TableHealth("market.trades", max_settled_files_per_partition=50, metadata_file_bytes=9 * MIB)
    assert evaluate(error)[0] == ERROR
    evaluation = health_evaluation(error)
    assert not evaluation.passed and "max_settled_files_per_partition 50" in (evaluation.description or "")
    # a big metadata folder only counts once it is over 64 MiB
    assert evaluate(TableHealth("t", metadata_folder_bytes=60 * MIB, data_bytes=1))[0] == OK
    assert evaluate(TableHealth("t", metadata_folder_bytes=100 * MIB, data_bytes=1000 * MIB))[0] == WARN
