"""Every exception class K2 defines derives from K2Error (issue 20: one error family).

The test imports every module of the three packages, so an exception class anywhere is seen;
a module that does not import fails the test instead of being skipped.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType

import k2_assets
import k2_resources
import k2_sensors
from k2_resources.errors import K2Error

PACKAGES = (k2_resources, k2_sensors, k2_assets)
# Modules not imported, each with its reason (importing them has an effect the test must not have).
NOT_IMPORTED = {
    "k2_assets.cli.__main__": "runs the CLI and exits on import; it defines nothing",
}


def _all_modules() -> tuple[list[ModuleType], list[str]]:
    modules: list[ModuleType] = []
    failures: list[str] = []
    for package in PACKAGES:
        modules.append(package)

        def _failed(name: str) -> None:
            failures.append(f"{name}: walk failed")

        for info in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}.", onerror=_failed):
            if info.name in NOT_IMPORTED:
                continue
            try:
                modules.append(importlib.import_module(info.name))
            except Exception as exc:  # reported below, never skipped
                failures.append(f"{info.name}: {type(exc).__name__}: {exc}")
    return modules, failures


def test_every_module_imports() -> None:
    modules, failures = _all_modules()
    assert not failures, "modules that do not import:\n" + "\n".join(failures)
    assert len(modules) > 50


def _k2_exception_classes() -> set[type[BaseException]]:
    """Every exception class a K2 module defines at module level; warnings (issued with
    warnings.warn, never raised) are not errors and are left out."""
    modules, _ = _all_modules()
    found: set[type[BaseException]] = set()
    for module in modules:
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__.startswith("k2_") and issubclass(cls, BaseException) and not issubclass(cls, Warning):
                found.add(cls)
    return found


def test_every_k2_exception_is_a_k2_error() -> None:
    offenders = [
        f"{cls.__module__}.{cls.__qualname__} (derives from {', '.join(base.__name__ for base in cls.__bases__)})"
        for cls in _k2_exception_classes()
        if not issubclass(cls, K2Error)
    ]
    assert not offenders, "exception classes not derived from K2Error:\n" + "\n".join(sorted(offenders))


def test_k2_exceptions_live_in_errors_modules() -> None:
    misplaced = [
        f"{cls.__module__}.{cls.__qualname__}"
        for cls in _k2_exception_classes()
        if cls.__module__.rsplit(".", 1)[-1] != "errors"
    ]
    assert not misplaced, "exception classes outside an errors module:\n" + "\n".join(sorted(misplaced))
