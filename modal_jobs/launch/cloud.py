"""The Modal backend's local side: what each stage's `@app.local_entrypoint` does.

`dagster_modal.ModalClient` runs `modal run modal_jobs/mole_app.py::<entrypoint>` with the Dagster
Pipes environment; the entrypoint process (on the Dagster machine) opens Pipes, sends the stage
spec — rewritten to the volumes' mount paths — to the Modal functions (`.remote()`, `.map()`),
and reports the `StageResult` they return, plus what the run cost. Pipes environment variables
never reach the containers, so containers only return values.

`remotes` maps a function name (`compute.functions()`) to a `modal.Function`, plus `data_volume`
to the data `modal.Volume` (`mole_app.REMOTES`). Containers never raise bad input (Modal would
retry it): they return it, and `unwrap` raises it here, once.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dagster_pipes import open_dagster_pipes

from modal_jobs.errors import MoleError
from modal_jobs.hashing import file_sha256
from modal_jobs.launch.compute import cost_metadata, functions
from modal_jobs.launch.pipes import forward_logs, record_bad_input, report
from modal_jobs.launch.table import STAGES
from modal_jobs.layout import DATA_VOLUME, Volumes
from modal_jobs.stage import StageResult, StageSpec

log = logging.getLogger(__name__)

Remotes = Mapping[str, Any]
Driver = Callable[[dict[str, Any], Remotes], dict[str, Any]]
# Beside the dataset on the volume: relative path → sha256 of every file uploaded last time.
UPLOADED = ".uploaded.json"
# What a Modal function returns instead of raising bad input (see `mole_app.returns_bad_input`).
BAD_INPUT = "bad_input"


class RemoteBadInput(MoleError):
    """Bad input found in a Modal container, raised again on the caller's side."""


def bad_input(exc: MoleError) -> dict[str, Any]:
    """The value a container returns for bad input: the message, no retry."""
    return {BAD_INPUT: str(exc)}


def unwrap(result: Any) -> Any:
    """A function's result, raising what a container returned as bad input."""
    if isinstance(result, dict) and set(result) == {BAD_INPUT}:
        raise RemoteBadInput(result[BAD_INPUT])
    return result


def call(remotes: Remotes, function: str, *args: Any, **kwargs: Any) -> Any:
    """`remotes[function].remote(...)`, bad input raised here."""
    return unwrap(remotes[function].remote(*args, **kwargs))


def container_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec as a container sees it: the same run and config, volumes at `/vol/<name>`."""
    mounted = {key: str(path) for key, path in asdict(Volumes.modal()).items()}
    return {**spec, "volumes": mounted}


def launch(asset: str, spec_file: str, remotes: Remotes) -> None:
    """Run one stage on Modal: under Dagster Pipes, or by hand with `--spec spec.json`."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if spec_file:
        spec = json.loads(Path(spec_file).read_text())
        print(json.dumps(_drive(asset, spec, remotes).to_json(), indent=2, default=str))
        return
    with open_dagster_pipes() as context, forward_logs(context):
        try:
            result = _drive(asset, context.extras["spec"], remotes)
        except MoleError as exc:
            record_bad_input(context, exc)
            raise
        report(context, result)


def rollback(remotes: Remotes) -> str:
    """Roll the deployment back on the inference volume, in the one deploy container."""
    return str(call(remotes, "deploy_router", None, rollback=True)["current"])


def _drive(asset: str, spec: dict[str, Any], remotes: Remotes) -> StageResult:
    started = time.perf_counter()
    result = StageResult.from_json(DRIVERS[asset](spec, remotes))
    seconds = time.perf_counter() - started
    table = functions()
    called = [table[name] for name in STAGES[asset].functions]
    gpu = next((f.gpu for f in called if f.gpu), None)
    cores = sum(f.cpu for f in called)
    # Wall time of the calls, cold starts and queueing included: an upper bound for one
    # container, a rough figure for a `.map` fan-out.
    return result.with_metadata(cost_metadata("modal", gpu, seconds, cores))


def _dataset(spec: dict[str, Any], remotes: Remotes) -> dict[str, Any]:
    """Build the routing dataset here, where the expert data is, then upload it."""
    from modal_jobs.stages import dataset

    local = StageSpec.model_validate(spec)
    result = dataset.run(local)
    remote_dir = f"runs/{local.run}/{local.layout.dataset.name}"
    sent, kept = upload_tree(remotes["data_volume"], local.layout.dataset, remote_dir)
    log.info("uploaded %d file(s) to %s:/%s (%d unchanged)", sent, DATA_VOLUME, remote_dir, kept)
    return result.to_json()


def _shards(spec: dict[str, Any], remotes: Remotes) -> dict[str, Any]:
    """Plan once, tokenize every chunk in its own container, merge."""
    started = time.perf_counter()
    sent = container_spec(spec)
    plan = call(remotes, "shards_plan", sent)
    chunks = plan["chunks"]
    log.info("tokenizing %d chunk(s) in parallel containers", len(chunks))
    mapped = remotes["shards_chunk"].map([sent] * len(chunks), [plan["base"]] * len(chunks), chunks)
    entries = [unwrap(entry) for entry in mapped]
    seconds = time.perf_counter() - started
    result: dict[str, Any] = call(remotes, "shards_finish", sent, plan["base"], entries, seconds)
    return result


def _train(spec: dict[str, Any], remotes: Remotes) -> dict[str, Any]:
    """Train on a GPU container; a retried (preempted) call resumes from the volume."""
    from modal_jobs.stages.train import TrainSpec

    sent = container_spec(spec)
    resume = TrainSpec.model_validate(sent).layout.resume
    log.info("training on Modal; resume points under %s:%s", DATA_VOLUME, resume)
    result: dict[str, Any] = call(remotes, "train_router", sent)
    return result


def _single(function: str) -> Driver:
    def drive(spec: dict[str, Any], remotes: Remotes) -> dict[str, Any]:
        result: dict[str, Any] = call(remotes, function, container_spec(spec))
        return result

    return drive


DRIVERS: dict[str, Driver] = {
    "routing_dataset": _dataset,
    "tokenized_shards": _shards,
    "router_checkpoint": _train,
    "expert_adapters": _single("train_experts"),
    "eval_report": _single("evaluate_router"),
    "deployed_router": _single("deploy_router"),
}


def upload_tree(volume: Any, local_dir: Path, remote_dir: str) -> tuple[int, int]:
    """Upload `local_dir` to `remote_dir` on `volume`, skipping files whose hash is unchanged.

    The hashes of the last upload live beside the files (`.uploaded.json`); files gone from
    `local_dir` are removed from the volume. Returns (uploaded, unchanged) counts.
    """
    current = {
        str(path.relative_to(local_dir)): file_sha256(path)
        for path in sorted(local_dir.rglob("*"))
        if path.is_file()
    }
    previous = _uploaded(volume, f"{remote_dir}/{UPLOADED}")
    changed = [rel for rel, sha in current.items() if previous.get(rel) != sha]
    for gone in sorted(set(previous) - set(current)):
        volume.remove_file(f"{remote_dir}/{gone}")
    # Uploads from outside a container are persisted when the batch closes (commit() is only
    # for containers that mount the volume); the hash list goes last, so it never claims more.
    with volume.batch_upload(force=True) as batch:
        for rel in changed:
            batch.put_file(local_dir / rel, f"{remote_dir}/{rel}")
        batch.put_file(io.BytesIO(json.dumps(current).encode()), f"{remote_dir}/{UPLOADED}")
    return len(changed), len(current) - len(changed)


def _uploaded(volume: Any, path: str) -> dict[str, str]:
    try:
        blob = b"".join(volume.read_file(path))
    except FileNotFoundError:  # what `modal.Volume.read_file` raises for a missing file
        return {}
    return dict(json.loads(blob))
