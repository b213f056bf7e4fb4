"""The one Definitions object of K2: every domain's assets, checks, jobs, schedules and sensors,
with the resources built once in ``k2_assets/resources.py``."""

from __future__ import annotations

from dagster import Definitions

from k2_assets import analytics, asx, binance, degradation, operations
from k2_assets.resources import build_resources

# In the order the domains appear in the UI's code location.
defs = Definitions.merge(
    asx.defs,
    binance.defs,
    analytics.defs,
    operations.defs,
    degradation.defs,
    Definitions(resources=build_resources()),
)
