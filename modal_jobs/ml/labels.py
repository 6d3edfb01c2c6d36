"""The label mapping: expert ↔ label word ↔ the single token the router scores.

Routing is one forward pass: the logits at the answer position, restricted to each expert's first
label token, softmaxed. That only works if those first tokens differ, which is checked here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from modal_jobs.config import DatasetConfig
from modal_jobs.errors import MoleError
from modal_jobs.ml.batching import conversation

# The class of a screen of none (a negative, or an out-of-distribution screen).
NO_EXPERT = -1


class LabelError(MoleError):
    """Two labels (two experts', or one and the reserved answer's) start with the same token."""


@dataclass(frozen=True)
class LabelMap:
    """Experts in a fixed order, their label words and first-token ids."""

    experts: tuple[str, ...]
    labels: tuple[str, ...]
    token_ids: tuple[int, ...]
    # The reserved answer for screens of none and its first token (None: trained without).
    none_label: str | None = None
    none_token_id: int | None = None

    def to_json(self) -> dict[str, Any]:
        """Plain dict for index/report files."""
        return {
            "experts": list(self.experts),
            "labels": list(self.labels),
            "token_ids": list(self.token_ids),
            "none_label": self.none_label,
            "none_token_id": self.none_token_id,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LabelMap:
        """Inverse of `to_json` (an index from before negatives has no reserved label)."""
        return cls(
            tuple(data["experts"]),
            tuple(data["labels"]),
            tuple(data["token_ids"]),
            data.get("none_label"),
            data.get("none_token_id"),
        )


def label_map(dataset: DatasetConfig, processor: Any) -> LabelMap:
    """Map each configured expert to the first token of its label as the chat template emits it."""
    experts = tuple(sorted(dataset.experts))
    labels = tuple(dataset.label_of(name) for name in experts)
    token_ids = tuple(first_answer_token(processor, label) for label in labels)
    clashes = [
        (a, b)
        for i, a in enumerate(experts)
        for b in experts[i + 1 :]
        if token_ids[experts.index(a)] == token_ids[experts.index(b)]
    ]
    if clashes:
        pairs = ", ".join(f"{a}/{b}" for a, b in clashes)
        raise LabelError(
            f"config/dataset.yaml: labels of {pairs} start with the same token, so one forward "
            "pass cannot tell them apart; fix: set a distinct `label:` for one of each pair"
        )
    if not dataset.negatives.count:
        return LabelMap(experts, labels, token_ids)
    none_label = dataset.negatives.label
    none_id = first_answer_token(processor, none_label)
    if none_id in token_ids:
        taken = experts[token_ids.index(none_id)]
        raise LabelError(
            f"config/dataset.yaml: negatives.label {none_label!r} starts with the same token as "
            f"the label of {taken!r}; fix: choose another `negatives.label` or expert `label:`"
        )
    return LabelMap(experts, labels, token_ids, none_label, none_id)


def first_answer_token(processor: Any, label: str) -> int:
    """The token id that starts `label` right after the assistant prompt."""
    tokenizer = processor.tokenizer
    messages = [m for m in conversation(None, "x", label) if m["role"] != "user"]
    user = {"role": "user", "content": [{"type": "text", "text": "x"}]}
    prompt = processor.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
    full = processor.apply_chat_template([user, *messages], tokenize=False)
    prompt_ids = tokenizer(prompt)["input_ids"]
    full_ids = tokenizer(full)["input_ids"]
    return int(full_ids[len(prompt_ids)])
