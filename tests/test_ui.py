"""The real Dagster webserver (`dagster dev`, as `make ui` starts it) over a materialized run:
launch a job through GraphQL, read the lineage back, and look at it in a real browser (Debian's
headless Chromium driven by Playwright)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest
from dagster_graphql import DagsterGraphQLClient, DagsterGraphQLClientError
from playwright.sync_api import Page, sync_playwright

from modal_jobs.layout import Volumes
from mole_assets.instance import dagster_home
from mole_assets.webserver import free_port, webserver
from scripts.ui_check import CHROMIUM_FLAGS, dismiss_dialogs

from .conftest import TRAINED_RUN as RUN
from .conftest import TrainedRun

LINEAGE_QUERY = """
query Lineage {
  assetNodes {
    assetKey { path }
    dependencyKeys { path }
    opVersion
  }
}
"""
CHAIN = ["routing_dataset", "tokenized_shards", "router_checkpoint", "eval_report"]


@dataclass
class Ui:
    url: str
    client: DagsterGraphQLClient
    instance: dg.DagsterInstance
    report_dir: Path


def wait_for(client: DagsterGraphQLClient, run_id: str, timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    status = "?"
    while time.monotonic() < deadline:
        status = client.get_run_status(run_id).value
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            return status
        time.sleep(1)
    raise TimeoutError(f"run {run_id} still {status} after {timeout}s")


@pytest.fixture(scope="module")
def ui(trained_run: TrainedRun) -> Iterator[Ui]:
    """`dagster dev` on the instance holding the session's trained run (`conftest.trained_run`).

    The run was materialized before the webserver started: what the UI shows comes from the
    instance's storage. One job is launched through GraphQL here, observing the expert datasets
    again (their content has not changed, so neither do their versions).
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DAGSTER_HOME", str(trained_run.dagster_home))
        patch.setenv("MOLE_CONFIG_DIR", str(trained_run.config_dir))
        dagster_home()  # writes the default dagster.yaml the UI runs with
        instance = dg.DagsterInstance.get()
        with webserver(dict(os.environ), free_port()) as url:
            client = DagsterGraphQLClient("127.0.0.1", port_number=int(url.rsplit(":", 1)[1]))
            observed = client.submit_job_execution("observe_expert_datasets")
            assert wait_for(client, observed) == "SUCCESS"
            report_dir = Volumes.local(Path(os.environ["MOLE_HOME"])).run(RUN).report
            yield Ui(url, client, instance, report_dir)


def test_launch_through_graphql_and_read_lineage(ui: Ui) -> None:
    nodes = ui.client._execute(LINEAGE_QUERY)["assetNodes"]  # noqa: SLF001 - raw GraphQL query
    edges = {
        "/".join(n["assetKey"]["path"]): {"/".join(d["path"]) for d in n["dependencyKeys"]}
        for n in nodes
    }
    assert "expert_datasets/map" in edges["routing_dataset"]
    assert edges["tokenized_shards"] == {"routing_dataset"}
    assert edges["router_checkpoint"] == {"tokenized_shards"}
    assert edges["eval_report"] == {"router_checkpoint", "expert_adapters"}
    assert edges["deployed_router"] == {"eval_report"}
    assert {n["opVersion"] for n in nodes if n["assetKey"]["path"] == ["eval_report"]} == {"1"}
    # Data versions chain from expert content hashes to the eval report.
    tags = {key: _latest_tags(ui.instance, key) for key in CHAIN}
    observed_map = ui.instance.fetch_observations(dg.AssetKey(["expert_datasets", "map"]), limit=1)
    map_version = observed_map.records[0].event_log_entry.asset_observation.data_version
    assert tags["routing_dataset"]["dagster/input_data_version/expert_datasets/map"] == map_version
    for upstream, downstream in zip(CHAIN, CHAIN[1:], strict=False):
        # For a partitioned upstream Dagster records a digest of the partition's data version.
        assert len(tags[downstream][f"dagster/input_data_version/{upstream}"]) == 64
        assert tags[upstream]["dagster/data_version_is_user_provided"] == "true"
        assert tags[downstream]["dagster/code_version"] == "1"


def _latest_tags(instance: dg.DagsterInstance, key: str) -> dict[str, str]:
    event = instance.get_latest_materialization_event(dg.AssetKey(key))
    assert event is not None and event.asset_materialization is not None, key
    return dict(event.asset_materialization.tags or {})


def test_graphql_client_reports_unknown_job(ui: Ui) -> None:
    with pytest.raises(DagsterGraphQLClientError):
        ui.client.submit_job_execution("no_such_job")


@pytest.fixture(scope="module")
def page(ui: Ui) -> Iterator[Page]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "the browser check needs Chromium: apt-get install -y chromium"
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        yield browser.new_page(viewport={"width": 1600, "height": 1000})
        browser.close()


def open_page(page: Page, url: str, ready: str) -> None:
    """Go to `url`, wait until `ready` is shown, then dismiss the first-visit dialog."""
    page.goto(url)
    page.get_by_text(ready, exact=True).first.wait_for(timeout=60_000)
    dismiss_dialogs(page)


def test_browser_shows_lineage_from_expert_datasets_to_deployed_router(ui: Ui, page: Page) -> None:
    lineage = "/assets/deployed_router?view=lineage&lineageScope=upstream&lineageDepth=9"
    open_page(page, ui.url + lineage, "deployed_router")
    for name in ["map", "calendar", *CHAIN, "expert_adapters", "deployed_router"]:
        node = page.get_by_text(name, exact=True).first
        node.wait_for(timeout=30_000)
        assert node.is_visible(), name


def test_browser_shows_eval_report_accuracy_and_confusion_matrix(ui: Ui, page: Page) -> None:
    report = json.loads((ui.report_dir / "report.json").read_text())
    open_page(page, f"{ui.url}/assets/eval_report?view=events&partition={RUN}", "accuracy")
    row = page.locator("tr", has=page.get_by_text("accuracy", exact=True)).first
    assert str(round(report["accuracy"], 4)) in row.inner_text()
    # The figure is markdown metadata: a person opens it from its row.
    figure = page.locator("tr", has=page.get_by_text("confusion_matrix", exact=True)).first
    figure.get_by_text("[Show Markdown]").click()
    image = page.get_by_role("dialog").locator("img[alt='confusion matrix']").first
    image.wait_for(timeout=30_000)
    assert image.evaluate("img => img.complete && img.naturalWidth > 0")
    src = image.get_attribute("src") or ""
    png = (ui.report_dir / "confusion_matrix.png").read_bytes()
    assert base64.b64decode(src.split(",", 1)[1]) == png
