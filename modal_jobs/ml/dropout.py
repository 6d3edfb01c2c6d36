"""Instruction dropout: train the router to route from the screen when the text says nothing.

A tokenized sample keeps its sized pixels, so giving it another instruction is one chat-template
render and tokenization (`reprompt`), no image work. During training, each drawn sample keeps its
own instruction, or with probability `rate` gets a generic one (`GENERIC_TRAIN`) or none, half
and half; the choice is a function of (seed, step, sample), so a resumed run draws the same.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from modal_jobs.config import ImageBounds
from modal_jobs.ml.batching import Encoded, encode
from modal_jobs.ml.conditions import GENERIC_TRAIN, pick


def reprompt(
    processor: Any,
    item: Encoded,
    bounds: ImageBounds,
    system: str | None,
    instruction: str,
    answer: str | None,
) -> Encoded:
    """`item`'s screenshot encoded again with another instruction (and answer, if given)."""
    return encode(processor, item.pixels, bounds, system, instruction, answer)


def _unit(key: str) -> float:
    """A number in [0, 1) fixed by `key`."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


@dataclass(frozen=True)
class InstructionDropout:
    """Swaps the instruction of some training samples for a generic one or for none."""

    processor: Any
    bounds: ImageBounds
    system: str
    labels: Sequence[str]
    rate: float
    seed: int
    # The answer of a screen of none (class -1); None: the split holds none.
    none_label: str | None = None

    def instruction(self, step: int, sample: int) -> str | None:
        """The instruction sample `sample` gets at `step`: None keeps its own."""
        key = f"{self.seed}:{step}:{sample}"
        draw = _unit(key)
        if draw >= self.rate:
            return None
        return pick(GENERIC_TRAIN, key) if draw < self.rate / 2 else ""

    def apply(
        self, step: int, ids: Sequence[int], items: Sequence[Encoded], classes: Any
    ) -> list[Encoded]:
        """`items` (samples `ids` of the split, with `classes`) as drawn for `step`."""
        out = []
        for sample, item, cls in zip(ids, items, classes, strict=True):
            instruction = self.instruction(step, int(sample))
            if instruction is None:
                out.append(item)
                continue
            label = self.labels[int(cls)] if cls >= 0 else self.none_label
            if label is None:
                raise ValueError(f"sample {sample} is a screen of none but no label is reserved")
            out.append(reprompt(self.processor, item, self.bounds, self.system, instruction, label))
        return out
