"""DDP overlays on CPU (gloo): identical ranks after training, and split k-shot evaluation equal to one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # torchrun subprocesses training and evaluating

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = "['bundle/configs/train.json','bundle/configs/demo.json','bundle/configs/multi_gpu_train.json']"
TINY = ["--base_channels", "4", "--network_def#num_heads", "4", "--network_def#channel_multipliers", "[1,2,4,8]"]
TINY += ["--patch_size", "[32,32,32]"]
TINY += ["--batch_size", "2"]


def test_two_process_gloo_training_keeps_ranks_identical(demo_dataset: Path, tmp_path: Path) -> None:
    save_rank_state = f"$torch.save(@network.module.state_dict(), '{tmp_path}/rank' + os.environ['RANK'] + '.pt')"
    finalize = repr([save_rank_state, "$dist.destroy_process_group()"])
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
        "-m", "monai.bundle", "run", "training", "--config_file", CONFIGS, "--bundle_root", "bundle",
        "--dataset_dir", str(demo_dataset.parent), "--ckpt_dir", str(tmp_path / "models"),
        "--output_dir", str(tmp_path / "logs"), "--total_iterations", "4", "--eval_every", "2",
        "--checkpoint_every", "4", "--num_workers", "0", "--finalize", finalize, *TINY,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]

    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        if isinstance(rank0[key], torch.Tensor):
            assert torch.equal(rank0[key], rank1[key]), key
    assert torch.equal(rank0["memory_bank._extra_state"], rank1["memory_bank._extra_state"])
    assert rank0["memory_bank.counts"].sum() > 0

    periodic = sorted((tmp_path / "models").glob("checkpoint*.pt"))
    assert len(periodic) == 1, periodic  # written by rank 0 only
    assert (tmp_path / "models" / "model.pt").is_file()
    assert (tmp_path / "logs" / "validation_report.json").is_file()


def test_two_process_k_shot_evaluation_matches_one_process(demo_dataset: Path, tmp_path: Path) -> None:
    from scripts.networks import build_iris_net

    torch.manual_seed(0)
    checkpoint = tmp_path / "model.pt"
    torch.save(build_iris_net(base_channels=4, num_heads=4, num_query_tokens=8, channel_multipliers=(1, 2, 4, 8))
               .state_dict(), checkpoint)  # fmt: skip
    evaluate = "'bundle/configs/train.json','bundle/configs/demo.json','bundle/configs/evaluate.json'"
    common = [
        "-m", "monai.bundle", "run", "evaluating", "--bundle_root", "bundle", "--dataset_dir", str(demo_dataset.parent),
        "--ckpt_path", str(checkpoint), "--eval_shots", "[1]", "--eval_draws", "1",
        "--eval_strategies", "['one_shot','ensemble']", "--base_channels", "4", "--network_def#num_heads", "4",
        "--network_def#channel_multipliers", "[1,2,4,8]",
    ]  # fmt: skip
    single = [sys.executable, *common, "--config_file", f"[{evaluate}]", "--output_dir", str(tmp_path / "one")]
    multi = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2", *common,
        "--config_file", f"[{evaluate},'bundle/configs/multi_gpu_evaluate.json']",
        "--output_dir", str(tmp_path / "two"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for command in (single, multi):
        result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, env=env)
        assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert one.keys() == two.keys()
    for group in ("seen", "held_out"):
        for strategy in one[group]:
            expected, actual = one[group][strategy]["1"], two[group][strategy]["1"]
            assert expected["per_class"].keys() == actual["per_class"].keys()
            assert abs(expected["mean"]["dice"] - actual["mean"]["dice"]) < 1e-4
    for strategy, by_k in one["reference_following"].items():
        for name, value in by_k["1"].items():
            assert abs(value - two["reference_following"][strategy]["1"][name]) < 1e-4, (strategy, name)
    assert abs(one["k_independence"] - two["k_independence"]) < 1e-4


def test_memory_bank_survives_resume_under_ddp(demo_dataset: Path, tmp_path: Path) -> None:
    def command(iterations: int, state_dir: Path) -> list[str]:
        save = f"$torch.save(@network.module.state_dict(), '{state_dir}/rank' + os.environ['RANK'] + '.pt')"
        return [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
            "-m", "monai.bundle", "run", "training", "--config_file", CONFIGS, "--bundle_root", "bundle",
            "--dataset_dir", str(demo_dataset.parent), "--ckpt_dir", str(tmp_path / "models"),
            "--output_dir", str(tmp_path / "logs"), "--total_iterations", str(iterations), "--eval_every", "100",
            "--checkpoint_every", "2", "--num_workers", "0",
            "--finalize", repr([save, "$dist.destroy_process_group()"]), *TINY,
        ]  # fmt: skip

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    result = subprocess.run(command(2, first), cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    result = subprocess.run(command(4, second), cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    assert "Resuming training from" in result.stdout + result.stderr

    saved = torch.load(tmp_path / "models" / "checkpoint_00000002.pt", weights_only=True)["network"]
    before = torch.load(first / "rank0.pt", weights_only=True)
    assert torch.equal(saved["memory_bank.embeddings"], before["memory_bank.embeddings"])
    rank0, rank1 = (torch.load(second / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for key in ("memory_bank.embeddings", "memory_bank.counts"):
        assert torch.equal(rank0[key], rank1[key]), key
    assert torch.equal(rank0["memory_bank._extra_state"], rank1["memory_bank._extra_state"])
    assert rank0["memory_bank.counts"].sum() > before["memory_bank.counts"].sum()  # continued from the saved bank
