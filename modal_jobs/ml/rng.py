"""Every random generator a training process draws from, captured as JSON and restored.

A resumed run continues exactly where the interrupted one stood only if each generator does:
Python's `random`, NumPy's global generator, torch's CPU generator (LoRA dropout on CPU) and
the generator of every visible CUDA device (dropout on a GPU).
"""

from __future__ import annotations

import random
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist

from modal_jobs.ml.distributed import Ranks


def capture() -> dict[str, Any]:
    """The state of every generator of this process, as plain JSON values."""
    version, words, gauss = random.getstate()
    legacy = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state(legacy=True))
    kind, keys, position, has_gauss, cached = legacy
    return {
        "python": {"version": version, "words": list(words), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": keys.tolist(),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state().tolist(),
        "cuda": [state.tolist() for state in torch.cuda.get_rng_state_all()]
        if torch.cuda.is_available()
        else [],
    }


def restore(state: dict[str, Any]) -> None:
    """Put every generator back to `state` (from `capture`, possibly in another process)."""
    python = state["python"]
    random.setstate((python["version"], tuple(python["words"]), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state(
        (
            numpy["kind"],
            np.array(numpy["keys"], dtype=np.uint32),
            numpy["position"],
            numpy["has_gauss"],
            numpy["cached"],
        )
    )
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    # A run resumed on other hardware (fewer GPUs, or none) restores the generators it has.
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for device, saved in enumerate(state["cuda"][:visible]):
        torch.cuda.set_rng_state(torch.tensor(saved, dtype=torch.uint8), device)


def gathered(ranks: Ranks) -> list[dict[str, Any]]:
    """`capture()` of every rank, in rank order (each rank's dropout draws differ)."""
    mine = capture()
    if not ranks.distributed:
        return [mine]
    states: list[Any] = [None] * ranks.world
    dist.all_gather_object(states, mine)
    return states
