"""The executor of the runs Dagster launches: a process per step, forked, and patient in pools.

Runs launched by the UI, the daemon's queue or the sensor execute each step in a process of
its own (Dagster's multiprocess executor; `dg.materialize` and `mole materialize` run
in-process). Two changes to it:

- **Forked step processes.** Dagster's `forkserver` start method forks each step from a server
  that has imported Dagster and this code location once per run; spawned, every step imports
  them afresh (about a second each here).
- **No busy wait for a pool slot.** When every step a run could start next is blocked by a pool
  limit (the `gpu` pool: another run is training) and none of its steps is running, the
  multiprocess executor's loop (`dagster/_core/executor/multiprocess.py`, `execute`) asks its
  plan state for steps again at once: the run worker spins at 100 % of a core for as long as it
  waits (measured: 7.7 s of CPU over an 8 s wait; dagster 1.13.27, and 1.13.29 has the same
  loop). On a 2-core machine the training it waits for then runs several times slower. Dagster
  re-tries the claim itself at growing intervals; the wait it offers for that,
  `ActiveExecution.sleep_interval`, is 0 while claims are pending
  (`InstanceConcurrencyContext.interval_to_next_pending_claim_check` returns `min([0, …])`,
  `dagster/_core/execution/plan/instance_concurrency_context.py`). The plan state used here
  sleeps `POOL_WAIT_S` instead whenever nothing runs, nothing can start and the plan is not
  done.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

import dagster as dg
import dagster._core.executor.multiprocess as dagster_multiprocess
from dagster._core.execution.plan.active import ActiveExecution
from dagster._core.executor.base import Executor

POOL_WAIT_S = 0.2  # the longest a freed slot, a retry or a termination request waits
PLAN_STATE = "ActiveExecution"  # the name `multiprocess.py` builds its plan state by


class PatientExecution(ActiveExecution):
    """Dagster's plan state, waiting instead of answering at once when nothing can start."""

    def get_steps_to_execute(self, limit: int | None = None) -> Sequence[Any]:
        """The steps to start now, after `POOL_WAIT_S` if none can while none runs."""
        steps = super().get_steps_to_execute(limit)
        if not steps and not self.has_in_flight_steps and not self.is_complete:
            time.sleep(POOL_WAIT_S)
        return steps


@contextlib.contextmanager
def _patient_plan_state() -> Iterator[None]:
    """`PatientExecution` under the module-level name the multiprocess executor builds by."""
    before = getattr(dagster_multiprocess, PLAN_STATE)
    setattr(dagster_multiprocess, PLAN_STATE, PatientExecution)
    try:
        yield
    finally:
        setattr(dagster_multiprocess, PLAN_STATE, before)


class StepProcesses(Executor):
    """Dagster's multiprocess executor, run with the patient plan state."""

    def __init__(self, inner: Executor) -> None:
        self.inner = inner

    def execute(self, plan_context: Any, execution_plan: Any) -> Iterator[Any]:
        """Dagster's multiprocess execution of the plan, with `PatientExecution` as its state."""
        # A run worker runs one run: the name stays patched for as long as that run executes.
        with _patient_plan_state():
            yield from self.inner.execute(plan_context, execution_plan)

    @property
    def retries(self) -> Any:
        """The wrapped executor's retry mode."""
        return self.inner.retries

    @property
    def step_dependency_config(self) -> Any:
        """The wrapped executor's step dependency settings."""
        return self.inner.step_dependency_config


def _step_processes(init_context: dg.InitExecutorContext) -> StepProcesses:
    """Dagster's multiprocess executor, from the same configuration, made patient."""
    create = dg.multiprocess_executor.executor_creation_fn
    assert create is not None
    return StepProcesses(create(init_context))


patient_multiprocess_executor = dg.ExecutorDefinition(
    name="multiprocess",
    config_schema=dg.multiprocess_executor.config_schema.as_field(),
    requirements=dg.multiple_process_executor_requirements(),
    executor_creation_fn=_step_processes,
    description="Dagster's multiprocess executor, waiting idly while steps wait for a pool slot.",
)
STEP_PROCESSES = patient_multiprocess_executor.configured(
    {"start_method": {"forkserver": {}}}, name="multiprocess_forkserver"
)
