"""Degradation levels of the stream path and the manager that moves between them.

Under load the platform bends instead of breaking. Two signals decide the level: consumer lag
(messages in Kafka not yet in Iceberg) and memory use. Escalation is immediate, to the highest
level any trigger reaches. Recovery is deliberately slow so levels do not flap:

- hysteresis: leaving a level needs lag below half that level's lag trigger AND memory below
  90 % of that level's memory trigger;
- cooldown: at least ``cooldown_seconds`` (30 s) since the last transition, up or down;
- one level at a time: each step down needs the conditions again for the level being left,
  and a fresh cooldown. Recovering from CIRCUIT_BREAK to NORMAL therefore takes at least four
  cooldowns; this is the chosen trade-off (slow, stepwise release of deferred work rather than a
  thundering herd of catch-up batches when the burst ends).

The manager is plain Python with an injected clock, and its state round-trips through a JSON-able
dict so that it can live in a Dagster sensor cursor between ticks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from k2_resources import thresholds as defaults
from k2_resources.errors import K2Error

logger = logging.getLogger("k2.degradation")

Clock = Callable[[], float]

STATE_VERSION = 1


class DegradationLevel(IntEnum):
    """How far the stream path has backed off; higher is more degraded."""

    NORMAL = 0
    SOFT = 1
    GRACEFUL = 2
    AGGRESSIVE = 3
    CIRCUIT_BREAK = 4


LEVEL_BEHAVIOUR: Mapping[DegradationLevel, str] = {
    DegradationLevel.NORMAL: "Everything runs: all symbols are enriched and written to Iceberg in micro-batches.",
    DegradationLevel.SOFT: "Skip enrichment: trades are written as normalised V2 records without derived fields.",
    DegradationLevel.GRACEFUL: (
        "Defer tier-3 symbols: their offset ranges are recorded and written to Iceberg when the "
        "level falls again (nothing is dropped); tier 1 and 2 keep flowing. Enrichment stays off."
    ),
    DegradationLevel.AGGRESSIVE: (
        "Spill raw batches to local Parquet under K2_HOME/spill so Kafka consumption keeps pace; "
        "the spilled ranges are committed to Iceberg exactly once on recovery. Tier-3 stays deferred."
    ),
    DegradationLevel.CIRCUIT_BREAK: (
        "Stop requesting new micro-batches; data waits in Kafka (within retention) until the level "
        "falls. Checks report ERROR and alerts fire."
    ),
}


def describe_level(level: DegradationLevel | int) -> str:
    """One sentence on what the stream path does at ``level``."""
    return LEVEL_BEHAVIOUR[DegradationLevel(level)]


@dataclass(frozen=True)
class DegradationThresholds:
    """Triggers for SOFT, GRACEFUL, AGGRESSIVE and CIRCUIT_BREAK (in that order) plus recovery rules."""

    lag_messages: Sequence[int] = defaults.LAG_TRIGGERS
    memory_percent: Sequence[float] = defaults.MEMORY_TRIGGERS_PERCENT
    recovery_lag_fraction: float = defaults.RECOVERY_LAG_FRACTION
    recovery_memory_fraction: float = defaults.RECOVERY_MEMORY_FRACTION
    cooldown_seconds: float = defaults.COOLDOWN_SECONDS

    def __post_init__(self) -> None:
        object.__setattr__(self, "lag_messages", tuple(int(v) for v in self.lag_messages))
        object.__setattr__(self, "memory_percent", tuple(float(v) for v in self.memory_percent))
        for name, values in (("lag_messages", self.lag_messages), ("memory_percent", self.memory_percent)):
            if len(values) != 4:
                raise K2Error(
                    f"degradation {name} needs 4 triggers (SOFT, GRACEFUL, AGGRESSIVE, CIRCUIT_BREAK), "
                    f"got {list(values)}; give four increasing values"
                )
            if any(b <= a for a, b in zip(values, values[1:])) or values[0] <= 0:
                raise K2Error(
                    f"degradation {name} triggers must be positive and strictly increasing, got {list(values)}; "
                    "fix the configured thresholds"
                )
        if not 0 < self.recovery_lag_fraction <= 1 or not 0 < self.recovery_memory_fraction <= 1:
            raise K2Error("degradation recovery fractions must be in (0, 1]; fix the configured thresholds")
        if self.cooldown_seconds < 0:
            raise K2Error("degradation cooldown_seconds must be >= 0; fix the configured thresholds")

    def lag_trigger(self, level: DegradationLevel) -> int:
        """Lag (messages) at or above which ``level`` (SOFT..CIRCUIT_BREAK) is entered."""
        return self.lag_messages[int(level) - 1]

    def memory_trigger(self, level: DegradationLevel) -> float:
        """Memory use (%) at or above which ``level`` (SOFT..CIRCUIT_BREAK) is entered."""
        return self.memory_percent[int(level) - 1]


@dataclass(frozen=True)
class Transition:
    """One change of level with the signal values that caused it (``at`` is the clock's seconds)."""

    from_level: DegradationLevel
    to_level: DegradationLevel
    at: float
    cause: str
    lag: int = 0
    memory_percent: float = 0.0

    @property
    def is_escalation(self) -> bool:
        return self.to_level > self.from_level

    def to_dict(self) -> dict[str, Any]:
        return {
            "from": self.from_level.name,
            "to": self.to_level.name,
            "at": self.at,
            "cause": self.cause,
            "lag": self.lag,
            "memory_percent": self.memory_percent,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Transition:
        return cls(
            from_level=DegradationLevel[data["from"]],
            to_level=DegradationLevel[data["to"]],
            at=float(data["at"]),
            cause=str(data["cause"]),
            lag=int(data.get("lag", 0)),
            memory_percent=float(data.get("memory_percent", 0.0)),
        )


def _fmt_pct(value: float) -> str:
    return f"{value:g}%"


@dataclass
class DegradationManager:
    """Tracks the degradation level from lag and memory, with hysteresis and a cooldown.

    Call ``evaluate(lag, memory_percent)`` once per sensor tick; persist ``to_state()`` in the
    cursor and rebuild with ``DegradationManager.from_state(state)`` on the next tick.
    ``last_transition`` is the transition made by the latest ``evaluate`` call, or None.
    """

    thresholds: DegradationThresholds = field(default_factory=DegradationThresholds)
    clock: Clock = time.time
    level: DegradationLevel = DegradationLevel.NORMAL
    changed_at: float | None = None
    peak_level: DegradationLevel = DegradationLevel.NORMAL
    history: list[Transition] = field(default_factory=list)
    max_history: int = 50
    last_transition: Transition | None = field(default=None, init=False)

    # -- signals -------------------------------------------------------------------------

    def triggered_level(self, lag: int, memory_percent: float) -> tuple[DegradationLevel, str]:
        """The highest level any trigger reaches, and the cause naming the signal(s) that reach it."""
        lag_level = DegradationLevel.NORMAL
        memory_level = DegradationLevel.NORMAL
        for level in list(DegradationLevel)[1:]:
            if lag >= self.thresholds.lag_trigger(level):
                lag_level = level
            if memory_percent >= self.thresholds.memory_trigger(level):
                memory_level = level
        target = max(lag_level, memory_level)
        causes = []
        if target > DegradationLevel.NORMAL and lag_level == target:
            causes.append(f"lag {lag:,} >= {self.thresholds.lag_trigger(target):,} ({target.name})")
        if target > DegradationLevel.NORMAL and memory_level == target:
            causes.append(
                f"memory {_fmt_pct(memory_percent)} >= {_fmt_pct(self.thresholds.memory_trigger(target))} "
                f"({target.name})"
            )
        return target, "; ".join(causes)

    def recovery_limits(self, level: DegradationLevel | None = None) -> tuple[float, float]:
        """(lag, memory %) both signals must be below to leave ``level`` (default: the current one)."""
        level = self.level if level is None else level
        if level == DegradationLevel.NORMAL:
            return float("inf"), float("inf")
        return (
            self.thresholds.lag_trigger(level) * self.thresholds.recovery_lag_fraction,
            self.thresholds.memory_trigger(level) * self.thresholds.recovery_memory_fraction,
        )

    def cooldown_remaining(self) -> float:
        """Seconds until a step down is allowed (0 when allowed now)."""
        if self.changed_at is None:
            return 0.0
        return max(0.0, self.thresholds.cooldown_seconds - (self.clock() - self.changed_at))

    # -- the decision ----------------------------------------------------------------------

    def evaluate(self, lag: int, memory_percent: float) -> DegradationLevel:
        """Update the level from the current lag (messages) and memory use (percent); returns the level."""
        if lag < 0:
            raise K2Error(
                f"consumer lag cannot be negative (got {lag}); compute it as end offset minus committed offset"
            )
        if not 0 <= memory_percent <= 100:
            raise K2Error(f"memory_percent must be within 0..100 (got {memory_percent}); pass a percentage")
        self.last_transition = None
        now = self.clock()
        target, cause = self.triggered_level(lag, memory_percent)
        if target > self.level:
            self._move(target, now, cause, lag, memory_percent)
        elif target < self.level:
            lag_limit, memory_limit = self.recovery_limits()
            if lag < lag_limit and memory_percent < memory_limit and self.cooldown_remaining() <= 0:
                held = now - self.changed_at if self.changed_at is not None else 0.0
                cause = (
                    f"lag {lag:,} < {lag_limit:,.0f} and memory {_fmt_pct(memory_percent)} < "
                    f"{_fmt_pct(round(memory_limit, 2))} after {held:.0f}s at {self.level.name} "
                    f"(recovering to {DegradationLevel(self.level - 1).name})"
                )
                self._move(DegradationLevel(self.level - 1), now, cause, lag, memory_percent)
        return self.level

    def _move(self, to_level: DegradationLevel, now: float, cause: str, lag: int, memory_percent: float) -> None:
        transition = Transition(self.level, to_level, now, cause, lag, float(memory_percent))
        self.level = to_level
        self.changed_at = now
        self.peak_level = max(self.peak_level, to_level)
        self.history.append(transition)
        del self.history[: -self.max_history]
        self.last_transition = transition
        log = logger.warning if transition.is_escalation else logger.info
        log("degradation %s -> %s: %s", transition.from_level.name, to_level.name, cause)

    # -- persistence -----------------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        """A JSON-able dict of the dynamic state (thresholds come from configuration, not the cursor)."""
        return {
            "version": STATE_VERSION,
            "level": self.level.name,
            "changed_at": self.changed_at,
            "peak_level": self.peak_level.name,
            "history": [t.to_dict() for t in self.history],
        }

    @classmethod
    def from_state(
        cls,
        state: Mapping[str, Any] | None,
        thresholds: DegradationThresholds | None = None,
        clock: Clock = time.time,
        max_history: int = 50,
    ) -> DegradationManager:
        """Rebuild a manager from ``to_state()`` output; None or {} gives a fresh NORMAL manager."""
        thresholds = thresholds or DegradationThresholds()
        if not state:
            return cls(thresholds=thresholds, clock=clock, max_history=max_history)
        try:
            if state.get("version") != STATE_VERSION:
                raise ValueError(f"unknown state version {state.get('version')!r}")
            changed_at = state.get("changed_at")
            return cls(
                thresholds=thresholds,
                clock=clock,
                level=DegradationLevel[state["level"]],
                changed_at=None if changed_at is None else float(changed_at),
                peak_level=DegradationLevel[state.get("peak_level", state["level"])],
                history=[Transition.from_dict(t) for t in state.get("history", [])],
                max_history=max_history,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise K2Error(
                f"degradation state in the sensor cursor is unreadable ({exc!r}); reset the sensor's cursor "
                "in the Dagster UI (Sensors > ... > Reset cursor) to start again from NORMAL"
            ) from exc


def system_memory_percent(meminfo: str = "/proc/meminfo") -> float:
    """Memory in use on this machine in percent (MemTotal - MemAvailable), from /proc/meminfo; 0.0 if unknown."""
    values: dict[str, int] = {}
    try:
        with open(meminfo, encoding="ascii") as handle:
            for line in handle:
                name, _, rest = line.partition(":")
                if name in ("MemTotal", "MemAvailable"):
                    values[name] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    total, available = values.get("MemTotal", 0), values.get("MemAvailable")
    if total <= 0 or available is None:
        return 0.0
    return round(100.0 * (total - available) / total, 2)


def check_status(level: DegradationLevel | int) -> tuple[bool, str]:
    """(passed, severity) of the degradation-level asset check: passes below GRACEFUL, WARN from
    GRACEFUL, ERROR at CIRCUIT_BREAK (the severity name matches dagster.AssetCheckSeverity)."""
    level = DegradationLevel(level)
    if level >= defaults.DEGRADATION_ERROR_LEVEL:
        return False, "ERROR"
    if level >= defaults.DEGRADATION_WARN_LEVEL:
        return False, "WARN"
    return True, "WARN"
