"""Screens of no expert that the router trains on, answering the reserved "none" label.

Outlier exposure: a classifier that has only ever seen its classes routes anything to one of
them. Training it on screens of none teaches an answer for them, and the eval report measures
that answer on the separate out-of-distribution set of `ood.py`, which training never sees. The
two share no drawing code, so what the report measures is how far the lesson carries, not
recall of the same generator. Five kinds, each a pure function of its random state:

- `lock_screen`: a gradient wallpaper with a large clock (almost nothing on it);
- `article`: a page of running text, sometimes with a picture block;
- `pattern`: stripes, checkerboards, rings and gradients;
- `utility`: apps that are none of the experts and none of `ood.py`'s (calculator, sign-in form,
  video player, weather);
- `diagram`: slides of boxes, arrows and a title.
"""

from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from modal_jobs.demo_data.draw import BLACK, WHITE, Ctx, jit, mix
from modal_jobs.demo_data.screen import KindDrawer, render_kind, screen_ctx

NEGATIVE_KINDS = ("lock_screen", "article", "pattern", "utility", "diagram")

_CITIES = ("Lisbon", "Oslo", "Quito", "Perth", "Dakar", "Hanoi", "Tallinn", "Cusco")
_TITLES = ("Roadmap", "Team structure", "How it works", "Onboarding flow", "Architecture")
_DAYS = ("Monday, 3 March", "Friday, 9 May", "Sunday, 21 July", "Tuesday, 2 December")
_WORDS = (
    "river",
    "market",
    "quiet",
    "winter",
    "garden",
    "story",
    "light",
    "north",
    "stone",
    "paper",
    "travel",
    "small",
    "music",
    "history",
    "ocean",
    "morning",
    "bridge",
    "cloud",
    "simple",
)
_STEPS = ("Plan", "Build", "Review", "Ship", "Learn", "Input", "Output", "Store", "Ask")


def render_negative(kind: str, rng: random.Random) -> Image.Image:
    """One screen of `kind` (one of `NEGATIVE_KINDS`), RGB, the size of a synthetic screenshot.

    Raises:
        ValueError: If `kind` is not one of `NEGATIVE_KINDS`.
    """
    return render_kind(_KINDS, kind, rng, "negative")


def _lock_screen(rng: random.Random, w: int, h: int) -> Image.Image:
    img = Image.new("RGB", (w, h))
    d = ImageDraw.Draw(img)
    top, bottom = jit((128, 128, 128), rng, 127), jit((128, 128, 128), rng, 127)
    for row in range(0, h, 4):
        d.rectangle((0, row, w, row + 4), fill=mix(top, bottom, row / h))
    ctx = screen_ctx(img, rng)
    ink = WHITE if sum(top) < 384 else BLACK
    clock = f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}"
    ctx.text((w / 2, h * 0.3), clock, ink, rng.uniform(3, 6), anchor="mm", bold=True)
    ctx.text((w / 2, h * 0.3 + ctx.fs * 4), rng.choice(_DAYS), ink, 1.2, anchor="mm")
    if rng.random() < 0.5:
        ctx.text((w / 2, h - ctx.fs * 2), "Swipe up to unlock", ink, 0.9, anchor="mm")
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.5)))


def _article(rng: random.Random, w: int, h: int) -> Image.Image:
    paper = jit(rng.choice((WHITE, (250, 246, 236), (236, 238, 242))), rng, 4)
    img = Image.new("RGB", (w, h), paper)
    ctx = screen_ctx(img, rng)
    d, s = ctx.draw, ctx.fs
    ink = BLACK if sum(paper) > 384 else (225, 225, 225)
    margin = w * rng.uniform(0.12, 0.3)
    y = s * 2.5
    ctx.text((margin, y), " ".join(rng.sample(_WORDS, 4)).title(), ink, 1.8, w - 2 * margin, True)
    y += s * 3
    if rng.random() < 0.5:
        picture = jit((128, 128, 128), rng, 100)
        d.rectangle((margin, y, w - margin, y + h * 0.25), fill=picture)
        y += h * 0.25 + s
    while y < h - s * 2:
        line = " ".join(rng.choice(_WORDS) for _ in range(16))
        ctx.text((margin, y), line, ink, maxw=(w - 2 * margin) * rng.uniform(0.8, 1))
        y += s * 1.5
        if rng.random() < 0.15:
            y += s
    return img


def _pattern(rng: random.Random, w: int, h: int) -> Image.Image:
    a, b = jit((128, 128, 128), rng, 127), jit((128, 128, 128), rng, 127)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    style = rng.choice(("stripes", "checker", "rings", "gradient"))
    period = rng.uniform(6, 60)
    if style == "stripes":
        angle = rng.uniform(0, math.pi)
        t = (np.sin((x * math.cos(angle) + y * math.sin(angle)) / period * 2 * math.pi) + 1) / 2
    elif style == "checker":
        t = ((x // period + y // period) % 2).astype(np.float64)
    elif style == "rings":
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        t = (np.sin(np.hypot(x - cx, y - cy) / period * 2 * math.pi) + 1) / 2
    else:
        angle = rng.uniform(0, 2 * math.pi)
        t = x * math.cos(angle) + y * math.sin(angle)
        t = (t - t.min()) / max(1e-9, float(np.ptp(t)))
    pixels = (
        np.array(a)[None, None, :] * (1 - t[..., None]) + np.array(b)[None, None, :] * t[..., None]
    )
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _utility(rng: random.Random, w: int, h: int) -> Image.Image:
    app = rng.choice((_calculator, _sign_in, _video, _weather))
    img = Image.new("RGB", (w, h), WHITE)
    app(screen_ctx(img, rng), w, h)
    return img


def _calculator(ctx: Ctx, w: int, h: int) -> None:
    d, rng, s = ctx.draw, ctx.rng, ctx.fs
    d.rectangle((0, 0, w, h), fill=jit((40, 40, 44), rng, 12))
    display = h * 0.25
    ctx.text((w - s, display / 2), f"{rng.randint(0, 99999)}", WHITE, 2.5, anchor="rm")
    keys = "789/456*123-0.=+"
    kw, kh = w / 4, (h - display) / 4
    accent = jit((255, 149, 0), rng, 20)
    for i, key in enumerate(keys):
        x, y = (i % 4) * kw, display + (i // 4) * kh
        fill = accent if i % 4 == 3 else jit((80, 80, 86), rng, 10)
        d.ellipse((x + 4, y + 4, x + kw - 4, y + kh - 4), fill=fill)
        ctx.text((x + kw / 2, y + kh / 2), key, WHITE, 1.6, anchor="mm")


def _sign_in(ctx: Ctx, w: int, h: int) -> None:
    d, rng, s = ctx.draw, ctx.rng, ctx.fs
    top, bottom = jit((90, 60, 200), rng, 40), jit((240, 120, 160), rng, 40)
    for row in range(0, h, 4):
        d.rectangle((0, row, w, row + 4), fill=mix(top, bottom, row / h))
    cw, ch = w * 0.36, h * 0.5
    x0, y0 = (w - cw) / 2, (h - ch) / 2
    d.rounded_rectangle((x0, y0, x0 + cw, y0 + ch), radius=s, fill=WHITE)
    ctx.text((w / 2, y0 + s * 2), "Welcome back", BLACK, 1.3, anchor="mm", bold=True)
    for i, field in enumerate(("Username", "Password")):
        y = y0 + s * 4 + i * s * 3.2
        d.rectangle((x0 + s, y, x0 + cw - s, y + s * 2), outline=(180, 180, 180))
        ctx.text((x0 + s * 1.5, y + s), field, (150, 150, 150))
    d.rounded_rectangle(
        (x0 + s, y0 + ch - s * 3.5, x0 + cw - s, y0 + ch - s), radius=s // 2, fill=top
    )
    ctx.text((w / 2, y0 + ch - s * 2.25), "Sign in", WHITE, anchor="mm")


def _video(ctx: Ctx, w: int, h: int) -> None:
    d, rng, s = ctx.draw, ctx.rng, ctx.fs
    d.rectangle((0, 0, w, h), fill=BLACK)
    frame = (0, 0, w, h - s * 4)
    sky, ground = jit((200, 120, 60), rng, 60), jit((30, 40, 70), rng, 30)
    for row in range(0, frame[3], 6):
        d.rectangle((0, row, w, row + 6), fill=mix(sky, ground, row / frame[3]))
    cx, cy, r = w / 2, frame[3] / 2, s * 2.5
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(0, 0, 0))
    d.polygon([(cx - r / 3, cy - r / 2), (cx - r / 3, cy + r / 2), (cx + r / 2, cy)], fill=WHITE)
    done = rng.uniform(0.05, 0.95)
    y = h - s * 2.5
    d.rectangle((s, y, w - s, y + 4), fill=(90, 90, 90))
    d.rectangle((s, y, s + (w - 2 * s) * done, y + 4), fill=(230, 30, 30))
    ctx.text((s, h - s), f"{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}", WHITE, 0.8)


def _weather(ctx: Ctx, w: int, h: int) -> None:
    d, rng, s = ctx.draw, ctx.rng, ctx.fs
    d.rectangle((0, 0, w, h), fill=jit((70, 150, 230), rng, 30))
    ctx.text((w / 2, h * 0.15), rng.choice(_CITIES), WHITE, 1.6, anchor="mm")
    ctx.text((w / 2, h * 0.35), f"{rng.randint(-5, 35)}°", WHITE, 4.0, anchor="mm")
    sx, sy, r = w * 0.78, h * 0.3, s * 3
    d.ellipse((sx - r, sy - r, sx + r, sy + r), fill=(255, 210, 60))
    for i, day in enumerate(("Mon", "Tue", "Wed", "Thu", "Fri", "Sat")):
        x = w * (i + 0.5) / 6
        ctx.text((x, h * 0.7), day, WHITE, anchor="mm")
        ctx.text((x, h * 0.8), f"{rng.randint(-5, 35)}°", WHITE, 1.2, anchor="mm")


def _diagram(rng: random.Random, w: int, h: int) -> Image.Image:
    img = Image.new("RGB", (w, h), jit(rng.choice((WHITE, (30, 34, 48), (250, 244, 230))), rng, 5))
    ctx = screen_ctx(img, rng)
    d, s = ctx.draw, ctx.fs
    ink = BLACK if sum(img.getpixel((0, 0))) > 384 else WHITE  # type: ignore[arg-type]
    ctx.text((w / 2, s * 2), rng.choice(_TITLES), ink, 1.8, anchor="mm", bold=True)
    n = rng.randint(3, 6)
    colour = jit((rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255)), rng, 0)
    centres = [(w * (i + 0.5) / n, h * rng.uniform(0.35, 0.8)) for i in range(n)]
    for (x0, y0), (x1, y1) in zip(centres, centres[1:], strict=False):
        d.line((x0, y0, x1, y1), fill=ink, width=2)
    bw, bh = w / n * 0.35, s * 1.8
    for x, y in centres:
        shape = d.ellipse if rng.random() < 0.4 else d.rectangle
        shape((x - bw, y - bh, x + bw, y + bh), fill=colour, outline=ink)
        ctx.text((x, y), rng.choice(_STEPS), ink, anchor="mm", maxw=bw * 2)
    return img


_KINDS: dict[str, KindDrawer] = {
    "lock_screen": _lock_screen,
    "article": _article,
    "pattern": _pattern,
    "utility": _utility,
    "diagram": _diagram,
}
