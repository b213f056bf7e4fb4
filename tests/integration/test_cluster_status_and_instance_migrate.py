"""`k2 cluster status` against the real object store (SeaweedFS) and Postgres, and `k2 instance migrate`
on SQLite and on a fresh Postgres database: each command a new process, as an operator runs it.

The services are the session's (tests/conftest.py starts each once); a K2_HOME of the test points
its cluster folder at them. The Kafka cluster is not started here: status must call it DOWN."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from k2_resources.operations.dagster_instance import EMBEDDED_INSTANCE_CONFIG, POSTGRES_INSTANCE_CONFIG
from k2_resources.platform.kafka_broker import free_port
from tests.support.k2_process import k2_env, run_k2

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def test_k2_cluster_status_reports_the_real_services(object_store, postgres_server, tmp_path: Path) -> None:
    home = tmp_path / "k2home"
    (home / "cluster").mkdir(parents=True)
    (home / "cluster" / "object-store").symlink_to(object_store.home)
    (home / "cluster" / "postgres").symlink_to(postgres_server.home)
    done = run_k2("cluster", "status", env=k2_env(home))
    out = done.stdout
    assert done.returncode == 3, (out, done.stderr)  # not every service is up: Kafka was never created
    store_env = object_store.env()
    assert "object store + Iceberg REST catalog (SeaweedFS): up" in out
    assert (
        f"weed mini pid {object_store.pid()}, ready: Iceberg REST {store_env['K2_ICEBERG_CATALOG_URI']}, "
        f"S3 {store_env['K2_S3_ENDPOINT']}"
    ) in out
    assert "postgres (Dagster instance storage): up" in out
    assert f"postgres pid {postgres_server.pid()}, ready on 127.0.0.1:{postgres_server.port()}" in out
    assert "kafka: DOWN" in out and f"not created (state would be in {home / 'cluster'})" in out


def _tables(postgres_server, database: str) -> set[str]:
    connection = postgres_server.connect(database)
    try:
        with connection.cursor() as cursor:
            cursor.execute("select tablename from pg_tables where schemaname = 'public'")
            return {row[0] for row in cursor.fetchall()}
    finally:
        connection.close()


def _sqlite_versions(home: Path) -> list[tuple]:
    with sqlite3.connect(home / "dagster" / "history" / "runs.db") as connection:
        return connection.execute("select version_num from alembic_version").fetchall()


def test_k2_instance_migrate_creates_then_keeps_the_instance_on_sqlite_and_on_postgres(
    postgres_server, tmp_path: Path
) -> None:
    database = f"k2_migrate_{os.getpid()}_{free_port()}"  # fresh: the session's `dagster` database is shared
    admin = postgres_server.connect()
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(f'create database "{database}"')
    admin.close()
    assert _tables(postgres_server, database) == set()

    sqlite_home, pg_home = tmp_path / "sqlite", tmp_path / "pg"
    pg_env = k2_env(pg_home, **{**postgres_server.env(), "DAGSTER_POSTGRES_DB": database})
    command = [sys.executable, "-m", "k2_assets.cli", "instance", "migrate", "--config"]
    on_sqlite, on_postgres = (
        subprocess.Popen([*command, str(config)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for config, env in ((EMBEDDED_INSTANCE_CONFIG, k2_env(sqlite_home)), (POSTGRES_INSTANCE_CONFIG, pg_env))
    )
    outputs = on_sqlite.communicate(timeout=300), on_postgres.communicate(timeout=300)
    assert (on_sqlite.returncode, on_postgres.returncode) == (0, 0), outputs
    assert outputs[0][0].strip() == f"Dagster instance created in {sqlite_home / 'dagster'}"
    assert outputs[1][0].strip() == f"Dagster instance ready in {pg_home / 'dagster'}"
    assert (pg_home / "dagster" / "dagster.yaml").read_text() == POSTGRES_INSTANCE_CONFIG.read_text()
    created = _tables(postgres_server, database)
    assert {"runs", "event_logs", "alembic_version", "jobs", "instance_info"} <= created, created
    [sqlite_version] = _sqlite_versions(sqlite_home)

    # A DAGSTER_HOME without an instance file and no --config (at the same time as the next step).
    refusing = subprocess.Popen(
        [*command[:-1]], env=k2_env(tmp_path / "empty"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    # Again, keeping the instance file there (no --config): nothing is recreated or repaired.
    again = run_k2("instance", "migrate", env=k2_env(sqlite_home))
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == f"Dagster instance ready in {sqlite_home / 'dagster'}"
    assert _sqlite_versions(sqlite_home) == [sqlite_version]

    # ... is refused, naming the fix.
    _, refused = refusing.communicate(timeout=300)
    assert refusing.returncode != 0 and "has no dagster.yaml" in refused, refused
