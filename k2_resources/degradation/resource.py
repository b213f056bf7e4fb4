"""DegradationResource: the configurable thresholds, symbol tiers and spill folder of the stream path.

Defaults are the brief's (lag 100K/500K/1M/5M, memory 70/80/90/95 %, 30 s cooldown, spill under
K2_HOME/spill), so it works with no settings at all. Tiers come from the newest volume ranking
(written by the ``symbol_tiers`` asset to K2_HOME/degradation/symbol_tiers.json); the static lists
are used only while no ranking exists.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dagster import ConfigurableResource
from pydantic import Field

from k2_resources import thresholds as defaults
from k2_resources.degradation.levels import Clock, DegradationManager, DegradationThresholds
from k2_resources.degradation.shedding import TIER1_SIZE, TIER2_SIZE, LoadShedder, tiers_from_config
from k2_resources.degradation.spill import SpillStore
from k2_resources.degradation.tiers import default_ranking_path, newest_ranked_shedder

RESOURCE_KEY = "degradation"


class DegradationResource(ConfigurableResource):
    """Degradation triggers, load-shedding tiers and the spill store, for the stream sensor and micro-batches."""

    lag_triggers: list[int] = Field(
        default=list(defaults.LAG_TRIGGERS),
        description="Lag (messages) entering SOFT, GRACEFUL, AGGRESSIVE, CIRCUIT_BREAK.",
    )
    memory_triggers_percent: list[float] = Field(
        default=list(defaults.MEMORY_TRIGGERS_PERCENT),
        description="Memory use (%) entering SOFT, GRACEFUL, AGGRESSIVE, CIRCUIT_BREAK.",
    )
    cooldown_seconds: float = Field(
        default=defaults.COOLDOWN_SECONDS, description="Minimum time between a transition and a step down."
    )
    tier1_symbols: list[str] | None = Field(
        default=None, description="Tier-1 symbols; default BTCUSDT, ETHUSDT, ASX top 20."
    )
    tier2_symbols: list[str] | None = Field(default=None, description="Tier-2 symbols; default a list of large names.")
    tiers_from_volume: bool = Field(
        default=True,
        description="Take tiers from the newest volume ranking (the symbol_tiers asset) when one exists; "
        "False: always the tier lists.",
    )
    tiers_file: str | None = Field(
        default=None, description="The volume ranking file; default K2_HOME/degradation/symbol_tiers.json."
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

    def tiers_path(self) -> Path:
        """Where the volume ranking is read from."""
        return Path(self.tiers_file) if self.tiers_file else default_ranking_path()

    def load_shedder(self, volumes: Mapping[str, float] | None = None) -> LoadShedder:
        """The tiers in force, when ``tiers_from_volume`` is on: from ``volumes`` if given, else from
        the newest stored ranking; the lists (configured or default) when off or when no ranking
        with any symbol exists. Cheap: an unchanged ranking file costs one ``stat``."""
        return self.tier_source(volumes)[0]

    def tier_source(self, volumes: Mapping[str, float] | None = None) -> tuple[LoadShedder, str]:
        """(shedder, where its tiers came from: ``volumes``, ``ranking <path> <computed_at>`` or ``lists``)."""
        if self.tiers_from_volume:
            if volumes:
                return LoadShedder.from_volumes(volumes, tier1_size=TIER1_SIZE, tier2_size=TIER2_SIZE), "volumes"
            path = self.tiers_path()
            found = newest_ranked_shedder(path)
            if found is not None and found[0].symbols:
                return found[1], f"ranking {path} computed {found[0].computed_at.isoformat()}"
        return tiers_from_config(self.tier1_symbols, self.tier2_symbols), "lists"

    def spill_store(self) -> SpillStore:
        return SpillStore(self.spill_dir)
