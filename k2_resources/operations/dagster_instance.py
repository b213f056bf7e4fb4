"""The Dagster instance K2 runs on: created and migrated once, before any service opens it.

Every Dagster process (webserver, daemon, code server, runs, the metrics exporter) creates
the SQLite storage of a new instance if it finds none. Started together on a fresh
``DAGSTER_HOME`` they race: two of them create the same tables and both stamp alembic's
version table, which leaves it with two heads, and every later start fails with "more than
one head present". So ``k2 run`` (and anything else that starts several processes on one
instance) calls :func:`prepare_instance` first and starts the services only after it.

An instance already broken that way is repaired when it holds no run history (its storage is
recreated); otherwise :func:`prepare_instance` stops with a message naming the folder and the fix.
"""

from __future__ import annotations

import io
import os
import shutil
import sqlite3
from contextlib import closing, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2
import yaml

from k2_resources.errors import K2Error
from k2_resources.operations.errors import BrokenInstanceError
from k2_resources.paths import PROJECT_ROOT

EMBEDDED_INSTANCE_CONFIG = PROJECT_ROOT / "dagster.yaml"
POSTGRES_INSTANCE_CONFIG = PROJECT_ROOT / "infra" / "dagster" / "dagster.postgres.yaml"


def instance_config_for_environment() -> Path:
    """The instance file the environment asks for: Postgres storage when ``DAGSTER_POSTGRES_HOST``
    is set (as `k2 cluster start` writes it to env.sh), else the embedded SQLite one."""
    return POSTGRES_INSTANCE_CONFIG if os.environ.get("DAGSTER_POSTGRES_HOST") else EMBEDDED_INSTANCE_CONFIG


# The SQLite databases of Dagster's default storage, relative to DAGSTER_HOME, and the folders
# that hold them (with the per-run event-log shards beside the index).
_SQLITE_DATABASES = ("history/runs.db", "history/runs/index.db", "schedules/schedules.db")
_SQLITE_FOLDERS = ("history", "schedules", "storage")


@dataclass(frozen=True)
class InstanceReport:
    """What :func:`prepare_instance` found and did."""

    home: Path
    created: bool
    repaired: tuple[str, ...] = field(default=())

    def describe(self) -> str:
        state = "created" if self.created else "ready"
        if self.repaired:
            state = f"repaired ({'; '.join(self.repaired)}) and recreated"
        return f"Dagster instance {state} in {self.home}"


def broken_databases(home: Path) -> dict[str, list[str]]:
    """The instance's SQLite databases whose alembic version table does not hold exactly one
    revision, with the revisions it holds (several heads: created by two processes at once)."""
    found: dict[str, list[str]] = {}
    for relative in _SQLITE_DATABASES:
        path = home / relative
        if not path.exists():
            continue
        with _read_only(path) as connection:
            if not _has_table(connection, "alembic_version"):
                continue
            revisions = [row[0] for row in connection.execute("select version_num from alembic_version")]
        if len(revisions) > 1:
            found[relative] = revisions
    return found


def recorded_runs(home: Path) -> int:
    """How many runs the instance's SQLite run storage holds (0 when it has none yet)."""
    path = home / "history" / "runs.db"
    if not path.exists():
        return 0
    with _read_only(path) as connection:
        if not _has_table(connection, "runs"):
            return 0
        return int(connection.execute("select count(*) from runs").fetchone()[0])


def prepare_instance(
    home: Path, config: Path | None = EMBEDDED_INSTANCE_CONFIG, *, migrate: bool = True
) -> InstanceReport:
    """Make ``home`` a ready Dagster instance: its ``dagster.yaml`` from ``config`` (None: keep the
    one there), a broken SQLite storage repaired when that loses no run history, then every
    storage created (or migrated) by this one process. Call it before starting any service."""
    home.mkdir(parents=True, exist_ok=True)
    if config is not None:
        shutil.copyfile(config, home / "dagster.yaml")
    elif not (home / "dagster.yaml").exists():
        raise K2Error(f"{home} has no dagster.yaml; copy {EMBEDDED_INSTANCE_CONFIG} there or pass a config")
    postgres = postgres_settings(home)
    if postgres is not None:
        _check_postgres_answers(home, postgres)
        _open_every_storage(home, migrate=migrate)
        return InstanceReport(home=home, created=False)
    repaired = _repair_if_broken(home)
    created = not any((home / relative).exists() for relative in _SQLITE_DATABASES)
    _open_every_storage(home, migrate=migrate)
    return InstanceReport(home=home, created=created and not repaired, repaired=repaired)


def postgres_settings(home: Path) -> dict[str, str] | None:
    """The Postgres connection of the instance in ``home`` (its dagster.yaml's ``storage.postgres.postgres_db``,
    ``env:`` entries resolved, with the variable each came from under ``<key>_from``); None for other storage."""
    try:
        config = yaml.safe_load((home / "dagster.yaml").read_text()) or {}
    except FileNotFoundError:
        return None
    database = ((config.get("storage") or {}).get("postgres") or {}).get("postgres_db")
    if not isinstance(database, dict):
        return None
    settings: dict[str, str] = {}
    for key in ("hostname", "port", "username", "password", "db_name"):
        value = database.get(key, "5432" if key == "port" else "")
        if isinstance(value, dict) and "env" in value:
            settings[f"{key}_from"] = value["env"]
            value = os.environ.get(value["env"], "")
        settings[key] = str(value)
    return settings


def instance_storage_problem(home: Path) -> str | None:
    """Why the instance in ``home`` cannot reach its storage, naming it and the fix; None when it
    can, or when its storage is not a server (SQLite). `k2 run` watches this while it runs:
    Dagster's own "Retrying failed database connection" names neither the variables nor the fix."""
    settings = postgres_settings(home)
    if settings is None:
        return None
    try:
        _check_postgres_answers(home, settings)
    except K2Error as exc:
        return str(exc)
    return None


def _check_postgres_answers(home: Path, settings: dict[str, str]) -> None:
    """One quick connection to the instance's Postgres, so that a server that is down (or a variable
    that is not set) is one clear error instead of dagster-postgres' retries ending in "too many retries"."""
    where = f"{settings['hostname'] or '?'}:{settings['port'] or '?'}, database {settings['db_name'] or '?'}"
    variables = ", ".join(
        settings[k]
        for k in ("hostname_from", "port_from", "username_from", "password_from", "db_name_from")
        if k in settings
    )
    missing = [
        settings[f"{k}_from"]
        for k in ("hostname", "username", "db_name")
        if f"{k}_from" in settings and not settings[k]
    ]
    fix = (
        "Fix: start it (`k2 cluster start` runs one under K2_HOME/cluster) or point "
        f"{variables or home / 'dagster.yaml'} at a running server"
    )
    if missing:
        raise K2Error(
            f"the Dagster instance in {home} keeps its storage in Postgres, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set. {fix}"
        )
    try:
        psycopg2.connect(
            host=settings["hostname"],
            port=settings["port"],
            user=settings["username"],
            password=settings["password"],
            dbname=settings["db_name"],
            connect_timeout=3,
        ).close()
    except psycopg2.OperationalError as exc:
        reason = " ".join(str(exc).split())
        raise K2Error(f"the Dagster instance's Postgres at {where} does not answer ({reason}). {fix}") from exc


def _repair_if_broken(home: Path) -> tuple[str, ...]:
    broken = broken_databases(home)
    if not broken:
        return ()
    details = [f"{name} records {len(revs)} schema versions ({', '.join(revs)})" for name, revs in broken.items()]
    runs = recorded_runs(home)
    if runs:
        raise BrokenInstanceError(
            f"the Dagster instance in {home} is broken: {'; '.join(details)} (several processes created it at "
            f"once). It holds {runs} run(s), so K2 will not recreate it. Fix: move it aside and start again, "
            f"`mv {home} {home}.broken` (its run history stays in the moved folder), or delete it to start over."
        )
    for folder in _SQLITE_FOLDERS:
        shutil.rmtree(home / folder, ignore_errors=True)
    return tuple(details)


def _open_every_storage(home: Path, *, migrate: bool) -> None:
    # Imported here: dagster takes seconds to import and callers such as `k2 --help` must not pay it.
    from dagster import DagsterInstance

    try:
        with DagsterInstance.from_config(str(home)) as instance:
            # Touch each storage so each creates its tables now, in this process alone.
            instance.get_runs_count()
            instance.get_daemon_heartbeats()
            list(instance.all_instigator_state())
            instance.event_log_storage.get_asset_records()
            if migrate:
                with redirect_stdout(io.StringIO()):  # upgrade() prints per-storage progress lines
                    instance.upgrade()
    except Exception as exc:  # a storage that cannot open or migrate: say where and what to do
        raise K2Error(
            f"could not create or migrate the Dagster instance in {home}: {type(exc).__name__}: {exc}. "
            f"Fix: check the storage settings in {home / 'dagster.yaml'}; for the embedded default, "
            f"move {home} aside and start again"
        ) from exc


def _has_table(connection: sqlite3.Connection, name: str) -> bool:
    row = connection.execute("select 1 from sqlite_master where type = 'table' and name = ?", (name,)).fetchone()
    return row is not None


def _read_only(path: Path) -> closing[sqlite3.Connection]:
    """A read-only connection closed on exit (sqlite3's own context manager only commits)."""
    return closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30))
