"""Training pictures: query predictions overlaid in TensorBoard after each validation, and the training curves."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.utils import optional_import

from ..data.transforms import label_map
from ..drawing import annotated, overlay_panels, palette_colour
from ..segmentation.metrics import LOWER_IS_BETTER, is_trivial_rule
from .handlers import WindowMeanLoss

SummaryWriter, _ = optional_import("torch.utils.tensorboard", name="SummaryWriter")


class ValidationOverlays:
    """After every validation, show the first ``max_cases`` queries in TensorBoard: truth (top) and prediction
    (bottom) over three orthogonal slices through the truth, each class in its own colour.

    Attached to the trainer, so the images are logged at the trainer's iteration.

    Args:
        evaluator: the validation engine, whose outputs hold ``image``, ``label`` (masks) and ``pred`` (logits).
        summary_writer: the run's TensorBoard writer (one per run, shared by every handler that writes to it).
        max_cases: queries shown per validation.
        class_names: the pool's class names, which the outputs' ``class_ids`` index: the legend names each class.
    """

    def __init__(
        self, evaluator: Engine, summary_writer: SummaryWriter, max_cases: int = 2, class_names: Sequence[str] = ()
    ) -> None:
        self.evaluator = evaluator
        self.writer = summary_writer
        self.max_cases = max_cases
        self.class_names = list(class_names)
        self.cases: list[np.ndarray] = []
        self.trainer: Engine | None = None

    def attach(self, trainer: Engine) -> None:
        self.trainer = trainer
        self.evaluator.add_event_handler(Events.STARTED, lambda _: self.cases.clear())
        self.evaluator.add_event_handler(Events.ITERATION_COMPLETED, self.capture)
        self.evaluator.add_event_handler(Events.COMPLETED, self.write)

    def capture(self, engine: Engine) -> None:
        if len(self.cases) >= self.max_cases:
            return
        output = engine.state.output
        image = output["image"][0, 0].float().cpu().numpy()
        values = list(range(1, output["pred"].shape[1] + 1))  # class k shown as value k + 1
        codes = torch.tensor(values)
        truth = label_map(output["label"][0].float(), codes, threshold=0.5)[0].cpu().numpy()
        pred = label_map(output["pred"][0].float(), codes)[0].cpu().numpy()
        foreground = np.argwhere(truth > 0)
        centre = foreground.mean(0).astype(int) if len(foreground) else None
        panels = [overlay_panels(image, labels, values, centre) for labels in (truth, pred)]
        caption = [("top: truth, bottom: prediction; three slices through the truth's centre", (255, 255, 255))]
        caption += [(name, palette_colour(k)) for k, name in enumerate(self.legend_names(output, len(values)))]
        self.cases.append(annotated(np.concatenate(panels, axis=0), caption))

    def legend_names(self, output: dict, count: int) -> list[str]:
        """The name of each requested class, from ``class_ids`` when the pool's names are known."""
        class_ids = output.get("class_ids")
        if class_ids is None or not self.class_names:
            return [f"requested class {k + 1}" for k in range(count)]
        return [self.class_names[int(i)] if int(i) >= 0 else "padding" for i in class_ids[0].tolist()]

    def write(self, engine: Engine) -> None:
        for index, picture in enumerate(self.cases):
            self.writer.add_image(f"val_overlay/{index}", picture, self.trainer.state.iteration, dataformats="HWC")
        self.writer.flush()


class TrainingCurves:
    """Loss, validation Dice and learning rate over training, plotted to ``training_curves.png`` at the end (and
    after every validation) with the values in ``training_curves.json``; the learning rate also goes to TensorBoard,
    where MONAI's stats handlers already put the loss and the Dice, at the loss's windows (MONAI's
    ``OptimizerParamsHandler`` writes every iteration or every epoch, and training is one epoch).

    Args:
        optimizer: the optimizer whose first group's learning rate is recorded.
        evaluator: the validation engine; its metrics are recorded after each run.
        output_dir: where the PNG and the JSON go.
        summary_writer: the run's TensorBoard writer, which gets the learning rate.
        loss: the mean loss of each logging window, attached to the trainer before this handler; a point is recorded
            at the end of each of its windows.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        evaluator: Engine,
        output_dir: str,
        loss: WindowMeanLoss,
        summary_writer: SummaryWriter,
    ):
        self.optimizer = optimizer
        self.evaluator = evaluator
        self.output_dir = Path(output_dir)
        self.loss = loss
        self.history: dict[str, list] = {"iteration": [], "loss": [], "lr": [], "validation": []}
        self.trainer: Engine | None = None
        self.writer = summary_writer

    def attach(self, trainer: Engine) -> None:
        self.trainer = trainer
        trainer.add_event_handler(Events.STARTED, self.resume)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self.record)
        trainer.add_event_handler(Events.COMPLETED, self.plot)
        self.evaluator.add_event_handler(Events.COMPLETED, self.record_validation)

    def resume(self, engine: Engine) -> None:
        """A resumed run (restored by the checkpoint handler, attached before this one) continues the history that
        the run it resumes wrote, up to the iteration it resumes from."""
        path = self.output_dir / "training_curves.json"
        if engine.state.iteration == 0 or not path.is_file():
            return
        saved = json.loads(path.read_text())
        kept = [i for i, iteration in enumerate(saved.get("iteration", [])) if iteration <= engine.state.iteration]
        for key in ("iteration", "loss", "lr"):
            self.history[key] = [saved[key][i] for i in kept]
        self.history["validation"] = [
            v for v in saved.get("validation", []) if v["iteration"] <= engine.state.iteration
        ]

    def record(self, engine: Engine) -> None:
        if engine.state.iteration % self.loss.window and engine.state.iteration != engine.state.epoch_length:
            return
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.history["iteration"].append(engine.state.iteration)
        self.history["loss"].append(self.loss.value)
        self.history["lr"].append(lr)
        self.writer.add_scalar("learning_rate", lr, engine.state.iteration)

    def record_validation(self, evaluator: Engine) -> None:
        metrics = {name: float(value) for name, value in evaluator.state.metrics.items()}
        self.history["validation"].append({"iteration": self.trainer.state.iteration, **metrics})
        self.plot(self.trainer)

    def plot(self, engine: Engine) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "training_curves.json").write_text(json.dumps(self.history, indent=4))
        figure, axes = plt.subplots(4, 1, figsize=(10, 12), sharex=True)
        axes[0].plot(self.history["iteration"], self.history["loss"], color="tab:red")
        axes[0].set_ylabel("training loss")
        validations = self.history["validation"]
        names = sorted({key for entry in validations for key in entry} - {"iteration"})
        for name in names:
            points = [(v["iteration"], v[name]) for v in validations if np.isfinite(v.get(name, np.nan))]
            if not points:
                continue
            rule = is_trivial_rule(name)  # the trivial rules' Dice on the same cases, for comparison
            axis = axes[2] if name in LOWER_IS_BETTER else axes[1]
            axis.plot(*zip(*points), marker="" if rule else "o", linestyle="--" if rule else "-", label=name)
        axes[1].set_ylabel("validation Dice")
        axes[2].set_ylabel("reference following\n(lower is better)")
        for axis in axes[1:3]:
            if axis.lines:
                axis.legend(fontsize="small")
        axes[3].plot(self.history["iteration"], self.history["lr"], color="tab:green")
        axes[3].set_ylabel("learning rate")
        axes[3].set_xlabel("iteration")
        figure.tight_layout()
        figure.savefig(self.output_dir / "training_curves.png", dpi=100)
        plt.close(figure)
