"""Shard files: samples as flat safetensors arrays, read back lazily from mapped files."""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np
from safetensors import safe_open

from modal_jobs.ml.batching import Encoded


def pack(items: list[Encoded], classes: np.ndarray) -> dict[str, np.ndarray]:
    """Flatten encoded samples into arrays + offsets (one safetensors shard)."""
    lengths = np.array([len(i.input_ids) for i in items], dtype=np.int64)
    pixel_sizes = np.array([i.pixels.size for i in items], dtype=np.int64)
    return {
        "input_ids": np.concatenate([i.input_ids for i in items]).astype(np.int32),
        "mm_token_type_ids": np.concatenate([i.mm_token_type_ids for i in items]),
        "token_offsets": np.concatenate([[0], np.cumsum(lengths)]),
        "prompt_len": np.array([i.prompt_len for i in items], dtype=np.int64),
        "answer_end": np.array([i.answer_end for i in items], dtype=np.int64),
        "pixels": np.concatenate([i.pixels.reshape(-1) for i in items]),
        "pixel_offsets": np.concatenate([[0], np.cumsum(pixel_sizes)]),
        "pixel_hw": np.array([i.pixels.shape[:2] for i in items], dtype=np.int64),
        "grid_thw": np.array([i.grid_thw for i in items], dtype=np.int64),
        "classes": classes,
    }


@dataclass(frozen=True)
class Split:
    """One tokenized split loaded back: samples and their class indices.

    Also each sample's token count and image grid, known without reading any pixels.
    """

    items: Sequence[Encoded]
    classes: np.ndarray
    lengths: np.ndarray
    grids: np.ndarray

    @classmethod
    def of(cls, items: Sequence[Encoded], classes: np.ndarray) -> Split:
        """A split of samples already in memory."""
        lengths = np.array([len(item.input_ids) for item in items], dtype=np.int64)
        grids = np.array([item.grid_thw for item in items], dtype=np.int64).reshape(-1, 3)
        return cls(items, classes, lengths, grids)

    def subset(self, keep: Sequence[int]) -> Split:
        """The samples at `keep`, in that order."""
        picks = np.asarray(keep, dtype=np.int64)
        items = [self.items[int(i)] for i in picks]
        return Split(items, self.classes[picks], self.lengths[picks], self.grids[picks])


def load_split(shards_dir: Path, index: dict[str, Any], split: str) -> Split:
    """Open every shard of a split; samples are read from the mapped files when asked for."""
    shards = [ShardSamples(shards_dir / entry["name"]) for entry in index["splits"][split]["files"]]

    def column(values: Callable[[dict[str, np.ndarray]], np.ndarray], shape: Any) -> np.ndarray:
        parts = [values(shard.arrays) for shard in shards]
        return np.concatenate(parts) if parts else np.zeros(shape, dtype=np.int64)

    return Split(
        SplitSamples(shards),
        column(lambda arrays: arrays["classes"], 0),
        column(lambda arrays: np.diff(arrays["token_offsets"]), 0),
        column(lambda arrays: arrays["grid_thw"], (0, 3)),
    )


# Everything in a shard but the pixels: a few numbers per sample, loaded whole.
TOKEN_ARRAYS = (
    "input_ids",
    "mm_token_type_ids",
    "token_offsets",
    "prompt_len",
    "answer_end",
    "pixel_offsets",
    "pixel_hw",
    "grid_thw",
    "classes",
)


class Samples(Sequence[Encoded]):
    """A read-only sequence of samples built on demand by `_sample(n)`."""

    def __len__(self) -> int:
        raise NotImplementedError

    def _sample(self, n: int) -> Encoded:
        raise NotImplementedError

    @overload
    def __getitem__(self, key: int) -> Encoded: ...

    @overload
    def __getitem__(self, key: slice) -> list[Encoded]: ...

    def __getitem__(self, key: int | slice) -> Encoded | list[Encoded]:
        if isinstance(key, slice):
            return [self._sample(n) for n in range(*key.indices(len(self)))]
        return self._sample(range(len(self))[key])


class ShardSamples(Samples):
    """One shard's samples: token arrays in memory, each sample's pixels sliced from the file."""

    def __init__(self, path: Path) -> None:
        handle: Any = safe_open(str(path), framework="numpy")  # memory-maps the file
        self.arrays: dict[str, np.ndarray] = {key: handle.get_tensor(key) for key in TOKEN_ARRAYS}
        self.pixels = handle.get_slice("pixels")

    def __len__(self) -> int:
        return len(self.arrays["prompt_len"])

    def _sample(self, n: int) -> Encoded:
        return sample(self.arrays, self.pixels, n)


class SplitSamples(Samples):
    """The samples of several shards as one sequence, in shard order."""

    def __init__(self, shards: list[ShardSamples]) -> None:
        self.shards = shards
        self.starts = list(itertools.accumulate((len(shard) for shard in shards), initial=0))

    def __len__(self) -> int:
        return self.starts[-1]

    def _sample(self, n: int) -> Encoded:
        shard = bisect.bisect_right(self.starts, n) - 1
        return self.shards[shard][n - self.starts[shard]]


def unpack(arrays: dict[str, np.ndarray]) -> list[Encoded]:
    """Inverse of `pack`."""
    return [sample(arrays, arrays["pixels"], n) for n in range(len(arrays["prompt_len"]))]


def sample(arrays: dict[str, np.ndarray], pixels: Any, n: int) -> Encoded:
    """Sample `n` of a shard's arrays; `pixels` is the flat pixel array or a lazy slice of it."""
    tok, pix = arrays["token_offsets"], arrays["pixel_offsets"]
    height, width = (int(v) for v in arrays["pixel_hw"][n])
    t, h, w = (int(v) for v in arrays["grid_thw"][n])
    return Encoded(
        input_ids=arrays["input_ids"][tok[n] : tok[n + 1]],
        mm_token_type_ids=arrays["mm_token_type_ids"][tok[n] : tok[n + 1]],
        prompt_len=int(arrays["prompt_len"][n]),
        answer_end=int(arrays["answer_end"][n]),
        pixels=pixels[int(pix[n]) : int(pix[n + 1])].reshape(height, width, 3),
        grid_thw=(t, h, w),
    )
