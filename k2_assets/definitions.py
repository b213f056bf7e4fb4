"""The one Definitions object of K2: every domain's assets, checks, jobs, schedules and sensors."""

from __future__ import annotations

import importlib

from dagster import Definitions

from k2_assets.resources import build_resources

# Each module exposes `defs`; listed in the order they appear in the UI's code location.
DOMAIN_MODULES = (
    "k2_assets.asx",
    "k2_assets.binance",
    "k2_assets.analytics",
    "k2_assets.operations",
    "k2_sensors.operations",
)


def _domain_definitions() -> list[Definitions]:
    modules = [importlib.import_module(name) for name in DOMAIN_MODULES]
    return [module.defs for module in modules if hasattr(module, "defs")]


defs = Definitions.merge(*_domain_definitions(), Definitions(resources=build_resources()))
