"""`k2 run` (what `make run` calls): Kafka and the Dagster UI come up on 127.0.0.1, Ctrl-C stops all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request

import pytest

from k2_resources.kafka_broker import KafkaBroker, free_port
from tests.integration.waiting import wait_for

pytestmark = pytest.mark.integration


def _answers(url: str) -> bool:
    try:
        return urllib.request.urlopen(url, timeout=5).status == 200
    except OSError:
        return False


@pytest.mark.timeout(600)
def test_k2_run_serves_the_ui_and_ctrl_c_stops_everything(tmp_path):
    home = tmp_path / "k2home"
    ui_port, kafka_port, controller_port, exporter_port = free_port(), free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("K2_KAFKA_BOOTSTRAP", "DAGSTER_HOME")}
    env.update(K2_HOME=str(home), K2_KAFKA_PORT=str(kafka_port), K2_KAFKA_CONTROLLER_PORT=str(controller_port),
               K2_EXPORTER_PORT=str(exporter_port))
    log_path = tmp_path / "k2-run.log"  # a file, not a pipe: nobody reads a pipe while the UI starts
    log = log_path.open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "k2_assets.cli", "run", "--port", str(ui_port), "--no-stream"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    broker = KafkaBroker(home=home / "kafka", port=kafka_port, controller_port=controller_port)
    try:
        wait_for(lambda: _answers(f"http://127.0.0.1:{ui_port}/server_info") or process.poll() is not None,
                 timeout_s=300, what="the Dagster UI")
        assert process.poll() is None, log_path.read_text()[-3000:]
        assert broker.is_ready()
        wait_for(lambda: _answers(f"http://127.0.0.1:{exporter_port}/metrics"), timeout_s=120, what="k2 metrics")
        assert (home / "dagster" / "dagster.yaml").exists()  # all state under K2_HOME
    finally:
        process.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal sends
        process.wait(timeout=180)
        log.close()
    output = log_path.read_text()
    assert process.returncode == 0, output[-3000:]
    assert "stopped" in output
    assert broker.pid() is None and not broker.is_ready(timeout_s=1)
    assert not _answers(f"http://127.0.0.1:{ui_port}/server_info")
