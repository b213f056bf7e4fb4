"""The embedded Apache Kafka broker: single-node KRaft, jars from Maven Central.

`k2 kafka start` resolves the broker's runtime classpath with Maven from
``infra/kafka/pom.xml`` (cached under K2_HOME), formats the KRaft storage once, and runs
``kafka.Kafka`` listening on 127.0.0.1 only. Its log directories and logs stay under
``K2_HOME/kafka`` (or the folder given), so several brokers (one per test run) can coexist.
The same class runs each node of the local 3-broker cluster (k2_resources/platform/kafka_cluster.py): a
node id, the quorum's voters, a shared cluster id and the replication settings are fields.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from k2_resources.errors import KafkaUnavailableError
from k2_resources.paths import PROJECT_ROOT, state_dir
from k2_resources.platform.maven import maven_classpath
from k2_resources.platform.processes import pid_in_file, stop_process

POM = PROJECT_ROOT / "infra" / "kafka" / "pom.xml"
LOG4J_CONFIG = PROJECT_ROOT / "infra" / "kafka" / "log4j2.properties"
DEFAULT_PORT = 9092
DEFAULT_CONTROLLER_PORT = 9093


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _require(tool: str, fix: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise KafkaUnavailableError(f"`{tool}` was not found on PATH; {fix}")
    return path


def new_cluster_id() -> str:
    """A random KRaft cluster id (base64 of a UUID, never starting with '-', which the storage tool
    reads as an option)."""
    cluster_id = "-"
    while cluster_id.startswith("-"):
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    return cluster_id


def resolve_classpath(cached: Path) -> str:
    """The broker's runtime classpath, resolved by Maven from infra/kafka/pom.xml once and cached in ``cached``."""
    return maven_classpath(POM, cached, "the Kafka jars", KafkaUnavailableError)


def _java_major(java: str) -> int:
    out = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    # e.g. openjdk version "17.0.15" 2025-04-15
    for token in out.split():
        token = token.strip('"')
        if token[:1].isdigit():
            major = token.split(".")[0]
            return int(major) if major != "1" else int(token.split(".")[1])
    return 0


@dataclass
class KafkaBroker:
    """One KRaft node (broker and controller in one process) whose state lives in ``home``.

    The defaults make the embedded single-node broker; a cluster node sets ``node_id``,
    ``quorum_voters`` (``id@host:port,...`` of every controller), one ``cluster_id`` shared by all
    nodes, ``replication_factor`` and ``min_insync_replicas``.
    """

    home: Path
    port: int = DEFAULT_PORT
    controller_port: int = DEFAULT_CONTROLLER_PORT
    heap: str = "512m"
    node_id: int = 1
    quorum_voters: str | None = None  # None: this node alone
    cluster_id: str | None = None  # None: a new random id when the storage is formatted
    replication_factor: int = 1  # default for new topics and for Kafka's internal topics
    min_insync_replicas: int = 1
    classpath_cache: Path | None = None  # None: classpath.txt in ``home``
    port_fix: str = "set K2_KAFKA_PORT"  # how a user picks other ports, named when a port is taken
    extra_properties: dict[str, str] = field(default_factory=dict)  # e.g. the cluster's failover timing
    # Security of a secured cluster node (k2_resources/platform/kafka_acls.py): the server.properties
    # entries that replace its PLAINTEXT listeners, ``kafka-storage format`` arguments (its SCRAM
    # credentials) and the kafka-python settings its readiness check connects with.
    security_properties: dict[str, str] = field(default_factory=dict, repr=False)
    format_arguments: tuple[str, ...] = field(default=(), repr=False)
    client_settings: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def default(cls) -> KafkaBroker:
        """The broker of this K2_HOME, ports from K2_KAFKA_PORT / K2_KAFKA_CONTROLLER_PORT."""
        return cls(
            home=state_dir("kafka"),
            port=int(os.environ.get("K2_KAFKA_PORT", DEFAULT_PORT)),
            controller_port=int(os.environ.get("K2_KAFKA_CONTROLLER_PORT", DEFAULT_CONTROLLER_PORT)),
        )

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.home / "broker.pid"

    @property
    def log_file(self) -> Path:
        return self.home / "broker.log"

    @property
    def log_dirs(self) -> Path:
        return self.home / "data"

    # -- set-up -------------------------------------------------------------------------

    def classpath(self) -> str:
        """The broker's runtime classpath, resolved by Maven once and cached beside the state."""
        return resolve_classpath(self.classpath_cache or self.home / "classpath.txt")

    def _properties(self) -> Path:
        props = {
            "process.roles": "broker,controller",
            "node.id": str(self.node_id),
            "controller.quorum.voters": self.quorum_voters or f"{self.node_id}@127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.log_dirs),
            "num.partitions": "1",
            "auto.create.topics.enable": "true",
            "default.replication.factor": str(self.replication_factor),
            "min.insync.replicas": str(self.min_insync_replicas),
            "offsets.topic.replication.factor": str(self.replication_factor),
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": str(self.replication_factor),
            "transaction.state.log.min.isr": str(self.min_insync_replicas),
            "share.coordinator.state.topic.replication.factor": str(self.replication_factor),
            "share.coordinator.state.topic.min.isr": str(self.min_insync_replicas),
            # Consumers join at once; a single-node broker has nobody else to wait for.
            "group.initial.rebalance.delay.ms": "0",
            "log.retention.hours": "168",
        }
        props.update(self.extra_properties)
        path = self.home / "server.properties"
        props.update(self.security_properties)
        path.write_text("".join(f"{key}={value}\n" for key, value in props.items()))
        path.chmod(0o600)  # a secured node's file holds its keystore and SCRAM passwords
        return path

    def _java_command(self, classpath: str, main: str, *args: str) -> list[str]:
        java = _require("java", "install a Java 17+ runtime (Debian: `apt-get install openjdk-17-jre-headless`)")
        if _java_major(java) < 17:
            raise KafkaUnavailableError("Kafka 4 needs Java 17 or newer; install openjdk-17 and put it first on PATH")
        return [
            java,
            f"-Xmx{self.heap}",
            f"-Xms{self.heap}",
            "-XX:+UseG1GC",
            f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
            "-Dkafka.logs.dir=" + str(self.home / "logs"),
            "-cp",
            classpath,
            main,
            *args,
        ]

    def _format_storage(self, classpath: str, properties: Path) -> None:
        if (self.log_dirs / "meta.properties").exists():
            return
        cluster_id = self.cluster_id or new_cluster_id()
        result = subprocess.run(
            self._java_command(
                classpath,
                "kafka.tools.StorageTool",
                "format",
                "-t",
                cluster_id,
                "-c",
                str(properties),
                "--ignore-formatted",
                *self.format_arguments,
            ),
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            output = re.sub(r"password=[^],\s]*", "password=(hidden)", result.stdout + result.stderr)
            raise KafkaUnavailableError(f"formatting Kafka storage in {self.log_dirs} failed:\n{output}")

    # -- life cycle ---------------------------------------------------------------------

    def pid(self) -> int | None:
        """The broker's process id when it is running."""
        return pid_in_file(self.pid_file)

    def is_ready(self, timeout_s: float = 2.0) -> bool:
        """Whether the broker answers a metadata request."""
        from kafka import KafkaAdminClient
        from kafka.errors import KafkaError

        try:
            admin = KafkaAdminClient(
                bootstrap_servers=self.bootstrap_servers,
                request_timeout_ms=int(timeout_s * 1000),
                bootstrap_timeout_ms=int(timeout_s * 1000),
                **self.client_settings,
            )
        except (KafkaError, OSError, ValueError):
            return False
        try:
            admin.describe_cluster()
            return True
        except (KafkaError, OSError):
            return False
        finally:
            admin.close()

    def start(self, timeout_s: float = 90.0) -> None:
        """Start the broker (if it is not running) and return once it answers metadata requests."""
        self.home.mkdir(parents=True, exist_ok=True)
        if self.pid() is not None and self.is_ready():
            return
        classpath = self.classpath()
        properties = self._properties()
        self._format_storage(classpath, properties)
        log = self.log_file.open("ab")
        process = subprocess.Popen(
            self._java_command(classpath, "kafka.Kafka", str(properties)),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in a terminal goes to `k2`, which stops the broker itself
        )
        self.pid_file.write_text(str(process.pid))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                tail = self.log_file.read_text(errors="replace").splitlines()[-20:]
                raise KafkaUnavailableError(
                    f"the Kafka broker exited with code {process.returncode}; is port {self.port} or "
                    f"{self.controller_port} in use ({self.port_fix})? Last log lines:\n" + "\n".join(tail)
                )
            if self.is_ready(timeout_s=1.0):
                return
            time.sleep(0.5)
        self.stop()
        raise KafkaUnavailableError(f"the Kafka broker did not answer within {timeout_s:.0f}s; see {self.log_file}")

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the broker: SIGTERM for a clean shutdown, SIGKILL if it does not finish in time."""
        stop_process(self.pid(), signal.SIGTERM, timeout_s, group=False, poll_s=0.2)
        self.pid_file.unlink(missing_ok=True)

    def kill(self, timeout_s: float = 30.0) -> None:
        """SIGKILL the broker, as a crash would (no clean shutdown), and wait until it is gone."""
        pid = self.pid()
        if pid is None:
            return
        stop_process(pid, signal.SIGKILL, timeout_s, group=False)  # reaps our child, or it stays a zombie
        self.pid_file.unlink(missing_ok=True)

    def status(self) -> str:
        """One line: running and ready, running but not answering, or stopped."""
        pid = self.pid()
        if pid is None:
            return f"stopped (state in {self.home})"
        ready = "ready" if self.is_ready() else "not answering yet"
        return f"running, pid {pid}, {ready} on {self.bootstrap_servers} (state in {self.home})"
