"""The deployment registry on the inference volume: which router is current, its history, rollback.

Reads and rewrites one JSON file; imports no torch, so `mole deploy --rollback` starts at once.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from modal_jobs.atomic import write_json
from modal_jobs.errors import MoleError
from modal_jobs.layout import Volumes


class DeployError(MoleError):
    """The router may not or cannot be deployed."""


@contextmanager
def deploy_lock(volumes: Volumes) -> Iterator[None]:
    """Exclusive lock over registry updates on the inference volume."""
    volumes.inference.mkdir(parents=True, exist_ok=True)
    with open(volumes.inference / ".deploy.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_registry(volumes: Volumes) -> dict[str, Any]:
    """The deployment registry (`current` and `history`), empty if nothing was deployed."""
    if not volumes.registry.is_file():
        return {"current": None, "history": []}
    return dict(json.loads(volumes.registry.read_text()))


def current_router(volumes: Volumes) -> Path:
    """The folder of the router that is deployed now."""
    current = read_registry(volumes)["current"]
    if not current:
        raise DeployError(f"{volumes.registry}: no router is deployed; fix: `mole deploy RUN`")
    return volumes.routers / str(current)


def rollback(volumes: Volumes) -> str:
    """Make the router that was current before the present one current again; returns it.

    The registry's history lists every change of `current` in order (deployments and rollbacks),
    so rolling back twice walks further back rather than toggling between two versions.
    """
    with deploy_lock(volumes):
        registry = read_registry(volumes)
        current = registry["current"]
        stack = [entry["version"] for entry in registry["history"] if "rollback_from" not in entry]
        rolled_back = {
            entry["rollback_from"] for entry in registry["history"] if "rollback_from" in entry
        }
        earlier = [v for v in stack if v != current and v not in rolled_back]
        if not current or not earlier:
            raise DeployError(
                f"{volumes.registry}: no earlier deployment to roll back to; "
                "fix: deploy another run first (`mole deploy RUN`)"
            )
        previous = earlier[-1]
        registry["history"].append(
            {
                "version": previous,
                "rollback_from": current,
                "deployed_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            }
        )
        registry["current"] = previous
        write_json(volumes.registry, registry)
    return str(previous)
