"""Bundle configs: ConfigWorkflow properties, metadata schema, and an end-to-end ``monai.bundle run training``."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import mlflow
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.utils import path_to_sqlite_uri
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from scripts.data.demo_data import HELD_OUT_LABELS
from scripts.errors import user_error
from scripts.networks import build_iris_net
from scripts.segmentation.model_io import DEFAULT_SETTINGS, bundle_version, read_model_settings

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "bundle" / "configs"
SCHEMA = Path(__file__).resolve().parent / "schemas" / "meta_schema_20240725.json"  # copy of ../shared/schemas
TINY = ["--base_channels", "4", "--network_def#num_heads", "4", "--network_def#channel_multipliers", "[1,2,4,8]"]
TINY += ["--patch_size", "[32,32,32]"]
TINY += ["--batch_size", "2"]


def _workflow(*config_files: str, workflow_type: str = "train", **overrides) -> ConfigWorkflow:
    files = [str(CONFIGS / name) for name in config_files]
    return ConfigWorkflow(
        config_file=files if len(files) > 1 else files[0],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        workflow_type=workflow_type,
        run_id="training",
        **overrides,
    )


@pytest.mark.parametrize("configs", [("train.json",), ("train.json", "demo.json")])
def test_train_config_has_every_property(configs: tuple[str, ...], demo_dataset: Path, tmp_path: Path) -> None:
    # resolving the properties builds the datasets and handlers: real (demo) data, logs out of the repository
    workflow = _workflow(*configs, dataset_dir=str(demo_dataset.parent), output_dir=str(tmp_path))
    workflow.initialize()
    assert workflow.check_properties() == []


def test_handlers_are_switched_off_by_name(demo_dataset: Path, tmp_path: Path) -> None:
    """Every handler has a name under train#handler / validate#handler; `_disabled_` on the name removes it."""
    options = {"dataset_dir": str(demo_dataset.parent), "output_dir": str(tmp_path), "ckpt_dir": str(tmp_path)}
    off = {f"train#handler#{name}#_disabled_": True for name in ("tensorboard", "checkpoints", "training_summary")}
    off["validate#handler#tensorboard#_disabled_"] = True
    full = _workflow("train.json", "demo.json", **options)
    reduced = _workflow("train.json", "demo.json", **options, **off)
    for workflow in (full, reduced):
        workflow.initialize()
    handlers = {"train": "train#trainer#train_handlers", "validate": "validate#evaluator#val_handlers"}  # both lists
    train = [type(h).__name__ for h in full.parser.get_parsed_content(handlers["train"])]
    reduced_train = [type(h).__name__ for h in reduced.parser.get_parsed_content(handlers["train"])]
    assert len(train) == len(full.parser["train#handler"]) - 2  # pretrained_weights and encoder_freeze are off
    assert set(train) - set(reduced_train) == {"CheckpointManager", "TensorBoardStatsHandler", "TrainingSummary"}
    validate = [type(h).__name__ for h in full.parser.get_parsed_content(handlers["validate"])]
    reduced_validate = [type(h).__name__ for h in reduced.parser.get_parsed_content(handlers["validate"])]
    assert set(validate) - set(reduced_validate) == {"TensorBoardStatsHandler"}
    assert reduced.check_properties() == []


def test_lowercase_switches_on_the_command_line_are_refused_before_work(demo_dataset: Path, tmp_path: Path) -> None:
    """fire reads `--resume false` as the text "false", which Python counts as on: refused, naming id and fix."""
    options = {
        "dataset_dir": str(demo_dataset.parent),
        "output_dir": str(tmp_path / "logs"),
        "train#pool#cache": "disk",
    }
    options["train#pool#cache_dir"] = str(tmp_path / "cache")
    workflow = _workflow(
        "train.json",
        "demo.json",
        **options,
        ckpt_dir=str(tmp_path / "models"),
        resume="false",
        amp=1,
        total_iterations=1,
    )
    workflow.initialize()
    with pytest.raises(Exception) as raised:
        workflow.run()
    message = str(user_error(raised.value))
    assert "--resume got 'false', write --resume False" in message and "--amp got 1" in message
    assert "channels_last" not in message
    assert not any(tmp_path.iterdir())  # no log, checkpoint or disk cache: nothing ran


def test_ids_moved_into_their_component_are_refused_with_the_new_id(demo_dataset: Path, tmp_path: Path) -> None:
    """MONAI would add ``--synthetic_class_prob`` as a new, unread id and train with the default: refused instead,
    from the command line and from a config file, before anything is written; the new ids are read."""
    preset = tmp_path / "preset.json"
    preset.write_text(json.dumps({"decay_interval": 100, "k_shot": 2}))
    configs = f"['bundle/configs/train.json','bundle/configs/demo.json','{preset}']"
    command = [
        sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", configs, "--bundle_root", "bundle",
        "--dataset_dir", str(demo_dataset.parent), "--ckpt_dir", str(tmp_path / "models"),
        "--output_dir", str(tmp_path / "logs"), "--synthetic_class_prob", "0.25",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=os.environ)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "--synthetic_class_prob on the command line is now --train#dataset#synthetic_class_prob" in result.stderr
    assert f'"decay_interval" in {preset} is now "lr_scheduler#decay_interval"' in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["preset.json"]
    moved = {"train#dataset#synthetic_class_prob": 0.25, "lr_scheduler#decay_interval": 100}
    workflow = _workflow("train.json", "demo.json", dataset_dir=str(demo_dataset.parent), **moved)
    workflow.initialize()
    assert workflow.parser.get_parsed_content("train#dataset").synthetic_class_prob == 0.25
    assert workflow.parser.get_parsed_content("lr_scheduler").lr_lambdas[0].decay_interval == 100


def test_metadata_follows_the_zoo_schema() -> None:
    metadata = json.loads((CONFIGS / "metadata.json").read_text())
    jsonschema.validate(metadata, json.loads(SCHEMA.read_text()))
    assert metadata["version"] in metadata["changelog"]


def test_configs_are_indented_json() -> None:
    for path in CONFIGS.glob("*.json"):
        text = path.read_text()
        assert text == json.dumps(json.loads(text), indent=4) + "\n", f"{path.name} is not 4-space indented JSON"


@dataclass(frozen=True)
class TrainedRun:
    """Where the shared end-to-end training run wrote its models and logs, and what it printed."""

    ckpt_dir: Path
    output_dir: Path
    logs: str


REFERENCE_FOLLOWING = ["val_seen_dice", "val_held_out_dice", "val_wrong_reference_dice", "val_absent_class_fp"]
LABEL_MAP = ["val_label_map_seen_dice", "val_label_map_held_out_dice", "val_label_map_absent_class_fp"]
CONTROL_DICE = {f"{rule}_rule_{group}_dice" for rule in ("intensity", "position") for group in ("seen", "held_out")}


@pytest.mark.parametrize("configs", [("train.json", "evaluate.json"), ("inference.json",)])
def test_evaluation_and_inference_build_the_network_the_model_records(configs: tuple[str, ...], tmp_path: Path) -> None:
    sizes = {"base_channels": 4, "num_query_tokens": 3, "num_heads": 2, "decoder_depth": 1, "blocks_per_stage": 2,
             "channel_multipliers": [1, 2, 4], "use_memory_bank": False, "memory_momentum": 0.8}  # fmt: skip
    model = tmp_path / "model.pt"
    torch.save(build_iris_net(**sizes).state_dict(), model)
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / name) for name in configs])
    parser.update({"bundle_root": str(tmp_path), "ckpt_path": str(model), "data_pool": []})
    built = parser.get_parsed_content("network_def").settings["network"]
    assert {key: built[key] for key in sizes} == sizes


def test_the_default_settings_of_inference_describe_the_demo_model() -> None:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "demo.json")])
    parser.update({"data_pool": []})
    settings = parser.get_parsed_content("network_def").settings
    demo = {**settings["network"], **{key: settings[key] for key in ("patch_size", "target_spacing", "mirror_axes")}}
    assert {key: DEFAULT_SETTINGS[key] for key in demo} == demo


@pytest.fixture(scope="module")
def trained_run(demo_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """One ``monai.bundle run training`` of 4 iterations (validation and checkpoints every 2, MLflow tracking, the last
    2 checkpoints averaged), shared by the end-to-end tests below, which each check one part of what it wrote."""
    run_dir = tmp_path_factory.mktemp("trained_run")
    ckpt_dir, output_dir = run_dir / "models", run_dir / "logs"
    command = [
        sys.executable, "-m", "monai.bundle", "run", "training",
        "--config_file", "['bundle/configs/train.json','bundle/configs/demo.json']",
        "--bundle_root", "bundle",
        "--dataset_dir", str(demo_dataset.parent),
        "--ckpt_dir", str(ckpt_dir),
        "--output_dir", str(output_dir),
        "--total_iterations", "4", "--eval_every", "2", "--checkpoint_every", "2", "--log_every", "2",
        "--num_workers", "0", "--tracking", "mlflow", "--train#handler#checkpoint_averaging#last", "2", *TINY,
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=os.environ)
    assert result.returncode == 0, result.stderr[-4000:]
    return TrainedRun(ckpt_dir, output_dir, result.stdout + result.stderr)


def _trained_net(run: TrainedRun) -> torch.nn.Module:
    """The trained ``model.pt`` loaded into a network of the run's size."""
    net = build_iris_net(base_channels=4, num_query_tokens=8, num_heads=4, channel_multipliers=(1, 2, 4, 8))
    net.load_state_dict(torch.load(run.ckpt_dir / "model.pt", weights_only=True))
    return net


@pytest.mark.slow
def test_training_logs_final_validation_label_map_and_trivial_rules(trained_run: TrainedRun) -> None:
    logs = trained_run.logs
    final_line = next(line for line in logs.splitlines() if "Final 1-shot validation after 4 iterations" in line)
    assert all(name in final_line for name in [*REFERENCE_FOLLOWING, "k_independence"])
    label_map_line = next(line for line in logs.splitlines() if "As one label map of every requested class" in line)
    assert all(name in label_map_line for name in LABEL_MAP) and not any(name in final_line for name in LABEL_MAP)
    rules_line = next(line for line in logs.splitlines() if "Trivial rules on the same cases:" in line)
    assert all(
        f"{rule}_rule_{group}_dice" in rules_line
        for rule in ("intensity", "position")
        for group in ("seen", "held_out")
    )
    assert "Validation at iteration 2: " in logs
    assert "Training from iteration 0 to 4" in logs and "Training finished in" in logs
    assert "Engine run resuming" not in logs and "Epoch[" not in logs  # ignite's epoch wording, meaningless here


@pytest.mark.slow
def test_validation_report_lists_every_metric_and_per_class_scores_by_group(trained_run: TrainedRun) -> None:
    report = json.loads((trained_run.output_dir / "validation_report.json").read_text())
    assert report["iteration"] == 4
    assert set(report["mean"]) == {*REFERENCE_FOLLOWING, "k_independence", *LABEL_MAP, *CONTROL_DICE}
    held_out = report["per_class"]["val_held_out_dice"]
    assert held_out and all(name.split("/")[1] in HELD_OUT_LABELS for name in held_out)
    assert not set(report["per_class"]["val_seen_dice"]) & set(held_out)
    absent = report["per_class"]["val_absent_class_fp"]  # which requested absent classes drew false positives
    assert absent and all(value >= 0 for value in absent.values())
    assert report["mean"]["val_absent_class_fp"] <= max(absent.values()) + 1e-6


@pytest.mark.slow
def test_best_model_has_a_memory_bank_of_the_seen_classes_only(trained_run: TrainedRun) -> None:
    net = _trained_net(trained_run)
    assert net.memory_bank.class_names and all(n.startswith("IrisDemo/") for n in net.memory_bank.class_names)
    assert not set(net.memory_bank.class_names) & {f"IrisDemo/{name}" for name in HELD_OUT_LABELS}


@pytest.mark.slow
def test_training_curves_and_metrics_lines_follow_the_validations(trained_run: TrainedRun) -> None:
    output_dir = trained_run.output_dir
    curves = json.loads((output_dir / "training_curves.json").read_text())
    assert curves["iteration"] == [2, 4] and all(np.isfinite(curves["loss"])) and len(curves["lr"]) == 2
    assert [v["iteration"] for v in curves["validation"]][:2] == [2, 4]
    assert Image.open(output_dir / "training_curves.png").size[0] > 0
    lines = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [2, 4] and all("val_seen_dice" in line for line in lines)
    assert 0 < lines[0]["wall_time_seconds"] < lines[1]["wall_time_seconds"]


@pytest.mark.slow
def test_training_summary_records_metrics_learning_rate_checkpoints_data_and_versions(trained_run: TrainedRun) -> None:
    ckpt_dir, output_dir = trained_run.ckpt_dir, trained_run.output_dir
    lines = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((output_dir / "training_summary.json").read_text())
    assert summary["iterations"] == 4 and summary["resumed_from_iteration"] == 0 and summary["wall_time_seconds"] > 0
    seen = summary["metrics"]["val_seen_dice"]
    assert seen["final"] == lines[-1]["val_seen_dice"] and seen["best"] == max(line["val_seen_dice"] for line in lines)
    assert 0 < summary["learning_rate"]["min"] <= summary["learning_rate"]["max"]
    assert summary["checkpoints"]["best_model"] == str(ckpt_dir / "model.pt") and summary["checkpoints"]["periodic"]
    assert summary["checkpoints"]["averaged_model"] == str(ckpt_dir / "model_averaged.pt")
    assert summary["data_pool"]["training"][0]["name"] == "IrisDemo" and summary["data_pool"]["training"][0]["subjects"]
    assert summary["versions"]["bundle"] == bundle_version()


@pytest.mark.slow
def test_class_embedding_map_is_drawn_at_the_end_and_by_the_plot_script(
    trained_run: TrainedRun, tmp_path: Path
) -> None:
    output_dir = trained_run.output_dir
    similarity = list(csv.reader((output_dir / "class_similarity.csv").open()))  # the class-embedding map
    assert similarity[0][1:] and all(name.startswith("IrisDemo/") for name in similarity[0][1:])
    assert all(float(row[1 + i]) > 0.999 for i, row in enumerate(similarity[1:]))  # each class with itself
    assert Image.open(output_dir / "class_embeddings_pca.png").size[0] >= 512
    model = trained_run.ckpt_dir / "model.pt"
    plotted = subprocess.run(
        [sys.executable, "scripts/plot_embeddings.py", "--model", str(model), "--out", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=os.environ,
    )  # fmt: skip
    assert plotted.returncode == 0, plotted.stderr[-3000:]
    assert (tmp_path / "class_embeddings_pca.png").is_file() and (tmp_path / "class_similarity.csv").is_file()


@pytest.mark.slow
def test_tensorboard_and_mlflow_record_the_run(trained_run: TrainedRun) -> None:
    output_dir = trained_run.output_dir
    assert len(list(output_dir.glob("events.out.tfevents.*"))) == 1  # one TensorBoard writer for every handler
    events = EventAccumulator(str(output_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert {"val_overlay/0", "val_overlay/1"} <= set(events.Tags()["images"])
    assert {"train_loss", "learning_rate", *REFERENCE_FOLLOWING} <= set(events.Tags()["scalars"])
    assert [event.step for event in events.Scalars("val_seen_dice")] == [2, 4]  # validations at their iterations
    tracking = mlflow.tracking.MlflowClient(path_to_sqlite_uri(str(output_dir / "mlruns.db")))
    runs = tracking.search_runs([e.experiment_id for e in tracking.search_experiments()])
    assert runs and len(tracking.get_metric_history(runs[0].info.run_id, "train_loss")) == 4


@pytest.mark.slow
def test_checkpoints_and_model_settings_describe_the_run(trained_run: TrainedRun) -> None:
    ckpt_dir = trained_run.ckpt_dir
    periodic = sorted(ckpt_dir.glob("checkpoint*.pt"))
    assert periodic, list(ckpt_dir.iterdir())
    checkpoint = torch.load(periodic[-1], weights_only=True)
    assert {"network", "optimizer", "lr_scheduler", "trainer", "best_model"} <= set(checkpoint)
    assert checkpoint["trainer"]["iteration"] in (2, 4)
    # the model describes itself, and the next commands need no size flags
    settings = read_model_settings(ckpt_dir / "model.pt")
    assert settings["base_channels"] == 4 and settings["channel_multipliers"] == [1, 2, 4, 8]
    assert settings["patch_size"] == [32, 32, 32] and settings["target_spacing"] is None
    assert settings["modality"] == "CT" and settings["bundle_version"] == bundle_version()
    assert sorted(settings["datasets"]["IrisDemo"]["held_out"]) == sorted(HELD_OUT_LABELS)
    assert settings["selection"]["metric"] == "val_seen_dice" and settings["selection"]["iteration"] in (2, 4)
    # the match threshold, chosen on training subjects when training ended, and what it does on validation subjects
    assert 0.0 <= settings["match"]["threshold"] <= 1.0 and settings["match"]["true_objects"] > 0
    report = json.loads((trained_run.output_dir / "validation_report.json").read_text())
    assert set(report["match"]) == {"training", "validation"}
    assert report["match"]["training"]["threshold"] == settings["match"]["threshold"]
    assert read_model_settings(periodic[-1])["base_channels"] == 4  # training checkpoints too


@pytest.mark.slow
def test_averaged_model_is_the_mean_of_the_last_two_checkpoints(trained_run: TrainedRun) -> None:
    ckpt_dir = trained_run.ckpt_dir
    periodic = sorted(ckpt_dir.glob("checkpoint*.pt"))
    averaged = torch.load(ckpt_dir / "model_averaged.pt", weights_only=True)  # the mean of the last 2 checkpoints
    last_two = [torch.load(path, weights_only=True)["network"] for path in periodic[-2:]]
    name = "encoder.stages.0.0.conv1.conv.weight"
    torch.testing.assert_close(averaged[name], (last_two[0][name] + last_two[1][name]) / 2)


@pytest.mark.slow
def test_inference_with_the_averaged_model_writes_each_class_at_its_label_value(
    trained_run: TrainedRun, demo_dataset: Path, tmp_path: Path
) -> None:
    query = json.loads(demo_dataset.read_text())["validation"][0]["image"]
    infer = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "bundle/configs/inference.json"]
    infer += ["--bundle_root", "bundle", "--ckpt_path", str(trained_run.ckpt_dir / "model_averaged.pt")]
    infer += ["--output_dir", str(tmp_path / "seg"), "--query_images", json.dumps([str(demo_dataset.parent / query)])]
    result = subprocess.run(infer, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=os.environ)
    assert result.returncode == 0, result.stderr[-4000:]
    assert len(list((tmp_path / "seg").glob("*_seg.nii.gz"))) == 1
    written = json.loads((tmp_path / "seg" / "summary.json").read_text())["queries"][0]["classes"]
    labels = json.loads(demo_dataset.read_text())["labels"]
    assert written and {name: c["label_value"] for name, c in written.items()} == {
        name: int(value) for value, name in ((v, f"IrisDemo/{n}") for v, n in labels.items()) if name in written
    }  # the memory strategy writes each class at its label value in the dataset
    assert "nvImageCodec" not in result.stdout + result.stderr


@pytest.mark.slow
def test_torchscript_export_of_the_best_model_has_a_channel_per_memory_class(
    trained_run: TrainedRun, tmp_path: Path
) -> None:
    model = str(trained_run.ckpt_dir / "model.pt")
    export = [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def"]
    export += [
        "--filepath",
        str(tmp_path / "model.ts"),
        "--ckpt_file",
        model,
        "--config_file",
        "configs/inference.json",
    ]
    export += ["--meta_file", "configs/metadata.json", "--bundle_root", ".", "--ckpt_path", model]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "bundle")}
    result = subprocess.run(export, cwd=REPO_ROOT / "bundle", capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert torch.jit.load(str(tmp_path / "model.ts"))(torch.rand(1, 1, 32, 32, 32)).shape[1] == len(
        _trained_net(trained_run).memory_bank.class_names
    )


@pytest.mark.slow
def test_lr_range_test_sweeps_the_bundle_trainer(demo_dataset: Path, tmp_path: Path) -> None:
    command = [
        sys.executable, "scripts/lr_range_test.py",
        "--config", "['bundle/configs/train.json','bundle/configs/demo.json']", "--out", str(tmp_path),
        "--num_iter", "6", "--start_lr", "1e-5", "--end_lr", "1e-1",
        "--dataset_dir", str(demo_dataset.parent), "--ckpt_dir", str(tmp_path / "models"), "--num_workers", "0", *TINY,
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=os.environ)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((tmp_path / "lr_range_test.json").read_text())
    assert summary["iterations"] == 6 and len(summary["loss"]) == 6 and all(np.isfinite(summary["loss"]))
    assert summary["lr"][0] < summary["lr"][-1] <= 1e-1 and summary["lr"] == sorted(summary["lr"])  # exponential sweep
    assert 1e-5 <= summary["suggested_base_learning_rate"] <= 1e-1
    assert Image.open(tmp_path / "lr_range_test.png").size[0] > 0
    assert not list(tmp_path.glob("models/*.pt"))  # a sweep, not a training run: nothing checkpointed
