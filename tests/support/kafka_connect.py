"""Apache Iceberg's Kafka Connect sink, run by a standalone Kafka Connect worker: the peer K2's sink
is measured against (tests/benchmarks/bench_peer.py). Test support only; K2 never runs it.

The jars come from Maven Central through ``infra/kafka-connect/pom.xml`` (resolved once, the
classpath cached in the worker's folder, as the broker launcher does). The sink writes through
Iceberg's JdbcCatalog into the SQLite database of a pyiceberg SqlCatalog, under the same catalog
name, so pyiceberg sees each of its commits.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

from k2_resources.kafka.security import SINK, client_security
from k2_resources.paths import PROJECT_ROOT
from k2_resources.platform.kafka_broker import free_port
from k2_resources.platform.maven import maven_classpath

POM = PROJECT_ROOT / "infra" / "kafka-connect" / "pom.xml"
LOG4J_CONFIG = PROJECT_ROOT / "infra" / "kafka-connect" / "log4j2.properties"
CONNECTOR_CLASS = "org.apache.iceberg.connect.IcebergSinkConnector"


class PeerUnavailableError(RuntimeError):
    """The Kafka Connect peer cannot be set up or started here; the message says why."""


def _pom_property(name: str) -> str:
    text = POM.read_text()
    start = text.index(f"<{name}>") + len(name) + 2
    return text[start : text.index(f"</{name}>", start)]


def versions() -> dict[str, str]:
    """The versions the pom pins: Kafka Connect, the Iceberg sink, Hadoop (Configuration only), sqlite-jdbc."""
    return {name: _pom_property(f"{name}.version") for name in ("kafka", "iceberg", "hadoop", "sqlite-jdbc")}


def connect_classpath(cache_dir: Path) -> str:
    """The worker's runtime classpath, resolved by Maven once and cached in ``cache_dir``."""
    cached = cache_dir / "connect-classpath.txt"
    return maven_classpath(POM, cached, "the Kafka Connect / Iceberg sink jars", PeerUnavailableError)


@dataclass
class IcebergConnectSink:
    """One standalone Kafka Connect worker running the Iceberg sink on ``topic`` (one task)."""

    home: Path
    bootstrap_servers: str
    topic: str
    table: str
    catalog_name: str
    catalog_db: Path
    warehouse: Path
    commit_interval_ms: int = 1000
    heap: str = "1g"
    rest_port: int = field(default_factory=free_port)
    _process: subprocess.Popen | None = field(default=None, init=False, repr=False)

    @property
    def log_file(self) -> Path:
        return self.home / "connect.log"

    @property
    def control_topic(self) -> str:
        return f"{self.topic}-iceberg-control"

    def _write_properties(self, name: str, values: dict[str, str]) -> Path:
        path = self.home / name
        path.write_text("".join(f"{key}={value}\n" for key, value in values.items()))
        path.chmod(0o600)  # on a secured cluster it holds a SCRAM password
        return path

    @staticmethod
    def _security(*prefixes: str) -> dict[str, str]:
        """The sink role's Kafka client settings (k2_resources/kafka/security.py) under each prefix;
        nothing on a PLAINTEXT cluster."""
        settings = client_security(SINK).java_properties()
        return {f"{prefix}{key}": value for prefix in prefixes for key, value in settings.items()}

    def _worker_properties(self) -> Path:
        return self._write_properties(
            "worker.properties",
            {
                "bootstrap.servers": self.bootstrap_servers,
                "key.converter": "org.apache.kafka.connect.storage.StringConverter",
                "value.converter": "org.apache.kafka.connect.json.JsonConverter",
                "value.converter.schemas.enable": "false",
                "offset.storage.file.filename": str(self.home / "connect.offsets"),
                "listeners": f"http://127.0.0.1:{self.rest_port}",
                "plugin.discovery": "service_load",  # plugins found by their service manifests, no scan
                # The sink answers the coordinator only inside put(); with Connect's default 60 s flush
                # interval an idle consumer blocks in poll() that long and commits time out (30 s).
                "offset.flush.interval.ms": str(self.commit_interval_ms),
                **self._security("", "consumer.", "producer.", "admin."),
            },
        )

    def _connector_properties(self) -> Path:
        return self._write_properties(
            "iceberg-sink.properties",
            {
                "name": "k2-peer-iceberg-sink",
                "connector.class": CONNECTOR_CLASS,
                "tasks.max": "1",
                "topics": self.topic,
                "iceberg.tables": self.table,
                "iceberg.tables.auto-create-enabled": "false",
                "iceberg.catalog": self.catalog_name,
                "iceberg.catalog.catalog-impl": "org.apache.iceberg.jdbc.JdbcCatalog",
                "iceberg.catalog.uri": f"jdbc:sqlite:{self.catalog_db}",
                "iceberg.catalog.jdbc.schema-version": "V1",  # the iceberg_type column pyiceberg's SqlCatalog has
                # sqlite-jdbc waits this long for a lock (pyiceberg polls the same database) instead of
                # failing the commit with SQLITE_BUSY.
                "iceberg.catalog.jdbc.busy_timeout": "30000",
                "iceberg.catalog.warehouse": f"file://{self.warehouse}",
                "iceberg.control.topic": self.control_topic,
                "iceberg.control.commit.interval-ms": str(self.commit_interval_ms),
                **self._security("iceberg.kafka."),
            },
        )

    def start(self) -> float:
        """Start the worker (returns at once); the monotonic time it was launched at."""
        java = shutil.which("java")
        if java is None:
            raise PeerUnavailableError(
                "`java` was not found on PATH; install a Java 17+ runtime "
                "(Debian: `apt-get install openjdk-17-jre-headless`)"
            )
        self.home.mkdir(parents=True, exist_ok=True)
        classpath = connect_classpath(self.home.parent)
        # WAL: pyiceberg reading the catalog (the benchmark polls it) never blocks the sink's
        # commits. Without it a commit once failed with SQLITE_BUSY and the sink stalled.
        with closing(sqlite3.connect(self.catalog_db)) as database:
            database.execute("PRAGMA journal_mode=WAL")
        worker, connector = self._worker_properties(), self._connector_properties()
        log = self.log_file.open("ab")
        launched = time.monotonic()
        self._process = subprocess.Popen(
            [
                java,
                f"-Xmx{self.heap}",
                "-XX:+UseG1GC",
                f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
                "-cp",
                classpath,
                "org.apache.kafka.connect.cli.ConnectStandalone",
                str(worker),
                str(connector),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        return launched

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_file.exists():
            return ""
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    def errors(self) -> list[str]:
        """ERROR lines the worker logged (a failed task keeps the worker alive, so its log tells)."""
        if not self.log_file.exists():
            return []
        return [line for line in self.log_file.read_text(errors="replace").splitlines() if "] ERROR " in line]

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM (Connect shuts down cleanly), SIGKILL if it has not exited in time."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
