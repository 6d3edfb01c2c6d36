"""A run that needs the slot of the `probe` pool, for `tests/test_executor.py`.

`python -m tests.pool_probe <executor> <folder>` executes the job with Dagster's own
multiprocess executor (`stock`) or mole's (`mole`) against `DAGSTER_HOME`. Its one step claims
the pool's slot, writes `<folder>/holding` and keeps the slot until `<folder>/release` exists
(at most `HOLD_MAX_S`).
"""

import sys
import time
from pathlib import Path

import dagster as dg

from mole_assets.executor import STEP_PROCESSES

POOL = "probe"
HOLD_MAX_S = 300.0


@dg.op(pool=POOL, config_schema={"folder": str})
def hold_the_slot(context: dg.OpExecutionContext) -> None:
    folder = Path(context.op_config["folder"])
    (folder / "holding").write_text(context.run_id)
    deadline = time.monotonic() + HOLD_MAX_S
    while not (folder / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.05)


@dg.job(executor_def=dg.multiprocess_executor)
def stock() -> None:
    hold_the_slot()


@dg.job(executor_def=STEP_PROCESSES)
def mole() -> None:
    hold_the_slot()


if __name__ == "__main__":
    job, folder = sys.argv[1], sys.argv[2]
    config = {"ops": {"hold_the_slot": {"config": {"folder": folder}}}}
    with dg.DagsterInstance.get() as instance:
        result = dg.execute_job(
            dg.reconstructable(stock if job == "stock" else mole), instance, run_config=config
        )
    raise SystemExit(0 if result.success else 1)
