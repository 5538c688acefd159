"""Ignite handlers of episodic training: memory-bank updates, validation numbered by iteration, and the
end-of-training validation report."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.metrics import Metric
from monai.engines.utils import IterationEvents
from monai.handlers import ValidationHandler, from_engine
from torch import nn
from tqdm.contrib.logging import logging_redirect_tqdm

from ..atomic import atomic_write_text
from ..data.pool import DatasetPool
from ..distributed import is_main_process, unwrap
from ..errors import IrisInputError
from ..segmentation.metrics import AbsentClassFalsePositives, ClassGroupDice

logger = logging.getLogger(__name__)


class IterationValidationHandler(ValidationHandler):
    """MONAI's ``ValidationHandler`` that numbers each validation by the trainer's iteration.

    Episodic training is one long epoch, so the trainer's epoch would number every validation 1. The evaluator's
    epoch is what MONAI's stats handlers use as the TensorBoard step and in their log lines, so it is set to the
    iteration: TensorBoard then draws validation curves against the same steps as the training loss.
    """

    def __call__(self, engine: Engine) -> None:
        if self.validator is None:
            raise RuntimeError("IterationValidationHandler needs a validator.")
        self.validator.run(engine.state.iteration)


class LogAboveProgressBars:
    """While the engine runs, console log lines are written above tqdm's progress bars instead of into them
    (``tqdm.contrib.logging.logging_redirect_tqdm``, which keeps each handler's stream and format)."""

    def __init__(self) -> None:
        self._redirect = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.start)
        engine.add_event_handler(Events.COMPLETED, self.stop)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.stop_on_error)

    def start(self, engine: Engine) -> None:
        if self._redirect is None:
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()

    def stop(self, engine: Engine) -> None:
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None

    def stop_on_error(self, engine: Engine, error: Exception) -> None:
        self.stop(engine)
        raise error


class WindowMeanLoss:
    """The mean training loss over each window of ``window`` iterations, so that the console, TensorBoard and the
    training curves report the same number instead of one iteration's noisy loss.

    It is the ``iteration_print_logger`` of MONAI's ``StatsHandler`` (run every iteration): it adds each loss on the
    device, so the mean costs no host sync per iteration, and at the end of a window logs "Iteration N/T: train_loss
    ...". Handlers attached after that ``StatsHandler`` read :attr:`value`; :meth:`write` is the
    ``iteration_event_writer`` of MONAI's ``TensorBoardStatsHandler``.
    """

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError(f"log_every must be >= 1, got {window}.")
        self.window = window
        self.value = math.nan
        self._sum: torch.Tensor | float = 0.0
        self._count = 0

    def __call__(self, engine: Engine) -> None:
        self._sum = self._sum + torch.as_tensor(from_engine(["loss"], first=True)(engine.state.output)).detach().float()
        self._count += 1
        total = engine.state.epoch_length * engine.state.max_epochs
        if engine.state.iteration % self.window and engine.state.iteration != total:
            return
        self.value, count = float(self._sum) / self._count, self._count
        self._sum, self._count = 0.0, 0
        logger.info(f"Iteration {engine.state.iteration}/{total}: train_loss {self.value:.4f} (mean of {count})")

    def write(self, engine: Engine, writer) -> None:
        """Write the last window's mean to TensorBoard as ``train_loss`` at the trainer's iteration."""
        writer.add_scalar("train_loss", self.value, engine.state.iteration)
        writer.flush()


class LossWeightSchedule:
    """Move the weights of the loss terms linearly from their start to their end values over training, e.g.
    ``{"dice": [0.3, 0.7], "bce": [0.7, 0.3]}`` (BCE-heavy early, when Dice gives little gradient; Dice-heavy later).

    Each key names a term of the loss, whose ``<key>_weight`` attribute is set before every iteration.

    Args:
        loss_function: the training loss (its terms' weights are attributes such as ``dice_weight``).
        schedule: term -> ``[start, end]`` weights, or None for constant weights.
        total_iterations: the iteration at which every weight reaches its end value.
    """

    def __init__(self, loss_function: nn.Module, schedule: dict[str, Sequence[float]] | None, total_iterations: int):
        self.loss_function = loss_function
        self.schedule = {name: (float(start), float(end)) for name, (start, end) in (schedule or {}).items()}
        self.total_iterations = max(int(total_iterations), 1)
        terms = sorted(name[: -len("_weight")] for name in vars(loss_function) if name.endswith("_weight"))
        unknown = sorted(set(self.schedule) - set(terms))
        if unknown:
            raise IrisInputError(
                f"train#handler#loss_weight_schedule#schedule names {unknown}, which the loss lacks; its terms are "
                f"{terms}."
            )
        negative = [name for name, values in self.schedule.items() if min(values) < 0]
        if negative:
            raise IrisInputError(f"train#handler#loss_weight_schedule#schedule weights must be >= 0, got {negative}.")

    def attach(self, engine: Engine) -> None:
        if self.schedule:
            engine.add_event_handler(Events.ITERATION_STARTED, self)

    def weights(self, iteration: int) -> dict[str, float]:
        """The weight of every scheduled term at (1-based) ``iteration``."""
        progress = min(max(iteration - 1, 0) / max(self.total_iterations - 1, 1), 1.0)
        return {name: start + (end - start) * progress for name, (start, end) in self.schedule.items()}

    def __call__(self, engine: Engine) -> None:
        for name, weight in self.weights(engine.state.iteration).items():
            setattr(self.loss_function, f"{name}_weight", weight)


class EngineLogText(logging.Filter):
    """Say what ignite's engine messages mean in episodic training, where the trainer runs one long epoch and every
    validation is a run of the evaluator numbered by the trainer's iteration (see :class:`IterationValidationHandler`).

    ignite words them for epochs and counts every run that MONAI set up as "resuming", so a fresh run would say
    "Engine run resuming from iteration 0" and each validation "Epoch[800] Complete". This filter drops that epoch
    bookkeeping (:class:`ValidationLog` reports each validation), says "Training from iteration N to T" once the
    checkpoint handlers (attached before it) have restored the iteration, and "Training finished in ...".

    A logging filter that matches ignite's message texts, because ignite has no option for this wording; a test
    (tests/test_bundle.py) says when an ignite release changes them.

    Args:
        role: ``"training"`` for the trainer, ``"validation"`` for the evaluator.
    """

    def __init__(self, role: str = "training") -> None:
        super().__init__()
        if role not in ("training", "validation"):
            raise ValueError(f"EngineLogText role must be 'training' or 'validation', got {role!r}.")
        self.role = role

    def attach(self, engine: Engine) -> None:
        for old in [f for f in engine.logger.filters if isinstance(f, EngineLogText)]:
            engine.logger.removeFilter(old)  # one per engine class (ignite's loggers are named by class)
        engine.logger.addFilter(self)
        if self.role == "training":
            engine.add_event_handler(Events.STARTED, self.log_start)

    @staticmethod
    def log_start(engine: Engine) -> None:
        state = engine.state
        engine.logger.info(f"Training from iteration {state.iteration} to {state.epoch_length * state.max_epochs}")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(("Engine run resuming", "Engine run starting", "Epoch[")):
            return False
        if message.startswith("Engine run finished. Time taken:"):
            words = "Training finished in" if self.role == "training" else "Validation took"
            record.msg, record.args = message.replace("Engine run finished. Time taken:", words), ()
        return True


class ValidationLog:
    """Log line of a validation for MONAI's ``StatsHandler`` (``epoch_print_logger``): "Validation at iteration N"
    and every metric, instead of "Epoch[N] Metrics"."""

    def __call__(self, engine: Engine) -> None:
        metrics = " ".join(f"{name} {float(value):.4f}" for name, value in sorted(engine.state.metrics.items()))
        logger.info(f"Validation at iteration {engine.state.epoch}: {metrics}")


class MemoryBankUpdateHandler:
    """After every iteration, fold the episode's task embeddings into the network's memory bank (EMA per class).

    The bank gets a row for every class training may request when training starts, so each update is an index
    lookup on the device, without a host synchronisation. Under DDP every rank gathers the embeddings and class ids
    of all ranks as tensors (``ignite.distributed.all_gather``, in rank order) and applies the same update, so the
    banks stay bit-identical without relying on DDP's buffer broadcast.

    Args:
        network: the trained IrisNet (or a DDP wrapper of it).
        pool: the training pool: its ``class_names`` are what the episodes' ``class_ids`` index, and its held-out
            classes, never requested in training, get no row.
    """

    def __init__(self, network: nn.Module, pool: DatasetPool) -> None:
        self.network = network
        self.class_names = list(pool.class_names)
        self.held_out = set(pool.held_out_class_names)
        self._rows: torch.Tensor | None = None  # global class id -> bank row
        self._bank_names: list[str] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _row_lookup(self, bank: nn.Module, device: torch.device) -> torch.Tensor:
        """Global class id -> bank row, rebuilt only when the bank's classes change (e.g. a checkpoint loaded)."""
        if self._rows is None or bank.class_names != self._bank_names:
            bank.add_classes([name for name in self.class_names if name not in self.held_out])
            row = {name: index for index, name in enumerate(bank.class_names)}
            self._rows = torch.tensor([row.get(name, -1) for name in self.class_names], dtype=torch.long, device=device)
            self._bank_names = list(bank.class_names)
        return self._rows

    def __call__(self, engine: Engine) -> None:
        bank = unwrap(self.network).memory_bank
        if bank is None:
            return
        output = engine.state.output  # decollated: one dict per episode
        ids = torch.stack([episode["class_ids"] for episode in output]).flatten()  # B*K, -1 for padding
        embeddings = torch.stack([episode["task_embeddings"] for episode in output]).flatten(0, 1)  # B*K x T x C
        ids, embeddings = idist.all_gather(ids), idist.all_gather(embeddings)
        lookup = self._row_lookup(bank, ids.device)
        rows = torch.where(ids >= 0, lookup[ids.clamp(min=0)], -1)
        bank.update_rows(rows, embeddings)


class NonFiniteLossGuard:
    """Stop training before the optimizer step when the loss is NaN or infinite, naming the iteration and episode.

    Raising (instead of ``engine.terminate()``) keeps the corrupted update out of the weights and of any checkpoint.

    Args:
        pool: the training pool, to name the episode's classes and subjects.
    """

    def __init__(self, pool: DatasetPool) -> None:
        self.pool = pool

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        if torch.isfinite(output["loss"]).all():
            return
        ids = output["class_ids"][output["class_valid"]].tolist()
        classes = sorted({self.pool.class_names[i] if i >= 0 else "a synthetic class" for i in ids})
        subjects = output.get("subject_ids")
        paths = [] if subjects is None else [self.pool.subjects[i].image_path for i in subjects.flatten().tolist()]
        raise FloatingPointError(
            f"Non-finite loss {output['loss'].item()} at iteration {engine.state.iteration}; "
            f"episode classes {classes}, subjects (query first per episode) {paths}. "
            "Training stopped before the optimizer step; the last checkpoint is intact."
        )


class ValidationReport:
    """At the end of training, make sure the final model was validated and report its reference-following metrics.

    Runs the evaluator once more unless the last iteration already triggered a validation, logs the model's metrics
    on one line, its label-map scores on a second and the trivial rules' Dice on the same cases on a third, and writes
    ``<output_dir>/validation_report.json`` with every metric and the per-class scores.

    Args:
        evaluator: the validation engine.
        metrics: the evaluator's metrics by name.
        val_interval: validation interval of training, to know whether the last iteration was validated.
        output_dir: where to write the JSON report.
    """

    def __init__(self, evaluator: Engine, metrics: dict[str, Metric], val_interval: int, output_dir: str):
        self.evaluator = evaluator
        self.metrics = metrics
        self.val_interval = val_interval
        self.output_dir = Path(output_dir)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if engine.state.iteration % self.val_interval != 0 or not self.evaluator.state.metrics:
            self.evaluator.run()
        scores = {name: float(self.evaluator.state.metrics.get(name, math.nan)) for name in self.metrics}
        groups = {name: metric for name, metric in self.metrics.items() if isinstance(metric, ClassGroupDice)}
        by_class = (ClassGroupDice, AbsentClassFalsePositives)
        report = {
            "iteration": engine.state.iteration,
            "mean": scores,
            "per_class": {name: m.per_class() for name, m in self.metrics.items() if isinstance(m, by_class)},
        }
        if not is_main_process():
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps(report, indent=4), self.output_dir / "validation_report.json")
        controls = {name for name, metric in groups.items() if metric.scores != "model"}
        label_map = {name for name, metric in self.metrics.items() if getattr(metric, "predictions", "") == "label_map"}
        model = ", ".join(f"{name} {value:.4f}" for name, value in scores.items() if name not in controls | label_map)
        logger.info(f"Final 1-shot validation after {engine.state.iteration} iterations: {model}")
        if label_map:
            merged = ", ".join(f"{name} {value:.4f}" for name, value in scores.items() if name in label_map)
            logger.info(f"As one label map of every requested class, as inference writes it: {merged}")
        if controls:
            rules = ", ".join(f"{name} {value:.4f}" for name, value in scores.items() if name in controls)
            logger.info(f"Trivial rules on the same cases: {rules}")
