"""The executor of the runs Dagster launches and `mole materialize`'s wait
(`mole_assets/executor.py`): a run whose next step waits for a pool slot waits idly, where
Dagster's own executors, multiprocess and in-process, spin a core."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import dagster as dg
import dagster._config as dg_config
from dagster._core.definitions.job_base import InMemoryJob
from dagster._core.executor.init import InitExecutorContext

from mole_assets.definitions import defs
from mole_assets.executor import STEP_PROCESSES
from mole_assets.service_state import eventually

from .pool_probe import POOL

REPO = Path(__file__).resolve().parents[1]
WINDOW_S = 2.0  # how long the waiting runs' CPU time is measured
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process `pid` so far (Linux `/proc/<pid>/stat`)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def blocked_by_pool(instance: dg.DagsterInstance, how: str) -> bool:
    """Whether the probe run `how` has reported its step blocked by the `probe` pool's limit."""
    for run in instance.get_runs(filters=dg.RunsFilter(tags={"probe": how})):
        for entry in instance.all_logs(run.run_id):
            if f"blocked by limit for pool {POOL}" in (entry.message or ""):
                return True
    return False


def all_blocked(instance: dg.DagsterInstance, kinds: Iterable[str]) -> bool | None:
    """True once every probe run in `kinds` waits for the slot; None before."""
    return all(blocked_by_pool(instance, how) for how in kinds) or None


def kill_survivors(processes: Iterable[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_launched_runs_fork_their_step_processes_and_keep_the_executor_settings() -> None:
    job = defs.resolve_job_def("train_router")
    assert job.executor_def is STEP_PROCESSES
    with dg.DagsterInstance.ephemeral() as instance:

        def inner(config: dict[str, object]) -> Any:
            resolved = STEP_PROCESSES.config_schema.as_field().config_type
            processed = dg_config.process_config(resolved, config)
            assert processed.success, processed.errors
            context = InitExecutorContext(
                InMemoryJob(job), STEP_PROCESSES, processed.value, instance
            )
            create = STEP_PROCESSES.executor_creation_fn
            assert create is not None
            return create(context).inner

        default = inner({})
        assert default._start_method == "forkserver"
        # A run's own settings still apply (the launchpad's `execution` config).
        chosen = inner({"max_concurrent": 1, "start_method": {"spawn": {}}})
        assert (chosen._max_concurrent, chosen._start_method) == (1, "spawn")


def test_a_run_waiting_for_a_pool_slot_waits_idly(tmp_path: Path) -> None:
    home = tmp_path / "dagster"
    home.mkdir()
    (home / "dagster.yaml").write_text(
        "concurrency:\n  pools:\n    granularity: op\n    default_limit: 1\n"
        "telemetry:\n  enabled: false\n"
    )
    env = {**os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": str(REPO)}
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.event_log_storage.set_concurrency_slots(POOL, 1)

        def start(job: str, *, hold: bool) -> tuple[subprocess.Popen[bytes], Path]:
            folder = tmp_path / ("holder" if hold else job)
            folder.mkdir()
            if not hold:  # once it has the slot, it gives it back at once
                (folder / "release").write_text("")
            command = [sys.executable, "-m", "tests.pool_probe", job, str(folder)]
            process = subprocess.Popen(command, env=env, cwd=REPO, stderr=subprocess.PIPE)
            return process, folder

        holder, holder_folder = start("mole", hold=True)
        processes = {"holder": holder}
        kinds = ("stock", "mole", "stock-inprocess", "mole-inprocess")
        try:

            def holding() -> bool | None:
                assert holder.poll() is None, holder.communicate()[1].decode()[-3000:]
                return (holder_folder / "holding").exists() or None

            eventually(holding, "the slot held", timeout=120)
            waiting = {name: start(name, hold=False)[0] for name in kinds}
            processes.update(waiting)
            eventually(lambda: all_blocked(instance, kinds), "all four blocked", timeout=120)
            before = {name: cpu_seconds(p.pid) for name, p in waiting.items()}
            time.sleep(WINDOW_S)
            share = {n: (cpu_seconds(p.pid) - before[n]) / WINDOW_S for n, p in waiting.items()}
            # The slot was held the whole time: the window measured waiting runs.
            assert not any((tmp_path / name / "holding").exists() for name in kinds)
            (holder_folder / "release").write_text("")
            for name, process in processes.items():
                _, stderr = process.communicate(timeout=300)
                assert process.returncode == 0, (name, stderr.decode()[-3000:])
        finally:  # a waiting stock run left behind would spin a core for the rest of the suite
            kill_survivors(processes.values())
    # The fault the executor exists for is there: Dagster's own loops spin while they wait.
    assert share["stock"] > 0.4 and share["stock-inprocess"] > 0.4, share
    assert share["mole"] < 0.1 and share["mole-inprocess"] < 0.1, share
