"""The executor of the runs Dagster launches: a process per step, forked, and patient in pools.

Runs launched by the UI, the daemon's queue or the sensor execute each step in a process of
its own (Dagster's multiprocess executor; `dg.materialize` and `mole materialize` run
in-process). Two changes to it:

- **Forked step processes.** Dagster's `forkserver` start method forks each step from a server
  that has imported Dagster and this code location once per run; spawned, every step imports
  them afresh (about a second each here).
- **No busy wait for a pool slot.** When every step a run could start next is blocked by a pool
  limit (the `gpu` pool: another run is training) and none of its step processes is open, the
  multiprocess executor's loop (`dagster/_core/executor/multiprocess.py`, `execute`) asks its
  plan state for steps again at once, with no sleep at all: the run worker spins at 100 % of a
  core for as long as it waits (measured: 7.7 s of CPU over an 8 s wait; dagster 1.13.27, and
  1.13.29 has the same loop). On a 2-core machine the training it waits for then runs several
  times slower. The in-process executor (`dg.materialize`, so `mole materialize`) does sleep,
  for `ActiveExecution.sleep_interval`, but that is 0 while pool claims are pending
  (`InstanceConcurrencyContext.interval_to_next_pending_claim_check` returns `min([0, …])`,
  `dagster/_core/execution/plan/instance_concurrency_context.py`), so it spins too (measured:
  4.3 s of CPU over a 4.6 s wait). The plan state used here sleeps `POOL_WAIT_S` when no step
  process is open, nothing can start and the plan is not done; `mole materialize` runs its
  materialization under `patient_pool_waits()` as well.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

import dagster as dg
import dagster._core.execution.plan.active as dagster_active
import dagster._core.executor.multiprocess as dagster_multiprocess
from dagster._core.execution.plan.active import ActiveExecution
from dagster._core.executor.base import Executor
from dagster._core.executor.init import InitExecutorContext

POOL_WAIT_S = 0.2  # how late a due slot claim, a retry or a termination request is seen
PLAN_STATE = "ActiveExecution"  # the name the executors build their plan state by


class PatientExecution(ActiveExecution):
    """Dagster's plan state, waiting instead of answering at once when nothing can start."""

    def get_steps_to_execute(self, limit: int | None = None) -> Sequence[Any]:
        """The steps to start now, after `POOL_WAIT_S` if none can while none runs."""
        steps = super().get_steps_to_execute(limit)
        if not steps and self._nothing_open(limit) and not self.is_complete:
            time.sleep(POOL_WAIT_S)
        return steps

    def _nothing_open(self, limit: int | None) -> bool:
        """Whether no step is in flight and no step process is still open.

        The multiprocess loop asks with `limit` = its free process slots: below its maximum, a
        process is open, if only to report a step already done.
        """
        maximum = self._max_concurrent
        processes_open = limit is not None and maximum is not None and limit < maximum
        return not processes_open and not self.has_in_flight_steps


@contextlib.contextmanager
def patient_pool_waits() -> Iterator[None]:
    """Executions started inside build their plan state as a `PatientExecution`.

    The multiprocess executor builds it by its module's name for the class; the in-process one
    (`ExecutionPlan.start`) imports it from `dagster._core.execution.plan.active` each time.
    Both names are restored on exit.
    """
    modules = (dagster_multiprocess, dagster_active)
    before = [getattr(module, PLAN_STATE) for module in modules]
    for module in modules:
        setattr(module, PLAN_STATE, PatientExecution)
    try:
        yield
    finally:
        for module, original in zip(modules, before, strict=True):
            setattr(module, PLAN_STATE, original)


class StepProcesses(Executor):
    """Dagster's multiprocess executor, run with the patient plan state."""

    def __init__(self, inner: Executor) -> None:
        self.inner = inner

    def execute(self, plan_context: Any, execution_plan: Any) -> Iterator[Any]:
        """Dagster's multiprocess execution of the plan, with `PatientExecution` as its state."""
        # A run worker runs one run: the name stays patched for as long as that run executes.
        with patient_pool_waits():
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
    """Dagster's multiprocess executor from the run's configuration, made patient.

    The start method is `forkserver` unless the configuration names one.
    """
    config = dict(init_context.executor_config)
    config["start_method"] = config.get("start_method") or {"forkserver": {}}
    create = dg.multiprocess_executor.executor_creation_fn
    assert create is not None
    context = InitExecutorContext(
        job=init_context.job,
        executor_def=init_context.executor_def,
        executor_config=config,
        instance=init_context.instance,
    )
    return StepProcesses(create(context))


STEP_PROCESSES = dg.ExecutorDefinition(
    name="multiprocess",
    config_schema=dg.multiprocess_executor.config_schema.as_field(),
    requirements=dg.multiple_process_executor_requirements(),
    executor_creation_fn=_step_processes,
    description=(
        "Dagster's multiprocess executor (the same settings), forking step processes and "
        "waiting idly while steps wait for a pool slot."
    ),
)
