"""Fast preprocessing equals the processor's own: encode, batch pixels, shards, lazy reading."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file

from modal_jobs import artifacts
from modal_jobs.config import ConfigError, ImageBounds, load_config
from modal_jobs.layout import Volumes
from modal_jobs.ml import shard_files
from modal_jobs.ml.batching import Encoded, collate, encode, read_screen, vision_inputs
from modal_jobs.ml.model import load_processor
from modal_jobs.serving.serve import load_image
from modal_jobs.stage import StageSpec
from modal_jobs.stages import dataset, shards
from tests.conftest import MakeConfig
from tests.processor_reference import encode_reference, vision_reference

BOUNDS = ImageBounds(min_pixels=4096, max_pixels=40960)
SYSTEM = "You are a router. Answer with the expert's name."


@pytest.fixture(scope="module")
def processor(tiny_base: str) -> Any:
    return load_processor(tiny_base)


def demo_screens(experts_dir: Path) -> Iterator[tuple[Image.Image, str, str]]:
    """Every demo screenshot (random sizes) with its instruction and answer."""
    for jsonl in sorted(experts_dir.glob("*/datasets/*.jsonl")):
        for line in jsonl.read_text().splitlines():
            row = json.loads(line)
            with Image.open(jsonl.parent / row["image"]) as image:
                image.load()
                yield image, row["messages"][0]["content"], row["messages"][1]["content"]


# Tiny, huge, elongated beyond what one smart_resize pass fits, and non-RGB inputs.
ODD_SCREENS = [
    Image.new("RGB", (20, 20), (200, 10, 10)),
    Image.new("RGB", (4000, 3000), (10, 200, 10)),
    Image.new("RGB", (3000, 40), (10, 10, 200)),
    Image.new("L", (90, 2500), 128),
    Image.new("RGBA", (640, 480), (1, 2, 3, 4)),
]


def assert_same(fast: Encoded, reference: Encoded) -> None:
    for field in ("input_ids", "mm_token_type_ids"):
        ours, theirs = getattr(fast, field), getattr(reference, field)
        assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs), field
    # Pixels: torchvision's uint8 bicubic (ours) vs PIL's (the reference) differ by rounding only.
    assert fast.pixels.dtype == reference.pixels.dtype == np.uint8
    assert fast.pixels.shape == reference.pixels.shape
    difference = np.abs(fast.pixels.astype(np.int16) - reference.pixels.astype(np.int16))
    assert difference.max() <= 2 and difference.mean() < 0.05
    assert (fast.prompt_len, fast.answer_end, fast.grid_thw) == (
        reference.prompt_len,
        reference.answer_end,
        reference.grid_thw,
    )


def test_encode_equals_the_processor_call(processor: Any, experts_dir: Path) -> None:
    samples = list(demo_screens(experts_dir))
    samples += [(image, "What is on this screen?", "calendar") for image in ODD_SCREENS]
    sizes = set()
    for n, (image, instruction, answer) in enumerate(samples):
        system = SYSTEM if n % 2 else None
        reply = answer if n % 3 else None
        fast = encode(processor, image, BOUNDS, system, instruction, reply)
        assert_same(fast, encode_reference(processor, image, BOUNDS, system, instruction, reply))
        sizes.add(fast.pixels.shape)
    assert len(samples) >= 100 and len(sizes) >= 5  # many screenshots, mixed sizes


@pytest.mark.parametrize("token", ["<|image_pad|>", "<|video_pad|>"])
def test_encode_rejects_placeholders_in_the_text_like_the_processor(
    processor: Any, token: str
) -> None:
    image = Image.new("RGB", (320, 240))
    with pytest.raises(ValueError):
        encode_reference(processor, image, BOUNDS, None, f"look {token}", "calendar")
    with pytest.raises(ValueError, match="remove them from the instruction"):
        encode(processor, image, BOUNDS, None, f"look {token}", "calendar")


def test_batch_pixels_equal_the_image_processor(processor: Any, experts_dir: Path) -> None:
    screens = [image for image, _, _ in demo_screens(experts_dir)][:40]
    items = [encode(processor, image, BOUNDS, None, "x", "calendar") for image in screens]
    for start in range(0, len(items), 8):
        pixels = [item.pixels for item in items[start : start + 8]]
        assert len({p.shape for p in pixels}) > 1  # mixed sizes in one batch
        ours = vision_inputs(processor, pixels)
        theirs = vision_reference(processor, pixels, BOUNDS)
        assert ours["pixel_values"].dtype == theirs["pixel_values"].dtype == torch.float32
        torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"], rtol=0, atol=1e-6)
        assert torch.equal(ours["image_grid_thw"], theirs["image_grid_thw"])


def test_collate_equals_the_image_processor_with_elongated_screens(processor: Any) -> None:
    items = [encode(processor, image, BOUNDS, None, "x", "map") for image in ODD_SCREENS]
    batch = collate(processor, items, BOUNDS)
    theirs = vision_reference(processor, [item.pixels for item in items], BOUNDS)
    torch.testing.assert_close(batch["pixel_values"], theirs["pixel_values"], rtol=0, atol=1e-6)
    assert torch.equal(batch["image_grid_thw"], theirs["image_grid_thw"])
    grids = [item.grid_thw for item in items]
    assert batch["image_grid_thw"].tolist() == [list(grid) for grid in grids]


@pytest.fixture
def small_run(make_config: MakeConfig, tiny_base: str) -> StageSpec:
    """A written routing dataset of 4 screens per expert on the session's volumes."""
    spec = StageSpec(
        run="preprocess", config=load_config(make_config(count=4)), volumes=Volumes.local()
    )
    dataset.run(spec)
    return spec


def test_shards_are_the_same_bytes_whatever_the_workers(
    small_run: StageSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(shards.WORKERS_ENV, "1")
    shards.run(small_run)
    one = tmp_path / "one"
    shutil.copytree(small_run.layout.shards, one)

    # Two workers, forced to share: helpers start after the first piece, and this process
    # waits for one to be up before each piece, so the helper surely encodes some pieces.
    monkeypatch.setenv(shards.WORKERS_ENV, "2")
    monkeypatch.setattr(shards, "PIECE_SIZE", 3)
    monkeypatch.setattr(shards, "HELPER_START_SECONDS", 0.0)
    pools: list[shards.Helpers] = []
    start_helpers, encode_here = shards.Helpers.__init__, shards.Encoder.encode

    def record(self: shards.Helpers, *args: Any) -> None:
        start_helpers(self, *args)
        pools.append(self)

    def after_a_helper_started(self: shards.Encoder, *args: Any) -> list[Encoded]:
        deadline = time.monotonic() + 300
        while pools and not any(f.done() for f in pools[0].started) and time.monotonic() < deadline:
            time.sleep(0.1)
        return encode_here(self, *args)

    monkeypatch.setattr(shards.Helpers, "__init__", record)
    monkeypatch.setattr(shards.Encoder, "encode", after_a_helper_started)
    shards.run(small_run)
    two = small_run.layout.shards

    assert pools and pools[0].encoded >= 1
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
    for file in one.iterdir():
        assert file.read_bytes() == (two / file.name).read_bytes(), file.name


def test_load_split_reads_samples_lazily(
    small_run: StageSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shards, "SHARD_SIZE", 5)  # several shards per split
    shards.run(small_run)
    folder = small_run.layout.shards
    index = artifacts.read_index(folder)
    files = index["splits"]["train"]["files"]
    assert len(files) > 1
    eager = [item for f in files for item in shard_files.unpack(load_file(str(folder / f["name"])))]
    split = shard_files.load_split(folder, index, "train")
    assert len(split.items) == len(eager) == len(split.classes)
    assert isinstance(split.items, shard_files.SplitSamples)
    for shard in split.items.shards:
        assert "pixels" not in shard.arrays  # pixels stay in the mapped file until asked for
    for n, item in enumerate(split.items):
        assert_same(item, eager[n])
    assert_same(split.items[-1], eager[-1])
    assert [i.prompt_len for i in split.items[2:7]] == [i.prompt_len for i in eager[2:7]]
    with pytest.raises(IndexError):
        split.items[len(eager)]


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_workers_env_must_be_a_positive_count(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(shards.WORKERS_ENV, value)
    with pytest.raises(ConfigError, match=shards.WORKERS_ENV):
        shards.preprocess_workers()


def test_workers_default_to_the_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(shards.WORKERS_ENV, raising=False)
    assert 1 <= shards.preprocess_workers() <= shards.MAX_DEFAULT_WORKERS
    monkeypatch.setenv(shards.WORKERS_ENV, "3")
    assert shards.preprocess_workers() == 3


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "I;16", "1"])
@pytest.mark.parametrize("suffix", [".png", ".jpg"])
@pytest.mark.parametrize("reader", ["read_screen", "load_image"])
def test_decoding_gives_pillows_rgb_pixels(
    tmp_path: Path, mode: str, suffix: str, reader: str
) -> None:
    """Tokenization's file reader and serving's body decoder (libspng first) match Pillow."""
    rng = np.random.default_rng(3)
    rgb = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    image = rgb.convert(mode) if mode != "I;16" else rgb.convert("L").convert("I;16")
    if suffix == ".jpg" and mode not in ("RGB", "L"):
        image = image.convert("RGB")
    path = tmp_path / f"screen{suffix}"
    image.save(path)
    with Image.open(path) as reference:
        expected = np.array(reference.convert("RGB"))
    got = read_screen(path) if reader == "read_screen" else load_image(path.read_bytes())
    assert isinstance(got, np.ndarray) and got.dtype == np.uint8 and got.shape == (37, 53, 3)
    assert np.array_equal(got, expected)
