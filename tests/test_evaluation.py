"""evaluate.json: the k-shot protocol on the demo data's test split with a tiny network, through
``monai.bundle run evaluating``."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from scripts.demo_data import CLASS_NAMES, HELD_OUT_LABELS
from scripts.networks import build_iris_net

REPO_ROOT = Path(__file__).resolve().parents[1]
SIZE = {"base_channels": 4, "num_heads": 4, "num_query_tokens": 8, "channel_multipliers": [1, 2, 4, 8]}


def test_k_shot_protocol_writes_grouped_metrics(demo_dataset: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = build_iris_net(**SIZE)
    seen = [f"IrisDemo/{name}" for name in CLASS_NAMES if name not in HELD_OUT_LABELS][:4]
    net.memory_bank.update(seen, torch.randn(len(seen), *net.token_shape))
    checkpoint = tmp_path / "model.pt"
    torch.save(net.state_dict(), checkpoint)
    command = [
        sys.executable, "-m", "monai.bundle", "run", "evaluating",
        "--config_file", "['bundle/configs/train.json','bundle/configs/demo.json','bundle/configs/evaluate.json']",
        "--bundle_root", "bundle", "--dataset_dir", str(demo_dataset.parent), "--ckpt_path", str(checkpoint),
        "--output_dir", str(tmp_path / "eval"), "--eval_shots", "[1,2]", "--eval_draws", "2", "--tuning_steps", "2",
        "--base_channels", "4", "--num_heads", "4", "--channel_multipliers", "[1,2,4,8]", "--eval_split", "test",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, env=os.environ)
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
