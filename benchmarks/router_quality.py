"""Router quality run to run: the demo router trained with several seeds; ONE JSON object.

Needs the demo run's routing dataset and tokenized shards under MOLE_HOME (`make demo` makes
them). For each seed, in a scratch volume holding a copy of them, the training stage trains a
fresh router (the seed sets the LoRA init, the batch order and the instruction dropout) and the
eval stage judges it exactly as `make demo` does, without expert adapters (routing only). Every
figure of the report's prompt conditions and abstention sections is given per seed with its
mean, standard deviation (n - 1), min and max; the untrained router (the same base, adapter
off) is the baseline in the same run.

    MOLE_HOME=.mole python benchmarks/router_quality.py [--seeds 0 1 2] [--run demo]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from modal_jobs.config import load_config
from modal_jobs.layout import Volumes
from modal_jobs.stage import StageSpec
from modal_jobs.stages import evaluate, train

CONDITION_FIGURES = ("accuracy", "macro_f1", "ece")
OOD_FIGURES = ("auroc", "abstain_rate", "coverage", "selective_accuracy")


def one_seed(source: Volumes, run: str, seed: int) -> dict[str, Any]:
    """Train and evaluate one router in a scratch volume; the report's figures."""
    base = load_config()
    # Routing quality only: no expert adapters to stack (they live in the demo's volume).
    config = base.model_copy(update={"loras": base.loras.model_copy(update={"experts": {}})})
    with tempfile.TemporaryDirectory() as scratch:
        volumes = Volumes.local(Path(scratch))
        spec = train.TrainSpec(run=run, config=config, volumes=volumes, seed=seed)
        for name in ("dataset", "shards"):
            shutil.copytree(getattr(source.run(run), name), getattr(spec.layout, name))
        began = time.perf_counter()
        train.run(spec)
        trained = time.perf_counter() - began
        evaluate.run(StageSpec(run=run, config=config, volumes=volumes))
        report = json.loads((spec.layout.report / "report.json").read_text())
    figures: dict[str, float] = {
        "untrained_accuracy": report["untrained"]["accuracy"],
        "train_seconds": trained,
    }
    for condition, row in report["conditions"].items():
        figures.update({f"{condition}.{k}": row[k] for k in CONDITION_FIGURES})
    ood = report["ood"] or {}
    figures.update({f"ood.{k}": ood[k] for k in OOD_FIGURES if k in ood})
    figures["ood.score"] = ood.get("score", "none")
    return figures


def summarise(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean, spread, min and max of every numeric figure over the seeds."""
    out: dict[str, Any] = {}
    for key in per_seed[0]:
        values = [run[key] for run in per_seed]
        if not all(isinstance(v, int | float) for v in values):
            out[key] = values
            continue
        array = np.array(values, dtype=np.float64)
        out[key] = {
            "mean": float(array.mean()),
            "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
            "min": float(array.min()),
            "max": float(array.max()),
            "values": [round(float(v), 4) for v in array],
        }
    return out


def main() -> int:
    """Run every seed and print one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--run", default="demo")
    args = parser.parse_args()
    source = Volumes.local()
    if not (source.run(args.run).shards / "index.json").is_file():
        print(f"no tokenized shards for run {args.run!r} under MOLE_HOME: run `make demo` first")
        return 2
    began = time.perf_counter()
    per_seed = []
    for seed in args.seeds:
        per_seed.append(one_seed(source, args.run, seed))
        print(f"seed {seed}: {json.dumps(per_seed[-1])}", file=sys.stderr, flush=True)
    result = {
        "benchmark": "router_quality",
        "run": args.run,
        "seeds": args.seeds,
        "figures": summarise(per_seed),
        "wall_seconds": round(time.perf_counter() - began, 1),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
