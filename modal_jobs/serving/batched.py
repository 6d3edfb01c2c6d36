"""Stacked inference for a batch of requests: one routing forward, answers grouped by adapter.

Every adapter is on the language model, so the frozen vision tower gives a screenshot the same
image embeddings and deepstack features under the router and under any expert. With feature reuse
on, they are computed once per request, in the routing forward's batch, and handed to the
answer's `generate()` as `mm_encoder_outputs` (as training's vision cache hands them to the
model). Answers are generated per adapter group in one left-padded batch, so each row's
continuation starts right after its own prompt, as it would alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from modal_jobs.ml.batching import Encoded, collate, encode, resize_factor, resize_screen
from modal_jobs.ml.ood import SlotFeatures, slot_batch
from modal_jobs.ml.vision import Features, with_features
from modal_jobs.serving.inference import (
    MAX_NEW_TOKENS,
    ROUTER_ADAPTER,
    Answer,
    Route,
    Stack,
    left_padded,
)

# Told the kind of each batch run ("route", "answer") and its size, for the metrics.
BatchObserver = Callable[[str, int], None]


@dataclass(frozen=True)
class Prepared:
    """One request, tokenized: the router's prompt and, for /infer, the expert's.

    `stack` is the stack it was tokenized for: when a server swaps in a newer router
    meanwhile, the request still runs on its own.
    """

    route_item: Encoded
    answer_item: Encoded | None
    began: float
    stack: Stack


def prepare(stack: Stack, image: Image.Image | np.ndarray, prompt: str, answer: bool) -> Prepared:
    """Size the screenshot once and tokenize the router prompt (and the answer prompt)."""
    began = time.perf_counter()
    info, processor = stack.router, stack.processor
    pixels = resize_screen(image, info.bounds, resize_factor(processor))
    route_item = encode(processor, pixels, info.bounds, info.system_prompt, prompt, None)
    answer_item = encode(processor, pixels, info.bounds, None, prompt, None) if answer else None
    return Prepared(route_item, answer_item, began, stack)


def run_batch(
    stack: Stack,
    requests: Sequence[Prepared],
    reuse_features: bool,
    observe: BatchObserver | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> list[Route | Answer]:
    """Route every request in one forward, then answer the /infer ones, one batch per adapter."""
    slots, features = route_batch(stack, [r.route_item for r in requests], reuse_features)
    if observe:
        observe("route", len(requests))
    routes = stack.decide(slots, [r.began for r in requests])
    groups: dict[str | None, list[int]] = {}
    for n, request in enumerate(requests):
        if request.answer_item is not None:
            groups.setdefault(routes[n].adapter, []).append(n)
    texts: dict[int, str] = {}
    for adapter, members in groups.items():
        items = [requests[n].answer_item for n in members]
        chosen = [features[n] for n in members] if features else None
        answers = answer_batch(stack, items, adapter, chosen, max_new_tokens)
        texts.update(zip(members, answers, strict=True))
        if observe:
            observe("answer", len(members))
    results: list[Route | Answer] = []
    for n, request in enumerate(requests):
        route = routes[n]
        if n in texts:
            seconds = time.perf_counter() - request.began
            results.append(Answer(route, route.adapter, texts[n], seconds))
        else:
            results.append(route)
    return results


@torch.inference_mode()
def route_batch(
    stack: Stack, items: Sequence[Encoded], reuse_features: bool
) -> tuple[SlotFeatures, list[Features]]:
    """The router's answer-slot features, and the vision features when they are kept."""
    if not reuse_features:
        return stack.route_features(items), []
    info = stack.router
    with stack.lock, stack.adapter(ROUTER_ADAPTER):
        return slot_batch(stack.model, stack.processor, items, info.bounds, info.labels)


@torch.inference_mode()
def answer_batch(
    stack: Stack,
    items: Sequence[Encoded | None],
    adapter: str | None,
    features: Sequence[Features] | None,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> list[str]:
    """Greedy answers of one adapter's requests in one left-padded batch."""
    encoded = [item for item in items if item is not None]
    batch = left_padded(collate(stack.processor, encoded, stack.router.bounds))
    batch = {k: v.to(stack.runtime.device) for k, v in batch.items()}
    if features is not None:
        batch = with_features(batch, features)
    with stack.lock, stack.adapter(adapter):
        return stack.decode(batch, max_new_tokens)
