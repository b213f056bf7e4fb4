"""The real `k2 api` process, configured only by its environment, and `k2 api keys create|list|revoke`
run as a user runs them (each a new process) against the keys file that API reads.

One API process serves the module (its environment: K2_HOME, K2_API_PORT, K2_API_KEYS_FILE outside
K2_HOME, K2_API_KEY, K2_API_RATE_PER_SECOND, K2_API_BURST, K2_API_TOPICS, K2_KAFKA_BOOTSTRAP on the
session's broker); every claim below is checked by a request to it.
"""

from __future__ import annotations

import json
import re
import signal
import stat
import subprocess
import sys

import httpx
import pytest

from k2_resources.kafka.resource import KafkaResource
from k2_resources.platform.kafka_broker import free_port
from tests.support.api_server import wait_until_serving
from tests.support.k2_process import k2_env, run_k2, start_k2
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

BOOTSTRAP_KEY = "k2-api-from-the-environment"
ENV_RATE, ENV_BURST = "0.2", "3"  # a request each 5 s after 3 at once: a 4th quick request is refused
KEY_PATTERN = re.compile(r"^k2_[0-9a-f]+_[A-Za-z0-9_-]+$")


class ApiProcess:
    def __init__(self, base_url: str, env: dict[str, str], keys_file, topic: str, process) -> None:
        self.base_url, self.env, self.keys_file, self.topic, self.process = base_url, env, keys_file, topic, process

    def get(self, path: str, key: str | None = None) -> httpx.Response:
        headers = {"X-API-Key": key} if key else {}
        return httpx.get(f"{self.base_url}{path}", headers=headers, timeout=60)

    def k2(self, *args: str) -> subprocess.CompletedProcess[str]:
        done = run_k2(*args, env=self.env)
        assert done.returncode == 0, f"k2 {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        return done


@pytest.fixture(scope="module")
def api(kafka_broker, tmp_path_factory):
    root = tmp_path_factory.mktemp("k2-api-process")
    topic = f"api-env-topic-{free_port()}"
    kafka = KafkaResource(bootstrap_servers=kafka_broker.bootstrap_servers)
    kafka.ensure_topic(topic, partitions=2)
    producer = kafka.producer()
    for index in range(5):
        producer.send(topic, value=b"not a trade; only its offset counts here", partition=index % 2)
    producer.flush()
    producer.close()
    port = free_port()
    env = k2_env(
        root / "home",
        K2_API_PORT=str(port),
        K2_API_KEYS_FILE=str(root / "secrets" / "api-keys.json"),
        K2_API_KEY=BOOTSTRAP_KEY,
        K2_API_RATE_PER_SECOND=ENV_RATE,
        K2_API_BURST=ENV_BURST,
        K2_API_TOPICS=topic,
        K2_KAFKA_BOOTSTRAP=kafka_broker.bootstrap_servers,
    )
    process = start_k2("api", env=env, log_path=root / "api.log")
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(base_url, timeout_s=180, process=process)
        yield ApiProcess(base_url, env, root / "secrets" / "api-keys.json", topic, process)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def test_k2_api_is_built_from_its_environment(api: ApiProcess) -> None:
    # K2_API_PORT: it answers there. K2_KAFKA_BOOTSTRAP and K2_API_TOPICS: health probes that broker
    # for that topic's end offsets (5 records over 2 partitions, nothing committed).
    health = api.get("/v1/health").json()
    assert health["kafka"]["ok"] and health["kafka"]["bootstrap_servers"] == api.env["K2_KAFKA_BOOTSTRAP"]
    assert list(health["lag"]) == [api.topic] and health["lag"][api.topic]["total"] == 5
    # No key, an unknown key: 401. K2_API_KEY: admin, every scope.
    assert api.get("/v1/symbols").status_code == 401
    assert api.get("/v1/symbols", "k2_0000_not-a-key").status_code == 401
    first = api.get("/v1/symbols", BOOTSTRAP_KEY)
    assert first.status_code == 200, first.text
    # K2_API_RATE_PER_SECOND and K2_API_BURST are the limits of a key without its own.
    assert (first.headers["X-RateLimit-Limit"], first.headers["X-RateLimit-Burst"]) == (ENV_RATE, ENV_BURST)
    statuses = [first.status_code] + [api.get("/v1/symbols", BOOTSTRAP_KEY).status_code for _ in range(3)]
    assert statuses.count(200) <= int(ENV_BURST) and statuses[-1] == 429, statuses
    assert api.process.poll() is None


def test_k2_api_keys_create_list_revoke_in_new_processes(api: ApiProcess) -> None:
    # Two creates at once, each its own process: the file lock keeps both keys.
    creating = [
        subprocess.Popen(
            [sys.executable, "-m", "k2_assets.cli", "api", "keys", "create", *args],
            env=api.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in (
            ("--name", "notebook", "--scope", "read:trades", "--rate", "50", "--burst", "60"),
            ("--name", "bars-only", "--scope", "read:ohlcv"),
        )
    ]
    outputs = [process.communicate(timeout=180) for process in creating]
    assert [process.returncode for process in creating] == [0, 0], outputs
    notebook_key, bars_key = (out.strip() for out, _ in outputs)
    assert KEY_PATTERN.match(notebook_key) and KEY_PATTERN.match(bars_key), outputs
    assert str(api.keys_file) in outputs[0][1]  # K2_API_KEYS_FILE, named on stderr
    # Stored hashed, readable by its owner only; the keys themselves are nowhere in the file.
    stored = api.keys_file.read_text()
    assert notebook_key.split("_", 2)[2] not in stored and bars_key.split("_", 2)[2] not in stored
    assert stat.S_IMODE(api.keys_file.stat().st_mode) == 0o600

    notebook_id = notebook_key.split("_")[1]

    # The running API accepts the new keys, each for its scope and with its own limits.
    answer = api.get("/v1/symbols", notebook_key)
    assert answer.status_code == 200, answer.text
    assert (answer.headers["X-RateLimit-Limit"], answer.headers["X-RateLimit-Burst"]) == ("50", "60")
    refused = api.get("/v1/symbols", bars_key)
    assert refused.status_code == 403 and "read:trades" in refused.json()["detail"], refused.text

    revoked = api.k2("api", "keys", "revoke", notebook_id).stdout
    assert f"revoked API key {notebook_id} (notebook)" in revoked
    wait_for(
        lambda: api.get("/v1/symbols", notebook_key).status_code == 401,
        timeout_s=10,
        what="the running API to refuse the revoked key",
    )
    # The listing: ids, names, scopes, limits and state; never a key, its hash or its salt.
    listed = api.k2("api", "keys", "list", "--json").stdout
    entries = {entry["name"]: entry for entry in json.loads(listed)}
    assert set(entries) == {"notebook", "bars-only"} and entries["notebook"]["id"] == notebook_id
    assert entries["notebook"]["scopes"] == ["read:trades"] and entries["bars-only"]["scopes"] == ["read:ohlcv"]
    assert (entries["notebook"]["rate_per_second"], entries["notebook"]["burst"]) == (50, 60)
    assert entries["notebook"]["revoked_at"] and entries["bars-only"]["revoked_at"] is None
    assert not any(field in entry for entry in entries.values() for field in ("hash", "salt", "key"))
    assert notebook_key not in listed and bars_key not in listed
