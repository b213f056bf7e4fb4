"""The `k2` command line. Each sub-command group lives in a module of its own with a
``register(subparsers)`` function that adds its parser and sets ``handler``."""

from __future__ import annotations

import argparse
import importlib
import sys

from k2_resources.errors import K2Error

# Modules under k2_assets.cli that add sub-commands, in the order `k2 --help` lists them.
COMMAND_MODULES = ("run", "instance", "demo", "kafka", "query", "offsets", "stream", "binance_server", "metrics", "api")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="k2", description="K2 market-data lakehouse")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"k2_assets.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except K2Error as exc:
        print(f"k2: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
