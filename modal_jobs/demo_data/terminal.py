"""Synthetic terminal: a dark shell window with scripted command scenarios."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from modal_jobs.demo_data.draw import (
    Box,
    Color,
    Ctx,
    Font,
    jit,
    join_words,
)

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
    a = f"On branch {branch}, git reports {len(changed)} modified: {join_words(changed)}"
    if untracked:
        a += f", plus {len(untracked)} untracked: {join_words(untracked)}"
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


def render_terminal(ctx: Ctx, box: Box) -> tuple[str, str]:
    """Draw a shell session into `box`; return an instruction and its answer."""
    rng, d, s = ctx.rng, ctx.draw, ctx.fs
    x0, y0, x1, y1 = box
    bg = jit(rng.choice(((8, 8, 8), (0, 0, 0), (12, 12, 12), (4, 10, 4))), rng, 4)
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


def _term_wrap(lines: list[_TLine], font: Font, maxw: float) -> list[_TLine]:
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
        "fg": jit(fg, rng, 8),
        "prompt": jit(rng.choice(((138, 226, 52), (80, 250, 123), (95, 215, 95))), rng, 8),
        "path": jit((114, 159, 207), rng, 10),
        "err": jit((240, 80, 80), rng, 10),
        "ok": jit((90, 220, 110), rng, 10),
    }


def _term_titlebar(ctx: Ctx, box: Box, title: str) -> None:
    x0, y0, x1, y1 = box
    d, s, rng = ctx.draw, ctx.fs, ctx.rng
    light = rng.random() < 0.35
    d.rectangle(box, fill=jit((222, 222, 222) if light else (48, 48, 50), rng, 6))
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
