"""Degradation policy of the stream path: how the platform bends under load instead of breaking.

``levels`` holds the levels NORMAL, SOFT, GRACEFUL, AGGRESSIVE and CIRCUIT_BREAK and the manager
that moves between them (triggers, hysteresis, cooldown); ``shedding`` the symbol tiers and the
work each level postpones; ``spill`` the local Parquet store of raw batches spilled at AGGRESSIVE;
``resource`` the ``DegradationResource`` that configures all three for the stream sensor and the
micro-batches.
"""
