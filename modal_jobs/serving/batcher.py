"""Dynamic batching: requests that arrive together share one routing forward and answer batches.

Requests are decoded and tokenized on the web server's threads, then queued here. One worker
takes the first queued request and, while more requests are known to be on their way (received,
still decoding), gathers them for at most `batch_wait_ms`; whatever queued while the model was
busy joins at once. A lone client therefore never waits for company. The batch runs on one model
thread (the active adapter is model-wide state), off the event loop. `batch_wait_ms = 0` turns
batching off: one request per forward, as a server without batching runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from modal_jobs.serving.batched import BatchObserver, Prepared, run_batch
from modal_jobs.serving.inference import Answer, Route
from modal_jobs.serving.serve import ServeOptions

log = logging.getLogger(__name__)


@dataclass
class _Job:
    request: Prepared
    done: asyncio.Future[Route | Answer]


class Batcher:
    """Queues prepared requests and runs them in batches on one model thread."""

    def __init__(self, options: ServeOptions, observe: BatchObserver) -> None:
        self.options = options
        self.observe = observe
        self.arriving = 0
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mole-model")
        self._worker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the worker on the running event loop."""
        self._worker = asyncio.create_task(self._work(), name="mole-batcher")

    async def stop(self) -> None:
        """Stop the worker and the model thread (the batch in flight finishes first)."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self._model_thread.shutdown(wait=True)

    @contextlib.contextmanager
    def arrival(self) -> Iterator[None]:
        """Count a request as on its way while its body is read and decoded."""
        self.arriving += 1
        try:
            yield
        finally:
            self.arriving -= 1

    def submit(self, request: Prepared) -> asyncio.Future[Route | Answer]:
        """Queue a prepared request; the future holds its route or answer."""
        job = _Job(request, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(job)
        return job.done

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._gather()
            requests = [job.request for job in jobs]
            try:
                results = await loop.run_in_executor(self._model_thread, self._run, requests)
            except Exception as exc:  # noqa: BLE001 - a failed batch fails its requests only
                log.exception("batch of %d failed", len(jobs))
                _settle(jobs, [exc] * len(jobs))
            else:
                _settle(jobs, results)

    def _run(self, requests: list[Prepared]) -> list[Route | Answer]:
        # Requests prepared before and after a router swap run on their own stacks.
        results: list[Route | Answer] = []
        for stack, group in itertools.groupby(requests, key=lambda r: r.stack):
            results += run_batch(stack, list(group), self.options.reuse_features, self.observe)
        return results

    async def _gather(self) -> list[_Job]:
        jobs = [await self._queue.get()]
        if not self.options.batching:
            return jobs
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.batch_wait_ms / 1000
        while len(jobs) < self.options.max_batch:
            if not self._queue.empty():
                jobs.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if self.arriving == 0 or remaining <= 0:
                break
            try:
                jobs.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return jobs


def _settle(jobs: list[_Job], outcomes: Sequence[Route | Answer | Exception]) -> None:
    """Hand each job its result or error, unless its client went away (future cancelled)."""
    for job, outcome in zip(jobs, outcomes, strict=True):
        if job.done.done():
            continue
        if isinstance(outcome, Exception):
            job.done.set_exception(outcome)
        else:
            job.done.set_result(outcome)
