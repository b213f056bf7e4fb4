"""Issue 25, visible: the gap ledger's filled and unfilled split in `k2 metrics` and in the UI's data.

The ledger is written through the streamer's own GapLedger (the gap-fill tests show the streamer
writes it); then a real `k2 metrics` process is scraped, an operator accepts the loss with the real
`k2 offsets gaps --accept` and the exporter's gauges go back to 0; and the stream sensor's tick
stores the ``sequence_gaps`` evaluation in a Dagster instance, read back through the GraphQL the
UI's check page uses (``assetCheckExecutions``) against the project's code location loaded by a
code server, as the webserver does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import AssetCheckKey, AssetKey, DagsterInstance
from dagster_graphql.test.utils import define_out_of_process_context, execute_dagster_graphql
from prometheus_client.parser import text_string_to_metric_families

from k2_resources.binance.gap_ledger import GapLedger
from k2_resources.binance.gap_plan import Gap
from k2_resources.kafka.resource import KafkaResource
from k2_resources.operations.dagster_instance import prepare_instance
from k2_resources.paths import PROJECT_ROOT, dagster_home
from k2_resources.platform.kafka_broker import free_port
from k2_sensors.binance.driver import checks_of, tick
from tests.support.stream import stream_defs
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

LOST_TOO_LARGE = Gap("BTCUSDT", 1_000, 200_999)  # 200,000 ids
LOST_REFUSED = Gap("ETHUSDT", 300, 309)  # 4 filled before the refusal: 6 lost
SEQUENCE_GAPS = "sequence_gaps"


def _write_ledger(ledger: GapLedger) -> None:
    """Two filled gaps (one with ids absent at the source), two losses, one open fill, one gap absent at
    the source (a recording's window jump) and an id reset."""
    ledger.opened(Gap("BTCUSDT", 100, 139))
    ledger.filled(Gap("BTCUSDT", 100, 139), 40)
    ledger.filled(Gap("ETHUSDT", 50, 59), 8, absent=2)
    ledger.unfilled(LOST_TOO_LARGE, "too_large", 0, "200000 ids, above the bound of 100000")
    ledger.unfilled(LOST_REFUSED, "refused", 4, "HTTP 451")
    ledger.opened(Gap("BTCUSDT", 5_000, 5_009))
    ledger.absent(Gap("BTCUSDT", 10_000, 20_000), 10_001)
    ledger.reset("ETHUSDT", 900_000, 12)


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _ledger_values(samples: dict, topic: str) -> dict[tuple[str, str, str], float]:
    """(metric, state, reason) -> value of the exporter's gap-ledger gauges for ``topic``."""
    values = {}
    for (name, labels), value in samples.items():
        label = dict(labels)
        if name.startswith("k2_binance_ledger_") and label.get("topic") == topic:
            values[(name, label.get("state", ""), label.get("reason", ""))] = value
    return values


@pytest.fixture
def k2_metrics(k2_home: Path, kafka_broker, topic_name: str) -> Iterator[int]:
    """`k2 metrics` as a process of its own on a free port, polling every half second; its port."""
    KafkaResource().ensure_topic(topic_name, partitions=1)
    port = free_port()
    command = [sys.executable, "-m", "k2_assets.cli", "metrics", "--port", str(port), "--interval", "0.5"]
    log = k2_home / "k2-metrics.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*command, "--topic", topic_name],
            env=dict(os.environ, K2_HOME=str(k2_home)),
            cwd=PROJECT_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield port
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        print(log.read_text(errors="replace")[-3000:])


def test_k2_metrics_serves_the_ledgers_filled_and_unfilled_split_until_the_loss_is_accepted(
    k2_home, k2_metrics, topic_name
):
    _write_ledger(GapLedger.for_topic(topic_name))
    gaps, ids = "k2_binance_ledger_gaps", "k2_binance_ledger_trade_ids"

    def served() -> dict | None:
        try:
            values = _ledger_values(_scrape(k2_metrics), topic_name)
        except OSError:
            return None  # not listening yet
        return values if values.get((gaps, "unfilled", "too_large")) else None

    values = wait_for(served, 180, "k2 metrics to serve the gap ledger's unfilled gaps", interval_s=0.5)
    assert values[(gaps, "filled", "")] == 2 and values[(ids, "filled", "")] == 52  # 4 of them before a loss
    assert values[(gaps, "unfilled", "too_large")] == 1 and values[(ids, "unfilled", "too_large")] == 200_000
    assert values[(gaps, "unfilled", "refused")] == 1 and values[(ids, "unfilled", "refused")] == 6
    assert values[(gaps, "unfilled", "timeout")] == 0  # every reason is a series, at 0 when none
    assert values[(gaps, "filling", "")] == 1 and values[(ids, "filling", "")] == 10
    assert values[(gaps, "absent_at_source", "")] == 2 and values[(ids, "absent_at_source", "")] == 10_003
    assert values[("k2_binance_ledger_resets", "", "")] == 1
    unfilled_alert = sum(v for (name, state, _), v in values.items() if name == gaps and state == "unfilled")
    assert unfilled_alert == 2  # what K2BinanceGapsUnfilled sums

    accept = subprocess.run(
        [sys.executable, "-m", "k2_assets.cli", "offsets", "gaps", "--topic", topic_name, "--accept"]
        + ["--note", "reloaded from the exchange's daily files", "--by", "test"],
        env=dict(os.environ, K2_HOME=str(k2_home)),
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert accept.returncode == 0, accept.stdout + accept.stderr
    assert "accepted by test: 2 unfilled gaps and 1 resets" in accept.stdout, accept.stdout

    def cleared() -> dict | None:
        values = _ledger_values(_scrape(k2_metrics), topic_name)
        unfilled = [v for (name, state, _), v in values.items() if name == gaps and state == "unfilled"]
        return values if unfilled and not any(unfilled) else None

    values = wait_for(cleared, 60, "the accepted losses to leave k2 metrics' unfilled gauges", interval_s=0.5)
    assert values[(gaps, "filled", "")] == 2 and values[(ids, "absent_at_source", "")] == 10_003  # kept
    assert values[("k2_binance_ledger_resets", "", "")] == 0


CHECK_EXECUTIONS = """
query ($assetKey: AssetKeyInput!, $checkName: String!) {
  assetNodeOrError(assetKey: $assetKey) {
    ... on AssetNode { assetChecksOrError { ... on AssetChecks { checks { name description } } } }
  }
  assetCheckExecutions(assetKey: $assetKey, checkName: $checkName, limit: 1) {
    status
    evaluation {
      success
      severity
      metadataEntries {
        label
        ... on IntMetadataEntry { intValue }
        ... on FloatMetadataEntry { floatValue }
        ... on TextMetadataEntry { text }
        ... on JsonMetadataEntry { jsonString }
      }
    }
  }
}
"""


def _entry_value(entry: dict) -> object:
    for key in ("intValue", "floatValue", "text", "jsonString"):
        if entry.get(key) is not None:
            return entry[key]
    return None


def test_the_sequence_gaps_check_shows_filled_and_unfilled_gaps_in_the_instance_and_the_uis_graphql(
    k2_home, kafka_broker, topic_name, monkeypatch
):
    KafkaResource().ensure_topic(topic_name, partitions=1)
    _write_ledger(GapLedger.for_topic(topic_name))
    home = dagster_home()  # a persistent instance: the code server and the GraphQL share it, as `k2 run`'s
    prepare_instance(home)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with DagsterInstance.from_config(str(home)) as instance:
        result = tick(instance, stream_defs(topic_name, max_batch=100), None)
        outcome = checks_of(result)[SEQUENCE_GAPS]
        assert (outcome["passed"], outcome["severity"]) == (False, "ERROR")  # an unaccepted loss
        key = AssetCheckKey(AssetKey("binance_trades"), SEQUENCE_GAPS)
        stored = instance.event_log_storage.get_latest_asset_check_execution_by_key([key])[key]
        assert stored.evaluation is not None
        metadata = {k: getattr(v, "value", v) for k, v in stored.evaluation.metadata.items()}
        split = ("gaps_filled", "trade_ids_filled", "gaps_unfilled", "trade_ids_unfilled", "gaps_filling")
        assert tuple(metadata[k] for k in split) == (2, 52, 2, 200_006, 1)
        assert metadata["trade_ids_absent_at_source"] == 10_003

        with define_out_of_process_context(str(PROJECT_ROOT / "workspace.yaml"), None, instance) as context:
            answer = execute_dagster_graphql(
                context,
                CHECK_EXECUTIONS,
                {"assetKey": {"path": ["binance_trades"]}, "checkName": SEQUENCE_GAPS},
            )
    assert not answer.errors, answer.errors
    checks = answer.data["assetNodeOrError"]["assetChecksOrError"]["checks"]
    assert SEQUENCE_GAPS in {c["name"] for c in checks}  # the check's page exists in the code location
    (execution,) = answer.data["assetCheckExecutions"]
    assert execution["status"] == "FAILED"
    evaluation = execution["evaluation"]
    assert (evaluation["success"], evaluation["severity"]) == (False, "ERROR")
    shown = {e["label"]: _entry_value(e) for e in evaluation["metadataEntries"]}
    assert {k: shown[k] for k in split} == dict(zip(split, (2, 52, 2, 200_006, 1)))
    assert f'"first": {LOST_TOO_LARGE.first}' in str(shown["unfilled"]) and '"reason": "refused"' in str(
        shown["unfilled"]
    )  # the ids and reasons of the losses, as the check page lists them
