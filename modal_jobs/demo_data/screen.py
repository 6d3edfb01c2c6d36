"""A whole synthetic screenshot: screen size, desktop wallpaper, the app window and clutter."""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from PIL import Image, ImageDraw

from modal_jobs.demo_data.calendar import render_calendar
from modal_jobs.demo_data.code_editor import render_code_editor
from modal_jobs.demo_data.draw import (
    BLACK,
    WHITE,
    Box,
    Color,
    Ctx,
    jit,
    mix,
)
from modal_jobs.demo_data.email import render_email
from modal_jobs.demo_data.map import render_map
from modal_jobs.demo_data.spreadsheet import render_spreadsheet
from modal_jobs.demo_data.terminal import render_terminal

EXPERTS: tuple[str, ...] = ("calendar", "spreadsheet", "terminal", "email", "code_editor", "map")

_FORBIDDEN = (
    "calendar",
    "spreadsheet",
    "terminal",
    "email",
    "code_editor",
    "code",
    "editor",
    "map",
)
_FORBIDDEN_RE = re.compile(r"\b(" + "|".join(_FORBIDDEN) + r")\b", re.IGNORECASE)
_ASPECTS = (4 / 3, 16 / 10, 16 / 9, 3 / 2, 5 / 4, 21 / 9, 1.0, 2.0)


@dataclass(frozen=True)
class Sample:
    """One synthetic screenshot with the user's instruction and the expert's answer."""

    image: Image.Image
    instruction: str
    answer: str


_Renderer = Callable[[Ctx, Box], tuple[str, str]]
_RENDERERS: dict[str, _Renderer] = {
    "calendar": render_calendar,
    "spreadsheet": render_spreadsheet,
    "terminal": render_terminal,
    "email": render_email,
    "code_editor": render_code_editor,
    "map": render_map,
}
_WALLPAPERS: tuple[tuple[Color, Color], ...] = (
    ((58, 110, 165), (30, 60, 110)),
    ((94, 129, 172), (180, 150, 190)),
    ((46, 52, 64), (76, 86, 106)),
    ((200, 180, 150), (120, 100, 90)),
    ((40, 120, 110), (20, 60, 80)),
    ((150, 160, 170), (90, 100, 110)),
)
_TOASTS = (
    ("Battery low", "10% remaining"),
    ("Update available", "Restart to install"),
    ("Alex Kim", "Are you joining?"),
    ("Download complete", "report.pdf"),
    ("Wi-Fi", "Connected to Home-5G"),
    ("Reminder", "Stretch your legs"),
)


def screen_size(rng: random.Random) -> tuple[int, int]:
    """A random screenshot size: 320-1280 wide, 240-800 high, in a common aspect ratio."""
    w = rng.randint(320, 1280)
    h = round(w / rng.choice(_ASPECTS))
    return w, min(800, max(240, h))


def screen_ctx(img: Image.Image, rng: random.Random) -> Ctx:
    """Drawing state for `img`, with a base font size fit for a screen its size (varied by rng)."""
    w, h = img.size
    fs = max(8, min(16, round(min(w / 75, h / 46) * rng.uniform(0.85, 1.15))))
    return Ctx(ImageDraw.Draw(img), rng, fs)


# Draws one screen of a kind at the given size (screens of no expert, held out or trained on).
KindDrawer = Callable[[random.Random, int, int], Image.Image]


def render_kind(
    kinds: Mapping[str, KindDrawer], kind: str, rng: random.Random, what: str
) -> Image.Image:
    """`kinds[kind]`'s screen at a synthetic screenshot's size, RGB.

    Raises:
        ValueError: If `kind` is not in `kinds` (`what` names the family in the message).
    """
    draw_kind = kinds.get(kind)
    if draw_kind is None:
        raise ValueError(f"unknown {what} kind {kind!r}; known: {tuple(kinds)}")
    w, h = screen_size(rng)
    return draw_kind(rng, w, h)


def _desktop(ctx: Ctx, w: int, h: int) -> Box:
    """Maybe draw a wallpaper with a window on it; return the app's window box."""
    rng, d = ctx.rng, ctx.draw
    if rng.random() > 0.2:
        return (0, 0, w, h)
    top, bottom = rng.choice(_WALLPAPERS)
    top, bottom = jit(top, rng, 15), jit(bottom, rng, 15)
    band = 8
    for y in range(0, h, band):
        d.rectangle((0, y, w, y + band), fill=mix(top, bottom, y / h))
    mx0, mx1 = round(w * rng.uniform(0.015, 0.06)), round(w * rng.uniform(0.015, 0.06))
    my0, my1 = round(h * rng.uniform(0.015, 0.06)), round(h * rng.uniform(0.03, 0.08))
    if rng.random() < 0.5:
        d.rectangle((0, h - max(12, h // 22), w, h), fill=(32, 32, 36))
    box = (mx0, my0, w - mx1, h - my1)
    d.rectangle((box[0] + 4, box[1] + 6, box[2] + 4, box[3] + 6), fill=mix(bottom, BLACK, 0.5))
    return box


def _clutter(ctx: Ctx, w: int, h: int) -> None:
    rng = ctx.rng
    if rng.random() < 0.25:
        _toast(ctx, w, h)
    if rng.random() < 0.15:
        x, y = rng.uniform(0.1, 0.8) * w, rng.uniform(0.1, 0.9) * h
        tip = rng.choice(("Bold (Ctrl+B)", "Refresh", "Share", "More options", "Zoom in"))
        tw = ctx.font(0.8).getlength(tip) + ctx.fs
        ctx.draw.rectangle(
            (x, y, x + tw, y + ctx.fs * 1.6), fill=(255, 255, 225), outline=(120, 120, 120)
        )
        ctx.text((x + ctx.fs / 2, y + ctx.fs * 0.8), tip, (30, 30, 30), 0.8)
    if rng.random() < 0.6:
        _cursor(ctx, rng.uniform(0, w - 10), rng.uniform(0, h - 10))


def _toast(ctx: Ctx, w: int, h: int) -> None:
    rng, d, s = ctx.rng, ctx.draw, ctx.fs
    title, body = rng.choice(_TOASTS)
    tw = min(w * 0.45, s * 18)
    th = s * 3.6
    x = w - tw - s
    y = s if rng.random() < 0.5 else h - th - s * 2
    dark = rng.random() < 0.5
    d.rounded_rectangle((x + 2, y + 3, x + tw + 2, y + th + 3), radius=s // 2, fill=(90, 90, 90))
    d.rounded_rectangle(
        (x, y, x + tw, y + th), radius=s // 2, fill=(48, 48, 52) if dark else (250, 250, 250)
    )
    fg = (235, 235, 235) if dark else (30, 30, 30)
    ctx.text((x + s, y + s * 1.1), title, fg, 0.85, maxw=tw - 2 * s, bold=True)
    ctx.text((x + s, y + s * 2.4), body, fg, 0.8, maxw=tw - 2 * s)


def _cursor(ctx: Ctx, x: float, y: float) -> None:
    k = ctx.fs / 12
    pts = [(0, 0), (0, 17), (4, 13), (7, 20), (10, 19), (7, 12), (12, 12)]
    ctx.draw.polygon([(x + px * k, y + py * k) for px, py in pts], fill=WHITE, outline=BLACK)


def render_sample(expert: str, rng: random.Random) -> Sample:
    """Render one synthetic screenshot of ``expert``'s app plus an instruction and answer.

    Args:
        expert: One of ``EXPERTS``.
        rng: Source of randomness; the sample is a pure function of its state.

    Returns:
        The screenshot (RGB, 320-1280 x 240-800 pixels), a user instruction and an answer that
        refers to what is drawn.

    Raises:
        ValueError: If ``expert`` is not one of ``EXPERTS``.

    """
    renderer = _RENDERERS.get(expert)
    if renderer is None:
        raise ValueError(f"unknown expert {expert!r}; known experts: {', '.join(EXPERTS)}")
    w, h = screen_size(rng)
    img = Image.new("RGB", (w, h), WHITE)
    ctx = screen_ctx(img, rng)
    box = _desktop(ctx, w, h)
    instruction, answer = renderer(ctx, box)
    _clutter(ctx, w, h)
    leaked = _FORBIDDEN_RE.search(answer)
    if leaked:
        raise RuntimeError(f"answer for {expert!r} mentions {leaked.group()!r}: {answer}")
    return Sample(img, instruction, answer)
