"""`k2 run` (what `make run` calls): Kafka, the Dagster UI and the query API come up on 127.0.0.1, the
API answers requests on k2 run's own broker and catalog, Ctrl-C stops all."""

from __future__ import annotations

import httpx
import pytest

from k2_resources.platform.kafka_broker import KafkaBroker, free_port
from tests.support.api_server import wait_until_serving
from tests.support.platform import answers, start_k2_run

pytestmark = pytest.mark.integration

API_KEY = "k2-run-api-key"


@pytest.mark.timeout(600)
def test_k2_run_serves_the_ui_and_ctrl_c_stops_everything(tmp_path):
    home = tmp_path / "k2home"
    kafka_ports = (free_port(), free_port())
    run = start_k2_run(home, tmp_path / "k2-run.log", kafka_ports=kafka_ports, env_settings={"K2_API_KEY": API_KEY})
    broker = KafkaBroker(home=home / "kafka", port=kafka_ports[0], controller_port=kafka_ports[1])
    try:
        run.wait_until_up()
        assert broker.is_ready()
        assert (home / "dagster" / "dagster.yaml").exists()  # all state under K2_HOME
        assert "Dagster instance created" in run.output()
        # The query API `k2 run` started answers, on k2 run's broker and catalog, with keys.
        wait_until_serving(run.api, timeout_s=300, process=run.process)
        health = httpx.get(f"{run.api}/v1/health", timeout=60).json()
        assert health["status"] == "ok", health
        assert health["kafka"]["bootstrap_servers"] == f"127.0.0.1:{kafka_ports[0]}"
        assert list(health["lag"]) == ["market.trades.binance"]
        assert httpx.get(f"{run.api}/v1/symbols", timeout=60).status_code == 401
        symbols = httpx.get(f"{run.api}/v1/symbols", headers={"X-API-Key": API_KEY}, timeout=60)
        assert symbols.status_code == 200, symbols.text
    finally:
        code = run.stop()
    output = run.output()
    assert code == 0, output[-3000:]
    assert "stopped" in output
    assert broker.pid() is None and not broker.is_ready(timeout_s=1)
    assert not answers(f"{run.ui}/server_info")
    assert not answers(f"{run.api}/v1/health")
