"""Synthetic map app: land, water, parks, streets, points of interest and overlays."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from modal_jobs.demo_data.draw import (
    WHITE,
    Box,
    Color,
    Ctx,
    compass,
    jit,
    mix,
)

_LAND: tuple[Color, ...] = ((236, 230, 214), (228, 234, 212), (240, 232, 216), (232, 228, 208))
_WATER: Color = (156, 200, 232)
_PARK: Color = (181, 222, 170)
_STREETS = (
    "Oak Ave",
    "Elm St",
    "Harbor Rd",
    "Pine St",
    "Market St",
    "5th Ave",
    "Mission St",
    "Lake Dr",
    "Cedar Ln",
    "King St",
    "Bay Blvd",
    "Hill Rd",
    "Park Ave",
    "River Rd",
    "Union St",
    "Main St",
)
_STREET_POOL = _STREETS + tuple(
    f"{k}{'st' if k % 10 == 1 else 'nd' if k % 10 == 2 else 'rd' if k % 10 == 3 else 'th'} St"
    for k in range(1, 61)
    if k % 100 not in (11, 12, 13)
)
_PARKS = ("Riverside Park", "Central Green", "Oak Meadow", "Rose Garden", "Hilltop Park")
_LAKES = ("Lake Merin", "Blue Lagoon", "Silver Bay", "Mirror Pond", "North Harbor")
_POIS = {
    "café": ("Rosa's Café", "Bean There", "Blue Cup", "Morning Brew"),
    "pharmacy": ("CityPharm", "Green Cross", "Well+ Pharmacy"),
    "gas station": ("Shell Oak Ave", "Fuel Stop", "QuickGas"),
    "restaurant": ("Luigi's", "Golden Wok", "Taqueria Sol", "The Grill"),
    "supermarket": ("FreshMart", "Corner Grocer", "ValueFoods"),
}


@dataclass(frozen=True)
class _Poi:
    kind: str
    name: str
    x: float
    y: float


@dataclass(frozen=True)
class _MapInfo:
    me: tuple[float, float]
    street: tuple[str, str]
    pois: tuple[_Poi, ...]
    areas: tuple[tuple[str, str, float, float], ...]  # (kind, name, cx, cy)
    m_per_px: float

    def dist(self, x: float, y: float) -> str:
        """Return the distance from the user's position to ``(x, y)``, in words."""
        m = math.hypot(x - self.me[0], y - self.me[1]) * self.m_per_px
        return f"{round(m, -1):.0f} m" if m < 1000 else f"{m / 1000:.1f} km"

    def where(self, x: float, y: float) -> str:
        """Return e.g. ``about 350 m to the north-east``."""
        return f"about {self.dist(x, y)} to the {compass(x - self.me[0], y - self.me[1])}"


def render_map(ctx: Ctx, box: Box) -> tuple[str, str]:
    """Draw a street map into `box`; return an instruction and its answer."""
    rng, d, s = ctx.rng, ctx.draw, ctx.fs
    x0, y0, x1, y1 = box
    d.rectangle(box, fill=jit(rng.choice(_LAND), rng, 4))
    areas = _map_areas(ctx, box)
    vx = _map_lines(rng, x0, x1, s)
    hy = _map_lines(rng, y0, y1, s)
    _map_blocks(ctx, vx, hy)
    names = rng.sample(_STREET_POOL, len(vx) + len(hy))
    _map_roads(ctx, box, vx, hy)
    for k, y in enumerate(hy):
        ctx.text((x0 + s * rng.uniform(3, 12), y), names[k], (90, 90, 90), 0.75, anchor="lm")
    for k, x in enumerate(vx):
        ctx.text(
            (x, y1 - s * rng.uniform(5, 12)), names[len(hy) + k], (90, 90, 90), 0.75, anchor="mm"
        )
    _map_area_labels(ctx, areas)
    i = _pick_mid(rng, vx, x0 + (x1 - x0) * 0.2, x1 - (x1 - x0) * 0.2)
    j = _pick_mid(rng, hy, y0 + (y1 - y0) * 0.3, y1 - (y1 - y0) * 0.2)
    me = (float(vx[i]), float(hy[j]))
    pois = _map_pois(ctx, box, me)
    _map_me(ctx, me)
    _map_overlays(ctx, box)
    bar_m = rng.choice((100, 200, 250, 500))
    bar_px = rng.uniform(50, 110) * s / 12
    _map_scale(ctx, (x0 + s, y1 - s * 1.5), bar_m, bar_px)
    info = _MapInfo(me, (names[len(hy) + i], names[j]), tuple(pois), tuple(areas), bar_m / bar_px)
    return _map_qa(rng, info)


def _map_lines(rng: random.Random, lo: int, hi: int, s: int) -> list[int]:
    pos = lo + round(rng.uniform(0.2, 1.0) * s * 5)
    out = []
    while pos < hi - s * 2:
        out.append(pos)
        pos += round(s * rng.uniform(6, 14))
    return out or [(lo + hi) // 2]


def _map_areas(ctx: Ctx, box: Box) -> list[tuple[str, str, float, float]]:
    rng, d = ctx.rng, ctx.draw
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    water = jit(_WATER, rng, 8)
    lake = rng.choice(_LAKES)
    style = rng.choice(("lake", "coast", "river"))
    if style == "lake":
        cx, cy = x0 + w * rng.uniform(0.25, 0.75), y0 + h * rng.uniform(0.3, 0.7)
        rx, ry = w * rng.uniform(0.15, 0.3), h * rng.uniform(0.15, 0.3)
        d.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=water)
    elif style == "coast":
        cut = w * rng.uniform(0.2, 0.4)
        pts = [(x1 - cut + w * rng.uniform(-0.08, 0.08), y0 + h * k / 6) for k in range(7)]
        d.polygon([(x1, y0)] + pts + [(x1, y1)], fill=water)
        cx, cy = x1 - cut / 2, y0 + h / 2
    else:
        cx, cy = x0 + w / 2, y0 + h * rng.uniform(0.3, 0.7)
        pts = [(x0 + w * k / 5, cy + h * rng.uniform(-0.15, 0.15)) for k in range(6)]
        d.line(
            pts, fill=water, width=max(8, round(min(w, h) * rng.uniform(0.08, 0.14))), joint="curve"
        )
    areas = [("water", lake, cx, cy)]
    for name in rng.sample(_PARKS, rng.randint(2, 4)):
        px, py = x0 + w * rng.uniform(0.0, 0.7), y0 + h * rng.uniform(0.0, 0.7)
        pw, ph = w * rng.uniform(0.15, 0.35), h * rng.uniform(0.15, 0.35)
        d.rounded_rectangle((px, py, px + pw, py + ph), radius=ctx.fs, fill=jit(_PARK, rng, 10))
        areas.append(("park", name, px + pw / 2, py + ph / 2))
    return areas


def _map_area_labels(ctx: Ctx, areas: list[tuple[str, str, float, float]]) -> None:
    for kind, name, cx, cy in areas:
        col = (40, 100, 160) if kind == "water" else (50, 120, 60)
        ctx.draw.text(
            (cx, cy),
            name,
            fill=col,
            font=ctx.font(0.85),
            anchor="mm",
            stroke_width=1,
            stroke_fill=mix(col, WHITE, 0.8),
        )


def _pick_mid(rng: random.Random, vals: list[int], lo: float, hi: float) -> int:
    """Pick the index of a value in ``[lo, hi]`` (or the one closest to the middle)."""
    mids = [k for k, v in enumerate(vals) if lo <= v <= hi]
    if not mids:
        mids = [min(range(len(vals)), key=lambda k: abs(vals[k] - (lo + hi) / 2))]
    return rng.choice(mids)


def _map_blocks(ctx: Ctx, vx: list[int], hy: list[int]) -> None:
    rng, d, s = ctx.rng, ctx.draw, ctx.fs
    fill = (226, 222, 214)
    for xa, xb in zip(vx, vx[1:], strict=False):
        for ya, yb in zip(hy, hy[1:], strict=False):
            if rng.random() < 0.5:
                continue
            m = s * 0.8
            d.rectangle(
                (
                    xa + m,
                    ya + m,
                    xa + m + (xb - xa - 2 * m) * rng.uniform(0.3, 0.9),
                    ya + m + (yb - ya - 2 * m) * rng.uniform(0.3, 0.9),
                ),
                fill=fill,
            )


def _map_roads(ctx: Ctx, box: Box, vx: list[int], hy: list[int]) -> None:
    rng, d, s = ctx.rng, ctx.draw, ctx.fs
    x0, y0, x1, y1 = box
    minor = max(3, round(s * 0.45))
    major_col = jit((252, 214, 110), rng, 8)
    major_v, major_h = rng.choice(vx), rng.choice(hy)
    for x in vx:
        wid = minor * 2 if x == major_v else minor
        d.line((x, y0, x, y1), fill=(205, 205, 205), width=wid + 2)
        d.line((x, y0, x, y1), fill=major_col if x == major_v else WHITE, width=wid)
    for y in hy:
        wid = minor * 2 if y == major_h else minor
        d.line((x0, y, x1, y), fill=(205, 205, 205), width=wid + 2)
        d.line((x0, y, x1, y), fill=major_col if y == major_h else WHITE, width=wid)
    if rng.random() < 0.6:
        pts = [(x0, y0 + (y1 - y0) * rng.uniform(0, 1)), (x1, y0 + (y1 - y0) * rng.uniform(0, 1))]
        d.line(pts, fill=(230, 160, 60), width=minor * 3)


def _map_pois(ctx: Ctx, box: Box, me: tuple[float, float]) -> list[_Poi]:
    rng, d, s = ctx.rng, ctx.draw, ctx.fs
    x0, y0, x1, y1 = box
    kinds = rng.sample(list(_POIS), rng.randint(2, 4))
    pois: list[_Poi] = []
    for kind in kinds:
        for name in rng.sample(_POIS[kind], rng.randint(1, 2)):
            x = x0 + (x1 - x0) * rng.uniform(0.08, 0.8)
            y = y0 + (y1 - y0) * rng.uniform(0.25, 0.85)
            if math.hypot(x - me[0], y - me[1]) < s * 2:
                continue
            pois.append(_Poi(kind, name, x, y))
    for p in pois:
        r = s * 0.75
        col = (219, 68, 55) if p.kind != "café" else (160, 100, 60)
        d.polygon(
            [(p.x - r * 0.8, p.y - r * 1.6), (p.x + r * 0.8, p.y - r * 1.6), (p.x, p.y)], fill=col
        )
        d.ellipse((p.x - r, p.y - r * 3, p.x + r, p.y - r), fill=col)
        d.ellipse((p.x - r * 0.35, p.y - r * 2.35, p.x + r * 0.35, p.y - r * 1.65), fill=WHITE)
        ctx.draw.text(
            (p.x + r * 1.4, p.y - r * 2),
            p.name,
            fill=(150, 40, 30),
            font=ctx.font(0.8),
            anchor="lm",
            stroke_width=2,
            stroke_fill=WHITE,
        )
    return pois


def _map_me(ctx: Ctx, me: tuple[float, float]) -> None:
    d, s = ctx.draw, ctx.fs
    x, y = me
    for r, col in ((s * 2.2, (200, 218, 248)), (s * 0.85, WHITE), (s * 0.6, (66, 133, 244))):
        d.ellipse((x - r, y - r, x + r, y + r), fill=col)


def _map_overlays(ctx: Ctx, box: Box) -> None:
    rng, d, s = ctx.rng, ctx.draw, ctx.fs
    x0, y0, x1, y1 = box
    sw = (x1 - x0) * rng.uniform(0.35, 0.5)
    sb = (x0 + s, y0 + s, x0 + s + sw, y0 + s * 3.6)
    d.rounded_rectangle(
        (sb[0] + 1, sb[1] + 2, sb[2] + 1, sb[3] + 2), radius=s, fill=(190, 190, 190)
    )
    d.rounded_rectangle(sb, radius=s, fill=WHITE)
    query = rng.choice(("Search here", "Search places", "coffee near me", "Where to?"))
    ctx.text((sb[0] + s * 1.2, (sb[1] + sb[3]) / 2), query, (110, 110, 110), 0.95, maxw=sw - s * 2)
    x: float = sb[0]
    for chip in rng.sample(("Restaurants", "Coffee", "Gas", "Groceries", "Hotels"), 3):
        cw = ctx.font(0.8).getlength(chip) + s * 1.6
        if x + cw > x1 - s:
            break
        d.rounded_rectangle(
            (x, sb[3] + s * 0.6, x + cw, sb[3] + s * 2.2),
            radius=s,
            fill=WHITE,
            outline=(200, 200, 200),
        )
        ctx.text((x + s * 0.8, sb[3] + s * 1.4), chip, (60, 60, 60), 0.8)
        x += cw + s * 0.5
    bx = x1 - s * 3.2
    for k, sym in enumerate(("+", "-")):
        by = y1 - s * (6.6 - k * 2.6)
        d.rectangle((bx, by, bx + s * 2.4, by + s * 2.4), fill=WHITE, outline=(200, 200, 200))
        ctx.text((bx + s * 1.2, by + s * 1.2), sym, (80, 80, 80), 1.4, anchor="mm")


def _map_scale(ctx: Ctx, at: tuple[float, float], meters: int, px: float) -> None:
    x, y = at
    d, s = ctx.draw, ctx.fs
    d.rectangle((x - 2, y - s * 1.2, x + px + s * 3.5, y + 3), fill=(255, 255, 255))
    d.line((x, y, x + px, y), fill=(60, 60, 60), width=2)
    d.line((x, y - s * 0.5, x, y), fill=(60, 60, 60), width=2)
    d.line((x + px, y - s * 0.5, x + px, y), fill=(60, 60, 60), width=2)
    ctx.text((x + px + s * 0.4, y - s * 0.3), f"{meters} m", (60, 60, 60), 0.75)


def _map_qa(rng: random.Random, info: _MapInfo) -> tuple[str, str]:
    kind = rng.choice(("nearest", "far", "street", "area"))
    if kind == "nearest" and info.pois:
        cat = rng.choice(info.pois).kind
        best = min(
            (p for p in info.pois if p.kind == cat),
            key=lambda p: math.hypot(p.x - info.me[0], p.y - info.me[1]),
        )
        q = rng.choice((f"Where's the nearest {cat}?", f"Is there a {cat} close by?"))
        return q, f"The closest {cat} is {best.name}, {info.where(best.x, best.y)} of you."
    if kind == "far" and info.pois:
        p = rng.choice(info.pois)
        q = rng.choice((f"How far is {p.name} from here?", f"How do I get to {p.name}?"))
        return q, f"{p.name} is {info.where(p.x, p.y)} of your position."
    if kind == "area":
        akind, name, cx, cy = rng.choice(info.areas)
        asks = (
            ("What's that lake called?", "Is there any water nearby?")
            if akind == "water"
            else ("Which park is near me?", "Any green space nearby?")
        )
        q = rng.choice(asks)
        return q, f"{name} lies {info.where(cx, cy)}."
    q = rng.choice(("What street am I on?", "Where am I right now?"))
    return q, f"You're at the corner of {info.street[0]} and {info.street[1]}."
