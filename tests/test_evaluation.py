"""evaluate.json: the k-shot protocol on the demo data's test split with a tiny network, through
``monai.bundle run evaluating``; and how its scores are averaged, on hand-made scores."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from scripts.data.demo_data import CLASS_NAMES, HELD_OUT_LABELS
from scripts.data.pool import DatasetPool
from scripts.inference.evaluation import KShotEvaluation, Records
from scripts.networks import build_iris_net
from scripts.segmentation.inferers import InContextInferer
from scripts.segmentation.model_io import training_settings

REPO_ROOT = Path(__file__).resolve().parents[1]
SIZE = {"base_channels": 4, "num_heads": 4, "num_query_tokens": 8, "channel_multipliers": [1, 2, 4, 8]}


def evaluate(demo_dataset: Path, checkpoint: Path, output_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``monai.bundle run evaluating`` on ``checkpoint`` with no network or patch size flags."""
    command = [
        sys.executable, "-m", "monai.bundle", "run", "evaluating",
        "--config_file", "['bundle/configs/train.json','bundle/configs/evaluate.json']",
        "--bundle_root", "bundle", "--dataset_dir", str(demo_dataset.parent), "--ckpt_path", str(checkpoint),
        "--data_pool", json.dumps([str(demo_dataset)]), "--output_dir", str(output_dir), "--eval_shots", "[1,2]",
        "--eval_draws", "2", "--tuning_steps", "2", "--eval_split", "test", "--num_workers", "0",
        "--sw_mirror_axes", "[2]", *overrides,  # mirrored windows, 2 passes instead of the default 8
    ]  # fmt: skip
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, env=os.environ)


def saved_model(demo_dataset: Path, path: Path) -> list[str]:
    """A tiny model that records its settings as training does (32³ patches, native spacing); returns its memory
    classes."""
    torch.manual_seed(0)
    net = build_iris_net(**SIZE, settings=training_settings([str(demo_dataset)], [32, 32, 32], None))
    seen = [f"IrisDemo/{name}" for name in CLASS_NAMES if name not in HELD_OUT_LABELS][:4]
    net.memory_bank.update(seen, torch.randn(len(seen), *net.token_shape))
    torch.save(net.state_dict(), path)
    return seen


def scored_classes(demo_dataset: Path) -> set[str]:
    """Names of the classes that the test split holds and that a training subject holds (to draw references from)."""
    content = json.loads(demo_dataset.read_text())

    def held(split: str) -> set[int]:
        labels = [nib.load(demo_dataset.parent / item["label"]).dataobj for item in content[split]]
        return {int(value) for label in labels for value in np.unique(np.asarray(label))}

    return {f"IrisDemo/{content['labels'][str(value)]}" for value in (held("test") & held("training")) - {0}}


@pytest.mark.slow
def test_k_shot_protocol_writes_grouped_metrics(demo_dataset: Path, tmp_path: Path) -> None:
    """The model's own settings give the network, patch size and spacing: the command needs no size flags."""
    checkpoint = tmp_path / "model.pt"
    seen = saved_model(demo_dataset, checkpoint)
    result = evaluate(demo_dataset, checkpoint, tmp_path / "eval")
    assert result.returncode == 0, result.stderr[-4000:]

    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(metrics) == {"seen", "held_out", "reference_following", "k_independence", "controls", "match"}
    for by_k in metrics["match"].values():  # every object scored against its reference; no threshold recorded here
        for kinds in by_k.values():
            assert set(kinds) == {"channels", "label_map"} and kinds["channels"]["true_objects"] > 0
            assert all(kind["threshold"] is None and kind["false_objects_warned"] is None for kind in kinds.values())
            assert 0.0 <= kinds["channels"]["true_objects_median_score"] <= 1.0
    assert set(metrics["held_out"]) == {"one_shot", "ensemble", "retrieval", "tuning"}  # no memory for unseen
    assert set(metrics["seen"]) == {"one_shot", "ensemble", "retrieval", "tuning", "memory"}
    held_out, scored = {f"IrisDemo/{name}" for name in HELD_OUT_LABELS}, scored_classes(demo_dataset)
    assert scored & held_out and scored - held_out  # the test split scores both groups
    table = csv.DictReader((tmp_path / "eval" / "metrics.csv").read_text().splitlines())
    rows = {(row["group"], row["strategy"], row["k"], row["class"]): row for row in table}
    for group in ("seen", "held_out"):
        for strategy, by_k in metrics[group].items():
            assert set(by_k) == {"1", "2"}
            for k, entry in by_k.items():
                per_class = entry["per_class"]  # every class of the group the test split holds; memory: the bank's
                expected = scored & held_out if group == "held_out" else scored - held_out
                assert set(per_class) == (expected & set(seen) if strategy == "memory" else expected)
                assert all(
                    0.0 <= scores[metric] <= 1.0
                    for scores in per_class.values()
                    for metric in ("dice", "label_map_dice", "nsd")
                )
                for metric in ("dice", "dice_std", "nsd", "nsd_std"):  # the group's scores: the mean over its classes
                    assert entry["mean"][metric] == pytest.approx(np.mean([c[metric] for c in per_class.values()]))
                for name, scores in [*per_class.items(), ("mean", entry["mean"])]:  # the CSV holds the same numbers
                    row = rows[(group, strategy, k, name)]
                    assert all(
                        float(row[m]) == pytest.approx(scores[m], abs=1e-4)
                        for m in ("dice", "dice_std", "label_map_dice", "nsd")
                    )
    # one reference per class leaves ensemble and retrieval nothing to average or choose: the one-shot result
    for group in ("seen", "held_out"):
        assert metrics[group]["ensemble"]["1"] == metrics[group]["one_shot"]["1"] == metrics[group]["retrieval"]["1"]
    assert metrics["seen"]["memory"]["1"] == metrics["seen"]["memory"]["2"]  # no references: the same for every k
    following = metrics["reference_following"]
    for by_k in following.values():  # the label map keeps a subset of each class's voxels
        assert all(v["label_map_absent_class_fp"] <= v["absent_class_fp"] + 1e-9 for v in by_k.values())
    assert following["ensemble"]["1"] == following["one_shot"]["1"] == following["retrieval"]["1"]
    assert following["memory"]["1"] == following["memory"]["2"]
    for strategy, by_k in following.items():
        assert set(by_k) == {"1", "2"}
        for entry in by_k.values():  # an untrained network: its wrong-reference Dice is a number, not NaN
            assert 0.0 <= entry["wrong_reference_dice"] <= 1.0 and entry["absent_class_fp"] >= 0.0
    assert metrics["k_independence"] < 1e-4  # classes are decoded independently
    for group in ("seen", "held_out"):  # how they are averaged: test_scores_are_averaged_over_subjects_draws_classes
        assert set(metrics["controls"][group]) == {"intensity_rule", "position_rule"}
        assert all(0.0 <= value <= 1.0 for value in metrics["controls"][group].values())
    assert (tmp_path / "eval" / "dice_vs_k.png").stat().st_size > 0


@pytest.mark.slow
def test_an_override_that_contradicts_the_model_is_refused_before_evaluating(
    demo_dataset: Path, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "model.pt"
    saved_model(demo_dataset, checkpoint)
    result = evaluate(demo_dataset, checkpoint, tmp_path / "eval", "--base_channels", "8")
    assert result.returncode != 0
    assert f"{checkpoint} was trained with base_channels 4, but 8 was asked for" in result.stderr
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_scores_are_averaged_over_subjects_draws_classes(demo_dataset: Path, tmp_path: Path) -> None:
    """Hand-made scores of two draws: a class scores the mean over draws of its mean over subjects, a group the mean
    over its classes; the reference-following means, the trivial rules per group and the largest k change."""
    train, test = (DatasetPool([str(demo_dataset)], split, num_workers=0) for split in ("training", "test"))
    net, inferer = build_iris_net(**SIZE), InContextInferer((32, 32, 32))
    evaluation = KShotEvaluation(net, train, test, inferer, str(tmp_path), shots=[1], strategies=["one_shot"], draws=2)
    seen_a, seen_b = [f"IrisDemo/{name}" for name in CLASS_NAMES if name not in HELD_OUT_LABELS][:2]
    held_out = f"IrisDemo/{HELD_OUT_LABELS[0]}"

    def subjects(*dice: float) -> list[dict[str, float]]:
        return [{"dice": value, "label_map_dice": value, "hd95": 10 * value, "nsd": value / 2} for value in dice]

    records = Records()
    records.classes[("one_shot", 1, seen_a, 0)] = subjects(0.2, 0.4)  # two subjects in draw 0: 0.3
    records.classes[("one_shot", 1, seen_a, 1)] = subjects(0.9)  # draw 1: 0.9; over draws 0.6 +- 0.3
    records.classes[("one_shot", 1, seen_b, 0)] = subjects(0.1)
    records.classes[("one_shot", 1, seen_b, 1)] = subjects(0.1)  # 0.1 +- 0
    records.classes[("one_shot", 1, held_out, 1)] = subjects(0.5)  # only draw 1 drew a subject that holds it
    records.wrong_reference[("one_shot", 1)] = [0.1, 0.2, 0.6]
    records.absent_fp[("one_shot", 1)] = [2.0, 4.0]
    records.label_map_absent_fp[("one_shot", 1)] = [0.0, 1.0]
    records.controls[seen_a] = [[0.2, 0.4], [0.4, 0.8]]  # per subject: intensity rule, position rule
    records.controls[seen_b] = [[0.0, 0.2]]
    records.controls[held_out] = [[0.6, 0.0]]
    records.k_changes = [0.01, 0.03, 0.02]
    results = evaluation._summarise(records)

    seen = results["seen"]["one_shot"]["1"]
    assert seen["per_class"][seen_a] == pytest.approx(
        {"dice": 0.6, "dice_std": 0.3, "hd95": 6.0, "hd95_std": 3.0, "nsd": 0.3, "nsd_std": 0.15}
        | {"label_map_dice": 0.6, "label_map_dice_std": 0.3}
    )
    assert seen["mean"] == pytest.approx(
        {"dice": 0.35, "dice_std": 0.15, "hd95": 3.5, "hd95_std": 1.5, "nsd": 0.175, "nsd_std": 0.075}
        | {"label_map_dice": 0.35, "label_map_dice_std": 0.15}
    )
    assert results["held_out"]["one_shot"]["1"]["per_class"] == {
        held_out: pytest.approx(
            subjects(0.5)[0] | {"dice_std": 0.0, "label_map_dice_std": 0.0, "hd95_std": 0.0, "nsd_std": 0.0}
        )
    }
    assert results["reference_following"] == {
        "one_shot": {
            "1": {
                "wrong_reference_dice": pytest.approx(0.3),
                "absent_class_fp": pytest.approx(3.0),
                "label_map_absent_class_fp": pytest.approx(0.5),
            }
        }
    }
    assert results["controls"] == {
        "seen": {"intensity_rule": pytest.approx(0.15), "position_rule": pytest.approx(0.4)},
        "held_out": {"intensity_rule": pytest.approx(0.6), "position_rule": pytest.approx(0.0)},
    }
    assert results["k_independence"] == 0.03
