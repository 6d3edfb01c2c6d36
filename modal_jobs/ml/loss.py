"""The answer-token loss without projecting every position onto the vocabulary.

`answer_loss(model(**batch).logits, labels)` runs the `lm_head` (hidden size × vocabulary) at
every position, image, system and instruction tokens included, and keeps a batch × length ×
vocabulary logits tensor alive for the backward pass; with Qwen3-VL's 151k-token vocabulary that
is most of a training step's activation memory. Here the model body runs to hidden states and the
head runs only at the positions whose next token is labelled. The loss is the same up to float
rounding (tests/test_training.py checks it against `answer_loss`).
"""

from __future__ import annotations

from typing import Any

import torch

from modal_jobs.ml.batching import IGNORE_INDEX
from modal_jobs.ml.model import causal_lm
from modal_jobs.ml.vision_cache import encoder_outputs


class AnswerLoss(torch.nn.Module):
    """Summed next-token cross-entropy over a batch's answer tokens, and how many there are.

    A module, not a function, so `DistributedDataParallel` can wrap it: DDP's hooks run around
    this forward. The sum (not the mean) lets the caller normalise by the answer tokens of the
    whole global batch when ranks hold different shares of it.
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """`(loss sum, answer-token count)` for one collated batch (with `labels`).

        The batch has pixels, or vision outputs a `VisionCache` put in their place.
        """
        inputs = encoder_outputs({key: value for key, value in batch.items() if key != "labels"})
        lm = causal_lm(self.model)
        # No KV cache: training never decodes, and building one costs memory for nothing.
        hidden = lm.model(**inputs, use_cache=False).last_hidden_state
        targets = batch["labels"][:, 1:]
        answer = targets != IGNORE_INDEX
        logits = lm.lm_head(hidden[:, :-1][answer]).float()
        total = torch.nn.functional.cross_entropy(logits, targets[answer], reduction="sum")
        return total, answer.sum()
