"""`k2 run`: the whole platform on the embedded default, in the foreground.

Starts the Kafka broker and the Dagster UI (webserver and daemon) on 127.0.0.1, plus the
long-running services the graph needs; Ctrl-C stops all of it, Kafka last.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from k2_resources.kafka_broker import KafkaBroker
from k2_resources.settings import PROJECT_ROOT, dagster_home, k2_home

# Extra long-running services other modules contribute: (name, argv) pairs; see services().
SERVICE_COMMANDS: list[tuple[str, list[str]]] = []


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("run", help="start Kafka and the Dagster UI on 127.0.0.1 (Ctrl-C stops all)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("K2_DAGSTER_PORT", 3000)))
    parser.add_argument("--no-stream", action="store_true", help="do not start the Binance streamer")
    parser.set_defaults(handler=_run)


def prepare_dagster_home() -> Path:
    """DAGSTER_HOME with the project's dagster.yaml in it."""
    home = dagster_home()
    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(PROJECT_ROOT / "dagster.yaml", home / "dagster.yaml")
    return home


def services(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """The long-running processes beside Dagster: the streamer and the metrics exporter."""
    k2 = [sys.executable, "-m", "k2_assets.cli"]
    chosen = []
    if not args.no_stream:
        chosen.append(("binance streamer", k2 + ["stream", "binance"]))
    chosen.append(("metrics exporter", k2 + ["metrics"]))
    chosen.extend(SERVICE_COMMANDS)
    return [(name, argv) for name, argv in chosen if _available(argv)]


def _available(argv: list[str]) -> bool:
    from k2_assets.cli import build_parser

    if argv[1:3] != ["-m", "k2_assets.cli"]:
        return True
    try:
        build_parser().parse_args(argv[3:])
        return True
    except SystemExit:
        return False


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _run(args: argparse.Namespace) -> int:
    # `kill`, a closed terminal or a supervisor stop the platform as cleanly as Ctrl-C does.
    # Installed explicitly: a process started in the background inherits SIGINT as ignored.
    signal.signal(signal.SIGINT, _raise_interrupt)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    home = prepare_dagster_home()
    env = dict(os.environ, K2_HOME=str(k2_home()), DAGSTER_HOME=str(home))
    # A busy two-core machine can take over Dagster's default 60 s to load the code in a new run.
    env.setdefault("DAGSTER_GRPC_TIMEOUT_SECONDS", "300")
    broker = KafkaBroker.default()
    print(f"K2_HOME={env['K2_HOME']}")
    print("starting Kafka ...", flush=True)
    processes: list[tuple[str, subprocess.Popen]] = []
    try:
        broker.start()
        env.setdefault("K2_KAFKA_BOOTSTRAP", broker.bootstrap_servers)
        print(f"Kafka ready on {broker.bootstrap_servers}", flush=True)
        logs = k2_home() / "logs"
        logs.mkdir(exist_ok=True)
        bin_dir = Path(sys.executable).parent
        workspace = str(PROJECT_ROOT / "workspace.yaml")
        dagster = [
            ("dagster daemon", [str(bin_dir / "dagster-daemon"), "run", "-w", workspace]),
            ("dagster webserver", [str(bin_dir / "dagster-webserver"), "-w", workspace,
                                   "-h", "127.0.0.1", "-p", str(args.port)]),
        ]
        for name, argv in services(args):
            log = (logs / f"{name.replace(' ', '-')}.log").open("ab")
            processes.append((name, subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                     start_new_session=True)))
            print(f"started {name} (log: {log.name})", flush=True)
        for name, argv in dagster:
            # Run from DAGSTER_HOME so the project's own dagster.yaml is not mistaken for the instance's.
            processes.append((name, subprocess.Popen(argv, env=env, cwd=home, start_new_session=True)))
        print(f"Dagster UI on http://127.0.0.1:{args.port} (Ctrl-C stops everything)", flush=True)
        while all(process.poll() is None for _, process in processes):
            time.sleep(0.5)
        for name, process in processes:
            if process.poll() is not None:
                print(f"{name} exited with code {process.returncode}; stopping the rest", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave Kafka running
        for _, process in reversed(processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for name, process in reversed(processes):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        broker.stop()
        print("stopped", flush=True)
