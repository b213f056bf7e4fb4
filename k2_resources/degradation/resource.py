"""DegradationResource: the configurable thresholds, symbol tiers and spill folder of the stream path.

Defaults are the brief's (lag 100K/500K/1M/5M, memory 70/80/90/95 %, 30 s cooldown, default
tiers, spill under K2_HOME/spill), so it works with no settings at all.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from dagster import ConfigurableResource
from pydantic import Field

from k2_resources.degradation.levels import Clock, DegradationManager, DegradationThresholds
from k2_resources.degradation.shedding import TIER1_SIZE, TIER2_SIZE, LoadShedder, tiers_from_config
from k2_resources.degradation.spill import SpillStore

RESOURCE_KEY = "degradation"


class DegradationResource(ConfigurableResource):
    """Degradation triggers, load-shedding tiers and the spill store, for the stream sensor and micro-batches."""

    lag_triggers: list[int] = Field(
        default=[100_000, 500_000, 1_000_000, 5_000_000],
        description="Lag (messages) entering SOFT, GRACEFUL, AGGRESSIVE, CIRCUIT_BREAK.",
    )
    memory_triggers_percent: list[float] = Field(
        default=[70.0, 80.0, 90.0, 95.0], description="Memory use (%) entering SOFT, GRACEFUL, AGGRESSIVE, CIRCUIT_BREAK."
    )
    cooldown_seconds: float = Field(default=30.0, description="Minimum time between a transition and a step down.")
    tier1_symbols: list[str] | None = Field(default=None, description="Tier-1 symbols; default BTCUSDT, ETHUSDT, ASX top 20.")
    tier2_symbols: list[str] | None = Field(default=None, description="Tier-2 symbols; default a list of large names.")
    tiers_from_volume: bool = Field(
        default=False, description="Rank symbols by recent volume (when the caller passes volumes) instead of the lists."
    )
    spill_dir: str | None = Field(default=None, description="Spill folder; default K2_HOME/spill.")

    def thresholds(self) -> DegradationThresholds:
        return DegradationThresholds(
            lag_messages=tuple(self.lag_triggers),
            memory_percent=tuple(self.memory_triggers_percent),
            cooldown_seconds=self.cooldown_seconds,
        )

    def manager(self, state: Mapping[str, Any] | None = None, clock: Clock = time.time) -> DegradationManager:
        """A manager restored from cursor ``state`` (None: fresh, NORMAL)."""
        return DegradationManager.from_state(state, thresholds=self.thresholds(), clock=clock)

    def load_shedder(self, volumes: Mapping[str, float] | None = None) -> LoadShedder:
        """Tiers from ``volumes`` when ``tiers_from_volume`` is on and volumes are given, else the lists."""
        if self.tiers_from_volume and volumes:
            return LoadShedder.from_volumes(volumes, tier1_size=TIER1_SIZE, tier2_size=TIER2_SIZE)
        return tiers_from_config(self.tier1_symbols, self.tier2_symbols)

    def spill_store(self) -> SpillStore:
        return SpillStore(self.spill_dir)
