"""Running the `k2` command in a new process, as a user does, on an environment the test chooses."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path


def k2_env(home: Path, **settings: str) -> dict[str, str]:
    """This process's environment with K2_HOME set to ``home`` (no DAGSTER_HOME) plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
    env.update(K2_HOME=str(home), **settings)
    return env


def run_k2(*args: str, env: Mapping[str, str], timeout_s: float = 180.0) -> subprocess.CompletedProcess[str]:
    """`python -m k2_assets.cli <args>` to completion; stdout and stderr captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "k2_assets.cli", *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def start_k2(*args: str, env: Mapping[str, str], log_path: Path) -> subprocess.Popen:
    """`python -m k2_assets.cli <args>` in the background, its output in ``log_path`` (a file, never a
    pipe nobody reads); the caller stops it."""
    with log_path.open("w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "k2_assets.cli", *args],
            env=dict(env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
