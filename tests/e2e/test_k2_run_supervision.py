"""`k2 run` keeps the platform up: each killed service and a killed embedded broker come back, and
the exit is logged with the tail of the service's log (issue 13, item 6). One `k2 run` for all checks:
the metrics exporter dies alone (the rest stays up), then the query API, the Dagster daemon and
the webserver die together, and each is seen serving again from its new process."""

from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from k2_resources.platform.kafka_broker import KafkaBroker, free_port
from tests.support.platform import answers, start_k2_run
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

SERVICES = (
    "metrics exporter",
    "query api",
    "dagster daemon",
    "dagster webserver",
)  # what `k2 run --no-stream` supervises
HEARTBEATS_QUERY = "{ instance { daemonHealth { allDaemonStatuses { daemonType required lastHeartbeatTime } } } }"


def _serves(url: str) -> bool:
    """True when ``url`` gives any HTTP answer (an error status is an answer too)."""
    try:
        urllib.request.urlopen(url, timeout=5)
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


def _heartbeats_since(ui: str, moment: float) -> bool:
    """True when every required daemon has heartbeated after ``moment`` (epoch seconds)."""
    request = urllib.request.Request(
        f"{ui}/graphql",
        data=json.dumps({"query": HEARTBEATS_QUERY}).encode(),
        headers={"Content-Type": "application/json"},
    )
    statuses = json.loads(urllib.request.urlopen(request, timeout=10).read())["data"]["instance"]["daemonHealth"]
    required = [s for s in statuses["allDaemonStatuses"] if s["required"]]
    return bool(required) and all((s["lastHeartbeatTime"] or 0) > moment for s in required)


def _api_port(pid: int) -> int:
    """The query API's port, from its process's environment (``k2 run`` gives it a free one)."""
    environment = dict(
        item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item
    )
    return int(environment["K2_API_PORT"])


def _pid(path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


@pytest.mark.timeout(900)
def test_each_killed_service_and_a_killed_broker_are_restarted(tmp_path):
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

        # the query API, the daemon and the webserver die together: each is restarted and serves again
        together = SERVICES[1:]
        first = {name: _pid(home / "run" / f"{name.replace(' ', '-')}.pid") for name in together}
        assert None not in first.values(), first
        api_port = _api_port(first["query api"])
        killed_at = time.time()
        for pid in first.values():
            os.kill(pid, signal.SIGKILL)
        wait_for(
            lambda: all(_pid(home / "run" / f"{n.replace(' ', '-')}.pid") not in (None, first[n]) for n in together),
            timeout_s=240,
            what="the query API, the daemon and the webserver to be started again",
        )
        wait_for(lambda: answers(f"{run.ui}/server_info"), timeout_s=300, what="the new webserver to answer")
        wait_for(lambda: _serves(f"http://127.0.0.1:{api_port}/v1/health"), timeout_s=180, what="the new API")
        wait_for(lambda: _heartbeats_since(run.ui, killed_at), timeout_s=300, what="the new daemon's heartbeats")
        output = run.output()
        for name in together:
            assert f"{name} exited with code -{signal.SIGKILL.value}" in output, name
            assert output.count(f"restarted {name} (restart 1,") == 1, name

        # the embedded broker dies: `k2 run` starts it again on the same ports and state
        first_broker = broker.pid()
        assert first_broker is not None
        os.kill(first_broker, signal.SIGKILL)
        wait_for(lambda: "Kafka restarted on" in run.output(), timeout_s=240, what="k2 run to restart Kafka")
        assert broker.pid() not in (None, first_broker) and broker.is_ready()
        output = run.output()
        assert output.count("has stopped; restarting it") == 1
        # each service was restarted once, and nothing else was
        assert {name: output.count(f"restarted {name} (restart ") for name in SERVICES} == dict.fromkeys(SERVICES, 1)
        assert len(re.findall(r"^restarted ", output, flags=re.MULTILINE)) == len(SERVICES)
        assert run.process.poll() is None
    finally:
        code = run.stop()
    output = run.output()
    assert code == 0, output[-3000:]
    assert "stopped" in output
    assert broker.pid() is None and not broker.is_ready(timeout_s=1)
    assert list((home / "run").glob("*.pid")) == []
