"""The stream path's thresholds, defined once: degradation triggers, check severities and alert levels.

Three consumers read these numbers and must agree: the degradation manager (when the level
moves), the stream sensor's asset checks (when ``consumer_lag`` and ``degradation_level`` turn
WARN or ERROR) and the Prometheus alert rules in ``infra/prometheus/rules/k2-alerts.yml`` (when
an alert fires). YAML cannot import Python, so the rules repeat the numbers and
``tests/unit/test_thresholds.py`` parses the rules and fails when they differ from these.

Why these values. The degradation triggers are the design brief's (lag 100K/500K/1M/5M
messages, memory 70/80/90/95 %). The lag check and the lag alert follow the same ladder rather
than a ladder of their own: WARN (check) / warning (alert) at the SOFT trigger, 100K, where the
platform itself starts to change what it does, so yellow means "K2 is degrading", never "a big
batch is in flight"; ERROR / critical at the AGGRESSIVE trigger, 1M, where raw batches spill to
local disk and Kafka retention becomes the clock on data loss. The degradation-level check and
alert warn from GRACEFUL (data is deferred) and are ERROR / critical at CIRCUIT_BREAK (no new
batches). A threshold is reached at ``value >= threshold`` everywhere.
"""

from __future__ import annotations

# Lag (messages, summed over a topic's partitions) entering SOFT, GRACEFUL, AGGRESSIVE, CIRCUIT_BREAK.
LAG_TRIGGERS: tuple[int, int, int, int] = (100_000, 500_000, 1_000_000, 5_000_000)
# Memory use (%) entering the same levels.
MEMORY_TRIGGERS_PERCENT: tuple[float, float, float, float] = (70.0, 80.0, 90.0, 95.0)
# Recovery only below these fractions of the current level's trigger, and after the cooldown.
RECOVERY_LAG_FRACTION = 0.5
RECOVERY_MEMORY_FRACTION = 0.9
COOLDOWN_SECONDS = 30.0

# The consumer_lag check and the K2ConsumerLagHigh alert.
LAG_WARN_MESSAGES = LAG_TRIGGERS[0]  # SOFT
LAG_ERROR_MESSAGES = LAG_TRIGGERS[2]  # AGGRESSIVE

# The degradation_level check and the K2DegradationLevel alert (levels: 0 NORMAL .. 4 CIRCUIT_BREAK).
DEGRADATION_WARN_LEVEL = 2  # GRACEFUL
DEGRADATION_ERROR_LEVEL = 4  # CIRCUIT_BREAK
