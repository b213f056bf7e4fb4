"""The one Definitions object of K2: every domain's assets, checks, jobs, schedules and sensors."""

from __future__ import annotations

from dagster import Definitions

from k2_assets.resources import build_resources


def _domain_definitions() -> list[Definitions]:
    from k2_assets import asx, binance

    domains = [asx, binance]
    return [module.defs for module in domains if hasattr(module, "defs")]


defs = Definitions.merge(*_domain_definitions(), Definitions(resources=build_resources()))
