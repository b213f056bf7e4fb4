"""`k2 run` on fresh K2_HOMEs comes up every time, idle or with the CPUs kept busy, because the
Dagster instance is created once before any service opens it; a broken instance is repaired
when that loses no run history, and named with its fix when it would."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from k2_resources.operations.dagster_instance import broken_databases, prepare_instance, recorded_runs
from k2_resources.platform.kafka_broker import KafkaBroker
from tests.support.platform import BusyCpus, start_k2_run

pytestmark = pytest.mark.integration

STARTS = 10
BUSY_STARTS = range(3, 7)  # these four start while a load generator keeps every CPU busy
# How long one start may take. Idle, a start is up in 20-40 s; with the CPUs kept busy (and on a
# shared CI machine) importing Dagster in four processes at once can take minutes.
START_TIMEOUT_S = 600


@pytest.mark.timeout(3000)
def test_ten_fresh_starts_all_come_up_and_stop_cleanly(kafka_broker: KafkaBroker, tmp_path: Path) -> None:
    outcomes = []
    for attempt in range(STARTS):
        home = tmp_path / f"home-{attempt}"
        run = start_k2_run(home, tmp_path / f"k2-run-{attempt}.log", kafka_bootstrap=kafka_broker.bootstrap_servers)
        try:
            if attempt in BUSY_STARTS:
                with BusyCpus(seconds=60):
                    run.wait_until_up(timeout_s=START_TIMEOUT_S)
            else:
                run.wait_until_up(timeout_s=START_TIMEOUT_S)
        finally:
            code = run.stop()
        output = run.output()
        assert code == 0 and "stopped" in output, f"start {attempt}: exit {code}\n{output[-4000:]}"
        assert broken_databases(home / "dagster") == {}
        outcomes.append(code)
    assert outcomes == [0] * STARTS


def _break_like_a_race(dagster_home: Path) -> None:
    """What two processes creating the instance at once leave behind: a second alembic head."""
    with sqlite3.connect(dagster_home / "schedules" / "schedules.db") as connection:
        connection.execute("insert into alembic_version (version_num) values ('5771160a95ad')")


@pytest.mark.timeout(900)
def test_a_broken_instance_without_history_is_repaired_and_k2_run_comes_up(
    kafka_broker: KafkaBroker, tmp_path: Path
) -> None:
    home = tmp_path / "k2home"
    prepare_instance(home / "dagster")
    _break_like_a_race(home / "dagster")
    assert "schedules/schedules.db" in broken_databases(home / "dagster")
    run = start_k2_run(home, tmp_path / "k2-run.log", kafka_bootstrap=kafka_broker.bootstrap_servers)
    try:
        run.wait_until_up()
    finally:
        code = run.stop()
    assert code == 0, run.output()[-3000:]
    assert "Dagster instance repaired (schedules/schedules.db records 2 schema versions" in run.output()
    assert broken_databases(home / "dagster") == {}


@pytest.mark.timeout(600)
def test_a_broken_instance_with_history_is_kept_and_named_with_its_fix(
    kafka_broker: KafkaBroker, tmp_path: Path
) -> None:
    from dagster import DagsterInstance, asset, materialize

    @asset
    def one_row() -> int:
        return 1

    home = tmp_path / "k2home"
    dagster_home = home / "dagster"
    prepare_instance(dagster_home)
    with DagsterInstance.from_config(str(dagster_home)) as instance:
        assert materialize([one_row], instance=instance).success
    _break_like_a_race(dagster_home)
    before = {path: path.read_bytes() for path in dagster_home.rglob("*.db")}

    run = start_k2_run(home, tmp_path / "k2-run.log", kafka_bootstrap=kafka_broker.bootstrap_servers)
    code = run.process.wait(timeout=300)
    run.stop()
    output = run.output()
    assert code == 2, output
    assert f"the Dagster instance in {dagster_home} is broken" in output
    assert f"mv {dagster_home} {dagster_home}.broken" in output
    assert "It holds 1 run(s)" in output
    assert output.count("k2: ") == 1  # one message, not a traceback
    assert "Traceback" not in output
    assert {path: path.read_bytes() for path in dagster_home.rglob("*.db")} == before  # nothing deleted or rewritten
    assert recorded_runs(dagster_home) == 1
