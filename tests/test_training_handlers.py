"""Training handlers that only the end-to-end bundle run exercised before, and retrieval's top-k: each driven by real
ignite engines on a tiny network with hand-made metrics and embeddings, so that a broken promise fails in seconds."""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path

import monai
import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from ignite.metrics import Metric
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from scripts.atomic import atomic_save
from scripts.data.demo_data import HELD_OUT_LABELS
from scripts.data.pool import DatasetPool
from scripts.errors import IrisInputError
from scripts.networks import IrisNet, build_iris_net, extra_state
from scripts.segmentation.controls import CONTROLS
from scripts.segmentation.inferers import RetrievalInferer
from scripts.segmentation.metrics import AbsentClassFalsePositives, ClassGroupDice, WrongReferenceDice
from scripts.segmentation.model_io import bundle_version, read_model_settings
from scripts.segmentation.task_embeddings import ensemble
from scripts.training.averaging import AVERAGED_MODEL, CheckpointAveraging
from scripts.training.checkpoints import BestModelSaver, ResumableEarlyStopHandler
from scripts.training.embedding_map import EmbeddingMap, has_tsne
from scripts.training.handlers import ValidationReport, WindowMeanLoss
from scripts.training.training_summary import TrainingSummary
from scripts.training.visuals import TrainingCurves

PATCH = (32, 32, 32)


def _net(**options) -> IrisNet:
    """The tiny IrisNet of the other unit tests, with fixed initial weights."""
    torch.manual_seed(0)
    return build_iris_net(base_channels=4, num_query_tokens=3, num_heads=4, channel_multipliers=(1, 2, 4, 8), **options)


def _evaluator(metrics: Callable[[], Mapping[str, float]]) -> Engine:
    """A validation engine whose run sets ``state.metrics`` to ``metrics()``, as attached metrics would."""

    def validate(engine: Engine, batch: int) -> None:
        engine.state.metrics = dict(metrics())

    return Engine(validate)


def _restore_at(iteration: int) -> Callable[[Engine], None]:
    """What ``CheckpointManager.restore`` does to the trainer on STARTED: continue the one epoch from ``iteration``."""

    def restore(engine: Engine) -> None:
        engine.state.iteration, engine.state.epoch = iteration, 0

    return restore


def _lr_optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)


# TrainingSummary ------------------------------------------------------------------------------------------------------

SUMMARY_METRICS = ("val_seen_dice", "val_held_out_dice", "val_wrong_reference_dice", "k_independence")
VALIDATIONS = {  # trainer iteration -> the evaluator's metrics then; k_independence is never measured (NaN)
    iteration: dict(zip(SUMMARY_METRICS, values))
    for iteration, values in {
        2: (0.2, math.nan, 0.3, math.nan),
        4: (0.5, 0.3, 0.1, math.nan),
        6: (0.4, 0.1, 0.2, math.nan),
        8: (0.45, 0.2, 0.2, math.nan),
    }.items()
}


@pytest.fixture(scope="module")
def training_pool(demo_dataset: Path) -> DatasetPool:
    return DatasetPool([str(demo_dataset)], "training")


def _summary_run(run_dir: Path, pool: DatasetPool, total: int, resume_from: int = 0) -> None:
    """Train ``total`` iterations (lr 0.01 x iteration), validating every 2 with the metrics of ``VALIDATIONS``."""
    optimizer = _lr_optimizer()

    def step(engine: Engine, batch: int) -> None:
        optimizer.param_groups[0]["lr"] = 0.01 * engine.state.iteration

    trainer = Engine(step)
    evaluator = _evaluator(lambda: VALIDATIONS[trainer.state.iteration])
    if resume_from:
        trainer.add_event_handler(Events.STARTED, _restore_at(resume_from))  # the checkpoint handler comes first
    summary = TrainingSummary(evaluator, optimizer, str(run_dir / "logs"), str(run_dir / "models"), {"training": pool})
    summary.attach(trainer)
    trainer.add_event_handler(Events.ITERATION_COMPLETED(every=2), lambda _: evaluator.run([0]))
    trainer.run(range(total), max_epochs=1)


def test_training_summary_records_every_validation_and_the_best_and_final_values(
    tmp_path: Path, training_pool: DatasetPool, demo_dataset: Path
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    for name in ("model.pt", "checkpoint_00000004.pt", "checkpoint_00000002.pt", "unrelated.pt"):
        (models / name).write_bytes(b"")  # the summary lists files, it does not read them
    _summary_run(tmp_path, training_pool, total=6)

    lines = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [2, 4, 6]
    assert [line["learning_rate"] for line in lines] == pytest.approx([0.02, 0.04, 0.06])
    assert [line["val_seen_dice"] for line in lines] == [0.2, 0.5, 0.4] and math.isnan(lines[0]["val_held_out_dice"])
    wall_times = [line["wall_time_seconds"] for line in lines]
    assert wall_times == sorted(wall_times) and wall_times[0] >= 0

    summary = json.loads((tmp_path / "logs" / "training_summary.json").read_text())
    assert summary["iterations"] == 6 and summary["resumed_from_iteration"] == 0 and summary["wall_time_seconds"] >= 0
    assert summary["key_metric"] == "val_seen_dice"
    assert summary["metrics"] == {
        "val_seen_dice": {"best": 0.5, "best_iteration": 4, "final": 0.4, "final_iteration": 6},
        "val_held_out_dice": {"best": 0.3, "best_iteration": 4, "final": 0.1, "final_iteration": 6},  # NaN skipped
        "val_wrong_reference_dice": {"best": 0.1, "best_iteration": 4, "final": 0.2, "final_iteration": 6},  # lower
    }  # k_independence, never finite, is left out
    assert summary["learning_rate"] == pytest.approx({"min": 0.02, "max": 0.06, "final": 0.06})  # validations
    assert summary["checkpoints"] == {
        "best_model": str(models / "model.pt"),
        "averaged_model": None,  # no model_averaged.pt in ckpt_dir
        "periodic": [str(models / "checkpoint_00000002.pt"), str(models / "checkpoint_00000004.pt")],
    }
    dataset = json.loads(demo_dataset.read_text())
    (pool,) = summary["data_pool"]["training"]
    assert pool["name"] == "IrisDemo" and Path(pool["root"]).resolve() == demo_dataset.parent.resolve()
    assert pool["subjects"] == len(dataset["training"])
    assert pool["classes"] == sorted(f"IrisDemo/{name}" for value, name in dataset["labels"].items() if value != "0")
    assert pool["held_out"] == sorted(f"IrisDemo/{name}" for name in HELD_OUT_LABELS)
    assert summary["versions"] == {"torch": torch.__version__, "monai": monai.__version__, "bundle": bundle_version()}


def test_a_resumed_training_summary_drops_the_validations_after_its_checkpoint(
    tmp_path: Path, training_pool: DatasetPool
) -> None:
    """A run killed after the validation at 6 but before a checkpoint there resumes from 4 and repeats that validation:
    the first run's line at 6 (here the best score) must not survive, and time counts on from the line at 4."""
    logs = tmp_path / "logs"
    logs.mkdir()
    earlier = [
        {"iteration": 2, "wall_time_seconds": 10.0, "learning_rate": 0.02, "val_seen_dice": 0.2},
        {"iteration": 4, "wall_time_seconds": 20.0, "learning_rate": 0.04, "val_seen_dice": 0.5},
        {"iteration": 6, "wall_time_seconds": 30.0, "learning_rate": 0.06, "val_seen_dice": 0.9},
    ]
    (logs / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in earlier))
    _summary_run(tmp_path, training_pool, total=8, resume_from=4)

    lines = [json.loads(line) for line in (logs / "metrics.jsonl").read_text().splitlines()]
    assert lines[:2] == earlier[:2] and [line["iteration"] for line in lines] == [2, 4, 6, 8]
    assert [line["val_seen_dice"] for line in lines[2:]] == [0.4, 0.45]  # the resumed run's validations
    assert all(line["wall_time_seconds"] >= 20.0 for line in lines[2:])  # counted on from the kept line at 4
    assert lines[2]["wall_time_seconds"] <= lines[3]["wall_time_seconds"]
    summary = json.loads((logs / "training_summary.json").read_text())
    assert summary["iterations"] == 8 and summary["resumed_from_iteration"] == 4
    assert summary["metrics"]["val_seen_dice"] == {
        "best": 0.5,
        "best_iteration": 4,
        "final": 0.45,
        "final_iteration": 8,
    }
    assert summary["learning_rate"] == pytest.approx({"min": 0.02, "max": 0.08, "final": 0.08})  # kept lines too


# ValidationReport -----------------------------------------------------------------------------------------------------

NAMES = ["Demo/a", "Demo/b", "Demo/c"]  # Demo/c is held out
MEAN_VOXELS = {"Demo/a": 8.0, "Demo/b": 8.0, "Demo/c": 8.0}


def _masks(voxels: list[range]) -> torch.Tensor:
    """1 x K x 4 x 4 x 4 masks: class k on the flat voxels ``voxels[k]``."""
    masks = torch.zeros(len(voxels), 64)
    for k, indices in enumerate(voxels):
        masks[k, list(indices)] = 1
    return masks.view(1, len(voxels), 4, 4, 4)


def _case(ids: list[int], present: list[bool], truth: list[range], pred: list[range], position: list[float]) -> dict:
    """One evaluator output as ``EpisodicEvaluator`` leaves it (one case per batch), with logits of +-10."""
    control_dice = torch.zeros(1, len(ids), len(CONTROLS))
    control_dice[0, :, CONTROLS.index("position_rule")] = torch.tensor(position)
    return {
        "pred": _masks(pred) * 20 - 10,
        "label": _masks(truth),
        "class_ids": torch.tensor([ids]),
        "class_present": torch.tensor([present]),
        "control_dice": control_dice,
    }


CASES = [  # a: Dice 1 then 2*4/(4+8); b: absent with 4 voxels predicted, then Dice 1; c (held out): Dice 2*4/(4+8)
    _case([0, 2, 1], [True, True, False], [range(8), range(8, 16), range(0)], [range(8), range(8, 12), range(16, 20)],
          [0.1, 0.2, 0.3]),
    _case([0, 1, -1], [True, True, False], [range(8), range(16, 24), range(0)], [range(4), range(16, 24), range(0)],
          [0.5, 0.7, 0.9]),
]  # fmt: skip


class CaseEvaluator(Engine):
    """An evaluator of the fixed ``CASES`` whose ``run()`` needs no data, as MONAI's evaluators."""

    def __init__(self) -> None:
        super().__init__(lambda engine, index: CASES[index])

    def run(self, data: object = None, max_epochs: int = 1) -> None:  # type: ignore[override]
        super().run(range(len(CASES)) if data is None else data, max_epochs=max_epochs)


def _report_metrics() -> dict[str, Metric]:
    held_out = ["Demo/c"]
    return {
        "val_seen_dice": ClassGroupDice(NAMES, held_out, "seen"),
        "val_held_out_dice": ClassGroupDice(NAMES, held_out, "held_out"),
        "val_wrong_reference_dice": WrongReferenceDice(),
        "val_absent_class_fp": AbsentClassFalsePositives(NAMES, MEAN_VOXELS),
        "val_label_map_seen_dice": ClassGroupDice(NAMES, held_out, "seen", predictions="label_map"),
        "val_label_map_absent_class_fp": AbsentClassFalsePositives(NAMES, MEAN_VOXELS, predictions="label_map"),
        "position_rule_seen_dice": ClassGroupDice(NAMES, held_out, "seen", scores="position_rule"),
    }


@pytest.mark.parametrize(
    "interval, validate_in_training, expected_runs",
    [(2, True, 2), (3, True, 1), (3, False, 1)],
    ids=["last-iteration-not-validated", "last-iteration-validated", "never-validated"],
)
def test_validation_report_validates_the_final_model_once_and_writes_every_score(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, interval: int, validate_in_training: bool, expected_runs: int
) -> None:
    metrics = _report_metrics()
    evaluator = CaseEvaluator()
    for name, metric in metrics.items():
        metric.attach(evaluator, name)
    runs = []
    evaluator.add_event_handler(Events.STARTED, lambda _: runs.append(1))
    trainer = Engine(lambda engine, batch: None)
    if validate_in_training:
        trainer.add_event_handler(Events.ITERATION_COMPLETED(every=interval), lambda _: evaluator.run())
    ValidationReport(evaluator, metrics, interval, str(tmp_path)).attach(trainer)  # interval by position
    with caplog.at_level(logging.INFO, logger="scripts.training.handlers"):
        trainer.run(range(3), max_epochs=1)

    assert len(runs) == expected_runs  # the final model validated exactly once
    report = json.loads((tmp_path / "validation_report.json").read_text())
    assert report["iteration"] == 3
    assert report["mean"] == pytest.approx({name: float(value) for name, value in evaluator.state.metrics.items()})
    expected_mean = {
        "val_seen_dice": (5 / 6 + 1.0) / 2,  # mean over classes of each class's mean: a (1 and 2/3), b (1)
        "val_held_out_dice": 2 / 3,
        "val_wrong_reference_dice": 0.0,
        "val_absent_class_fp": 0.5,  # b: 4 voxels predicted / 8 mean voxels
        "val_label_map_seen_dice": (5 / 6 + 1.0) / 2,
        "val_label_map_absent_class_fp": 0.5,
        "position_rule_seen_dice": ((0.1 + 0.5) / 2 + 0.7) / 2,
    }
    assert report["mean"] == pytest.approx(expected_mean)
    per_class = report["per_class"]  # Dice groups and absent-class false positives only
    assert set(per_class) == set(metrics) - {"val_wrong_reference_dice"}
    for name in ("val_seen_dice", "val_label_map_seen_dice"):
        assert per_class[name] == pytest.approx({"Demo/a": 5 / 6, "Demo/b": 1.0})
    assert per_class["val_held_out_dice"] == pytest.approx({"Demo/c": 2 / 3})
    assert per_class["position_rule_seen_dice"] == pytest.approx({"Demo/a": 0.3, "Demo/b": 0.7})
    assert (
        per_class["val_absent_class_fp"] == per_class["val_label_map_absent_class_fp"] == pytest.approx({"Demo/b": 0.5})
    )

    lines = [record.getMessage() for record in caplog.records if record.name == "scripts.training.handlers"]
    model_line = next(line for line in lines if line.startswith("Final 1-shot validation after 3 iterations: "))
    label_map_line = next(line for line in lines if line.startswith("As one label map of every requested class"))
    rules_line = next(line for line in lines if line.startswith("Trivial rules on the same cases: "))
    model_names = ["val_seen_dice", "val_held_out_dice", "val_wrong_reference_dice", "val_absent_class_fp"]
    assert all(f"{name} " in model_line for name in model_names)
    assert "label_map" not in model_line and "rule" not in model_line
    assert (
        "val_label_map_seen_dice 0.9167" in label_map_line and "val_label_map_absent_class_fp 0.5000" in label_map_line
    )
    assert rules_line.endswith("position_rule_seen_dice 0.5000")


# TrainingCurves -------------------------------------------------------------------------------------------------------


def _curves_run(
    run_dir: Path, total: int, resume_from: int = 0, offset: float = 0.0
) -> tuple[dict, dict[int, dict], EventAccumulator]:
    """Train ``total`` iterations (loss ``offset`` + iteration, lr 0.01 x iteration) with a loss window of 2, validating
    every 2 iterations; returns the saved curves, the curves file as seen when each iteration started, and the run's
    TensorBoard events."""
    optimizer = _lr_optimizer()

    def step(engine: Engine, batch: int) -> list[dict[str, torch.Tensor]]:
        optimizer.param_groups[0]["lr"] = 0.01 * engine.state.iteration
        return [{"loss": torch.tensor(offset + engine.state.iteration)}]  # decollated, as the trainer's output

    trainer = Engine(step)
    scores = {"val_wrong_reference_dice": 0.05, "position_rule_seen_dice": 0.25}
    evaluator = _evaluator(lambda: {"val_seen_dice": (offset + trainer.state.iteration) / 1000, **scores})
    if resume_from:
        trainer.add_event_handler(Events.STARTED, _restore_at(resume_from))
    window = WindowMeanLoss(2)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, window)  # as MONAI's StatsHandler calls it
    tensorboard = run_dir / f"tensorboard_{resume_from}"
    writer = SummaryWriter(str(tensorboard))
    TrainingCurves(optimizer, evaluator, str(run_dir / "logs"), window, writer).attach(trainer)
    trainer.add_event_handler(Events.ITERATION_COMPLETED(every=2), lambda _: evaluator.run([0]))
    curves_file = run_dir / "logs" / "training_curves.json"
    snapshots: dict[int, dict] = {}

    def snapshot(engine: Engine) -> None:
        if curves_file.is_file():
            snapshots[engine.state.iteration] = json.loads(curves_file.read_text())

    trainer.add_event_handler(Events.ITERATION_STARTED, snapshot)
    trainer.run(range(total), max_epochs=1)
    writer.close()
    events = EventAccumulator(str(tensorboard), size_guidance={"scalars": 0})
    events.Reload()
    return json.loads(curves_file.read_text()), snapshots, events


def test_training_curves_record_window_losses_learning_rates_and_validations(tmp_path: Path) -> None:
    curves, snapshots, events = _curves_run(tmp_path, total=5)
    assert curves["iteration"] == [2, 4, 5]  # the end of each loss window, and the last iteration
    assert curves["loss"] == pytest.approx([1.5, 3.5, 5.0])  # each window's mean loss
    assert curves["lr"] == pytest.approx([0.02, 0.04, 0.05])
    assert curves["validation"] == [
        {"iteration": 2, "val_seen_dice": 0.002, "val_wrong_reference_dice": 0.05, "position_rule_seen_dice": 0.25},
        {"iteration": 4, "val_seen_dice": 0.004, "val_wrong_reference_dice": 0.05, "position_rule_seen_dice": 0.25},
    ]
    assert [v["iteration"] for v in snapshots[3]["validation"]] == [
        2
    ]  # written after each validation, not only at the end
    assert 1 not in snapshots  # nothing before the first validation
    assert Image.open(tmp_path / "logs" / "training_curves.png").size[0] > 0
    learning_rates = events.Scalars("learning_rate")
    assert [event.step for event in learning_rates] == [2, 4, 5]
    assert [event.value for event in learning_rates] == pytest.approx([0.02, 0.04, 0.05])


def test_resumed_training_curves_continue_the_history_up_to_the_checkpoint(tmp_path: Path) -> None:
    _curves_run(tmp_path, total=6)
    curves, _, _ = _curves_run(tmp_path, total=8, resume_from=4, offset=100.0)
    assert curves["iteration"] == [2, 4, 6, 8]
    assert curves["loss"] == pytest.approx([1.5, 3.5, 105.5, 107.5])  # the first run's points after 4 replaced
    assert curves["lr"] == pytest.approx([0.02, 0.04, 0.06, 0.08])
    validations = [(v["iteration"], v["val_seen_dice"]) for v in curves["validation"]]
    assert validations == [(2, 0.002), (4, 0.004), (6, 0.106), (8, 0.108)]


# BestModelSaver -------------------------------------------------------------------------------------------------------


def _validated_training(
    saver: BestModelSaver | list[BestModelSaver], scores: Mapping[int, float], network: nn.Module | None = None
) -> None:
    """Train ``len(scores)`` iterations, each setting the first convolution's weights to the iteration and then
    validating with ``val_seen_dice`` = ``scores[iteration]``."""
    savers = saver if isinstance(saver, list) else [saver]

    def step(engine: Engine, batch: int) -> None:
        if network is not None:
            with torch.no_grad():
                network.encoder.stages[0][0].conv1.conv.weight.fill_(engine.state.iteration)

    trainer = Engine(step)
    evaluator = _evaluator(lambda: {"val_seen_dice": scores[trainer.state.iteration]})
    for each in savers:
        each.attach(evaluator)
        each.trainer = trainer  # as CheckpointManager.attach sets it
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda _: evaluator.run([0]))
    trainer.run(range(len(scores)), max_epochs=1)


def test_best_model_saver_keeps_the_weights_of_the_best_validation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    network, path = _net(), tmp_path / "model.pt"
    saver = BestModelSaver(str(path), network, "val_seen_dice")
    scores = {1: 0.3, 2: 0.5, 3: 0.4, 4: 0.5, 5: math.nan}  # improves, worsens, ties, not measured
    with caplog.at_level(logging.INFO, logger="scripts.training.checkpoints"):
        _validated_training(saver, scores, network)

    saved = [record.getMessage() for record in caplog.records if "Saved the best model so far" in record.message]
    assert len(saved) == 2 and "val_seen_dice 0.5000 at iteration 2" in saved[1]
    selection = {"metric": "val_seen_dice", "value": 0.5, "iteration": 2}
    assert saver.state_dict() == selection
    loaded = _net()
    loaded.load_state_dict(torch.load(path, weights_only=True))  # loads like any model.pt
    assert bool((loaded.encoder.stages[0][0].conv1.conv.weight == 2).all())  # the weights of iteration 2
    settings = read_model_settings(path)
    assert settings["selection"] == selection and settings["base_channels"] == 4  # the network's settings kept
    assert "selection" not in network.settings  # the live network does not carry the selection on


def test_best_model_saver_resumes_its_best_score_of_the_same_metric_only(tmp_path: Path) -> None:
    network = _net()
    resumed = BestModelSaver(str(tmp_path / "resumed.pt"), network, "val_seen_dice")
    resumed.load_state_dict({"metric": "val_seen_dice", "value": 0.9, "iteration": 7})
    other_metric = BestModelSaver(str(tmp_path / "other.pt"), network, "val_seen_dice")
    other_metric.load_state_dict({"metric": "val_all_dice", "value": 0.9, "iteration": 7})  # ignored
    _validated_training([resumed, other_metric], {1: 0.6})
    assert not (tmp_path / "resumed.pt").exists()  # 0.6 does not beat the restored 0.9
    assert resumed.state_dict() == {"metric": "val_seen_dice", "value": 0.9, "iteration": 7}
    assert (tmp_path / "other.pt").is_file()
    assert other_metric.state_dict() == {"metric": "val_seen_dice", "value": 0.6, "iteration": 1}


def test_early_stopping_state_survives_a_checkpoint_as_plain_types() -> None:
    trainer, evaluator = Engine(lambda engine, batch: None), Engine(lambda engine, batch: None)
    scores = iter([0.5, 0.4])
    stopper = ResumableEarlyStopHandler(patience=3, score_function=lambda engine: next(scores))
    assert stopper.state_dict() == {}  # before set_trainer: nothing to save
    stopper.set_trainer(trainer)
    stopper(evaluator)
    stopper(evaluator)  # no improvement on 0.5
    saved = json.loads(json.dumps(stopper.state_dict()))
    assert (saved["counter"], saved["best_score"]) == (1, 0.5)
    resumed = ResumableEarlyStopHandler(patience=3, score_function=lambda engine: 0.45)
    resumed.set_trainer(trainer)
    resumed.load_state_dict(saved)
    resumed(evaluator)  # the third validation without improvement counts on from the checkpoint
    assert (resumed.state_dict()["counter"], resumed.state_dict()["best_score"]) == (2, 0.5)


# CheckpointAveraging --------------------------------------------------------------------------------------------------


def _write_checkpoints(network: IrisNet, ckpt_dir: Path, iterations: list[int], grow_at: int) -> None:
    """Periodic checkpoints of a network whose weights move every time and whose memory bank gains a class at
    ``grow_at``."""
    torch.manual_seed(1)
    for iteration in iterations:
        with torch.no_grad():
            for parameter in network.parameters():
                parameter.add_(torch.randn_like(parameter))
        names = ["Demo/a", "Demo/b"] if iteration >= grow_at else ["Demo/a"]
        network.memory_bank.update(names, torch.randn(len(names), *network.token_shape))
        content = {"network": network.state_dict(), "trainer": {"iteration": iteration}}
        atomic_save(content, ckpt_dir / f"checkpoint_{iteration:08d}.pt")


def test_checkpoint_averaging_averages_the_last_checkpoints_into_a_loadable_model(tmp_path: Path) -> None:
    _write_checkpoints(_net(), tmp_path, [2, 4, 6, 8], grow_at=6)
    trainer = Engine(lambda engine, batch: None)
    CheckpointAveraging(str(tmp_path), last=3, keep=3).attach(trainer)
    trainer.run(range(1), max_epochs=1)

    averaged = torch.load(tmp_path / AVERAGED_MODEL, weights_only=True)
    last = [tmp_path / f"checkpoint_{i:08d}.pt" for i in (4, 6, 8)]  # checkpoint 2 left out
    *older, newest = (torch.load(path, weights_only=True)["network"] for path in last)
    assert averaged.keys() == newest.keys()
    means = 0
    for name, value in newest.items():
        if name == "_extra_state":
            continue
        if value.is_floating_point() and all(state[name].shape == value.shape for state in older):
            torch.testing.assert_close(averaged[name], (older[0][name] + older[1][name] + value) / 3)
            means += 1
        else:  # integer buffers, the memory bank grown at 6 (not at 4), the class names: the newest checkpoint's
            assert torch.equal(averaged[name], value), name
    assert means > 10 and averaged["memory_bank.embeddings"].shape[0] == 2
    assert torch.equal(averaged["memory_bank.embeddings"], newest["memory_bank.embeddings"])
    assert torch.equal(averaged["memory_bank.counts"], newest["memory_bank.counts"])
    settings = extra_state.decode(averaged["_extra_state"])
    assert settings["selection"] == {"averaged": [str(path) for path in last]}
    assert settings["network"] == extra_state.decode(newest["_extra_state"])["network"]
    loaded = _net()
    loaded.load_state_dict(averaged)  # loadable like model.pt
    assert loaded.memory_bank.class_names == ["Demo/a", "Demo/b"]


def test_checkpoint_averaging_is_off_at_zero_and_refuses_more_than_the_kept_checkpoints(tmp_path: Path) -> None:
    _write_checkpoints(_net(), tmp_path, [2, 4], grow_at=99)
    trainer = Engine(lambda engine, batch: None)
    CheckpointAveraging(str(tmp_path), last=0, keep=3).attach(trainer)
    trainer.run(range(1), max_epochs=1)
    assert not (tmp_path / AVERAGED_MODEL).exists()
    for last in (4, -1):
        with pytest.raises(IrisInputError, match=r"between 0 and checkpoints_to_keep \(3\)"):
            CheckpointAveraging(str(tmp_path), last=last, keep=3)


# EmbeddingMap ---------------------------------------------------------------------------------------------------------


def test_embedding_map_draws_the_filled_memory_bank_classes(tmp_path: Path) -> None:
    network = _net()
    torch.manual_seed(1)
    first, second = torch.randn(2, *network.token_shape)
    embeddings = torch.stack([first, 3 * first, first + second])  # b points as a does: similarity 1
    network.memory_bank.add_classes(["Other/never_requested"])  # a reserved row without an embedding
    network.memory_bank.update(["Demo/a", "Demo/b", "Other/c"], embeddings)
    trainer = Engine(lambda engine, batch: None)
    EmbeddingMap(network, str(tmp_path / "map")).attach(trainer)
    trainer.run(range(1), max_epochs=1)

    rows = list(csv.reader((tmp_path / "map" / "class_similarity.csv").open()))
    assert rows[0] == ["class", "Demo/a", "Demo/b", "Other/c"] and [row[0] for row in rows[1:]] == rows[0][1:]
    flat = embeddings.flatten(1).numpy().astype(np.float64)
    unit = flat / np.linalg.norm(flat, axis=1, keepdims=True)
    similarity = np.array([[float(value) for value in row[1:]] for row in rows[1:]])
    np.testing.assert_allclose(similarity, unit @ unit.T, atol=1e-4)
    assert similarity[0, 1] == pytest.approx(1.0, abs=1e-4) and similarity[0, 2] < 0.99
    pictures = ["pca", "tsne"] if has_tsne else ["pca"]
    assert sorted(path.name for path in (tmp_path / "map").glob("*.png")) == [
        f"class_embeddings_{m}.png" for m in pictures
    ]
    assert Image.open(tmp_path / "map" / "class_embeddings_pca.png").size[0] > 0


@pytest.mark.parametrize("options", [{"use_memory_bank": False}, {"memory_classes": ["Demo/a"]}], ids=["none", "empty"])
def test_embedding_map_draws_nothing_without_a_filled_memory_bank(tmp_path: Path, options: dict) -> None:
    trainer = Engine(lambda engine, batch: None)
    EmbeddingMap(_net(**options), str(tmp_path / "map")).attach(trainer)
    trainer.run(range(1), max_epochs=1)
    assert not (tmp_path / "map").exists()


# Retrieval's top-k ----------------------------------------------------------------------------------------------------

PER_REFERENCE = torch.tensor(  # R=3 references of K=2 classes, embeddings of T=1 token of C=2
    [
        [[[1.0, 0.1]], [[1.0, 0.0]]],  # class 0: nearly the query's direction; class 1: orthogonal to its query
        [[[5.0, 5.0]], [[1.0, 1.0]]],  # class 0: the largest dot product, but 45 degrees away
        [[[0.0, 1.0]], [[0.0, 1.0]]],  # class 0: orthogonal; class 1: the query itself, in a slot it does not hold
    ]
)
PRESENT = torch.tensor([[True, True], [True, True], [True, False]])
QUERY = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # 1 x K x T x C, the objects found in the query


@pytest.mark.parametrize(
    "top_k, expected",
    [
        (1, [[1.0, 0.1], [1.0, 1.0]]),  # the most similar by cosine, not by dot product
        (2, [[3.0, 2.55], [1.0, 0.5]]),  # the mean of the two most similar
        (3, [[2.0, 6.1 / 3], [1.0, 0.5]]),  # every reference: class 1 never takes its empty slot
    ],
)
def test_retrieve_averages_the_top_k_most_similar_references_of_each_class(top_k: int, expected: list) -> None:
    chosen = RetrievalInferer.retrieve(PER_REFERENCE, PRESENT, QUERY, top_k)
    assert chosen.shape == (1, 2, 1, 2)
    torch.testing.assert_close(chosen[0, :, 0], torch.tensor(expected))


@pytest.mark.parametrize("top_k", [3, 10])
def test_retrieve_with_top_k_of_every_reference_is_the_plain_mean(top_k: int) -> None:
    torch.testing.assert_close(
        RetrievalInferer.retrieve(PER_REFERENCE, PRESENT, QUERY, top_k), ensemble(PER_REFERENCE, PRESENT)
    )


class RecordingNet(nn.Module):
    """The tiny IrisNet, recording the task embeddings of each segmentation pass and the query objects it encodes;
    ``offset`` lifts (or sinks) every logit so that the first pass finds every class (or none)."""

    def __init__(self, offset: float) -> None:
        super().__init__()
        self.net = _net()
        self.offset = offset
        self.passes: list[torch.Tensor] = []
        self.objects: list[torch.Tensor] = []

    def forward(self, query: torch.Tensor, task_embeddings: torch.Tensor) -> torch.Tensor:
        self.passes.append(task_embeddings.clone())
        return self.net(query, task_embeddings) + self.offset

    def encode_support(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        embeddings = self.net.encode_support(images, masks)
        self.objects.append(embeddings)
        return embeddings


def _retrieval_task(network: RecordingNet) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random reference embeddings of 3 references x 2 classes (the second class holds 2) and their mean."""
    torch.manual_seed(2)
    per_reference = torch.randn(3, 2, *network.net.token_shape)
    present = torch.tensor([[True, True], [True, True], [True, False]])
    return per_reference, present, ensemble(per_reference, present)


def _segment(network: RecordingNet, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RetrievalInferer's logits for a random 32³ query (one window), the query, and the first pass's embeddings."""
    per_reference, present, mean = _retrieval_task(network)
    inferer = RetrievalInferer(roi_size=PATCH, sw_batch_size=1)
    inferer.use_task(mean, (per_reference, present), top_k=top_k)
    torch.manual_seed(3)
    query = torch.rand(1, 1, *PATCH)
    with torch.no_grad():
        return inferer(query, network), query, mean


def test_retrieval_inferer_segments_again_with_the_top_k_references_of_the_found_objects() -> None:
    network = RecordingNet(offset=50.0)
    logits, query, mean = _segment(network, top_k=2)
    per_reference, present, _ = _retrieval_task(network)
    first, second = network.passes
    torch.testing.assert_close(first, mean)
    (objects,) = network.objects  # K x 1 x T x C: each found object encoded as a reference
    expected = []
    for k in range(2):  # written out: cosine of each held reference with the object, the 2 best averaged
        found = objects[k, 0].flatten()
        held = [r for r in range(3) if present[r, k]]
        cosine = {
            r: float(per_reference[r, k].flatten() @ found / (per_reference[r, k].norm() * found.norm())) for r in held
        }
        best = sorted(held, key=lambda r: -cosine[r])[:2]
        expected.append(per_reference[best, k].mean(0))
    expected = torch.stack(expected)[None]
    torch.testing.assert_close(second, expected)
    assert not torch.allclose(expected[0, 0], mean[0, 0])  # class 0 drops one of its three references
    with torch.no_grad():  # the answer is the second pass
        torch.testing.assert_close(logits, network.net(query, expected) + 50.0, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "offset, top_k", [(50.0, 3), (-50.0, 1)], ids=["top-k-of-every-reference", "a-class-not-found"]
)
def test_retrieval_inferer_keeps_the_first_pass_when_retrieval_cannot_change_it(offset: float, top_k: int) -> None:
    """With top_k >= every class's references the first pass (their mean) is the answer; with a class not found there
    is no object to retrieve by."""
    network = RecordingNet(offset)
    logits, query, mean = _segment(network, top_k)
    assert len(network.passes) == 1 and not network.objects
    with torch.no_grad():
        torch.testing.assert_close(logits, network.net(query, mean) + offset, atol=1e-4, rtol=1e-4)


def test_retrieval_inferer_needs_a_task() -> None:
    with pytest.raises(RuntimeError, match="use_task"):
        RetrievalInferer(roi_size=PATCH)(torch.rand(1, 1, *PATCH), RecordingNet(0.0))
