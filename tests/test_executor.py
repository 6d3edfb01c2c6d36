"""The executor of the runs Dagster launches (`mole_assets/executor.py`): a run whose next step
waits for a pool slot waits idly, where Dagster's own multiprocess executor spins a core."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg

from mole_assets.definitions import defs
from mole_assets.executor import STEP_PROCESSES

from .pool_probe import POOL

REPO = Path(__file__).resolve().parents[1]
WINDOW_S = 2.0  # how long the waiting runs' CPU time is measured
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process `pid` so far (Linux `/proc/<pid>/stat`)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def until(probe, what: str, timeout: float = 120.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(0.1)
    raise TimeoutError(f"{what} not seen within {timeout:.0f}s")


def blocked_by_pool(instance: dg.DagsterInstance, job: str) -> bool:
    """Whether a run of `job` has reported its step blocked by the `probe` pool's limit."""
    for run in instance.get_runs(filters=dg.RunsFilter(job_name=job)):
        for entry in instance.all_logs(run.run_id):
            if f"blocked by limit for pool {POOL}" in (entry.message or ""):
                return True
    return False


def test_the_definitions_run_steps_in_forked_processes_with_the_patient_executor() -> None:
    job = defs.resolve_job_def("train_router")
    assert job.executor_def is STEP_PROCESSES
    assert job.executor_def.name == "multiprocess_forkserver"


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

        def holding() -> bool:
            assert holder.poll() is None, holder.communicate()[1].decode()[-3000:]
            return (holder_folder / "holding").exists()

        until(holding, "the slot held")
        waiting = {name: start(name, hold=False)[0] for name in ("stock", "mole")}
        try:
            until(lambda: all(blocked_by_pool(instance, j) for j in waiting), "both runs blocked")
            before = {name: cpu_seconds(p.pid) for name, p in waiting.items()}
            time.sleep(WINDOW_S)
            share = {n: (cpu_seconds(p.pid) - before[n]) / WINDOW_S for n, p in waiting.items()}
            # The slot was held the whole time: the window measured waiting runs.
            assert not (tmp_path / "stock" / "holding").exists()
            assert not (tmp_path / "mole" / "holding").exists()
        finally:
            (holder_folder / "release").write_text("")
        for name, process in {"holder": holder, **waiting}.items():
            _, stderr = process.communicate(timeout=300)
            assert process.returncode == 0, (name, stderr.decode()[-3000:])
    # The fault the executor exists for is there: Dagster's own loop spins while it waits.
    assert share["stock"] > 0.5, share
    assert share["mole"] < 0.1, share
