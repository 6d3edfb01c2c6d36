"""Synthetic, app-like screenshots for training and smoke-testing the mole router.

Every sample is a fake screenshot of one of six "expert" apps together with a user instruction
from that app's domain and an expert answer that talks about what is actually drawn on the
screen. ``write_demo_data`` stores them in the dataset layout used by the training jobs::

    <out>/<expert>/datasets/demo.jsonl
    <out>/<expert>/datasets/images/00000.png

One JSON object per line::

    {"id": "<expert>-<seed>-<i:05d>", "image": "images/<i:05d>.png",
     "messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}

Each app has a visual identity of its own (layout plus large regions in its own palette) so it
stays recognisable when the screenshot is downscaled to roughly 256x160 pixels, while window
size, palette, content, pane sizes and clutter (toasts, cursor, tooltips, desktop margins) vary.

Run ``python -m modal_jobs.demo_data --out DIR --per-expert N --seed S`` to write a data set.
"""

from __future__ import annotations

import argparse
import calendar as _calmod
import datetime as dt
import functools
import hashlib
import json
import math
import os
import random
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

EXPERTS: tuple[str, ...] = ("calendar", "spreadsheet", "terminal", "email", "code_editor", "map")

Color = tuple[int, int, int]
Box = tuple[int, int, int, int]
_Font = ImageFont.FreeTypeFont | ImageFont.ImageFont

_WHITE: Color = (255, 255, 255)
_BLACK: Color = (0, 0, 0)
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
_MONTHS = (
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
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_ASPECTS = (4 / 3, 16 / 10, 16 / 9, 3 / 2, 5 / 4, 21 / 9, 1.0, 2.0)
_PNG_COMPRESS_LEVEL = 3


@dataclass(frozen=True)
class Sample:
    """One synthetic screenshot with the user's instruction and the expert's answer."""

    image: Image.Image
    instruction: str
    answer: str


# --------------------------------------------------------------------------- shared helpers


@functools.lru_cache(maxsize=128)
def _font(size: int) -> _Font:
    return ImageFont.load_default(size=size)


def _clamp(v: int) -> int:
    return 0 if v < 0 else 255 if v > 255 else v


def _jit(c: Color, rng: random.Random, amt: int = 10) -> Color:
    """Jitter a colour by up to ``amt`` per channel."""
    return (
        _clamp(c[0] + rng.randint(-amt, amt)),
        _clamp(c[1] + rng.randint(-amt, amt)),
        _clamp(c[2] + rng.randint(-amt, amt)),
    )


def _mix(a: Color, b: Color, t: float) -> Color:
    """Blend ``a`` towards ``b`` by ``t`` (0 keeps ``a``)."""
    return (
        round(a[0] + (b[0] - a[0]) * t),
        round(a[1] + (b[1] - a[1]) * t),
        round(a[2] + (b[2] - a[2]) * t),
    )


def _join(items: Sequence[str]) -> str:
    """Join words as an English list: ``a, b and c``."""
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _fit(s: str, font: _Font, maxw: float) -> str:
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


def _wrap(text: str, font: _Font, maxw: float) -> list[str]:
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
class _Ctx:
    """Drawing state shared by the widget helpers."""

    draw: ImageDraw.ImageDraw
    rng: random.Random
    fs: int

    def font(self, scale: float = 1.0) -> _Font:
        """Return the default font at ``scale`` times the base size."""
        return _font(max(7, round(self.fs * scale)))

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
            s = _fit(s, font, maxw)
        if not s:
            return 0.0
        self.draw.text(xy, s, fill=fill, font=font, anchor=anchor)
        if bold:
            self.draw.text((xy[0] + 1, xy[1]), s, fill=fill, font=font, anchor=anchor)
        return font.getlength(s)


def _compass(dx: float, dy: float) -> str:
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


# --------------------------------------------------------------------------- calendar

_CAL_ACCENTS: tuple[Color, ...] = (
    (26, 115, 232),
    (37, 99, 235),
    (3, 105, 161),
    (48, 79, 224),
    (0, 120, 212),
)
_EVENT_COLORS: tuple[Color, ...] = (
    (3, 155, 229),
    (51, 182, 121),
    (246, 145, 30),
    (142, 36, 170),
    (213, 0, 0),
    (0, 137, 123),
    (121, 134, 203),
    (230, 124, 115),
    (244, 81, 30),
    (63, 81, 181),
)
_EVENT_TITLES = (
    "Standup",
    "Design review",
    "1:1 with Ana",
    "Dentist",
    "Gym",
    "Lunch with Sam",
    "Sprint planning",
    "Budget sync",
    "Yoga",
    "Flight to Berlin",
    "Team retro",
    "Doctor",
    "Parent meeting",
    "Book club",
    "Interview",
    "Demo day",
    "Pay rent",
    "Call mom",
    "Haircut",
    "Board meeting",
    "Coffee with Lee",
    "Launch prep",
    "Piano lesson",
    "Tax deadline",
    "Product sync",
    "Hiring panel",
    "Soccer practice",
    "Vet appointment",
)


@dataclass(frozen=True)
class _Event:
    day: int
    time: str
    title: str


@dataclass(frozen=True)
class _CalInfo:
    year: int
    month: int
    today: int
    first: int
    events: tuple[_Event, ...]

    def label(self, day: int) -> str:
        """Return e.g. ``Thursday, March 14``."""
        wd = _WEEKDAYS[dt.date(self.year, self.month, day).weekday()]
        return f"{wd}, {_MONTHS[self.month - 1]} {day}"


def _render_calendar(ctx: _Ctx, box: Box) -> tuple[str, str]:
    rng = ctx.rng
    year, month = rng.randint(2023, 2026), rng.randint(1, 12)
    today = rng.randint(1, _calmod.monthrange(year, month)[1])
    first = rng.choice((0, 6))
    accent = _jit(rng.choice(_CAL_ACCENTS), rng, 12)
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    ctx.draw.rectangle(box, fill=_jit((252, 252, 253), rng, 3))
    head_h = max(round(ctx.fs * 2.4), round(h * rng.uniform(0.11, 0.15)))
    _cal_header(ctx, (x0, y0, x1, y0 + head_h), accent, f"{_MONTHS[month - 1]} {year}")
    side_w = round(w * rng.uniform(0.17, 0.24)) if w >= 480 and rng.random() < 0.8 else 0
    if side_w:
        _cal_sidebar(ctx, (x0, y0 + head_h, x0 + side_w, y1), accent, (year, month, today))
    grid = (x0 + side_w, y0 + head_h, x1, y1)
    events = _cal_month_grid(ctx, grid, accent, (year, month, today, first))
    return _calendar_qa(rng, _CalInfo(year, month, today, first, tuple(events)))


def _cal_header(ctx: _Ctx, box: Box, accent: Color, title: str) -> None:
    x0, y0, x1, y1 = box
    d, s = ctx.draw, ctx.fs
    d.rectangle(box, fill=accent)
    cy = (y0 + y1) / 2
    for k in (-1, 0, 1):
        yy = cy + k * s * 0.4
        d.line((x0 + s, yy, x0 + s * 2.2, yy), fill=_WHITE, width=max(1, s // 7))
    x = x0 + s * 3.2
    tw = ctx.font().getlength("Today")
    d.rounded_rectangle((x, cy - s * 0.9, x + tw + s, cy + s * 0.9), radius=s // 3, outline=_WHITE)
    ctx.text((x + s / 2, cy), "Today", _WHITE)
    x += tw + s * 2
    ctx.text((x, cy), "<  >", _WHITE, scale=1.1)
    x += s * 3
    ctx.text((x, cy), title, _WHITE, scale=1.4, maxw=x1 - x - s * 8, bold=True)
    bw = ctx.font().getlength("Month") + s
    d.rounded_rectangle(
        (x1 - s * 3.5 - bw, cy - s * 0.9, x1 - s * 3.5, cy + s * 0.9),
        radius=s // 3,
        fill=_mix(accent, _WHITE, 0.25),
    )
    ctx.text((x1 - s * 3 - bw, cy), "Month", _WHITE)
    d.ellipse((x1 - s * 2.4, cy - s * 0.8, x1 - s * 0.8, cy + s * 0.8), fill=(240, 160, 60))


def _cal_sidebar(ctx: _Ctx, box: Box, accent: Color, ymd: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    d, s, rng = ctx.draw, ctx.fs, ctx.rng
    d.rectangle(box, fill=_mix(accent, _WHITE, rng.uniform(0.88, 0.93)))
    d.line((x1 - 1, y0, x1 - 1, y1), fill=(210, 214, 222))
    pad = s * 0.8
    by = y0 + s * 1.2
    d.rounded_rectangle(
        (x0 + pad, by, x1 - pad, by + s * 2.4), radius=s, fill=_WHITE, outline=(200, 204, 212)
    )
    ctx.text((x0 + pad + s * 0.8, by + s * 1.2), "+  Create", accent, maxw=x1 - x0 - 2 * pad - s)
    y = by + s * 3.6
    year, month, today = ymd
    ctx.text(
        (x0 + pad, y),
        f"{_MONTHS[month - 1]} {year}",
        (60, 64, 67),
        scale=0.9,
        maxw=x1 - x0 - 2 * pad,
    )
    y += s * 1.4
    for week in _calmod.Calendar(6).monthdayscalendar(year, month):
        row = "  ".join(f"{n:>2}" if n else "  " for n in week)
        ctx.text((x0 + pad, y), row, (90, 94, 100), scale=0.75, maxw=x1 - x0 - 2 * pad)
        if today in week:
            d.rectangle((x0 + pad - 2, y - s * 0.5, x0 + pad, y + s * 0.5), fill=accent)
        y += s * 1.1
    y += s
    ctx.text((x0 + pad, y), "My calendars", (60, 64, 67), scale=0.9, bold=True)
    for name in rng.sample(("Work", "Personal", "Family", "Holidays", "Birthdays", "Tasks"), 4):
        y += s * 1.5
        if y > y1 - s:
            break
        d.rectangle(
            (x0 + pad, y - s * 0.4, x0 + pad + s * 0.8, y + s * 0.4), fill=rng.choice(_EVENT_COLORS)
        )
        ctx.text((x0 + pad + s * 1.4, y), name, (60, 64, 67), scale=0.85)


def _cal_month_grid(
    ctx: _Ctx, box: Box, accent: Color, spec: tuple[int, int, int, int]
) -> list[_Event]:
    year, month, today, first = spec
    weeks = _calmod.Calendar(first).monthdatescalendar(year, month)
    while len(weeks) < 5:
        weeks.append([d + dt.timedelta(days=7) for d in weeks[-1]])
    x0, y0, x1, y1 = box
    wd_h = round(ctx.fs * 1.9)
    names = _WEEKDAYS[first:] + _WEEKDAYS[:first]
    cw, ch = (x1 - x0) / 7, (y1 - y0 - wd_h) / len(weeks)
    upper = ctx.rng.random() < 0.5
    for c, name in enumerate(names):
        label = name[:3].upper() if upper else name[:3]
        ctx.text((x0 + (c + 0.5) * cw, y0 + wd_h / 2), label, (95, 99, 104), 0.85, anchor="mm")
    cells: dict[int, Box] = {}
    for r, week in enumerate(weeks):
        for c, day in enumerate(week):
            cb = (
                round(x0 + c * cw),
                round(y0 + wd_h + r * ch),
                round(x0 + (c + 1) * cw),
                round(y0 + wd_h + (r + 1) * ch),
            )
            _cal_cell(ctx, cb, day, (month, today), accent)
            if day.month == month:
                cells[day.day] = cb
    return _cal_place_events(ctx, cells, ch)


def _cal_cell(
    ctx: _Ctx, cb: Box, day: dt.date, month_today: tuple[int, int], accent: Color
) -> None:
    d, s = ctx.draw, ctx.fs
    inside = day.month == month_today[0]
    fill = _WHITE if inside else (242, 243, 246)
    if inside and day.weekday() >= 5:
        fill = _mix(accent, _WHITE, 0.92)
    d.rectangle(cb, fill=fill, outline=(218, 220, 224))
    pos = (cb[0] + s * 0.9, cb[1] + s * 0.85)
    if inside and day.day == month_today[1]:
        d.ellipse(
            (pos[0] - s * 0.75, pos[1] - s * 0.75, pos[0] + s * 0.75, pos[1] + s * 0.75),
            fill=accent,
        )
        ctx.text(pos, str(day.day), _WHITE, 0.8, anchor="mm")
        return
    ctx.text(pos, str(day.day), (60, 64, 67) if inside else (170, 172, 176), 0.8, anchor="mm")


def _cal_place_events(ctx: _Ctx, cells: dict[int, Box], cell_h: float) -> list[_Event]:
    rng, s = ctx.rng, ctx.fs
    chip_h = max(6, round(s * 1.2))
    top = round(s * 1.7)
    cap = max(1, int((cell_h - top - 2) // (chip_h + 2)))
    per_day: dict[int, list[_Event]] = {}
    days = list(cells)
    for _ in range(rng.randint(len(days) // 2, len(days) * 3 // 2)):
        day = rng.choice(days)
        todays = per_day.setdefault(day, [])
        title = rng.choice(_EVENT_TITLES)
        if len(todays) < cap and all(e.title != title for e in todays):
            todays.append(
                _Event(day, f"{rng.randint(7, 19):02d}:{rng.choice((0, 15, 30, 45)):02d}", title)
            )
    events: list[_Event] = []
    for day in sorted(per_day):
        todays = sorted(per_day[day], key=lambda e: e.time)
        for k, ev in enumerate(todays):
            x0, y0, x1, _ = cells[day]
            y = y0 + top + k * (chip_h + 2)
            _cal_chip(ctx, (x0 + 2, y, x1 - 2, y + chip_h), ev)
        events.extend(todays)
    return events


def _cal_chip(ctx: _Ctx, box: Box, ev: _Event) -> None:
    rng = ctx.rng
    color = _jit(rng.choice(_EVENT_COLORS), rng, 8)
    x0, y0, x1, y1 = box
    label = f"{ev.time} {ev.title}" if rng.random() < 0.6 else ev.title
    if rng.random() < 0.75:
        ctx.draw.rounded_rectangle(box, radius=max(1, (y1 - y0) // 4), fill=color)
        if y1 - y0 >= 8:
            ctx.text((x0 + 3, (y0 + y1) / 2), label, _WHITE, 0.75, maxw=x1 - x0 - 5)
        return
    r = (y1 - y0) / 4
    cy = (y0 + y1) / 2
    ctx.draw.ellipse((x0 + 2, cy - r, x0 + 2 + 2 * r, cy + r), fill=color)
    ctx.text((x0 + 4 + 3 * r, cy), label, (50, 54, 60), 0.75, maxw=x1 - x0 - 6 - 3 * r)


def _calendar_qa(rng: random.Random, info: _CalInfo) -> tuple[str, str]:
    kinds: list[Callable[[random.Random, _CalInfo], tuple[str, str]]] = [
        _cal_day_qa,
        _cal_day_qa,
        _cal_next_qa,
        _cal_count_qa,
        _cal_free_qa,
    ]
    if info.events:
        kinds.append(_cal_find_qa)
    return rng.choice(kinds)(rng, info)


def _cal_day_qa(rng: random.Random, info: _CalInfo) -> tuple[str, str]:
    busy = sorted({e.day for e in info.events})
    ndays = _calmod.monthrange(info.year, info.month)[1]
    day = rng.choice(busy) if busy and rng.random() < 0.75 else rng.randint(1, ndays)
    label = info.label(day)
    short = f"{_MONTHS[info.month - 1]} {day}"
    wd = label.split(",")[0]
    q = rng.choice(
        (
            f"What do I have on {label}?",
            f"What's on my schedule for {short}?",
            f"Am I busy on {wd} the {day}?",
            f"Anything planned for {short}?",
        )
    )
    evs = [e for e in info.events if e.day == day]
    if not evs:
        return q, f"Nothing is booked on {label}, so that whole day is free."
    if len(evs) == 1:
        return q, f"Just one thing on {label}: {evs[0].title} at {evs[0].time}."
    items = _join([f"{e.title} at {e.time}" for e in evs])
    return q, f"There are {len(evs)} events on {label}: {items}."


def _cal_next_qa(rng: random.Random, info: _CalInfo) -> tuple[str, str]:
    q = rng.choice(
        ("When is my next meeting?", "What's coming up after today?", "What's my next appointment?")
    )
    upcoming = [e for e in info.events if e.day > info.today]
    if not upcoming:
        return q, f"Nothing else is scheduled after {info.label(info.today)} this month."
    ev = upcoming[0]
    return q, f"Your next one is {ev.title} on {info.label(ev.day)} at {ev.time}."


def _cal_count_qa(rng: random.Random, info: _CalInfo) -> tuple[str, str]:
    mname = _MONTHS[info.month - 1]
    q = rng.choice(
        (
            f"How many events do I have in {mname}?",
            "How busy is my month?",
            "How packed is this month looking?",
        )
    )
    if not info.events:
        return q, f"{mname} {info.year} is completely empty: no events at all."
    counts: dict[int, int] = {}
    for e in info.events:
        counts[e.day] = counts.get(e.day, 0) + 1
    top = max(counts, key=lambda k: (counts[k], -k))
    return q, (
        f"I count {len(info.events)} events in {mname} {info.year}; the busiest day is "
        f"{info.label(top)} with {counts[top]}."
    )


def _cal_free_qa(rng: random.Random, info: _CalInfo) -> tuple[str, str]:
    q = rng.choice(("Which days am I free this week?", "Do I have any free days this week?"))
    today = dt.date(info.year, info.month, info.today)
    start = today - dt.timedelta(days=(today.weekday() - info.first) % 7)
    week = [start + dt.timedelta(days=k) for k in range(7)]
    busy = {e.day for e in info.events}
    free = [d for d in week if d.month == info.month and d.day not in busy]
    if not free:
        return q, "Every day this week already has something on it, so no fully free days."
    names = [f"{_WEEKDAYS[d.weekday()]} the {d.day}" for d in free]
    return q, f"This week you're free on {_join(names)}."


def _cal_find_qa(rng: random.Random, info: _CalInfo) -> tuple[str, str]:
    title = rng.choice(info.events).title
    occ = [e for e in info.events if e.title == title]
    q = rng.choice(
        (f"When is {title}?", f"When do I have {title} this month?", f"What day is {title} on?")
    )
    if len(occ) == 1:
        return q, f"{title} is on {info.label(occ[0].day)} at {occ[0].time}."
    when = _join([f"{info.label(e.day)} at {e.time}" for e in occ])
    return q, f"{title} shows up {len(occ)} times this month: {when}."


# --------------------------------------------------------------------------- spreadsheet

_SHEET_GREENS: tuple[Color, ...] = (
    (33, 115, 70),
    (16, 124, 65),
    (15, 157, 88),
    (24, 128, 56),
    (22, 101, 52),
)
_SHEET_ROWS = (
    (
        "Region",
        (
            "North",
            "South",
            "East",
            "West",
            "Central",
            "Coastal",
            "Mountain",
            "Metro",
            "Rural",
            "Islands",
            "Valley",
            "Harbor",
            "Lakes",
            "Plains",
            "Delta",
            "Highlands",
            "Riverside",
            "Uptown",
            "Downtown",
            "Suburbs",
        ),
    ),
    ("Month", tuple(f"{m[:3]} {y}" for y in (2023, 2024) for m in _MONTHS)),
    (
        "Product",
        (
            "Widget",
            "Gadget",
            "Sprocket",
            "Gizmo",
            "Bracket",
            "Flange",
            "Valve",
            "Rotor",
            "Spindle",
            "Lever",
            "Hinge",
            "Pulley",
            "Gasket",
            "Bolt",
            "Washer",
            "Bearing",
            "Clamp",
            "Nozzle",
            "Piston",
            "Axle",
        ),
    ),
    ("Store", tuple(f"Store {k:02d}" for k in range(1, 41))),
    ("SKU", tuple(f"SKU-{k}" for k in range(1000, 1400, 7))),
    (
        "Team",
        (
            "Alpha",
            "Bravo",
            "Sales",
            "Support",
            "Ops",
            "Finance",
            "Design",
            "Research",
            "Legal",
            "Growth",
            "Platform",
            "Data",
            "Security",
            "Mobile",
            "Infra",
            "Billing",
        ),
    ),
)
_SHEET_METRICS = (
    ("Q1", "Q2", "Q3", "Q4", "Target", "FY total", "Growth"),
    ("Sales", "Units", "Returns", "Target", "Stock", "Orders", "Refunds"),
    ("Revenue", "Costs", "Profit", "Budget", "Forecast", "Margin", "Headcount"),
    ("Week 1", "Week 2", "Week 3", "Week 4", "Week 5", "Week 6", "Week 7"),
)


@dataclass(frozen=True)
class _Table:
    label: str
    names: tuple[str, ...]
    headers: tuple[str, ...]
    values: tuple[tuple[int, ...], ...]  # values[row][col]
    summary: str  # "Total" or "Average"

    def column(self, j: int) -> list[int]:
        """Return all values of numeric column ``j``."""
        return [row[j] for row in self.values]

    def summary_value(self, j: int) -> str:
        """Return the formatted summary (total or mean) of column ``j``."""
        col = self.column(j)
        return f"{sum(col):,}" if self.summary == "Total" else f"{sum(col) / len(col):,.1f}"


@dataclass(frozen=True)
class _SheetView:
    qa: tuple[str, str]
    sel: tuple[int, int]  # (column index, 1-based row number)
    content: str  # formula bar content


def _col_letter(j: int) -> str:
    return chr(ord("A") + j) if j < 26 else "A" + chr(ord("A") + j - 26)


def _render_spreadsheet(ctx: _Ctx, box: Box) -> tuple[str, str]:
    rng, s = ctx.rng, ctx.fs
    green = _jit(rng.choice(_SHEET_GREENS), rng, 10)
    x0, y0, x1, y1 = box
    ctx.draw.rectangle(box, fill=_WHITE)
    y = _sheet_ribbon(ctx, box, green)
    fbar_h, tabs_h = round(s * 1.9), round(s * 2.0)
    row_h = round(s * rng.uniform(1.5, 1.9))
    col_w = round(s * rng.uniform(5.0, 7.0))
    cols = [x0 + round(s * 2.8), x0 + round(s * 2.8) + round(s * rng.uniform(6.5, 8.5))]
    while cols[-1] < x1:
        cols.append(cols[-1] + col_w)
    rows = [y + fbar_h, y + fbar_h + row_h]
    while rows[-1] < y1 - tabs_h:
        rows.append(rows[-1] + row_h)
    # rows[-1] and cols[-1] close a partly hidden row/column: keep the table clear of them.
    table = _sheet_table(rng, max(1, len(rows) - 5), max(1, len(cols) - 3))
    view = _sheet_qa(rng, table)
    _sheet_grid(ctx, (x0, rows[0], x1, y1 - tabs_h), cols, rows, green)
    _sheet_fill(ctx, cols, rows, table, green if rng.random() < 0.8 else None)
    _sheet_select(ctx, cols, rows, view.sel, green)
    _sheet_formula_bar(ctx, (x0, y, x1, y + fbar_h), view)
    _sheet_chart(ctx, cols, rows, table, y1 - tabs_h)
    _sheet_tabs(ctx, (x0, y1 - tabs_h, x1, y1), green)
    return view.qa


def _sheet_table(rng: random.Random, n_rows: int, n_cols: int) -> _Table:
    label, pool = rng.choice(_SHEET_ROWS)
    n_rows = min(n_rows, rng.randint(5, 30), len(pool))
    n_cols = min(n_cols, rng.randint(2, 7))
    start = rng.randint(0, len(pool) - n_rows) if label == "Month" else 0
    names = pool[start : start + n_rows] if label == "Month" else tuple(rng.sample(pool, n_rows))
    headers = rng.choice(_SHEET_METRICS)[:n_cols]
    hi = rng.choice((99, 999, 9999))
    values = tuple(
        tuple(rng.randint(hi // 20 + 1, hi) for _ in range(n_cols)) for _ in range(n_rows)
    )
    return _Table(label, names, headers, values, rng.choice(("Total", "Total", "Average")))


def _sheet_ribbon(ctx: _Ctx, box: Box, green: Color) -> int:
    """Draw title strip, ribbon tabs and toolbar; return the y below them."""
    x0, y0, x1, y1 = box
    d, s, rng = ctx.draw, ctx.fs, ctx.rng
    title_h = max(round(s * rng.uniform(1.9, 2.4)), round((y1 - y0) * rng.uniform(0.05, 0.07)))
    d.rectangle((x0, y0, x1, y0 + title_h), fill=_mix(green, _BLACK, 0.15))
    name = rng.choice(("Q3_sales", "budget_2024", "inventory", "team_report", "forecast"))
    ctx.text((x0 + s, y0 + title_h / 2), f"{name}.xlsx", _WHITE, maxw=x1 - x0 - 2 * s)
    tab_h = max(round(s * 1.8), round((y1 - y0) * rng.uniform(0.05, 0.07)))
    y = y0 + title_h
    d.rectangle((x0, y, x1, y + tab_h), fill=green)
    x: float = x0 + s
    for name in ("File", "Home", "Insert", "Formulas", "Data", "Review", "View"):
        if x > x1 - s * 4:
            break
        x += ctx.text((x, y + tab_h / 2), name, _WHITE, 0.85) + s * 1.3
    y += tab_h
    tool_h = round(s * rng.uniform(2.2, 3.2))
    d.rectangle((x0, y, x1, y + tool_h), fill=_mix(green, _WHITE, rng.uniform(0.86, 0.92)))
    d.line((x0, y + tool_h - 1, x1, y + tool_h - 1), fill=(210, 210, 210))
    x = float(x0 + s)
    while x < x1 - s * 2:
        sz = s * rng.uniform(0.9, 1.3)
        d.rectangle(
            (x, y + tool_h / 2 - sz / 2, x + sz, y + tool_h / 2 + sz / 2),
            fill=rng.choice(((90, 90, 90), (150, 150, 150), green, (66, 133, 244))),
        )
        x += sz + s * rng.choice((0.5, 0.6, 1.8))
    return y + tool_h


def _sheet_formula_bar(ctx: _Ctx, box: Box, view: _SheetView) -> None:
    x0, y0, x1, y1 = box
    d, s = ctx.draw, ctx.fs
    d.rectangle(box, fill=_WHITE)
    d.line((x0, y1 - 1, x1, y1 - 1), fill=(210, 210, 210))
    cy = (y0 + y1) / 2
    ref = f"{_col_letter(view.sel[0])}{view.sel[1]}"
    d.rectangle((x0 + 2, y0 + 2, x0 + s * 5, y1 - 3), outline=(200, 200, 200))
    ctx.text((x0 + s * 0.5, cy), ref, (40, 40, 40), 0.85)
    ctx.text((x0 + s * 6, cy), "fx", (120, 120, 120), 0.85)
    ctx.text((x0 + s * 8, cy), view.content, (30, 30, 30), 0.9, maxw=x1 - x0 - s * 9)


def _sheet_grid(ctx: _Ctx, box: Box, cols: list[int], rows: list[int], green: Color) -> None:
    x0, y0, x1, y1 = box
    d = ctx.draw
    head = (236, 236, 236)
    d.rectangle((x0, y0, x1, rows[1]), fill=head)
    d.rectangle((x0, y0, cols[0], y1), fill=head)
    line = _jit((214, 214, 214), ctx.rng, 4)
    for x in cols:
        d.line((x, y0, x, y1), fill=line)
    for y in rows:
        d.line((x0, y, x1, y), fill=line)
    for j in range(len(cols) - 1):
        ctx.text(
            ((cols[j] + cols[j + 1]) / 2, (rows[0] + rows[1]) / 2),
            _col_letter(j),
            (80, 80, 80),
            0.8,
            anchor="mm",
        )
    for i in range(1, len(rows) - 1):
        ctx.text(
            ((x0 + cols[0]) / 2, (rows[i] + rows[i + 1]) / 2),
            str(i),
            (80, 80, 80),
            0.8,
            anchor="mm",
        )
    d.line((x0, rows[1], x1, rows[1]), fill=_mix(green, _WHITE, 0.3))


def _sheet_fill(
    ctx: _Ctx, cols: list[int], rows: list[int], table: _Table, style: Color | None
) -> None:
    """Write the table into the grid, optionally styled as a green banded table."""
    ink: Color = (30, 30, 30)
    last = len(table.headers) + 1
    if style is not None:
        band = _mix(style, _WHITE, ctx.rng.uniform(0.72, 0.82))
        for r in range(1, len(table.names) + 3):
            fill = style if r == 1 else band if r % 2 else _WHITE
            ctx.draw.rectangle(
                (cols[0] + 1, rows[r] + 1, cols[last] - 1, rows[r + 1] - 1), fill=fill
            )

    def put(j: int, r: int, text: str, right: bool, bold: bool = False) -> None:
        cy = (rows[r] + rows[r + 1]) / 2
        width = cols[j + 1] - cols[j] - 6
        fg = _WHITE if style is not None and r == 1 else ink
        if right:
            ctx.text((cols[j + 1] - 3, cy), text, fg, 0.85, width, bold, anchor="rm")
        else:
            ctx.text((cols[j] + 3, cy), text, fg, 0.85, width, bold)

    put(0, 1, table.label, False, True)
    for j, h in enumerate(table.headers):
        put(j + 1, 1, h, True, True)
    for i, (name, vals) in enumerate(zip(table.names, table.values, strict=True)):
        put(0, i + 2, name, False)
        for j, v in enumerate(vals):
            put(j + 1, i + 2, f"{v:,}", True)
    r = len(table.names) + 2
    put(0, r, table.summary, False, True)
    for j in range(len(table.headers)):
        put(j + 1, r, table.summary_value(j), True, True)


def _sheet_select(
    ctx: _Ctx, cols: list[int], rows: list[int], sel: tuple[int, int], green: Color
) -> None:
    j, r = sel
    ctx.draw.rectangle(
        (cols[j] - 1, rows[r] - 1, cols[j + 1] + 1, rows[r + 1] + 1), outline=green, width=2
    )
    ctx.draw.rectangle((cols[j], rows[0], cols[j + 1], rows[1]), outline=green)


def _sheet_chart(ctx: _Ctx, cols: list[int], rows: list[int], table: _Table, bottom: int) -> None:
    rng, d, s = ctx.rng, ctx.draw, ctx.fs
    first_free = len(table.headers) + 2
    if len(cols) - first_free < 4 or len(rows) < 8 or rng.random() < 0.25:
        return
    x0, x1 = cols[first_free] + s, min(cols[-1] - s, cols[first_free] + s * 30)
    y0, y1 = rows[2], min(bottom - s, rows[2] + round((x1 - x0) * rng.uniform(0.55, 0.8)))
    d.rectangle((x0 + 3, y0 + 3, x1 + 3, y1 + 3), fill=(225, 225, 225))
    d.rectangle((x0, y0, x1, y1), fill=_WHITE, outline=(190, 190, 190))
    j = rng.randrange(len(table.headers))
    ctx.text(((x0 + x1) / 2, y0 + s * 1.2), table.headers[j], (60, 60, 60), 0.9, anchor="mm")
    vals = table.column(j)
    color = _jit(rng.choice(((112, 173, 71), (52, 168, 83), (33, 115, 70), (91, 155, 213))), rng)
    base, top = y1 - s, y0 + s * 2.4
    step = (x1 - x0 - 2 * s) / len(vals)
    for k, v in enumerate(vals):
        bx = x0 + s + k * step
        d.rectangle(
            (bx + step * 0.15, base - (base - top) * v / max(vals), bx + step * 0.85, base),
            fill=color,
        )
    d.line((x0 + s, base, x1 - s, base), fill=(150, 150, 150))


def _sheet_tabs(ctx: _Ctx, box: Box, green: Color) -> None:
    x0, y0, x1, y1 = box
    d, s = ctx.draw, ctx.fs
    d.rectangle(box, fill=(240, 240, 240))
    d.line((x0, y0, x1, y0), fill=(200, 200, 200))
    x = x0 + s * 2.5
    for k, name in enumerate(("Sheet1", "Sheet2", "Summary")[: ctx.rng.randint(1, 3)]):
        w = ctx.font(0.85).getlength(name) + s * 1.6
        if k == 0:
            d.rectangle((x, y0, x + w, y1), fill=_WHITE)
            d.line((x, y1 - 2, x + w, y1 - 2), fill=green, width=2)
        ctx.text((x + s * 0.8, (y0 + y1) / 2), name, green if k == 0 else (90, 90, 90), 0.85)
        x += w + 2


def _sheet_qa(rng: random.Random, t: _Table) -> _SheetView:
    n = len(t.names)
    j = rng.randrange(len(t.headers))
    hdr, letter = t.headers[j], _col_letter(j + 1)
    col = t.column(j)
    kind = rng.choice(("total", "max", "cell", "formula", "avg"))
    func = "SUM" if t.summary == "Total" else "AVERAGE"
    formula = f"={func}({letter}2:{letter}{n + 1})"
    total_sel = (j + 1, n + 2)
    if kind == "total":
        q = rng.choice((f"What's the total of {hdr}?", f"Can you add up the {hdr} column?"))
        a = f"The {hdr} values in {letter}2:{letter}{n + 1} add up to {sum(col):,}."
        return _SheetView((q, a), total_sel, formula)
    if kind == "formula":
        q = rng.choice(
            (
                "What does the formula in the selected cell do?",
                f"Explain the formula in {letter}{n + 2}.",
            )
        )
        verb = "adds up" if func == "SUM" else "averages"
        a = (
            f"It's {formula}, which {verb} the {hdr} figures in rows 2 to {n + 1}; the result "
            f"shown is {t.summary_value(j)}."
        )
        return _SheetView((q, a), total_sel, formula)
    return _sheet_value_qa(rng, t, j, kind)


def _sheet_value_qa(rng: random.Random, t: _Table, j: int, kind: str) -> _SheetView:
    hdr, letter = t.headers[j], _col_letter(j + 1)
    col = t.column(j)
    unit = t.label.lower()
    if kind == "max":
        order = sorted(range(len(col)), key=lambda i: (-col[i], i))
        best = order[0]
        q = rng.choice((f"Which {unit} has the highest {hdr}?", f"Who's on top for {hdr}?"))
        a = f"{t.names[best]} leads on {hdr} with {col[best]:,}"
        if len(order) > 1:
            a += f", ahead of {t.names[order[1]]} at {col[order[1]]:,}"
        return _SheetView((q, a + "."), (j + 1, best + 2), f"{col[best]}")
    if kind == "avg":
        q = rng.choice((f"What's the average {hdr}?", f"What is the mean {hdr} per {unit}?"))
        a = f"Across the {len(col)} rows, the mean {hdr} is {sum(col) / len(col):,.1f}."
        return _SheetView((q, a), (j + 1, 1), hdr)
    i = rng.randrange(len(col))
    ref = f"{letter}{i + 2}"
    q = rng.choice((f"What's in cell {ref}?", f"What value is in {ref}?"))
    a = f"Cell {ref} holds {col[i]:,}, the {hdr} figure for {t.names[i]}."
    other = (rng.randrange(len(t.headers)) + 1, rng.randrange(len(col)) + 2)
    return _SheetView((q, a), other, f"{t.values[other[1] - 2][other[0] - 1]}")


# --------------------------------------------------------------------------- terminal

_TSeg = tuple[str, str]  # (text, role)
_TLine = tuple[_TSeg, ...]


@dataclass(frozen=True)
class _Shell:
    user: str
    host: str
    proj: str

    def prompt(self, cmd: str) -> _TLine:
        """Return a prompt line running ``cmd``."""
        return ((f"{self.user}@{self.host}:", "prompt"), (f"~/{self.proj}$ ", "path"), (cmd, "fg"))


def _out(text: str, role: str = "fg") -> _TLine:
    return ((text, role),)


_TermScenario = Callable[[random.Random, _Shell], tuple[list[_TLine], str, str]]


def _term_missing_module(rng: random.Random, sh: _Shell) -> tuple[list[_TLine], str, str]:
    script = rng.choice(("train.py", "app.py", "main.py", "scrape.py", "report.py"))
    mod = rng.choice(("torch", "pandas", "requests", "numpy", "yaml", "flask", "scipy"))
    line_no = rng.randint(1, 30)
    lines = [
        sh.prompt(f"python {script}"),
        _out("Traceback (most recent call last):"),
        _out(f'  File "/home/{sh.user}/{sh.proj}/{script}", line {line_no}, in <module>'),
        _out(f"    import {mod}"),
        _out(f"ModuleNotFoundError: No module named '{mod}'", "err"),
    ]
    q = rng.choice(
        ("Why did this command fail?", f"Why won't {script} run?", "What does this error mean?")
    )
    pip_name = {"yaml": "pyyaml"}.get(mod, mod)
    a = (
        f"`python {script}` crashed on line {line_no} because the '{mod}' package isn't "
        f"installed here. Running `pip install {pip_name}` should fix it."
    )
    return lines, q, a


def _term_permission(rng: random.Random, sh: _Shell) -> tuple[list[_TLine], str, str]:
    verb, target = rng.choice(
        (
            ("rm", "/var/log/syslog"),
            ("cat", "/etc/shadow"),
            ("touch", "/usr/local/bin/tool"),
            ("mkdir", "/opt/cache"),
        )
    )
    msgs = {
        "rm": "cannot remove",
        "cat": "",
        "touch": "cannot touch",
        "mkdir": "cannot create directory",
    }
    msg = f"{msgs[verb]} '{target}'" if msgs[verb] else target
    lines = [sh.prompt(f"{verb} {target}"), _out(f"{verb}: {msg}: Permission denied", "err")]
    q = rng.choice(("Why did this command fail?", "Why am I getting permission denied?"))
    a = (
        f"Your user '{sh.user}' isn't allowed to {verb} {target}, which belongs to root. "
        f"Rerun it as `sudo {verb} {target}` if you really mean to."
    )
    return lines, q, a


def _term_not_found(rng: random.Random, sh: _Shell) -> tuple[list[_TLine], str, str]:
    typo, real, args = rng.choice(
        (
            ("gti", "git", "status"),
            ("pyhton", "python", "app.py"),
            ("sl", "ls", "-la"),
            ("dokcer", "docker", "ps"),
            ("nmp", "npm", "install"),
            ("grpe", "grep", "-r TODO ."),
        )
    )
    lines = [sh.prompt(f"{typo} {args}"), _out(f"bash: {typo}: command not found", "err")]
    q = rng.choice(("Why did this command fail?", "What's wrong with what I typed?"))
    a = (
        f"'{typo}' isn't an installed command; it looks like a typo for `{real}`, so try "
        f"`{real} {args}`."
    )
    return lines, q, a


def _term_git_status(rng: random.Random, sh: _Shell) -> tuple[list[_TLine], str, str]:
    pool = [
        "src/app.py",
        "src/utils.py",
        "README.md",
        "tests/test_api.py",
        "setup.cfg",
        "docs/index.md",
        "src/models.py",
        "Makefile",
    ]
    changed = rng.sample(pool, rng.randint(1, 4))
    untracked = rng.sample(["notes.txt", "scratch.py", "data/", "out.log"], rng.randint(0, 2))
    branch = rng.choice(("main", "dev", "feature/login", "fix/parser"))
    lines = [
        sh.prompt("git status"),
        _out(f"On branch {branch}"),
        _out("Changes not staged for commit:"),
    ]
    lines += [_out(f"        modified:   {f}", "err") for f in changed]
    if untracked:
        lines.append(_out("Untracked files:"))
        lines += [_out(f"        {f}", "err") for f in untracked]
    q = rng.choice(("Which files did I change?", "What's the state of my repo?"))
    a = f"On branch {branch}, git reports {len(changed)} modified: {_join(changed)}"
    if untracked:
        a += f", plus {len(untracked)} untracked: {_join(untracked)}"
    return lines, q, a + ". Nothing is staged yet."


def _term_disk(rng: random.Random, sh: _Shell) -> tuple[list[_TLine], str, str]:
    size = rng.choice((50, 100, 250, 500, 1000))
    pct = rng.randint(20, 99)
    used = round(size * pct / 100)
    avail = size - used
    lines = [
        sh.prompt("df -h"),
        _out("Filesystem      Size  Used Avail Use% Mounted on"),
        _out(f"/dev/nvme0n1p2  {size}G  {used}G  {avail}G  {pct}% /"),
        _out("tmpfs           7.8G     0  7.8G   0% /dev/shm"),
        _out(f"/dev/sdb1       2.0T  {rng.randint(1, 19) / 10}T  1.1T  46% /data"),
    ]
    q = rng.choice(("How much disk space do I have left?", "Is my disk almost full?"))
    tail = " That's getting tight." if pct >= 90 else ""
    a = f"The root filesystem has {avail}G free out of {size}G ({pct}% used).{tail}"
    return lines, q, a


def _term_ls(rng: random.Random, sh: _Shell) -> tuple[list[_TLine], str, str]:
    names = rng.sample(
        [
            "data.csv",
            "model.bin",
            "report.pdf",
            "notes.txt",
            "backup.tar.gz",
            "photo.jpg",
            "run.sh",
            "config.yaml",
            "video.mp4",
        ],
        rng.randint(3, 6),
    )
    sizes = rng.sample(range(1, 900), len(names))
    units = [rng.choice(("K", "M")) for _ in names]
    lines = [sh.prompt("ls -lh"), _out(f"total {rng.randint(10, 900)}M")]
    for name, size, unit in zip(names, sizes, units, strict=True):
        day = rng.randint(1, 28)
        lines.append(_out(f"-rw-r--r-- 1 {sh.user} {sh.user} {size:>4}{unit} Mar {day:>2} {name}"))
    big = max(range(len(names)), key=lambda k: (units[k] == "M", sizes[k]))
    q = rng.choice(("What's the biggest file in this folder?", "Which file takes the most space?"))
    a = (
        f"{names[big]} is the largest at {sizes[big]}{units[big]}, out of {len(names)} files "
        "listed."
    )
    return lines, q, a


def _term_ping(rng: random.Random, sh: _Shell) -> tuple[list[_TLine], str, str]:
    host = rng.choice(("8.8.8.8", "1.1.1.1", "github.com", "192.168.1.1"))
    got = rng.choice((4, 4, 3, 0))
    lines = [sh.prompt(f"ping -c 4 {host}")]
    times = [round(rng.uniform(5, 80), 1) for _ in range(got)]
    lines += [
        _out(f"64 bytes from {host}: icmp_seq={k + 1} ttl=117 time={t} ms")
        for k, t in enumerate(times)
    ]
    loss = (4 - got) * 25
    lines += [
        _out(f"--- {host} ping statistics ---"),
        _out(
            f"4 packets transmitted, {got} received, {loss}% packet loss", "err" if loss else "ok"
        ),
    ]
    q = rng.choice(("Is my network connection working?", f"Can I reach {host}?"))
    if got == 0:
        return lines, q, f"No: all 4 pings to {host} were lost, so that host is unreachable."
    avg = sum(times) / got
    return (
        lines,
        q,
        (f"Yes, {got} of 4 pings to {host} came back ({loss}% loss), averaging {avg:.1f} ms."),
    )


def _term_pytest(rng: random.Random, sh: _Shell) -> tuple[list[_TLine], str, str]:
    test = rng.choice(("test_parse_date", "test_login", "test_total", "test_slugify"))
    mod = rng.choice(("tests/test_utils.py", "tests/test_api.py", "tests/test_models.py"))
    passed = rng.randint(3, 60)
    got, want = rng.sample(range(1, 100), 2)
    lines = [
        sh.prompt("pytest -q"),
        _out("." * min(passed, 40) + "F", "ok"),
        _out(f"FAILED {mod}::{test} - assert {got} == {want}", "err"),
        _out(f"1 failed, {passed} passed in {rng.uniform(0.3, 9):.2f}s", "err"),
    ]
    q = rng.choice(("Which test failed?", "Why is the test run red?"))
    a = (
        f"Only {test} in {mod} failed: it asserted {got} == {want}. "
        f"The other {passed} tests passed."
    )
    return lines, q, a


_TERM_SCENARIOS: tuple[_TermScenario, ...] = (
    _term_missing_module,
    _term_permission,
    _term_not_found,
    _term_git_status,
    _term_disk,
    _term_ls,
    _term_ping,
    _term_pytest,
)


def _term_filler(rng: random.Random, sh: _Shell, n: int) -> list[_TLine]:
    cmds: list[tuple[str, list[str]]] = [
        (f"cd ~/{sh.proj}", []),
        ("ls", ["README.md  src  tests  setup.py  Makefile"]),
        ("whoami", [sh.user]),
        ("pwd", [f"/home/{sh.user}/{sh.proj}"]),
        ("date", [f"Tue Mar {rng.randint(1, 28)} 10:41:07 UTC 2024"]),
        ("git pull", ["Already up to date."]),
        ("python --version", ["Python 3.11.6"]),
        ("uptime", [" 10:41:07 up 3 days,  2:14,  1 user,  load average: 0.42, 0.38, 0.35"]),
        ("echo $SHELL", ["/bin/bash"]),
        ("nproc", [str(rng.choice((4, 8, 16)))]),
        ("free -h", ["              total   used   free", "Mem:           15Gi  6.1Gi  4.2Gi"]),
    ]
    lines: list[_TLine] = []
    while len(lines) < n:
        cmd, outs = rng.choice(cmds)
        lines.append(sh.prompt(cmd))
        lines += [_out(o) for o in outs]
    return lines[len(lines) - n :] if n else []


def _render_terminal(ctx: _Ctx, box: Box) -> tuple[str, str]:
    rng, d, s = ctx.rng, ctx.draw, ctx.fs
    x0, y0, x1, y1 = box
    bg = _jit(rng.choice(((8, 8, 8), (0, 0, 0), (12, 12, 12), (4, 10, 4))), rng, 4)
    d.rectangle(box, fill=bg)
    title_h = round(s * rng.uniform(1.6, 2.1))
    sh = _Shell(
        rng.choice(("alice", "bob", "dev", "sam", "root", "kim")),
        rng.choice(("laptop", "box", "ubuntu", "devbox", "mbp")),
        rng.choice(("api", "webapp", "ml", "scripts", "blog")),
    )
    _term_titlebar(ctx, (x0, y0, x1, y0 + title_h), f"{sh.user}@{sh.host}: ~/{sh.proj}")
    lines, q, a = rng.choice(_TERM_SCENARIOS)(rng, sh)
    line_h = round(s * rng.uniform(1.25, 1.45))
    room = max(1, (y1 - y0 - title_h - s) // line_h)
    extra = max(0, round(room * rng.uniform(0.4, 1.0)) - len(lines) - 1)
    lines = _term_filler(rng, sh, extra) + lines + [sh.prompt("")]
    lines = _term_wrap(lines, ctx.font(0.95), x1 - x0 - s * 1.2)[-room:]
    pal = _term_palette(rng)
    y = y0 + title_h + s * 0.5 + line_h / 2
    for line in lines:
        x = x0 + s * 0.6
        for text, role in line:
            x += ctx.text((x, y), text, pal[role], 0.95, maxw=x1 - x - s * 0.3)
        y += line_h
    cur = y - line_h
    d.rectangle((x + 1, cur - s * 0.55, x + s * 0.6, cur + s * 0.55), fill=pal["fg"])
    return q, a


def _term_wrap(lines: list[_TLine], font: _Font, maxw: float) -> list[_TLine]:
    """Wrap over-long output lines the way a real shell does (prompt lines are left alone)."""
    out: list[_TLine] = []
    for line in lines:
        width = font.getlength(line[0][0])
        if len(line) != 1 or width <= maxw:
            out.append(line)
            continue
        text, role = line[0]
        n = max(8, int(len(text) * maxw / width))
        out += [((text[k : k + n], role),) for k in range(0, len(text), n)]
    return out


def _term_palette(rng: random.Random) -> dict[str, Color]:
    fg = rng.choice(((204, 204, 204), (229, 229, 229), (80, 250, 123), (255, 176, 0)))
    return {
        "fg": _jit(fg, rng, 8),
        "prompt": _jit(rng.choice(((138, 226, 52), (80, 250, 123), (95, 215, 95))), rng, 8),
        "path": _jit((114, 159, 207), rng, 10),
        "err": _jit((240, 80, 80), rng, 10),
        "ok": _jit((90, 220, 110), rng, 10),
    }


def _term_titlebar(ctx: _Ctx, box: Box, title: str) -> None:
    x0, y0, x1, y1 = box
    d, s, rng = ctx.draw, ctx.fs, ctx.rng
    light = rng.random() < 0.35
    d.rectangle(box, fill=_jit((222, 222, 222) if light else (48, 48, 50), rng, 6))
    cy = (y0 + y1) / 2
    r = s * 0.42
    for k, col in enumerate(((255, 95, 86), (255, 189, 46), (39, 201, 63))):
        cx = x0 + s * (1.0 + k * 1.3)
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=col)
    ctx.text(
        ((x0 + x1) / 2, cy),
        title,
        (60, 60, 60) if light else (200, 200, 200),
        0.85,
        maxw=x1 - x0 - s * 10,
        anchor="mm",
    )


# --------------------------------------------------------------------------- email

_MAIL_ACCENTS: tuple[Color, ...] = ((219, 68, 55), (234, 88, 12), (200, 40, 60), (214, 69, 35))
_SENDERS = (
    "Ana Silva",
    "Ben Carter",
    "Chloe Wu",
    "David Okafor",
    "Elena Petrova",
    "Farid Haddad",
    "Grace Lee",
    "Hugo Martin",
    "Isla Brown",
    "Jonas Berg",
    "Kenji Sato",
    "Lucia Romero",
    "Maya Patel",
    "Noah Fischer",
    "Olivia Chen",
    "Priya Nair",
    "Tom Walsh",
    "Zoe Adams",
)
# (subject, body, summary of the request)
_MAILS = (
    (
        "Budget review",
        "Hi, can we move the budget review to Friday at 3 pm? Finance needs one "
        "more day to close the numbers.",
        "wants to move the budget review to Friday at 3 pm because finance needs one more day",
    ),
    (
        "Offsite venue",
        "We found two venues for the offsite. The lake house is cheaper but the "
        "city loft is easier to reach. Please vote by Wednesday.",
        "asks you to vote between the lake house and the city loft for the offsite by Wednesday",
    ),
    (
        "Invoice #4821",
        "Attached is invoice #4821 for March. Payment is due within 30 days.",
        "sent invoice #4821 for March, due within 30 days",
    ),
    (
        "Lunch tomorrow?",
        "Are you free for lunch tomorrow around 12:30? The new ramen place opened.",
        "is inviting you to lunch tomorrow around 12:30 at the new ramen place",
    ),
    (
        "Server maintenance",
        "The build servers will be down Saturday from 02:00 to 06:00 for "
        "upgrades. Save your work before then.",
        "warns that the build servers are down on Saturday from 02:00 to 06:00",
    ),
    (
        "Your order shipped",
        "Good news: your order #77812 has shipped and should arrive on Thursday.",
        "confirms order #77812 shipped and should arrive on Thursday",
    ),
    (
        "Draft slides",
        "Here are the draft slides for the board meeting. Could you check the "
        "revenue chart on page 4?",
        "wants you to check the revenue chart on page 4 of the draft slides",
    ),
    (
        "Welcome aboard",
        "Welcome to the team! Your first day starts at 9:00 at reception on floor 2.",
        "welcomes you and says your first day starts at 9:00 at reception on floor 2",
    ),
    (
        "Password reset",
        "A password reset was requested for your account. If this wasn't you, ignore this message.",
        "reports a password reset request and says to ignore it if it wasn't you",
    ),
    (
        "Trip itinerary",
        "Your flight leaves at 07:45 from gate B12. Hotel check-in is after 15:00.",
        "shares the itinerary: the flight leaves at 07:45 from gate B12",
    ),
    (
        "Quarterly results",
        "Revenue grew 12% this quarter. Full results are in the shared folder.",
        "reports that revenue grew 12% this quarter",
    ),
    (
        "Missing receipt",
        "I still need the receipt for the taxi on the 14th to close your expense report.",
        "needs the taxi receipt from the 14th to close your expense report",
    ),
)
_FOLDERS = ("Inbox", "Starred", "Snoozed", "Sent", "Drafts", "Spam", "Trash")


@dataclass(frozen=True)
class _Mail:
    sender: str
    subject: str
    body: str
    summary: str
    time: str
    unread: bool


def _render_email(ctx: _Ctx, box: Box) -> tuple[str, str]:
    rng, d, s = ctx.rng, ctx.draw, ctx.fs
    x0, y0, x1, y1 = box
    w = x1 - x0
    accent = _jit(rng.choice(_MAIL_ACCENTS), rng, 10)
    d.rectangle(box, fill=_WHITE)
    top_h = max(round(s * 2.6), round((y1 - y0) * rng.uniform(0.09, 0.12)))
    _mail_topbar(ctx, (x0, y0, x1, y0 + top_h), accent)
    side_w = round(w * rng.uniform(0.17, 0.23)) if w >= 480 else round(s * 3)
    list_w = round(w * rng.uniform(0.30, 0.38))
    row_h = round(s * rng.uniform(3.0, 3.6))
    n = max(3, min(len(_SENDERS), (y1 - y0 - top_h - s) // row_h))
    mails = _mail_list(rng, n)
    sel = rng.randrange(len(mails))
    _mail_folders(ctx, (x0, y0 + top_h, x0 + side_w, y1), accent, sum(m.unread for m in mails))
    lx = x0 + side_w
    for i, m in enumerate(mails):
        _mail_row(
            ctx,
            (lx, y0 + top_h + i * row_h, lx + list_w, y0 + top_h + (i + 1) * row_h),
            m,
            accent,
            i == sel,
        )
    d.line((lx + list_w, y0 + top_h, lx + list_w, y1), fill=(220, 220, 220))
    _mail_reader(ctx, (lx + list_w, y0 + top_h, x1, y1), mails[sel], accent)
    return _mail_qa(rng, mails, sel)


def _mail_list(rng: random.Random, n: int) -> list[_Mail]:
    senders = rng.sample(_SENDERS, min(n, len(_SENDERS)))
    mails: list[_Mail] = []
    minutes = rng.randint(8 * 60, 18 * 60)
    for i in range(n):
        subj, body, summary = rng.choice(_MAILS)
        if minutes > 7 * 60:
            when = f"{minutes // 60:02d}:{minutes % 60:02d}"
            minutes -= rng.randint(5, 120)
        else:
            when = f"Mar {rng.randint(1, 20)}"
        mails.append(
            _Mail(senders[i % len(senders)], subj, body, summary, when, rng.random() < 0.35)
        )
    return mails


def _mail_topbar(ctx: _Ctx, box: Box, accent: Color) -> None:
    x0, y0, x1, y1 = box
    d, s = ctx.draw, ctx.fs
    d.rectangle(box, fill=accent)
    cy = (y0 + y1) / 2
    ctx.text((x0 + s, cy), "Mail", _WHITE, 1.3, bold=True)
    sx0, sx1 = x0 + s * 6, min(x1 - s * 4, x0 + (x1 - x0) * 0.6)
    if sx1 > sx0 + s * 4:
        d.rounded_rectangle(
            (sx0, cy - s * 0.95, sx1, cy + s * 0.95), radius=s // 2, fill=_mix(accent, _WHITE, 0.8)
        )
        ctx.text((sx0 + s, cy), "Search mail", (110, 80, 80), 0.9, maxw=sx1 - sx0 - 2 * s)
    d.ellipse((x1 - s * 2.4, cy - s * 0.8, x1 - s * 0.8, cy + s * 0.8), fill=(70, 130, 180))


def _mail_folders(ctx: _Ctx, box: Box, accent: Color, unread: int) -> None:
    x0, y0, x1, y1 = box
    d, s, rng = ctx.draw, ctx.fs, ctx.rng
    d.rectangle(box, fill=_mix(accent, _WHITE, rng.uniform(0.6, 0.72)))
    pad = s * 0.6
    d.rounded_rectangle((x0 + pad, y0 + s, x1 - pad, y0 + s * 3.2), radius=s, fill=accent)
    ctx.text(
        (x0 + pad + s * 0.6, y0 + s * 2.1),
        "Compose",
        _WHITE,
        0.9,
        maxw=x1 - x0 - 2 * pad - s,
        bold=True,
    )
    y = y0 + s * 4.6
    for k, name in enumerate(_FOLDERS):
        if y > y1 - s:
            break
        if k == 0:
            d.rounded_rectangle(
                (x0, y - s * 0.8, x1 - pad, y + s * 0.8),
                radius=s // 2,
                fill=_mix(accent, _WHITE, 0.9),
            )
        label = f"{name} ({unread})" if k == 0 and unread else name
        ctx.text((x0 + pad * 2, y), label, (50, 40, 40), 0.85, maxw=x1 - x0 - pad * 3, bold=k == 0)
        y += s * 1.9


def _mail_row(ctx: _Ctx, box: Box, m: _Mail, accent: Color, selected: bool) -> None:
    x0, y0, x1, y1 = box
    d, s = ctx.draw, ctx.fs
    if selected:
        d.rectangle(box, fill=(226, 234, 246))
    d.line((x0, y1 - 1, x1, y1 - 1), fill=(228, 228, 228))
    h = y1 - y0
    if m.unread:
        r = s * 0.3
        d.ellipse(
            (x0 + s * 0.5 - r, y0 + h * 0.33 - r, x0 + s * 0.5 + r, y0 + h * 0.33 + r), fill=accent
        )
    tw = ctx.font(0.75).getlength(m.time)
    ctx.text(
        (x1 - s * 0.5, y0 + h * 0.33),
        m.time,
        accent if m.unread else (110, 110, 110),
        0.75,
        anchor="rm",
    )
    ctx.text(
        (x0 + s * 1.2, y0 + h * 0.33),
        m.sender,
        (20, 20, 20),
        0.9,
        maxw=x1 - x0 - s * 2.4 - tw,
        bold=m.unread,
    )
    ctx.text((x0 + s * 1.2, y0 + h * 0.7), m.subject, (100, 100, 100), 0.8, maxw=x1 - x0 - s * 1.8)


def _mail_reader(ctx: _Ctx, box: Box, m: _Mail, accent: Color) -> None:
    x0, y0, x1, y1 = box
    d, s = ctx.draw, ctx.fs
    pad = s * 1.5
    if x1 - x0 < s * 8:
        return
    ctx.text(
        (x0 + pad, y0 + s * 2), m.subject, (20, 20, 20), 1.35, maxw=x1 - x0 - 2 * pad, bold=True
    )
    cy = y0 + s * 4.6
    r = s * 1.1
    d.ellipse((x0 + pad, cy - r, x0 + pad + 2 * r, cy + r), fill=_mix(accent, (60, 60, 160), 0.5))
    ctx.text((x0 + pad + r, cy), m.sender[0], _WHITE, 1.0, anchor="mm")
    ctx.text(
        (x0 + pad + 2.6 * r, cy - s * 0.5),
        m.sender,
        (30, 30, 30),
        0.9,
        maxw=x1 - x0 - 2 * pad - 3 * r,
        bold=True,
    )
    ctx.text((x0 + pad + 2.6 * r, cy + s * 0.6), f"to me  {m.time}", (120, 120, 120), 0.75)
    font = ctx.font(0.9)
    y = cy + s * 2.6
    for line in _wrap(m.body, font, x1 - x0 - 2 * pad):
        if y > y1 - s * 4:
            break
        ctx.text((x0 + pad, y), line, (60, 60, 60), 0.9)
        y += s * 1.45
    y = min(y + s, y1 - s * 2.6)
    for label in ("Reply", "Forward"):
        bw = font.getlength(label) + s * 2
        d.rounded_rectangle(
            (x0 + pad, y, x0 + pad + bw, y + s * 2), radius=s, outline=(180, 180, 180)
        )
        ctx.text((x0 + pad + s, y + s), label, (60, 60, 60), 0.9)
        pad += bw + s


def _mail_qa(rng: random.Random, mails: list[_Mail], sel: int) -> tuple[str, str]:
    kind = rng.choice(("unread", "open", "who", "from"))
    m = mails[sel]
    if kind == "open":
        q = rng.choice(
            (
                "What does the open message say?",
                "Summarize the message I have open.",
                f"What is {m.sender.split()[0]} asking for?",
            )
        )
        return q, f"{m.sender} ({m.subject}, {m.time}) {m.summary}."
    if kind == "unread":
        unread = [x.sender for x in mails if x.unread]
        q = rng.choice(("How many unread messages do I have?", "Anything new I haven't read?"))
        if not unread:
            return q, "Everything in this list is already read, so nothing new is waiting."
        return q, f"You have {len(unread)} unread: from {_join(unread)}."
    if kind == "who":
        pick = rng.choice(mails)
        q = rng.choice(
            (f"Who sent me the message about '{pick.subject}'?", f"Who wrote '{pick.subject}'?")
        )
        who = [x for x in mails if x.subject == pick.subject]
        return q, "That came from " + _join([f"{x.sender} ({x.time})" for x in who]) + "."
    name = rng.choice(mails).sender if rng.random() < 0.7 else rng.choice(_SENDERS)
    q = rng.choice((f"Did {name} write to me?", f"Is there anything from {name}?"))
    hits = [x for x in mails if x.sender == name]
    if not hits:
        return q, f"No, nothing from {name} appears in this list."
    when = f"at {hits[0].time}" if ":" in hits[0].time else f"on {hits[0].time}"
    return q, f"Yes, {name} sent '{hits[0].subject}' {when}."


# --------------------------------------------------------------------------- code editor


@dataclass(frozen=True)
class _Theme:
    bg: Color
    side: Color
    tabs: Color
    fg: Color
    kw: Color
    fn: Color
    st: Color
    cm: Color
    num: Color
    status: Color


_THEMES = (
    _Theme(
        (40, 44, 52),
        (52, 58, 70),
        (33, 37, 43),
        (171, 178, 191),
        (198, 120, 221),
        (97, 175, 239),
        (152, 195, 121),
        (92, 99, 112),
        (209, 154, 102),
        (64, 120, 242),
    ),
    _Theme(
        (14, 34, 56),
        (26, 54, 84),
        (9, 26, 44),
        (214, 222, 235),
        (199, 146, 234),
        (130, 170, 255),
        (236, 196, 141),
        (99, 119, 119),
        (247, 140, 108),
        (122, 40, 160),
    ),
    _Theme(
        (40, 42, 54),
        (54, 57, 74),
        (33, 34, 44),
        (248, 248, 242),
        (255, 121, 198),
        (80, 250, 123),
        (241, 250, 140),
        (98, 114, 164),
        (189, 147, 249),
        (98, 60, 180),
    ),
    _Theme(
        (31, 36, 48),
        (45, 52, 70),
        (26, 30, 40),
        (212, 212, 212),
        (197, 134, 192),
        (220, 220, 170),
        (206, 145, 120),
        (106, 153, 85),
        (181, 206, 168),
        (0, 122, 204),
    ),
    _Theme(
        (46, 52, 64),
        (59, 66, 82),
        (40, 45, 56),
        (216, 222, 233),
        (129, 161, 193),
        (136, 192, 208),
        (163, 190, 140),
        (97, 110, 136),
        (180, 142, 173),
        (94, 129, 172),
    ),
)
_KEYWORDS = frozenset(
    (
        "def",
        "return",
        "for",
        "in",
        "if",
        "else",
        "import",
        "from",
        "class",
        "while",
        "not",
        "and",
        "or",
        "None",
        "True",
        "False",
        "with",
        "as",
        "try",
        "except",
        "raise",
        "yield",
    )
)
_TOKEN_RE = re.compile(
    r"(?P<cm>#.*)|(?P<st>f?'[^']*'|\"[^\"]*\")|(?P<num>\b\d+(?:\.\d+)?\b)"
    r"|(?P<id>[A-Za-z_]\w*)|(?P<ws>\s+)|(?P<op>.)"
)


@dataclass(frozen=True)
class _Func:
    name: str
    params: str
    body: tuple[str, ...]
    does: str
    ret: str  # variable returned by a plain "return <ret>" line ("" if none)
    imports: tuple[str, ...] = ()


_FUNCS = (
    _Func(
        "total_price",
        "items",
        ("total = 0", "for item in items:", "    total += item.price * item.qty", "return total"),
        "adds price times quantity for every item and returns the grand total",
        "total",
    ),
    _Func(
        "is_palindrome",
        "text",
        ("cleaned = text.lower().replace(' ', '')", "return cleaned == cleaned[::-1]"),
        "lower-cases the text, drops spaces and checks whether it reads the same backwards",
        "",
    ),
    _Func(
        "load_config",
        "path",
        ("with open(path) as fh:", "    data = json.load(fh)", "return data"),
        "opens the file at path, parses it as JSON and returns the result",
        "data",
        ("json",),
    ),
    _Func(
        "average",
        "values",
        ("if not values:", "    return 0.0", "result = sum(values) / len(values)", "return result"),
        "returns the arithmetic mean of values, or 0.0 for an empty list",
        "result",
    ),
    _Func(
        "word_counts",
        "text",
        (
            "counts = {}",
            "for word in text.split():",
            "    counts[word] = counts.get(word, 0) + 1",
            "return counts",
        ),
        "counts how often each whitespace-separated word occurs and returns a dict",
        "counts",
    ),
    _Func(
        "clamp", "x, lo, hi", ("return max(lo, min(x, hi))",), "limits x to the range lo..hi", ""
    ),
    _Func(
        "fetch_user",
        "user_id",
        (
            "url = f'{API}/users/{user_id}'",
            "resp = requests.get(url, timeout=5)",
            "resp.raise_for_status()",
            "return resp.json()",
        ),
        "GETs /users/<id> from the API with a 5 s timeout, raises on HTTP errors and returns "
        "the decoded JSON",
        "",
        ("requests",),
    ),
    _Func(
        "chunks",
        "items, size",
        ("for start in range(0, len(items), size):", "    yield items[start:start + size]"),
        "yields consecutive slices of items, each at most size long",
        "",
    ),
    _Func(
        "slugify",
        "title",
        ("slug = re.sub(r'[^a-z0-9]+', '-', title.lower())", "return slug.strip('-')"),
        "turns a title into a lowercase, dash-separated slug",
        "",
        ("re",),
    ),
    _Func(
        "retry",
        "fn, attempts=3",
        (
            "for attempt in range(attempts):",
            "    try:",
            "        return fn()",
            "    except OSError:",
            "        time.sleep(2 ** attempt)",
            "raise RuntimeError('gave up')",
        ),
        "calls fn up to three times, backing off 1, 2 and 4 s after OSErrors, then gives up "
        "with RuntimeError",
        "",
        ("time",),
    ),
    _Func(
        "to_fahrenheit",
        "celsius",
        ("result = celsius * 9 / 5 + 32", "return result"),
        "converts a temperature from Celsius to Fahrenheit",
        "result",
    ),
    _Func(
        "flatten",
        "rows",
        ("out = []", "for row in rows:", "    out.extend(row)", "return out"),
        "concatenates a list of lists into one flat list",
        "out",
    ),
)


@dataclass(frozen=True)
class _Source:
    name: str
    lines: tuple[str, ...]
    funcs: tuple[tuple[_Func, int, int], ...]  # (func, first line, last line), 1-based
    imports: tuple[str, ...]
    error: tuple[int, str, str] | None  # (line, typo, intended name)


def _code_source(rng: random.Random, max_lines: int, want_error: bool) -> _Source:
    funcs = rng.sample(_FUNCS, len(_FUNCS))
    if want_error:
        funcs.sort(key=lambda f: f.ret == "")
    body: list[str] = []
    placed: list[tuple[_Func, int, int]] = []
    budget = max_lines - 7  # docstring, blank, up to four imports and a blank
    for f in funcs:
        block = ["", f"def {f.name}({f.params}):"] + [f"    {b}" for b in f.body]
        if placed and len(body) + len(block) > budget:
            break
        body += block
        placed.append((f, len(body) - len(block) + 2, len(body)))
    imports = tuple(sorted({m for f, _, _ in placed for m in f.imports}))
    head = [f'"""{rng.choice(("Helpers", "Utilities", "Core logic", "Shared tools"))}."""', ""]
    head += [f"import {m}" for m in imports] + ([""] if imports else [])
    lines = head + body
    placed = [(f, a + len(head), b + len(head)) for f, a, b in placed]
    error = None
    if want_error and placed[0][0].ret:
        f, _, last = placed[0]
        typo = f.ret[:-2] + f.ret[-1] if len(f.ret) > 3 else f.ret + f.ret[-1]
        lines[last - 1] = lines[last - 1].replace(f"return {f.ret}", f"return {typo}")
        error = (last, typo, f.ret)
    name = rng.choice(("utils.py", "helpers.py", "core.py", "tools.py", "app.py"))
    return _Source(name, tuple(lines), tuple(placed), imports, error)


def _tokens(line: str, th: _Theme) -> list[tuple[str, Color]]:
    """Split a Python line into colour runs (adjacent runs of one colour are merged)."""
    runs: list[tuple[str, Color]] = []
    prev_word = ""
    for m in _TOKEN_RE.finditer(line):
        kind, tok = m.lastgroup or "op", m.group()
        color = {"cm": th.cm, "st": th.st, "num": th.num}.get(kind, th.fg)
        if kind == "id":
            is_call = line[m.end() : m.end() + 1] == "("
            color = th.kw if tok in _KEYWORDS else th.fn if is_call or prev_word == "def" else th.fg
            prev_word = tok
        if runs and (runs[-1][1] == color or kind == "ws"):
            runs[-1] = (runs[-1][0] + tok, runs[-1][1])
        else:
            runs.append((tok, color))
    return runs


def _render_code_editor(ctx: _Ctx, box: Box) -> tuple[str, str]:
    rng, d, s = ctx.rng, ctx.draw, ctx.fs
    th = _THEMES[rng.randrange(len(_THEMES))]
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    d.rectangle(box, fill=_jit(th.bg, rng, 4))
    title_h, tab_h = round(s * 1.7), round(s * 2.3)
    status_h = max(round(s * 1.7), round(h * rng.uniform(0.045, 0.06)))
    act_w = round(s * 2.8)
    side_w = round(w * rng.uniform(0.16, 0.24)) if w >= 400 else 0
    kind = rng.choice(("explain", "error", "count", "cursor", "imports"))
    panel_h = round(h * rng.uniform(0.16, 0.24)) if kind == "error" else 0
    line_h = round(s * rng.uniform(1.35, 1.6))
    top, bottom = y0 + title_h + tab_h, y1 - status_h - panel_h
    src = _code_source(rng, max(4, (bottom - top - s) // line_h), kind == "error")
    cursor = (rng.randint(1, len(src.lines)), rng.randint(1, 20))
    d.rectangle((x0, y0, x1, y0 + title_h), fill=_mix(th.side, _BLACK, 0.25))
    ctx.text(
        ((x0 + x1) / 2, y0 + title_h / 2),
        f"{src.name} - project",
        (170, 170, 170),
        0.8,
        anchor="mm",
    )
    _code_sidebar(ctx, (x0, y0 + title_h, x0 + act_w + side_w, y1 - status_h), th, act_w, src.name)
    ex0 = x0 + act_w + side_w
    _code_tabs(ctx, (ex0, y0 + title_h, x1, top), th, src.name)
    _code_body(ctx, (ex0, top, x1, bottom), th, src, line_h)
    if panel_h and src.error:
        _code_problems(ctx, (ex0, bottom, x1, y1 - status_h), th, src.error)
    _code_status(ctx, (x0, y1 - status_h, x1, y1), th, cursor, bool(src.error))
    return _code_qa(rng, kind, src, cursor)


def _code_sidebar(ctx: _Ctx, box: Box, th: _Theme, act_w: int, active: str) -> None:
    x0, y0, x1, y1 = box
    d, s, rng = ctx.draw, ctx.fs, ctx.rng
    d.rectangle((x0, y0, x0 + act_w, y1), fill=_mix(th.side, _BLACK, 0.2))
    for k in range(5):
        cy = y0 + s * (1.6 + k * 2.6)
        d.rectangle(
            (x0 + act_w * 0.3, cy - s * 0.6, x0 + act_w * 0.7, cy + s * 0.6),
            outline=(150, 150, 150) if k else _WHITE,
            width=max(1, s // 8),
        )
    if x1 - x0 <= act_w:
        return
    d.rectangle((x0 + act_w, y0, x1, y1), fill=th.side)
    ctx.text((x0 + act_w + s * 0.8, y0 + s * 1.2), "EXPLORER", (187, 187, 187), 0.75)
    tree = [
        "v src",
        "  __init__.py",
        f"  {active}",
        "  models.py",
        "  api.py",
        "v tests",
        "  test_api.py",
        "  conftest.py",
        "README.md",
        "pyproject.toml",
        ".gitignore",
    ]
    y: float = y0 + s * 3
    for entry in tree:
        if y > y1 - s:
            break
        if entry.strip() == active:
            d.rectangle(
                (x0 + act_w, y - s * 0.75, x1, y + s * 0.75), fill=_mix(th.side, th.status, 0.35)
            )
        icon = (230, 200, 80) if entry.endswith(".py") else (120, 160, 220)
        if not entry.startswith("v"):
            d.rectangle(
                (
                    x0 + act_w + s * (1.2 + entry.count(" ") * 0.5),
                    y - s * 0.35,
                    x0 + act_w + s * (1.8 + entry.count(" ") * 0.5),
                    y + s * 0.35,
                ),
                fill=icon,
            )
        ctx.text(
            (x0 + act_w + s * (2.2 + entry.count(" ") * 0.5), y),
            entry.strip(" v"),
            (204, 204, 204),
            0.8,
            maxw=x1 - x0 - act_w - s * 3,
        )
        y += s * rng.uniform(1.5, 1.7)


def _code_tabs(ctx: _Ctx, box: Box, th: _Theme, active: str) -> None:
    x0, y0, x1, y1 = box
    d, s = ctx.draw, ctx.fs
    d.rectangle(box, fill=_mix(th.tabs, _BLACK, 0.15))
    x: float = x0
    for k, name in enumerate([active] + ctx.rng.sample(["models.py", "api.py", "README.md"], 2)):
        tw = ctx.font(0.85).getlength(name) + s * 3
        if x + tw > x1:
            break
        if k == 0:
            d.rectangle((x, y0, x + tw, y1), fill=th.bg)
            d.line((x, y0, x + tw, y0), fill=th.status, width=2)
        ctx.text((x + s, (y0 + y1) / 2), name, (230, 230, 230) if k == 0 else (140, 140, 140), 0.85)
        x += tw + 1


def _code_body(ctx: _Ctx, box: Box, th: _Theme, src: _Source, line_h: int) -> None:
    x0, y0, x1, y1 = box
    d, s = ctx.draw, ctx.fs
    gut = s * 3.2
    mini = s * 4 if x1 - x0 > s * 40 else 0
    y = y0 + s * 0.4 + line_h / 2
    for n, line in enumerate(src.lines, start=1):
        if y > y1:
            break
        ctx.text((x0 + gut - s * 0.8, y), str(n), (110, 118, 129), 0.85, anchor="rm")
        x = x0 + gut
        for text, color in _tokens(line, th):
            x += ctx.text((x, y), text, color, 0.9, maxw=x1 - mini - x)
        if src.error and src.error[0] == n:
            _squiggle(d, x - ctx.font(0.9).getlength(src.error[1]), x, y + s * 0.6)
        if mini:
            mw = min(mini - 4, len(line) * 0.5)
            d.rectangle(
                (x1 - mini + 2, y0 + n * 2, x1 - mini + 2 + mw, y0 + n * 2 + 1),
                fill=_mix(th.bg, th.fg, 0.35),
            )
        y += line_h


def _squiggle(d: ImageDraw.ImageDraw, xa: float, xb: float, y: float) -> None:
    pts = [(xa + k * 2, y + (k % 2) * 2) for k in range(int((xb - xa) / 2) + 1)]
    if len(pts) > 1:
        d.line(pts, fill=(240, 70, 70), width=1)


def _code_problems(ctx: _Ctx, box: Box, th: _Theme, error: tuple[int, str, str]) -> None:
    x0, y0, x1, _ = box
    d, s = ctx.draw, ctx.fs
    d.rectangle(box, fill=_mix(th.bg, _BLACK, 0.2))
    d.line((x0, y0, x1, y0), fill=(80, 80, 80))
    ctx.text((x0 + s, y0 + s), "PROBLEMS   OUTPUT   TERMINAL", (200, 200, 200), 0.75)
    cy = y0 + s * 2.6
    d.ellipse((x0 + s, cy - s * 0.4, x0 + s * 1.8, cy + s * 0.4), fill=(240, 70, 70))
    ctx.text(
        (x0 + s * 2.4, cy),
        f'"{error[1]}" is not defined  [Ln {error[0]}, Col 12]',
        (220, 220, 220),
        0.8,
        maxw=x1 - x0 - s * 3,
    )


def _code_status(ctx: _Ctx, box: Box, th: _Theme, cursor: tuple[int, int], err: bool) -> None:
    x0, y0, x1, y1 = box
    ctx.draw.rectangle(box, fill=_jit(th.status, ctx.rng, 8))
    cy = (y0 + y1) / 2
    s = ctx.fs
    ctx.text((x0 + s, cy), f"main   {'x 1' if err else 'x 0'}  ! 0", _WHITE, 0.8)
    ctx.text(
        (x1 - s, cy),
        f"Ln {cursor[0]}, Col {cursor[1]}   UTF-8   Python",
        _WHITE,
        0.8,
        anchor="rm",
        maxw=(x1 - x0) * 0.55,
    )


def _code_qa(
    rng: random.Random, kind: str, src: _Source, cursor: tuple[int, int]
) -> tuple[str, str]:
    names = [f"{f.name}()" for f, _, _ in src.funcs]
    if kind == "error" and src.error:
        line, typo, real = src.error
        q = rng.choice((f"Why is line {line} underlined in red?", "What's this error about?"))
        return q, (
            f"Line {line} returns `{typo}`, which is never defined; it's a misspelling of "
            f"`{real}`, so calling it would raise NameError."
        )
    if kind == "count":
        q = rng.choice(("How many functions are in this file?", "What functions does this define?"))
        return q, f"{src.name} defines {len(names)}: {_join(names)}."
    if kind == "imports" and src.imports:
        q = rng.choice(("What does this file import?", "Which modules does this depend on?"))
        return q, f"At the top, {src.name} imports {_join(list(src.imports))}."
    if kind == "cursor":
        inside = [f.name for f, a, b in src.funcs if a <= cursor[0] <= b]
        where = f"inside {inside[0]}()" if inside else "outside any function"
        q = rng.choice(("Where is my cursor?", "Which line am I on?"))
        return q, f"You're on line {cursor[0]}, column {cursor[1]} of {src.name}, {where}."
    f = rng.choice(src.funcs)[0]
    q = rng.choice((f"What does {f.name} do?", f"Can you explain {f.name}()?"))
    return q, rng.choice((f"`{f.name}({f.params})` {f.does}.", f"This function {f.does}."))


# --------------------------------------------------------------------------- map

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
        return f"about {self.dist(x, y)} to the {_compass(x - self.me[0], y - self.me[1])}"


def _render_map(ctx: _Ctx, box: Box) -> tuple[str, str]:
    rng, d, s = ctx.rng, ctx.draw, ctx.fs
    x0, y0, x1, y1 = box
    d.rectangle(box, fill=_jit(rng.choice(_LAND), rng, 4))
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


def _map_areas(ctx: _Ctx, box: Box) -> list[tuple[str, str, float, float]]:
    rng, d = ctx.rng, ctx.draw
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    water = _jit(_WATER, rng, 8)
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
        d.rounded_rectangle((px, py, px + pw, py + ph), radius=ctx.fs, fill=_jit(_PARK, rng, 10))
        areas.append(("park", name, px + pw / 2, py + ph / 2))
    return areas


def _map_area_labels(ctx: _Ctx, areas: list[tuple[str, str, float, float]]) -> None:
    for kind, name, cx, cy in areas:
        col = (40, 100, 160) if kind == "water" else (50, 120, 60)
        ctx.draw.text(
            (cx, cy),
            name,
            fill=col,
            font=ctx.font(0.85),
            anchor="mm",
            stroke_width=1,
            stroke_fill=_mix(col, _WHITE, 0.8),
        )


def _pick_mid(rng: random.Random, vals: list[int], lo: float, hi: float) -> int:
    """Pick the index of a value in ``[lo, hi]`` (or the one closest to the middle)."""
    mids = [k for k, v in enumerate(vals) if lo <= v <= hi]
    if not mids:
        mids = [min(range(len(vals)), key=lambda k: abs(vals[k] - (lo + hi) / 2))]
    return rng.choice(mids)


def _map_blocks(ctx: _Ctx, vx: list[int], hy: list[int]) -> None:
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


def _map_roads(ctx: _Ctx, box: Box, vx: list[int], hy: list[int]) -> None:
    rng, d, s = ctx.rng, ctx.draw, ctx.fs
    x0, y0, x1, y1 = box
    minor = max(3, round(s * 0.45))
    major_col = _jit((252, 214, 110), rng, 8)
    major_v, major_h = rng.choice(vx), rng.choice(hy)
    for x in vx:
        wid = minor * 2 if x == major_v else minor
        d.line((x, y0, x, y1), fill=(205, 205, 205), width=wid + 2)
        d.line((x, y0, x, y1), fill=major_col if x == major_v else _WHITE, width=wid)
    for y in hy:
        wid = minor * 2 if y == major_h else minor
        d.line((x0, y, x1, y), fill=(205, 205, 205), width=wid + 2)
        d.line((x0, y, x1, y), fill=major_col if y == major_h else _WHITE, width=wid)
    if rng.random() < 0.6:
        pts = [(x0, y0 + (y1 - y0) * rng.uniform(0, 1)), (x1, y0 + (y1 - y0) * rng.uniform(0, 1))]
        d.line(pts, fill=(230, 160, 60), width=minor * 3)


def _map_pois(ctx: _Ctx, box: Box, me: tuple[float, float]) -> list[_Poi]:
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
        d.ellipse((p.x - r * 0.35, p.y - r * 2.35, p.x + r * 0.35, p.y - r * 1.65), fill=_WHITE)
        ctx.draw.text(
            (p.x + r * 1.4, p.y - r * 2),
            p.name,
            fill=(150, 40, 30),
            font=ctx.font(0.8),
            anchor="lm",
            stroke_width=2,
            stroke_fill=_WHITE,
        )
    return pois


def _map_me(ctx: _Ctx, me: tuple[float, float]) -> None:
    d, s = ctx.draw, ctx.fs
    x, y = me
    for r, col in ((s * 2.2, (200, 218, 248)), (s * 0.85, _WHITE), (s * 0.6, (66, 133, 244))):
        d.ellipse((x - r, y - r, x + r, y + r), fill=col)


def _map_overlays(ctx: _Ctx, box: Box) -> None:
    rng, d, s = ctx.rng, ctx.draw, ctx.fs
    x0, y0, x1, y1 = box
    sw = (x1 - x0) * rng.uniform(0.35, 0.5)
    sb = (x0 + s, y0 + s, x0 + s + sw, y0 + s * 3.6)
    d.rounded_rectangle(
        (sb[0] + 1, sb[1] + 2, sb[2] + 1, sb[3] + 2), radius=s, fill=(190, 190, 190)
    )
    d.rounded_rectangle(sb, radius=s, fill=_WHITE)
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
            fill=_WHITE,
            outline=(200, 200, 200),
        )
        ctx.text((x + s * 0.8, sb[3] + s * 1.4), chip, (60, 60, 60), 0.8)
        x += cw + s * 0.5
    bx = x1 - s * 3.2
    for k, sym in enumerate(("+", "-")):
        by = y1 - s * (6.6 - k * 2.6)
        d.rectangle((bx, by, bx + s * 2.4, by + s * 2.4), fill=_WHITE, outline=(200, 200, 200))
        ctx.text((bx + s * 1.2, by + s * 1.2), sym, (80, 80, 80), 1.4, anchor="mm")


def _map_scale(ctx: _Ctx, at: tuple[float, float], meters: int, px: float) -> None:
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


# --------------------------------------------------------------------------- screen & clutter

_Renderer = Callable[[_Ctx, Box], tuple[str, str]]
_RENDERERS: dict[str, _Renderer] = {
    "calendar": _render_calendar,
    "spreadsheet": _render_spreadsheet,
    "terminal": _render_terminal,
    "email": _render_email,
    "code_editor": _render_code_editor,
    "map": _render_map,
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


def _screen_size(rng: random.Random) -> tuple[int, int]:
    w = rng.randint(320, 1280)
    h = round(w / rng.choice(_ASPECTS))
    return w, min(800, max(240, h))


def _desktop(ctx: _Ctx, w: int, h: int) -> Box:
    """Maybe draw a wallpaper with a window on it; return the app's window box."""
    rng, d = ctx.rng, ctx.draw
    if rng.random() > 0.2:
        return (0, 0, w, h)
    top, bottom = rng.choice(_WALLPAPERS)
    top, bottom = _jit(top, rng, 15), _jit(bottom, rng, 15)
    band = 8
    for y in range(0, h, band):
        d.rectangle((0, y, w, y + band), fill=_mix(top, bottom, y / h))
    mx0, mx1 = round(w * rng.uniform(0.015, 0.06)), round(w * rng.uniform(0.015, 0.06))
    my0, my1 = round(h * rng.uniform(0.015, 0.06)), round(h * rng.uniform(0.03, 0.08))
    if rng.random() < 0.5:
        d.rectangle((0, h - max(12, h // 22), w, h), fill=(32, 32, 36))
    box = (mx0, my0, w - mx1, h - my1)
    d.rectangle((box[0] + 4, box[1] + 6, box[2] + 4, box[3] + 6), fill=_mix(bottom, _BLACK, 0.5))
    return box


def _clutter(ctx: _Ctx, w: int, h: int) -> None:
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


def _toast(ctx: _Ctx, w: int, h: int) -> None:
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


def _cursor(ctx: _Ctx, x: float, y: float) -> None:
    k = ctx.fs / 12
    pts = [(0, 0), (0, 17), (4, 13), (7, 20), (10, 19), (7, 12), (12, 12)]
    ctx.draw.polygon([(x + px * k, y + py * k) for px, py in pts], fill=_WHITE, outline=_BLACK)


# --------------------------------------------------------------------------- public API


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
    w, h = _screen_size(rng)
    img = Image.new("RGB", (w, h), _WHITE)
    fs = max(8, min(16, round(min(w / 75, h / 46) * rng.uniform(0.85, 1.15))))
    ctx = _Ctx(ImageDraw.Draw(img), rng, fs)
    box = _desktop(ctx, w, h)
    instruction, answer = renderer(ctx, box)
    _clutter(ctx, w, h)
    leaked = _FORBIDDEN_RE.search(answer)
    if leaked:
        raise RuntimeError(f"answer for {expert!r} mentions {leaked.group()!r}: {answer}")
    return Sample(img, instruction, answer)


def _sample_rng(seed: int, expert: str, i: int) -> random.Random:
    digest = hashlib.sha256(f"{seed}:{expert}:{i}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _write_expert(out: Path, expert: str, per_expert: int, seed: int) -> int:
    tmp = out / f".{expert}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        ds = tmp / "datasets"
        (ds / "images").mkdir(parents=True)
        lines = []
        for i in range(per_expert):
            sample = render_sample(expert, _sample_rng(seed, expert, i))
            rel = f"images/{i:05d}.png"
            sample.image.save(
                ds / rel, format="PNG", optimize=False, compress_level=_PNG_COMPRESS_LEVEL
            )
            record = {
                "id": f"{expert}-{seed}-{i:05d}",
                "image": rel,
                "messages": [
                    {"role": "user", "content": sample.instruction},
                    {"role": "assistant", "content": sample.answer},
                ],
            }
            lines.append(json.dumps(record, ensure_ascii=False))
        (ds / "demo.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        _swap_in(tmp, out / expert)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return per_expert


def _swap_in(new: Path, final: Path) -> None:
    """Move the completed ``new`` folder to ``final``, replacing any previous version."""
    if not final.exists():
        os.replace(new, final)
        return
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    try:
        os.replace(new, final)
    except BaseException:
        os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_demo_data(
    out: Path, per_expert: int, seed: int, experts: Sequence[str] = EXPERTS
) -> dict[str, int]:
    """Write ``per_expert`` samples for every expert under ``out``.

    Each expert gets ``<out>/<expert>/datasets/demo.jsonl`` plus ``images/NNNNN.png`` next to
    it. Every expert folder is built in a hidden temporary sibling and moved into place only
    when complete, replacing an existing folder; on error the temporary folder is removed.

    Args:
        out: Root folder (created if missing).
        per_expert: Samples per expert, at least 1.
        seed: Base seed; sample ``i`` of ``expert`` depends only on ``(seed, expert, i)``.
        experts: Which experts to write (each must be in ``EXPERTS``).

    Returns:
        Number of samples written per expert.

    Raises:
        ValueError: If ``per_expert < 1`` or an expert is unknown.

    """
    if per_expert < 1:
        raise ValueError(f"per_expert must be at least 1, got {per_expert}")
    unknown = [e for e in experts if e not in _RENDERERS]
    if unknown:
        raise ValueError(f"unknown expert(s) {unknown}; known experts: {', '.join(EXPERTS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return {e: _write_expert(out, e, per_expert, seed) for e in dict.fromkeys(experts)}


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: write a demo data set and print the counts."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True, help="output root folder")
    parser.add_argument("--per-expert", type=int, default=100, help="samples per expert")
    parser.add_argument("--seed", type=int, default=0, help="base random seed")
    parser.add_argument("--experts", nargs="+", default=list(EXPERTS), choices=EXPERTS)
    args = parser.parse_args(argv)
    counts = write_demo_data(args.out, args.per_expert, args.seed, args.experts)
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
