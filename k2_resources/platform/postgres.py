"""Postgres of the local topology (`k2 cluster`), holding the Dagster instance's database.

Debian's server binaries, a cluster initialised under ``K2_HOME/cluster/postgres`` with a
generated password, database ``dagster`` for the Dagster instance (dagster-postgres, the instance
file ``infra/dagster/dagster.postgres.yaml``). initdb and postgres refuse to run as root, so as
root they run as the ``postgres`` user (created by Debian's package) or ``nobody``. It listens
on 127.0.0.1 only, on a port chosen free at first start and kept in its ``state.json``.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg2
from psycopg2 import sql

from k2_resources.platform.cluster_env import cluster_home
from k2_resources.platform.errors import ClusterServiceError
from k2_resources.platform.kafka_broker import free_port
from k2_resources.platform.local_server import LocalServer, log_tail, read_json, write_private
from k2_resources.platform.processes import stop_process

POSTGRES_USER = "k2"
DAGSTER_DATABASE = "dagster"


def postgres_bin_dir() -> Path:
    """Debian's server binaries (/usr/lib/postgresql/<newest>/bin), else the folder of ``initdb`` on PATH."""
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if versions:
        return versions[-1].parent
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    raise ClusterServiceError(
        "PostgreSQL's server binaries (initdb, postgres) were not found; install them "
        "(Debian: `apt-get install postgresql`) and try again"
    )


def _service_user() -> str | None:
    """The user postgres runs as: None (this one) unless this is root, which postgres refuses."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise ClusterServiceError(
        "running as root, and neither a `postgres` nor a `nobody` user exists for "
        "PostgreSQL to run as (it refuses root); create one, e.g. `useradd postgres`"
    )


@dataclass
class Postgres(LocalServer):
    """A PostgreSQL cluster in ``home``/data, on 127.0.0.1, holding the Dagster database."""

    program = "postgres"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def log_file(self) -> Path:
        return self.home / "postgres.log"

    def port(self) -> int:
        """The port: K2_CLUSTER_POSTGRES_PORT, else chosen free once and kept in the state file."""
        port = self._state().get("port")
        if not port:
            port = int(os.environ.get("K2_CLUSTER_POSTGRES_PORT") or free_port())
            self._save(port=port)
        return int(port)

    def password(self) -> str:
        found = read_json(self.credentials_file).get("password")
        if not found:
            found = secrets.token_urlsafe(24)
            write_private(self.credentials_file, {"user": POSTGRES_USER, "password": found})
        return found

    def env(self) -> dict[str, str]:
        """The variables the Dagster instance file (infra/dagster/dagster.postgres.yaml) reads."""
        return {
            "DAGSTER_POSTGRES_HOST": "127.0.0.1",
            "DAGSTER_POSTGRES_PORT": str(self.port()),
            "DAGSTER_POSTGRES_USER": POSTGRES_USER,
            "DAGSTER_POSTGRES_PASSWORD": self.password(),
            "DAGSTER_POSTGRES_DB": DAGSTER_DATABASE,
        }

    def connect(self, database: str = "postgres", timeout_s: int = 2):
        return psycopg2.connect(
            host="127.0.0.1",
            port=self.port(),
            user=POSTGRES_USER,
            password=self.password(),
            dbname=database,
            connect_timeout=timeout_s,
        )

    def is_ready(self) -> bool:
        try:
            self.connect(timeout_s=1).close()
            return True
        except psycopg2.OperationalError:
            return False

    def _as_service_user(self, user: str | None) -> dict:
        """Popen arguments that run a command as ``user`` (None: as this process)."""
        return {} if user is None else {"user": user, "group": pwd.getpwnam(user).pw_gid, "extra_groups": []}

    def _check_reachable(self, user: str | None) -> None:
        if user is None:
            return
        entry = pwd.getpwnam(user)
        for folder in [self.home, *self.home.parents]:
            mode = folder.stat()
            if mode.st_uid != entry.pw_uid and not mode.st_mode & 0o001:
                raise ClusterServiceError(
                    f"PostgreSQL runs as `{user}` (it refuses root), and {folder} (mode {oct(mode.st_mode & 0o777)}) "
                    f"does not let that user reach {self.home}; use a K2_HOME whose parent folders others may "
                    f"enter (`chmod o+x {folder}`), or run K2 as an ordinary user"
                )

    def _initdb(self, bin_dir: Path, user: str | None) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        password_file = self.home / "initdb.pw"
        password_file.write_text(self.password() + "\n")
        try:
            if user is not None:
                entry = pwd.getpwnam(user)
                for path in (self.data_dir, password_file):
                    os.chown(path, entry.pw_uid, entry.pw_gid)
            self.data_dir.chmod(0o700)
            result = subprocess.run(
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    POSTGRES_USER,
                    f"--pwfile={password_file}",
                    "--auth=scram-sha-256",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                ],
                capture_output=True,
                text=True,
                cwd="/",
                **self._as_service_user(user),
            )
        finally:
            password_file.unlink(missing_ok=True)
        if result.returncode != 0:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            raise ClusterServiceError(f"initdb failed in {self.data_dir}:\n{result.stdout}{result.stderr}")

    def start(self, timeout_s: float = 60.0) -> dict[str, str]:
        """Initialise (first time), start postgres unless it runs, create database ``dagster``; returns :meth:`env`."""
        if self.pid() is not None and self.is_ready():
            return self.env()
        bin_dir, user = postgres_bin_dir(), _service_user()
        self.home.mkdir(parents=True, exist_ok=True)
        self._check_reachable(user)
        self._initdb(bin_dir, user)
        port = self.port()
        log = self.log_file.open("ab")
        if user is not None:
            entry = pwd.getpwnam(user)
            os.chown(self.log_file, entry.pw_uid, entry.pw_gid)
        process = subprocess.Popen(
            [
                str(bin_dir / "postgres"),
                "-D",
                str(self.data_dir),
                "-p",
                str(port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "unix_socket_directories=",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd="/",
            start_new_session=True,
            **self._as_service_user(user),
        )
        log.close()
        self._save(pid=process.pid)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ClusterServiceError(
                    f"PostgreSQL exited with code {process.returncode}; is port {port} in use (delete "
                    f"{self.state_file} to choose another, or set K2_CLUSTER_POSTGRES_PORT)? Last log lines:\n"
                    + log_tail(self.log_file)
                )
            if self.is_ready():
                self._create_database()
                return self.env()
            time.sleep(0.2)
        self.stop()
        raise ClusterServiceError(
            f"PostgreSQL did not answer on 127.0.0.1:{port} within {timeout_s:.0f}s; see {self.log_file}"
        )

    def _create_database(self) -> None:
        connection = self.connect()
        try:
            connection.autocommit = True  # CREATE DATABASE cannot run in a transaction
            with connection.cursor() as cursor:
                cursor.execute("select 1 from pg_database where datname = %s", (DAGSTER_DATABASE,))
                if cursor.fetchone() is None:
                    cursor.execute(sql.SQL("create database {}").format(sql.Identifier(DAGSTER_DATABASE)))
        finally:
            connection.close()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Fast shutdown (SIGINT: open sessions are ended, nothing committed is lost); SIGKILL after ``timeout_s``."""
        stop_process(self.pid(), signal.SIGINT, timeout_s)
        self._save(pid=None)

    def status(self) -> tuple[bool, list[str]]:
        pid = self.pid()
        if pid is None:
            return False, [f"stopped (data in {self.data_dir})"]
        ready = self.is_ready()
        return ready, [
            f"postgres pid {pid}, {'ready' if ready else 'not answering'} on 127.0.0.1:{self.port()}, "
            f"database {DAGSTER_DATABASE} (data in {self.data_dir})"
        ]


def postgres(home: Path | None = None) -> Postgres:
    return Postgres((home or cluster_home()) / "postgres")


def start_postgres(home: Path | None = None) -> dict[str, str]:
    """Start Postgres under ``home`` (default K2_HOME/cluster) with database ``dagster``; the
    DAGSTER_POSTGRES_* variables."""
    return postgres(home).start()


def stop_postgres(home: Path | None = None) -> None:
    postgres(home).stop()


def postgres_status(home: Path | None = None) -> tuple[bool, list[str]]:
    return postgres(home).status()
