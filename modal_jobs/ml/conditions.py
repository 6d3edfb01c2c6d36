"""Prompt conditions the router is trained and judged under: its own, a generic or no instruction.

The router decides from the screen; the instruction is optional. Training sees the sample's own
instruction, a generic one (shared by every expert, so it names none) or nothing, and the eval
report measures each condition on the same held-out screenshots. Generic wordings come in two
pools that never overlap: `GENERIC_TRAIN` for the synthetic experts and instruction dropout,
`GENERIC_EVAL` only for judging, so a generic-condition score is not a memorised phrase.
Torch-free: the synthetic data generator imports it.
"""

from __future__ import annotations

import hashlib

CONDITIONS = ("instruction", "generic", "none")

GENERIC_TRAIN = (
    "Help me with this.",
    "What should I do here?",
    "Can you look at this?",
    "Explain this screenshot.",
    "What am I looking at?",
    "Take a look, please.",
    "Any thoughts on this?",
    "I need a hand with this.",
    "What does this show?",
    "Walk me through this.",
    "Can you help?",
    "Check this out.",
)
GENERIC_EVAL = (
    "What is on this screen?",
    "Describe what you see.",
    "What's going on here?",
    "Please assist with this screen.",
    "Tell me about this.",
    "Could you help me out here?",
    "Have a look at my screen.",
    "Summarise this for me.",
)


def pick(pool: tuple[str, ...], key: str) -> str:
    """A wording from `pool` chosen by `key` alone (the same key, the same wording, any run)."""
    digest = hashlib.sha256(key.encode()).digest()
    return pool[int.from_bytes(digest[:8], "big") % len(pool)]


def eval_instruction(condition: str, own: str, key: str) -> str:
    """The instruction a held-out sample is scored with under `condition`.

    Raises:
        ValueError: If `condition` is not one of `CONDITIONS`.
    """
    if condition == "instruction":
        return own
    if condition == "generic":
        return pick(GENERIC_EVAL, key)
    if condition == "none":
        return ""
    raise ValueError(f"unknown prompt condition {condition!r}; known: {', '.join(CONDITIONS)}")
