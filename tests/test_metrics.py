"""Reference-following metrics and trivial-rule controls on hand-made cases whose scores are known exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine

from scripts.segmentation.controls import control_dice, intensity_rule, position_rule
from scripts.segmentation.metrics import (
    AbsentClassFalsePositives,
    ClassGroupDice,
    KIndependence,
    WrongReferenceDice,
    binary_predictions,
)

NAMES = ["demo/a", "demo/b", "demo/c"]


def _slab(low: int, high: int) -> torch.Tensor:
    """A 10 x 10 x 10 mask of the voxels with low <= x < high (100 voxels per unit of x)."""
    mask = torch.zeros(10, 10, 10, dtype=torch.bool)
    mask[low:high] = True
    return mask


def _case() -> dict[str, torch.Tensor]:
    """Classes a (x in 0-3) and b (x in 6-9) are in the query, c is absent.

    Predictions: with a's reference exactly a; with b's reference x in 2-7, which covers half of a and half of b;
    with c's reference 50 voxels.
    """
    truth = torch.stack([_slab(0, 4), _slab(6, 10), _slab(0, 0)])
    pred = torch.stack([_slab(0, 4), _slab(2, 8), _slab(0, 0)])
    pred[2, 9, :5, :] = True  # 50 voxels for the absent class
    return {
        "pred": torch.where(pred, 5.0, -5.0)[None],  # logits
        "label": truth.float()[None],
        "class_ids": torch.tensor([[0, 1, 2]]),
        "class_present": torch.tensor([[True, True, False]]),
        "control_dice": torch.tensor([[[0.5, 0.25], [0.1, 0.3], [math.nan, math.nan]]]),
        "k_dice_change": torch.tensor([[0.0, 0.03, math.nan]]),
    }


def _run(metrics: dict, case: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    engine = Engine(lambda engine, batch: batch)
    for name, metric in metrics.items():
        metric.attach(engine, name)
    engine.run([_case() if case is None else case])
    return engine.state.metrics


def test_wrong_reference_dice_of_a_hand_made_case() -> None:
    scores = _run({"wrong": WrongReferenceDice(), "dice": ClassGroupDice(NAMES, group="all")})
    # pairs: b's prediction against a's truth = 2*200 / (600 + 400) = 0.4; a's prediction against b's truth = 0
    assert scores["wrong"] == pytest.approx(0.2)
    # the ordinary Dice of the classes the query holds: a 1.0, b 0.4; c is absent and not averaged in
    assert scores["dice"] == pytest.approx(0.7)


def test_a_model_that_ignores_its_reference_scores_its_dice_as_wrong_reference_dice() -> None:
    case = _case()
    everything = case["label"][0, 0].bool() | case["label"][0, 1].bool()
    case["pred"] = torch.where(everything, 5.0, -5.0).expand(1, 3, -1, -1, -1)  # every reference: both objects
    engine = Engine(lambda engine, batch: batch)
    WrongReferenceDice().attach(engine, "wrong")
    ClassGroupDice(NAMES, group="all").attach(engine, "dice")
    engine.run([case])
    assert engine.state.metrics["wrong"] == pytest.approx(engine.state.metrics["dice"]) == pytest.approx(2 / 3)


def test_absent_class_false_positives_are_a_fraction_of_the_class_volume() -> None:
    metric = AbsentClassFalsePositives(NAMES, {"demo/a": 400.0, "demo/b": 400.0, "demo/c": 500.0})
    scores = _run({"fp": metric})
    assert scores["fp"] == pytest.approx(50 / 500)
    assert metric.per_class() == pytest.approx({"demo/c": 50 / 500})  # only the absent class, a and b are present


def test_label_map_scores_give_each_voxel_to_its_most_likely_requested_class() -> None:
    case = _case()
    logits = case["pred"]
    logits[0, 1] = torch.where(logits[0, 1] > 0, 3.0, -5.0)  # b claims x 2-3 of a, less surely than a does
    logits[0, 2, 0, :5, :] = 2.0  # c's reference also marks 50 voxels of a, less surely than a
    volumes = {"demo/a": 400.0, "demo/b": 400.0, "demo/c": 500.0}
    metrics = {
        "dice": ClassGroupDice(NAMES, group="all"),
        "fp": AbsentClassFalsePositives(NAMES, volumes),
        "map_dice": ClassGroupDice(NAMES, group="all", predictions="label_map"),
        "map_fp": AbsentClassFalsePositives(NAMES, volumes, predictions="label_map"),
    }
    scores = _run(metrics, case)
    assert scores["dice"] == pytest.approx(0.7) and scores["fp"] == pytest.approx(100 / 500)
    # in the label map a keeps x 0-3 (Dice 1), b keeps x 4-7 (2*200 / (400 + 400) = 0.5), c keeps its 50 voxels at x 9
    assert scores["map_dice"] == pytest.approx(0.75) and scores["map_fp"] == pytest.approx(50 / 500)
    # a padded slot (class id -1) never wins a voxel, whatever its logits
    padded = binary_predictions(logits, torch.tensor([[0, -1, 2]]), "label_map")
    assert padded[0, 0].sum() == 400 and not padded[0, 1].any()
    with pytest.raises(ValueError, match="predictions"):
        ClassGroupDice(NAMES, predictions="argmax")


def test_k_independence_is_the_largest_change_and_controls_are_grouped() -> None:
    metrics = {
        "k": KIndependence(),
        "intensity_seen": ClassGroupDice(NAMES, held_out=["demo/b"], group="seen", scores="intensity_rule"),
        "position_held_out": ClassGroupDice(NAMES, held_out=["demo/b"], group="held_out", scores="position_rule"),
    }
    scores = _run(metrics)
    assert scores["k"] == pytest.approx(0.03)
    assert scores["intensity_seen"] == pytest.approx(0.5)
    assert scores["position_held_out"] == pytest.approx(0.3)


def test_intensity_rule_takes_the_largest_component_in_the_reference_range() -> None:
    reference_image = np.zeros((10, 10, 10))
    reference_image[2:5, 2:5, 2:5] = 100.0
    reference_mask = reference_image > 0
    query = np.zeros((12, 12, 12))
    query[0:2, 0:2, 0:2] = 100.0  # small blob of the reference's intensity
    query[5:10, 5:10, 5:10] = 100.0  # larger blob of the same intensity: the rule picks it
    prediction = intensity_rule(reference_image, reference_mask, query)
    assert prediction.sum() == 125 and prediction[7, 7, 7] and not prediction[0, 0, 0]


def test_position_rule_places_the_reference_mask_at_the_same_normalised_position() -> None:
    reference = np.zeros((10, 10, 10), dtype=bool)
    reference[0:5] = True  # the first half along x
    placed = position_rule(reference, (20, 8, 8))
    assert placed.shape == (20, 8, 8) and placed[:10].all() and not placed[10:].any()


def test_control_dice_scores_present_classes_only() -> None:
    label = np.zeros((10, 10, 10), dtype=np.int16)
    label[:5] = 1
    image = np.where(label == 1, 50.0, 0.0)
    scores = control_dice(image, label, [(image, label), (image, label)], [1, 2])
    assert scores[0].tolist() == [1.0, 1.0]  # the same volume as reference: both rules are exact
    assert np.isnan(scores[1]).all()  # class 2 is not in the query
