"""What the servers of `k2 cluster` share: a home folder with their state (ports, pid) and credentials."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from k2_resources.platform.processes import runs


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}


def write_private(path: Path, values: dict) -> None:
    """Write ``values`` as JSON readable by this user only (credentials)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        json.dump(values, handle, indent=2)


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


@dataclass
class LocalServer:
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
        return read_json(self.state_file)

    def _save(self, **values: object) -> None:
        state = self._state()
        state.update(values)
        self.home.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps(state, indent=2))

    def pid(self) -> int | None:
        pid = self._state().get("pid")
        return pid if runs(pid, self.program) else None
