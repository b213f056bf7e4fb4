"""The local scale-out topology's shared pieces: what a service of `k2 cluster` is, and its env file.

`k2 cluster start` starts each ClusterService in turn; each returns the environment variables a
K2 process needs to use it (``K2_KAFKA_BOOTSTRAP=host:port,...`` for Kafka). They are written to
``K2_HOME/cluster/env.sh`` (``export NAME=value`` lines, so a shell can ``source`` it), and
`k2 run --cluster` reads them back: the same variables a real cluster would be given by hand.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from k2_resources.errors import K2Error
from k2_resources.paths import state_dir

ENV_FILE_NAME = "env.sh"


@dataclass(frozen=True)
class ClusterService:
    """One part of the local topology (Kafka brokers, object store and catalog, Postgres).

    ``start`` brings it up (a no-op when it runs) and returns the variables K2 needs to use it;
    ``stop`` stops it; ``status`` says whether it runs, and one line of detail per process.
    """

    name: str
    start: Callable[[], Mapping[str, str]]
    stop: Callable[[], None]
    status: Callable[[], tuple[bool, list[str]]]


def cluster_home() -> Path:
    """K2_HOME/cluster: the state of every service of the local topology."""
    return state_dir("cluster")


def env_file(home: Path | None = None) -> Path:
    return (home or cluster_home()) / ENV_FILE_NAME


def write_env_file(values: Mapping[str, str], home: Path | None = None) -> Path:
    """Write ``values`` as ``export NAME=value`` lines (shell-quoted) and return the file's path."""
    path = env_file(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Written by `k2 cluster start`: the variables K2 needs to run on the local cluster.",
        "# `source` it in a shell, or use `k2 run --cluster`.",
    ]
    lines += [f"export {name}={shlex.quote(str(value))}" for name, value in sorted(values.items())]
    # It holds the generated credentials: readable by this user only, even if an older file was not.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return path


def read_env_file(home: Path | None = None) -> dict[str, str]:
    """The variables ``k2 cluster start`` wrote; a clear error when the cluster was never started."""
    path = env_file(home)
    if not path.exists():
        raise K2Error(
            f"no local cluster settings in {path}; start the cluster with `k2 cluster start` (same K2_HOME) first"
        )
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        words = shlex.split(line)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            name, value = words[1].split("=", 1)
            values[name] = value
        else:
            raise K2Error(
                f"{path}:{number} is not an `export NAME=value` line; delete the file and run `k2 cluster start` again"
            )
    return values
