"""Starting `k2 run` (what `make run` calls) as a user does, and asking whether it is up."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from k2_resources.platform.kafka_broker import free_port
from tests.support.waiting import wait_for

DAEMON_HEALTH_QUERY = "{ instance { daemonHealth { allDaemonStatuses { daemonType healthy required } } } }"


def answers(url: str, timeout_s: float = 5.0) -> bool:
    """True when ``url`` answers 200."""
    try:
        return urllib.request.urlopen(url, timeout=timeout_s).status == 200
    except OSError:
        return False


@dataclass
class K2Run:
    """One `k2 run` process on its own K2_HOME and free ports."""

    home: Path
    process: subprocess.Popen
    log_path: Path
    ui_port: int
    exporter_port: int
    _log: object = field(repr=False, default=None)
    api_port: int = 0

    @property
    def ui(self) -> str:
        return f"http://127.0.0.1:{self.ui_port}"

    @property
    def api(self) -> str:
        """The query API `k2 run` serves (port K2_API_PORT)."""
        return f"http://127.0.0.1:{self.api_port}"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def daemon_statuses(self) -> dict[str, bool]:
        """Each required daemon's health as the webserver reports it (from the daemon's heartbeats)."""
        request = urllib.request.Request(
            f"{self.ui}/graphql",
            data=json.dumps({"query": DAEMON_HEALTH_QUERY}).encode(),
            headers={"Content-Type": "application/json"},
        )
        body = json.loads(urllib.request.urlopen(request, timeout=10).read())
        statuses = body["data"]["instance"]["daemonHealth"]["allDaemonStatuses"]
        return {status["daemonType"]: bool(status["healthy"]) for status in statuses if status["required"]}

    def wait_until_up(self, timeout_s: float = 300.0) -> None:
        """The webserver answers, every required daemon heartbeats and the exporter serves /metrics;
        fails at once (with the output) if `k2 run` exits instead."""

        def up_or_exited(check) -> bool:
            return self.process.poll() is not None or check()

        for what, check in (
            ("the Dagster webserver", lambda: answers(f"{self.ui}/server_info")),
            ("the daemon's heartbeats", lambda: (s := self.daemon_statuses()) and all(s.values())),
            ("k2 metrics", lambda: answers(f"http://127.0.0.1:{self.exporter_port}/metrics")),
        ):
            wait_for(lambda probe=check: up_or_exited(probe), timeout_s=timeout_s, what=what, interval_s=0.5)
            assert self.process.poll() is None, f"k2 run exited waiting for {what}:\n{self.output()[-4000:]}"

    def stop(self, timeout_s: float = 180.0) -> int:
        """Ctrl-C (SIGINT), then wait; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout=timeout_s)
        finally:
            if self._log is not None:
                self._log.close()


def start_k2_run(
    home: Path,
    log_path: Path,
    *,
    kafka_bootstrap: str | None = None,
    extra_args: tuple[str, ...] = (),
    kafka_ports: tuple[int, int] | None = None,
    stream: dict[str, str] | None = None,
    env_settings: dict[str, str] | None = None,
) -> K2Run:
    """`python -m k2_assets.cli run` on ``home``: with ``kafka_bootstrap`` it uses that broker, else it
    starts its own embedded one on ``kafka_ports`` (or free ports).

    Without ``stream`` it runs with ``--no-stream``; with it, the Binance streamer runs too and
    ``stream`` holds its settings as K2_STREAM_* environment variables (e.g. ``{"K2_STREAM_ONCE": "1"}``).
    ``env_settings``: more environment variables for `k2 run` and its services (e.g. K2_API_KEY).
    """
    ui_port, exporter_port, api_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("K2_KAFKA_BOOTSTRAP", "DAGSTER_HOME")}
    # The query API gets a free port too: a fixed 8000 would clash with another k2 run on the machine.
    env.update(K2_HOME=str(home), K2_EXPORTER_PORT=str(exporter_port), K2_API_PORT=str(api_port), **(stream or {}))
    env.update(env_settings or {})
    if kafka_bootstrap:
        env["K2_KAFKA_BOOTSTRAP"] = kafka_bootstrap
    else:
        kafka_port, controller_port = kafka_ports or (free_port(), free_port())
        env.update(K2_KAFKA_PORT=str(kafka_port), K2_KAFKA_CONTROLLER_PORT=str(controller_port))
    log = log_path.open("w")  # a file, not a pipe: nobody reads a pipe while the UI starts
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "k2_assets.cli",
            "run",
            "--port",
            str(ui_port),
            *(() if stream is not None else ("--no-stream",)),
            *extra_args,
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return K2Run(
        home=home,
        process=process,
        log_path=log_path,
        ui_port=ui_port,
        exporter_port=exporter_port,
        _log=log,
        api_port=api_port,
    )


def _spin(deadline: float) -> None:
    while time.monotonic() < deadline:
        pass


class BusyCpus:
    """A bounded load generator: one spinning process per CPU for at most ``seconds``, stopped on exit."""

    def __init__(self, seconds: float, processes: int | None = None) -> None:
        self.seconds = seconds
        self.count = processes or os.cpu_count() or 2
        self.workers: list[multiprocessing.Process] = []

    def __enter__(self) -> BusyCpus:
        deadline = time.monotonic() + self.seconds
        context = multiprocessing.get_context("spawn")
        self.workers = [context.Process(target=_spin, args=(deadline,), daemon=True) for _ in range(self.count)]
        for worker in self.workers:
            worker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for worker in self.workers:
            worker.terminate()
        for worker in self.workers:
            worker.join(timeout=10)
