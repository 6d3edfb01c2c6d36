"""Single-forward routing vs `generate()` on the same inputs and model; prints ONE JSON object.

Needs a deployed router under MOLE_HOME (`make demo` does it). Inputs are the deployed run's
held-out eval screenshots, already tokenized with the router's system prompt. Both methods run
the same model with the router adapter active at batch size 1, on the same collated tensors,
interleaved image by image (the machine's other load hits both alike); medians are reported:
- route: one forward pass of the body, the experts' first-label-token rows of the vocabulary
  head applied at the answer slot only (`modal_jobs.ml.routing.slot_logits`, what serving runs);
- forward: the plain full-logits forward a user writes first, `model(**batch).logits` (every
  position over the whole vocabulary, KV cache built), then the label tokens at the answer slot;
- generate: greedy `generate()` with enough new tokens to emit the longest label and its end of
  turn; correct when the decoded text is the label.
`speedup` = generate time / route time, `speedup_vs_forward` = forward time / route time (model
time; the shared preprocessing is reported apart).
Throughput: routing images/s at batch 1 and 16, preprocessing included.

    MOLE_HOME=.mole python benchmarks/route.py [--images 48]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from modal_jobs.artifacts import read_index
from modal_jobs.errors import MoleError
from modal_jobs.layout import Volumes
from modal_jobs.ml.batching import Encoded, collate
from modal_jobs.ml.model import Runtime
from modal_jobs.ml.routing import score, slot_logits
from modal_jobs.ml.shard_files import load_split
from modal_jobs.serving.inference import ROUTER_ADAPTER, RouterInfo, Stack
from modal_jobs.serving.registry import current_router


@torch.inference_mode()
def compare(stack: Stack, items: Sequence[Encoded], new_tokens: int) -> dict[str, Any]:
    """Per image, interleaved: route, full-logits forward and generate on the same tensors."""
    ids = torch.tensor(stack.router.labels.token_ids)
    eos = stack.processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    routes, texts, route_s, generate_s, prep_s = [], [], [], [], []
    forwards, forward_s = [], []
    with stack.adapter(ROUTER_ADAPTER):
        for item in items:
            began = time.perf_counter()
            batch = collate(stack.processor, [item], stack.router.bounds)
            batch.pop("labels")
            prep_s.append(time.perf_counter() - began)
            began = time.perf_counter()
            logits = slot_logits(stack.model, batch, [item.prompt_len - 1], ids)[0]
            routes.append(int(torch.softmax(logits, -1).argmax()))
            route_s.append(time.perf_counter() - began)
            began = time.perf_counter()
            full = stack.model(**batch).logits[0, item.prompt_len - 1, ids]
            forwards.append(int(full.argmax()))
            forward_s.append(time.perf_counter() - began)
            began = time.perf_counter()
            out = stack.model.generate(
                **batch, max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos
            )
            generate_s.append(time.perf_counter() - began)
            new = out[0, batch["input_ids"].shape[1] :]
            texts.append(stack.processor.tokenizer.decode(new, skip_special_tokens=True).strip())
    return {
        "routes": np.array(routes),
        "forwards": np.array(forwards),
        "forward_ms": 1000 * float(np.median(forward_s)),
        "texts": texts,
        "route_ms": 1000 * float(np.median(route_s)),
        "generate_ms": 1000 * float(np.median(generate_s)),
        "preprocess_ms": 1000 * float(np.median(prep_s)),
    }


def throughput(stack: Stack, items: Sequence[Encoded], batch_size: int) -> float:
    """Routing images per second at `batch_size` (preprocessing included)."""
    ids = stack.router.labels.token_ids
    began = time.perf_counter()
    with stack.adapter(ROUTER_ADAPTER):
        score(stack.model, stack.processor, items, stack.router.bounds, ids, batch_size)
    return len(items) / (time.perf_counter() - began)


def main() -> int:
    """Run the benchmark and print its JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    args = parser.parse_args()
    volumes = Volumes.local()
    try:
        folder = current_router(volumes)
    except MoleError as exc:
        print(json.dumps({"error": f"{exc} (run `make demo` first)"}))
        return 2
    router = RouterInfo.load(folder)
    run = json.loads((folder / "report.json").read_text())["run"]
    shards = volumes.run(run).shards
    evaluation = load_split(shards, read_index(shards), "eval")
    items, truth = evaluation.items[: args.images], evaluation.classes[: args.images]
    stack = Stack(router, {}, Runtime.detect())
    tokenizer = stack.processor.tokenizer
    new_tokens = 1 + max(len(tokenizer(label)["input_ids"]) for label in router.labels.labels)

    compare(stack, items[:4], new_tokens)  # warm-up: first calls pay one-time set-up
    measured = compare(stack, items, new_tokens)
    labels = router.labels.labels
    generated_right = [t == labels[c] for t, c in zip(measured["texts"], truth, strict=True)]
    throughput(stack, items[:16], 16)  # warm-up
    result = {
        "router": folder.name,
        "images": len(items),
        "device": str(stack.runtime.device),
        "torch_threads": torch.get_num_threads(),
        "route_ms_median": measured["route_ms"],
        "generate_ms_median": measured["generate_ms"],
        "forward_ms_median": measured["forward_ms"],
        "preprocess_ms_median": measured["preprocess_ms"],
        "speedup": measured["generate_ms"] / measured["route_ms"],
        "speedup_vs_forward": measured["forward_ms"] / measured["route_ms"],
        "forward_agrees_with_route": float((measured["forwards"] == measured["routes"]).mean()),
        "route_accuracy": float((measured["routes"] == truth).mean()),
        "generate_accuracy": float(np.mean(generated_right)),
        "generate_max_new_tokens": new_tokens,
        "throughput_images_per_s": {
            "batch_1": throughput(stack, items, 1),
            "batch_16": throughput(stack, items, 16),
        },
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
