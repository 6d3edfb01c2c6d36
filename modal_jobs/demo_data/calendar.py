"""Synthetic calendar app: a month grid with coloured event chips and a mini-month sidebar."""

from __future__ import annotations

import calendar as _calmod
import datetime as dt
import random
from collections.abc import Callable
from dataclasses import dataclass

from modal_jobs.demo_data.draw import (
    MONTHS,
    WEEKDAYS,
    WHITE,
    Box,
    Color,
    Ctx,
    jit,
    join_words,
    mix,
)

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
        wd = WEEKDAYS[dt.date(self.year, self.month, day).weekday()]
        return f"{wd}, {MONTHS[self.month - 1]} {day}"


def render_calendar(ctx: Ctx, box: Box) -> tuple[str, str]:
    """Draw a month view into `box`; return an instruction and its answer."""
    rng = ctx.rng
    year, month = rng.randint(2023, 2026), rng.randint(1, 12)
    today = rng.randint(1, _calmod.monthrange(year, month)[1])
    first = rng.choice((0, 6))
    accent = jit(rng.choice(_CAL_ACCENTS), rng, 12)
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    ctx.draw.rectangle(box, fill=jit((252, 252, 253), rng, 3))
    head_h = max(round(ctx.fs * 2.4), round(h * rng.uniform(0.11, 0.15)))
    _cal_header(ctx, (x0, y0, x1, y0 + head_h), accent, f"{MONTHS[month - 1]} {year}")
    side_w = round(w * rng.uniform(0.17, 0.24)) if w >= 480 and rng.random() < 0.8 else 0
    if side_w:
        _cal_sidebar(ctx, (x0, y0 + head_h, x0 + side_w, y1), accent, (year, month, today))
    grid = (x0 + side_w, y0 + head_h, x1, y1)
    events = _cal_month_grid(ctx, grid, accent, (year, month, today, first))
    return _calendar_qa(rng, _CalInfo(year, month, today, first, tuple(events)))


def _cal_header(ctx: Ctx, box: Box, accent: Color, title: str) -> None:
    x0, y0, x1, y1 = box
    d, s = ctx.draw, ctx.fs
    d.rectangle(box, fill=accent)
    cy = (y0 + y1) / 2
    for k in (-1, 0, 1):
        yy = cy + k * s * 0.4
        d.line((x0 + s, yy, x0 + s * 2.2, yy), fill=WHITE, width=max(1, s // 7))
    x = x0 + s * 3.2
    tw = ctx.font().getlength("Today")
    d.rounded_rectangle((x, cy - s * 0.9, x + tw + s, cy + s * 0.9), radius=s // 3, outline=WHITE)
    ctx.text((x + s / 2, cy), "Today", WHITE)
    x += tw + s * 2
    ctx.text((x, cy), "<  >", WHITE, scale=1.1)
    x += s * 3
    ctx.text((x, cy), title, WHITE, scale=1.4, maxw=x1 - x - s * 8, bold=True)
    bw = ctx.font().getlength("Month") + s
    d.rounded_rectangle(
        (x1 - s * 3.5 - bw, cy - s * 0.9, x1 - s * 3.5, cy + s * 0.9),
        radius=s // 3,
        fill=mix(accent, WHITE, 0.25),
    )
    ctx.text((x1 - s * 3 - bw, cy), "Month", WHITE)
    d.ellipse((x1 - s * 2.4, cy - s * 0.8, x1 - s * 0.8, cy + s * 0.8), fill=(240, 160, 60))


def _cal_sidebar(ctx: Ctx, box: Box, accent: Color, ymd: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    d, s, rng = ctx.draw, ctx.fs, ctx.rng
    d.rectangle(box, fill=mix(accent, WHITE, rng.uniform(0.88, 0.93)))
    d.line((x1 - 1, y0, x1 - 1, y1), fill=(210, 214, 222))
    pad = s * 0.8
    by = y0 + s * 1.2
    d.rounded_rectangle(
        (x0 + pad, by, x1 - pad, by + s * 2.4), radius=s, fill=WHITE, outline=(200, 204, 212)
    )
    ctx.text((x0 + pad + s * 0.8, by + s * 1.2), "+  Create", accent, maxw=x1 - x0 - 2 * pad - s)
    y = by + s * 3.6
    year, month, today = ymd
    ctx.text(
        (x0 + pad, y),
        f"{MONTHS[month - 1]} {year}",
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
    ctx: Ctx, box: Box, accent: Color, spec: tuple[int, int, int, int]
) -> list[_Event]:
    year, month, today, first = spec
    weeks = _calmod.Calendar(first).monthdatescalendar(year, month)
    while len(weeks) < 5:
        weeks.append([d + dt.timedelta(days=7) for d in weeks[-1]])
    x0, y0, x1, y1 = box
    wd_h = round(ctx.fs * 1.9)
    names = WEEKDAYS[first:] + WEEKDAYS[:first]
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


def _cal_cell(ctx: Ctx, cb: Box, day: dt.date, month_today: tuple[int, int], accent: Color) -> None:
    d, s = ctx.draw, ctx.fs
    inside = day.month == month_today[0]
    fill = WHITE if inside else (242, 243, 246)
    if inside and day.weekday() >= 5:
        fill = mix(accent, WHITE, 0.92)
    d.rectangle(cb, fill=fill, outline=(218, 220, 224))
    pos = (cb[0] + s * 0.9, cb[1] + s * 0.85)
    if inside and day.day == month_today[1]:
        d.ellipse(
            (pos[0] - s * 0.75, pos[1] - s * 0.75, pos[0] + s * 0.75, pos[1] + s * 0.75),
            fill=accent,
        )
        ctx.text(pos, str(day.day), WHITE, 0.8, anchor="mm")
        return
    ctx.text(pos, str(day.day), (60, 64, 67) if inside else (170, 172, 176), 0.8, anchor="mm")


def _cal_place_events(ctx: Ctx, cells: dict[int, Box], cell_h: float) -> list[_Event]:
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


def _cal_chip(ctx: Ctx, box: Box, ev: _Event) -> None:
    rng = ctx.rng
    color = jit(rng.choice(_EVENT_COLORS), rng, 8)
    x0, y0, x1, y1 = box
    label = f"{ev.time} {ev.title}" if rng.random() < 0.6 else ev.title
    if rng.random() < 0.75:
        ctx.draw.rounded_rectangle(box, radius=max(1, (y1 - y0) // 4), fill=color)
        if y1 - y0 >= 8:
            ctx.text((x0 + 3, (y0 + y1) / 2), label, WHITE, 0.75, maxw=x1 - x0 - 5)
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
    short = f"{MONTHS[info.month - 1]} {day}"
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
    items = join_words([f"{e.title} at {e.time}" for e in evs])
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
    mname = MONTHS[info.month - 1]
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
    names = [f"{WEEKDAYS[d.weekday()]} the {d.day}" for d in free]
    return q, f"This week you're free on {join_words(names)}."


def _cal_find_qa(rng: random.Random, info: _CalInfo) -> tuple[str, str]:
    title = rng.choice(info.events).title
    occ = [e for e in info.events if e.title == title]
    q = rng.choice(
        (f"When is {title}?", f"When do I have {title} this month?", f"What day is {title} on?")
    )
    if len(occ) == 1:
        return q, f"{title} is on {info.label(occ[0].day)} at {occ[0].time}."
    when = join_words([f"{info.label(e.day)} at {e.time}" for e in occ])
    return q, f"{title} shows up {len(occ)} times this month: {when}."
