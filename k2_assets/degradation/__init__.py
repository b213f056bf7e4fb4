"""degradation domain: the volume ranking behind load shedding's symbol tiers, its job and hourly schedule."""

from dagster import Definitions

from k2_assets.degradation.assets import symbol_tiers
from k2_assets.degradation.jobs import symbol_tiers_job, symbol_tiers_schedule

defs = Definitions(assets=[symbol_tiers], jobs=[symbol_tiers_job], schedules=[symbol_tiers_schedule])
