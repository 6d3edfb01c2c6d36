"""Training data order and delivery: length-grouped batches, collated ahead of the model.

Which samples a step sees is a pure function of (seed, step), so a resumed run, and every rank
of a `torchrun` job, sees exactly the batch an uninterrupted single-process run sees at that step.
Within each epoch's seeded shuffle, windows of `GROUP_WINDOW` batches are sorted by sequence
length and cut into batches, so a batch holds samples of similar length and right-padding (compute
spent on nothing) stays small; the batches are then shuffled again, so training does not walk from
the longest samples to the shortest within a window.
"""

from __future__ import annotations

import contextlib
import queue
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch

T = TypeVar("T")

# Batches per sorting window: a wider window groups lengths more tightly, a narrower one keeps
# the batches' composition more random (Hugging Face's LengthGroupedSampler sorts 50 at a time).
GROUP_WINDOW = 32
# Batches collated ahead of the step that needs them.
PREFETCH_DEPTH = 2


class LengthGrouped:
    """The batch (sample indices) of every step: seeded epochs of length-grouped batches.

    Each epoch uses `len(lengths) // batch_size` full batches (the remainder waits for a later
    epoch's shuffle); with fewer samples than `batch_size` every batch is the whole set.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int) -> None:
        self.lengths = list(lengths)
        self.batch_size = max(1, min(batch_size, len(self.lengths)))
        self.seed = seed
        self._cached: tuple[int, list[list[int]]] = (-1, [])

    @property
    def per_epoch(self) -> int:
        """Batches per epoch."""
        return len(self.lengths) // self.batch_size

    def at(self, step: int) -> list[int]:
        """The sample indices of `step`, longest first."""
        epoch, offset = divmod(step, self.per_epoch)
        if self._cached[0] != epoch:
            self._cached = (epoch, self.epoch(epoch))
        return self._cached[1][offset]

    def epoch(self, epoch: int) -> list[list[int]]:
        """Every batch of one epoch, in training order."""
        rng = random.Random(f"{self.seed}:{epoch}")
        n, size = len(self.lengths), self.batch_size
        order = rng.sample(range(n), n)[: self.per_epoch * size]
        window = GROUP_WINDOW * size
        batches: list[list[int]] = []
        for start in range(0, len(order), window):
            # A stable sort: equal lengths keep their shuffled order, so the plan is reproducible.
            group = sorted(order[start : start + window], key=lambda i: -self.lengths[i])
            batches.extend(group[i : i + size] for i in range(0, len(group), size))
        rng.shuffle(batches)
        return batches


@contextlib.contextmanager
def prefetched(
    make: Callable[[int], T], steps: range, depth: int = PREFETCH_DEPTH
) -> Iterator[Iterator[tuple[int, T]]]:
    """Yield `(step, make(step))` in step order, each made on a background thread ahead of use.

    A thread rather than DataLoader worker processes: collating is NumPy/torch work that
    releases the GIL, and a thread shares the loaded shards and the processor without pickling
    or forking them. An exception raised by `make` surfaces at the step it was making.
    """
    ready: queue.Queue[tuple[int, T] | BaseException] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        # One intra-op thread here (this setting is per thread), as DataLoader workers do: the
        # training step's ops already use every core, and a second pool would oversubscribe them.
        torch.set_num_threads(1)
        for step in steps:
            try:
                item: tuple[int, T] | BaseException = (step, make(step))
            except BaseException as exc:  # handed to the consumer, re-raised there
                item = exc
            if not _put_unless_stopped(ready, item, stop) or isinstance(item, BaseException):
                return

    def consume() -> Iterator[tuple[int, T]]:
        for _ in steps:
            item = ready.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    thread = threading.Thread(target=produce, name="batch-prefetch", daemon=True)
    thread.start()
    try:
        yield consume()
    finally:
        stop.set()
        thread.join()


def _put_unless_stopped(ready: queue.Queue[T], item: T, stop: threading.Event) -> bool:
    """Put `item` once there is room; False if the consumer went away first."""
    while not stop.is_set():
        try:
            ready.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False
