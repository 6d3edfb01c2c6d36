"""Synthetic spreadsheet app: a green ribbon, formula bar, cell grid, charts and sheet tabs."""

from __future__ import annotations

import random
from dataclasses import dataclass

from modal_jobs.demo_data.draw import (
    BLACK,
    MONTHS,
    WHITE,
    Box,
    Color,
    Ctx,
    jit,
    mix,
)

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
    ("Month", tuple(f"{m[:3]} {y}" for y in (2023, 2024) for m in MONTHS)),
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


def render_spreadsheet(ctx: Ctx, box: Box) -> tuple[str, str]:
    """Draw a sheet into `box`; return an instruction and its answer."""
    rng, s = ctx.rng, ctx.fs
    green = jit(rng.choice(_SHEET_GREENS), rng, 10)
    x0, y0, x1, y1 = box
    ctx.draw.rectangle(box, fill=WHITE)
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


def _sheet_ribbon(ctx: Ctx, box: Box, green: Color) -> int:
    """Draw title strip, ribbon tabs and toolbar; return the y below them."""
    x0, y0, x1, y1 = box
    d, s, rng = ctx.draw, ctx.fs, ctx.rng
    title_h = max(round(s * rng.uniform(1.9, 2.4)), round((y1 - y0) * rng.uniform(0.05, 0.07)))
    d.rectangle((x0, y0, x1, y0 + title_h), fill=mix(green, BLACK, 0.15))
    name = rng.choice(("Q3_sales", "budget_2024", "inventory", "team_report", "forecast"))
    ctx.text((x0 + s, y0 + title_h / 2), f"{name}.xlsx", WHITE, maxw=x1 - x0 - 2 * s)
    tab_h = max(round(s * 1.8), round((y1 - y0) * rng.uniform(0.05, 0.07)))
    y = y0 + title_h
    d.rectangle((x0, y, x1, y + tab_h), fill=green)
    x: float = x0 + s
    for name in ("File", "Home", "Insert", "Formulas", "Data", "Review", "View"):
        if x > x1 - s * 4:
            break
        x += ctx.text((x, y + tab_h / 2), name, WHITE, 0.85) + s * 1.3
    y += tab_h
    tool_h = round(s * rng.uniform(2.2, 3.2))
    d.rectangle((x0, y, x1, y + tool_h), fill=mix(green, WHITE, rng.uniform(0.86, 0.92)))
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


def _sheet_formula_bar(ctx: Ctx, box: Box, view: _SheetView) -> None:
    x0, y0, x1, y1 = box
    d, s = ctx.draw, ctx.fs
    d.rectangle(box, fill=WHITE)
    d.line((x0, y1 - 1, x1, y1 - 1), fill=(210, 210, 210))
    cy = (y0 + y1) / 2
    ref = f"{_col_letter(view.sel[0])}{view.sel[1]}"
    d.rectangle((x0 + 2, y0 + 2, x0 + s * 5, y1 - 3), outline=(200, 200, 200))
    ctx.text((x0 + s * 0.5, cy), ref, (40, 40, 40), 0.85)
    ctx.text((x0 + s * 6, cy), "fx", (120, 120, 120), 0.85)
    ctx.text((x0 + s * 8, cy), view.content, (30, 30, 30), 0.9, maxw=x1 - x0 - s * 9)


def _sheet_grid(ctx: Ctx, box: Box, cols: list[int], rows: list[int], green: Color) -> None:
    x0, y0, x1, y1 = box
    d = ctx.draw
    head = (236, 236, 236)
    d.rectangle((x0, y0, x1, rows[1]), fill=head)
    d.rectangle((x0, y0, cols[0], y1), fill=head)
    line = jit((214, 214, 214), ctx.rng, 4)
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
    d.line((x0, rows[1], x1, rows[1]), fill=mix(green, WHITE, 0.3))


def _sheet_fill(
    ctx: Ctx, cols: list[int], rows: list[int], table: _Table, style: Color | None
) -> None:
    """Write the table into the grid, optionally styled as a green banded table."""
    ink: Color = (30, 30, 30)
    last = len(table.headers) + 1
    if style is not None:
        band = mix(style, WHITE, ctx.rng.uniform(0.72, 0.82))
        for r in range(1, len(table.names) + 3):
            fill = style if r == 1 else band if r % 2 else WHITE
            ctx.draw.rectangle(
                (cols[0] + 1, rows[r] + 1, cols[last] - 1, rows[r + 1] - 1), fill=fill
            )

    def put(j: int, r: int, text: str, right: bool, bold: bool = False) -> None:
        cy = (rows[r] + rows[r + 1]) / 2
        width = cols[j + 1] - cols[j] - 6
        fg = WHITE if style is not None and r == 1 else ink
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
    ctx: Ctx, cols: list[int], rows: list[int], sel: tuple[int, int], green: Color
) -> None:
    j, r = sel
    ctx.draw.rectangle(
        (cols[j] - 1, rows[r] - 1, cols[j + 1] + 1, rows[r + 1] + 1), outline=green, width=2
    )
    ctx.draw.rectangle((cols[j], rows[0], cols[j + 1], rows[1]), outline=green)


def _sheet_chart(ctx: Ctx, cols: list[int], rows: list[int], table: _Table, bottom: int) -> None:
    rng, d, s = ctx.rng, ctx.draw, ctx.fs
    first_free = len(table.headers) + 2
    if len(cols) - first_free < 4 or len(rows) < 8 or rng.random() < 0.25:
        return
    x0, x1 = cols[first_free] + s, min(cols[-1] - s, cols[first_free] + s * 30)
    y0, y1 = rows[2], min(bottom - s, rows[2] + round((x1 - x0) * rng.uniform(0.55, 0.8)))
    d.rectangle((x0 + 3, y0 + 3, x1 + 3, y1 + 3), fill=(225, 225, 225))
    d.rectangle((x0, y0, x1, y1), fill=WHITE, outline=(190, 190, 190))
    j = rng.randrange(len(table.headers))
    ctx.text(((x0 + x1) / 2, y0 + s * 1.2), table.headers[j], (60, 60, 60), 0.9, anchor="mm")
    vals = table.column(j)
    color = jit(rng.choice(((112, 173, 71), (52, 168, 83), (33, 115, 70), (91, 155, 213))), rng)
    base, top = y1 - s, y0 + s * 2.4
    step = (x1 - x0 - 2 * s) / len(vals)
    for k, v in enumerate(vals):
        bx = x0 + s + k * step
        d.rectangle(
            (bx + step * 0.15, base - (base - top) * v / max(vals), bx + step * 0.85, base),
            fill=color,
        )
    d.line((x0 + s, base, x1 - s, base), fill=(150, 150, 150))


def _sheet_tabs(ctx: Ctx, box: Box, green: Color) -> None:
    x0, y0, x1, y1 = box
    d, s = ctx.draw, ctx.fs
    d.rectangle(box, fill=(240, 240, 240))
    d.line((x0, y0, x1, y0), fill=(200, 200, 200))
    x = x0 + s * 2.5
    for k, name in enumerate(("Sheet1", "Sheet2", "Summary")[: ctx.rng.randint(1, 3)]):
        w = ctx.font(0.85).getlength(name) + s * 1.6
        if k == 0:
            d.rectangle((x, y0, x + w, y1), fill=WHITE)
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
