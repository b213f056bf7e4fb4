"""`k2 --help` lists every command from one table without importing the command modules; that
table must say what each module registers."""

from __future__ import annotations

import subprocess
import sys

from k2_assets.cli import COMMANDS, build_parser


def _registered_help(parser) -> dict[str, str]:
    choices = parser._subparsers._group_actions[0]._choices_actions
    return {choice.dest: choice.help for choice in choices}


def test_the_help_table_matches_what_each_module_registers() -> None:
    assert _registered_help(build_parser()) == {name: help_text for name, (_, help_text) in COMMANDS.items()}


def test_a_command_builds_only_its_own_parser_and_still_lists_the_others() -> None:
    parser = build_parser("kafka")
    assert parser.parse_args(["kafka", "status"]).handler is not None
    assert set(_registered_help(parser)) == set(COMMANDS)


def test_k2_help_imports_no_command_module_and_no_dagster() -> None:
    probe = (
        "import sys\nfrom k2_assets.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "prefixes = ('dagster', 'pyarrow', 'pyiceberg', 'k2_assets.cli.')\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(prefixes))\n"
        "print(loaded, file=sys.stderr)"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert "run" in result.stdout and "binance-server" in result.stdout
    assert result.stderr.strip().splitlines()[-1] == "[]"
