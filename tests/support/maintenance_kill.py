"""A maintenance pass that dies by SIGKILL at a chosen point (run as a subprocess by the tests).

``python -m tests.support.maintenance_kill <kill_at>`` with K2_HOME set runs one pass over
market.trades (settle window 0, so every file is settled) and kills itself:

- ``rewrite``: after the compacted files are written, before their commit starts;
- ``commit``: inside the compaction commit, after the new metadata file is written and before the
  catalog points at it (the moment a commit is neither done nor undone);
- ``delete``: after the expiry commit, while deleting the files only expired snapshots used.
"""

from __future__ import annotations

import os
import signal
import sys

from pyiceberg.catalog.sql import SqlCatalog

from k2_resources.catalog.resource import IcebergResource
from k2_resources.catalog.tables import TRADES
from k2_resources.operations import snapshot_policy
from k2_resources.operations.continuous_maintenance import MaintenanceSettings, TableMaintainer, ensure_properties
from k2_resources.operations.settled_compaction import CompactionSettings
from k2_resources.operations.snapshot_policy import SnapshotPolicy


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main(kill_at: str) -> None:
    iceberg = IcebergResource()
    settings = MaintenanceSettings(
        compaction=CompactionSettings(settle_window_s=0, min_files=2),
        snapshots=SnapshotPolicy(exact_window_s=0, max_exact_snapshots=1, hourly_for_s=0, retention_s=0),
        measure_health=False,
    )
    maintainer = TableMaintainer(lambda: iceberg.table(TRADES), TRADES.identifier, settings)
    ensure_properties(maintainer.load, settings)  # the table properties first, so the kill hits compaction
    maintainer.properties_ok = True
    armed = {"commit": False}
    if kill_at == "rewrite":
        maintainer.before_swap = die
    elif kill_at == "commit":
        original = SqlCatalog._write_metadata

        def write_then_die(*args, **kwargs):
            original(*args, **kwargs)
            if armed["commit"]:
                die()

        SqlCatalog._write_metadata = staticmethod(write_then_die)  # type: ignore[method-assign]

        def arm() -> None:
            armed["commit"] = True

        maintainer.before_swap = arm
    elif kill_at == "delete":
        calls = {"n": 0}

        def delete_then_die(table, path):
            table.io.delete(path)
            calls["n"] += 1
            if calls["n"] == 3:
                die()

        snapshot_policy._delete_file = delete_then_die
    result = maintainer.run_pass(sweep=False)
    print("PASS-ENDED", result.error)


if __name__ == "__main__":
    main(sys.argv[1])
