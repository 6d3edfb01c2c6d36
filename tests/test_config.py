"""Tests for modal_jobs.config: the repo's config loads, and every kind of bad config becomes a
ConfigError naming the file, the line, the dotted key and a fix."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from modal_jobs.config import ConfigError, MoleConfig, load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    """A byte-for-byte copy of the repo's config/ (so line numbers match the originals)."""
    target = tmp_path / "cfgcopy"
    shutil.copytree(REPO / "config", target)
    return target


def edit(path: Path, old: str, new: str) -> int:
    """Replace the first `old` with `new` in `path`; return the 1-based line where it starts."""
    text = path.read_text(encoding="utf-8")
    assert old in text, f"fixture drift: {old!r} not in {path}"
    index = text.index(old)
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    return text[:index].count("\n") + 1


def line_of(path: Path, fragment: str) -> int:
    """1-based line of the first line of `path` that contains `fragment`."""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if fragment in line:
            return number
    raise AssertionError(f"{fragment!r} not in {path}")


def config_error(cfg_dir: Path) -> str:
    """load_config's error message, with the (test-named) temp dir replaced by `<cfg>`."""
    with pytest.raises(ConfigError) as err:
        load_config(cfg_dir)
    message = str(err.value)
    assert str(cfg_dir.resolve()) in message, message
    return message.replace(str(cfg_dir.resolve()), "<cfg>")


# --- the repo's own config -------------------------------------------------------------------


def test_repo_config_loads() -> None:
    config = load_config(REPO / "config")
    assert isinstance(config, MoleConfig)
    assert config.config_dir == (REPO / "config").resolve()
    assert sorted(config.dataset.experts) == [
        "calendar",
        "code_editor",
        "email",
        "map",
        "spreadsheet",
        "terminal",
    ]
    assert len(config.dataset.experts) == 6
    assert config.loras.base_model == "tiny"
    assert config.preset is config.models["tiny"]
    assert config.preset.source == "local"
    assert config.preset.text is not None and config.preset.vision is not None
    assert config.dataset.label_of("code_editor") == "code"
    assert config.dataset.label_of("map") == "map"
    assert config.experts_dir == (REPO / "data" / "experts").resolve()
    splits = config.dataset.splits
    assert splits.train + splits.val + splits.eval == pytest.approx(1.0)
    assert config.image_bounds.min_pixels <= config.image_bounds.max_pixels
    for name in ("qwen3-vl-2b", "qwen3-vl-4b", "qwen3-vl-8b"):
        assert config.models[name].source == "hub"
        assert config.models[name].repo_id


def test_config_dir_from_env(monkeypatch: pytest.MonkeyPatch, cfg: Path) -> None:
    monkeypatch.setenv("MOLE_CONFIG_DIR", str(cfg))
    assert load_config().config_dir == cfg.resolve()


def test_experts_dir_resolves_against_config_dir(cfg: Path) -> None:
    """A relative experts_dir is relative to the config folder, not the working directory."""
    assert load_config(cfg).experts_dir == (cfg.parent / "data" / "experts").resolve()


# --- dataset.yaml ----------------------------------------------------------------------------


def test_unknown_key_typo_under_expert(cfg: Path) -> None:
    """`cout:` instead of `count:`: file, line of the expert, its key path and a fix."""
    line = edit(cfg / "dataset.yaml", "map: {count: 100}", "map: {cout: 100}")
    message = config_error(cfg)
    assert message.startswith(f"<cfg>/dataset.yaml:{line}: key 'experts.map"), message
    assert "fix:" in message


def test_unknown_key_typo_names_the_misspelt_key(cfg: Path) -> None:
    edit(cfg / "dataset.yaml", "map: {count: 100}", "map: {cout: 100}")
    message = config_error(cfg)
    assert "key 'experts.map.cout'" in message, message
    assert "check its spelling" in message


def test_unknown_optional_key(cfg: Path) -> None:
    """A misspelt optional key (`lable:`) is named with the spelling fix."""
    line = edit(
        cfg / "dataset.yaml",
        "code_editor: {count: 100, label: code}",
        "code_editor: {count: 100, lable: code}",
    )
    message = config_error(cfg)
    assert message.startswith(f"<cfg>/dataset.yaml:{line}: key 'experts.code_editor.lable'"), (
        message
    )
    assert "fix: remove the key or check its spelling" in message


def test_unknown_top_level_key(cfg: Path) -> None:
    line = edit(cfg / "dataset.yaml", "seed: 17", "sed: 17")
    message = config_error(cfg)
    assert message.startswith(f"<cfg>/dataset.yaml:{line}: key 'sed'"), message
    assert "fix: remove the key or check its spelling" in message


def test_split_fractions_must_sum_to_one(cfg: Path) -> None:
    edit(cfg / "dataset.yaml", "  val: 0.1", "  val: 0.2")
    line = line_of(cfg / "dataset.yaml", "splits:")
    message = config_error(cfg)
    assert message.startswith(f"<cfg>/dataset.yaml:{line}: key 'splits'"), message
    assert "must sum to 1, got 1.1" in message
    assert "fix:" in message


def test_negative_count(cfg: Path) -> None:
    line = edit(cfg / "dataset.yaml", "email: {count: 100}", "email: {count: -3}")
    message = config_error(cfg)
    assert message.startswith(f"<cfg>/dataset.yaml:{line}: key 'experts.email.count'"), message
    assert "greater than 0" in message
    assert "fix:" in message


def test_only_one_expert(cfg: Path) -> None:
    path = cfg / "dataset.yaml"
    text = path.read_text()
    head = text[: text.index("experts:\n")]
    path.write_text(head + "experts:\n  calendar: {count: 100}\n")
    line = line_of(path, "experts:")
    message = config_error(cfg)
    assert message.startswith(f"<cfg>/dataset.yaml:{line}: key 'experts'"), message
    assert "at least two experts" in message
    assert "fix:" in message


def test_bad_expert_name(cfg: Path) -> None:
    edit(cfg / "dataset.yaml", "map: {count: 100}", "../map: {count: 100}")
    line = line_of(cfg / "dataset.yaml", "experts:")
    message = config_error(cfg)
    assert message.startswith(f"<cfg>/dataset.yaml:{line}: key 'experts'"), message
    assert "invalid expert name '../map'" in message
    assert "fix:" in message


def test_dataset_min_pixels_above_max_pixels(cfg: Path) -> None:
    edit(cfg / "dataset.yaml", "min_pixels: 4096", "min_pixels: 99999")
    line = line_of(cfg / "dataset.yaml", "image:")
    message = config_error(cfg)
    assert message.startswith(f"<cfg>/dataset.yaml:{line}: key 'image'"), message
    assert "min_pixels must not exceed max_pixels" in message
    assert "fix:" in message


def test_bad_shortfall_value(cfg: Path) -> None:
    line = edit(cfg / "dataset.yaml", "shortfall: error", "shortfall: skip")
    message = config_error(cfg)
    assert message.startswith(f"<cfg>/dataset.yaml:{line}: key 'shortfall'"), message
    assert "'use_available'" in message and "fix:" in message


def test_malformed_yaml_has_line(cfg: Path) -> None:
    line = edit(cfg / "dataset.yaml", "seed: 17", "seed: 17: 18")
    message = config_error(cfg)
    assert message.startswith(f"<cfg>/dataset.yaml:{line}: invalid YAML"), message


# --- loras.json ------------------------------------------------------------------------------


def test_unknown_base_model_preset(cfg: Path) -> None:
    edit(cfg / "loras.json", '"base_model": "tiny"', '"base_model": "huge"')
    message = config_error(cfg)
    assert message.startswith("<cfg>/loras.json"), message
    assert "key 'base_model'" in message
    assert "unknown model preset 'huge'" in message
    assert "fix:" in message
    assert "'tiny'" in message and "'qwen3-vl-2b'" in message
    assert "<cfg>/models.yaml" in message


def test_malformed_json_has_line(cfg: Path) -> None:
    line = edit(cfg / "loras.json", '"base_model": "tiny"', '"base_model": tiny')
    message = config_error(cfg)
    assert message.startswith(f"<cfg>/loras.json:{line}: invalid JSON"), message
    assert line == 2


def test_router_gate_out_of_range(cfg: Path) -> None:
    line = edit(cfg / "loras.json", '"min_accuracy": 0.8', '"min_accuracy": 1.5')
    message = config_error(cfg)
    assert message.startswith(f"<cfg>/loras.json:{line}: key 'router.min_accuracy'"), message
    assert "fix:" in message


@pytest.mark.parametrize(
    ("name", "old", "new"),
    [
        ("loras.json", '"base_model": "tiny"', '"base_model": tiny'),
        ("dataset.yaml", "seed: 17", "seed: 17: 18"),
    ],
)
def test_parse_errors_name_a_fix(cfg: Path, name: str, old: str, new: str) -> None:
    edit(cfg / name, old, new)
    assert "fix:" in config_error(cfg)


# --- models.yaml -----------------------------------------------------------------------------


def test_hub_preset_without_repo_id(cfg: Path) -> None:
    edit(cfg / "models.yaml", "  repo_id: Qwen/Qwen3-VL-4B-Instruct\n", "")
    line = line_of(cfg / "models.yaml", "qwen3-vl-4b:")
    message = config_error(cfg)
    assert message.startswith(f"<cfg>/models.yaml:{line}: key 'qwen3-vl-4b'"), message
    assert "a hub preset needs repo_id" in message
    assert "fix:" in message


def test_preset_min_pixels_above_max_pixels(cfg: Path) -> None:
    line = edit(
        cfg / "models.yaml",
        "image: {min_pixels: 4096, max_pixels: 40960}",
        "image: {min_pixels: 99999, max_pixels: 40960}",
    )
    message = config_error(cfg)
    assert message.startswith(f"<cfg>/models.yaml:{line}: key 'tiny.image'"), message
    assert "min_pixels must not exceed max_pixels" in message
    assert "fix:" in message


def test_local_preset_incomplete(cfg: Path) -> None:
    edit(cfg / "models.yaml", "  vocab_size: 2048\n", "")
    line = line_of(cfg / "models.yaml", "tiny:")
    message = config_error(cfg)
    assert message.startswith(f"<cfg>/models.yaml:{line}: key 'tiny'"), message
    assert "a local preset needs text, vision and vocab_size" in message


def test_models_not_a_mapping(cfg: Path) -> None:
    (cfg / "models.yaml").write_text("- tiny\n- other\n")
    message = config_error(cfg)
    assert message.startswith("<cfg>/models.yaml: expected a mapping"), message


# --- missing files ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dataset.yaml", "loras.json", "models.yaml"])
def test_missing_file(cfg: Path, name: str) -> None:
    (cfg / name).unlink()
    message = config_error(cfg)
    assert message.startswith(f"<cfg>/{name}: file not found"), message
    assert "fix: create it or set MOLE_CONFIG_DIR" in message


def test_missing_config_dir(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"dataset\.yaml: file not found; fix:"):
        load_config(tmp_path / "nowhere")
