"""Running a stage as `python -m modal_jobs.stages.<stage>`: under Dagster Pipes, or by hand.

Under Pipes the spec arrives in the Pipes extras, logs stream to Dagster and the `StageResult`
becomes the materialization (metadata, data version) and asset-check results. Without Dagster,
`--spec spec.json` runs the same function and prints the result as JSON. Under `torchrun` every
rank runs the stage, and only rank 0 opens Pipes or prints: one writer of the message channel,
one materialization.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from dagster_pipes import (
    PipesContext,
    PipesDefaultContextLoader,
    PipesEnvVarParamsLoader,
    open_dagster_pipes,
)

from modal_jobs.errors import MoleError
from modal_jobs.launch.compute import Gpu, cost_metadata
from modal_jobs.stage import StageResult, StageSpec

S = TypeVar("S", bound=StageSpec)
# Exit status for bad input (a user error, not an infrastructure failure).
EXIT_BAD_INPUT = 3
# Pipes extra naming the file a stage writes its bad-input message to before failing.
BAD_INPUT_EXTRA = "bad_input_file"


class _PipesLogHandler(logging.Handler):
    """Forwards Python logging records to Dagster's compute log through Pipes."""

    def __init__(self, context: PipesContext) -> None:
        super().__init__(logging.INFO)
        self.context = context

    def emit(self, record: logging.LogRecord) -> None:
        level = "warning" if record.levelno >= logging.WARNING else "info"
        getattr(self.context.log, level)(self.format(record))


def report(context: PipesContext, result: StageResult) -> None:
    """Report a stage result to Dagster: the materialization, then each asset check."""
    context.report_asset_materialization(metadata=result.metadata, data_version=result.data_version)
    for check in result.checks:
        context.report_asset_check(
            check_name=check.name,
            passed=check.passed,
            severity=check.severity,
            metadata={
                "description": {"type": "text", "raw_value": check.description},
                **check.metadata,
            },
        )


def record_bad_input(context: PipesContext, exc: MoleError) -> None:
    """Tell the launcher the input is bad: it fails the asset once, with this message."""
    if BAD_INPUT_EXTRA in context.extras:
        Path(context.extras[BAD_INPUT_EXTRA]).write_text(str(exc))


def main(
    run: Callable[[S], StageResult], spec_type: type[S], argv: list[str] | None = None
) -> None:
    """Entry point of every stage module."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        if not PipesEnvVarParamsLoader().is_dagster_pipes_process():  # type: ignore[no-untyped-call]
            _run_by_hand(run, spec_type, argv)
        elif process_rank() == 0:
            _run_under_pipes(run, spec_type)
        else:
            _run_pipes_worker(run, spec_type)
    except MoleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from exc


@contextlib.contextmanager
def forward_logs(context: PipesContext) -> Iterator[None]:
    """Stream Python logging to Dagster's compute log while the block runs."""
    handler = _PipesLogHandler(context)
    logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)


def local_gpu() -> Gpu | None:
    """The local CUDA device(s), if the stage used torch and CUDA is there."""
    # Only stages that run a model import torch; importing it here would slow the others down.
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    return Gpu(torch.cuda.get_device_name(0), torch.cuda.device_count())


def process_rank() -> int:
    """This process's rank under `torchrun` (`RANK`); 0 when the stage runs alone."""
    return int(os.environ.get("RANK", "0"))


def _run_under_pipes(run: Callable[[S], StageResult], spec_type: type[S]) -> None:
    with open_dagster_pipes() as context:
        started = time.perf_counter()
        try:
            with forward_logs(context):
                result = run(spec_type.model_validate(context.extras["spec"]))
        except MoleError as exc:
            record_bad_input(context, exc)
            raise
        seconds = time.perf_counter() - started
        report(context, result.with_metadata(cost_metadata("local", local_gpu(), seconds)))


def _run_pipes_worker(run: Callable[[S], StageResult], spec_type: type[S]) -> None:
    """A torchrun rank other than 0: read the spec from the Pipes context, run, report nothing."""
    params = PipesEnvVarParamsLoader().load_context_params()  # type: ignore[no-untyped-call]
    with PipesDefaultContextLoader().load_context(params) as context:
        spec = spec_type.model_validate(context["extras"]["spec"])
    run(spec)


def _run_by_hand(
    run: Callable[[S], StageResult], spec_type: type[S], argv: list[str] | None
) -> None:
    parser = argparse.ArgumentParser(description="Run one mole stage without Dagster.")
    parser.add_argument("--spec", type=Path, required=True, help="JSON file with the stage spec")
    parser.add_argument("--result", type=Path, help="also write the result JSON to this file")
    args = parser.parse_args(argv)
    spec: Any = spec_type.model_validate(json.loads(args.spec.read_text()))
    result = json.dumps(run(spec).to_json(), indent=2, default=str)
    if process_rank() != 0:
        return
    print(result)
    if args.result:
        args.result.write_text(result)
