"""docs/architecture.md matches the tree: every path it names exists, and every part of the library
(subpackage or shared root module) and every module of it appears in the doc's map."""

from __future__ import annotations

import re
from pathlib import Path

from k2_resources.paths import PROJECT_ROOT

DOC = PROJECT_ROOT / "docs" / "architecture.md"
# `k2_resources/sink/`, `k2_resources/catalog/commit.py`, k2_sensors/binance/observe.py ...
PATH = re.compile(r"\b(k2_(?:resources|sensors|assets)/[\w/]*(?:\.py)?)")
# In the map, a package line lists its modules by bare name: "`commit.py`" after the package path.
MODULE = re.compile(r"\b([a-z_0-9]+\.py)\b")


def named_paths(text: str) -> set[str]:
    return {match.rstrip("/") for match in PATH.findall(text)}


def missing_paths(text: str, root: Path = PROJECT_ROOT) -> list[str]:
    return sorted(path for path in named_paths(text) if not (root / path).exists())


def unmapped_library_modules(text: str, root: Path = PROJECT_ROOT) -> list[str]:
    """Library modules whose name the doc never mentions (as a path or a bare ``name.py``)."""
    mentioned = named_paths(text) | set(MODULE.findall(text))
    library = root / "k2_resources"
    unmapped = []
    for path in sorted(library.rglob("*.py")):
        if path.name == "__init__.py":
            continue
        relative = str(path.relative_to(root))
        package = str(path.parent.relative_to(root))
        if relative in mentioned or path.name in mentioned and package in mentioned:
            continue
        unmapped.append(relative)
    return unmapped


def test_every_path_the_architecture_doc_names_exists() -> None:
    missing = missing_paths(DOC.read_text())
    assert not missing, "docs/architecture.md names paths that are not in the tree:\n" + "\n".join(missing)


def test_every_library_module_is_on_the_architecture_map() -> None:
    unmapped = unmapped_library_modules(DOC.read_text())
    assert not unmapped, "library modules missing from docs/architecture.md's map:\n" + "\n".join(unmapped)


def test_the_checks_catch_a_stale_path_and_an_unmapped_module(tmp_path: Path) -> None:
    (tmp_path / "k2_resources" / "sink").mkdir(parents=True)
    (tmp_path / "k2_resources" / "sink" / "commit.py").write_text("")
    (tmp_path / "k2_resources" / "sink" / "follow.py").write_text("")
    text = "`k2_resources/sink/` (`commit.py`), `k2_resources/trades/microbatch.py`"
    assert missing_paths(text, tmp_path) == ["k2_resources/trades/microbatch.py"]
    assert unmapped_library_modules(text, tmp_path) == ["k2_resources/sink/follow.py"]
