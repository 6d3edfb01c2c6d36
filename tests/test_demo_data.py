"""Tests for modal_jobs.demo_data: dataset format, determinism, atomicity and separability."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from modal_jobs import demo_data
from modal_jobs.demo_data import EXPERTS, Sample, render_sample, write_demo_data, writer

FORBIDDEN = re.compile(
    r"\b(calendar|spreadsheet|terminal|email|code_editor|code|editor|map)\b", re.IGNORECASE
)


def _records(out: Path, expert: str) -> list[dict[str, Any]]:
    """Parse ``<out>/<expert>/datasets/demo.jsonl``."""
    text = (out / expert / "datasets" / "demo.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


def _flaky_render(fail_on: int) -> Any:
    """A render_sample stand-in that raises on its ``fail_on``-th call."""
    real = demo_data.render_sample
    calls = {"n": 0}

    def render(expert: str, rng: random.Random) -> Sample:
        calls["n"] += 1
        if calls["n"] == fail_on:
            raise RuntimeError("boom")
        return real(expert, rng)

    return render


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    """Three samples per expert written once for the format tests."""
    out = tmp_path_factory.mktemp("demo")
    return out, write_demo_data(out, per_expert=3, seed=7)


def test_counts_and_folders(written: tuple[Path, dict[str, int]]) -> None:
    """Every expert gets a folder and nothing else (no temp folders) is left behind."""
    out, counts = written
    assert counts == dict.fromkeys(EXPERTS, 3)
    assert sorted(p.name for p in out.iterdir()) == sorted(EXPERTS)
    for expert in EXPERTS:
        images = sorted(p.name for p in (out / expert / "datasets" / "images").iterdir())
        assert images == ["00000.png", "00001.png", "00002.png"]


def test_jsonl_format(written: tuple[Path, dict[str, int]]) -> None:
    """Records have the documented keys, ids, relative image paths and message roles."""
    out, _ = written
    ids = []
    for expert in EXPERTS:
        ds = out / expert / "datasets"
        records = _records(out, expert)
        assert len(records) == 3
        for i, rec in enumerate(records):
            assert set(rec) == {"id", "image", "messages"}
            assert rec["id"] == f"{expert}-7-{i:05d}"
            assert rec["image"] == f"images/{i:05d}.png"
            assert not Path(rec["image"]).is_absolute()
            assert (ds / rec["image"]).is_file()
            with Image.open(ds / rec["image"]) as img:
                img.load()
                assert img.format == "PNG" and img.mode == "RGB"
                assert 320 <= img.width <= 1280 and 240 <= img.height <= 800
            assert [m["role"] for m in rec["messages"]] == ["user", "assistant"]
            user, answer = (m["content"] for m in rec["messages"])
            # A screenshot-only sample has an empty instruction; every answer has text.
            assert isinstance(user, str) and isinstance(answer, str) and answer.strip()
            ids.append(rec["id"])
    assert len(ids) == len(set(ids))


def test_same_seed_same_bytes_different_seed_differs(tmp_path: Path) -> None:
    """Output is a pure function of the seed."""
    experts = ("terminal", "map")
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        write_demo_data(tmp_path / name, per_expert=2, seed=seed, experts=experts)
    for expert in experts:
        ds = {n: tmp_path / n / expert / "datasets" for n in "abc"}
        jsonl = {n: (d / "demo.jsonl").read_bytes() for n, d in ds.items()}
        png = {n: (d / "images" / "00001.png").read_bytes() for n, d in ds.items()}
        assert jsonl["a"] == jsonl["b"] and png["a"] == png["b"]
        assert jsonl["a"] != jsonl["c"] and png["a"] != png["c"]


def test_render_sample_is_deterministic() -> None:
    """Same RNG state, same sample."""
    for expert in EXPERTS:
        a = render_sample(expert, random.Random(11))
        b = render_sample(expert, random.Random(11))
        assert a.image.tobytes() == b.image.tobytes()
        assert (a.instruction, a.answer) == (b.instruction, b.answer)


def test_answers_never_name_an_expert() -> None:
    """Answers talk about the screen without naming any app, and vary their wording."""
    for expert in EXPERTS:
        first_words = set()
        for i in range(30):
            sample = render_sample(expert, random.Random(f"names:{expert}:{i}"))
            assert sample.instruction.strip() and sample.answer.strip()
            assert not FORBIDDEN.search(sample.answer), (expert, sample.answer)
            first_words.add(sample.answer.split()[0])
        assert len(first_words) >= 3, (expert, first_words)


def test_unknown_expert_is_rejected(tmp_path: Path) -> None:
    """An unknown expert name is a ValueError naming it and the known ones."""
    with pytest.raises(ValueError, match="weather") as err:
        render_sample("weather", random.Random(0))
    assert all(e in str(err.value) for e in EXPERTS)
    with pytest.raises(ValueError, match="weather") as err:
        write_demo_data(tmp_path / "out", 1, 0, experts=("calendar", "weather"))
    assert "calendar" in str(err.value)
    assert not (tmp_path / "out" / "calendar").exists()


@pytest.mark.parametrize("per_expert", [0, -3])
def test_per_expert_must_be_positive(tmp_path: Path, per_expert: int) -> None:
    """per_expert < 1 is a ValueError."""
    with pytest.raises(ValueError, match="per_expert"):
        write_demo_data(tmp_path / "out", per_expert, 0)
    assert not (tmp_path / "out").exists()


def test_failure_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash mid-way leaves no expert folder and no temporary folder."""
    out = tmp_path / "out"
    monkeypatch.setattr(writer, "render_sample", _flaky_render(3))
    with pytest.raises(RuntimeError, match="boom"):
        write_demo_data(out, per_expert=5, seed=0)
    assert not out.exists() or list(out.iterdir()) == []


def test_failed_rewrite_keeps_previous_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An existing expert folder survives a failed rewrite untouched."""
    write_demo_data(tmp_path, per_expert=2, seed=0, experts=("email",))
    before = (tmp_path / "email" / "datasets" / "demo.jsonl").read_bytes()
    monkeypatch.setattr(writer, "render_sample", _flaky_render(3))
    with pytest.raises(RuntimeError, match="boom"):
        write_demo_data(tmp_path, per_expert=4, seed=1, experts=("email",))
    assert [p.name for p in tmp_path.iterdir()] == ["email"]
    assert (tmp_path / "email" / "datasets" / "demo.jsonl").read_bytes() == before


def test_rewrite_replaces_folder(tmp_path: Path) -> None:
    """Rewriting an expert replaces the whole folder (no stale images survive)."""
    write_demo_data(tmp_path, per_expert=3, seed=0, experts=("map",))
    assert write_demo_data(tmp_path, per_expert=1, seed=5, experts=("map",)) == {"map": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["map"]
    assert [r["id"] for r in _records(tmp_path, "map")] == ["map-5-00000"]
    assert [p.name for p in (tmp_path / "map" / "datasets" / "images").iterdir()] == ["00000.png"]


def _features(path: Path) -> np.ndarray:
    """Mean RGB of a 4x4 grid of cells on the image resized to 64x40."""
    with Image.open(path) as img:
        small = img.convert("RGB").resize((64, 40), Image.Resampling.BILINEAR)
    pixels = np.asarray(small, dtype=np.float64)
    cells: np.ndarray = pixels.reshape(4, 10, 4, 16, 3).mean(axis=(1, 3)).ravel()
    return cells


def test_apps_are_visually_separable(tmp_path: Path) -> None:
    """Nearest-centroid on crude colour-layout features tells the apps apart."""
    write_demo_data(tmp_path, per_expert=20, seed=0)
    feats = {
        e: [_features(tmp_path / e / "datasets" / "images" / f"{i:05d}.png") for i in range(20)]
        for e in EXPERTS
    }
    centroids = {e: np.mean(f[:10], axis=0) for e, f in feats.items()}
    correct = 0
    for expert, f in feats.items():
        for x in f[10:]:
            guess = min(centroids, key=lambda c: float(np.linalg.norm(x - centroids[c])))
            correct += guess == expert
    accuracy = correct / (10 * len(EXPERTS))
    assert accuracy >= 0.9, accuracy
