"""The layering rule, checked on the code itself: k2_resources is the library and imports neither
k2_sensors nor k2_assets; k2_sensors imports k2_resources only; k2_assets composes; the CLI
(k2_assets.cli) is the top of the house and nothing imports it. Every import counts, also those
under TYPE_CHECKING or inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from k2_resources.paths import PROJECT_ROOT

PACKAGES = ("k2_resources", "k2_sensors", "k2_assets")
# What each package may import from the K2 packages (itself included).
ALLOWED = {
    "k2_resources": {"k2_resources"},
    "k2_sensors": {"k2_resources", "k2_sensors"},
    "k2_assets": {"k2_resources", "k2_sensors", "k2_assets"},
}
CLI = "k2_assets.cli"


def imported_modules(path: Path, root: Path = PROJECT_ROOT) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import statement in a file, wherever it stands."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                package = path.relative_to(root).with_suffix("").parts[: -node.level]
                base = ".".join(package)
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            found.extend((node.lineno, f"{module}.{alias.name}") for alias in node.names)
    return found


def violations(source_root: Path = PROJECT_ROOT) -> list[str]:
    problems = []
    for package in PACKAGES:
        for path in sorted((source_root / package).rglob("*.py")):
            relative = path.relative_to(source_root)
            in_cli = relative.parts[:2] == ("k2_assets", "cli")
            for line, module in imported_modules(path, source_root):
                top = module.split(".")[0]
                if top in PACKAGES and top not in ALLOWED[package]:
                    problems.append(f"{relative}:{line}: {package} must not import {module}")
                if (module == CLI or module.startswith(CLI + ".")) and not in_cli:
                    problems.append(f"{relative}:{line}: nothing imports the CLI ({module}); it sits on top")
    return sorted(set(problems))


def test_every_import_follows_the_layering_rule() -> None:
    problems = violations()
    assert not problems, "imports that break the layering rule:\n" + "\n".join(problems)


def test_tests_import_no_other_test_module() -> None:
    problems = []
    for path in sorted((PROJECT_ROOT / "tests").rglob("*.py")):
        for line, module in imported_modules(path):
            parts = module.split(".")
            if parts[0] == "tests" and len(parts) > 1 and parts[1] != "support":
                problems.append(
                    f"{path.relative_to(PROJECT_ROOT)}:{line}: imports {module}; shared helpers go in tests/support"
                )
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "source, expected",
    [
        ("from k2_sensors.binance import stream_sensor\n", "k2_resources must not import k2_sensors.binance"),
        ("def f():\n    import k2_assets.definitions\n", "k2_resources must not import k2_assets.definitions"),
        (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from k2_assets.cli import main\n",
            "nothing imports the CLI (k2_assets.cli)",
        ),
    ],
)
def test_the_rule_catches_hidden_imports_and_names_file_and_line(tmp_path: Path, source: str, expected: str) -> None:
    for package in PACKAGES:
        (tmp_path / package).mkdir()
    (tmp_path / "k2_resources" / "bad.py").write_text(source)
    problems = violations(tmp_path)
    assert any(problem.startswith("k2_resources/bad.py:") and expected in problem for problem in problems), problems
