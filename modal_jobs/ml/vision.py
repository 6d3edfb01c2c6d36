"""The frozen vision tower's outputs for a collated batch, computed once and handed on.

Every adapter is on the language model, so a screenshot's vision outputs are the same under the
router and under any expert. `vision_features` runs the tower once for a batch and keeps, per
screenshot, what the language model takes (merged image embeddings and deepstack features,
passed as `mm_encoder_outputs` by `with_features`) and what abstention reads of the screen
itself: the mean, log standard deviation, maximum and minimum of the tower's last-block patch
states (`screen_statistics`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from modal_jobs.ml.model import causal_lm
from modal_jobs.ml.vision_cache import DEEPSTACK_EMBEDS, IMAGE_EMBEDS, encoder_outputs

# A screenshot's frozen vision outputs: merged image embeddings, one tensor per deepstack layer.
Features = tuple[torch.Tensor, list[torch.Tensor]]
# Added to a patch-state standard deviation before its log, which stays finite for any screen.
STD_FLOOR = 1e-6
# Statistics per channel in a screen-statistics row (`screen_statistics`).
SCREEN_STATISTICS = 4


@dataclass(frozen=True)
class VisionBatch:
    """Per screenshot of a batch: its vision features and its screen statistics (one row)."""

    features: list[Features]
    screen: np.ndarray


def vision_features(
    model: Any, batch: dict[str, torch.Tensor], device: torch.device
) -> VisionBatch:
    """The frozen vision tower's outputs for each screenshot of a collated batch."""
    grids = batch["image_grid_thw"].to(device)
    outputs = causal_lm(model).model.get_image_features(
        batch["pixel_values"].to(device), grids, return_dict=True
    )
    features = [
        (embeds, [layer[n] for layer in outputs.deepstack_features])
        for n, embeds in enumerate(outputs.pooler_output)
    ]
    return VisionBatch(features, screen_statistics(outputs.last_hidden_state, grids))


def screen_statistics(states: torch.Tensor, grids: torch.Tensor) -> np.ndarray:
    """Per image and channel of its patch states: mean, log standard deviation, max and min.

    `states` are the last vision block's patch states of every image of a batch, one after
    another (`grids`: each image's temporal, height and width in patches); a row is the four
    statistics side by side, `SCREEN_STATISTICS` × the tower's width. The mean says what the
    screen shows on average, the spread how busy it is (log: a scale; a one-colour screen's
    patches differ only by their position embeddings, and its small spread lies far below any
    app's), the extremes what its most marked patches hold.
    """
    rows = []
    for patches in states.float().split(grids.prod(-1).tolist()):
        spread = patches.std(dim=0, correction=0)
        low, high = patches.aminmax(dim=0)
        rows.append(torch.cat([patches.mean(dim=0), torch.log(spread + STD_FLOOR), high, low]))
    if not rows:
        return np.zeros((0, SCREEN_STATISTICS * states.shape[-1]))
    return torch.stack(rows).cpu().numpy()


def with_features(batch: dict[str, Any], features: Sequence[Features]) -> dict[str, Any]:
    """`batch` with its pixels replaced by the screenshots' vision features."""
    inputs = {k: v for k, v in batch.items() if k != "pixel_values"}
    inputs[IMAGE_EMBEDS] = [embeds for embeds, _ in features]
    layers = len(features[0][1]) if features else 0
    inputs[DEEPSTACK_EMBEDS] = [[deep[layer] for _, deep in features] for layer in range(layers)]
    return encoder_outputs(inputs)
