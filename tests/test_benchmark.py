"""scripts/benchmark.py on a tiny setting: every reported number exists and is finite and positive (no timings)."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # every benchmark step, on the demo data

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_NET = {"base_channels": 4, "num_query_tokens": 3, "num_heads": 4, "channel_multipliers": (1, 2, 4)}
REPORTED = (
    "train_step_ratio_vs_unet",
    "train_step_s_iris",
    "train_step_s_unet",
    "train_step_s_iris_channels_last",
    "train_step_ratio_vs_unet_channels_last",
    "channels_last_speedup",
    "train_step_s_own_backbone",
    "train_step_ratio_own_backbone_vs_unet",
    "episodic_overhead_vs_own_backbone",
    "infer_cost_ratio_15_vs_1_classes",
    "data_wait_fraction",
    "bf16_speedup",
    "train_peak_memory_mb_iris",
    "train_peak_memory_mb_unet",
    "infer_peak_memory_mb_15_classes",
    "infer_voxels_per_s_15_classes",
    "infer_peak_memory_mb_15_classes_float16_stitching",
    "infer_voxels_per_s_15_classes_float16_stitching",
    "train_step_gflop",
    "train_step_gflop_unet",
    "train_flop_ratio_vs_unet",
    "train_achieved_gflops_unet",
    "train_achieved_gflops",
    "matmul_gflops",
    "train_flops_fraction_of_matmul",
    "params_iris",
    "params_unet",
)


@pytest.fixture(scope="module")
def benchmark():
    """The repo-level script, loaded by path: the repo's ``scripts/`` folder is deliberately not a package."""
    spec = importlib.util.spec_from_file_location("iris_benchmark", REPO_ROOT / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_thread():
    """One torch thread: these tiny operations run several times faster on a shared CPU (no timing is asserted)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_every_metric_is_finite_and_positive(benchmark, demo_dataset: Path, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setitem(benchmark.PRESETS, "tiny", TINY_NET)
    tiny = replace(
        benchmark.QUICK, preset="tiny", patch=(16, 16, 16), batch_size=1, max_classes=2, query_volume=(24, 24, 24),
        large_volume=(32, 32, 24), sw_batch_size=2, repeats=1, rounds=1, data_iterations=2, num_workers=0,
        matmul_size=256,
    )  # fmt: skip
    output = tmp_path / "out.json"
    results = benchmark.run_benchmark(tiny, torch.device("cpu"), demo_dataset, output)
    assert benchmark.finite_positive(results, REPORTED), {key: results.get(key) for key in REPORTED}
    assert results["data_wait_fraction"] < 1
    assert json.loads(output.read_text()) == json.loads(json.dumps(results))  # written after the last step too
    assert "train_step_ratio_vs_unet" in benchmark.format_table(results)
