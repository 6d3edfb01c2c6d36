"""The serving contract: JSON bodies (pydantic), limits, image decoding and batching options.

`POST /route` and `POST /infer` take `{"image": <base64 PNG/JPEG>, "prompt": "..."}` (`prompt`
optional for /route). Anything else is a `RequestError` carrying the 4xx status to answer with;
the ASGI app (`modal_jobs/serving/app.py`) and the CLI's image reading share these rules.
Torch-free, so the CLI can build its options without loading a model.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass
from http import HTTPStatus

import numpy as np
import pydantic
from PIL import Image

from modal_jobs.errors import MoleError
from modal_jobs.ml.decode import decode_screen

MAX_BODY_BYTES = 8 * 1024 * 1024
DRAIN_LIMIT_BYTES = 4 * MAX_BODY_BYTES
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_PROMPT_CHARS = 4000
IMAGE_FORMATS = ("PNG", "JPEG")
# How often a running server checks the registry for a newly deployed router (seconds; 0: never).
RELOAD_EVERY_S = 30.0


class RequestError(MoleError):
    """A client error: carries the HTTP status to answer with."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ServeOptions:
    """How the server batches: the gathering window, the largest batch, vision-feature reuse."""

    batch_wait_ms: float = 5.0
    max_batch: int = 16
    reuse_features: bool = True

    def __post_init__(self) -> None:
        if self.batch_wait_ms < 0 or self.max_batch < 1:
            raise ValueError(
                f"batch_wait_ms must be >= 0 (got {self.batch_wait_ms}) and max_batch >= 1 "
                f"(got {self.max_batch})"
            )

    @property
    def batching(self) -> bool:
        """Whether concurrent requests share forwards at all."""
        return self.batch_wait_ms > 0 and self.max_batch > 1


class RouteBody(pydantic.BaseModel):
    """`POST /route`: a screenshot and an optional instruction."""

    model_config = pydantic.ConfigDict(extra="ignore", strict=True)

    image: str = pydantic.Field(min_length=1, description="base64 PNG or JPEG")
    prompt: str = ""


class InferBody(RouteBody):
    """`POST /infer`: a screenshot and the instruction the expert answers."""

    prompt: str = pydantic.Field(pattern=r"\S", description="the user's instruction")


def load_image(data: bytes, source: str = "image") -> np.ndarray:
    """Decode PNG/JPEG bytes to RGB uint8 pixels, refusing other formats and big images.

    Format and size come from the header, so an image over MAX_IMAGE_PIXELS is refused before
    anything is decoded; the pixels are decoded as tokenization decodes a screenshot file.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
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
            return decode_screen(data)
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


def parse_request(body: bytes, need_prompt: bool) -> tuple[np.ndarray, str]:
    """The image and prompt of a JSON request body, or a RequestError saying what is wrong."""
    model = InferBody if need_prompt else RouteBody
    try:
        request = model.model_validate_json(body)
    except pydantic.ValidationError as exc:
        raise RequestError(HTTPStatus.BAD_REQUEST, _first_problem(exc)) from exc
    if len(request.prompt) > MAX_PROMPT_CHARS:
        raise RequestError(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"prompt is over {MAX_PROMPT_CHARS} characters"
        )
    try:
        data = base64.b64decode(request.image, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"field 'image' is not base64: {exc}") from exc
    return load_image(data, "field 'image'"), request.prompt


def _first_problem(exc: pydantic.ValidationError) -> str:
    """One line naming the field at fault and the fix, from pydantic's first error."""
    error = exc.errors(include_url=False)[0]
    if error["type"] == "json_invalid":
        return f"body is not valid JSON: {error['msg']}"
    if error["type"] == "model_type" or not error["loc"]:
        return "body must be a JSON object"
    field = ".".join(str(part) for part in error["loc"])
    wanted = {"image": "base64 PNG/JPEG", "prompt": "non-empty string"}.get(field, "see the API")
    return f"field '{field}' ({wanted}) is required: {error['msg']}"
