"""Frozen vision-tower outputs per training sample, computed the first time a sample is seen.

The router LoRA adapts the language model only: the vision tower and its mergers are frozen and
have no dropout, so a screenshot's image embeddings and deepstack features are the same in every
epoch. Training keeps them per sample and, from a sample's second visit on, hands them to the
model (`Qwen3VLModel`'s `mm_encoder_outputs`) instead of its pixels, which skips the vision tower.
The cache is used only when samples are revisited and its estimated size fits `BUDGET_BYTES`.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

from modal_jobs.ml.model import causal_lm

# The most memory the cache may take on the training device (estimated before training).
BUDGET_BYTES = 4 * 2**30
SAMPLE_IDS = "sample_ids"
IMAGE_EMBEDS = "image_embeds"
DEEPSTACK_EMBEDS = "deepstack_embeds"


def worth_caching(model: Any, image_tokens: int, visits: int, samples: int) -> bool:
    """Whether the cache pays: samples are seen again, and every one of them fits the budget.

    `image_tokens` is the merged image tokens of all training samples together; `visits` the
    sample visits still to come (steps left × batch size: after a resume, not the whole run).
    """
    config = causal_lm(model).config
    layers = 1 + len(config.vision_config.deepstack_visual_indexes)
    width = config.text_config.hidden_size * layers
    size = image_tokens * width * causal_lm(model).dtype.itemsize
    return visits > samples and size <= BUDGET_BYTES


class VisionCache:
    """Per-sample vision outputs (image embeddings and deepstack features) of one model."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.stored: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}

    def __len__(self) -> int:
        return len(self.stored)

    @torch.no_grad()
    def apply(self, batch: dict[str, Any]) -> dict[str, Any]:
        """`batch` with its pixels replaced by each sample's (cached or new) vision outputs."""
        batch = dict(batch)
        ids = [int(i) for i in batch.pop(SAMPLE_IDS)]
        pixels, grids = batch.pop("pixel_values"), batch["image_grid_thw"]
        per_image = pixels.split(grids.prod(-1).tolist())
        missing = [n for n, sample in enumerate(ids) if sample not in self.stored]
        if missing:
            chosen = torch.cat([per_image[n] for n in missing])
            outputs = causal_lm(self.model).model.get_image_features(
                chosen, grids[missing], return_dict=True
            )
            for k, n in enumerate(missing):
                deepstack = [layer[k] for layer in outputs.deepstack_features]
                self.stored[ids[n]] = (outputs.pooler_output[k], deepstack)
        entries = [self.stored[sample] for sample in ids]
        batch[IMAGE_EMBEDS] = [embeds for embeds, _ in entries]
        layers = len(entries[0][1]) if entries else 0
        batch[DEEPSTACK_EMBEDS] = [[deep[layer] for _, deep in entries] for layer in range(layers)]
        return batch


def encoder_outputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """Model keyword arguments: cached vision outputs (if any) as `mm_encoder_outputs`."""
    if IMAGE_EMBEDS not in inputs:
        inputs.pop(SAMPLE_IDS, None)
        return inputs
    # Per-image tuples, as `get_image_features` itself returns (its annotations say tensors).
    outputs: Any = BaseModelOutputWithDeepstackFeatures
    image = outputs(
        pooler_output=tuple(inputs.pop(IMAGE_EMBEDS)),
        deepstack_features=[tuple(layer) for layer in inputs.pop(DEEPSTACK_EMBEDS)],
    )
    return {**inputs, "mm_encoder_outputs": {"image": image}}
