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


# --- Inside the library: subpackages in layers, and no import cycles anywhere -----------------
#
# What each part of k2_resources may import from the rest of the library. A part is a subpackage
# (k2_resources/<name>/) or a module at the root; the root modules are what everything shares and
# import nothing above them. An edge not listed here is an upward edge (or a new one to think
# about: add it only if the graph stays acyclic, which the test below checks too).
SHARED = {"errors", "paths", "metrics", "thresholds"}
LIBRARY_EDGES: dict[str, set[str]] = {
    "errors": set(),
    "paths": set(),
    "thresholds": set(),
    "metrics": {"errors", "paths"},
    "schemas": set(SHARED),
    "platform": set(SHARED),
    "catalog": SHARED | {"schemas"},
    "kafka": SHARED | {"schemas", "platform"},
    "query": SHARED | {"catalog"},
    "asx": SHARED | {"schemas", "catalog"},
    "binance": SHARED | {"schemas", "kafka", "platform"},
    "degradation": SHARED | {"catalog", "kafka"},
    "sink": SHARED | {"schemas", "catalog", "kafka", "degradation"},
    "trades": SHARED | {"schemas", "catalog", "kafka", "query", "sink"},
    "operations": SHARED
    | {"schemas", "catalog", "kafka", "query", "binance", "degradation", "sink", "trades", "platform"},
    "analytics": SHARED | {"schemas", "catalog", "kafka", "query", "trades", "operations", "platform"},
    "api": SHARED | {"schemas", "catalog", "kafka", "query", "sink", "trades", "degradation", "operations"},
}


def _part_of(module: str) -> str | None:
    """The library part a module name belongs to (``k2_resources.sink.commit`` -> ``sink``)."""
    parts = module.split(".")
    if parts[0] != "k2_resources" or len(parts) < 2:
        return None
    return parts[1]


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _library_imports(root: Path) -> dict[str, list[tuple[int, str]]]:
    """Every library module's imports of other library modules (names resolved to modules)."""
    files = {_module_name(p, root): p for p in sorted((root / "k2_resources").rglob("*.py"))}
    graph: dict[str, list[tuple[int, str]]] = {}
    for name, path in files.items():
        targets = []
        for line, imported in imported_modules(path, root):
            # `from k2_resources.sink import commit` names a module; `... import commit_range` names a
            # function of the package: take the longest prefix that is a module of the tree.
            candidate = imported
            while candidate and candidate not in files:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name and candidate.startswith("k2_resources."):
                targets.append((line, candidate))
        graph[name] = targets
    return graph


def library_layer_violations(root: Path = PROJECT_ROOT) -> list[str]:
    """Imports between parts of the library that LIBRARY_EDGES does not allow."""
    problems = []
    for module, targets in _library_imports(root).items():
        source = _part_of(module)
        for line, target in targets:
            destination = _part_of(target)
            if source is None or destination is None or destination == source:
                continue
            if destination not in LIBRARY_EDGES.get(source, set()):
                problems.append(f"{module}:{line}: k2_resources.{source} must not import {target}")
    return sorted(set(problems))


def import_cycles(root: Path = PROJECT_ROOT) -> list[list[str]]:
    """The library's strongly connected modules (Tarjan): each list is one import cycle."""
    graph = {module: sorted({t for _, t in targets}) for module, targets in _library_imports(root).items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, []):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(cycles)


def _edge_graph_cycles(edges: dict[str, set[str]]) -> list[str]:
    """The parts on a cycle of ``edges`` or above one (empty when the graph is acyclic)."""
    remaining = {part: set(targets) for part, targets in edges.items()}
    while True:
        leaves = [part for part, targets in remaining.items() if not (targets & remaining.keys())]
        if not leaves:
            return sorted(remaining)
        for leaf in leaves:
            del remaining[leaf]


def test_the_allowed_edges_between_library_parts_form_no_cycle() -> None:
    assert not _edge_graph_cycles(LIBRARY_EDGES), "LIBRARY_EDGES allows a cycle among these parts"


def test_every_library_part_is_listed_in_the_allowed_edges() -> None:
    root = PROJECT_ROOT / "k2_resources"
    parts = {p.name for p in root.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    parts |= {p.stem for p in root.glob("*.py") if p.stem != "__init__"}
    assert parts <= LIBRARY_EDGES.keys(), f"parts with no allowed edges: {sorted(parts - LIBRARY_EDGES.keys())}"


def test_library_parts_import_only_downwards() -> None:
    problems = library_layer_violations()
    assert not problems, "imports that climb between library parts:\n" + "\n".join(problems)


def test_no_import_cycles_between_library_modules() -> None:
    cycles = import_cycles()
    assert not cycles, "import cycles (also through imports inside functions):\n" + "\n".join(
        " <-> ".join(cycle) for cycle in cycles
    )


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for relative, source in files.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in path.relative_to(tmp_path).parents:
            if parent != Path("."):
                (tmp_path / parent / "__init__.py").touch()
        path.write_text(source)
    return tmp_path


def test_the_cycle_check_catches_a_cycle_hidden_in_a_function(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "k2_resources/query/sql_query.py": "from k2_resources.query.duckdb_query import run\n",
            "k2_resources/query/duckdb_query.py": "def run():\n    from k2_resources.query import sql_query\n",
            "k2_resources/query/other.py": "import k2_resources.query.sql_query\n",
        },
    )
    assert import_cycles(root) == [["k2_resources.query.duckdb_query", "k2_resources.query.sql_query"]]


def test_the_layer_check_catches_an_upward_edge(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "k2_resources/catalog/tables.py": "X = 1\n",
            "k2_resources/degradation/tiers.py": "from k2_resources.trades.iceberg_read import SnapshotReader\n",
            "k2_resources/trades/iceberg_read.py": "from k2_resources.catalog.tables import X\n",
        },
    )
    problems = library_layer_violations(root)
    assert problems == [
        "k2_resources.degradation.tiers:1: k2_resources.degradation must not import k2_resources.trades.iceberg_read"
    ], problems


def test_the_edge_check_catches_a_cycle_in_the_allowed_edges() -> None:
    # the parts on a cycle, and those that depend on one, are left over
    assert _edge_graph_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}) == ["a", "b", "c", "d"]
    assert _edge_graph_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
