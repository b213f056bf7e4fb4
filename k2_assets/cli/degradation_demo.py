"""`k2 demo degradation [--json]`: a burst through the real stream path, up the levels and back.

In a fresh K2_HOME (a temporary folder) it starts its own Kafka broker on free ports and the
local Binance recording server, and holds the consumer back: a first wave of recorded trades goes
through the WebSocket client into Kafka before the stream sensor's first tick, the rest of the
burst right after it. With small lag triggers (500 / 1.5K / 3K / 6K, 1 s cooldown) the level
rises to CIRCUIT_BREAK; the real sensor and micro-batch job (in a real, ephemeral Dagster
instance) then drain the topic: probe batches and spills, deferred tier-3 rows (ETHUSDT is tier 3
here), stepwise recovery to NORMAL, and recovery runs that write every deferred and spilled range
back. It prints each transition with its cause and ends by checking that every trade the
recording server sent is in Iceberg exactly once. With ``--json`` the last line is
``{"max_level", "final_level", "transitions", "sent", "in_iceberg"}``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from k2_resources.kafka.topics import BINANCE_TRADES_TOPIC

BURST = 12_000  # recorded trades in the burst
FIRST_WAVE = 2_000  # in Kafka before the first tick: GRACEFUL
LAG_TRIGGERS = [500, 1_500, 3_000, 6_000]
COOLDOWN_S = 1.0
MAX_BATCH = 1_000
TIMEOUT_S = 600.0
QUIET_RUNS = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def _say(message: str) -> None:
    print(message, flush=True)


@contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Set environment variables for the demo and restore the previous values afterwards."""
    previous = {name: os.environ.get(name) for name in [*values, "DAGSTER_HOME"]}
    os.environ.pop("DAGSTER_HOME", None)
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_degradation_demo(json_output: bool, home: Path | None = None) -> int:
    """Run the scenario; 0 when the level reached AGGRESSIVE or higher, came back to NORMAL and
    every trade of the burst is in Iceberg exactly once, else 1. In ``home`` (`--home`), kept
    afterwards so its tables can be read; by default in a temporary folder, deleted at the end."""
    from k2_resources.platform.kafka_broker import KafkaBroker, free_port

    logging.disable(logging.WARNING)  # the demo prints its own progress; loggers say errors only
    keep = home is not None
    if home is None:
        home = Path(tempfile.mkdtemp(prefix="k2-degradation-demo-"))
    home.mkdir(parents=True, exist_ok=True)
    _say(f"K2_HOME={home}")
    broker = KafkaBroker(home=home / "kafka", port=free_port(), controller_port=free_port())
    try:
        with _environment(K2_HOME=str(home)):
            _say("starting Kafka ...")
            broker.start()
            with _environment(K2_KAFKA_BOOTSTRAP=broker.bootstrap_servers):
                summary = _scenario()
    finally:
        broker.stop()
        if not keep:
            shutil.rmtree(home, ignore_errors=True)
        logging.disable(logging.NOTSET)
    ok = (
        summary["max_level"] >= 3
        and summary["final_level"] == 0
        and summary["missing"] == 0
        and summary["sent"] == summary["expected"] == summary["in_iceberg"] == summary["in_iceberg_distinct"]
    )
    _say(
        f"max level {summary['max_level']}, final level {summary['final_level']}, "
        f"sent {summary['sent']:,}, in Iceberg {summary['in_iceberg']:,}: {'OK' if ok else 'FAILED'}"
    )
    if json_output:
        print(
            json.dumps({key: summary[key] for key in ("max_level", "final_level", "transitions", "sent", "in_iceberg")})
        )
    return 0 if ok else 1


def _scenario() -> dict[str, Any]:
    from dagster import DagsterInstance, Definitions

    from k2_assets.binance import defs as binance_defs
    from k2_assets.resources import build_resources
    from k2_resources.binance.recording_server import RecordingServerThread, load_recorded_trades
    from k2_resources.binance.streamer import stream_to_kafka
    from k2_resources.catalog.resource import IcebergResource
    from k2_resources.degradation.levels import DegradationLevel
    from k2_resources.degradation.resource import DegradationResource
    from k2_resources.sink.resource import TradeSinkResource
    from k2_sensors.binance.driver import checks_of, execute_requests, tick
    from k2_sensors.binance.stream_cursor import StreamCursor

    degradation = DegradationResource(
        lag_triggers=LAG_TRIGGERS,
        memory_triggers_percent=[101.0, 102.0, 103.0, 104.0],  # lag drives this scenario, not the machine's memory
        cooldown_seconds=COOLDOWN_S,
        tier1_symbols=["BTCUSDT"],
        tier2_symbols=[],  # ETHUSDT becomes tier 3: deferred at GRACEFUL
    )
    resources = build_resources()
    resources.update(
        sink=TradeSinkResource(topic=BINANCE_TRADES_TOPIC, max_batch_messages=MAX_BATCH), degradation=degradation
    )
    defs = Definitions.merge(binance_defs, Definitions(resources=resources))
    _say(
        f"lag triggers SOFT/GRACEFUL/AGGRESSIVE/CIRCUIT_BREAK = {LAG_TRIGGERS}, cooldown {COOLDOWN_S:g}s, "
        f"tier 1 BTCUSDT, tier 3 ETHUSDT; burst of {BURST:,} recorded trades"
    )

    transitions: list[dict[str, Any]] = []
    runs = {"ingest": 0, "recover": 0}
    recorded = load_recorded_trades()[:BURST]
    expected: set[str] = set()
    sent = 0
    started = time.monotonic()

    def send_wave(trades: list[Any]) -> int:
        """Play ``trades`` once, as fast as possible, through the WebSocket client into Kafka."""
        nonlocal expected
        with RecordingServerThread(speed=None, loop=False, trades=trades) as server:
            stats = stream_to_kafka(server.url, BINANCE_TRADES_TOPIC, idle_timeout_s=30)
            expected |= {f"BINANCE-{s}-{i}" for s, ids in server.stats().trade_ids.items() for i in ids}
        return stats.produced

    with DagsterInstance.ephemeral() as instance:
        cursor: str | None = None

        def step() -> dict[str, dict]:
            nonlocal cursor
            result = tick(instance, defs, cursor)
            cursor = result.cursor
            history = StreamCursor.from_json(cursor).degradation.get("history", [])
            for entry in history[len(transitions) :]:
                transitions.append({k: entry[k] for k in ("from", "to", "cause", "lag")})
                _say(f"  level {entry['from']} -> {entry['to']}: {entry['cause']}")
            for request in result.run_requests or []:
                runs[request.tags.get("k2/mode", "ingest")] += 1
            _, failed = execute_requests(instance, defs, result, extra_run_config=QUIET_RUNS)
            if failed:
                raise RuntimeError(f"{len(failed)} micro-batch run(s) failed: {'; '.join(failed)}")
            return checks_of(result)

        _say(
            f"wave 1: {FIRST_WAVE:,} trades through the local Binance recording server and the WebSocket client "
            "into Kafka, before the sensor's first tick ..."
        )
        sent += send_wave(recorded[:FIRST_WAVE])
        step()
        _say(f"wave 2: the other {BURST - FIRST_WAVE:,} trades while the consumer is held back ...")
        sent += send_wave(recorded[FIRST_WAVE:])
        _say(f"  {sent:,} trades in Kafka")

        deadline = time.monotonic() + TIMEOUT_S
        last_report = 0.0
        while True:
            checks = step()
            level = checks["degradation_level"]["metadata"]["level"]
            lag = checks["consumer_lag"]["metadata"]["lag_messages"]
            deferred = checks["deferred_backlog"]["metadata"]["ranges"]
            spilled = checks["spilled_backlog"]["metadata"]["ranges"]
            if time.monotonic() - last_report > 5:
                _say(
                    f"  [{time.monotonic() - started:5.1f}s] level {level}, lag {lag:,}, pending ranges: "
                    f"{deferred} deferred, {spilled} spilled; runs so far {runs['ingest']} ingest, "
                    f"{runs['recover']} recover"
                )
                last_report = time.monotonic()
            if level == "NORMAL" and lag == 0 and deferred == 0 and spilled == 0:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"the stream did not settle within {TIMEOUT_S:.0f}s (level {level}, lag {lag})")
            time.sleep(0.2)
        state = StreamCursor.from_json(cursor).degradation

    ids = IcebergResource().trades().scan(selected_fields=("message_id",)).to_arrow().column("message_id").to_pylist()
    missing = expected - set(ids)
    if missing:
        _say(f"  {len(missing)} sent trades are not in Iceberg, e.g. {sorted(missing)[:3]}")
    _say(f"done in {time.monotonic() - started:.1f}s: {runs['ingest']} ingest and {runs['recover']} recovery runs")
    return {
        "max_level": int(DegradationLevel[state["peak_level"]]),
        "final_level": int(DegradationLevel[state["level"]]),
        "transitions": transitions,
        "sent": sent,
        "in_iceberg": len(ids),
        "in_iceberg_distinct": len(set(ids)),
        "missing": len(missing),
        "expected": len(expected),
    }
