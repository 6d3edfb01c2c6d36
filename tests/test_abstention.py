"""Abstention pieces on their own: AUROC, coverage thresholds, candidate scores, prototypes,
the screens of no expert (held out and trained on), the reserved label, prompt conditions and
instruction dropout."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from modal_jobs.config import ConfigError, DatasetConfig, ImageBounds
from modal_jobs.demo_data import EXPERTS, render_sample, write_demo_data
from modal_jobs.demo_data import negatives as negatives_module
from modal_jobs.demo_data import ood as ood_module
from modal_jobs.demo_data.negatives import NEGATIVE_KINDS, render_negative
from modal_jobs.demo_data.ood import OOD_KINDS, render_ood
from modal_jobs.ml.batching import encode
from modal_jobs.ml.conditions import CONDITIONS, GENERIC_EVAL, GENERIC_TRAIN, eval_instruction
from modal_jobs.ml.dropout import InstructionDropout, reprompt
from modal_jobs.ml.labels import NO_EXPERT, LabelError, first_answer_token, label_map
from modal_jobs.ml.metrics import auroc
from modal_jobs.ml.model import load_processor
from modal_jobs.ml.ood import (
    PROTOTYPES_FILE,
    Abstention,
    Prototypes,
    SlotFeatures,
    candidates,
    choose,
    ood_scores,
    threshold_for_coverage,
)


@pytest.fixture(scope="module")
def tiny_processor(tiny_base: str) -> object:
    return load_processor(tiny_base)


def _brute_auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    return float(np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg]))


def test_auroc_matches_pair_counting_with_ties() -> None:
    rng = np.random.default_rng(3)
    for _ in range(5):
        pos = rng.integers(0, 6, 40).astype(float)
        neg = rng.integers(0, 6, 30).astype(float) - 1
        assert auroc(pos, neg) == pytest.approx(_brute_auroc(pos, neg))
    assert auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert auroc(np.array([0.0]), np.array([1.0])) == 0.0


@pytest.mark.parametrize("coverage", [0.5, 0.9, 0.95, 1.0])
def test_threshold_keeps_at_least_the_coverage_and_no_higher_one_does(coverage: float) -> None:
    scores = np.random.default_rng(1).normal(size=101)
    threshold = threshold_for_coverage(scores, coverage)
    kept = np.mean(scores >= threshold)
    assert kept >= coverage
    higher = np.sort(scores)[np.sort(scores) > threshold]
    if len(higher):
        assert np.mean(scores >= higher[0]) < coverage


def test_scores_match_their_definitions() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(7, 4)) * 3
    features = SlotFeatures(logits, rng.uniform(size=7), rng.normal(size=(7, 5)), [])
    scores = ood_scores(features, 2.0, {})
    direct_energy = [np.log(np.sum(np.exp(row / 2.0))) for row in logits]
    assert scores["energy"] == pytest.approx(direct_energy)
    top = [np.max(np.exp(row / 2.0) / np.sum(np.exp(row / 2.0))) for row in logits]
    assert scores["max_probability"] == pytest.approx(top)
    assert (scores["label_mass"] == features.label_mass).all()
    assert "prototype" not in scores


def test_none_answer_is_the_log_odds_of_the_experts_against_the_reserved_token() -> None:
    rng = np.random.default_rng(1)
    logits, none = rng.normal(size=(9, 3)) * 4, rng.normal(size=9) * 4
    features = SlotFeatures(logits, np.ones(9), np.zeros((9, 2)), [], none)
    scores = ood_scores(features, 3.0, {})
    # Softmax over the experts' tokens and the reserved one: P(any expert) / P(none), in logs.
    full = np.exp(np.column_stack([logits, none]).astype(np.float64))
    direct = np.log(full[:, :3].sum(axis=1) / full[:, 3])
    assert scores["none_answer"] == pytest.approx(direct)
    assert "none_answer" not in ood_scores(SlotFeatures(logits, none, none, []), 1.0, {})
    both = SlotFeatures.concat([features.subset(np.arange(4)), features.subset(np.arange(4, 9))])
    assert both.none is not None and (both.none == none).all()


def test_prototypes_leave_out_screens_of_none() -> None:
    rng = np.random.default_rng(3)
    classes = np.repeat(np.arange(2), 20)
    hidden = rng.normal(size=(40, 3)) + classes[:, None] * 4.0
    extra = rng.normal(size=(15, 3)) * 30
    with_none = Prototypes.fit(
        np.concatenate([hidden, extra]), np.concatenate([classes, np.full(15, NO_EXPERT)]), 2
    )
    plain = Prototypes.fit(hidden, classes, 2)
    assert with_none.means == pytest.approx(plain.means)
    assert with_none.precision == pytest.approx(plain.precision)


def test_prototypes_are_class_means_and_mahalanobis_to_the_nearest() -> None:
    rng = np.random.default_rng(2)
    classes = np.repeat(np.arange(3), 50)
    hidden = rng.normal(size=(150, 4)) + classes[:, None] * 5.0
    protos = Prototypes.fit(hidden, classes, 3)
    assert protos.means[1] == pytest.approx(hidden[classes == 1].mean(axis=0))
    probe = rng.normal(size=(6, 4)) * 4
    direct = [
        min(np.sqrt((x - m) @ protos.precision @ (x - m)) for m in protos.means) for x in probe
    ]
    assert protos.distance(probe) == pytest.approx(direct)
    # Far from every class mean scores lower than a typical member of a class.
    far = protos.distance(np.full((1, 4), 40.0))[0]
    assert far > np.percentile(protos.distance(hidden), 99)


def test_candidates_judge_held_out_parts_with_val_thresholds() -> None:
    rng = np.random.default_rng(4)
    good_in, good_out = rng.normal(2, 1, 200), rng.normal(-2, 1, 100)
    flat_in, flat_out = rng.normal(0, 1, 200), rng.normal(0, 1, 100)
    val_in = {"good": good_in[:100], "flat": flat_in[:100]}
    val_out = {"good": good_out[:50], "flat": flat_out[:50]}
    held_in = {"good": good_in[100:], "flat": flat_in[100:]}
    held_out = {"good": good_out[50:], "flat": flat_out[50:]}
    table = candidates(val_in, val_out, held_in, held_out, coverage=0.95)
    assert choose(table) == "good"
    good = table["good"]
    assert good["threshold"] == threshold_for_coverage(val_in["good"], 0.95)
    assert good["abstain_rate"] == pytest.approx(np.mean(held_out["good"] < good["threshold"]))
    assert good["auroc"] == pytest.approx(_brute_auroc(held_in["good"], held_out["good"]))
    assert table["flat"]["val_auroc"] < 0.7 < good["val_auroc"]


def test_abstention_round_trips_through_router_json(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    protos = Prototypes.fit(rng.normal(size=(30, 3)), np.repeat(np.arange(2), 15), 2)
    abstention = Abstention("prototype", -2.5, protos)
    section = abstention.to_json()
    protos.save(tmp_path / section["prototypes"])
    loaded = Abstention.load(tmp_path, section)
    assert loaded is not None and loaded.score == "prototype" and loaded.threshold == -2.5
    features = SlotFeatures(np.zeros((4, 2)), np.ones(4), rng.normal(size=(4, 3)) * 3, [])
    expected = -protos.distance(features.hidden) < -2.5
    assert (loaded.abstains(features, 1.0) == expected).all()
    assert Abstention.load(tmp_path, None) is None


def test_screen_score_measures_the_screen_statistics_not_the_hidden_state(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    classes = np.repeat(np.arange(2), 20)
    screen = rng.normal(size=(40, 4)) + classes[:, None] * 6.0
    protos = Prototypes.fit(screen, classes, 2)
    abstention = Abstention("screen", -5.0, protos)
    section = abstention.to_json()
    assert section == {"score": "screen", "threshold": -5.0, "prototypes": PROTOTYPES_FILE}
    protos.save(tmp_path / section["prototypes"])
    loaded = Abstention.load(tmp_path, section)
    assert loaded is not None
    probe = np.r_[screen[:3], np.full((2, 4), 30.0)]
    hidden = rng.normal(size=(5, 4))  # the hidden state says nothing here
    features = SlotFeatures(np.zeros((5, 2)), np.ones(5), hidden, [], screen=probe)
    expected = -protos.distance(probe) < -5.0
    assert list(expected) == [False, False, False, True, True]
    assert (loaded.abstains(features, 1.0) == expected).all()
    # Without screen statistics there is no screen score to give.
    assert "screen" not in ood_scores(replace(features, screen=None), 1.0, {"screen": protos})
    joined = SlotFeatures.concat([features.subset(np.arange(2)), features.subset(np.arange(2, 5))])
    assert joined.screen is not None and (joined.screen == probe).all()


def test_router_json_with_an_unknown_or_incomplete_score_is_refused_at_load(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError, match=r"router.json: field ood.score is 'colour'"):
        Abstention.load(tmp_path, {"score": "colour", "threshold": 0.0})
    with pytest.raises(ConfigError, match="field ood.prototypes is missing"):
        Abstention.load(tmp_path, {"score": "screen", "threshold": 0.0})


def test_a_score_that_is_not_a_number_abstains() -> None:
    rng = np.random.default_rng(8)
    protos = Prototypes.fit(rng.normal(size=(30, 3)), np.repeat(np.arange(2), 15), 2)
    screen = rng.normal(size=(3, 3))
    screen[1, 0] = np.inf  # an overflowed statistic: its distance is NaN
    features = SlotFeatures(np.zeros((3, 2)), np.ones(3), np.zeros((3, 3)), [], screen=screen)
    assert np.isnan(protos.distance(screen)[1])
    scores = ood_scores(features, 1.0, {"screen": protos})["screen"]
    assert scores[1] == -np.inf and np.isfinite(scores[[0, 2]]).all()
    assert list(Abstention("screen", -1e9, protos).abstains(features, 1.0)) == [False, True, False]


@pytest.mark.parametrize("kind", OOD_KINDS)
def test_screens_of_no_expert_render_deterministically(kind: str) -> None:
    a = render_ood(kind, random.Random(f"t:{kind}"))
    b = render_ood(kind, random.Random(f"t:{kind}"))
    assert a.tobytes() == b.tobytes() and a.mode == "RGB"
    assert 320 <= a.width <= 1280 and 240 <= a.height <= 800


@pytest.mark.parametrize("kind", NEGATIVE_KINDS)
def test_negative_screens_render_deterministically(kind: str) -> None:
    a = render_negative(kind, random.Random(f"n:{kind}"))
    b = render_negative(kind, random.Random(f"n:{kind}"))
    c = render_negative(kind, random.Random(f"m:{kind}"))
    assert a.tobytes() == b.tobytes() != c.tobytes() and a.mode == "RGB"
    assert 320 <= a.width <= 1280 and 240 <= a.height <= 800


def test_trained_negatives_share_no_drawing_code_with_the_held_out_screens() -> None:
    """What the report calls out-of-distribution is drawn by code training never runs."""
    assert not set(NEGATIVE_KINDS) & set(OOD_KINDS)
    drawing = {n for n in vars(ood_module) if n.startswith("_") and callable(vars(ood_module)[n])}
    assert drawing and not drawing & set(vars(negatives_module))


def test_unknown_negative_kind_is_rejected() -> None:
    with pytest.raises(ValueError, match="chart"):
        render_negative("chart", random.Random(0))


def _dataset(**negatives: object) -> DatasetConfig:
    experts = {"calendar": {"count": 4}, "code_editor": {"count": 4, "label": "code"}}
    return DatasetConfig.model_validate(
        {"experts_dir": ".", "experts": experts, "negatives": negatives}
    )


def test_reserved_label_gets_its_own_first_token(tiny_processor: object) -> None:
    labels = label_map(_dataset(count=5), tiny_processor)
    assert labels.none_label == "none"
    assert labels.none_token_id == first_answer_token(tiny_processor, "none")
    assert label_map(_dataset(count=0), tiny_processor).none_token_id is None


def test_reserved_label_that_clashes_with_an_expert_is_refused(tiny_processor: object) -> None:
    with pytest.raises(ValueError, match="negatives.label 'code' is also the label of expert"):
        _dataset(count=5, label="code")
    # Another word with the expert's first token: "codex" starts as "code" does here.
    clash = next(
        w
        for w in ("codex", "coder", "codes", "coded")
        if first_answer_token(tiny_processor, w) == first_answer_token(tiny_processor, "code")
    )
    with pytest.raises(LabelError, match=f"negatives.label {clash!r} starts with the same token"):
        label_map(_dataset(count=5, label=clash), tiny_processor)


def test_unknown_ood_kind_is_rejected() -> None:
    with pytest.raises(ValueError, match="weather"):
        render_ood("weather", random.Random(0))


def test_generic_wordings_for_eval_never_reach_training_data(tmp_path: Path) -> None:
    """The demo data holds generic and screen-only samples, never an eval-only wording."""
    assert not set(GENERIC_TRAIN) & set(GENERIC_EVAL)
    write_demo_data(tmp_path, per_expert=30, seed=2, experts=("map",))
    rows = [
        json.loads(line)
        for expert in ("map",)
        for line in (tmp_path / expert / "datasets" / "demo.jsonl").read_text().splitlines()
    ]
    said = [row["messages"][0]["content"] for row in rows]
    assert any(s in GENERIC_TRAIN for s in said) and "" in said
    assert sum(bool(s) and s not in GENERIC_TRAIN for s in said) > len(said) / 2
    assert not set(said) & set(GENERIC_EVAL)
    # No app's own instructions use a generic wording either.
    for expert in EXPERTS:
        for i in range(6):
            own = render_sample(expert, random.Random(f"g:{expert}:{i}")).instruction
            assert own not in GENERIC_TRAIN and own not in GENERIC_EVAL


def test_eval_instruction_per_condition() -> None:
    assert eval_instruction("instruction", "own words", "k") == "own words"
    assert eval_instruction("generic", "own words", "k") in GENERIC_EVAL
    assert eval_instruction("none", "own words", "k") == ""
    assert set(CONDITIONS) == {"instruction", "generic", "none"}
    with pytest.raises(ValueError, match="loud"):
        eval_instruction("loud", "x", "k")


def test_instruction_dropout_swaps_the_configured_share(tiny_processor: object) -> None:
    bounds = ImageBounds()
    sample = render_sample("terminal", random.Random(9))
    item = encode(tiny_processor, sample.image, bounds, "sys", sample.instruction, "terminal")
    dropout = InstructionDropout(tiny_processor, bounds, "sys", ["terminal"], 0.5, seed=1)
    picks = [dropout.instruction(step, 3) for step in range(400)]
    swapped = [p for p in picks if p is not None]
    assert 0.4 < len(swapped) / len(picks) < 0.6
    assert {p for p in swapped if p} <= set(GENERIC_TRAIN) and "" in swapped
    assert picks == [dropout.instruction(step, 3) for step in range(400)]
    step = next(s for s, p in enumerate(picks) if p == "")
    out = dropout.apply(step, [3], [item], np.array([0]))[0]
    direct = encode(tiny_processor, sample.image, bounds, "sys", "", "terminal")
    assert (out.input_ids == direct.input_ids).all() and out.prompt_len == direct.prompt_len
    assert len(out.input_ids) < len(item.input_ids)
    # A screen of none (class -1) is re-encoded with the reserved answer.
    negative = InstructionDropout(tiny_processor, bounds, "sys", ["terminal"], 0.5, 1, "none")
    out = negative.apply(step, [3], [item], np.array([NO_EXPERT]))[0]
    direct = encode(tiny_processor, sample.image, bounds, "sys", "", "none")
    assert (out.input_ids == direct.input_ids).all()
    with pytest.raises(ValueError, match="screen of none"):
        dropout.apply(step, [3], [item], np.array([NO_EXPERT]))
    kept = InstructionDropout(tiny_processor, bounds, "sys", ["terminal"], 0.0, seed=1)
    assert kept.apply(step, [3], [item], np.array([0]))[0] is item
    again = reprompt(tiny_processor, item, bounds, "sys", sample.instruction, "terminal")
    assert (again.input_ids == item.input_ids).all()
