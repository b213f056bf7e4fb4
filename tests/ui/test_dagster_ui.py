"""The Dagster UI in a real browser (Debian's headless Chromium, driven by Playwright).

Starts the webserver and the daemon the way `k2 run` does (DAGSTER_HOME under a temp K2_HOME,
the project's dagster.yaml, cwd=DAGSTER_HOME) on a free port, with the session's Kafka broker,
and then does what a data engineer does: looks at the asset graph, backfills the ASX trading
days from the UI, watches the stream sensor and reads the asset checks. Screenshots go to
PROJECT_ROOT/test-artifacts/ui/ (git-ignored); the Dagster logs are copied next to them.

Playwright never downloads a browser here: `playwright install` is never run, the test launches
/usr/bin/chromium (infra/scripts/system-deps.sh --test installs it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dagster import DagsterInstance, RunsFilter
from playwright.sync_api import Page, expect, sync_playwright

from k2_assets.asx import asx_trading_days
from k2_assets.definitions import defs
from k2_resources.kafka.resource import KafkaResource
from k2_resources.kafka.topics import BINANCE_TRADES_TOPIC
from k2_resources.operations.dagster_instance import prepare_instance
from k2_resources.paths import PROJECT_ROOT, dagster_home
from k2_resources.platform.kafka_broker import KafkaBroker, free_port
from k2_resources.query.duckdb_query import DuckDBQueryResource
from tests.support.producing import produce
from tests.support.recorded import recorded_trades
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = PROJECT_ROOT / "test-artifacts" / "ui"
MATERIALIZE_ALL = re.compile(r"Materialize all( \(\d+\))?…$")
ASX_TRADES_TOTAL = 200_545  # every valid trade row of the five days (data/asx/SOURCE.md)
STREAM_SENSOR = "binance_stream_sensor"
UI_TIMEOUT_MS = 90_000  # a 2-core machine loading a code location and running ASX days


@dataclass
class DagsterUI:
    """A running webserver + daemon: where to reach it and where its logs go."""

    url: str
    k2_home: Path
    logs: Path

    def graphql(self, query: str) -> dict:
        """POST a GraphQL query to the webserver; the `data` of the answer."""
        request = urllib.request.Request(
            f"{self.url}/graphql",
            data=json.dumps({"query": query}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.load(response)
        if "errors" in answer:  # not an assert: wait_for retries this while the webserver settles, and names it
            raise RuntimeError(f"GraphQL errors: {answer['errors']}")
        return answer["data"]

    def log_tails(self, chars: int = 4000) -> str:
        """The end of each Dagster log, for failure messages."""
        return "\n".join(
            f"--- {log.name}\n{log.read_text(errors='replace')[-chars:]}" for log in sorted(self.logs.glob("*.log"))
        )


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the process group (webserver/daemon plus their code servers and runs), SIGKILL if it lingers."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@pytest.fixture
def dagster_ui(kafka_broker: KafkaBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[DagsterUI]:
    """`k2 run`'s Dagster half on 127.0.0.1:<free port>, in a fresh K2_HOME, stopped (process groups) at the end."""
    k2_home = tmp_path / "k2home"
    k2_home.mkdir()
    monkeypatch.setenv("K2_HOME", str(k2_home))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    home = dagster_home()
    prepare_instance(home)  # once, before the webserver and daemon open it together
    env = dict(os.environ, K2_HOME=str(k2_home), DAGSTER_HOME=str(home))
    # Launching a run asks the code server to spawn the run worker and waits until that worker has
    # imported the definitions; on a busy 2-core machine that passes Dagster's 60 s default and the
    # run is marked failed before it starts. A slow machine needs more time, not a different product.
    env.setdefault("DAGSTER_GRPC_TIMEOUT_SECONDS", "300")
    logs = k2_home / "logs"
    logs.mkdir()
    port = free_port()
    bin_dir = Path(sys.executable).parent
    workspace = str(PROJECT_ROOT / "workspace.yaml")
    commands = {
        "dagster-daemon": [str(bin_dir / "dagster-daemon"), "run", "-w", workspace],
        "dagster-webserver": [str(bin_dir / "dagster-webserver"), "-w", workspace, "-h", "127.0.0.1", "-p", str(port)],
    }
    processes = []
    ui = DagsterUI(url=f"http://127.0.0.1:{port}", k2_home=k2_home, logs=logs)
    try:
        for name, argv in commands.items():
            with (logs / f"{name}.log").open("wb") as log:
                processes.append(
                    subprocess.Popen(
                        argv, env=env, cwd=home, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                    )
                )
        yield ui
    finally:
        for process in reversed(processes):
            _stop(process)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        for log in logs.glob("*.log"):
            shutil.copyfile(log, ARTIFACTS / log.name)


def _wait_until_ready(ui: DagsterUI) -> None:
    """The code location is loaded and every required daemon (the backfill daemon above all) is healthy."""

    def location_loaded() -> bool:
        data = ui.graphql(
            "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus"
            " locationOrLoadError { __typename } } } } }"
        )
        entries = data["workspaceOrError"]["locationEntries"]
        return any(
            e["name"] == "k2"
            and e["loadStatus"] == "LOADED"
            and e["locationOrLoadError"]["__typename"] == "RepositoryLocation"
            for e in entries
        )

    def daemons_healthy() -> bool:
        statuses = ui.graphql("{ instance { daemonHealth { allDaemonStatuses { daemonType required healthy } } } }")[
            "instance"
        ]["daemonHealth"]["allDaemonStatuses"]
        required = [s for s in statuses if s["required"]]
        return bool(required) and all(s["healthy"] for s in required)

    try:
        wait_for(location_loaded, 240, "the k2 code location to load in the webserver", interval_s=1)
        wait_for(daemons_healthy, 240, "every required Dagster daemon to report healthy", interval_s=1)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{ui.log_tails()}") from None


def _backfills(ui: DagsterUI) -> list[dict]:
    data = ui.graphql(
        "{ partitionBackfillsOrError { __typename ... on PartitionBackfills { results {"
        " id status numPartitions partitionNames assetSelection { path } runs { runId status } } } } }"
    )
    return data["partitionBackfillsOrError"]["results"]


def _wait_for_backfill_success(ui: DagsterUI, backfill_id: str, timeout_s: float) -> dict:
    """Poll the backfill until it completed with every run a SUCCESS; fail at once on a failed run."""

    def finished() -> dict | None:
        backfill = next(b for b in _backfills(ui) if b["id"] == backfill_id)
        failed = [r for r in backfill["runs"] if r["status"] in ("FAILURE", "CANCELED")]
        assert not failed and backfill["status"] not in ("FAILED", "FAILING", "COMPLETED_FAILED", "CANCELED"), (
            f"backfill {backfill_id} failed: {backfill}\n{ui.log_tails()}"
        )
        runs_done = backfill["runs"] and all(r["status"] == "SUCCESS" for r in backfill["runs"])
        return backfill if backfill["status"] in ("COMPLETED", "COMPLETED_SUCCESS") and runs_done else None

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        backfill = finished()
        if backfill:
            return backfill
        time.sleep(2)
    raise AssertionError(
        f"backfill {backfill_id} not done after {timeout_s:.0f}s: "
        f"{next(b for b in _backfills(ui) if b['id'] == backfill_id)}\n{ui.log_tails()}"
    )


def _label_shows(label: str, name: str) -> bool:
    """A graph node label shows `name` in full or middle-truncated ("trades_sn…_history")."""
    if label == name:
        return True
    head, ellipsis, tail = label.partition("…")
    return bool(ellipsis) and name.startswith(head) and name.endswith(tail) and len(head) + len(tail) < len(name)


def _shot(page: Page, name: str) -> Path:
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def _open_asset_graph_with_every_asset(page: Page, ui: DagsterUI) -> None:
    asset_names = sorted(key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys())
    page.goto(f"{ui.url}/asset-groups")
    # "Materialize all…", or "Materialize all (N)…" when some assets (the table-health specs) are not materialized here
    expect(page.get_by_role("button", name=MATERIALIZE_ALL)).to_be_visible()
    # Groups start collapsed when there are several; the graph's settings menu expands them all.
    page.get_by_role("button", name="settings", exact=True).click()
    page.get_by_role("menuitem", name="Expand all groups").click()
    page.keyboard.press("Escape")
    node_labels = page.locator("svg foreignObject [class*='AssetNode_assetName']")
    expect(node_labels).to_have_count(len(asset_names))
    labels = node_labels.all_inner_texts()
    for label in node_labels.all():
        expect(label).to_be_visible()
    for name in asset_names:
        showing = [label for label in labels if _label_shows(label, name)]
        assert len(showing) == 1, f"asset {name} is not shown once in the graph; node labels: {labels}"
    _shot(page, "01-asset-graph")


def _launch_asx_backfill_from_the_ui(page: Page, ui: DagsterUI) -> str:
    days = asx_trading_days.get_partition_keys()
    graph = defs.resolve_asset_graph()
    asx_assets = sorted(
        key.to_user_string() for key in graph.get_all_asset_keys() if graph.get(key).group_name == "asx"
    )
    page.goto(f"{ui.url}/locations/k2/asset-groups/asx")
    page.get_by_role("button", name=MATERIALIZE_ALL).click()
    dialog = page.get_by_role("dialog")
    expect(dialog.get_by_text(f"Launch runs to materialize {len(asx_assets)} assets")).to_be_visible()
    dialog.get_by_role("button", name="All", exact=True).click()
    expect(dialog.get_by_text(f"{len(days)} partitions", exact=True)).to_be_visible()
    expect(dialog.get_by_text("The backfill daemon is not running")).to_have_count(0)
    _shot(page, "02-backfill-dialog")
    assert _backfills(ui) == []
    dialog.get_by_role("button", name="Launch backfill").click()
    expect(dialog).to_be_hidden()
    backfill = wait_for(lambda: _backfills(ui), 60, "the backfill launched from the UI to be recorded", interval_s=1)[0]
    assert sorted(backfill["partitionNames"]) == days
    assert sorted("/".join(a["path"]) for a in backfill["assetSelection"]) == asx_assets
    return backfill["id"]


def _show_backfill(page: Page, ui: DagsterUI, backfill_id: str, assets: list[str]) -> None:
    page.goto(f"{ui.url}/runs/b/{backfill_id}")
    expect(page.get_by_text(backfill_id).first).to_be_visible()
    expect(page.get_by_text("Succeeded", exact=True).first).to_be_visible()  # the status tag (and a runs link)
    for asset in assets:
        expect(page.get_by_text(asset, exact=True).first).to_be_visible()
    expect(page.get_by_text("100% completed", exact=True)).to_have_count(len(assets))
    _shot(page, "03-backfill-succeeded")


def _send_trades_for_the_stream_sensor() -> None:
    """A few recorded trades into the Binance topic, and wait until the daemon's sensor requested a run for them."""
    kafka = KafkaResource()
    kafka.ensure_topic(BINANCE_TRADES_TOPIC, partitions=3)
    produce(kafka, BINANCE_TRADES_TOPIC, recorded_trades(60))
    instance = DagsterInstance.from_config(str(dagster_home()))
    try:
        wait_for(
            lambda: instance.get_runs(filters=RunsFilter(tags={"dagster/sensor_name": STREAM_SENSOR}), limit=1),
            180,
            "the stream sensor to request a micro-batch run",
            interval_s=1,
        )
    finally:
        instance.dispose()


def _open_stream_sensor(page: Page, ui: DagsterUI) -> None:
    page.goto(f"{ui.url}/automation")
    page.get_by_role("link", name=STREAM_SENSOR).first.click()
    expect(page).to_have_url(re.compile(f"/sensors/{STREAM_SENSOR}"))
    expect(page.get_by_text(STREAM_SENSOR).first).to_be_visible()
    description = next(s for s in defs.sensors if s.name == STREAM_SENSOR).description
    expect(page.get_by_text(description.split(";")[0], exact=False).first).to_be_visible()
    expect(page.get_by_text("Latest tick", exact=True)).to_be_visible()
    # The sensor is on (its switch) and the daemon has evaluated it against the test's Kafka broker.
    expect(page.get_by_role("checkbox")).to_be_checked()
    # A tick that requested at least one run (for the trades the test sent), not only "0 runs requested".
    expect(page.get_by_text(re.compile(r"^[1-9]\d* runs? requested$")).first).to_be_visible()
    expect(page.get_by_text("binance_trades_microbatch", exact=True).first).to_be_visible()
    _shot(page, "04-stream-sensor")


def _open_asset_checks(page: Page, ui: DagsterUI, asset: str, all_passed: bool, shot: str) -> None:
    """The asset's Checks tab lists every declared check, each evaluated (and passed, if asked)."""
    checks = _checks_of(asset)
    page.goto(f"{ui.url}/assets/{asset}")
    page.get_by_role("tab", name="Checks").click()
    expect(page.get_by_text(f"Checks ({len(checks)})", exact=True)).to_be_visible()
    for check in checks:
        expect(page.get_by_text(check, exact=True).first).to_be_visible()
    expect(page.get_by_text("Not Evaluated", exact=True)).to_have_count(0)
    if all_passed:
        # The list gives each check's latest execution; the detail pane the selected one's result.
        expect(page.get_by_text("Succeeded", exact=True)).to_have_count(len(checks))
        expect(page.get_by_text("Passed", exact=True).first).to_be_visible()
    _shot(page, shot)


def _checks_of(asset: str) -> list[str]:
    graph = defs.resolve_asset_graph()
    return sorted(key.name for key in graph.asset_check_keys if key.asset_key.to_user_string() == asset)


@pytest.mark.timeout(900)
def test_a_data_engineer_backfills_asx_and_watches_the_stream_from_the_ui(dagster_ui: DagsterUI) -> None:
    assert CHROMIUM.exists(), "Debian's chromium is missing: run `bash infra/scripts/system-deps.sh --test`"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*.png"):
        old.unlink()
    _wait_until_ready(dagster_ui)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        context = browser.new_context(viewport={"width": 1600, "height": 1000})
        # The first visit shows a community newsletter dialog; mark it as already seen.
        context.add_init_script("window.localStorage.setItem('communityNux', '1')")
        context.set_default_timeout(UI_TIMEOUT_MS)
        expect.set_options(timeout=UI_TIMEOUT_MS)
        page = context.new_page()
        try:
            _open_asset_graph_with_every_asset(page, dagster_ui)
            backfill_id = _launch_asx_backfill_from_the_ui(page, dagster_ui)
            backfill = _wait_for_backfill_success(dagster_ui, backfill_id, timeout_s=600)
            assert len(backfill["runs"]) >= len(asx_trading_days.get_partition_keys())
            _show_backfill(
                page, dagster_ui, backfill_id, sorted("/".join(a["path"]) for a in backfill["assetSelection"])
            )
            _send_trades_for_the_stream_sensor()
            _open_stream_sensor(page, dagster_ui)
            _open_asset_checks(page, dagster_ui, "asx_trades", all_passed=True, shot="05-asx-trades-checks")
            # The stream sensor evaluates binance_trades' checks on every tick, before any trade arrives.
            _open_asset_checks(page, dagster_ui, "binance_trades", all_passed=False, shot="06-binance-trades-checks")
        except Exception:
            _shot(page, "failure")
            raise
        finally:
            browser.close()

    rows = (
        DuckDBQueryResource()
        .query("select count(*) as n, count(distinct trade_id) as ids from market.trades where exchange = ?", ["ASX"])
        .to_pylist()
    )
    assert rows == [{"n": ASX_TRADES_TOTAL, "ids": ASX_TRADES_TOTAL}]
