"""Benchmark: Kafka -> Iceberg through the exactly-once micro-batches, and event-to-Iceberg freshness.

Writes bench-results/stream.json:

- ``throughput``: 200K trade V2 messages (with the vendor fields a real Binance trade carries)
  already in a 3-partition topic are committed to market.trades by ``run_microbatch`` (read the
  exact range, decode, enrich, one Iceberg commit per range of at most 50K) in msg/s, next to
  the raw kafka-python consume rate of the same topic measured in the same run (poll every
  message, no decoding). Several rounds, raw and sink alternated (each sink round into a fresh
  table), so both sides meet the same load on a shared machine; the figures are the medians of
  the rounds and the ratio is the ratio of the medians. Every round is recorded with the load
  average, and the embedded broker's share of the 2 cores while the sink ran. The sink reads each
  range with one Fetch per ~16 MB and parses the record batches column-wise
  (``k2_resources/kafka/columnar_fetch.py``), so it does not pay kafka-python's per-message
  cost that the raw baseline measures.
- ``parallel_partitions``: 800K messages keyed by symbol (BTCUSDT, ETHUSDT) in a 2-partition
  topic, placed by K2's SymbolPartitioner (one symbol per partition), so one partition's round
  lasts over 5 s (at 200K a round lasted about 2 s and start-up noise decided the figure). The
  sink rate of one partition in one process, and of both partitions in two processes at once (as
  the daemon runs two micro-batch runs in parallel), each into a fresh table, alternated for
  several rounds; only the consume-to-commit phase is timed (each worker has imported everything
  and opened the table before a start barrier releases them). The speed-up is the ratio of the
  medians. Each round records the sink processes' CPU seconds, the broker's CPU share, the load,
  and what could serialise the two workers (``tests/support/sink_worker.py``): time spent waiting
  for a core, time inside the SQLite catalog's commit, and commits retried on a conflict or a
  locked catalog.
- ``freshness``: a producer sends at a steady 1,000 msg/s for 30 s, each record stamped with
  its event time; the real stream sensor (``evaluate_stream``) ticks every 5 s as the daemon
  would and its micro-batch ranges are run as they are requested. Each row's freshness is the
  commit time of the snapshot that brought its offset into the table (the snapshot summaries
  say which) minus its event time. Dagster's run-launch overhead (seconds per run with the
  default launcher) is not in this figure: it measures the sink, not the launcher.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from multiprocessing import get_context
from pathlib import Path

import pytest
from dagster import DagsterInstance
from kafka import TopicPartition

from k2_resources.catalog.resource import IcebergResource
from k2_resources.kafka.partitioner import SymbolPartitioner, symbol_partition
from k2_resources.kafka.resource import KafkaResource
from k2_resources.paths import PROJECT_ROOT
from k2_resources.schemas import TradeV2, encode_trade
from k2_resources.sink.microbatch import run_microbatch
from k2_resources.sink.offsets import OffsetRange
from k2_resources.sink.resource import TradeSinkResource
from k2_sensors.binance.stream_sensor import evaluate_stream
from tests.support.bench_results import merge_bench_json

THROUGHPUT_MESSAGES = 200_000
PARTITIONS = 3
ROUNDS = 3
PARALLEL_ROUNDS = 3
PARALLEL_MESSAGES = 800_000  # 400K per partition: over 5 s per round at the one-process rate (~70K msg/s)
PARALLEL_SYMBOLS = ("BTCUSDT", "ETHUSDT")
MICROBATCH = 50_000
STEADY_RATE = 1_000
STEADY_SECONDS = 30
SENSOR_INTERVAL_S = 5.0


def _payload(index: int, event_time: datetime, symbol: str | None = None) -> bytes:
    symbol = symbol or ("BTCUSDT", "ETHUSDT", "BNBUSDT")[index % 3]
    event_ms = int(event_time.timestamp() * 1000)
    return encode_trade(
        TradeV2(
            message_id=f"BINANCE-{symbol}-{index}",
            trade_id=f"BINANCE-{index}",
            symbol=symbol,
            exchange="BINANCE",
            asset_class="crypto",
            timestamp=event_time,
            price=Decimal("61837.63") + Decimal(index % 1000) / 100,
            quantity=Decimal("0.00120000"),
            currency="USDT",
            side=("BUY", "SELL")[index % 2],
            source_sequence=index,
            ingestion_timestamp=event_time,
            # What normalise_trade keeps of a live Binance trade message.
            vendor_data={
                "E": str(event_ms),
                "b": str(20720542158 + index),
                "a": str(20720542592 + index),
                "m": "true" if index % 2 else "false",
                "M": "true",
                "stream": f"{symbol.lower()}@trade",
            },
        ).to_record()
    )


def _fill(kafka: KafkaResource, topic: str, count: int) -> None:
    producer = kafka.producer()
    base = datetime(2024, 8, 9, tzinfo=UTC)
    for index in range(count):
        producer.send(topic, value=_payload(index, base + timedelta(milliseconds=index)), partition=index % PARTITIONS)
    producer.flush()
    producer.close()


def _raw_consume_rate(kafka: KafkaResource, topic: str, count: int) -> float:
    consumer = kafka.consumer()
    partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    seen = 0
    start = time.perf_counter()
    while seen < count:
        for batch in consumer.poll(timeout_ms=1000).values():
            seen += len(batch)
    elapsed = time.perf_counter() - start
    consumer.close()
    return count / elapsed


def _cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of process ``pid`` so far (0 when it cannot be read)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError, TypeError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _BrokerShare:
    """The broker's share of the machine's cores between ``__enter__`` and ``__exit__``."""

    def __init__(self, pid: int | None) -> None:
        self.pid, self.share = pid, None

    def __enter__(self) -> _BrokerShare:
        self.cpu, self.wall = _cpu_seconds(self.pid), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self.wall
        self.share = round((_cpu_seconds(self.pid) - self.cpu) / (wall * (os.cpu_count() or 1)), 3)


def _sink_rate(kafka: KafkaResource, iceberg: IcebergResource, topic: str, count: int) -> tuple[float, int]:
    ends = kafka.end_offsets(topic)
    assert sum(ends.values()) == count
    iceberg.trades()  # the table exists in steady state: creating it is not the sink's work
    start = time.perf_counter()
    commits = 0
    for partition, end in sorted(ends.items()):
        for begin in range(0, end, MICROBATCH):
            run_microbatch(kafka, iceberg, OffsetRange(topic, partition, begin, min(begin + MICROBATCH, end)))
            commits += 1
    return count / (time.perf_counter() - start), commits


def _fill_symbol(topic: str, count: int, which: int) -> None:
    """Messages ``which``, ``which + n``, ... of ``count`` (those of symbol ``which``), keyed by
    symbol and placed by K2's partitioner (no explicit partition)."""
    producer = KafkaResource().producer(partitioner=SymbolPartitioner())
    base = datetime(2024, 8, 9, tzinfo=UTC)
    symbol = PARALLEL_SYMBOLS[which]
    for index in range(which, count, len(PARALLEL_SYMBOLS)):
        producer.send(topic, key=symbol.encode(), value=_payload(index, base + timedelta(milliseconds=index), symbol))
    producer.flush()
    producer.close()


def _fill_keyed(topic: str, count: int) -> None:
    """``count`` messages, the symbols alternating, one producer process per symbol (encoding is
    most of the cost; two processes fill the topic in half the time)."""
    with ProcessPoolExecutor(len(PARALLEL_SYMBOLS), mp_context=get_context("spawn")) as pool:
        for filled in [pool.submit(_fill_symbol, topic, count, which) for which in range(len(PARALLEL_SYMBOLS))]:
            filled.result()


def _parallel_sink_rate(
    kafka: KafkaResource, topic: str, partitions: list[int], home: Path, broker_pid: int | None = None
) -> dict:
    """msg/s of sinking ``partitions`` of ``topic``, one process each, all released at once (with
    the processes' CPU seconds and the broker's CPU share meanwhile)."""
    home.mkdir(parents=True)
    env = {**os.environ, "K2_HOME": str(home)}
    with pytest.MonkeyPatch.context() as patch:  # create the table once, before the sinks start
        patch.setenv("K2_HOME", str(home))
        IcebergResource().trades()
    ends = kafka.end_offsets(topic)
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.support.sink_worker", topic, str(p), str(ends[p]), str(MICROBATCH)],
            env=env,
            cwd=PROJECT_ROOT,
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        for p in partitions
    ]
    try:
        for worker in workers:
            assert worker.stdout.readline().strip() == "ready"
        with _BrokerShare(broker_pid) as broker:
            for worker in workers:
                worker.stdin.write("go\n")
                worker.stdin.flush()
            reports = [json.loads(worker.stdout.readline()) for worker in workers]
        for worker in workers:
            assert worker.wait(timeout=120) == 0
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    assert {r["partition"]: r["written"] for r in reports} == {p: ends[p] for p in partitions}
    seconds = max(r["ended"] for r in reports) - min(r["started"] for r in reports)

    def total(field: str) -> float:
        return round(sum(r[field] for r in reports), 3)

    # Each worker's wall time without the time it waited for a core (other processes had it): what
    # the round would take on cores of its own. What is left beyond its CPU time is time blocked
    # (Kafka fetches, file writes, the catalog's lock, the retry back-off).
    workers = [
        {
            "partition": r["partition"],
            "seconds": round(r["ended"] - r["started"], 3),
            "cpu_s": round(r["cpu_s"], 3),
            "runqueue_wait_s": round(r["runqueue_wait_s"], 3),
            "blocked_s": round(r["ended"] - r["started"] - r["cpu_s"] - r["runqueue_wait_s"], 3),
        }
        for r in reports
    ]
    own_seconds = max(w["seconds"] - w["runqueue_wait_s"] for w in workers)
    return {
        "msg_s": round(sum(ends[p] for p in partitions) / seconds),
        "seconds": round(seconds, 3),
        "msg_s_without_core_waits": round(sum(ends[p] for p in partitions) / own_seconds),
        "sink_cpu_s": total("cpu_s"),
        "broker_cpu_share": broker.share,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "runqueue_wait_s": total("runqueue_wait_s"),
        "commit_s": total("commit_s"),
        "catalog_commit_s": total("catalog_commit_s"),
        "catalog_commits": sum(r["catalog_commits"] for r in reports),
        "commit_conflicts": sum(r["conflicts"] for r in reports),
        "catalog_locked_retries": sum(r["catalog_locked"] for r in reports),
        "workers": workers,
    }


def _parallel_partitions(kafka: KafkaResource, topic: str, home: Path, broker_pid: int | None = None) -> dict:
    kafka.ensure_topic(topic, partitions=len(PARALLEL_SYMBOLS))
    _fill_keyed(topic, PARALLEL_MESSAGES)
    ends = kafka.end_offsets(topic)
    # The key scheme put each symbol in a partition of its own, evenly.
    assert {symbol_partition(s, len(PARALLEL_SYMBOLS)) for s in PARALLEL_SYMBOLS} == set(ends)
    assert sorted(ends.values()) == [PARALLEL_MESSAGES // len(PARALLEL_SYMBOLS)] * len(PARALLEL_SYMBOLS)
    ones, boths = [], []
    for attempt in range(PARALLEL_ROUNDS):  # alternated, so both sides meet the same load
        ones.append(_parallel_sink_rate(kafka, topic, [0], home / f"one-{attempt}", broker_pid))
        boths.append(_parallel_sink_rate(kafka, topic, sorted(ends), home / f"two-{attempt}", broker_pid))
    one = statistics.median(r["msg_s"] for r in ones)
    both = statistics.median(r["msg_s"] for r in boths)

    def median(rounds: list[dict], field: str) -> float:
        return round(statistics.median(r[field] for r in rounds), 3)

    return {
        "messages": PARALLEL_MESSAGES,
        "partitions": len(ends),
        "symbol_partitions": {s: symbol_partition(s, len(ends)) for s in PARALLEL_SYMBOLS},
        "one_partition_one_process_msg_s": round(one),
        "two_partitions_two_processes_msg_s": round(both),
        "speed_up": round(both / one, 3),
        "speed_up_quietest_rounds": round(
            min(boths, key=lambda r: r["runqueue_wait_s"])["msg_s"]
            / min(ones, key=lambda r: r["runqueue_wait_s"])["msg_s"],
            3,
        ),
        # The same ratio of medians with each worker's time waiting for a core taken out: an estimate
        # of what two partitions gain on two cores that no other process uses (this machine is shared).
        "speed_up_without_core_waits": round(
            median(boths, "msg_s_without_core_waits") / median(ones, "msg_s_without_core_waits"), 3
        ),
        "cpu_cores": os.cpu_count(),
        # What could make the two workers wait for each other, medians over the rounds (seconds
        # summed over the round's workers): if the catalog serialised them, catalog_commit_s and
        # the retries would grow from one worker to two while the messages per worker stay the same.
        "serialisation": {
            "blocked_s_per_worker": {
                name: statistics.median(w["blocked_s"] for r in rounds for w in r["workers"])
                for name, rounds in (("one_partition", ones), ("two_partitions", boths))
            },
            "one_partition": {
                f: median(ones, f)
                for f in (
                    "seconds",
                    "sink_cpu_s",
                    "runqueue_wait_s",
                    "commit_s",
                    "catalog_commit_s",
                    "commit_conflicts",
                    "catalog_locked_retries",
                )
            },
            "two_partitions": {
                f: median(boths, f)
                for f in (
                    "seconds",
                    "sink_cpu_s",
                    "runqueue_wait_s",
                    "commit_s",
                    "catalog_commit_s",
                    "commit_conflicts",
                    "catalog_locked_retries",
                )
            },
        },
        "rounds": {"one_partition": ones, "two_partitions": boths},
    }


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _freshness(kafka: KafkaResource, iceberg: IcebergResource, topic: str) -> dict:
    sink = TradeSinkResource(topic=topic, max_batch_messages=50_000)
    stop = threading.Event()
    sent = {"count": 0}

    def produce_steadily() -> None:
        producer = kafka.producer(linger_ms=0)
        started = time.monotonic()
        while not stop.is_set() and sent["count"] < STEADY_RATE * STEADY_SECONDS:
            due = started + sent["count"] / STEADY_RATE
            delay = due - time.monotonic()
            if delay > 0:
                stop.wait(delay)  # pacing the producer to the target rate, not waiting on a race
            producer.send(topic, value=_payload(sent["count"], datetime.now(UTC)), partition=sent["count"] % PARTITIONS)
            sent["count"] += 1
        producer.flush()
        producer.close()

    producer_thread = threading.Thread(target=produce_steadily, daemon=True)
    producer_thread.start()
    cursor = None
    with DagsterInstance.ephemeral() as instance:
        deadline = time.monotonic() + STEADY_SECONDS + 120
        while time.monotonic() < deadline:
            tick_started = time.monotonic()
            result = evaluate_stream(instance, cursor, kafka, iceberg, sink)
            cursor = result.cursor
            for request in result.run_requests:
                config = request.run_config["ops"]["binance_trades"]["config"]
                run_microbatch(
                    kafka,
                    iceberg,
                    OffsetRange(config["topic"], config["partition"], config["start_offset"], config["end_offset"]),
                )
            lag = next(e for e in result.asset_events if e.check_name == "consumer_lag").metadata["lag_messages"].value
            if not producer_thread.is_alive() and lag == 0 and not result.run_requests:
                break
            stop.wait(max(0.0, SENSOR_INTERVAL_S - (time.monotonic() - tick_started)))
    stop.set()
    producer_thread.join(timeout=30)

    # Commit time of the snapshot that brought each offset range in, from the table's own metadata.
    table = iceberg.trades()
    commit_ms: dict[tuple[int, int, int], int] = {}
    for snapshot in table.snapshots():
        props = snapshot.summary.additional_properties if snapshot.summary else {}
        if props.get("k2.kafka.topic") == topic:
            commit_ms[
                (
                    int(props["k2.kafka.partition"]),
                    int(props["k2.kafka.start-offset"]),
                    int(props["k2.kafka.end-offset"]),
                )
            ] = snapshot.timestamp_ms
    rows = (
        table.scan(row_filter="exchange = 'BINANCE'", selected_fields=("timestamp", "platform_sequence", "trade_id"))
        .to_arrow()
        .to_pylist()
    )
    latencies = []
    for row in rows:
        offset = row["platform_sequence"]
        partition = int(row["trade_id"].split("-")[1]) % PARTITIONS
        committed_at = next(ms for (p, start, end), ms in commit_ms.items() if p == partition and start <= offset < end)
        latencies.append(committed_at / 1000 - row["timestamp"].timestamp())
    return {
        "input_rate_msg_s": STEADY_RATE,
        "messages": len(rows),
        "sent": sent["count"],
        "sensor_interval_s": SENSOR_INTERVAL_S,
        "p50_s": round(_percentile(latencies, 0.50), 3),
        "p99_s": round(_percentile(latencies, 0.99), 3),
        "max_s": round(max(latencies), 3),
        "mean_s": round(statistics.fmean(latencies), 3),
    }


@pytest.mark.timeout(1800)
def test_stream_benchmark(k2_home, kafka_broker, topic_name, monkeypatch):
    kafka, iceberg = KafkaResource(), IcebergResource()
    kafka.ensure_topic(topic_name, partitions=PARTITIONS)
    _fill(kafka, topic_name, THROUGHPUT_MESSAGES)
    raw_rates, sink_rates, rounds = [], [], []
    for attempt in range(ROUNDS):
        monkeypatch.setenv("K2_HOME", str(k2_home / f"throughput-{attempt}"))
        iceberg = IcebergResource()
        raw_rates.append(_raw_consume_rate(kafka, topic_name, THROUGHPUT_MESSAGES))
        with _BrokerShare(kafka_broker.pid()) as broker:
            sink_rate, commits = _sink_rate(kafka, iceberg, topic_name, THROUGHPUT_MESSAGES)
        sink_rates.append(sink_rate)
        rounds.append(
            {
                "raw_msg_s": round(raw_rates[-1]),
                "k2_msg_s": round(sink_rate),
                "broker_cpu_share_during_sink": broker.share,
                "load_average_1m": round(os.getloadavg()[0], 2),
            }
        )
        assert iceberg.trades().scan().count() == THROUGHPUT_MESSAGES
    raw_rate, sink_rate = statistics.median(raw_rates), statistics.median(sink_rates)

    parallel = _parallel_partitions(kafka, f"{topic_name}-keyed", k2_home / "parallel", kafka_broker.pid())

    # A table of its own for the freshness run, so only its rows are measured.
    monkeypatch.setenv("K2_HOME", str(k2_home / "steady"))
    steady_topic = f"{topic_name}-steady"
    kafka.ensure_topic(steady_topic, partitions=PARTITIONS)
    freshness = _freshness(kafka, IcebergResource(), steady_topic)
    assert freshness["messages"] == freshness["sent"] == STEADY_RATE * STEADY_SECONDS

    result = {
        "benchmark": "stream",
        "measured_at": datetime.now(UTC).isoformat(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "throughput": {
            "messages": THROUGHPUT_MESSAGES,
            "partitions": PARTITIONS,
            "iceberg_commits": commits,
            "k2_kafka_to_iceberg_msg_s": round(sink_rate),  # median of the rounds
            "baseline_raw_kafka_python_consume_msg_s": round(raw_rate),  # median of the rounds
            "ratio_to_baseline": round(sink_rate / raw_rate, 3),  # ratio of the medians
            "rounds": rounds,
        },
        "parallel_partitions": parallel,
        "freshness": freshness,
    }
    merge_bench_json("stream.json", result)  # keeps bench_freshness's freshness_deployed
    print(json.dumps(result, indent=2))
