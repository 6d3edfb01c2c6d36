"""Screens of no expert: what the router must abstain on.

Six kinds, each a pure function of its random state: screenshots of apps that are not among the
synthetic experts (chat, music player, file manager, settings, web shop), photograph-like
scenes, charts, blank screens, noise, and mixed layouts of generic widgets. The routing dataset
draws a set of them for choosing the abstention method and a disjoint one for the report; the
router never trains on any.
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from modal_jobs.demo_data.draw import BLACK, WHITE, Box, Color, Ctx, jit, mix
from modal_jobs.demo_data.screen import KindDrawer, render_kind, screen_ctx

OOD_KINDS = ("other_app", "photo", "chart", "blank", "noise", "mixed")

_FIRST = ("Ava", "Ben", "Chloe", "Dan", "Eli", "Fay", "Gus", "Ivy", "Jon", "Kai", "Lia", "Max")
_WORDS = (
    "ok see you then",
    "sounds great",
    "did you get the photos?",
    "running late, sorry",
    "haha yes",
    "what time works?",
    "lunch tomorrow?",
    "sent it",
    "thanks a lot!",
    "on my way",
)
_SONGS = ("Night Drive", "Paper Moon", "Golden Hour", "Blue Coast", "Slow Motion", "Echoes")
_FILES = ("Photos", "Music", "Docs", "Backup", "Travel", "Invoices", "Projects", "Downloads")
_SETTINGS = ("Wi-Fi", "Bluetooth", "Airplane mode", "Dark theme", "Notifications", "Location")
_PRODUCTS = ("Sneakers", "Backpack", "Desk lamp", "Headphones", "Water bottle", "Sunglasses")


def render_ood(kind: str, rng: random.Random) -> Image.Image:
    """One screen of `kind` (one of `OOD_KINDS`), RGB, the size of a synthetic screenshot.

    Raises:
        ValueError: If `kind` is not one of `OOD_KINDS`.
    """
    return render_kind(_KINDS, kind, rng, "out-of-distribution")


def _canvas(rng: random.Random, w: int, h: int, fill: Color) -> tuple[Image.Image, Ctx]:
    img = Image.new("RGB", (w, h), fill)
    return img, screen_ctx(img, rng)


# --------------------------------------------------------------------------- other apps


def _other_app(rng: random.Random, w: int, h: int) -> Image.Image:
    app = rng.choice((_chat, _music, _files, _settings, _shop))
    return app(rng, w, h)


def _chat(rng: random.Random, w: int, h: int) -> Image.Image:
    accent = jit(rng.choice(((37, 211, 102), (0, 132, 255), (120, 80, 220))), rng, 15)
    img, ctx = _canvas(rng, w, h, jit((236, 229, 221), rng, 8))
    d, s = ctx.draw, ctx.fs
    side = round(w * rng.uniform(0.22, 0.3))
    d.rectangle((0, 0, side, h), fill=WHITE)
    for i, y in enumerate(range(s * 4, h, s * 4)):
        d.ellipse((s, y - s * 1.2, s * 3.4, y + s * 1.2), fill=jit(accent, rng, 60))
        ctx.text((s * 4, y - s * 0.5), rng.choice(_FIRST), (20, 20, 20), maxw=side - s * 5)
        ctx.text((s * 4, y + s * 0.7), rng.choice(_WORDS), (120, 120, 120), 0.8, side - s * 5)
        if i == 0:
            d.rectangle((0, y - s * 2, side, y + s * 2), outline=accent)
    d.rectangle((side, 0, w, s * 3), fill=accent)
    ctx.text((side + s, s * 1.5), rng.choice(_FIRST), WHITE, bold=True)
    y = s * 4
    while y < h - s * 6:
        mine = rng.random() < 0.5
        text = rng.choice(_WORDS)
        tw = ctx.font().getlength(text) + s * 2
        x = w - tw - s if mine else side + s
        fill = mix(accent, WHITE, 0.6) if mine else WHITE
        d.rounded_rectangle((x, y, x + tw, y + s * 2.2), radius=s // 2, fill=fill)
        ctx.text((x + s, y + s * 1.1), text, (20, 20, 20))
        y += s * 3
    d.rectangle((side, h - s * 3, w, h), fill=(245, 245, 245))
    return img


def _music(rng: random.Random, w: int, h: int) -> Image.Image:
    bg = jit(rng.choice(((18, 18, 18), (40, 20, 60), (10, 30, 50))), rng, 10)
    img, ctx = _canvas(rng, w, h, bg)
    d, s = ctx.draw, ctx.fs
    art = round(min(w, h) * rng.uniform(0.35, 0.5))
    x0, y0 = (w - art) // 2, round(h * 0.1)
    top, bottom = jit((230, 90, 60), rng, 80), jit((60, 40, 160), rng, 80)
    for i in range(0, art, 4):
        d.rectangle((x0, y0 + i, x0 + art, y0 + i + 4), fill=mix(top, bottom, i / art))
    title_y = y0 + art + s * 2
    ctx.text((w / 2, title_y), rng.choice(_SONGS), WHITE, 1.3, bold=True, anchor="mm")
    bar_y = title_y + s * 2.5
    done = rng.uniform(0.1, 0.9)
    d.rectangle((w * 0.2, bar_y, w * 0.8, bar_y + 3), fill=(90, 90, 90))
    d.rectangle((w * 0.2, bar_y, w * (0.2 + 0.6 * done), bar_y + 3), fill=(30, 215, 96))
    for k, r in ((-1, s), (0, s * 1.8), (1, s)):
        cx = w / 2 + k * s * 5
        d.ellipse((cx - r, bar_y + s * 3 - r, cx + r, bar_y + s * 3 + r), fill=WHITE)
    return img


def _files(rng: random.Random, w: int, h: int) -> Image.Image:
    img, ctx = _canvas(rng, w, h, jit((250, 250, 250), rng, 4))
    d, s = ctx.draw, ctx.fs
    d.rectangle((0, 0, w, s * 3), fill=jit((225, 225, 230), rng, 6))
    folder = jit(rng.choice(((250, 200, 60), (90, 150, 230), (120, 190, 120))), rng, 15)
    cell = s * rng.randint(7, 10)
    for y in range(s * 5, h - cell // 2, cell):
        for x in range(s * 2, w - cell // 2, cell):
            d.rectangle((x, y, x + cell * 0.7, y + cell * 0.5), fill=folder)
            d.rectangle((x, y - s * 0.4, x + cell * 0.3, y), fill=folder)
            ctx.text((x, y + cell * 0.65), rng.choice(_FILES), (40, 40, 40), 0.8, cell * 0.9)
    return img


def _settings(rng: random.Random, w: int, h: int) -> Image.Image:
    img, ctx = _canvas(rng, w, h, jit((242, 242, 247), rng, 4))
    d, s = ctx.draw, ctx.fs
    on = jit((52, 199, 89), rng, 10)
    ctx.text((s * 2, s * 2.5), "Settings", BLACK, 1.6, bold=True)
    y = s * 5.0
    for name in rng.sample(_SETTINGS, len(_SETTINGS)):
        if y > h - s * 3:
            break
        d.rounded_rectangle((s, y, w - s, y + s * 3), radius=s // 2, fill=WHITE)
        ctx.text((s * 2.5, y + s * 1.5), name, (20, 20, 20))
        fill = on if rng.random() < 0.5 else (200, 200, 205)
        d.rounded_rectangle((w - s * 6, y + s * 0.6, w - s * 2, y + s * 2.4), s, fill=fill)
        y += s * 3.6
    return img


def _shop(rng: random.Random, w: int, h: int) -> Image.Image:
    img, ctx = _canvas(rng, w, h, WHITE)
    d, s = ctx.draw, ctx.fs
    brand = jit(rng.choice(((255, 153, 0), (230, 0, 90), (0, 110, 80))), rng, 15)
    d.rectangle((0, 0, w, s * 3.5), fill=brand)
    d.rectangle((w * 0.3, s * 0.8, w * 0.7, s * 2.7), fill=WHITE)
    card = max(s * 8, w // rng.randint(3, 5))
    for i, x in enumerate(range(s, w - card, card + s)):
        top = s * 5
        d.rectangle((x, top, x + card, top + card), fill=jit((200, 200, 200), rng, 40))
        ctx.text((x, top + card + s), _PRODUCTS[i % len(_PRODUCTS)], (20, 20, 20), maxw=card)
        ctx.text((x, top + card + s * 2.4), f"${rng.randint(9, 199)}.99", brand, bold=True)
    return img


# --------------------------------------------------------------------------- pictures


def _photo(rng: random.Random, w: int, h: int) -> Image.Image:
    """A blurred scene: sky-to-ground gradient, a smooth random field and soft blobs."""
    np_rng = np.random.default_rng(rng.getrandbits(32))
    sky, ground = jit((120, 170, 230), rng, 40), jit((90, 120, 60), rng, 50)
    horizon = rng.uniform(0.3, 0.7)
    rows = np.linspace(0, 1, h)[:, None, None]
    base = np.where(rows < horizon, sky, ground).astype(np.float64) * np.ones((1, w, 1))
    field = np_rng.normal(0, 40, (6, 8, 3))
    coarse = Image.fromarray(np.clip(field + 128, 0, 255).astype(np.uint8)).resize(
        (w, h), Image.Resampling.BICUBIC
    )
    pixels = np.clip(base + np.asarray(coarse, dtype=np.float64) - 128, 0, 255)
    img = Image.fromarray(pixels.astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(rng.randint(3, 9)):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.03, 0.2) * w
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=jit((128, 110, 90), rng, 100))
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(2, 6)))


def _chart(rng: random.Random, w: int, h: int) -> Image.Image:
    img, ctx = _canvas(rng, w, h, WHITE if rng.random() < 0.7 else (245, 245, 240))
    d, s = ctx.draw, ctx.fs
    left, top, right, bottom = s * 4, s * 3, w - s * 2, h - s * 3
    d.line((left, top, left, bottom), fill=BLACK, width=1)
    d.line((left, bottom, right, bottom), fill=BLACK, width=1)
    ctx.text((w / 2, s * 1.4), "Quarterly results", BLACK, 1.1, anchor="mm")
    colours = [jit(c, rng, 20) for c in ((31, 119, 180), (255, 127, 14), (44, 160, 44))]
    n = rng.randint(4, 12)
    span = (right - left) / n
    style = rng.choice(("bars", "lines", "scatter"))
    for k, colour in enumerate(colours[: rng.randint(1, 3)]):
        values = [rng.uniform(0.1, 0.95) for _ in range(n)]
        points = [
            (left + span * (i + 0.5), bottom - v * (bottom - top)) for i, v in enumerate(values)
        ]
        if style == "bars":
            width = span * 0.8 / 3
            for x, y in points:
                x0 = x - span * 0.4 + k * width
                d.rectangle((x0, y, x0 + width, bottom), fill=colour)
        elif style == "lines":
            d.line(points, fill=colour, width=2)
        else:
            for x, y in points:
                d.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
    return img


def _blank(rng: random.Random, w: int, h: int) -> Image.Image:
    tone = rng.choice((WHITE, BLACK, (128, 128, 128), jit((200, 200, 200), rng, 55)))
    return Image.new("RGB", (w, h), jit(tone, rng, 4))


def _noise(rng: random.Random, w: int, h: int) -> Image.Image:
    np_rng = np.random.default_rng(rng.getrandbits(32))
    cell = rng.choice((1, 2, 4, 8))
    small = np_rng.integers(0, 256, (max(1, h // cell), max(1, w // cell), 3), dtype=np.uint8)
    if rng.random() < 0.3:
        small[:] = small[:, :, :1]  # grey noise
    return Image.fromarray(small).resize((w, h), Image.Resampling.NEAREST)


# --------------------------------------------------------------------------- mixed layouts


def _mixed(rng: random.Random, w: int, h: int) -> Image.Image:
    """A made-up app: a random grid of panels, each a generic widget in a random palette."""
    img, ctx = _canvas(rng, w, h, jit((128, 128, 128), rng, 120))
    columns, rows = rng.randint(2, 4), rng.randint(2, 4)
    for r in range(rows):
        for c in range(columns):
            box = (c * w // columns, r * h // rows, (c + 1) * w // columns, (r + 1) * h // rows)
            rng.choice((_panel_text, _panel_buttons, _panel_picture))(ctx, box)
    return img


def _panel_text(ctx: Ctx, box: Box) -> None:
    x0, y0, x1, y1 = box
    rng, s = ctx.rng, ctx.fs
    ctx.draw.rectangle(box, fill=jit((240, 240, 240), rng, 40))
    colour = jit((60, 60, 60), rng, 60)
    for y in range(y0 + s, y1 - s, round(s * 1.6)):
        length = (x1 - x0 - 2 * s) * rng.uniform(0.3, 1)
        ctx.draw.rectangle((x0 + s, y, x0 + s + length, y + s * 0.5), fill=colour)


def _panel_buttons(ctx: Ctx, box: Box) -> None:
    x0, y0, x1, y1 = box
    rng, s = ctx.rng, ctx.fs
    ctx.draw.rectangle(box, fill=jit((60, 60, 80), rng, 60))
    colour = jit((200, 120, 60), rng, 80)
    for y in range(y0 + s, y1 - s * 3, s * 3):
        ctx.draw.rounded_rectangle((x0 + s, y, x1 - s, y + s * 2), radius=s // 2, fill=colour)


def _panel_picture(ctx: Ctx, box: Box) -> None:
    rng = ctx.rng
    top, bottom = jit((128, 128, 128), rng, 127), jit((128, 128, 128), rng, 127)
    x0, y0, x1, y1 = box
    for y in range(y0, y1, 6):
        ctx.draw.rectangle((x0, y, x1, y + 6), fill=mix(top, bottom, (y - y0) / max(1, y1 - y0)))


_KINDS: dict[str, KindDrawer] = {
    "other_app": _other_app,
    "photo": _photo,
    "chart": _chart,
    "blank": _blank,
    "noise": _noise,
    "mixed": _mixed,
}
