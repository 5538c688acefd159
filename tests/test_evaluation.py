"""evaluate.json: the k-shot protocol on the demo data's test split with a tiny network, through
``monai.bundle run evaluating``."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scripts.data.demo_data import CLASS_NAMES, HELD_OUT_LABELS
from scripts.networks import build_iris_net
from scripts.training.model_settings import training_settings

pytestmark = pytest.mark.slow  # monai.bundle run evaluating subprocesses

REPO_ROOT = Path(__file__).resolve().parents[1]
SIZE = {"base_channels": 4, "num_heads": 4, "num_query_tokens": 8, "channel_multipliers": [1, 2, 4, 8]}


def evaluate(demo_dataset: Path, checkpoint: Path, output_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``monai.bundle run evaluating`` on ``checkpoint`` with no network or patch size flags."""
    command = [
        sys.executable, "-m", "monai.bundle", "run", "evaluating",
        "--config_file", "['bundle/configs/train.json','bundle/configs/evaluate.json']",
        "--bundle_root", "bundle", "--dataset_dir", str(demo_dataset.parent), "--ckpt_path", str(checkpoint),
        "--data_pool", json.dumps([str(demo_dataset)]), "--output_dir", str(output_dir), "--eval_shots", "[1,2]",
        "--eval_draws", "2", "--tuning_steps", "2", "--eval_split", "test", "--num_workers", "0", *overrides,
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


def test_k_shot_protocol_writes_grouped_metrics(demo_dataset: Path, tmp_path: Path) -> None:
    """The model's own settings give the network, patch size and spacing: the command needs no size flags."""
    checkpoint = tmp_path / "model.pt"
    seen = saved_model(demo_dataset, checkpoint)
    result = evaluate(demo_dataset, checkpoint, tmp_path / "eval")
    assert result.returncode == 0, result.stderr[-4000:]

    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(metrics) == {"seen", "held_out", "reference_following", "k_independence", "controls"}
    assert set(metrics["held_out"]) == {"one_shot", "ensemble", "retrieval", "tuning"}  # no memory for unseen
    assert set(metrics["seen"]) == {"one_shot", "ensemble", "retrieval", "tuning", "memory"}
    for group in ("seen", "held_out"):
        for strategy, by_k in metrics[group].items():
            assert set(by_k) == {"1", "2"}
            for entry in by_k.values():
                assert 0.0 <= entry["mean"]["dice"] <= 1.0 and entry["mean"]["dice_std"] >= 0.0
                names = set(entry["per_class"])
                held_out = {f"IrisDemo/{name}" for name in HELD_OUT_LABELS}
                assert names <= held_out if group == "held_out" else not names & held_out
    assert set(metrics["seen"]["memory"]["1"]["per_class"]) <= set(seen)
    for strategy, by_k in metrics["reference_following"].items():
        assert set(by_k) == {"1", "2"}
        for entry in by_k.values():  # an untrained network: its wrong-reference Dice is a number, not NaN
            assert 0.0 <= entry["wrong_reference_dice"] <= 1.0 and entry["absent_class_fp"] >= 0.0
    assert metrics["k_independence"] < 1e-4  # classes are decoded independently
    for group in ("seen", "held_out"):
        assert set(metrics["controls"][group]) == {"intensity_rule", "position_rule"}
        assert all(0.0 <= value <= 1.0 for value in metrics["controls"][group].values())
    rows = list(csv.DictReader(open(tmp_path / "eval" / "metrics.csv")))
    assert {"group", "strategy", "k", "class", "dice", "dice_std", "hd95", "nsd"} <= set(rows[0])
    assert (tmp_path / "eval" / "dice_vs_k.png").stat().st_size > 0


def test_an_override_that_contradicts_the_model_is_refused_before_evaluating(
    demo_dataset: Path, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "model.pt"
    saved_model(demo_dataset, checkpoint)
    result = evaluate(demo_dataset, checkpoint, tmp_path / "eval", "--base_channels", "8")
    assert result.returncode != 0
    assert f"{checkpoint} was trained with base_channels 4, but 8 was asked for" in result.stderr
    assert not (tmp_path / "eval" / "metrics.json").exists()
