"""How long a local stage takes to start: warm launches against plain `python -m`.

Each launch runs a stage module as the local backend does, up to the point where it would read
its spec (`--spec` names a file that does not exist, so it stops there, after every import):
the baseline is `python -m modal_jobs.stages.<stage>`, what the local backend ran before warm
launches and what `MOLE_WARM_STAGES=0` runs; ours is the same module through
`python -m modal_jobs.launch.warm`, forked from a server started (and timed) beforehand.
Alternating rounds, median per stage. Prints one JSON object.

    .venv/bin/python benchmarks/stage_start.py --rounds 5
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from modal_jobs.launch import warm, warm_server

STAGES = ("shards", "train", "experts", "evaluate")


def launch(command: list[str], env: dict[str, str]) -> float:
    """Seconds until the stage, having imported everything, fails on the missing spec."""
    start = time.perf_counter()
    done = subprocess.run(
        [*command, "--spec", "/nonexistent/spec.json"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - start
    if done.returncode == 0 or "nonexistent" not in done.stderr:
        raise RuntimeError(f"{command} did not stop at the missing spec: {done.stderr[-2000:]}")
    return elapsed


def start_server(env: dict[str, str]) -> float:
    """Seconds from the first warm launch until the server accepts stages."""
    start = time.perf_counter()
    launch(warm.command("modal_jobs.stages.deploy"), env)  # no server: runs directly, starts one
    path = warm.server_dir(env) / f"{warm.server_key(env)}.sock"
    while time.perf_counter() - start < 300:
        if path.exists() and path.with_suffix(".log").read_text().count("serving"):
            return time.perf_counter() - start
        time.sleep(0.05)
    raise TimeoutError("the warm server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-warm-"))
    env = {**os.environ, warm.DIR_ENV: str(folder), "PYTHONUNBUFFERED": "1"}
    try:
        server_start = start_server(env)
        times: dict[str, dict[str, list[float]]] = {s: {"ours": [], "baseline": []} for s in STAGES}
        for _ in range(args.rounds):
            for stage in STAGES:
                module = f"modal_jobs.stages.{stage}"
                times[stage]["baseline"].append(launch([sys.executable, "-m", module], env))
                times[stage]["ours"].append(launch(warm.command(module), env))
    finally:
        warm_server.stop_servers(folder)
    medians = {
        stage: {side: round(statistics.median(values), 3) for side, values in sides.items()}
        for stage, sides in times.items()
    }
    ours = sum(m["ours"] for m in medians.values())
    baseline = sum(m["baseline"] for m in medians.values())
    print(
        json.dumps(
            {
                "benchmark": "stage_start",
                "rounds": args.rounds,
                "cpus": os.cpu_count(),
                "server_start_s": round(server_start, 2),
                "stages_s": medians,
                "four_stages_s": {"ours": round(ours, 2), "baseline": round(baseline, 2)},
                "speedup": round(baseline / ours, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
