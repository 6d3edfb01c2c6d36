"""Abstention: scores that tell screens of the experts from screens of none, and the threshold.

One forward pass gives, at the answer slot, the final hidden state, the experts' label-token
logits and the full-vocabulary softmax; the vision tower, run once before it, gives the screen
statistics. Candidate scores (higher means "one of the experts"):
- `max_probability`: the top calibrated expert probability (what a fixed `abstain_below` used);
- `label_mass`: the full-vocabulary softmax's mass on the experts' label tokens (the rest is
  the model saying "none of these");
- `energy`: the log-sum-exp of the calibrated label logits (negative free energy);
- `prototype`: minus the Mahalanobis distance of the hidden state to the nearest expert's mean
  on the train split (one covariance shared by all experts, shrunk towards its diagonal);
- `screen`: the same distance for the screen statistics, the mean, log standard deviation,
  maximum and minimum of the frozen vision tower's patch states (`modal_jobs/ml/vision.py`):
  what the screen looks like, whatever the instruction says;
- `none_answer`: when the router was trained on screens of none (dataset.yaml `negatives`), the
  log-odds of the experts' label tokens together against the reserved answer's token.
The eval stage measures all of them, picks the one that separates best on the validation part of
the out-of-distribution set, and sets the threshold that keeps `coverage` of the in-distribution
val screens; serving applies the same score and threshold (`Abstention`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from modal_jobs.config import ConfigError, ImageBounds
from modal_jobs.ml.batching import Encoded, collate
from modal_jobs.ml.calibration import softmax
from modal_jobs.ml.labels import NO_EXPERT, LabelMap
from modal_jobs.ml.metrics import auroc
from modal_jobs.ml.model import causal_lm
from modal_jobs.ml.vision import SCREEN_STATISTICS, Features, vision_features, with_features

SCORES = ("max_probability", "label_mass", "energy", "prototype", "screen", "none_answer")
# The distance scores and the `SlotFeatures` field each one measures.
PROTOTYPE_FEATURES = {"prototype": "hidden", "screen": "screen"}
PROTOTYPES_FILE = "ood_prototypes.safetensors"
# Weight of the covariance's diagonal in the shrunk estimate: the hidden size of a real base
# (2048+) exceeds the train split's sample count, so the raw covariance is singular.
SHRINKAGE = 0.1


@dataclass(frozen=True)
class SlotFeatures:
    """Per sample at the answer slot: label logits, label mass, hidden state; seconds per batch.

    `none`: the logit of the reserved answer for screens of none, when the router has one.
    `screen`: the screen statistics of the sample's screenshot (`vision.screen_statistics`).
    """

    logits: np.ndarray
    label_mass: np.ndarray
    hidden: np.ndarray
    batch_seconds: list[float]
    none: np.ndarray | None = None
    screen: np.ndarray | None = None

    def subset(self, keep: np.ndarray) -> SlotFeatures:
        """The rows at `keep` (a boolean mask or indices)."""
        none = None if self.none is None else self.none[keep]
        screen = None if self.screen is None else self.screen[keep]
        return SlotFeatures(
            self.logits[keep], self.label_mass[keep], self.hidden[keep], [], none, screen
        )

    @classmethod
    def concat(cls, parts: Sequence[SlotFeatures]) -> SlotFeatures:
        """Rows of `parts`, one after another."""

        def joined(rows: list[np.ndarray | None]) -> np.ndarray | None:
            present = [r for r in rows if r is not None]
            return np.concatenate(present) if present and len(present) == len(rows) else None

        return cls(
            np.concatenate([p.logits for p in parts]),
            np.concatenate([p.label_mass for p in parts]),
            np.concatenate([p.hidden for p in parts]),
            [s for p in parts for s in p.batch_seconds],
            joined([p.none for p in parts]),
            joined([p.screen for p in parts]),
        )


@torch.inference_mode()
def slot_features(
    model: Any,
    processor: Any,
    items: Sequence[Encoded],
    bounds: ImageBounds,
    labels: LabelMap,
    batch_size: int = 32,
) -> SlotFeatures:
    """One forward a batch; the vocabulary head runs on the answer slot's row only."""
    lm = causal_lm(model)
    parts = []
    for start in range(0, len(items), batch_size):
        group = list(items[start : start + batch_size])
        began = time.perf_counter()
        rows, _ = slot_batch(model, processor, group, bounds, labels)
        parts.append(replace(rows, batch_seconds=[time.perf_counter() - began]))
    if parts:
        return SlotFeatures.concat(parts)
    k, width = len(labels.token_ids), int(lm.config.text_config.hidden_size)
    none = None if labels.none_token_id is None else np.zeros(0)
    screen = np.zeros((0, SCREEN_STATISTICS * int(lm.config.vision_config.hidden_size)))
    return SlotFeatures(np.zeros((0, k)), np.zeros(0), np.zeros((0, width)), [], none, screen)


@torch.inference_mode()
def slot_batch(
    model: Any,
    processor: Any,
    items: Sequence[Encoded],
    bounds: ImageBounds,
    labels: LabelMap,
) -> tuple[SlotFeatures, list[Features]]:
    """One batch's slot features, and its screenshots' vision features for reuse.

    The vision tower runs once, before the language model, which takes its outputs instead of
    the pixels (the same forward the model would run on the pixels itself).
    """
    device = next(model.parameters()).device
    batch = collate(processor, items, bounds)
    batch.pop("labels")
    vision = vision_features(model, batch, device)
    text = {k: v.to(device) for k, v in batch.items() if k != "pixel_values"}
    inputs = with_features(text, vision.features)
    rows = _slot_rows(model, inputs, [item.prompt_len - 1 for item in items], labels)
    return replace(rows, screen=vision.screen), vision.features


def _slot_rows(
    model: Any, batch: dict[str, Any], slots: Sequence[int], labels: LabelMap
) -> SlotFeatures:
    """Label logits, label-token mass, hidden state (and reserved logit) at each row's slot."""
    lm = causal_lm(model)
    states = lm.model(**batch, use_cache=False).last_hidden_state
    rows = states[torch.arange(len(slots), device=states.device), list(slots)]
    vocab = lm.lm_head(rows).float()
    label_ids = torch.tensor(list(labels.token_ids), device=vocab.device)
    none = None if labels.none_token_id is None else vocab[:, labels.none_token_id].cpu().numpy()
    return SlotFeatures(
        vocab[:, label_ids].cpu().numpy(),
        torch.softmax(vocab, dim=-1)[:, label_ids].sum(-1).cpu().numpy(),
        rows.float().cpu().numpy(),
        [],
        none,
    )


@dataclass(frozen=True)
class Prototypes:
    """Per-expert means of one feature and the shared (shrunk) precision matrix.

    The feature is the slot's hidden state (`prototype`) or the screen statistics (`screen`).
    """

    means: np.ndarray
    precision: np.ndarray

    @classmethod
    def fit(cls, hidden: np.ndarray, classes: np.ndarray, experts: int) -> Prototypes:
        """Means per class and the pooled within-class covariance, shrunk, inverted.

        Rows of class `NO_EXPERT` (screens of none in the train split) are left out.
        """
        keep = classes != NO_EXPERT
        hidden, classes = hidden[keep].astype(np.float64), classes[keep]
        means = np.stack([hidden[classes == k].mean(axis=0) for k in range(experts)])
        centred = hidden - means[classes]
        cov = centred.T @ centred / max(1, len(hidden) - experts)
        shrunk = (1 - SHRINKAGE) * cov + SHRINKAGE * np.diag(np.diag(cov))
        shrunk += 1e-6 * np.trace(shrunk) / len(shrunk) * np.eye(len(shrunk))
        return cls(means, np.linalg.inv(shrunk))

    def distance(self, hidden: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each row to the nearest mean (one matrix product a class)."""
        rows = hidden.astype(np.float64)
        squared = np.full(len(rows), np.inf)
        for mean in self.means:
            diff = rows - mean
            squared = np.minimum(squared, ((diff @ self.precision) * diff).sum(axis=1))
        return np.asarray(np.sqrt(np.clip(squared, 0, None)))

    def save(self, path: Path) -> None:
        """Write as safetensors."""
        save_file({"means": self.means, "precision": self.precision}, str(path))

    @classmethod
    def load(cls, path: Path) -> Prototypes:
        """Inverse of `save`."""
        tensors = load_file(str(path))
        return cls(tensors["means"], tensors["precision"])


def ood_scores(
    features: SlotFeatures, temperature: float, prototypes: dict[str, Prototypes]
) -> dict[str, np.ndarray]:
    """Every candidate score of each sample (higher: more like the experts' screens).

    `prototypes`: per distance score (`PROTOTYPE_FEATURES`), the prototypes it measures to;
    a distance score is given when its prototypes and its features are both there.
    """
    scaled = features.logits / temperature
    peak = scaled.max(axis=1, keepdims=True) if len(scaled) else np.zeros((0, 1))
    out = {
        "max_probability": softmax(features.logits, temperature).max(axis=1)
        if len(scaled)
        else np.zeros(0),
        "label_mass": features.label_mass,
        "energy": (peak[:, 0] + np.log(np.exp(scaled - peak).sum(axis=1))),
    }
    for name, fitted in prototypes.items():
        rows = getattr(features, PROTOTYPE_FEATURES[name])
        if rows is not None:
            out[name] = -fitted.distance(rows)
    if features.none is not None:
        # Log-odds of "one of the experts" against the reserved answer, raw logits (T = 1).
        raw = features.logits
        top = raw.max(axis=1) if len(raw) else np.zeros(0)
        experts = top + np.log(np.exp(raw - top[:, None]).sum(axis=1))
        out["none_answer"] = experts - features.none
    # A score that is not a number (an overflowed feature) is nothing like the experts' screens:
    # the lowest score, so it abstains (NaN < threshold would be false: routed).
    return {name: np.where(np.isnan(v), -np.inf, v) for name, v in out.items()}


def threshold_for_coverage(scores: np.ndarray, coverage: float) -> float:
    """The highest threshold that keeps at least `coverage` of `scores` (kept: score ≥ it)."""
    if not len(scores):
        return float("-inf")
    ordered = np.sort(scores)
    keep = int(np.ceil(coverage * len(ordered) - 1e-9))
    return float(ordered[len(ordered) - max(1, keep)])


@dataclass(frozen=True)
class Abstention:
    """What serving needs to abstain: which score, its threshold, the prototypes if it uses them."""

    score: str
    threshold: float
    prototypes: Prototypes | None

    def abstains(self, features: SlotFeatures, temperature: float) -> np.ndarray:
        """Whether each sample's chosen score falls below the threshold."""
        fitted = {self.score: self.prototypes} if self.prototypes is not None else {}
        return ood_scores(features, temperature, fitted)[self.score] < self.threshold

    def to_json(self) -> dict[str, Any]:
        """The `ood` section of router.json (the prototypes file sits beside it)."""
        files = {"prototypes": PROTOTYPES_FILE} if self.score in PROTOTYPE_FEATURES else {}
        return {"score": self.score, "threshold": self.threshold, **files}

    @classmethod
    def load(cls, folder: Path, section: dict[str, Any] | None) -> Abstention | None:
        """From router.json's `ood` section (None: a router that never abstains).

        Raises:
            ConfigError: If the section names a score this code does not know, or a distance
                score without its prototypes file: refused at load, not at the first request.
        """
        if not section:
            return None
        score, name = str(section["score"]), section.get("prototypes")
        where = f"{folder / 'router.json'}: field ood.score"
        if score not in SCORES:
            raise ConfigError(
                f"{where} is {score!r}, not one of {', '.join(SCORES)}; fix: serve this router "
                "with the mole version that evaluated it, or deploy a router evaluated by this one"
            )
        if score in PROTOTYPE_FEATURES and not name:
            raise ConfigError(
                f"{where} is {score!r}, a distance score, but field ood.prototypes is missing; "
                "fix: deploy the router again from its eval_report"
            )
        prototypes = Prototypes.load(folder / name) if name else None
        return cls(score, float(section["threshold"]), prototypes)


def candidates(
    val_in: dict[str, np.ndarray],
    val_out: dict[str, np.ndarray],
    held_in: dict[str, np.ndarray],
    held_out: dict[str, np.ndarray],
    coverage: float,
) -> dict[str, dict[str, float]]:
    """Every score side by side: threshold from `val_in` at `coverage`, then both parts judged.

    `val_*` are the validation parts (expert screens, screens of none); `held_*` the held-out
    ones, which decide nothing.
    """
    out = {}
    for name, inside in val_in.items():
        threshold = threshold_for_coverage(inside, coverage)
        out[name] = {
            "threshold": threshold,
            "val_auroc": auroc(inside, val_out[name]),
            "val_abstain_rate": _share(val_out[name] < threshold),
            "auroc": auroc(held_in[name], held_out[name]),
            "abstain_rate": _share(held_out[name] < threshold),
            "coverage": _share(held_in[name] >= threshold),
        }
    return out


def choose(table: dict[str, dict[str, float]]) -> str:
    """The score that abstains on most val screens of none at the coverage (then: val AUROC)."""
    return max(table, key=lambda name: (table[name]["val_abstain_rate"], table[name]["val_auroc"]))


def _share(mask: np.ndarray) -> float:
    return float(mask.mean()) if len(mask) else 0.0
