"""`k2 run`: the whole platform on the embedded default, in the foreground.

Order matters: the Dagster instance is created and migrated once, by this process, before
anything else opens it (processes that create a new SQLite instance together corrupt it);
then Kafka starts (or, with K2_KAFKA_BOOTSTRAP set, the named cluster is checked), then the
streamer, the metrics exporter, the Dagster daemon and the webserver. Each service logs to
K2_HOME/logs; one that dies is reported with the last lines of its log and restarted with
backoff, and a stopped embedded broker is started again (k2_assets/cli/supervise.py has the
policy); process ids are in K2_HOME/run/*.pid. Ctrl-C stops all of it, Kafka last.
With ``--cluster`` the variables `k2 cluster start` wrote to K2_HOME/cluster/env.sh are set first
(K2_KAFKA_BOOTSTRAP and the others), so the platform runs on the local cluster instead.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from k2_assets.cli.supervise import Supervisor
from k2_resources.errors import K2Error
from k2_resources.operations.dagster_instance import (
    instance_config_for_environment,
    instance_storage_problem,
    prepare_instance,
)
from k2_resources.paths import PROJECT_ROOT, dagster_home, k2_home
from k2_resources.platform.cluster_env import read_env_file
from k2_resources.platform.kafka_broker import KafkaBroker

LOG_TAIL_LINES = 25


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("run", help="start Kafka and the Dagster UI on 127.0.0.1 (Ctrl-C stops all)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("K2_DAGSTER_PORT", 3000)))
    parser.add_argument("--no-stream", action="store_true", help="do not start the Binance streamer")
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="run on the local cluster of `k2 cluster start` (the variables in K2_HOME/cluster/env.sh)",
    )
    parser.set_defaults(handler=_run)


@dataclass(frozen=True)
class Service:
    """A long-running process of the platform and where its output goes."""

    name: str
    argv: list[str]
    log: Path
    cwd: Path | None = None
    may_finish: bool = False  # exit code 0 means its work is done (a once-only playback), not that it died


def services(args: argparse.Namespace, logs: Path, home: Path) -> list[Service]:
    """The processes `k2 run` starts once the instance and Kafka are ready, in start order."""
    k2 = [sys.executable, "-m", "k2_assets.cli"]
    bin_dir = Path(sys.executable).parent
    workspace = str(PROJECT_ROOT / "workspace.yaml")
    chosen: list[tuple[str, list[str], Path | None]] = []
    if not args.no_stream:
        chosen.append(("binance streamer", k2 + ["stream", "binance"], None))  # K2_STREAM_* env vars set its options
    chosen.append(("metrics exporter", k2 + ["metrics"], None))
    chosen.append(("query api", k2 + ["api"], None))  # 127.0.0.1, port K2_API_PORT (8000)
    # Dagster runs from DAGSTER_HOME so the project's own dagster.yaml is not mistaken for the instance's.
    chosen.append(("dagster daemon", [str(bin_dir / "dagster-daemon"), "run", "-w", workspace], home))
    chosen.append(
        (
            "dagster webserver",
            [str(bin_dir / "dagster-webserver"), "-w", workspace, "-h", "127.0.0.1", "-p", str(args.port)],
            home,
        )
    )
    return [
        Service(name, argv, logs / f"{name.replace(' ', '-')}.log", cwd, may_finish=name == "binance streamer")
        for name, argv, cwd in chosen
    ]


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file ('' when there is none)."""
    try:
        with path.open("r", errors="replace") as handle:
            return "".join(deque(handle, maxlen=lines))
    except FileNotFoundError:
        return ""


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _kafka(env: dict[str, str]) -> KafkaBroker | None:
    """The embedded broker to start, or None when K2_KAFKA_BOOTSTRAP names a cluster (checked here)."""
    external = os.environ.get("K2_KAFKA_BOOTSTRAP")
    if not external:
        return KafkaBroker.default()
    from k2_resources.kafka.resource import KafkaResource

    try:
        KafkaResource(bootstrap_servers=external, request_timeout_ms=10_000).admin().close()
    except K2Error as exc:
        raise K2Error(
            f"{exc}. (`k2 run` uses the cluster in K2_KAFKA_BOOTSTRAP instead of starting its own "
            "broker; unset it to run the embedded one.)"
        ) from exc
    return None


def _watch_instance_storage(home: Path, notices: Path, stop: threading.Event, every_s: float = 5.0) -> None:
    """While `k2 run` runs: when the Dagster instance's storage server (Postgres) stops answering,
    say so once, naming it and the fix, on the terminal and in K2_HOME/logs/platform.log; and
    again when it answers again. The services keep running and recover by themselves."""
    reported: str | None = None
    while not stop.wait(every_s):
        problem = instance_storage_problem(home)
        if problem == reported or (problem is not None and reported is not None):
            continue
        notice = f"{datetime.now(UTC):%Y-%m-%d %H:%M:%S} " + (
            f"the Dagster services cannot reach their storage: {problem}"
            if problem is not None
            else "the Dagster instance's storage answers again"
        )
        print(notice, flush=True)
        with notices.open("a") as log:
            log.write(notice + "\n")
        reported = problem


def _run(args: argparse.Namespace) -> int:
    # `kill`, a closed terminal or a supervisor stop the platform as cleanly as Ctrl-C does.
    # Installed explicitly: a process started in the background inherits SIGINT as ignored.
    signal.signal(signal.SIGINT, _raise_interrupt)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    if args.cluster:
        # The cluster's settings win over the shell's: --cluster asks for that cluster.
        os.environ.update(read_env_file())
    home = dagster_home()
    print(f"K2_HOME={k2_home()}", flush=True)
    print(prepare_instance(home, instance_config_for_environment()).describe(), flush=True)
    env = dict(os.environ, K2_HOME=str(k2_home()), DAGSTER_HOME=str(home))
    # A busy two-core machine can take over Dagster's default 60 s to load the code in a new run.
    env.setdefault("DAGSTER_GRPC_TIMEOUT_SECONDS", "300")
    # The stream sensor runs one long-running follower (commits every second) instead of a run per
    # range: launching a run costs seconds, so runs per range left trades far behind the table. An
    # hour per run: each run ends in a materialisation (k2_resources/sink/follow.py K2_RUN_FOLLOW_SECONDS).
    env.setdefault("K2_STREAM_FOLLOW_SECONDS", "3600")
    broker = _kafka(env)
    logs = k2_home() / "logs"
    logs.mkdir(exist_ok=True)
    supervisor = Supervisor(env, k2_home() / "run", log_tail, broker=broker)
    watching_stopped = threading.Event()
    try:
        if broker is not None:
            print("starting Kafka ...", flush=True)
            broker.start()
            env.setdefault("K2_KAFKA_BOOTSTRAP", broker.bootstrap_servers)
        print(f"Kafka ready on {env['K2_KAFKA_BOOTSTRAP']}", flush=True)
        for service in services(args, logs, home):
            supervisor.start(service)
        print(
            f"Dagster UI on http://127.0.0.1:{args.port} (Ctrl-C stops everything; a service that dies "
            "is restarted with backoff)",
            flush=True,
        )
        threading.Thread(
            target=_watch_instance_storage,
            args=(home, logs / "platform.log", watching_stopped),
            name="instance-storage-watch",
            daemon=True,
        ).start()
        while True:
            supervisor.check()
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave Kafka running
        watching_stopped.set()
        supervisor.stop_all()
        if broker is not None:
            broker.stop()
        print("stopped", flush=True)
