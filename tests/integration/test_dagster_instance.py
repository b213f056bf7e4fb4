"""The Dagster instance is created once, then any number of processes open it together."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from k2_resources.errors import K2Error
from k2_resources.operations.dagster_instance import (
    BrokenInstanceError,
    broken_databases,
    prepare_instance,
    recorded_runs,
)

pytestmark = pytest.mark.integration

# What each Dagster service does first: open the instance and touch its storages.
OPEN_INSTANCE = """
import sys
from dagster import DagsterInstance
with DagsterInstance.from_config(sys.argv[1]) as instance:
    instance.get_runs_count()
    instance.get_daemon_heartbeats()
    list(instance.all_instigator_state())
"""


def _alembic_rows(database: Path) -> list[str]:
    with sqlite3.connect(database) as connection:
        return [row[0] for row in connection.execute("select version_num from alembic_version")]


def test_a_prepared_instance_has_one_schema_version_per_database_and_opens_in_many_processes_at_once(tmp_path):
    home = tmp_path / "dagster"
    report = prepare_instance(home)
    assert report.created and not report.repaired
    for database in ("history/runs.db", "history/runs/index.db", "schedules/schedules.db"):
        assert len(_alembic_rows(home / database)) == 1, database
    openers = [
        subprocess.Popen([sys.executable, "-c", OPEN_INSTANCE, str(home)], stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    errors = [opener.communicate(timeout=300)[1] for opener in openers]
    assert [opener.returncode for opener in openers] == [0, 0, 0, 0], errors
    assert broken_databases(home) == {}
    again = prepare_instance(home)
    assert not again.created and not again.repaired


def test_two_heads_without_runs_are_repaired(tmp_path):
    home = tmp_path / "dagster"
    prepare_instance(home)
    with sqlite3.connect(home / "history" / "runs.db") as connection:
        connection.execute("insert into alembic_version (version_num) values ('5771160a95ad')")
    assert set(broken_databases(home)) == {"history/runs.db"}
    report = prepare_instance(home)
    assert report.repaired and "history/runs.db records 2 schema versions" in report.repaired[0]
    assert broken_databases(home) == {}
    assert recorded_runs(home) == 0


def test_two_heads_with_runs_stop_with_the_folder_and_the_fix(tmp_path):
    from dagster import DagsterInstance, asset, materialize

    @asset
    def one_row() -> int:
        return 1

    home = tmp_path / "dagster"
    prepare_instance(home)
    with DagsterInstance.from_config(str(home)) as instance:
        assert materialize([one_row], instance=instance).success
        assert materialize([one_row], instance=instance).success
    with sqlite3.connect(home / "history" / "runs" / "index.db") as connection:
        connection.execute("insert into alembic_version (version_num) values ('5771160a95ad')")
    with pytest.raises(BrokenInstanceError) as raised:
        prepare_instance(home)
    message = str(raised.value)
    assert str(home) in message and f"mv {home} {home}.broken" in message and "2 run(s)" in message
    assert recorded_runs(home) == 2  # history untouched
    assert "history/runs/index.db" in broken_databases(home)


def test_a_missing_instance_file_is_named(tmp_path):
    with pytest.raises(K2Error, match="has no dagster.yaml"):
        prepare_instance(tmp_path / "empty", config=None)
