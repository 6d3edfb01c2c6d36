"""Drawing helpers shared by every synthetic app: fonts, colours, text fitting, drawing context."""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import ImageDraw, ImageFont

Color = tuple[int, int, int]
Box = tuple[int, int, int, int]
Font = ImageFont.FreeTypeFont | ImageFont.ImageFont

WHITE: Color = (255, 255, 255)
BLACK: Color = (0, 0, 0)
MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


@functools.lru_cache(maxsize=128)
def load_font(size: int) -> Font:
    """The default font at `size` pixels (cached)."""
    return ImageFont.load_default(size=size)


def clamp(v: int) -> int:
    """`v` clipped to a colour channel's 0-255."""
    return 0 if v < 0 else 255 if v > 255 else v


def jit(c: Color, rng: random.Random, amt: int = 10) -> Color:
    """Jitter a colour by up to ``amt`` per channel."""
    return (
        clamp(c[0] + rng.randint(-amt, amt)),
        clamp(c[1] + rng.randint(-amt, amt)),
        clamp(c[2] + rng.randint(-amt, amt)),
    )


def mix(a: Color, b: Color, t: float) -> Color:
    """Blend ``a`` towards ``b`` by ``t`` (0 keeps ``a``)."""
    return (
        round(a[0] + (b[0] - a[0]) * t),
        round(a[1] + (b[1] - a[1]) * t),
        round(a[2] + (b[2] - a[2]) * t),
    )


def join_words(items: Sequence[str]) -> str:
    """Join words as an English list: ``a, b and c``."""
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def fit(s: str, font: Font, maxw: float) -> str:
    """Truncate ``s`` (with ``..``) so that it is at most ``maxw`` pixels wide."""
    if maxw <= 0:
        return ""
    width = font.getlength(s)
    if width <= maxw:
        return s
    n = int(len(s) * maxw / width)
    while n > 0 and font.getlength(s[:n] + "..") > maxw:
        n -= 1
    return s[:n] + ".." if n > 0 else ""


def wrap(text: str, font: Font, maxw: float) -> list[str]:
    """Greedy word wrap of ``text`` into lines at most ``maxw`` pixels wide."""
    lines: list[str] = []
    cur = ""
    for word in text.split():
        cand = f"{cur} {word}" if cur else word
        if cur and font.getlength(cand) > maxw:
            lines.append(cur)
            cand = word
        cur = cand
    if cur:
        lines.append(cur)
    return lines


@dataclass
class Ctx:
    """Drawing state shared by the widget helpers."""

    draw: ImageDraw.ImageDraw
    rng: random.Random
    fs: int

    def font(self, scale: float = 1.0) -> Font:
        """Return the default font at ``scale`` times the base size."""
        return load_font(max(7, round(self.fs * scale)))

    def text(
        self,
        xy: tuple[float, float],
        s: str,
        fill: Color,
        scale: float = 1.0,
        maxw: float | None = None,
        bold: bool = False,
        anchor: str = "lm",
    ) -> float:
        """Draw ``s`` (clipped to ``maxw``) and return its width in pixels."""
        font = self.font(scale)
        if maxw is not None:
            s = fit(s, font, maxw)
        if not s:
            return 0.0
        self.draw.text(xy, s, fill=fill, font=font, anchor=anchor)
        if bold:
            self.draw.text((xy[0] + 1, xy[1]), s, fill=fill, font=font, anchor=anchor)
        return font.getlength(s)


def compass(dx: float, dy: float) -> str:
    """Compass direction of a screen offset (y grows downwards)."""
    names = (
        "east",
        "north-east",
        "north",
        "north-west",
        "west",
        "south-west",
        "south",
        "south-east",
    )
    angle = math.degrees(math.atan2(-dy, dx)) % 360
    return names[int((angle + 22.5) // 45) % 8]
