"""The real Dagster webserver: launch a partition through GraphQL, wait, read the lineage back."""

from __future__ import annotations

import os
import time
from pathlib import Path

import dagster as dg
import pytest
from dagster_graphql import DagsterGraphQLClient, DagsterGraphQLClientError

from mole_assets.instance import dagster_home
from mole_assets.partitions import RUN_NAMES
from mole_assets.webserver import free_port, webserver

from .conftest import MakeConfig

RUN = "ui-run"
LINEAGE_QUERY = """
query Lineage {
  assetNodes {
    assetKey { path }
    dependencyKeys { path }
    opVersion
  }
}
"""


def wait_for(client: DagsterGraphQLClient, run_id: str, timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    status = "?"
    while time.monotonic() < deadline:
        status = client.get_run_status(run_id).value
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            return status
        time.sleep(1)
    raise TimeoutError(f"run {run_id} still {status} after {timeout}s")


def test_launch_through_graphql_and_read_lineage(
    tmp_path: Path, make_config: MakeConfig, monkeypatch: pytest.MonkeyPatch, tiny_base: str
) -> None:
    config = make_config()
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    monkeypatch.setenv("MOLE_CONFIG_DIR", str(config))
    dagster_home()  # writes the default dagster.yaml the UI runs with
    instance = dg.DagsterInstance.get()
    instance.add_dynamic_partitions(RUN_NAMES, [RUN])
    with webserver(dict(os.environ), free_port()) as url:
        client = DagsterGraphQLClient("127.0.0.1", port_number=int(url.rsplit(":", 1)[1]))
        observed = client.submit_job_execution("observe_expert_datasets")
        assert wait_for(client, observed) == "SUCCESS"
        run_id = client.submit_job_execution(
            "train_router",
            run_config={"ops": {"router_checkpoint": {"config": {"mode": "test"}}}},
            tags={"dagster/partition": RUN},
        )
        assert wait_for(client, run_id) == "SUCCESS"
        nodes = client._execute(LINEAGE_QUERY)["assetNodes"]  # noqa: SLF001 - raw GraphQL query
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
    chain = ["routing_dataset", "tokenized_shards", "router_checkpoint", "eval_report"]
    tags = {key: _latest_tags(instance, key) for key in chain}
    observed_map = instance.fetch_observations(dg.AssetKey(["expert_datasets", "map"]), limit=1)
    map_version = observed_map.records[0].event_log_entry.asset_observation.data_version
    assert tags["routing_dataset"]["dagster/input_data_version/expert_datasets/map"] == map_version
    for upstream, downstream in zip(chain, chain[1:], strict=False):
        # For a partitioned upstream Dagster records a digest of the partition's data version.
        assert len(tags[downstream][f"dagster/input_data_version/{upstream}"]) == 64
        assert tags[upstream]["dagster/data_version_is_user_provided"] == "true"
        assert tags[downstream]["dagster/code_version"] == "1"


def _latest_tags(instance: dg.DagsterInstance, key: str) -> dict[str, str]:
    event = instance.get_latest_materialization_event(dg.AssetKey(key))
    assert event is not None and event.asset_materialization is not None, key
    return dict(event.asset_materialization.tags or {})


def test_graphql_client_reports_unknown_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_config: MakeConfig
) -> None:
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    monkeypatch.setenv("MOLE_CONFIG_DIR", str(make_config()))
    dagster_home()
    with webserver(dict(os.environ), free_port()) as url:
        client = DagsterGraphQLClient("127.0.0.1", port_number=int(url.rsplit(":", 1)[1]))
        with pytest.raises(DagsterGraphQLClientError):
            client.submit_job_execution("no_such_job")
