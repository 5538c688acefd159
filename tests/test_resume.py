"""Fault injection: a training run killed with SIGKILL and re-run ends with the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from scripts.atomic import atomic_save
from scripts.networks import extra_state

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = "['bundle/configs/train.json','bundle/configs/demo.json']"


def training_command(demo_dataset: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", CONFIGS, "--bundle_root", "bundle",
        "--dataset_dir", str(demo_dataset.parent), "--ckpt_dir", str(run_dir / "models"),
        "--output_dir", str(run_dir / "logs"), "--total_iterations", "12", "--checkpoint_every", "3",
        "--eval_every", "6", "--num_workers", "0", "--base_channels", "4", "--network_def#num_heads", "4",
        "--network_def#channel_multipliers", "[1,2,4,8]", "--patch_size", "[32,32,32]", "--batch_size", "2", *extra,
    ]  # fmt: skip


def run(command: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, env=os.environ)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def final_network(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "models" / "checkpoint_00000012.pt", weights_only=True)["network"]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(demo_dataset: Path, tmp_path: Path) -> None:
    reference = tmp_path / "uninterrupted"
    run(training_command(demo_dataset, reference))

    interrupted = tmp_path / "interrupted"
    command = training_command(demo_dataset, interrupted)
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not list((interrupted / "models").glob("checkpoint_*.pt")) and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    first = sorted((interrupted / "models").glob("checkpoint_*.pt"))
    assert first and first[-1].name != "checkpoint_00000012.pt"  # killed before the end

    result = run(command)
    log = result.stdout + result.stderr
    assert "Resuming training from" in log and "Training from iteration 0 " not in log  # the restored iteration
    assert re.search(r"Training from iteration [1-9]\d* to 12", log), log[-3000:]
    resumed, expected = final_network(interrupted), final_network(reference)
    assert resumed.keys() == expected.keys()
    for key, value in expected.items():
        if not isinstance(value, torch.Tensor):
            assert resumed[key] == value, key  # the memory bank's class names
        elif value.is_floating_point():
            torch.testing.assert_close(resumed[key], value, atol=1e-5, rtol=0)
        else:
            assert torch.equal(resumed[key], value), key
    assert len(list((interrupted / "models").glob("checkpoint_*.pt"))) <= 3  # pruned to checkpoints_to_keep


@pytest.mark.slow
def test_corrupted_newest_checkpoint_falls_back_and_fresh_start_ignores(demo_dataset: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run(training_command(demo_dataset, run_dir, "--total_iterations", "6"))
    newest = run_dir / "models" / "checkpoint_00000006.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, as by a crash of a non-atomic writer
    result = run(training_command(demo_dataset, run_dir, "--total_iterations", "6"))
    log = result.stdout + result.stderr
    assert "checkpoint_00000006.pt cannot be loaded" in log
    assert "Resuming training from" in log and "checkpoint_00000003.pt at iteration 3" in log
    assert torch.load(newest, weights_only=True)["trainer"]["iteration"] == 6  # rewritten by the resumed run

    fresh = run(training_command(demo_dataset, run_dir, "--total_iterations", "6", "--resume", "False"))
    assert "Resuming training from" not in fresh.stdout + fresh.stderr


@pytest.mark.slow
def test_checkpoint_of_another_network_is_named_before_training(demo_dataset: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run(training_command(demo_dataset, run_dir, "--total_iterations", "3"))
    command = training_command(demo_dataset, run_dir, "--total_iterations", "6", "--base_channels", "8")
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, env=os.environ)
    assert result.returncode != 0
    assert "checkpoint_00000003.pt does not fit this training run" in result.stderr
    assert not (run_dir / "models" / "checkpoint_00000006.pt").exists()  # nothing trained, nothing overwritten


@pytest.mark.slow
def test_a_resumed_run_keeps_a_better_model(demo_dataset: Path, tmp_path: Path) -> None:
    """The best score is resumable state: after a resume, model.pt is replaced only by a better model."""
    run_dir = tmp_path / "run"
    run(training_command(demo_dataset, run_dir, "--total_iterations", "6", "--eval_every", "3"))
    model = run_dir / "models" / "model.pt"
    selection = extra_state.decode(torch.load(model, weights_only=True)["_extra_state"])["selection"]
    checkpoint = torch.load(run_dir / "models" / "checkpoint_00000006.pt", weights_only=True)
    assert checkpoint["best_model"] == selection and selection["iteration"] in (3, 6)
    # make the saved model look far better than anything the resumed run can reach, in the checkpoint too
    better = {**selection, "value": 2.0}
    model_state = torch.load(model, weights_only=True)
    settings = extra_state.decode(model_state["_extra_state"])
    model_state["_extra_state"] = extra_state.encode({**settings, "selection": better})
    atomic_save(model_state, model)
    atomic_save({**checkpoint, "best_model": better}, run_dir / "models" / "checkpoint_00000006.pt")
    result = run(training_command(demo_dataset, run_dir, "--total_iterations", "12", "--eval_every", "3"))
    assert "Resuming training from" in result.stdout + result.stderr
    assert "Saved the best model so far" not in result.stdout + result.stderr
    assert extra_state.decode(torch.load(model, weights_only=True)["_extra_state"])["selection"]["value"] == 2.0
    # the history of the first run survives: curves continue, validations are numbered by iteration
    curves = json.loads((run_dir / "logs" / "training_curves.json").read_text())
    assert [v["iteration"] for v in curves["validation"]] == [3, 6, 9, 12]
    assert curves["iteration"] == [6, 12]  # the loss point of the first run, then the resumed run's
    assert "Validation at iteration 9: " in result.stdout + result.stderr
    lines = (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [3, 6, 9, 12]  # appended, nothing lost
    wall_times = [json.loads(line)["wall_time_seconds"] for line in lines]
    assert wall_times == sorted(wall_times) and wall_times[0] > 0  # the resumed run counts on from the kept lines
    summary = json.loads((run_dir / "logs" / "training_summary.json").read_text())
    assert summary["iterations"] == 12 and summary["resumed_from_iteration"] == 6
    assert summary["metrics"]["val_seen_dice"]["final_iteration"] == 12


def test_atomic_save_leaves_no_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "checkpoint.pt"
    atomic_save({"weights": torch.ones(3)}, target)
    atomic_save({"weights": torch.zeros(3)}, target)
    assert torch.equal(torch.load(target, weights_only=True)["weights"], torch.zeros(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
