"""Ignite handlers of episodic training: memory-bank updates and the end-of-training validation report."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from torch import nn

from .engines import unwrap
from .metrics import ClassGroupDice

logger = logging.getLogger(__name__)


class MemoryBankUpdateHandler:
    """After every iteration, fold the episode's task embeddings into the network's memory bank (EMA per class).

    Args:
        network: the trained IrisNet (or a DDP wrapper of it).
        class_names: global class names that the episode's ``class_ids`` index.
    """

    def __init__(self, network: nn.Module, class_names: Sequence[str]) -> None:
        self.network = network
        self.class_names = list(class_names)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        bank = unwrap(self.network).memory_bank
        if bank is None:
            return
        output = engine.state.output
        valid = output["class_valid"]  # B x K
        embeddings = output["task_embeddings"][valid]  # V x T x C, the valid classes of every episode
        names = [self.class_names[i] for i in output["class_ids"][valid].tolist()]
        bank.update(names, embeddings)


class NonFiniteLossGuard:
    """Stop training before the optimizer step when the loss is NaN or infinite, naming the iteration and classes.

    Raising (instead of ``engine.terminate()``) keeps the corrupted update out of the weights and of any checkpoint.

    Args:
        class_names: global class names that the episode's ``class_ids`` index.
    """

    def __init__(self, class_names: Sequence[str]) -> None:
        self.class_names = list(class_names)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        if torch.isfinite(output["loss"]).all():
            return
        ids = output["class_ids"][output["class_valid"]].tolist()
        classes = sorted({self.class_names[i] for i in ids})
        raise FloatingPointError(
            f"Non-finite loss {output['loss'].item()} at iteration {engine.state.iteration} (episode classes "
            f"{classes}); training stopped before the optimizer step, earlier checkpoints are untouched."
        )


class ValidationReport:
    """At the end of training, make sure the final model was validated and report seen / held-out 1-shot Dice.

    Runs the evaluator once more unless the last iteration already triggered a validation, logs one summary line
    and writes ``<output_dir>/validation_report.json`` with the per-class scores.

    Args:
        evaluator: the validation engine.
        metrics: the evaluator's ``ClassGroupDice`` metrics by name.
        eval_every: validation interval of training, to know whether the last iteration was validated.
        output_dir: where to write the JSON report.
    """

    def __init__(self, evaluator: Engine, metrics: dict[str, ClassGroupDice], eval_every: int, output_dir: str):
        self.evaluator = evaluator
        self.metrics = metrics
        self.eval_every = eval_every
        self.output_dir = Path(output_dir)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if engine.state.iteration % self.eval_every != 0 or not self.evaluator.state.metrics:
            self.evaluator.run()
        scores = {name: self.evaluator.state.metrics.get(name, math.nan) for name in self.metrics}
        report = {
            "iteration": engine.state.iteration,
            "mean": scores,
            "per_class": {name: metric.per_class() for name, metric in self.metrics.items()},
        }
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "validation_report.json").write_text(json.dumps(report, indent=4))
        summary = ", ".join(f"{name} {value:.4f}" for name, value in scores.items())
        logger.info(f"Final 1-shot validation Dice after {engine.state.iteration} iterations: {summary}")
