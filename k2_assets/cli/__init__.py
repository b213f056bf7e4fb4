"""The `k2` command line. Each sub-command group lives in a module of its own with a
``register(subparsers)`` function that adds its parser and sets ``handler``."""

from __future__ import annotations

import argparse
import importlib
import sys

from k2_resources.errors import K2Error

# Each sub-command: (its module under k2_assets.cli, its one-line help), in the order `k2 --help`
# lists them. The help lives here so `k2 --help` imports no command module (several import
# dagster or pyarrow, seconds each); tests/unit/test_cli_help.py checks it matches each module's.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("run", "start Kafka and the Dagster UI on 127.0.0.1 (Ctrl-C stops all)"),
    "instance": ("instance", "create or migrate the Dagster instance (before starting services)"),
    "demo": ("demo", "run the whole platform headless (embedded, or `cluster`: the scale-out topology), then stop"),
    "kafka": ("kafka", "start, stop or inspect the embedded Kafka broker, or read a topic's dead letters"),
    "cluster": ("cluster", "start, stop or inspect the local scale-out topology (3 Kafka brokers ...)"),
    "query": ("query", "query the Iceberg tables"),
    "offsets": ("offsets", "show or reset the Kafka offsets market.trades has committed"),
    "stream": ("stream", "stream a live source into Kafka"),
    "binance-server": ("binance_server", "serve the bundled Binance recording as a combined stream on 127.0.0.1"),
    "metrics": ("metrics", "serve Prometheus metrics of the whole flow on 127.0.0.1"),
    "api": ("api", "serve the HTTP query API on 127.0.0.1 (and manage its API keys)"),
}
COMMAND_MODULES = tuple(module for module, _ in COMMANDS.values())


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with every sub-command fully defined, or, given ``command``, only that one
    (the others listed by name and help), so a command imports just what it needs."""
    parser = argparse.ArgumentParser(prog="k2", description="K2 market-data lakehouse")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        if command is None or name == command:
            importlib.import_module(f"k2_assets.cli.{module}").register(subparsers)
        else:
            subparsers.add_parser(name, help=help_text)
    return parser


def _command_of(argv: list[str]) -> str:
    """The sub-command named in ``argv`` ("" when none is, as for `k2 --help`)."""
    first = next((arg for arg in argv if not arg.startswith("-")), "")
    return first if first in COMMANDS else ""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(_command_of(argv)).parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except K2Error as exc:
        print(f"k2: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
