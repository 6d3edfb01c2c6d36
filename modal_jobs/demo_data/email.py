"""Synthetic email client: folder list, message list and a reading pane."""

from __future__ import annotations

import random
from dataclasses import dataclass

from modal_jobs.demo_data.draw import (
    WHITE,
    Box,
    Color,
    Ctx,
    jit,
    join_words,
    mix,
    wrap,
)

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


def render_email(ctx: Ctx, box: Box) -> tuple[str, str]:
    """Draw a mail client into `box`; return an instruction and its answer."""
    rng, d, s = ctx.rng, ctx.draw, ctx.fs
    x0, y0, x1, y1 = box
    w = x1 - x0
    accent = jit(rng.choice(_MAIL_ACCENTS), rng, 10)
    d.rectangle(box, fill=WHITE)
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


def _mail_topbar(ctx: Ctx, box: Box, accent: Color) -> None:
    x0, y0, x1, y1 = box
    d, s = ctx.draw, ctx.fs
    d.rectangle(box, fill=accent)
    cy = (y0 + y1) / 2
    ctx.text((x0 + s, cy), "Mail", WHITE, 1.3, bold=True)
    sx0, sx1 = x0 + s * 6, min(x1 - s * 4, x0 + (x1 - x0) * 0.6)
    if sx1 > sx0 + s * 4:
        d.rounded_rectangle(
            (sx0, cy - s * 0.95, sx1, cy + s * 0.95), radius=s // 2, fill=mix(accent, WHITE, 0.8)
        )
        ctx.text((sx0 + s, cy), "Search mail", (110, 80, 80), 0.9, maxw=sx1 - sx0 - 2 * s)
    d.ellipse((x1 - s * 2.4, cy - s * 0.8, x1 - s * 0.8, cy + s * 0.8), fill=(70, 130, 180))


def _mail_folders(ctx: Ctx, box: Box, accent: Color, unread: int) -> None:
    x0, y0, x1, y1 = box
    d, s, rng = ctx.draw, ctx.fs, ctx.rng
    d.rectangle(box, fill=mix(accent, WHITE, rng.uniform(0.6, 0.72)))
    pad = s * 0.6
    d.rounded_rectangle((x0 + pad, y0 + s, x1 - pad, y0 + s * 3.2), radius=s, fill=accent)
    ctx.text(
        (x0 + pad + s * 0.6, y0 + s * 2.1),
        "Compose",
        WHITE,
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
                fill=mix(accent, WHITE, 0.9),
            )
        label = f"{name} ({unread})" if k == 0 and unread else name
        ctx.text((x0 + pad * 2, y), label, (50, 40, 40), 0.85, maxw=x1 - x0 - pad * 3, bold=k == 0)
        y += s * 1.9


def _mail_row(ctx: Ctx, box: Box, m: _Mail, accent: Color, selected: bool) -> None:
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


def _mail_reader(ctx: Ctx, box: Box, m: _Mail, accent: Color) -> None:
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
    d.ellipse((x0 + pad, cy - r, x0 + pad + 2 * r, cy + r), fill=mix(accent, (60, 60, 160), 0.5))
    ctx.text((x0 + pad + r, cy), m.sender[0], WHITE, 1.0, anchor="mm")
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
    for line in wrap(m.body, font, x1 - x0 - 2 * pad):
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
        return q, f"You have {len(unread)} unread: from {join_words(unread)}."
    if kind == "who":
        pick = rng.choice(mails)
        q = rng.choice(
            (f"Who sent me the message about '{pick.subject}'?", f"Who wrote '{pick.subject}'?")
        )
        who = [x for x in mails if x.subject == pick.subject]
        return q, "That came from " + join_words([f"{x.sender} ({x.time})" for x in who]) + "."
    name = rng.choice(mails).sender if rng.random() < 0.7 else rng.choice(_SENDERS)
    q = rng.choice((f"Did {name} write to me?", f"Is there anything from {name}?"))
    hits = [x for x in mails if x.sender == name]
    if not hits:
        return q, f"No, nothing from {name} appears in this list."
    when = f"at {hits[0].time}" if ":" in hits[0].time else f"on {hits[0].time}"
    return q, f"Yes, {name} sent '{hits[0].subject}' {when}."
