"""Where K2 keeps its runtime state, and the project paths it reads from.

Everything K2 writes at run time (Kafka log dirs, the Iceberg catalog and warehouse,
the Dagster home, spill files) lives under one folder, ``K2_HOME``, so that a whole
installation can be inspected, copied or deleted as one directory.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = PROJECT_ROOT / "data"


def k2_home() -> Path:
    """The state folder: ``$K2_HOME`` or ``.k2/`` in the project; created on first use."""
    home = Path(os.environ.get("K2_HOME") or PROJECT_ROOT / ".k2").expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def state_dir(*parts: str) -> Path:
    """A sub-folder of K2_HOME (created), e.g. ``state_dir("kafka", "logs")``."""
    path = k2_home().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def dagster_home() -> Path:
    """Dagster's home: ``$DAGSTER_HOME`` when set, else ``K2_HOME/dagster``."""
    if os.environ.get("DAGSTER_HOME"):
        return Path(os.environ["DAGSTER_HOME"]).resolve()
    return state_dir("dagster")
