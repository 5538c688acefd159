"""Model-zoo readiness: the zoo's bundle checks, run as the zoo's CI runs them (``python -m monai.bundle ...``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from scripts.data.demo_data import CLASS_NAMES
from scripts.networks import build_iris_net

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE = REPO_ROOT / "bundle"
CONFIGS = BUNDLE / "configs"
SCHEMA = Path(__file__).parent / "schemas" / "meta_schema_20240725.json"
TINY = {"base_channels": 4, "num_heads": 2, "num_query_tokens": 3, "channel_multipliers": [1, 2, 4, 8]}
ZOO_NAME = "iris_incontext_segmentation"


def monai_bundle(*args: str, cwd: Path = BUNDLE) -> subprocess.CompletedProcess:
    """Run ``python -m monai.bundle`` in a bundle folder (the repository's by default), as the zoo's CI does; fail
    with its output."""
    env = {**os.environ, "PYTHONPATH": str(cwd)}
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
    assert meta["version"] in meta["changelog"] and "supported_apps" not in meta  # the IRIS app is not in the bundle
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
def test_ckpt_export_of_any_checkpoint_needs_no_other_flag(tmp_path: Path) -> None:
    """``ckpt_export --ckpt_file X`` builds the network that X records, wherever X lies: a model of another size
    than the bundle's metadata describes, and a training checkpoint (``--key_in_ckpt network``)."""
    torch.manual_seed(0)
    net = build_iris_net(**TINY)
    net.memory_bank.update(["ds/b", "ds/a", "ds/c"], torch.randn(3, *net.memory_bank.embeddings.shape[1:]))
    model, checkpoint = tmp_path / "elsewhere" / "my_model.pt", tmp_path / "checkpoint_00000002.pt"
    model.parent.mkdir()
    torch.save(net.state_dict(), model)
    torch.save({"network": net.state_dict(), "iteration": 2}, checkpoint)
    query = torch.rand(1, 1, 32, 40, 24)
    with torch.no_grad():
        expected = net.eval()(query)
    for source, extra in ((model, []), (checkpoint, ["--key_in_ckpt", "network"])):
        exported = tmp_path / f"{source.stem}.ts"
        monai_bundle(
            "ckpt_export", "network_def", "--filepath", str(exported), "--ckpt_file", str(source),
            "--config_file", "configs/inference.json", "--meta_file", "configs/metadata.json", *extra,
        )  # fmt: skip
        scripted = torch.jit.load(str(exported))
        with torch.no_grad():
            torch.testing.assert_close(scripted(query), expected)
        assert scripted(query).shape[1] == 3  # the checkpoint's classes, not the metadata's


def test_every_pin_installs_on_python_3_10_to_3_12_and_fits_the_requirements() -> None:
    """The zoo installs exactly metadata.json's versions on Python 3.10: each must support it (recorded from the tested
    environment by scripts/pin_versions.py) and fit the ranges that requirements.txt gives the project."""
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    pins = {"monai": meta["monai_version"], "torch": meta["pytorch_version"], "numpy": meta["numpy_version"]}
    pins.update(meta["required_packages_version"])
    tested = json.loads((REPO_ROOT / "tests" / "tested_versions.json").read_text())
    assert {name: entry["version"] for name, entry in tested.items()} == pins
    ranges = {}
    for line in (REPO_ROOT / "requirements.txt").read_text().splitlines():
        if line.split("#")[0].strip():
            requirement = Requirement(line.split("#")[0])
            ranges[canonicalize_name(requirement.name)] = requirement.specifier
    for name, version in pins.items():
        supported = SpecifierSet(tested[name]["requires_python"])
        assert all(supported.contains(python) for python in ("3.10.14", "3.11.9", "3.12.7")), (name, supported)
        assert ranges[canonicalize_name(name)].contains(version), f"{name}=={version} is outside requirements.txt"
        try:
            installed = distribution(name)
        except PackageNotFoundError:
            continue
        if installed.version == version:  # the table says what the installed distribution says
            assert (installed.metadata.get("Requires-Python") or "") == tested[name]["requires_python"], name


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


def packed(tmp_path: Path, model: Path | None = None) -> dict[str, Path]:
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "pack_bundle.py"), "--output_dir", str(tmp_path / "dist"),
         *(["--model", str(model)] if model else [])],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {"archive": next((tmp_path / "dist").glob(f"{ZOO_NAME}_v*.zip")), "zoo": tmp_path / "dist" / "model-zoo"}


@pytest.mark.slow
def test_the_zoo_unit_test_passes_in_the_layout_of_a_zoo_pull_request(tmp_path: Path) -> None:
    """scripts/zoo/test_<bundle>.py, laid out as the pull request adds it, run from the zoo root as its runner runs it:
    train, evaluate and infer through ConfigWorkflow with check_properties."""
    zoo = packed(tmp_path)["zoo"]
    test = zoo / "ci" / "unit_tests" / f"test_{ZOO_NAME}.py"
    assert test.is_file() and (zoo / "models" / ZOO_NAME / "configs" / "inference.json").is_file()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, str(test)], cwd=zoo, env=env, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Ran 3 tests" in output and "OK" in output.splitlines()[-1], output[-4000:]


@pytest.mark.slow
def test_the_packed_bundle_downloads_loads_and_runs_the_cards_inference(demo_dataset: Path, tmp_path: Path) -> None:
    """The release archive, unpacked by ``monai.bundle download --url file://...``, loads with ``monai.bundle.load``
    (state dict values are tensors, as copy_model_state needs) and runs the model card's inference command."""
    torch.manual_seed(0)
    from scripts.segmentation.model_io import training_settings

    settings = training_settings([str(demo_dataset)], [32, 32, 32], None)
    net = build_iris_net(**TINY, settings=settings, memory_classes=["IrisDemo/fluid_round", "IrisDemo/soft_lobed"])
    net.memory_bank.update(
        ["IrisDemo/fluid_round", "IrisDemo/soft_lobed"], torch.randn(2, *net.memory_bank.embeddings.shape[1:])
    )
    model = tmp_path / "model.pt"
    torch.save(net.state_dict(), model)
    archive = packed(tmp_path, model)["archive"]
    bundles = tmp_path / "downloaded"
    monai_bundle("download", "--name", ZOO_NAME, "--bundle_dir", str(bundles), "--url", archive.as_uri(), cwd=tmp_path)
    root = bundles / ZOO_NAME
    assert (root / "configs" / "inference.json").is_file() and (root / "models" / "model.pt").is_file()

    args = tmp_path / "load_args.json"
    args.write_text(json.dumps({"bundle_root": str(root)}))  # where the bundle lies, as the card says
    code = (
        "import monai, sys, torch; "
        f"net = monai.bundle.load(name={ZOO_NAME!r}, bundle_dir={str(bundles)!r}, source='github', "
        f"workflow_type='inference', args_file={str(args)!r}); "
        "torch.save(net.state_dict(), sys.argv[1])"
    )
    loaded = tmp_path / "loaded.pt"
    result = subprocess.run([sys.executable, "-c", code, str(loaded)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    state, original = torch.load(loaded, weights_only=True), net.state_dict()
    assert state.keys() == original.keys() and [k for k in original if not torch.equal(state[k], original[k])] == []

    content = json.loads(demo_dataset.read_text())
    data = demo_dataset.parent
    card = (root / "docs" / "README.md").read_text()
    assert "python -m monai.bundle run --config_file configs/inference.json --bundle_root ." in card
    monai_bundle(
        "run", "--config_file", "configs/inference.json", "--bundle_root", ".",
        "--query_images", str([str(data / content["validation"][0]["image"])]),
        "--support_images", str([str(data / content["training"][0]["image"])]),
        "--support_labels", str([str(data / content["training"][0]["label"])]),
        "--classes", "{'fluid_round': 1}", "--strategy", "one_shot", "--output_dir", str(tmp_path / "out"),
        cwd=root,
    )  # fmt: skip
    assert len(list((tmp_path / "out").glob("*_seg.nii.gz"))) == 1
