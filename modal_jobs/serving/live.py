"""The stack a server answers with, replaced when the registry names another router.

`mole deploy` (or a rollback) changes `registry.json` on the inference volume; a running server
checks it every `reload_every_s` and, when `current` changed, loads the new router's stack on
its watcher thread while the old one keeps answering, then swaps. Requests hold the stack they
were prepared with, so a swap never mixes two routers in one request. A router that fails to
load is logged and skipped until the registry changes again; the old one stays.

On Modal a container sees the deploy function's commit only after reloading the volume
(`Deployment.before_check`, `modal.Volume.reload`); on local disk every write is visible at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from modal_jobs.config import MoleConfig
from modal_jobs.layout import Volumes
from modal_jobs.serving.inference import Stack
from modal_jobs.serving.registry import read_registry
from modal_jobs.serving.serve import RELOAD_EVERY_S

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Deployment:
    """Where the deployed router is read, and what makes other machines' writes visible.

    `config` None: the router's own expert map, as in a Modal container.
    """

    volumes: Volumes
    config: MoleConfig | None = None
    before_check: Callable[[], None] | None = None

    def current(self) -> str | None:
        """The registry's current version, after `before_check`."""
        if self.before_check is not None:
            self.before_check()
        current = read_registry(self.volumes)["current"]
        return str(current) if current else None

    def load(self) -> Stack:
        """The stack of the current router."""
        return Stack.deployed(self.volumes, self.config)


class Live:
    """The current stack, and the watcher that swaps in a newly deployed router."""

    def __init__(
        self,
        stack: Stack,
        deployment: Deployment | None = None,
        reload_every_s: float = RELOAD_EVERY_S,
    ) -> None:
        self.stack = stack
        self.deployment = deployment
        self.reload_every_s = reload_every_s if deployment else 0.0
        self.swaps = 0
        self.failures = 0
        self._failed: str | None = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    @classmethod
    def deployed(cls, deployment: Deployment, reload_every_s: float = RELOAD_EVERY_S) -> Live:
        """The deployment's current router, checked for a newer one every `reload_every_s`."""
        return cls(deployment.load(), deployment, reload_every_s)

    @property
    def version(self) -> str:
        """The deployed version being served (its folder under `routers/`)."""
        return self.stack.router.folder.name

    def check(self) -> bool:
        """One check of the registry; True when a newer router was loaded and swapped in."""
        if self.deployment is None:
            return False
        current = self.deployment.current()
        if not current or current in (self.version, self._failed):
            return False
        try:
            stack = self.deployment.load()
        except Exception:  # noqa: BLE001 - a bad deployment must not stop serving the old one
            log.exception("router %s failed to load; still serving %s", current, self.version)
            self._failed, self.failures = current, self.failures + 1
            return False
        log.info("router %s replaces %s", stack.router.folder.name, self.version)
        self.stack, self.swaps = stack, self.swaps + 1
        return True

    def start(self) -> None:
        """Start checking every `reload_every_s` on a daemon thread (no-op when 0)."""
        if self.reload_every_s <= 0 or self._watcher is not None:
            return
        self._stop.clear()
        self._watcher = threading.Thread(target=self._watch, name="mole-registry", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        """Stop the watcher (a load in progress finishes first)."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join()
            self._watcher = None

    def _watch(self) -> None:
        while not self._stop.wait(self.reload_every_s):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - e.g. a volume reload refused now: next round
                log.exception("registry check failed; retrying in %.0f s", self.reload_every_s)
