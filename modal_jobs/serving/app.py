"""The serving ASGI app: `/health`, `/route`, `/infer` and `/metrics` over one loaded `Stack`.

`create_app(live, options)` builds it with no module-level state, so `mole serve` (uvicorn) and
the Modal serving class (`modal_jobs/mole_app.py` `Server`) mount the same app. `live` holds the
stack and swaps in a newly deployed router (`modal_jobs/serving/live.py`); a plain `Stack` is
served as it is. Bodies are read up to `MAX_BODY_BYTES`, validated by
the pydantic models of `modal_jobs/serving/serve.py`, decoded and tokenized on worker threads,
then batched (`modal_jobs/serving/batcher.py`). Client errors answer
`{"error": ..., "status": ...}` with their 4xx status and change nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route as Endpoint

from modal_jobs.serving.batched import Prepared, prepare
from modal_jobs.serving.batcher import Batcher
from modal_jobs.serving.inference import Answer, Stack
from modal_jobs.serving.live import Live
from modal_jobs.serving.metrics import ServeMetrics
from modal_jobs.serving.serve import (
    DRAIN_LIMIT_BYTES,
    MAX_BODY_BYTES,
    RequestError,
    ServeOptions,
    parse_request,
)

log = logging.getLogger(__name__)
Handler = Callable[[Request], Awaitable[Response]]


def create_app(served: Live | Stack, options: ServeOptions | None = None) -> Starlette:
    """The ASGI app serving `served`, batching as `options` say (default: `ServeOptions()`)."""
    live = served if isinstance(served, Live) else Live(served)
    metrics = ServeMetrics()
    metrics.follow(lambda: live.swaps, lambda: live.failures)
    batcher = Batcher(options or ServeOptions(), metrics.batch)

    async def health(request: Request) -> Response:
        stack = live.stack
        return JSONResponse(
            {
                "status": "ok",
                "router": stack.router.folder.name,
                "experts": list(stack.router.labels.experts),
                "adapters": list(stack.experts),
                "temperature": stack.router.temperature,
            }
        )

    async def exposition(request: Request) -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    async def answer(request: Request) -> Response:
        infer = request.url.path == "/infer"
        with batcher.arrival():
            body = await read_body(request)
            prepared = await run_in_threadpool(_prepare, live.stack, body, infer)
        result = await batcher.submit(prepared)
        metrics.route(result.route if isinstance(result, Answer) else result)
        return JSONResponse(result.to_json())

    async def not_found(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 404
        reason = "method not allowed" if status == 405 else "no such endpoint"
        return _error(status, f"{reason}: {request.method} {request.url.path}")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await batcher.start()
        live.start()
        try:
            yield
        finally:
            await run_in_threadpool(live.stop)
            await batcher.stop()

    endpoints = [
        Endpoint("/health", _answered(health, "/health", metrics), methods=["GET"]),
        Endpoint("/metrics", exposition, methods=["GET"]),
        Endpoint("/route", _answered(answer, "/route", metrics), methods=["POST"]),
        Endpoint("/infer", _answered(answer, "/infer", metrics), methods=["POST"]),
    ]
    handlers: dict[Any, Any] = {HTTPException: _counted(not_found, metrics)}
    return Starlette(routes=endpoints, exception_handlers=handlers, lifespan=lifespan)


def _prepare(stack: Stack, body: bytes, infer: bool) -> Prepared:
    image, prompt = parse_request(body, need_prompt=infer)
    return prepare(stack, image, prompt, answer=infer)


async def read_body(request: Request) -> bytes:
    """The request body, or a 413 once it passes MAX_BODY_BYTES.

    A moderately oversized body is read to its end and dropped, so that a client still sending
    it reads the answer instead of a reset connection; a larger one closes the connection.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > DRAIN_LIMIT_BYTES:
        raise _TooLarge()
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > DRAIN_LIMIT_BYTES:
            raise _TooLarge()
        if size <= MAX_BODY_BYTES:
            chunks.append(chunk)
    if size > MAX_BODY_BYTES:
        raise _TooLarge()
    return b"".join(chunks)


class _TooLarge(RequestError):
    def __init__(self) -> None:
        super().__init__(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body is over the limit of {MAX_BODY_BYTES} bytes"
        )


def _error(status: int, message: str, close: bool = False) -> JSONResponse:
    headers = {"Connection": "close"} if close else None
    return JSONResponse({"error": message, "status": status}, status, headers=headers)


def _answered(handler: Handler, endpoint: str, metrics: ServeMetrics) -> Handler:
    """`handler` with client errors as JSON, failures as 500s, and every answer counted."""

    async def wrapped(request: Request) -> Response:
        began = time.perf_counter()
        try:
            response = await handler(request)
        except RequestError as exc:
            response = _error(exc.status, str(exc), close=isinstance(exc, _TooLarge))
        except Exception as exc:  # noqa: BLE001 - one failed request must not stop the server
            log.exception("%s failed", endpoint)
            response = _error(500, f"internal error: {exc}")
        metrics.answered(endpoint, response.status_code, time.perf_counter() - began)
        return response

    return wrapped


def _counted(
    handler: Callable[[Request, Exception], Awaitable[Response]], metrics: ServeMetrics
) -> Callable[[Request, Exception], Awaitable[Response]]:
    async def wrapped(request: Request, exc: Exception) -> Response:
        response = await handler(request, exc)
        metrics.answered("unknown", response.status_code, 0.0)
        return response

    return wrapped
