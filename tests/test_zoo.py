"""Model-zoo readiness: the zoo's bundle checks, run as the zoo's CI runs them (``python -m monai.bundle ...``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from scripts.data.demo_data import CLASS_NAMES
from scripts.networks import build_iris_net

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE = REPO_ROOT / "bundle"
CONFIGS = BUNDLE / "configs"
SCHEMA = Path(__file__).parent / "schemas" / "meta_schema_20240725.json"
TINY = {"base_channels": 4, "num_heads": 2, "num_query_tokens": 3, "channel_multipliers": [1, 2, 4, 8]}


def monai_bundle(*args: str, cwd: Path = BUNDLE) -> subprocess.CompletedProcess:
    """Run ``python -m monai.bundle`` in the bundle folder, as the zoo's CI does; fail with its output."""
    env = {**os.environ, "PYTHONPATH": str(BUNDLE)}
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def overrides(values: dict) -> list[str]:
    return [item for key, value in values.items() for item in (f"--{key}", json.dumps(value))]


@pytest.mark.slow
def test_verify_metadata_against_the_zoo_schema(tmp_path: Path) -> None:
    schema = tmp_path / "schema.json"
    shutil.copy(SCHEMA, schema)  # the public schema of the metadata's "schema" URL, stored for offline runs
    monai_bundle("verify_metadata", "--meta_file", "configs/metadata.json", "--filepath", str(schema))


def test_metadata_describes_the_model_that_inference_builds_without_weights(tmp_path: Path) -> None:
    """Without a model file (the zoo's shape checks), inference.json builds the network that metadata.json describes:
    the demo model's size, patch and memory classes."""
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    parser.read_meta(str(CONFIGS / "metadata.json"))
    parser["bundle_root"], parser["ckpt_path"] = str(BUNDLE), str(tmp_path / "absent.pt")
    pred = meta["network_data_format"]["outputs"]["pred"]
    classes = parser.get_parsed_content("memory_classes")
    assert classes == list(pred["channel_def"].values()) == sorted(classes) and pred["num_channels"] == len(classes)
    assert parser.get_parsed_content("patch_size") == meta["network_data_format"]["inputs"]["image"]["spatial_shape"]
    network = parser.get_parsed_content("network_def")
    assert network.settings["network"]["channel_multipliers"] == [1, 4, 8, 16]
    labels = meta["network_data_format"]["post_processed_outputs"]["pred"]["channel_def"]
    values = {f"IrisDemo/{name}": value for value, name in enumerate(CLASS_NAMES, start=1)}  # dataset.json's values
    assert labels == {"0": "background", **{str(values[name]): name for name in classes}}
    assert meta["version"] in meta["changelog"] and "monai-label" in meta["supported_apps"]
    large_files = (BUNDLE / "large_files.yml").read_text()
    assert "models/model.pt" in large_files


@pytest.mark.slow
def test_verify_net_in_out_on_the_query_only_forward() -> None:
    monai_bundle(
        "verify_net_in_out", "network_def", "--config_file", "configs/inference.json",
        "--meta_file", "configs/metadata.json", "--device", "cpu",
        *overrides({**TINY, "_meta_#network_data_format#inputs#image#spatial_shape": [32, 32, 32]}),
    )  # fmt: skip


@pytest.mark.slow
def test_ckpt_export_to_torchscript_matches_the_eager_network(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = build_iris_net(**TINY)
    net.memory_bank.update(["ds/b", "ds/a", "ds/c"], torch.randn(3, *net.memory_bank.embeddings.shape[1:]))
    ckpt, exported = tmp_path / "model.pt", tmp_path / "model.ts"
    torch.save(net.state_dict(), ckpt)
    monai_bundle(
        "ckpt_export", "network_def", "--filepath", str(exported), "--ckpt_file", str(ckpt),
        "--config_file", "configs/inference.json", "--meta_file", "configs/metadata.json", *overrides(TINY),
    )  # fmt: skip
    scripted = torch.jit.load(str(exported))
    query = torch.rand(1, 1, 32, 40, 24)
    with torch.no_grad():
        torch.testing.assert_close(scripted(query), net.eval()(query))
    assert scripted(query).shape[1] == 3  # the checkpoint's classes, not the placeholders of the config


def test_evaluate_config_has_the_bundle_properties(demo_dataset: Path, tmp_path: Path) -> None:
    """train.json and inference.json are checked in their own tests; this is the k-shot evaluation workflow."""
    workflow = ConfigWorkflow(
        config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=False,
        workflow_type="eval",
        run_id="evaluating",
        dataset_dir=str(demo_dataset.parent),
        output_dir=str(tmp_path),
    )
    workflow.initialize()
    assert workflow.check_properties() == []


@pytest.mark.parametrize(
    "command",
    [
        ["black", "--skip-magic-trailing-comma", "--check", "--line-length", "120", "."],
        ["isort", "--check-only", "--profile", "black", "--line-length", "120", "."],
        ["flake8", "--max-line-length", "120", "bundle", "scripts", "tests"],
    ],
)
def test_code_passes_the_zoo_style_checks(command: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", *command], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
