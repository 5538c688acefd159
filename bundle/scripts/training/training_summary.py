"""What a training run did, in two files next to its logs: ``metrics.jsonl`` (one line per validation, appended, so a
resumed run keeps the history) and ``training_summary.json`` (written when training ends)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import monai
import torch
from ignite.engine import Engine, Events

from ..atomic import atomic_write_text
from ..data.pool import DatasetPool
from ..segmentation.metrics import LOWER_IS_BETTER
from ..segmentation.model_io import bundle_version
from .averaging import AVERAGED_MODEL
from .checkpoints import periodic_checkpoints

RUN_KEYS = ("iteration", "wall_time_seconds", "learning_rate")  # the keys of a metrics.jsonl line that are no metric


def read_metrics_lines(path: Path, up_to_iteration: int | None = None) -> list[dict[str, Any]]:
    """The validations recorded in a ``metrics.jsonl`` file, up to ``up_to_iteration`` (all when None)."""
    if not path.is_file():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [line for line in lines if up_to_iteration is None or line["iteration"] <= up_to_iteration]


class TrainingSummary:
    """Record every validation in ``<output_dir>/metrics.jsonl`` and, at the end, ``training_summary.json``:
    iterations and wall time, the best and final value of every metric with their iterations, the learning rate's
    range over the validations and its final value (its curve is :class:`~scripts.training.visuals.TrainingCurves`'),
    the checkpoints, the data pool with its dataset sizes, and the versions of torch, MONAI and the bundle.

    Each line also holds ``wall_time_seconds``, the training time until that validation (validations included), so
    Dice can be read against time. A resumed run first drops the lines after the iteration it resumes from (a run
    killed after a validation but before its checkpoint repeats that validation), then appends, counting its time on
    from that of the last line it keeps. Attach it after the checkpoint handler, which restores the iteration, and
    after :class:`~scripts.training.handlers.ValidationReport`, whose final validation it records.

    Args:
        evaluator: the validation engine.
        optimizer: its first parameter group's learning rate is recorded at every validation and at the end.
        output_dir: where both files go.
        ckpt_dir: where the checkpoints and ``model.pt`` are.
        pools: the data pools by role (``{"training": ..., "validation": ...}``).
        key_metric: the metric that selects ``model.pt``.
    """

    def __init__(
        self,
        evaluator: Engine,
        optimizer: torch.optim.Optimizer,
        output_dir: str,
        ckpt_dir: str,
        pools: Mapping[str, DatasetPool],
        key_metric: str = "val_seen_dice",
    ) -> None:
        self.evaluator = evaluator
        self.optimizer = optimizer
        self.output_dir = Path(output_dir)
        self.ckpt_dir = Path(ckpt_dir)
        self.pools = pools
        self.key_metric = key_metric
        self.trainer: Engine | None = None
        self._start_iteration = 0
        self._start_time = 0.0
        self._earlier_wall_time = 0.0

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / "metrics.jsonl"

    def attach(self, trainer: Engine) -> None:
        self.trainer = trainer
        trainer.add_event_handler(Events.STARTED, self.start)
        trainer.add_event_handler(Events.COMPLETED, self.write_summary)
        self.evaluator.add_event_handler(Events.COMPLETED, self.record_validation)

    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def start(self, trainer: Engine) -> None:
        self._start_iteration, self._start_time = trainer.state.iteration, time.monotonic()
        kept = read_metrics_lines(self.metrics_path, trainer.state.iteration)
        self._earlier_wall_time = float(kept[-1].get("wall_time_seconds", 0.0)) if kept else 0.0
        self.output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text("".join(json.dumps(line) + "\n" for line in kept), self.metrics_path)

    def record_validation(self, evaluator: Engine) -> None:
        wall_time = self._earlier_wall_time + time.monotonic() - self._start_time
        line = {
            "iteration": self.trainer.state.iteration,
            "wall_time_seconds": round(wall_time, 1),
            "learning_rate": self._lr(),
        }
        line.update({name: float(value) for name, value in sorted(evaluator.state.metrics.items())})
        with self.metrics_path.open("a") as stream:
            stream.write(json.dumps(line) + "\n")

    def write_summary(self, trainer: Engine) -> None:
        validations = read_metrics_lines(self.metrics_path)
        rates = [line["learning_rate"] for line in validations] + [self._lr()]
        summary = {
            "iterations": trainer.state.iteration,
            "resumed_from_iteration": self._start_iteration,
            "wall_time_seconds": round(time.monotonic() - self._start_time, 1),
            "key_metric": self.key_metric,
            "metrics": metric_summary(validations),
            "learning_rate": {"min": min(rates), "max": max(rates), "final": rates[-1]},
            "checkpoints": {
                **{
                    key: str(self.ckpt_dir / name) if (self.ckpt_dir / name).is_file() else None
                    for key, name in (("best_model", "model.pt"), ("averaged_model", AVERAGED_MODEL))
                },
                "periodic": [str(path) for path in periodic_checkpoints(self.ckpt_dir)],
            },
            "data_pool": {role: pool_summary(pool) for role, pool in self.pools.items()},
            "versions": {"torch": torch.__version__, "monai": monai.__version__, "bundle": bundle_version()},
        }
        atomic_write_text(json.dumps(summary, indent=4) + "\n", self.output_dir / "training_summary.json")


def metric_summary(validations: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Best and final value of every metric with their iterations; lower is better for the reference-following
    errors (:data:`scripts.segmentation.metrics.LOWER_IS_BETTER`), higher for the others."""
    names = sorted({name for line in validations for name in line} - set(RUN_KEYS))
    summary = {}
    for name in names:
        points = [(line["iteration"], line[name]) for line in validations if math.isfinite(line.get(name, math.nan))]
        if not points:
            continue
        best = (min if name in LOWER_IS_BETTER else max)(points, key=lambda point: point[1])
        summary[name] = {
            "best": best[1],
            "best_iteration": best[0],
            "final": points[-1][1],
            "final_iteration": points[-1][0],
        }
    return summary


def pool_summary(pool: DatasetPool) -> list[dict[str, Any]]:
    """Each dataset of a pool: its folder, subjects and classes (held-out ones listed apart)."""
    rows = []
    for index, info in enumerate(pool.datasets):
        subjects = sum(1 for subject in pool.subjects if subject.dataset == index)
        rows.append(
            {
                "name": info.name,
                "root": str(info.root),
                "subjects": subjects,
                "classes": sorted(info.class_name(value) for value in info.labels),
                "held_out": sorted(info.class_name(v) for v in info.labels if pool.is_held_out(index, v)),
            }
        )
    return rows


class TrainingProgress:
    """``<output_dir>/progress.json``, rewritten (atomically) every ``every`` iterations and when training ends: the
    iteration, the total, the seconds since the start and the last mean training loss. A client that polls a running
    training (MONAI Label's ``train_stats``) reads it without parsing logs.

    Args:
        output_dir: where the file goes.
        loss: the window mean of the training loss (attach this handler after the ``StatsHandler`` that feeds it).
        every: iterations between two writes.
    """

    def __init__(self, output_dir: str, loss: Any = None, every: int = 10) -> None:
        self.path = Path(output_dir) / "progress.json"
        self.loss = loss
        self.every = every
        self._started = 0.0

    def attach(self, trainer: Engine) -> None:
        trainer.add_event_handler(Events.STARTED, self.start)
        trainer.add_event_handler(Events.ITERATION_COMPLETED(every=self.every), self.write)
        trainer.add_event_handler(Events.COMPLETED, self.write, True)

    def start(self, trainer: Engine) -> None:
        self._started = time.time()
        self.write(trainer)

    def write(self, trainer: Engine, finished: bool = False) -> None:
        loss = getattr(self.loss, "value", math.nan)
        progress = {
            "iteration": trainer.state.iteration,
            "total_iterations": trainer.state.epoch_length * trainer.state.max_epochs,
            "started": round(self._started, 1),
            "elapsed_seconds": round(time.time() - self._started, 1),
            "train_loss": loss if math.isfinite(loss) else None,
            "finished": finished,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps(progress) + "\n", self.path)
