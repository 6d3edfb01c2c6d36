"""A stand-in stage for `tests/test_warm.py`: reports what a launched stage sees, then ends the
way its arguments say (`exit N`, `signal N`, `sleep S`, `raise`, `trap`: exit 3 on
SIGTERM, `threads`: also report torch's intra-op thread count)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time


def report() -> dict[str, object]:
    """What the stage process sees of its launch."""
    seen: dict[str, object] = {
        "pid": os.getpid(),
        "cwd": os.getcwd(),
        "argv": sys.argv[1:],
        "env": {k: v for k, v in os.environ.items() if k.startswith("WARM_PROBE")},
        "torch_preloaded": "torch" in sys.modules,
        "project_preloaded": "modal_jobs.config" in sys.modules,
        "stdin": sys.stdin.readline().strip(),
        "main": __name__,
        "umask": umask(),
        "cpus": sorted(os.sched_getaffinity(0)),
    }
    if sys.argv[1:2] == ["threads"]:
        import torch

        seen["threads"] = torch.get_num_threads()
    return seen


def umask() -> int:
    """The process's umask (reading it means setting it: set it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def on_term(_signum: int, _frame: object) -> None:
    print("got SIGTERM", flush=True)
    raise SystemExit(3)


if __name__ == "__main__":
    print(json.dumps(report()), flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    what, value = (sys.argv[1:] + ["exit", "0"])[:2]
    if what == "trap":
        signal.signal(signal.SIGTERM, on_term)
        what, value = "sleep", "60"
    if what == "sleep":
        time.sleep(float(value))
    if what == "signal":
        os.kill(os.getpid(), int(value))
    if what == "raise":
        raise RuntimeError("the probe was asked to fail")
    raise SystemExit(int(value) if what == "exit" else 0)
