"""`k2 instance migrate`: create or migrate the Dagster instance once, before any service starts.

`k2 run` does this itself. A deployment that starts the Dagster services separately (the
compose file, a Helm chart) runs it as a one-shot step first, because Dagster processes that
find a new instance all try to create its storage at the same moment.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from k2_resources.operations.dagster_instance import prepare_instance
from k2_resources.paths import dagster_home


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("instance", help="create or migrate the Dagster instance (before starting services)")
    actions = parser.add_subparsers(dest="action", required=True)
    migrate = actions.add_parser("migrate", help="create, repair or migrate DAGSTER_HOME's instance, once")
    migrate.add_argument(
        "--config",
        type=Path,
        help="instance file to install as DAGSTER_HOME/dagster.yaml (default: keep the one there)",
    )
    migrate.set_defaults(handler=_migrate)


def _migrate(args: argparse.Namespace) -> int:
    print(prepare_instance(dagster_home(), config=args.config).describe(), flush=True)
    return 0
