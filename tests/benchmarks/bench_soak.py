"""Benchmark: run storage under a long life. The stream sensor's tick and the asset page with
20,000 micro-batch runs in the SQLite Dagster instance.

Writes bench-results/soak.json. The instance is prepared with ``prepare_instance`` and filled by
``tests.support.run_history`` (runs of the real ``binance_trades_microbatch`` job with the tags the
daemon gives sensor runs, SUCCESS, their status events and materialisations with the asset's
metadata, and each tick's check evaluations), in batches; how long that takes is reported.
At two checkpoints (one round of runs = the baseline, then the whole history, ``K2_SOAK_RUNS``,
default 20,000):

- ``tick``: the real stream sensor against the session's Kafka broker and a real Iceberg table
  whose committed offsets are where the history ends, its in-flight runs the newest of each
  partition; each tick is evaluated and its check evaluations stored, as the daemon does
  (``driver.tick``), from the same cursor, ``TICKS`` times: p50/p99/max, plus the parts of a tick
  that read the instance (run statuses by run key, the latest batches' sequence gaps) and the
  daemon's run-key look-up of the requested runs.
- ``asset_page``: the Dagster webserver on this instance (started once, as `k2 run` starts it);
  headless Chromium opens ``/assets/binance_trades`` and its Checks tab, the time until the
  network is idle is the page time, and every GraphQL operation the page sent is replayed
  ``REPLAYS`` times for its server time (p50 per operation).

Each figure at 20K runs is reported with its ratio to the baseline measured in the same run. The
tick's target (p99 under 2 s) is in tests/benchmarks/targets.toml, judged by tests/support/bench_judge.py.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import pytest
from dagster import DagsterInstance, RunsFilter
from dagster._core.storage.tags import RUN_KEY_TAG

from k2_resources.catalog.resource import IcebergResource
from k2_resources.kafka.resource import KafkaResource
from k2_resources.operations.dagster_instance import prepare_instance
from k2_resources.paths import PROJECT_ROOT, dagster_home
from k2_resources.platform.kafka_broker import free_port
from k2_resources.sink.offsets import committed_key
from k2_sensors.binance.driver import tick
from k2_sensors.binance.observe import latest_batch_gaps, run_statuses
from tests.support.run_history import RunHistory, RunHistoryWriter
from tests.support.stream import stream_defs
from tests.support.waiting import wait_for

RUNS = int(os.environ.get("K2_SOAK_RUNS", "20000"))
PARTITIONS = 3
OFFSETS_PER_RUN = 5
LAG = 50  # offsets beyond the history in each partition: every tick requests the next batch
TICKS = 20
REPLAYS = 5
CHROMIUM = Path("/usr/bin/chromium")
ASSET_PAGES = ("/assets/binance_trades", "/assets/binance_trades?view=checks")
# How long a page may keep sending GraphQL queries. At 20K runs the asset page never settles: it
# pages through every materialisation of its events window with RecentAssetEventsQuery, 100 per
# request (200 requests; 95 were answered in 60 s here), so the figure is then a lower bound, marked
# ``page_settled: false``, with the pages it had loaded; waiting 180 s instead only moved the bound.
PAGE_DEADLINE_S = 60


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def _fill_topic(kafka: KafkaResource, topic: str, ends: dict[int, int]) -> None:
    """Small messages until each partition ends at ``ends[p]`` (the sensor reads offsets, not payloads)."""
    now = kafka.end_offsets(topic)
    producer = kafka.producer()
    for partition, end in ends.items():
        for _ in range(end - now.get(partition, 0)):
            producer.send(topic, value=b"k2-soak", partition=partition)
    producer.flush()
    producer.close()


def _commit_offsets(iceberg: IcebergResource, topic: str, ends: dict[int, int]) -> None:
    """The table's committed offsets where the history ends (what the runs' commits left)."""
    table = iceberg.trades()
    with table.transaction() as transaction:
        transaction.set_properties({committed_key(topic): json.dumps({str(p): o for p, o in sorted(ends.items())})})


def _measure_ticks(instance: DagsterInstance, defs, history: RunHistory) -> dict:
    cursor = history.cursor().to_json()
    durations, requested = [], []
    tick(instance, defs, cursor)  # warm-up: imports, connections, the table's metadata
    for _ in range(TICKS):
        started = time.perf_counter()
        result = tick(instance, defs, cursor)
        durations.append(time.perf_counter() - started)
        requested = [request.run_key for request in result.run_requests]
    assert len(requested) == PARTITIONS, requested  # the in-flight runs succeeded: one next batch each
    keys = list(history.newest_run_keys.values())
    parts = {"run_statuses": [], "latest_batch_gaps": [], "daemon_run_key_lookup": []}
    for _ in range(10):
        started = time.perf_counter()
        statuses = run_statuses(instance, keys)
        parts["run_statuses"].append(time.perf_counter() - started)
        started = time.perf_counter()
        latest_batch_gaps(instance, history.topic)
        parts["latest_batch_gaps"].append(time.perf_counter() - started)
        started = time.perf_counter()
        for key in requested:  # what the daemon asks before creating each requested run
            instance.get_runs(filters=RunsFilter(tags={RUN_KEY_TAG: key}))
        parts["daemon_run_key_lookup"].append(time.perf_counter() - started)
    assert set(statuses.values()) == {"succeeded"} and len(statuses) == PARTITIONS
    return {
        "ticks": TICKS,
        "p50_ms": _ms(_percentile(durations, 0.5)),
        "p99_ms": _ms(_percentile(durations, 0.99)),
        "max_ms": _ms(max(durations)),
        "mean_ms": _ms(statistics.fmean(durations)),
        "parts_p50_ms": {name: _ms(_percentile(values, 0.5)) for name, values in parts.items()},
    }


class _Webserver:
    """dagster-webserver on this instance, as `k2 run` starts it (cwd DAGSTER_HOME, 127.0.0.1, a free port)."""

    def __init__(self, home: Path, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "dagster-webserver"),
                "-w",
                str(PROJECT_ROOT / "workspace.yaml"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
            ],
            env=dict(os.environ, DAGSTER_HOME=str(home)),
            cwd=home,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.log_path = log_path

    def graphql(self, body: dict) -> dict:
        request = urllib.request.Request(
            f"{self.url}/graphql", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.load(response)

    def wait_until_loaded(self) -> None:
        def loaded() -> bool:
            assert self.process.poll() is None, self.log_path.read_text(errors="replace")[-4000:]
            try:
                data = self.graphql(
                    {"query": "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus } } } }"}
                )["data"]
            except OSError:
                return False
            return any(
                e["name"] == "k2" and e["loadStatus"] == "LOADED" for e in data["workspaceOrError"]["locationEntries"]
            )

        wait_for(loaded, 300, "the webserver to load the k2 code location", interval_s=1)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self._log.close()


def _measure_asset_page(server: _Webserver) -> dict:
    """Open the asset page (and its Checks tab) in headless Chromium; replay each GraphQL operation it sent."""
    from playwright.sync_api import sync_playwright

    operations: dict[str, dict] = {}
    page_seconds: dict[str, float] = {}
    settled: dict[str, bool] = {}  # False: GraphQL traffic never paused for 3 s before the deadline
    requests: dict[str, int] = {}  # GraphQL requests the page sent while loading
    event_pages: dict[str, int] = {}  # of which RecentAssetEventsQuery (the asset's events, 100 a page)
    names: list[str] = []
    pending: set = set()
    finished_at: list[float] = []

    def is_graphql(request) -> bool:
        return request.method == "POST" and request.url.split("?")[0].endswith("/graphql")

    def sent(request) -> None:
        if is_graphql(request):
            pending.add(request)
            body = request.post_data_json
            if isinstance(body, dict) and body.get("operationName"):
                operations.setdefault(body["operationName"], body)
                names.append(body["operationName"])

    def done(request) -> None:
        if is_graphql(request):
            pending.discard(request)
            finished_at.append(time.perf_counter())

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        context = browser.new_context(viewport={"width": 1600, "height": 1000})
        context.add_init_script("window.localStorage.setItem('communityNux', '1')")
        page = context.new_page()
        page.on("request", sent)
        page.on("requestfinished", done)
        page.on("requestfailed", done)
        try:
            for path in ASSET_PAGES:
                finished_at.clear()
                names.clear()
                started = time.perf_counter()
                page.goto(f"{server.url}{path}", timeout=180_000)
                # Loaded: the page's GraphQL queries have all answered and none followed for 3 s
                # (networkidle alone fires before the app has parsed its bundle and asked anything).
                deadline = started + PAGE_DEADLINE_S
                settled[path] = False
                while time.perf_counter() < deadline:
                    page.wait_for_timeout(250)
                    if not pending and finished_at and time.perf_counter() - finished_at[-1] > 3.0:
                        settled[path] = True
                        break
                assert finished_at, f"{path} sent no GraphQL query"
                page_seconds[path] = finished_at[-1] - started
                requests[path] = len(finished_at)
                event_pages[path] = names.count("RecentAssetEventsQuery")
        finally:
            browser.close()
    replayed = {}
    for name, body in sorted(operations.items()):
        times = []
        for _ in range(REPLAYS):
            started = time.perf_counter()
            answer = server.graphql(body)
            times.append(time.perf_counter() - started)
        assert "errors" not in answer, (name, answer.get("errors"))
        replayed[name] = _ms(_percentile(times, 0.5))
    return {
        "page_load_ms": {path: _ms(seconds) for path, seconds in page_seconds.items()},
        "page_settled": settled,
        "page_graphql_requests": requests,
        "page_recent_events_queries": event_pages,
        "graphql_p50_ms": replayed,
        "graphql_total_p50_ms": _ms(sum(replayed.values()) / 1000),
        "slowest_operation": max(replayed, key=replayed.get) if replayed else None,
    }


def _ratio(soak: float, base: float) -> float:
    return round(soak / base, 2) if base else float("inf")


@pytest.mark.timeout(3600)
def test_soak_benchmark(k2_home, kafka_broker, topic_name, tmp_path):
    assert CHROMIUM.exists(), "Debian's chromium is missing: run `bash infra/scripts/system-deps.sh --test`"
    home = dagster_home()
    prepare_instance(home)
    kafka, iceberg = KafkaResource(), IcebergResource()
    kafka.ensure_topic(topic_name, partitions=PARTITIONS)
    defs = stream_defs(topic_name, max_batch=OFFSETS_PER_RUN)
    checkpoints = sorted({PARTITIONS, RUNS})
    server = _Webserver(home, tmp_path / "webserver.log")
    results: list[dict] = []
    generation_s = 0.0
    try:
        with DagsterInstance.from_config(str(home)) as instance:
            writer = RunHistoryWriter(instance, defs, topic_name, PARTITIONS, offsets_per_run=OFFSETS_PER_RUN)
            server.wait_until_loaded()
            written = 0
            for checkpoint in checkpoints:
                history = writer.append(checkpoint - written)
                generation_s += history.seconds
                written = history.runs
                _fill_topic(kafka, topic_name, {p: end + LAG for p, end in history.ends.items()})  # same lag each time
                _commit_offsets(iceberg, topic_name, history.ends)
                results.append(
                    {
                        "runs": history.runs,
                        "check_evaluations": history.check_evaluations,
                        "runs_in_instance": instance.get_runs_count(),
                        "tick": _measure_ticks(instance, defs, history),
                        "asset_page": _measure_asset_page(server),
                    }
                )
                print(json.dumps(results[-1], indent=2))
    finally:
        server.stop()

    base, soak = results[0], results[-1]
    assert soak["runs_in_instance"] == RUNS
    result = {
        "benchmark": "soak",
        "measured_at": datetime.now(UTC).isoformat(),
        "storage": "sqlite (dagster.yaml of the project, prepared with prepare_instance)",
        "runs": RUNS,
        "partitions": PARTITIONS,
        "generation": {
            "seconds": round(generation_s, 1),
            "runs_per_s": round(RUNS / generation_s),
            "what": "runs (SUCCESS, sensor tags), 5 status events + planned + materialisation per run, "
            "the runless check evaluations of one tick per round of partitions",
        },
        "tick_p50_ms": soak["tick"]["p50_ms"],
        "tick_p99_ms": soak["tick"]["p99_ms"],
        "tick_p99_ratio_to_baseline": _ratio(soak["tick"]["p99_ms"], base["tick"]["p99_ms"]),
        "tick_p50_ratio_to_baseline": _ratio(soak["tick"]["p50_ms"], base["tick"]["p50_ms"]),
        "asset_page_ms": soak["asset_page"]["page_load_ms"],
        "asset_page_settled": soak["asset_page"]["page_settled"],  # false: a lower bound (PAGE_DEADLINE_S)
        "page_deadline_s": PAGE_DEADLINE_S,
        "asset_page_ratio_to_baseline": {
            path: _ratio(ms, base["asset_page"]["page_load_ms"][path])
            for path, ms in soak["asset_page"]["page_load_ms"].items()
        },
        "asset_page_graphql_total_ratio_to_baseline": _ratio(
            soak["asset_page"]["graphql_total_p50_ms"], base["asset_page"]["graphql_total_p50_ms"]
        ),
        "baseline": "the same measurements after the first round of runs (one per partition), same run",
        "checkpoints": results,
    }
    out = PROJECT_ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    (out / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "checkpoints"}, indent=2))
