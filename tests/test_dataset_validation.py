"""Tests for the `routing_dataset` stage: the happy path, and every expert-data defect failing
the stage with `file:line: problem` while writing nothing."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from modal_jobs.artifacts import OOD_SPLITS, SPLITS, read_split
from modal_jobs.config import load_config
from modal_jobs.demo_data.ood import OOD_KINDS
from modal_jobs.hashing import expert_version
from modal_jobs.layout import Volumes
from modal_jobs.stage import StageSpec
from modal_jobs.stages import dataset
from modal_jobs.stages.dataset import DatasetError

from .conftest import OOD_COUNT, MakeConfig, copy_experts

EXPERTS = ("calendar", "code_editor", "email", "map", "spreadsheet", "terminal")
COUNT = 6
KEEP = 12  # samples kept per expert in each private copy (fewer images to decode: faster)


@dataclass
class Env:
    """A private copy of the experts plus a config and volumes pointing at it."""

    experts: Path
    home: Path
    make_config: MakeConfig

    def spec(self, count: int = COUNT, **dataset_overrides: Any) -> StageSpec:
        cfg = self.make_config(experts=self.experts, count=count, dataset=dataset_overrides)
        return StageSpec(run="v", config=load_config(cfg), volumes=Volumes.local(self.home))

    def jsonl(self, expert: str = "map") -> Path:
        return self.experts / expert / "datasets" / "demo.jsonl"

    def image(self, index: int, expert: str = "map") -> Path:
        return self.experts / expert / "datasets" / "images" / f"{index:05d}.png"

    def edit_line(
        self, number: int, change: Callable[[dict[str, Any]], Any], expert: str = "map"
    ) -> None:
        """Replace line `number` (1-based) of the expert's JSONL with `change(row)`."""
        path = self.jsonl(expert)
        lines = path.read_text(encoding="utf-8").splitlines()
        new = change(json.loads(lines[number - 1]))
        lines[number - 1] = new if isinstance(new, str) else json.dumps(new)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture
def env(tmp_path: Path, experts_dir: Path, make_config: MakeConfig) -> Env:
    """A private copy of the session's demo experts, trimmed to KEEP samples each."""
    experts = copy_experts(experts_dir, tmp_path / "experts")
    for expert in EXPERTS:
        data = experts / expert / "datasets"
        rows = [json.loads(line) for line in (data / "demo.jsonl").read_text().splitlines()]
        (data / "demo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:KEEP]))
        for row in rows[KEEP:]:
            (data / row["image"]).unlink()
    return Env(experts, tmp_path / "home", make_config)


def fails(spec: StageSpec) -> str:
    """Run the stage expecting a DatasetError and no output at all; return the message."""
    with pytest.raises(DatasetError) as err:
        dataset.run(spec)
    assert not spec.layout.dataset.exists()
    if spec.layout.root.exists():
        assert list(spec.layout.root.glob(".routing_dataset.*")) == []
    return str(err.value)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- happy path ------------------------------------------------------------------------------


def test_happy_path_writes_splits_and_manifest(env: Env) -> None:
    spec = env.spec(count=10)
    result = dataset.run(spec)
    root = spec.layout.dataset
    assert sorted(p.name for p in root.iterdir()) == [
        "eval.jsonl",
        "images",
        "manifest.json",
        "ood_eval.jsonl",
        "ood_val.jsonl",
        "train.jsonl",
        "val.jsonl",
    ]
    assert list(spec.layout.root.glob(".routing_dataset.*")) == []

    manifest = json.loads((root / "manifest.json").read_text())
    rows = {split: read_split(root, split) for split in SPLITS}
    assert all(rows[split] for split in SPLITS)
    for split in SPLITS:
        assert manifest["counts"][split] == dict(Counter(r["expert"] for r in rows[split]))
        assert manifest["split_sha256"][split] == sha(root / f"{split}.jsonl")
    per_expert = Counter(r["expert"] for split in SPLITS for r in rows[split])
    assert per_expert == dict.fromkeys(EXPERTS, 10)

    # Every row points at a content-addressed copy of its source image.
    for row in (r for split in SPLITS for r in rows[split]):
        image = root / row["image"]
        assert image.is_file() and image.name == f"{sha(image)}.png"
        assert row["label"] == ("code" if row["expert"] == "code_editor" else row["expert"])
    assert manifest["labels"]["code_editor"] == "code"

    # No image (by path or by content) appears in two splits.
    paths = {split: {r["image"] for r in rows[split]} for split in SPLITS}
    contents = {split: {sha(root / p) for p in paths[split]} for split in SPLITS}
    for a, b in (("train", "val"), ("train", "eval"), ("val", "eval")):
        assert not paths[a] & paths[b]
        assert not contents[a] & contents[b]

    assert manifest["run"] == "v"
    assert manifest["source_versions"] == {
        name: expert_version(env.experts / name) for name in EXPERTS
    }
    assert len(set(manifest["source_versions"].values())) == 6
    assert [(c.name, c.passed) for c in result.checks] == [
        ("class_balance", True),
        ("split_leakage", True),
        ("images_decodable", True),
    ]
    assert result.data_version == manifest["dataset_version"][:16]
    assert result.metadata["num_samples"]["raw_value"] == 60

    # Screens of no expert: every kind in both parts, no label, none shared with another split.
    ood = {split: read_split(root, split) for split in OOD_SPLITS}
    assert manifest["ood_counts"] == {"ood_val": OOD_COUNT // 2, "ood_eval": OOD_COUNT // 2}
    every = {p for rows_ in rows.values() for p in (r["image"] for r in rows_)}
    for ood_rows in ood.values():
        assert {r["kind"] for r in ood_rows} == set(OOD_KINDS)
        assert all("expert" not in r and "label" not in r for r in ood_rows)
        images = {r["image"] for r in ood_rows}
        assert len(images) == len(ood_rows) and not images & every
        assert all((root / p).name == f"{sha(root / p)}.png" for p in images)
    assert not {r["image"] for r in ood["ood_val"]} & {r["image"] for r in ood["ood_eval"]}


def test_rerun_is_deterministic(env: Env) -> None:
    spec = env.spec()
    first = dataset.run(spec)
    before = (spec.layout.dataset / "manifest.json").read_bytes()
    second = dataset.run(spec)
    assert second.data_version == first.data_version
    assert (spec.layout.dataset / "manifest.json").read_bytes() == before
    assert list(spec.layout.root.glob(".routing_dataset.*")) == []


def test_changed_source_changes_versions(env: Env) -> None:
    """Editing one expert's data changes its source version (and only its)."""
    spec = env.spec()
    dataset.run(spec)
    before = json.loads((spec.layout.dataset / "manifest.json").read_text())
    env.edit_line(
        1,
        lambda row: {
            **row,
            "messages": [*row["messages"][:1], {"role": "assistant", "content": "edited"}],
        },
    )
    dataset.run(spec)
    after = json.loads((spec.layout.dataset / "manifest.json").read_text())
    changed = {n for n in EXPERTS if before["source_versions"][n] != after["source_versions"][n]}
    assert changed == {"map"}


# --- one defect at a time --------------------------------------------------------------------


def test_malformed_json_line(env: Env) -> None:
    env.edit_line(2, lambda _row: "{not json")
    message = fails(env.spec())
    assert f"{env.jsonl()}:2: malformed JSON" in message
    assert "1 problem(s)" in message


def test_wrong_field_type(env: Env) -> None:
    env.edit_line(3, lambda row: {**row, "id": 5})
    message = fails(env.spec())
    assert f"{env.jsonl()}:3: field 'id' must be a non-empty string" in message


def test_missing_messages_user_turn(env: Env) -> None:
    env.edit_line(4, lambda row: {**row, "messages": [{"role": "assistant", "content": "x"}]})
    message = fails(env.spec())
    assert f"{env.jsonl()}:4: messages must contain a user message" in message


def test_missing_image_file(env: Env) -> None:
    env.image(2).unlink()
    message = fails(env.spec())
    assert f"{env.jsonl()}:3: image 'images/00002.png' not found at {env.image(2)}" in message


def test_truncated_png(env: Env) -> None:
    data = env.image(2).read_bytes()
    env.image(2).write_bytes(data[: len(data) // 2])
    message = fails(env.spec())
    assert f"{env.jsonl()}:3: image 'images/00002.png': not a decodable image" in message
    assert "truncated" in message


def test_zero_byte_image(env: Env) -> None:
    env.image(2).write_bytes(b"")
    message = fails(env.spec())
    assert f"{env.jsonl()}:3: image 'images/00002.png': zero-byte file" in message


def test_text_file_named_png(env: Env) -> None:
    env.image(2).write_text("this is not an image\n")
    message = fails(env.spec())
    assert f"{env.jsonl()}:3: image 'images/00002.png': not a decodable image" in message
    assert "cannot identify image file" in message


def test_image_path_escaping_expert_folder(env: Env) -> None:
    outside = env.experts.parent / "other" / "x.png"
    outside.parent.mkdir()
    shutil.copyfile(env.image(0), outside)  # a valid image: only the location is wrong
    assert (env.jsonl().parent / "../../../other/x.png").resolve() == outside.resolve()
    env.edit_line(3, lambda row: {**row, "image": "../../../other/x.png"})
    message = fails(env.spec())
    assert (
        f"{env.jsonl()}:3: image path '../../../other/x.png' escapes the expert folder "
        f"{env.experts / 'map'}"
    ) in message


def test_absolute_image_path(env: Env) -> None:
    absolute = str(env.image(2))
    env.edit_line(3, lambda row: {**row, "image": absolute})
    message = fails(env.spec())
    assert f"{env.jsonl()}:3: image path '{absolute}' is absolute; fix: make it relative" in message


def test_symlink_pointing_outside_expert(env: Env) -> None:
    outside = env.experts.parent / "other" / "x.png"
    outside.parent.mkdir()
    shutil.copyfile(env.image(0), outside)
    link = env.image(0).parent / "link.png"
    os.symlink(outside, link)
    env.edit_line(3, lambda row: {**row, "image": "images/link.png"})
    message = fails(env.spec())
    assert f"{env.jsonl()}:3: image path 'images/link.png' escapes the expert folder" in message


def test_symlink_inside_expert_is_allowed(env: Env) -> None:
    """A symlink that stays inside the expert folder is not an escape."""
    os.symlink(env.image(0), env.image(0).parent / "link.png")
    env.edit_line(3, lambda row: {**row, "image": "images/link.png"})
    dataset.run(env.spec())


def test_duplicate_id_names_both_lines(env: Env) -> None:
    first_id = json.loads(env.jsonl().read_text().splitlines()[1])["id"]
    env.edit_line(5, lambda row: {**row, "id": first_id})
    message = fails(env.spec())
    assert (f"{env.jsonl()}:5: duplicate id '{first_id}' (first at {env.jsonl()}:2)") in message


def test_duplicate_id_across_files(env: Env) -> None:
    extra = env.jsonl().parent / "more" / "extra.jsonl"
    extra.parent.mkdir()
    row = json.loads(env.jsonl().read_text().splitlines()[0])
    extra.write_text(json.dumps({**row, "image": "../images/00000.png"}) + "\n")
    message = fails(env.spec())
    assert f"{extra}:1: duplicate id '{row['id']}' (first at {env.jsonl()}:1)" in message


def test_empty_expert_without_jsonl(env: Env) -> None:
    env.jsonl().unlink()
    message = fails(env.spec())
    assert f"{env.experts / 'map'}: empty expert: no datasets/**/*.jsonl files" in message


def test_empty_expert_with_empty_jsonl(env: Env) -> None:
    env.jsonl().write_text("\n")
    message = fails(env.spec(shortfall="use_available"))
    assert f"{env.experts / 'map'}: empty expert: its JSONL files hold no samples" in message


def test_configured_expert_without_folder(env: Env) -> None:
    shutil.rmtree(env.experts / "map")
    spec = env.spec()
    message = fails(spec)
    assert (
        f"{env.experts / 'map'}: expert 'map' is in {spec.config.config_dir / 'dataset.yaml'}"
        " but has no folder"
    ) in message


def test_expert_folder_not_in_config(env: Env) -> None:
    shutil.copytree(env.experts / "map", env.experts / "weather")
    message = fails(env.spec())
    assert f"{env.experts / 'weather'}: expert 'weather' has data but is not in" in message
    assert "fix: add it under `experts:`" in message


def test_missing_experts_dir(env: Env) -> None:
    shutil.rmtree(env.experts)
    message = fails(env.spec())
    assert f"experts_dir {env.experts} does not exist" in message
    assert "mole demo-data" in message


def test_count_above_available_then_use_available(env: Env) -> None:
    lines = env.jsonl().read_text().splitlines()
    env.jsonl().write_text("\n".join(lines[:5]) + "\n")
    message = fails(env.spec(count=8))
    assert "not enough expert data: 1 problem(s)" in message
    assert (
        f"{env.experts / 'map'}: dataset.yaml asks for 8 samples of 'map' but only 5 exist; "
        "fix: lower `count` or set `shortfall: use_available`"
    ) in message

    spec = env.spec(count=8, shortfall="use_available")
    result = dataset.run(spec)
    rows = [r for split in SPLITS for r in read_split(spec.layout.dataset, split)]
    assert Counter(r["expert"] for r in rows) == {**dict.fromkeys(EXPERTS, 8), "map": 5}
    assert all(check.passed for check in result.checks)


# --- failures never touch what exists --------------------------------------------------------


def test_good_dataset_survives_failing_run(env: Env) -> None:
    spec = env.spec()
    dataset.run(spec)
    manifest = spec.layout.dataset / "manifest.json"
    before = manifest.read_bytes()
    listing = sorted(p.relative_to(spec.layout.dataset) for p in spec.layout.dataset.rglob("*"))
    env.edit_line(2, lambda _row: "{broken")
    with pytest.raises(DatasetError, match="malformed JSON"):
        dataset.run(spec)
    assert manifest.read_bytes() == before
    assert (
        sorted(p.relative_to(spec.layout.dataset) for p in spec.layout.dataset.rglob("*"))
        == listing
    )
    assert sorted(p.name for p in spec.layout.root.iterdir()) == ["routing_dataset"]


def test_multiple_defects_in_one_error(env: Env) -> None:
    env.edit_line(2, lambda _row: "{broken")
    env.image(1, "email").write_bytes(b"")
    env.image(4, "calendar").unlink()
    shutil.copytree(env.experts / "terminal", env.experts / "weather")
    message = fails(env.spec())
    assert f"invalid expert data under {env.experts}: 4 problem(s)" in message
    expected = [
        f"{env.jsonl()}:2: malformed JSON",
        f"{env.jsonl('email')}:2: image 'images/00001.png': zero-byte file",
        f"{env.jsonl('calendar')}:5: image 'images/00004.png' not found",
        f"{env.experts / 'weather'}: expert 'weather' has data but is not in",
    ]
    for fragment in expected:
        assert fragment in message


def test_empty_jsonl_reported_alongside_other_defects(env: Env) -> None:
    env.edit_line(2, lambda _row: "{broken", expert="calendar")
    env.jsonl("map").write_text("")
    message = fails(env.spec())
    assert f"{env.jsonl('calendar')}:2: malformed JSON" in message
    assert f"{env.experts / 'map'}: empty expert" in message


def test_same_image_in_two_experts_does_not_leak(env: Env) -> None:
    spec = env.spec(count=KEEP)
    dataset.run(spec)
    rows = {split: read_split(spec.layout.dataset, split) for split in SPLITS}
    manifest = (spec.layout.dataset / "manifest.json").read_text()

    def first_index(split: str, expert: str) -> int:
        row = next(r for r in rows[split] if r["expert"] == expert)
        return int(row["id"].rsplit("-", 1)[1])

    # Give a `map` training sample the very screenshot of a `calendar` eval sample: the two
    # labels contradict each other, and splitting either expert alone would leak the image.
    calendar, map_ = first_index("eval", "calendar"), first_index("train", "map")
    shutil.copyfile(env.image(calendar, "calendar"), env.image(map_, "map"))
    with pytest.raises(DatasetError) as err:
        dataset.run(spec)
    # Line n + 1 of a demo JSONL holds sample n; both claims are named, with the fix.
    assert (
        f"{env.jsonl('map')}:{map_ + 1}: the same image is also used by expert 'calendar' at "
        f"{env.jsonl('calendar')}:{calendar + 1}; fix: keep each screenshot in one expert"
    ) in str(err.value)
    assert (spec.layout.dataset / "manifest.json").read_text() == manifest  # the old one stays
    assert sorted(p.name for p in spec.layout.root.iterdir()) == ["routing_dataset"]


def test_one_screenshot_twice_in_an_expert_lands_in_one_split(env: Env) -> None:
    shutil.copyfile(env.image(0), env.image(1))
    spec = env.spec(count=KEEP)
    result = dataset.run(spec)
    split_of = {
        row["id"].rsplit("-", 1)[1]: split
        for split in SPLITS
        for row in read_split(spec.layout.dataset, split)
        if row["expert"] == "map"
    }
    assert split_of["00000"] == split_of["00001"]
    leakage = next(check for check in result.checks if check.name == "split_leakage")
    assert leakage.passed and leakage.metadata["shared_images"]["raw_value"] == 0


def test_split_leakage_check_counts_an_image_in_two_splits(env: Env) -> None:
    spec = env.spec(count=KEEP)
    dataset.run(spec)
    train_row = read_split(spec.layout.dataset, "train")[0]
    eval_file = spec.layout.dataset / "eval.jsonl"
    rows = [json.loads(line) for line in eval_file.read_text().splitlines()]
    rows[0]["image"] = train_row["image"]  # a dataset written by something less careful
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    leakage = next(
        c for c in dataset.verify(spec.layout.dataset, spec) if c.name == "split_leakage"
    )
    assert not leakage.passed and leakage.metadata["shared_images"]["raw_value"] == 1
