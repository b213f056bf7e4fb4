"""`k2 run` keeps the platform up: a killed service and a killed embedded broker come back, and
the exit is logged with the tail of the service's log (issue 13, item 6). One `k2 run` for all checks."""

from __future__ import annotations

import os
import signal

import pytest

from k2_resources.platform.kafka_broker import KafkaBroker, free_port
from tests.support.platform import answers, start_k2_run
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration


def _pid(path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


@pytest.mark.timeout(900)
def test_a_killed_exporter_and_a_killed_broker_are_restarted(tmp_path):
    home = tmp_path / "k2home"
    kafka_ports = (free_port(), free_port())
    run = start_k2_run(home, tmp_path / "k2-run.log", kafka_ports=kafka_ports)
    broker = KafkaBroker(home=home / "kafka", port=kafka_ports[0], controller_port=kafka_ports[1])
    exporter_pid_file = home / "run" / "metrics-exporter.pid"
    exporter_url = f"http://127.0.0.1:{run.exporter_port}/metrics"
    try:
        run.wait_until_up()
        assert {p.name for p in (home / "run").glob("*.pid")} >= {
            "metrics-exporter.pid",
            "dagster-daemon.pid",
            "dagster-webserver.pid",
        }

        # a service dies: it is logged with its log's tail and started again; the rest stays up
        first_exporter = _pid(exporter_pid_file)
        os.kill(first_exporter, signal.SIGKILL)
        wait_for(
            lambda: _pid(exporter_pid_file) not in (None, first_exporter) and answers(exporter_url),
            timeout_s=180,
            what="the metrics exporter to be restarted and serve /metrics",
        )
        output = run.output()
        assert f"metrics exporter exited with code -{signal.SIGKILL.value}" in output
        assert "the last lines of" in output and "metrics-exporter.log" in output
        assert output.count("restarted metrics exporter (restart 1,") == 1
        assert answers(f"{run.ui}/server_info")

        # the embedded broker dies: `k2 run` starts it again on the same ports and state
        first_broker = broker.pid()
        assert first_broker is not None
        os.kill(first_broker, signal.SIGKILL)
        wait_for(lambda: "Kafka restarted on" in run.output(), timeout_s=240, what="k2 run to restart Kafka")
        assert broker.pid() not in (None, first_broker) and broker.is_ready()
        output = run.output()
        assert output.count("has stopped; restarting it") == 1
        assert output.count("restarted metrics exporter") == 1  # nothing else was restarted
        assert run.process.poll() is None
    finally:
        code = run.stop()
    output = run.output()
    assert code == 0, output[-3000:]
    assert "stopped" in output
    assert broker.pid() is None and not broker.is_ready(timeout_s=1)
    assert list((home / "run").glob("*.pid")) == []
