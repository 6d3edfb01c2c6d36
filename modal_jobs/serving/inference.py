"""Stacked inference: one base model, the router adapter and every expert adapter in one process.

`route` is one forward pass with the router adapter active (softmax over the experts' first label
tokens, divided by the calibrated temperature). `infer` then activates the routed expert's adapter
(`set_adapter`), or disables adapters when the router abstains (the screen's abstention score,
chosen by eval_report, is below the threshold in router.json: see modal_jobs/ml/ood.py) or the
routed expert has no registered adapter, and `generate()`s the answer.
A lock serialises requests: the active adapter is model-wide state.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel
from PIL import Image

from modal_jobs.artifacts import adapter_folder, require_adapters
from modal_jobs.config import ImageBounds, MoleConfig
from modal_jobs.layout import Volumes
from modal_jobs.ml.batching import Encoded, collate, encode
from modal_jobs.ml.calibration import softmax
from modal_jobs.ml.labels import LabelMap
from modal_jobs.ml.model import Runtime, load_base, load_processor
from modal_jobs.ml.ood import Abstention, SlotFeatures, slot_features
from modal_jobs.serving.registry import DeployError, current_router

# Adapter names inside the PeftModel; experts use their own names, which may not start with "_".
ROUTER_ADAPTER = "_router"
MAX_NEW_TOKENS = 48


@dataclass(frozen=True)
class RouterInfo:
    """What `router.json` of a deployed router says (see modal_jobs/stages/deploy.py)."""

    folder: Path
    base: str
    labels: LabelMap
    system_prompt: str
    bounds: ImageBounds
    temperature: float
    # None: a router without an out-of-distribution set to choose a threshold on never abstains.
    abstention: Abstention | None
    # Expert → adapter entry as deployed (None: deployed before routers recorded them).
    experts: dict[str, str] | None = None

    @classmethod
    def load(cls, folder: Path) -> RouterInfo:
        """Read `folder/router.json`."""
        data = json.loads((folder / "router.json").read_text())
        return cls(
            folder=folder,
            base=data["base"],
            labels=LabelMap.from_json(data["labels"]),
            system_prompt=data["system_prompt"],
            bounds=ImageBounds(**data["image_bounds"]),
            temperature=float(data.get("temperature", 1.0)),
            abstention=Abstention.load(folder, data.get("ood")),
            experts=data.get("experts"),
        )

    def adapters(self, volumes: Volumes, config: MoleConfig | None) -> dict[str, Path]:
        """The expert adapter folders to stack: those it was deployed with (else `config`'s)."""
        if self.experts is None:
            if config is None:
                raise DeployError(
                    f"{self.folder / 'router.json'}: names no expert adapters; fix: deploy the "
                    "run again (`mole deploy RUN`)"
                )
            return require_adapters(config, volumes)
        paths = {name: adapter_folder(volumes, entry) for name, entry in self.experts.items()}
        for name, path in paths.items():
            if not (path / "adapter_config.json").is_file():
                raise DeployError(
                    f"{self.folder / 'router.json'}: expert {name!r} adapter {path} does not "
                    "exist; fix: materialize `expert_adapters`, then deploy again"
                )
        return paths


@dataclass(frozen=True)
class Route:
    """The router's decision for one screenshot."""

    expert: str
    probabilities: dict[str, float]
    abstained: bool
    temperature: float
    adapter: str | None
    seconds: float

    def to_json(self) -> dict[str, Any]:
        """Plain dict for the CLI and the HTTP API."""
        return asdict(self)


@dataclass(frozen=True)
class Answer:
    """A routed answer: the route, the adapter that generated and the text."""

    route: Route
    adapter: str | None
    answer: str
    seconds: float

    def to_json(self) -> dict[str, Any]:
        """Plain dict for the CLI and the HTTP API."""
        return {
            "route": self.route.to_json(),
            **{k: v for k, v in asdict(self).items() if k != "route"},
        }


class Stack:
    """The base model loaded once, with the router and expert adapters attached by name."""

    def __init__(self, router: RouterInfo, experts: dict[str, Path], runtime: Runtime) -> None:
        self.router = router
        self.runtime = runtime
        self.processor = load_processor(router.base)
        base = load_base(router.base, runtime)
        model = PeftModel.from_pretrained(base, str(router.folder), adapter_name=ROUTER_ADAPTER)
        for name, path in experts.items():
            model.load_adapter(str(path), adapter_name=name)
        self.model = model.eval()
        self.experts = tuple(experts)
        self.lock = threading.Lock()

    @classmethod
    def deployed(cls, volumes: Volumes, config: MoleConfig | None = None) -> Stack:
        """The currently deployed router with the expert adapters it was deployed with."""
        router = RouterInfo.load(current_router(volumes))
        return cls(router, router.adapters(volumes, config), Runtime.detect())

    def route_features(self, items: Sequence[Encoded]) -> SlotFeatures:
        """The answer slot's label logits, label mass and hidden state, router adapter active."""
        info = self.router
        with self.lock, self.adapter(ROUTER_ADAPTER):
            return slot_features(self.model, self.processor, items, info.bounds, info.labels)

    def abstains(self, features: SlotFeatures) -> np.ndarray:
        """Per item: whether the router falls back to the bare base (a screen of no expert)."""
        abstention = self.router.abstention
        if abstention is None:
            return np.zeros(len(features.logits), dtype=bool)
        return abstention.abstains(features, self.router.temperature)

    def route(self, image: Image.Image | np.ndarray, prompt: str) -> Route:
        """Route one screenshot (+ instruction) in a single forward pass."""
        began = time.perf_counter()
        info = self.router
        item = encode(self.processor, image, info.bounds, info.system_prompt, prompt, None)
        return self.decide(self.route_features([item]), [began])[0]

    def decide(self, features: SlotFeatures, began: Sequence[float]) -> list[Route]:
        """The routes the router's slot features give (`began`: each request's perf_counter)."""
        info = self.router
        abstains = self.abstains(features)
        return [
            self._route(probs, bool(abstained), start)
            for probs, abstained, start in zip(
                softmax(features.logits, info.temperature), abstains, began, strict=True
            )
        ]

    def _route(self, probs: np.ndarray, abstained: bool, began: float) -> Route:
        info = self.router
        best = int(probs.argmax())
        expert = info.labels.experts[best]
        adapter = None if abstained or expert not in self.experts else expert
        return Route(
            expert=expert,
            probabilities={e: float(p) for e, p in zip(info.labels.experts, probs, strict=True)},
            abstained=abstained,
            temperature=info.temperature,
            adapter=adapter,
            seconds=time.perf_counter() - began,
        )

    def infer(
        self, image: Image.Image | np.ndarray, prompt: str, max_new_tokens: int = MAX_NEW_TOKENS
    ) -> Answer:
        """Route, then generate the answer with the routed expert (or the bare base) active."""
        began = time.perf_counter()
        route = self.route(image, prompt)
        item = encode(self.processor, image, self.router.bounds, None, prompt, None)
        with self.lock, self.adapter(route.adapter):
            text = self.generate([item], max_new_tokens)[0]
        return Answer(route, route.adapter, text, time.perf_counter() - began)

    @torch.no_grad()
    def generate(self, items: Sequence[Encoded], max_new_tokens: int) -> list[str]:
        """Greedy `generate()` with whichever adapter is active; the new text of each item.

        Decoding appends after the last column, so a batch is left-padded: with right padding
        a shorter prompt's answer would follow its padding instead of its own last token.
        """
        batch = left_padded(collate(self.processor, items, self.router.bounds))
        batch = {k: v.to(self.runtime.device) for k, v in batch.items()}
        return self.decode(batch, max_new_tokens)

    @torch.no_grad()
    def decode(self, batch: dict[str, Any], max_new_tokens: int) -> list[str]:
        """Greedy `generate()` of a model-ready, left-padded batch; the new text of each row."""
        tokenizer = self.processor.tokenizer
        out = self.model.generate(  # type: ignore[no-untyped-call]
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
            pad_token_id=tokenizer.pad_token_id,
        )
        width = batch["input_ids"].shape[1]
        return [
            str(t).strip() for t in tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        ]

    @contextmanager
    def adapter(self, name: str | None) -> Iterator[None]:
        """Run the block with adapter `name` active, or with every adapter disabled for None."""
        if name is None:
            with self.model.disable_adapter():
                yield
            return
        self.model.set_adapter(name)
        yield

    @torch.no_grad()
    def answer_nll(
        self, items: Sequence[Encoded], name: str | None, batch_size: int = 16
    ) -> np.ndarray:
        """Per item: summed answer-token NLL and answer-token count, under adapter `name`."""
        out = np.zeros((len(items), 2))
        with self.lock, self.adapter(name):
            for start in range(0, len(items), batch_size):
                group = list(items[start : start + batch_size])
                batch = collate(self.processor, group, self.router.bounds)
                labels = batch.pop("labels").to(self.runtime.device)
                batch = {k: v.to(self.runtime.device) for k, v in batch.items()}
                logits = self.model(**batch).logits[:, :-1].float()
                targets = labels[:, 1:]
                loss = torch.nn.functional.cross_entropy(
                    logits.transpose(1, 2), targets, ignore_index=-100, reduction="none"
                )
                mask = targets != -100
                out[start : start + len(group), 0] = loss.sum(1).cpu().numpy()
                out[start : start + len(group), 1] = mask.sum(1).cpu().numpy()
        return out


def left_padded(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A right-padded text batch (from `collate`, labels dropped) with its padding moved left."""
    batch = {k: v for k, v in batch.items() if k != "labels"}
    mask = batch["attention_mask"]
    shifts = (mask.shape[1] - mask.sum(dim=1)).tolist()
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        batch[key] = torch.stack(
            [row.roll(int(shift)) for row, shift in zip(batch[key], shifts, strict=True)]
        )
    return batch
