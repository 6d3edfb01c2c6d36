"""Config schemas and loaders: the one place that knows what `config/*.yaml|json` may contain.

Every loader validates with pydantic and turns a failure into a `ConfigError` naming the file, the
line of the offending key (when the file has one), the key path and what to do about it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from modal_jobs.errors import MoleError
from modal_jobs.layout import BadName, check_name

M = TypeVar("M", bound=BaseModel)
V = TypeVar("V")


class ConfigError(MoleError):
    """A config file is missing, unparsable or invalid."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SplitFractions(_Strict):
    """Fractions of each expert's samples that go to train, val and the held-out eval split."""

    train: float = Field(0.7, gt=0, lt=1)
    val: float = Field(0.1, ge=0, lt=1)
    eval: float = Field(0.2, gt=0, lt=1)

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitFractions:
        total = self.train + self.val + self.eval
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + eval must sum to 1, got {total:g}")
        return self


class ImageBounds(_Strict):
    """Pixel bounds a screenshot is resized into before it becomes image tokens."""

    min_pixels: int = Field(4096, gt=0)
    max_pixels: int = Field(40960, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> ImageBounds:
        if self.min_pixels > self.max_pixels:
            raise ValueError("min_pixels must not exceed max_pixels")
        return self


class ExpertSpec(_Strict):
    """One expert's share of the routing dataset and the label the router answers with."""

    count: int = Field(gt=0)
    label: str | None = None

    @field_validator("label")
    @classmethod
    def _label_word(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("label must be a non-empty word")
        return value


class OodSpec(_Strict):
    """Screens of no expert drawn for the routing dataset (never trained on).

    `count` images in all (0: none, and the router never abstains); `val_fraction` of them
    choose the abstention score, the rest are held out for the report.
    """

    count: int = Field(120, ge=0)
    val_fraction: float = Field(0.5, gt=0, lt=1)


class NegativeSpec(_Strict):
    """Screens of no expert the router trains on (outlier exposure), answered with `label`.

    `count` screens drawn into the train split (0, the default: none, and abstention rests on the
    other scores of `modal_jobs/ml/ood.py`); `label` is the reserved word answered for them.
    """

    count: int = Field(0, ge=0)
    label: str = "none"

    @field_validator("label")
    @classmethod
    def _label_word(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("label must be a non-empty word")
        return value


class DatasetConfig(_Strict):
    """`config/dataset.yaml`: where expert data lives and how the routing dataset is built."""

    experts_dir: Path
    experts: dict[str, ExpertSpec]
    splits: SplitFractions = SplitFractions()
    seed: int = 0
    shortfall: Literal["error", "use_available"] = "error"
    system_prompt: str = "Answer with the name of the expert that should handle this screenshot."
    image: ImageBounds | None = None
    ood: OodSpec = OodSpec()
    negatives: NegativeSpec = NegativeSpec()

    @field_validator("experts")
    @classmethod
    def _expert_names(cls, value: dict[str, ExpertSpec]) -> dict[str, ExpertSpec]:
        if len(value) < 2:
            raise ValueError("a router needs at least two experts")
        return _plain_names(value, "expert name")

    @model_validator(mode="after")
    def _reserved_label(self) -> DatasetConfig:
        taken = [e for e in self.experts if self.label_of(e) == self.negatives.label]
        if taken and self.negatives.count:
            raise ValueError(
                f"negatives.label {self.negatives.label!r} is also the label of expert "
                f"{taken[0]!r}; fix: give one of them another word"
            )
        return self

    def label_of(self, expert: str) -> str:
        """The word the router answers with for this expert (its name unless `label` is set)."""
        return self.experts[expert].label or expert


def _plain_names(value: dict[str, V], what: str) -> dict[str, V]:
    """`value` if every key passes the layout's name gate (keys become folder names)."""
    for name in value:
        try:
            check_name(name, what)
        except BadName as exc:
            raise ValueError(str(exc)) from None
    return value


class RouterPolicy(_Strict):
    """Deployment gate and abstention for the router.

    `coverage`: the share of in-distribution val screens the router must keep routing; the
    abstention threshold is the score that keeps that share, chosen on val by eval_report.
    """

    min_accuracy: float = Field(0.8, ge=0, le=1)
    coverage: float = Field(0.95, gt=0, le=1)
    auto_deploy: bool = False


class ExpertAdapter(_Strict):
    """A registered expert LoRA adapter."""

    adapter: str
    dataset: str | None = None

    @field_validator("adapter")
    @classmethod
    def _inside_inference_volume(cls, value: str) -> str:
        # A relative adapter is a managed one, written under the inference volume: each part of
        # its path must be a plain name, so it can never point outside that volume.
        if not Path(value).is_absolute():
            for part in Path(value).parts:
                try:
                    check_name(part, "adapter path part")
                except BadName as exc:
                    raise ValueError(
                        f"{exc}; or give an absolute path to your own adapter"
                    ) from None
        return value


class LorasConfig(_Strict):
    """`config/loras.json`: the base model preset and the registered expert adapters."""

    base_model: str
    router: RouterPolicy = RouterPolicy()
    experts: dict[str, ExpertAdapter] = {}

    @field_validator("experts")
    @classmethod
    def _expert_names(cls, value: dict[str, ExpertAdapter]) -> dict[str, ExpertAdapter]:
        return _plain_names(value, "expert name")


class TextDims(_Strict):
    """Language-model dimensions of a locally built preset.

    `mrope_section` (temporal, height, width rotary sections, summing to `head_dim / 2`) is
    derived from `head_dim` when unset; a published configuration states its own.
    """

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    mrope_section: tuple[int, int, int] | None = None
    max_position_embeddings: int = 4096

    @model_validator(mode="after")
    def _sections_fill_half_a_head(self) -> TextDims:
        if self.mrope_section is not None and sum(self.mrope_section) * 2 != self.head_dim:
            raise ValueError(f"mrope_section must sum to head_dim / 2 = {self.head_dim // 2}")
        return self


class VisionDims(_Strict):
    """Vision-tower dimensions of a locally built preset."""

    hidden_size: int
    intermediate_size: int
    depth: int
    num_heads: int
    patch_size: int = 16
    num_position_embeddings: int = 256
    # Blocks whose outputs are also fed to early decoder layers (DeepStack); unset: the last.
    deepstack_visual_indexes: tuple[int, ...] | None = None
    # Per-channel normalisation of the image processor (CLIP's unless a preset states its own).
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


class PretrainSpec(_Strict):
    """How the local stand-in base is briefly trained on synthetic screens."""

    samples_per_expert: int = Field(gt=0)
    steps: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    learning_rate: float = Field(gt=0)
    seed: int = 0


class LoraSpec(_Strict):
    """LoRA hyper-parameters of the router adapter."""

    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)


class TrainDefaults(_Strict):
    """Default router-training hyper-parameters for a preset."""

    steps: int = Field(300, gt=0)
    batch_size: int = Field(16, gt=0)
    learning_rate: float = Field(2e-3, gt=0)
    warmup_steps: int = Field(30, ge=0)


class ModelPreset(_Strict):
    """One entry of `config/models.yaml`.

    A local preset's `tokenizer` is `trained` (a small BPE learnt from its pre-training corpus,
    so it needs `pretrain`) or `qwen3` (Qwen3's real vocabulary, fetched at set-up; the
    embedding has `vocab_size` rows, padded past the tokenizer's 151,669 tokens as Qwen's are).
    """

    source: Literal["local", "hub"]
    repo_id: str | None = None
    text: TextDims | None = None
    vision: VisionDims | None = None
    vocab_size: int | None = None
    tokenizer: Literal["trained", "qwen3"] = "trained"
    # What a local preset's weights are built and saved in (the hub's Qwen3-VL are bfloat16).
    weights_dtype: Literal["float32", "bfloat16"] = "float32"
    pretrain: PretrainSpec | None = None
    image: ImageBounds = ImageBounds()
    lora: LoraSpec = LoraSpec()
    train: TrainDefaults = TrainDefaults()

    @model_validator(mode="after")
    def _complete(self) -> ModelPreset:
        if self.source == "hub" and not self.repo_id:
            raise ValueError("a hub preset needs repo_id (e.g. Qwen/Qwen3-VL-2B-Instruct)")
        local_parts = (self.text, self.vision, self.vocab_size)
        if self.source == "local" and any(part is None for part in local_parts):
            raise ValueError("a local preset needs text, vision and vocab_size")
        if self.source == "local" and self.tokenizer == "trained" and self.pretrain is None:
            raise ValueError("a local preset with a trained tokenizer needs pretrain")
        return self


class MoleConfig(BaseModel):
    """Everything read from the config dir, validated together."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    config_dir: Path
    dataset: DatasetConfig
    loras: LorasConfig
    models: dict[str, ModelPreset]

    @property
    def experts_dir(self) -> Path:
        """The expert datasets folder, resolved against the config dir."""
        return (self.config_dir / self.dataset.experts_dir).resolve()

    @property
    def preset(self) -> ModelPreset:
        """The preset named by `loras.json`'s `base_model`."""
        return self.models[self.loras.base_model]

    @property
    def image_bounds(self) -> ImageBounds:
        """Pixel bounds for screenshots: `dataset.yaml`'s `image`, else the preset's."""
        return self.dataset.image or self.preset.image


def config_dir() -> Path:
    """`MOLE_CONFIG_DIR`, default `./config`."""
    return Path(os.environ.get("MOLE_CONFIG_DIR", "config")).resolve()


def load_config(directory: Path | None = None) -> MoleConfig:
    """Load and cross-check `dataset.yaml`, `loras.json` and `models.yaml` from `directory`."""
    root = (directory or config_dir()).resolve()
    dataset = _load(root / "dataset.yaml", DatasetConfig)
    loras = _load(root / "loras.json", LorasConfig)
    models_path = root / "models.yaml"
    raw_models = _read(models_path)
    if not isinstance(raw_models, dict):
        raise ConfigError(f"{models_path}: expected a mapping of preset name to preset")
    models = {name: _validate(models_path, raw_models, ModelPreset, name) for name in raw_models}
    if loras.base_model not in models:
        raise ConfigError(
            f"{root / 'loras.json'}: key 'base_model': unknown model preset {loras.base_model!r}; "
            f"fix: use one of {sorted(models)} or add it to {models_path}"
        )
    return MoleConfig(config_dir=root, dataset=dataset, loras=loras, models=models)


def _read(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"{path}: file not found; fix: create it or set MOLE_CONFIG_DIR")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            return json.loads(text)
        return yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path}:{exc.lineno}: invalid JSON: {exc.msg}; fix: correct the syntax on that line"
        ) from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(
            f"{path}{line}: invalid YAML: {problem}; fix: correct the syntax on that line"
        ) from exc


def _load(path: Path, model: type[M]) -> M:
    return _validate(path, _read(path), model, None)


def _validate(path: Path, raw: Any, model: type[M], key: str | None) -> M:
    data = raw[key] if key is not None else raw
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        # A misspelt key shows up as "missing" + "extra": the extra key is the one to name.
        problem = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
        loc = tuple(str(part) for part in problem["loc"])
        keys = ((key,) if key is not None else ()) + loc
        line = _line_of(path, keys)
        where = f"{path}:{line}" if line else str(path)
        dotted = ".".join(keys) or "(top level)"
        raise ConfigError(
            f"{where}: key '{dotted}': {problem['msg']}; fix: {_hint(problem['type'], model)}"
        ) from exc


def _hint(error_type: str, model: type[BaseModel]) -> str:
    hints = {
        "extra_forbidden": "remove the key or check its spelling",
        "missing": "add the key",
    }
    return hints.get(error_type, f"see the {model.__name__} schema in modal_jobs/config.py")


def _line_of(path: Path, keys: tuple[str, ...]) -> int | None:
    """1-based line of the deepest key of `keys` that exists in the file (YAML or JSON)."""
    try:
        node = yaml.compose(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return None
    line = None
    for key in keys:
        if not isinstance(node, yaml.MappingNode):
            break
        match = next(((k, v) for k, v in node.value if str(k.value) == key), None)
        if match is None:
            break
        line = match[0].start_mark.line + 1
        node = match[1]
    return line
