"""Model presets: resolve a preset to a loadable base (hub repo id or a locally built folder).

`tiny` is a random-init Qwen3-VL from a small config with a byte-level BPE tokenizer made here,
then trained briefly on synthetic screens and their expert answers. A random base sees little
more than colour statistics; this short pre-training is the honest stand-in for a pretrained VLM
that already understands screens. `qwen3-vl-2b-local` has the published Qwen3-VL-2B-Instruct
shapes, Qwen3's real tokenizer (`modal_jobs/ml/qwen3_tokenizer.py`) and random bf16 weights: the
production model path, run without a hub. A local preset is built once per definition and cached
under the models volume, so every run and every fresh process reuses the same saved base and
processor, loaded with `from_pretrained` like a hub checkpoint.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    PreTrainedTokenizerFast,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

from modal_jobs import demo_data
from modal_jobs.atomic import atomic_dir, write_json
from modal_jobs.config import ConfigError, ModelPreset, PretrainSpec
from modal_jobs.ml import qwen3_tokenizer
from modal_jobs.ml.batching import Encoded, answer_loss, collate, encode
from modal_jobs.ml.optim import adamw, optimizer_step

log = logging.getLogger(__name__)

# Bump when the build recipe changes so cached bases are rebuilt.
BUILD_VERSION = 3
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
APP_WORDS = ("calendar", "spreadsheet", "terminal", "email", "code", "editor", "map")
NAME_PROMPT = "Name a few kinds of apps."
# Qwen3-VL's chat layout (im_start/im_end turns, vision markers around the image pad), written
# here: the npm tokenizer carries Qwen3's text-only template, and the hub cannot be read.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def resolve_base(name: str, preset: ModelPreset, models_dir: Path) -> str:
    """A string `from_pretrained` accepts for this preset, building `tiny` on first use."""
    if preset.source == "hub":
        assert preset.repo_id is not None
        return preset.repo_id
    target = models_dir / "presets" / f"{name}-{preset_key(preset)}"
    if (target / "config.json").is_file():
        return str(target)
    with _build_lock(target.with_suffix(".lock")):
        if not (target / "config.json").is_file():
            build_local_preset(preset, target)
    return str(target)


def preset_key(preset: ModelPreset) -> str:
    """Short content hash of what a preset's build reads, and the build recipe version.

    The router's LoRA shape and training defaults do not change the base, so they stay out.
    """
    built = preset.model_dump(mode="json", exclude={"lora", "train"})
    blob = json.dumps({"preset": built, "v": BUILD_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


class _build_lock:  # noqa: N801 - used as a context manager, reads like one
    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "w")  # noqa: SIM115 - held for the lock's lifetime
        fcntl.flock(self.handle, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


def build_local_preset(preset: ModelPreset, target: Path) -> None:
    """Build a local preset's tokenizer, processor and model, pre-train if set, save atomically."""
    started = time.perf_counter()
    samples = list(_pretrain_samples(preset.pretrain)) if preset.pretrain is not None else []
    texts = [text for sample in samples for text in (sample.instruction, sample.answer)]
    processor = build_processor(preset, texts)
    model = build_model(preset, processor)
    if samples:
        pretrain(model, processor, preset, samples)
    with atomic_dir(target) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        processor.save_pretrained(staging)
        write_json(
            staging / "mole_preset.json",
            {
                "preset": preset.model_dump(mode="json"),
                "build_version": BUILD_VERSION,
                "build_seconds": round(time.perf_counter() - started, 1),
            },
        )
    log.info("built local preset at %s in %.1fs", target, time.perf_counter() - started)


def _pretrain_samples(spec: PretrainSpec) -> Iterator[demo_data.Sample]:
    """Screens with their expert answers, plus a share of screens paired with app-name lists.

    The name lists are unrelated to the screen they come with: they give the app-name tokens
    trained output embeddings, as a real vocabulary has, without teaching which screen is which
    (so an untrained router on this base stays near chance).
    """
    for expert in demo_data.EXPERTS:
        for index in range(spec.samples_per_expert):
            seed = hashlib.sha256(f"pretrain:{spec.seed}:{expert}:{index}".encode()).digest()
            rng = random.Random(seed)
            sample = demo_data.render_sample(expert, rng)
            if index % 4 == 3:
                names = rng.sample(APP_WORDS, len(APP_WORDS))
                sample = demo_data.Sample(sample.image, NAME_PROMPT, ", ".join(names))
            yield sample


def build_processor(preset: ModelPreset, corpus: list[str]) -> Qwen3VLProcessor:
    """A `Qwen3VLProcessor` with the preset's tokenizer and Qwen3-VL's image settings."""
    assert preset.vision is not None
    tokenizer = real_tokenizer() if preset.tokenizer == "qwen3" else train_tokenizer(preset, corpus)
    patch = preset.vision.patch_size
    image_processor = Qwen2VLImageProcessor(
        patch_size=patch,
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=preset.image.min_pixels,
        max_pixels=preset.image.max_pixels,
        image_mean=list(preset.vision.image_mean),
        image_std=list(preset.vision.image_std),
    )
    video_processor = Qwen3VLVideoProcessor(patch_size=patch, merge_size=2, temporal_patch_size=2)
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def real_tokenizer() -> Any:
    """Qwen3's tokenizer as fetched at set-up, with the Qwen3-VL chat template written here."""
    tokenizer = AutoTokenizer.from_pretrained(qwen3_tokenizer.tokenizer_dir())
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def train_tokenizer(preset: ModelPreset, corpus: list[str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of `preset.vocab_size` tokens trained on `corpus`."""
    assert preset.vocab_size is not None
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=preset.vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # App names repeated so each becomes one token, as common words are in a real vocabulary.
    names = [" ".join(APP_WORDS) for _ in range(100)]
    bpe.train_from_iterator(corpus + names, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def build_model(preset: ModelPreset, processor: Any) -> Qwen3VLForConditionalGeneration:
    """A random-init Qwen3-VL of the preset's dimensions, wired to the processor's tokens."""
    assert preset.text is not None and preset.vision is not None
    config = model_config(preset, processor.tokenizer)
    torch.manual_seed(preset.pretrain.seed if preset.pretrain is not None else 0)
    dtype = getattr(torch, preset.weights_dtype)
    previous = torch.get_default_dtype()
    # Created in the saved dtype: a 2B model's fp32 copy would double the build's memory.
    torch.set_default_dtype(dtype)
    try:
        return Qwen3VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)


def model_config(preset: ModelPreset, tokenizer: Any) -> Qwen3VLConfig:
    """The `Qwen3VLConfig` of a local preset: its dimensions and the tokenizer's special ids."""
    assert preset.text is not None and preset.vision is not None
    text, vision = preset.text, preset.vision
    head = text.head_dim
    # Interleaved multimodal RoPE sections (temporal, height, width) must sum to head_dim / 2.
    third = head // 6
    sections = list(text.mrope_section or (head // 2 - 2 * third, third, third))
    token = tokenizer.convert_tokens_to_ids
    return Qwen3VLConfig(
        text_config={
            **text.model_dump(exclude={"rope_theta", "mrope_section"}),
            "vocab_size": vocab_rows(preset, tokenizer),
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": text.rope_theta,
                "mrope_section": sections,
                "mrope_interleaved": True,
            },
        },
        vision_config={
            **vision.model_dump(exclude={"deepstack_visual_indexes", "image_mean", "image_std"}),
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": text.hidden_size,
            "deepstack_visual_indexes": list(vision.deepstack_visual_indexes or [vision.depth - 1]),
        },
        image_token_id=token("<|image_pad|>"),
        video_token_id=token("<|video_pad|>"),
        vision_start_token_id=token("<|vision_start|>"),
        vision_end_token_id=token("<|vision_end|>"),
        tie_word_embeddings=True,
    )


def vocab_rows(preset: ModelPreset, tokenizer: Any) -> int:
    """Embedding rows: a trained tokenizer's own size, or the preset's (padded) vocabulary."""
    assert preset.vocab_size is not None
    if preset.tokenizer == "trained":
        return len(tokenizer)
    if preset.vocab_size < len(tokenizer):
        raise ConfigError(
            f"config/models.yaml: vocab_size {preset.vocab_size} is smaller than the tokenizer's "
            f"{len(tokenizer)} tokens; fix: set vocab_size to at least {len(tokenizer)}"
        )
    return preset.vocab_size


def pretrain(
    model: Qwen3VLForConditionalGeneration,
    processor: Any,
    preset: ModelPreset,
    samples: list[demo_data.Sample],
) -> None:
    """Full fine-tune on (screen, instruction) → expert answer, loss on the answer only."""
    assert preset.pretrain is not None
    spec = preset.pretrain
    encoded: list[Encoded] = [
        encode(processor, s.image, preset.image, None, s.instruction, s.answer) for s in samples
    ]
    optimizer, scheduler = adamw(
        model.parameters(), spec.learning_rate, spec.steps // 10, spec.steps
    )
    rng = random.Random(spec.seed)
    model.train()
    for step in range(spec.steps):
        batch = collate(processor, rng.sample(encoded, spec.batch_size), preset.image)
        labels = batch.pop("labels")
        loss = answer_loss(model(**batch).logits, labels)
        optimizer_step(loss, model.parameters(), optimizer, scheduler)
        if step % 50 == 0 or step == spec.steps - 1:
            log.info("pretrain step %d/%d loss %.3f", step + 1, spec.steps, loss.item())
    model.eval()
