"""`python -m modal_jobs.stages.train` that also records which rank wrote what.

Run under `torchrun` by tests/test_distributed.py: the real stage runs unchanged, and every call
of the real `save_state` (a resume point) and `publish` (the adapter) is appended, with the
caller's `RANK`, to `$MOLE_TEST_WRITES/rank-<RANK>.jsonl`.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modal_jobs.launch.pipes import main
from modal_jobs.stages import train

WRITES_ENV = "MOLE_TEST_WRITES"


def recorded(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
    """`real`, appending `{"call", "target", "step"}` to this rank's log before each call."""

    @functools.wraps(real)
    def call(target: Path, *args: Any, **kwargs: Any) -> Any:
        rank = os.environ.get("RANK", "0")
        log = Path(os.environ[WRITES_ENV]) / f"rank-{rank}.jsonl"
        with log.open("a") as handle:
            step = args[0] if args and isinstance(args[0], int) else None
            handle.write(json.dumps({"call": name, "target": str(target), "step": step}) + "\n")
        return real(target, *args, **kwargs)

    return call


if __name__ == "__main__":
    train.save_state = recorded("save_state", train.save_state)  # type: ignore[assignment]
    train.publish = recorded("publish", train.publish)  # type: ignore[assignment]
    main(train.run, train.TrainSpec)
