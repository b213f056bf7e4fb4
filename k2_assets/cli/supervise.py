"""Supervision for `k2 run`: services that die are restarted with backoff, the embedded broker too.

Policy (also in docs/operations.md):

- A service (streamer, exporter, daemon, webserver) that exits is logged with its exit code and
  the last lines of its log, then started again after a backoff that doubles from
  ``initial_backoff_s`` (1 s) up to ``max_backoff_s`` (60 s). A service that stays up for
  ``flap_window_s`` (60 s) starts again from the initial backoff next time. The rest of the
  platform keeps running.
- A service that exits ``flap_limit`` (5) times within ``flap_window_s`` is reported as crash
  looping, once, with the fix (read its log); it is still retried, at the longest backoff, so
  the platform heals itself when the cause goes away.
- A service marked ``may_finish`` that exits with code 0 (a once-only playback) is done, not dead.
- The embedded Kafka broker, when it stops (killed, crashed or `k2 kafka stop`), is started
  again on the same state and ports; when that fails, `k2 run` says so with the command to
  start it by hand, and tries again with the same backoff.
- Each running service's process id is in ``K2_HOME/run/<service>.pid`` (the broker's in
  ``K2_HOME/kafka/broker.pid``), for operators and tests.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from k2_resources.errors import K2Error
from k2_resources.platform.kafka_broker import KafkaBroker
from k2_resources.platform.processes import reaped, stop_children

INITIAL_BACKOFF_S = 1.0
MAX_BACKOFF_S = 60.0
FLAP_LIMIT = 5
FLAP_WINDOW_S = 60.0


class ServiceSpec(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def argv(self) -> list[str]: ...
    @property
    def log(self) -> Path: ...
    @property
    def cwd(self) -> Path | None: ...
    @property
    def may_finish(self) -> bool: ...


@dataclass
class Supervised:
    """One service and its current process, exits and restart schedule."""

    service: ServiceSpec
    process: subprocess.Popen | None = None
    exits: deque = field(default_factory=lambda: deque(maxlen=64))  # monotonic times of exits
    restart_at: float | None = None
    failures_in_a_row: int = 0
    started_at: float = 0.0
    restarts: int = 0
    reported_crash_loop: bool = False
    done: bool = False


def backoff_s(failures_in_a_row: int, initial_s: float = INITIAL_BACKOFF_S, max_s: float = MAX_BACKOFF_S) -> float:
    """1, 2, 4, ... seconds, at most ``max_s``."""
    return min(initial_s * 2 ** max(failures_in_a_row - 1, 0), max_s)


def pid_path(run_dir: Path, name: str) -> Path:
    return run_dir / f"{name.replace(' ', '-')}.pid"


class Supervisor:
    """Starts services, watches them and the broker, restarts what dies (see the module docstring)."""

    def __init__(
        self,
        env: dict[str, str],
        run_dir: Path,
        log_tail: Callable[[Path], str],
        *,
        broker: KafkaBroker | None = None,
        initial_backoff_s: float = INITIAL_BACKOFF_S,
        max_backoff_s: float = MAX_BACKOFF_S,
        flap_limit: int = FLAP_LIMIT,
        flap_window_s: float = FLAP_WINDOW_S,
    ) -> None:
        self.env = env
        self.run_dir = run_dir
        self.log_tail = log_tail
        self.broker = broker
        self.initial_backoff_s, self.max_backoff_s = initial_backoff_s, max_backoff_s
        self.flap_limit, self.flap_window_s = flap_limit, flap_window_s
        self.services: list[Supervised] = []
        self._broker_failures = 0
        self._broker_retry_at = 0.0
        run_dir.mkdir(parents=True, exist_ok=True)

    # -- services -------------------------------------------------------------------------

    def start(self, service: ServiceSpec) -> Supervised:
        entry = Supervised(service)
        self.services.append(entry)
        process = self._launch(entry)
        print(f"started {service.name} (log: {service.log}, pid {process.pid})", flush=True)
        return entry

    def _launch(self, entry: Supervised) -> subprocess.Popen:
        service = entry.service
        with service.log.open("ab") as log:  # the child keeps its own copy of the descriptor
            entry.process = subprocess.Popen(
                service.argv,
                env=self.env,
                cwd=service.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        entry.started_at = time.monotonic()
        entry.restart_at = None
        pid_path(self.run_dir, service.name).write_text(f"{entry.process.pid}\n")
        return entry.process

    def check(self) -> None:
        """One pass: notice exits, schedule restarts, start what is due, look after the broker."""
        self.check_broker()
        now = time.monotonic()
        for entry in self.services:
            if entry.done:
                continue
            if entry.process is not None and entry.process.poll() is not None:
                self._exited(entry, now)
            if entry.process is None and entry.restart_at is not None and now >= entry.restart_at:
                entry.restarts += 1
                process = self._launch(entry)
                print(f"restarted {entry.service.name} (restart {entry.restarts}, pid {process.pid})", flush=True)

    def _exited(self, entry: Supervised, now: float) -> None:
        assert entry.process is not None  # called for a process that has exited
        service, code = entry.service, entry.process.returncode
        pid_path(self.run_dir, service.name).unlink(missing_ok=True)
        entry.process = None
        if service.may_finish and code == 0:
            entry.done = True
            print(f"{service.name} finished (exit code 0); the rest keeps running", flush=True)
            return
        entry.exits.append(now)
        stayed_up = now - entry.started_at >= self.flap_window_s
        entry.failures_in_a_row = 1 if stayed_up else entry.failures_in_a_row + 1
        delay = backoff_s(entry.failures_in_a_row, self.initial_backoff_s, self.max_backoff_s)
        recent = sum(1 for at in entry.exits if now - at <= self.flap_window_s)
        print(
            f"{service.name} exited with code {code}; the last lines of {service.log}:\n"
            f"{self.log_tail(service.log)}\nrestarting {service.name} in {delay:.0f} s "
            f"(exit {recent} within {self.flap_window_s:.0f} s); the rest keeps running",
            file=sys.stderr,
            flush=True,
        )
        if recent >= self.flap_limit and not entry.reported_crash_loop:
            entry.reported_crash_loop = True
            print(
                f"{service.name} is crash looping: it exited {recent} times within {self.flap_window_s:.0f} s. "
                f"Read {service.log} for the cause and fix it; `k2 run` keeps retrying it every "
                f"{self.max_backoff_s:.0f} s at most",
                file=sys.stderr,
                flush=True,
            )
        entry.restart_at = now + delay

    def processes(self) -> list[subprocess.Popen]:
        return [entry.process for entry in self.services if entry.process is not None]

    def stop_all(self, timeout_s: float = 30.0) -> None:
        """SIGTERM every service (last started first), wait, SIGKILL what is left; the broker is not touched."""
        stop_children(list(reversed(self.processes())), timeout_s)
        for entry in self.services:
            pid_path(self.run_dir, entry.service.name).unlink(missing_ok=True)

    # -- the embedded broker --------------------------------------------------------------

    def check_broker(self) -> None:
        """Start the embedded broker again when its process is gone (or say how to, if that fails)."""
        broker = self.broker
        if broker is None or broker_alive(broker) or time.monotonic() < self._broker_retry_at:
            return
        print(
            f"Kafka (the embedded broker on {broker.bootstrap_servers}) has stopped; restarting it "
            f"(log: {broker.log_file})",
            file=sys.stderr,
            flush=True,
        )
        try:
            broker.start()
        except K2Error as exc:
            self._broker_failures += 1
            delay = backoff_s(self._broker_failures, self.initial_backoff_s, self.max_backoff_s)
            self._broker_retry_at = time.monotonic() + delay
            print(
                f"could not restart Kafka: {exc}\nstart it by hand with `K2_HOME={broker.home.parent} "
                f"K2_KAFKA_PORT={broker.port} K2_KAFKA_CONTROLLER_PORT={broker.controller_port} k2 kafka start`; "
                f"`k2 run` tries again in {delay:.0f} s",
                file=sys.stderr,
                flush=True,
            )
            return
        self._broker_failures = 0
        print(f"Kafka restarted on {broker.bootstrap_servers}", flush=True)


def broker_alive(broker: KafkaBroker) -> bool:
    """Whether the broker's process is running (a child that exited is reaped, not taken for alive)."""
    pid = broker.pid()
    if pid is None:
        return False
    if reaped(pid):  # not our child: broker.pid() already checked it exists
        broker.pid_file.unlink(missing_ok=True)
        return False
    return True
