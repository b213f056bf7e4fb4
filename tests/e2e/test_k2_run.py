"""`k2 run` (what `make run` calls): Kafka and the Dagster UI come up on 127.0.0.1, Ctrl-C stops all."""

from __future__ import annotations

import pytest

from k2_resources.platform.kafka_broker import KafkaBroker, free_port
from tests.support.platform import answers, start_k2_run

pytestmark = pytest.mark.integration


@pytest.mark.timeout(600)
def test_k2_run_serves_the_ui_and_ctrl_c_stops_everything(tmp_path):
    home = tmp_path / "k2home"
    kafka_ports = (free_port(), free_port())
    run = start_k2_run(home, tmp_path / "k2-run.log", kafka_ports=kafka_ports)
    broker = KafkaBroker(home=home / "kafka", port=kafka_ports[0], controller_port=kafka_ports[1])
    try:
        run.wait_until_up()
        assert broker.is_ready()
        assert (home / "dagster" / "dagster.yaml").exists()  # all state under K2_HOME
        assert "Dagster instance created" in run.output()
    finally:
        code = run.stop()
    output = run.output()
    assert code == 0, output[-3000:]
    assert "stopped" in output
    assert broker.pid() is None and not broker.is_ready(timeout_s=1)
    assert not answers(f"{run.ui}/server_info")
