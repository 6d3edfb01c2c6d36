"""A run that needs the slot of the `probe` pool, for `tests/test_executor.py`.

`python -m tests.pool_probe <how> <folder>` runs it against `DAGSTER_HOME`, tagged
`probe=<how>`: a job on Dagster's own multiprocess executor (`stock`) or mole's (`mole`), or an
asset through `dg.materialize`, Dagster's in-process executor, bare (`stock-inprocess`) or under
`patient_pool_waits()` as `mole materialize` runs it (`mole-inprocess`). Its one step claims
the pool's slot, writes `<folder>/holding` and keeps the slot until `<folder>/release` exists
(at most `HOLD_MAX_S`).
"""

import contextlib
import sys
import time
from pathlib import Path

import dagster as dg

from mole_assets.executor import STEP_PROCESSES, patient_pool_waits

POOL = "probe"
HOLD_MAX_S = 300.0
CONFIG = {"folder": str}


def hold(folder: Path) -> None:
    """Report the slot held, then keep it until told to let go."""
    (folder / "holding").write_text("")
    deadline = time.monotonic() + HOLD_MAX_S
    while not (folder / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.05)


@dg.op(pool=POOL, config_schema=CONFIG)
def hold_the_slot(context: dg.OpExecutionContext) -> None:
    hold(Path(context.op_config["folder"]))


@dg.asset(pool=POOL, config_schema=CONFIG)
def slot_holder(context: dg.AssetExecutionContext) -> None:
    hold(Path(context.op_execution_context.op_config["folder"]))


@dg.job(executor_def=dg.multiprocess_executor)
def stock() -> None:
    hold_the_slot()


@dg.job(executor_def=STEP_PROCESSES)
def mole() -> None:
    hold_the_slot()


def main(how: str, folder: str) -> bool:
    """Run the probe `how`; whether it succeeded."""
    tags = {"probe": how}
    with dg.DagsterInstance.get() as instance:
        if how in ("stock", "mole"):
            config = {"ops": {"hold_the_slot": {"config": {"folder": folder}}}}
            job = dg.reconstructable(stock if how == "stock" else mole)
            return dg.execute_job(job, instance, run_config=config, tags=tags).success
        config = {"ops": {"slot_holder": {"config": {"folder": folder}}}}
        waits = patient_pool_waits() if how == "mole-inprocess" else contextlib.nullcontext()
        with waits:
            return dg.materialize(
                [slot_holder], instance=instance, run_config=config, tags=tags
            ).success


if __name__ == "__main__":
    raise SystemExit(0 if main(sys.argv[1], sys.argv[2]) else 1)
