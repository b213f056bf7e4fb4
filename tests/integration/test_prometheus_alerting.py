"""Debian's Prometheus and Alertmanager, for real: K2's exporter is scraped, the lag rule fires,
and Alertmanager delivers K2ConsumerLagHigh to a webhook server in the test.

Everything binds to 127.0.0.1 on free ports; each process has its own storage folder under the
test's tmp dir and is stopped at the end. The rules are the ones in infra/, with ``for`` shortened
to 0s and a 1 s scrape/evaluation interval so the test takes seconds, not minutes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from k2_resources import metrics
from k2_resources.paths import PROJECT_ROOT
from k2_resources.platform.kafka_broker import free_port
from tests.support.waiting import wait_for
from tests.support.webhooks import WebhookReceiver

pytestmark = pytest.mark.integration

TOPIC = "test.prometheus.lag"


def delivered_alerts(webhook: WebhookReceiver) -> list[dict]:
    """Every alert in the Alertmanager notifications the webhook received."""
    return [alert for notification in webhook.received for alert in notification.get("alerts", [])]


def binary(name: str) -> str:
    path = shutil.which(name)
    assert path, (
        f"{name} is missing: run `bash infra/scripts/system-deps.sh --test` "
        "(Debian packages prometheus, prometheus-alertmanager)"
    )
    return path


def http_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        process.terminate()
    for process in started:
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@pytest.fixture
def webhook() -> Iterator[WebhookReceiver]:
    with WebhookReceiver("/alertmanager") as receiver:
        yield receiver


@pytest.fixture
def exporter() -> Iterator[int]:
    """K2's own metrics registry served on a free port, with lag well above the 1M critical threshold."""
    port = free_port()
    metrics.serve_metrics(port)
    metrics.CONSUMER_LAG.labels(topic=TOPIC, partition="0").set(700_000)
    metrics.CONSUMER_LAG.labels(topic=TOPIC, partition="1").set(800_000)
    metrics.DEGRADATION_LEVEL.set(3)
    yield port
    metrics.CONSUMER_LAG.remove(TOPIC, "0")
    metrics.CONSUMER_LAG.remove(TOPIC, "1")
    metrics.DEGRADATION_LEVEL.set(0)
    metrics.stop_metrics(port)


def fast_rules(tmp_path: Path) -> Path:
    rules = yaml.safe_load((PROJECT_ROOT / "infra" / "prometheus" / "rules" / "k2-alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule["for"] = "0s"
    path = tmp_path / "k2-alerts.yml"
    path.write_text(yaml.safe_dump(rules))
    return path


def alertmanager_config(tmp_path: Path, webhook_url: str) -> Path:
    template = (PROJECT_ROOT / "infra" / "alertmanager" / "alertmanager.yml").read_text()
    config = yaml.safe_load(template.replace("${K2_ALERT_WEBHOOK_URL}", webhook_url))
    config["route"].update(group_wait="1s", group_interval="1s", repeat_interval="1h")
    path = tmp_path / "alertmanager.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def prometheus_config(tmp_path: Path, exporter_port: int, alertmanager_port: int, rules: Path) -> Path:
    config = yaml.safe_load((PROJECT_ROOT / "infra" / "prometheus" / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(rules)]
    config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{alertmanager_port}"]
    config["scrape_configs"] = [{"job_name": "k2", "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"]}]}]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_lag_alert_travels_from_exporter_through_prometheus_and_alertmanager_to_the_webhook(
    tmp_path: Path, processes: list[subprocess.Popen], webhook: WebhookReceiver, exporter: int
) -> None:
    am_port, prom_port = free_port(), free_port()
    am_dir, prom_dir = tmp_path / "alertmanager-data", tmp_path / "prometheus-data"
    am_dir.mkdir()
    prom_dir.mkdir()
    am_log = open(tmp_path / "alertmanager.log", "w")  # noqa: SIM115 (closed with the process)
    prom_log = open(tmp_path / "prometheus.log", "w")  # noqa: SIM115
    processes.append(
        subprocess.Popen(
            [
                binary("prometheus-alertmanager"),
                f"--config.file={alertmanager_config(tmp_path, webhook.url)}",
                f"--storage.path={am_dir}",
                f"--web.listen-address=127.0.0.1:{am_port}",
                "--cluster.listen-address=",  # no gossip port: a single local Alertmanager
            ],
            stdout=am_log,
            stderr=subprocess.STDOUT,
        )
    )
    processes.append(
        subprocess.Popen(
            [
                binary("prometheus"),
                f"--config.file={prometheus_config(tmp_path, exporter, am_port, fast_rules(tmp_path))}",
                f"--storage.tsdb.path={prom_dir}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
            stdout=prom_log,
            stderr=subprocess.STDOUT,
        )
    )

    def logs() -> str:
        return (tmp_path / "prometheus.log").read_text()[-3000:] + (tmp_path / "alertmanager.log").read_text()[-3000:]

    # Prometheus scraped the K2 exporter: the per-partition lag is there
    query = urllib.parse.urlencode({"query": f'sum(k2_consumer_lag_messages{{topic="{TOPIC}"}})'})

    def scraped_lag() -> float | None:
        result = http_json(f"http://127.0.0.1:{prom_port}/api/v1/query?{query}")["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    assert wait_for(scraped_lag, 60, "Prometheus to scrape k2_consumer_lag_messages") == 1_500_000

    # the rule fires in Prometheus (warning and critical: 1.5M > 1M)
    def firing_lag_alerts() -> set[str]:
        alerts = http_json(f"http://127.0.0.1:{prom_port}/api/v1/alerts")["data"]["alerts"]
        return {
            a["labels"]["severity"]
            for a in alerts
            if a["labels"]["alertname"] == "K2ConsumerLagHigh" and a["state"] == "firing"
        }

    assert wait_for(lambda: firing_lag_alerts() == {"warning", "critical"}, 60, "K2ConsumerLagHigh to fire") is True

    # Alertmanager delivers it to the webhook; the warning is inhibited by the critical one
    def delivered() -> list[dict]:
        return [a for a in delivered_alerts(webhook) if a["labels"]["alertname"] == "K2ConsumerLagHigh"]

    try:
        lag_alerts = wait_for(delivered, 60, "Alertmanager to post K2ConsumerLagHigh to the webhook")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{logs()}") from exc
    alert = lag_alerts[0]
    assert alert["status"] == "firing"
    assert alert["labels"]["topic"] == TOPIC
    assert alert["labels"]["severity"] == "critical"
    assert "1.5M messages" in alert["annotations"]["summary"]
    assert webhook.received[0]["receiver"] == "k2-webhook"
    # AGGRESSIVE (3) also raises the degradation warning, delivered through the same route
    wait_for(
        lambda: any(a["labels"]["alertname"] == "K2DegradationLevel" for a in delivered_alerts(webhook)),
        60,
        "K2DegradationLevel to reach the webhook",
    )
    assert all(
        a["labels"]["severity"] == "critical"
        for a in delivered_alerts(webhook)
        if a["labels"]["alertname"] == "K2ConsumerLagHigh"
    ), "the critical lag alert should inhibit the warning of the same topic"
