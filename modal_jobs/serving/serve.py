"""HTTP API for stacked inference (stdlib `ThreadingHTTPServer`), bound to 127.0.0.1 by default.

`GET /health`, `POST /route` and `POST /infer` with JSON `{"image": <base64 PNG/JPEG>,
"prompt": "..."}` (`prompt` optional for /route). Bad requests get a 4xx JSON error
`{"error": ..., "status": ...}` and change nothing; the model runs under the stack's lock.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import warnings
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image

from modal_jobs.errors import MoleError
from modal_jobs.serving.inference import Stack

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 * 1024 * 1024
DRAIN_LIMIT_BYTES = 4 * MAX_BODY_BYTES
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_PROMPT_CHARS = 4000
IMAGE_FORMATS = ("PNG", "JPEG")


class RequestError(MoleError):
    """A client error: carries the HTTP status to answer with."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


def load_image(data: bytes, source: str = "image") -> Image.Image:
    """Decode PNG/JPEG bytes to RGB, refusing other formats and more than MAX_IMAGE_PIXELS."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            fmt = image.format
            width, height = image.size
            if fmt not in IMAGE_FORMATS:
                raise RequestError(
                    HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                    f"{source}: {fmt or 'unknown'} is not supported; fix: send a PNG or JPEG",
                )
            if width * height > MAX_IMAGE_PIXELS:
                raise RequestError(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    f"{source}: {width}×{height} pixels is over the limit of {MAX_IMAGE_PIXELS}; "
                    "fix: downscale the screenshot",
                )
            return image.convert("RGB")
    except RequestError:
        raise
    except (
        OSError,
        ValueError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as exc:
        raise RequestError(
            HTTPStatus.BAD_REQUEST, f"{source}: not a readable PNG or JPEG image ({exc})"
        ) from exc


def parse_request(body: bytes, need_prompt: bool) -> tuple[Image.Image, str]:
    """The image and prompt of a JSON request body, or a RequestError saying what is wrong."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"body is not valid JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise RequestError(HTTPStatus.BAD_REQUEST, "body must be a JSON object")
    encoded = payload.get("image")
    if not isinstance(encoded, str) or not encoded:
        raise RequestError(HTTPStatus.BAD_REQUEST, "field 'image' (base64 PNG/JPEG) is required")
    prompt = payload.get("prompt", None if need_prompt else "")
    if not isinstance(prompt, str) or (need_prompt and not prompt.strip()):
        raise RequestError(HTTPStatus.BAD_REQUEST, "field 'prompt' (non-empty string) is required")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise RequestError(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"prompt is over {MAX_PROMPT_CHARS} characters"
        )
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"field 'image' is not base64: {exc}") from exc
    return load_image(data, "field 'image'"), prompt


class Handler(BaseHTTPRequestHandler):
    """Routes /health, /route and /infer to the stack attached to the server."""

    server: MoleServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        """`/health`: the deployed router version and the expert adapters loaded."""
        if self.path != "/health":
            self._send(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: GET {self.path}"})
            return
        stack = self.server.stack
        self._send(
            HTTPStatus.OK,
            {
                "status": "ok",
                "router": stack.router.folder.name,
                "experts": list(stack.router.labels.experts),
                "adapters": list(stack.experts),
                "temperature": stack.router.temperature,
            },
        )

    def do_POST(self) -> None:  # noqa: N802 - the http.server API
        """`/route` and `/infer`."""
        try:
            if self.path not in ("/route", "/infer"):
                raise RequestError(HTTPStatus.NOT_FOUND, f"no such endpoint: POST {self.path}")
            image, prompt = parse_request(self._body(), need_prompt=self.path == "/infer")
            stack = self.server.stack
            if self.path == "/route":
                result = stack.route(image, prompt).to_json()
            else:
                result = stack.infer(image, prompt).to_json()
            self._send(HTTPStatus.OK, result)
        except RequestError as exc:
            self._send(exc.status, {"error": str(exc)})
        except Exception as exc:  # noqa: BLE001 - one failed request must not stop the server
            log.exception("request failed")
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {exc}"})

    def _body(self) -> bytes:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError as exc:
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required") from exc
        if length > MAX_BODY_BYTES:
            # Read and drop a moderately oversized body so the client can read the answer (it
            # would otherwise hit a broken pipe while still sending); close after anything larger.
            if length <= DRAIN_LIMIT_BYTES:
                self._drain(length)
            self.close_connection = True
            raise RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"body is over the limit of {MAX_BODY_BYTES} bytes",
            )
        return self.rfile.read(length)

    def _drain(self, length: int) -> None:
        remaining = length
        while remaining > 0:
            chunk = self.rfile.read(min(1 << 16, remaining))
            if not chunk:
                return
            remaining -= len(chunk)

    def _send(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
        if status >= 400:
            payload = {**payload, "status": int(status)}
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the http.server API
        """Access log through `logging` instead of raw stderr."""
        log.info("%s %s", self.address_string(), format % args)


class MoleServer(ThreadingHTTPServer):
    """A threading HTTP server holding one loaded `Stack`."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], stack: Stack) -> None:
        super().__init__(address, Handler)
        self.stack = stack
