"""DegradationManager: triggers, immediate escalation, stepwise recovery with hysteresis and cooldown."""

from __future__ import annotations

import json
import logging

import pytest

from k2_resources.degradation.levels import (
    LEVEL_BEHAVIOUR,
    DegradationLevel,
    DegradationManager,
    DegradationThresholds,
    Transition,
    describe_level,
    system_memory_percent,
)
from k2_resources.errors import K2Error

L = DegradationLevel
LAG_TRIGGERS = {L.SOFT: 100_000, L.GRACEFUL: 500_000, L.AGGRESSIVE: 1_000_000, L.CIRCUIT_BREAK: 5_000_000}
MEMORY_TRIGGERS = {L.SOFT: 70.0, L.GRACEFUL: 80.0, L.AGGRESSIVE: 90.0, L.CIRCUIT_BREAK: 95.0}


class FakeClock:
    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def manager(clock: FakeClock) -> DegradationManager:
    return DegradationManager(clock=clock)


def at_level(manager: DegradationManager, clock: FakeClock, level: DegradationLevel) -> None:
    """Drive the manager to ``level`` by lag and let the cooldown pass."""
    manager.evaluate(LAG_TRIGGERS[level] if level else 0, 10.0)
    assert manager.level == level
    clock.advance(31)


def test_starts_normal_and_stays_normal_below_every_trigger(manager: DegradationManager) -> None:
    assert manager.evaluate(99_999, 69.9) == L.NORMAL
    assert manager.history == []
    assert manager.last_transition is None


@pytest.mark.parametrize("level", [L.SOFT, L.GRACEFUL, L.AGGRESSIVE, L.CIRCUIT_BREAK])
def test_lag_trigger_reaches_its_level_exactly_at_the_threshold(manager: DegradationManager, level) -> None:
    assert manager.evaluate(LAG_TRIGGERS[level] - 1, 0.0) == L(level - 1)
    assert manager.evaluate(LAG_TRIGGERS[level], 0.0) == level


@pytest.mark.parametrize("level", [L.SOFT, L.GRACEFUL, L.AGGRESSIVE, L.CIRCUIT_BREAK])
def test_memory_trigger_reaches_its_level(manager: DegradationManager, level) -> None:
    assert manager.evaluate(0, MEMORY_TRIGGERS[level] - 0.1) == L(level - 1)
    assert manager.evaluate(0, MEMORY_TRIGGERS[level]) == level
    assert manager.last_transition is not None
    assert (
        f"memory {MEMORY_TRIGGERS[level]:g}% >= {MEMORY_TRIGGERS[level]:g}% ({level.name})"
        in manager.last_transition.cause
    )


def test_escalation_jumps_straight_to_the_highest_triggered_level(manager: DegradationManager) -> None:
    assert manager.evaluate(612_000, 10.0) == L.GRACEFUL
    transition = manager.last_transition
    assert transition == manager.history[-1]
    assert (transition.from_level, transition.to_level) == (L.NORMAL, L.GRACEFUL)
    assert transition.cause == "lag 612,000 >= 500,000 (GRACEFUL)"
    assert manager.evaluate(6_000_000, 10.0) == L.CIRCUIT_BREAK
    assert len(manager.history) == 2


def test_the_stronger_signal_decides_and_both_are_named_when_equal(manager: DegradationManager) -> None:
    manager.evaluate(150_000, 91.0)  # lag says SOFT, memory says AGGRESSIVE
    assert manager.level == L.AGGRESSIVE
    assert manager.last_transition.cause == "memory 91% >= 90% (AGGRESSIVE)"
    manager.evaluate(5_000_000, 96.0)
    assert (
        manager.last_transition.cause == "lag 5,000,000 >= 5,000,000 (CIRCUIT_BREAK); memory 96% >= 95% (CIRCUIT_BREAK)"
    )


def test_escalation_ignores_the_cooldown(manager: DegradationManager, clock: FakeClock) -> None:
    manager.evaluate(100_000, 0.0)
    clock.advance(1)
    assert manager.evaluate(1_000_000, 0.0) == L.AGGRESSIVE


@pytest.mark.parametrize("level", [L.SOFT, L.GRACEFUL, L.AGGRESSIVE, L.CIRCUIT_BREAK])
def test_every_level_steps_down_one_level_when_below_half_the_trigger_after_cooldown(
    manager: DegradationManager, clock: FakeClock, level
) -> None:
    at_level(manager, clock, level)
    below_half = LAG_TRIGGERS[level] // 2 - 1
    assert manager.evaluate(below_half, 0.0) == L(level - 1)
    transition = manager.last_transition
    assert (transition.from_level, transition.to_level) == (level, L(level - 1))
    assert f"lag {below_half:,} < {LAG_TRIGGERS[level] // 2:,}" in transition.cause
    assert f"(recovering to {L(level - 1).name})" in transition.cause


def test_full_recovery_from_circuit_break_is_one_level_per_cooldown(
    manager: DegradationManager, clock: FakeClock
) -> None:
    manager.evaluate(5_000_000, 50.0)
    seen = []
    for _ in range(4):
        held = seen[-1] if seen else L.CIRCUIT_BREAK
        assert manager.evaluate(0, 10.0) == held  # inside the cooldown: no step yet
        clock.advance(30)
        seen.append(manager.evaluate(0, 10.0))
    assert seen == [L.AGGRESSIVE, L.GRACEFUL, L.SOFT, L.NORMAL]
    assert [(t.from_level, t.to_level) for t in manager.history] == [
        (L.NORMAL, L.CIRCUIT_BREAK),
        (L.CIRCUIT_BREAK, L.AGGRESSIVE),
        (L.AGGRESSIVE, L.GRACEFUL),
        (L.GRACEFUL, L.SOFT),
        (L.SOFT, L.NORMAL),
    ]
    assert manager.peak_level == L.CIRCUIT_BREAK


@pytest.mark.parametrize("level", [L.SOFT, L.GRACEFUL, L.AGGRESSIVE, L.CIRCUIT_BREAK])
def test_hysteresis_no_recovery_while_lag_is_at_or_above_half_the_trigger(
    manager: DegradationManager, clock: FakeClock, level
) -> None:
    at_level(manager, clock, level)
    half = LAG_TRIGGERS[level] // 2
    for lag in (LAG_TRIGGERS[level] - 1, half + 1, half):
        clock.advance(60)
        assert manager.evaluate(lag, 0.0) == level, f"left {level.name} at lag {lag}"
    clock.advance(60)
    assert manager.evaluate(half - 1, 0.0) == L(level - 1)


@pytest.mark.parametrize("level", [L.SOFT, L.GRACEFUL, L.AGGRESSIVE, L.CIRCUIT_BREAK])
def test_hysteresis_no_recovery_while_memory_is_at_or_above_90_percent_of_its_trigger(
    manager: DegradationManager, clock: FakeClock, level
) -> None:
    manager.evaluate(0, MEMORY_TRIGGERS[level])
    assert manager.level == level
    limit = MEMORY_TRIGGERS[level] * 0.9
    clock.advance(60)
    assert manager.evaluate(0, limit) == level
    clock.advance(60)
    assert manager.evaluate(0, limit - 0.01) == L(level - 1)


def test_recovery_needs_both_signals_low(manager: DegradationManager, clock: FakeClock) -> None:
    at_level(manager, clock, L.GRACEFUL)
    assert manager.evaluate(0, 75.0) == L.GRACEFUL  # memory 75 >= 72 (90 % of 80): hold; lag is 0
    assert manager.evaluate(300_000, 10.0) == L.GRACEFUL  # lag 300K >= 250K: hold; memory is low
    assert manager.evaluate(200_000, 71.0) == L.SOFT


def test_cooldown_blocks_recovery_until_30_seconds_after_the_last_transition(
    manager: DegradationManager, clock: FakeClock
) -> None:
    manager.evaluate(1_200_000, 0.0)
    assert manager.level == L.AGGRESSIVE
    clock.advance(29.9)
    assert manager.cooldown_remaining() == pytest.approx(0.1)
    assert manager.evaluate(0, 0.0) == L.AGGRESSIVE
    clock.advance(0.1)
    assert manager.cooldown_remaining() == 0
    assert manager.evaluate(0, 0.0) == L.GRACEFUL
    # the step down started a new cooldown
    clock.advance(10)
    assert manager.evaluate(0, 0.0) == L.GRACEFUL
    clock.advance(20)
    assert manager.evaluate(0, 0.0) == L.SOFT


def test_an_escalation_restarts_the_cooldown(manager: DegradationManager, clock: FakeClock) -> None:
    manager.evaluate(100_000, 0.0)  # SOFT at t0
    clock.advance(25)
    manager.evaluate(500_000, 0.0)  # GRACEFUL at t0+25
    clock.advance(10)  # 35 s after SOFT, 10 s after GRACEFUL
    assert manager.evaluate(0, 0.0) == L.GRACEFUL
    clock.advance(20)
    assert manager.evaluate(0, 0.0) == L.SOFT


def test_no_flapping_around_a_trigger(manager: DegradationManager, clock: FakeClock) -> None:
    """Lag oscillating around the GRACEFUL trigger gives one transition, not one per tick."""
    for tick in range(40):
        manager.evaluate(520_000 if tick % 2 == 0 else 480_000, 20.0)
        clock.advance(5)
    assert [(t.from_level, t.to_level) for t in manager.history] == [(L.NORMAL, L.GRACEFUL)]


def test_state_round_trips_through_json(manager: DegradationManager, clock: FakeClock) -> None:
    manager.evaluate(6_000_000, 0.0)
    clock.advance(31)
    manager.evaluate(0, 0.0)
    state = json.loads(json.dumps(manager.to_state()))
    restored = DegradationManager.from_state(state, clock=clock)
    assert restored.level == L.AGGRESSIVE
    assert restored.peak_level == L.CIRCUIT_BREAK
    assert restored.changed_at == manager.changed_at
    assert restored.history == manager.history
    assert restored.to_state() == manager.to_state()
    # the cooldown carries across ticks: 10 s later the restored manager still holds
    clock.advance(10)
    assert restored.evaluate(0, 0.0) == L.AGGRESSIVE
    clock.advance(20)
    assert restored.evaluate(0, 0.0) == L.GRACEFUL


def test_empty_state_is_a_fresh_manager_and_bad_state_is_a_clear_error(clock: FakeClock) -> None:
    assert DegradationManager.from_state(None, clock=clock).level == L.NORMAL
    assert DegradationManager.from_state({}, clock=clock).level == L.NORMAL
    with pytest.raises(K2Error, match="reset the sensor's cursor"):
        DegradationManager.from_state({"version": 1, "level": "MELTDOWN"}, clock=clock)
    with pytest.raises(K2Error, match="reset the sensor's cursor"):
        DegradationManager.from_state({"version": 99, "level": "SOFT"}, clock=clock)


def test_history_is_capped(clock: FakeClock) -> None:
    manager = DegradationManager(clock=clock, max_history=3)
    for _ in range(3):
        manager.evaluate(5_000_000, 0.0)
        for _ in range(4):
            clock.advance(31)
            manager.evaluate(0, 0.0)
    assert len(manager.history) == 3
    assert manager.history[-1].to_level == L.NORMAL


def test_transition_dict_round_trip() -> None:
    t = Transition(L.SOFT, L.AGGRESSIVE, 12.5, "lag 1,000,000 >= 1,000,000 (AGGRESSIVE)", 1_000_000, 40.0)
    assert t.to_dict()["from"] == "SOFT" and t.to_dict()["to"] == "AGGRESSIVE"
    assert Transition.from_dict(t.to_dict()) == t
    assert t.is_escalation


def test_transitions_are_logged_with_their_cause(
    manager: DegradationManager, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="k2.degradation"):
        manager.evaluate(612_000, 0.0)
        clock.advance(31)
        manager.evaluate(0, 0.0)
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert messages[0] == (logging.WARNING, "degradation NORMAL -> GRACEFUL: lag 612,000 >= 500,000 (GRACEFUL)")
    assert messages[1][0] == logging.INFO and messages[1][1].startswith("degradation GRACEFUL -> SOFT: lag 0 < 250,000")


def test_custom_thresholds_and_cooldown(clock: FakeClock) -> None:
    manager = DegradationManager(
        thresholds=DegradationThresholds(
            lag_messages=(10, 20, 30, 40), memory_percent=(50, 60, 70, 80), cooldown_seconds=2
        ),
        clock=clock,
    )
    assert manager.evaluate(30, 0.0) == L.AGGRESSIVE
    clock.advance(2)
    assert manager.evaluate(14, 0.0) == L.GRACEFUL


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lag_messages": (1, 2, 3)},
        {"lag_messages": (100, 50, 200, 300)},
        {"memory_percent": (0, 10, 20, 30)},
        {"cooldown_seconds": -1},
        {"recovery_lag_fraction": 0},
    ],
)
def test_bad_thresholds_are_refused(kwargs) -> None:
    with pytest.raises(K2Error):
        DegradationThresholds(**kwargs)


def test_bad_signals_are_refused(manager: DegradationManager) -> None:
    with pytest.raises(K2Error, match="lag cannot be negative"):
        manager.evaluate(-1, 0.0)
    with pytest.raises(K2Error, match="0..100"):
        manager.evaluate(0, 120.0)


def test_every_level_has_a_behaviour_description() -> None:
    assert set(LEVEL_BEHAVIOUR) == set(L)
    assert "enrichment" in describe_level(L.SOFT).lower()
    assert "tier-3" in describe_level(L.GRACEFUL)
    assert "spill" in describe_level(L.AGGRESSIVE).lower()
    assert "stop" in describe_level(L.CIRCUIT_BREAK).lower()


def test_system_memory_percent_reads_meminfo(tmp_path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       1000 kB\nMemFree:         100 kB\nMemAvailable:    250 kB\n")
    assert system_memory_percent(str(meminfo)) == 75.0
    assert system_memory_percent(str(tmp_path / "missing")) == 0.0


def test_check_status_warns_from_graceful_and_errors_at_circuit_break() -> None:
    from k2_resources.degradation.levels import check_status

    assert [check_status(level) for level in L] == [
        (True, "WARN"),
        (True, "WARN"),
        (False, "WARN"),
        (False, "WARN"),
        (False, "ERROR"),
    ]


def test_degradation_resource_defaults_and_overrides(k2_home, clock: FakeClock) -> None:
    from k2_resources.degradation.resource import DegradationResource

    default = DegradationResource()
    assert default.thresholds() == DegradationThresholds()
    assert default.load_shedder().tier("BHP") == 1  # no ranking in this K2_HOME: the static lists
    assert default.load_shedder({"ZZZ": 1e9}).tier("ZZZ") == 1  # volumes passed in rank by default
    assert DegradationResource(tiers_from_volume=False).load_shedder({"ZZZ": 1e9}).tier("ZZZ") == 3
    assert default.spill_store().root == k2_home / "spill"
    manager = default.manager(clock=clock)
    manager.evaluate(600_000, 0.0)
    assert default.manager(manager.to_state(), clock=clock).level == L.GRACEFUL

    custom = DegradationResource(
        lag_triggers=[10, 20, 30, 40], cooldown_seconds=1, tier1_symbols=["MWR"], tiers_from_volume=False
    )
    assert custom.manager(clock=clock).evaluate(35, 0.0) == L.AGGRESSIVE
    assert custom.load_shedder().tier("MWR") == 1 and custom.load_shedder().tier("BHP") == 3
    by_volume = DegradationResource(tiers_from_volume=True)
    assert by_volume.load_shedder({"ZZZ": 1e9}).tier("ZZZ") == 1
    with pytest.raises(K2Error, match="strictly increasing"):
        DegradationResource(lag_triggers=[5, 4, 3, 2]).thresholds()
