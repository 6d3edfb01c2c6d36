"""Synthetic code editor: themed sidebar, tabs, highlighted source and a problems panel."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from PIL import ImageDraw

from modal_jobs.demo_data.draw import (
    BLACK,
    WHITE,
    Box,
    Color,
    Ctx,
    jit,
    join_words,
    mix,
)


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


def render_code_editor(ctx: Ctx, box: Box) -> tuple[str, str]:
    """Draw an editor window into `box`; return an instruction and its answer."""
    rng, d, s = ctx.rng, ctx.draw, ctx.fs
    th = _THEMES[rng.randrange(len(_THEMES))]
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    d.rectangle(box, fill=jit(th.bg, rng, 4))
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
    d.rectangle((x0, y0, x1, y0 + title_h), fill=mix(th.side, BLACK, 0.25))
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


def _code_sidebar(ctx: Ctx, box: Box, th: _Theme, act_w: int, active: str) -> None:
    x0, y0, x1, y1 = box
    d, s, rng = ctx.draw, ctx.fs, ctx.rng
    d.rectangle((x0, y0, x0 + act_w, y1), fill=mix(th.side, BLACK, 0.2))
    for k in range(5):
        cy = y0 + s * (1.6 + k * 2.6)
        d.rectangle(
            (x0 + act_w * 0.3, cy - s * 0.6, x0 + act_w * 0.7, cy + s * 0.6),
            outline=(150, 150, 150) if k else WHITE,
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
                (x0 + act_w, y - s * 0.75, x1, y + s * 0.75), fill=mix(th.side, th.status, 0.35)
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


def _code_tabs(ctx: Ctx, box: Box, th: _Theme, active: str) -> None:
    x0, y0, x1, y1 = box
    d, s = ctx.draw, ctx.fs
    d.rectangle(box, fill=mix(th.tabs, BLACK, 0.15))
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


def _code_body(ctx: Ctx, box: Box, th: _Theme, src: _Source, line_h: int) -> None:
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
                fill=mix(th.bg, th.fg, 0.35),
            )
        y += line_h


def _squiggle(d: ImageDraw.ImageDraw, xa: float, xb: float, y: float) -> None:
    pts = [(xa + k * 2, y + (k % 2) * 2) for k in range(int((xb - xa) / 2) + 1)]
    if len(pts) > 1:
        d.line(pts, fill=(240, 70, 70), width=1)


def _code_problems(ctx: Ctx, box: Box, th: _Theme, error: tuple[int, str, str]) -> None:
    x0, y0, x1, _ = box
    d, s = ctx.draw, ctx.fs
    d.rectangle(box, fill=mix(th.bg, BLACK, 0.2))
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


def _code_status(ctx: Ctx, box: Box, th: _Theme, cursor: tuple[int, int], err: bool) -> None:
    x0, y0, x1, y1 = box
    ctx.draw.rectangle(box, fill=jit(th.status, ctx.rng, 8))
    cy = (y0 + y1) / 2
    s = ctx.fs
    ctx.text((x0 + s, cy), f"main   {'x 1' if err else 'x 0'}  ! 0", WHITE, 0.8)
    ctx.text(
        (x1 - s, cy),
        f"Ln {cursor[0]}, Col {cursor[1]}   UTF-8   Python",
        WHITE,
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
        return q, f"{src.name} defines {len(names)}: {join_words(names)}."
    if kind == "imports" and src.imports:
        q = rng.choice(("What does this file import?", "Which modules does this depend on?"))
        return q, f"At the top, {src.name} imports {join_words(list(src.imports))}."
    if kind == "cursor":
        inside = [f.name for f, a, b in src.funcs if a <= cursor[0] <= b]
        where = f"inside {inside[0]}()" if inside else "outside any function"
        q = rng.choice(("Where is my cursor?", "Which line am I on?"))
        return q, f"You're on line {cursor[0]}, column {cursor[1]} of {src.name}, {where}."
    f = rng.choice(src.funcs)[0]
    q = rng.choice((f"What does {f.name} do?", f"Can you explain {f.name}()?"))
    return q, rng.choice((f"`{f.name}({f.params})` {f.does}.", f"This function {f.does}."))
