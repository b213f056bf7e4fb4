"""Query API benchmark: wrk with 50 connections against the real `k2 api`; writes bench-results/api.json.

Data (synthetic, drawn from the real trades' distributions, see tests/support/synthetic.py): the
real ASX 10-14 March 2014 trades (about 200K rows) and 400K BTCUSDT/ETHUSDT trades ending now in
Iceberg; 30K more Binance trades in a real Kafka topic, the first 6K committed by real
micro-batches. During the whole run a producer thread keeps sending Binance trades stamped with
the wall clock (``STREAM_PER_S``) and the real follower (k2_resources.sink.follow) commits every
partition's new offsets every second, with continuous maintenance as deployed, so the table gets
new snapshots under the reads and the recent window always holds the last seconds of the stream.

The server is the real command (`python -m k2_assets.cli api`, uvicorn, one process) in a
subprocess with the benchmark's baseline route on (K2_API_BENCH_ROUTE=1). The load generator is
wrk (C; Debian's package, see infra/scripts/system-deps.sh): ``CONNECTIONS`` connections, two
threads, each connection sending its next request when the last one answered, for ``DURATION_S``.
Cases (api.json key: one object each):

- ``recent_json``: ``/v1/trades/recent?symbol=BTCUSDT&minutes=5``, the first page of 1000 rows, JSON;
- ``recent_arrow``: the same in Arrow IPC (``Accept: application/vnd.apache.arrow.stream``);
- ``point_json``: ``/v1/trades?symbol=BHP&start=<12 March 2014 Sydney>&end=<13 March>``, JSON;
- each with ``baseline_rps``: ``/v1/_bench/bytes?size=<that case's body size>`` measured right
  after it (same middleware, key check and rate limit; pre-encoded bytes), and
  ``ratio_to_baseline``;
- ``overload``: ``OVERLOAD_CONNECTIONS`` connections on ``recent_json`` against the server's
  admission limit (K2_API_MAX_IN_FLIGHT=``MAX_IN_FLIGHT``): ``status_503`` counts the refusals
  (``retry_after`` those carrying Retry-After), ``p99_ms`` is the p99 of the answered (200)
  requests as seen by a probe client sending one request at a time among the load (wrk's own
  percentiles mix the fast 503s in; they are kept as ``wrk_p99_ms_all``).

Timing is reported, not asserted: tests/support/bench_judge.py judges it against
tests/benchmarks/targets.toml. The machine is shared (other runs, the producer, the follower and
wrk all share its cores): the load average is recorded per case. The ``subscribe`` key of
api.json belongs to bench_subscribe.py; this file merges its keys in and keeps the others.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from k2_resources.analytics.ohlcv import exchange_day_bounds
from k2_resources.api.keys import KeyFile
from k2_resources.catalog.resource import IcebergResource
from k2_resources.kafka.resource import KafkaResource
from k2_resources.operations.continuous_maintenance import ContinuousMaintenance
from k2_resources.paths import PROJECT_ROOT
from k2_resources.platform.kafka_broker import free_port
from k2_resources.schemas import encode_trade
from k2_resources.sink.follow import FollowSettings, follow_topic
from k2_resources.sink.microbatch import run_microbatch
from k2_resources.sink.offsets import OffsetRange
from tests.support import synthetic
from tests.support.api_server import wait_until_serving

RESULTS = PROJECT_ROOT / "bench-results" / "api.json"
CONNECTIONS = 50
OVERLOAD_CONNECTIONS = 400
MAX_IN_FLIGHT = 64
DURATION_S = 15
WARMUP_S = 3
BINANCE_ICEBERG_ROWS = 400_000
KAFKA_ROWS = 30_000
KAFKA_COMMITTED = 6_000
PARTITIONS = 3
STREAM_PER_S = 200
ARROW = "application/vnd.apache.arrow.stream"

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]

_LUA = """
wrk.headers["X-API-Key"] = "%(key)s"
wrk.headers["Accept"] = "%(accept)s"
local threads = {}
function setup(thread) table.insert(threads, thread) end
%(response)s
function done(summary, latency, requests)
  local s503, retry = 0, 0
  for _, t in ipairs(threads) do
    s503 = s503 + (t:get("s503") or 0)
    retry = retry + (t:get("retry") or 0)
  end
  local e = summary.errors
  io.write(string.format('K2JSON {"requests":%%d,"duration_us":%%d,"p50_us":%%d,"p99_us":%%d,"max_us":%%d,' ..
    '"status_errors":%%d,"socket_errors":%%d,"status_503":%%d,"retry_after":%%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency.max,
    e.status, e.connect + e.read + e.write + e.timeout, s503, retry))
end
"""
_COUNT_503 = """
function init(args) s503 = 0; retry = 0 end
function response(status, headers, body)
  if status == 503 then
    s503 = s503 + 1
    if headers["Retry-After"] or headers["retry-after"] then retry = retry + 1 end
  end
end
"""


def build(kafka: KafkaResource, iceberg: IcebergResource, topic: str) -> dict:
    started = time.perf_counter()
    asx = synthetic.asx_trades(1)
    synthetic.append_in_chunks(iceberg.trades(), asx, 1_000_000)
    binance = synthetic.binance_trades(BINANCE_ICEBERG_ROWS + KAFKA_ROWS, datetime.now(UTC))
    synthetic.append_in_chunks(iceberg.trades(), synthetic.to_trades_arrow(binance.head(BINANCE_ICEBERG_ROWS)), 250_000)
    kafka.ensure_topic(topic, partitions=PARTITIONS)
    producer = kafka.producer()
    for index, record in enumerate(synthetic.to_records(binance.tail(KAFKA_ROWS))):
        producer.send(
            topic,
            key=record["symbol"].encode(),
            value=encode_trade(record),
            partition=index % PARTITIONS,
            timestamp_ms=int(record["timestamp"].timestamp() * 1000),
        )
    producer.flush()
    producer.close()
    for partition in range(PARTITIONS):
        run_microbatch(kafka, iceberg, OffsetRange(topic, partition, 0, KAFKA_COMMITTED // PARTITIONS))
    return {
        "iceberg_rows": asx.num_rows + BINANCE_ICEBERG_ROWS + KAFKA_COMMITTED,
        "asx_rows": asx.num_rows,
        "kafka_tail_rows": KAFKA_ROWS - KAFKA_COMMITTED,
        "build_seconds": round(time.perf_counter() - started, 1),
    }


class LiveStream:
    """A producer sending trades stamped with the wall clock, and the real follower committing each second."""

    def __init__(self, kafka: KafkaResource, iceberg: IcebergResource, topic: str) -> None:
        self.kafka, self.iceberg, self.topic = kafka, iceberg, topic
        self.stop = threading.Event()
        self.sent = 0
        self.commits = 0
        self.errors: list[str] = []
        # As deployed (`k2 run`): continuous maintenance with its default settings, its commits
        # between the follower's cycles; the reads meet the table it keeps.
        self.maintenance = ContinuousMaintenance(iceberg)
        templates = synthetic.binance_trades(20_000, datetime.now(UTC), seed=29)
        self._records = synthetic.to_records(templates)
        self._threads = [
            threading.Thread(target=self._produce, name="bench-api-producer", daemon=True),
            threading.Thread(target=self._follow, name="bench-api-follower", daemon=True),
        ]

    def __enter__(self) -> LiveStream:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def _produce(self) -> None:
        producer = self.kafka.producer()
        tick = 0.05
        try:
            while not self.stop.is_set():
                for _ in range(int(STREAM_PER_S * tick)):
                    record = dict(self._records[self.sent % len(self._records)])
                    now = datetime.now(UTC)
                    record.update(timestamp=now, ingestion_timestamp=now, message_id=f"bench-live-{self.sent}")
                    producer.send(
                        self.topic,
                        key=record["symbol"].encode(),
                        value=encode_trade(record),
                        partition=self.sent % PARTITIONS,
                        timestamp_ms=int(now.timestamp() * 1000),
                    )
                    self.sent += 1
                producer.flush()
                self.stop.wait(tick)
        except Exception as exc:  # reported in api.json, not raised from a thread
            self.errors.append(f"producer: {type(exc).__name__}: {exc}")
        finally:
            producer.close()

    def _follow(self) -> None:
        settings = FollowSettings(interval_s=1.0, run_for_s=3600, memory_limit_percent=100.0)
        self.maintenance.start()

        def counted(result) -> None:
            if not result.already_committed:
                self.commits += 1

        try:
            while not self.stop.is_set():
                follow_topic(
                    self.kafka,
                    self.iceberg,
                    self.topic,
                    settings,
                    counted,
                    should_stop=self.stop.is_set,
                    pause=self.maintenance.window.pause,
                )
        except Exception as exc:
            self.errors.append(f"follower: {type(exc).__name__}: {exc}")
        finally:
            self.maintenance.stop()


def wrk(url: str, key: str, accept: str, connections: int, duration_s: float, tmp: Path, count_503: bool) -> dict:
    """One wrk run; its figures (latencies in ms)."""
    script = tmp / f"wrk-{connections}-{count_503}.lua"
    script.write_text(_LUA % {"key": key, "accept": accept, "response": _COUNT_503 if count_503 else ""})
    command = [
        "wrk",
        "-t2",
        f"-c{connections}",
        f"-d{duration_s:g}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url,
    ]
    output = subprocess.run(command, capture_output=True, text=True, timeout=duration_s + 60, check=True).stdout
    line = next(line for line in output.splitlines() if line.startswith("K2JSON "))
    raw = json.loads(line.removeprefix("K2JSON "))
    seconds = raw["duration_us"] / 1e6
    return {
        "rps": round(raw["requests"] / seconds, 1),
        "p50_ms": round(raw["p50_us"] / 1000, 1),
        "p99_ms": round(raw["p99_us"] / 1000, 1),
        "max_ms": round(raw["max_us"] / 1000, 1),
        "requests": raw["requests"],
        "errors": raw["status_errors"] + raw["socket_errors"],
        "status_errors": raw["status_errors"],  # answers that were not 2xx/3xx
        "socket_errors": raw["socket_errors"],  # connect, read, write and 10 s timeouts
        "status_503": raw["status_503"],
        "retry_after": raw["retry_after"],
    }


def settle(base_url: str, deadline_s: float = 60.0) -> None:
    """Wait until the server answers no request: a wrk run that ends leaves its last requests in
    flight, and the next run's fresh connections would meet the admission limit with them."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        metrics = httpx.get(base_url + "/metrics", timeout=10).text
        in_flight = [line for line in metrics.splitlines() if line.startswith("k2_api_requests_in_flight ")]
        if in_flight and float(in_flight[0].split()[1]) == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"the API still answered requests {deadline_s:g} s after wrk stopped")


def _one(base_url: str, key: str, path: str, params: dict, accept: str) -> httpx.Response:
    response = httpx.get(base_url + path, params=params, headers={"X-API-Key": key, "Accept": accept}, timeout=60)
    assert response.status_code == 200, response.text
    return response


def measure_case(base_url: str, key: str, path: str, params: dict, accept: str, tmp: Path) -> dict:
    """The case under wrk, then the baseline route with a body of the same size."""
    sample = _one(base_url, key, path, params, accept)
    url = str(httpx.URL(base_url + path, params=params))
    wrk(url, key, accept, CONNECTIONS, WARMUP_S, tmp, False)
    settle(base_url)
    measured = wrk(url, key, accept, CONNECTIONS, DURATION_S, tmp, False)
    settle(base_url)
    measured["load_average_1m"] = round(os.getloadavg()[0], 2)
    measured["body_bytes"] = len(sample.content)
    if accept == "application/json":
        measured["rows_per_response"] = sample.json()["count"]
    baseline_url = f"{base_url}/v1/_bench/bytes?size={len(sample.content)}"
    wrk(baseline_url, key, accept, CONNECTIONS, WARMUP_S, tmp, False)
    settle(base_url)
    baseline = wrk(baseline_url, key, accept, CONNECTIONS, DURATION_S, tmp, False)
    settle(base_url)
    measured["baseline_rps"] = baseline["rps"]
    measured["baseline_p99_ms"] = baseline["p99_ms"]
    measured["ratio_to_baseline"] = round(measured["rps"] / baseline["rps"], 3) if baseline["rps"] else None
    return measured


def measure_overload(base_url: str, key: str, path: str, params: dict, tmp: Path) -> dict:
    """OVERLOAD_CONNECTIONS on one case; a probe client times the answered requests meanwhile."""
    url = str(httpx.URL(base_url + path, params=params))
    answered: list[float] = []
    refused: list[float] = []
    result: dict = {}

    def load() -> None:
        result.update(wrk(url, key, "application/json", OVERLOAD_CONNECTIONS, DURATION_S, tmp, True))

    runner = threading.Thread(target=load)
    runner.start()
    with httpx.Client(headers={"X-API-Key": key}, timeout=30) as probe:
        saturated = False  # counted from the server's first refusal: the overload is on from then
        while runner.is_alive():
            sent = time.perf_counter()
            response = probe.get(url)
            elapsed = (time.perf_counter() - sent) * 1000
            saturated = saturated or response.status_code == 503
            if saturated:
                (answered if response.status_code == 200 else refused).append(elapsed)
            if response.status_code == 503:
                time.sleep(0.01)  # a client's back-off after a refusal (Retry-After, shortened), not a wait
    runner.join()
    answered.sort()
    return {
        "connections": OVERLOAD_CONNECTIONS,
        "max_in_flight": MAX_IN_FLIGHT,
        "status_503": result["status_503"],
        "retry_after": result["retry_after"],
        "answered_rps": round((result["requests"] - result["status_503"]) / DURATION_S, 1),
        "p99_ms": round(answered[int(0.99 * (len(answered) - 1))], 1) if answered else None,
        "probe_answered": len(answered),
        "probe_refused": len(refused),
        "probe_refused_max_ms": round(max(refused), 1) if refused else None,
        "wrk_p99_ms_all": result["p99_ms"],
        "wrk_requests": result["requests"],
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def _serve(env: dict, port: int, log) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "k2_assets.cli", "api", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def shared_reads(base_url: str) -> dict[str, float]:
    """Per route, the requests answered by a read another identical request started (the API's coalescing)."""
    found: dict[str, float] = {}
    for line in httpx.get(base_url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("k2_api_shared_reads_total{"):
            labels, value = line.rsplit(" ", 1)
            found[labels.split('route="', 1)[1].split('"', 1)[0]] = float(value)
    return found


def write_results(results: dict) -> None:
    """Merge this benchmark's keys into api.json, keeping the others (``subscribe``)."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    merged: dict = {}
    if RESULTS.exists():
        try:
            merged = json.loads(RESULTS.read_text())
        except ValueError:
            merged = {}
    merged.update(results)
    RESULTS.write_text(json.dumps(merged, indent=2, default=str) + "\n")


def test_api_throughput_and_latency_under_wrk(k2_home, kafka_broker, topic_name, tmp_path):
    assert shutil.which("wrk"), "wrk is missing: infra/scripts/system-deps.sh --test (apt-get install wrk)"
    kafka, iceberg = KafkaResource(), IcebergResource()
    facts = build(kafka, iceberg, topic_name)
    keys = KeyFile(k2_home / "api" / "keys.json")
    key, _ = keys.create("benchmark", ["read:trades"], rate_per_second=1_000_000, burst=1_000_000)
    day_start, day_end = exchange_day_bounds("ASX", "2014-03-12")
    recent = ("/v1/trades/recent", {"symbol": "BTCUSDT", "minutes": 5})
    cases = {
        "recent_json": (*recent, "application/json"),
        "recent_arrow": (*recent, ARROW),
        "point_json": (
            "/v1/trades",
            {"symbol": "BHP", "start": day_start.isoformat(), "end": day_end.isoformat()},
            "application/json",
        ),
    }
    env = dict(
        os.environ,
        K2_HOME=str(k2_home),
        K2_API_TOPICS=topic_name,
        K2_API_TOPIC_EXCHANGES=f"{topic_name}=BINANCE",  # as the deployed topic: 2014 windows skip its tail
        K2_API_KEYS_FILE=str(keys.path),
        K2_KAFKA_BOOTSTRAP=kafka_broker.bootstrap_servers,
        K2_API_BENCH_ROUTE="1",
        K2_API_MAX_IN_FLIGHT=str(MAX_IN_FLIGHT),
    )
    results: dict = {
        "data": facts,
        "connections": CONNECTIONS,
        "duration_s": DURATION_S,
        "load_generator": "wrk -t2 (closed loop)",
    }
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    with (tmp_path / "api.log").open("w") as log, LiveStream(kafka, iceberg, topic_name) as stream:
        server = _serve(env, port, log)
        try:
            wait_until_serving(base_url, process=server)
            for name, (path, params, accept) in cases.items():
                results[name] = measure_case(base_url, key, path, params, accept, tmp_path)
                print(name, json.dumps(results[name]), flush=True)
            results["overload"] = measure_overload(base_url, key, *recent, tmp_path)
            print("overload", json.dumps(results["overload"]), flush=True)
            results["shared_reads"] = shared_reads(base_url)
        finally:
            server.terminate()
            server.wait(timeout=60)
    results["stream"] = {
        "per_s": STREAM_PER_S,
        "sent": stream.sent,
        "follower_commits": stream.commits,
        "maintenance_passes": len(stream.maintenance.passes),
        "errors": stream.errors,
    }
    results["machine"] = {"cpus": os.cpu_count(), "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()]}
    write_results(results)
    print(json.dumps(results, indent=2, default=str))
    for name in cases:
        assert results[name]["errors"] == 0, (name, results[name])
    assert results["recent_json"]["rows_per_response"] == 1000, results["recent_json"]
    assert not stream.errors and stream.commits > 0, results["stream"]
