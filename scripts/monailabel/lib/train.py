"""The ``iris`` train task: fine-tune the bundle on the datastore's finished labels with the bundle's train.json."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.train import TrainTask

from .bundle import IrisSettings
from .labels import LabelRegistry
from .references import DatastoreReferences, collect_references

logger = logging.getLogger(__name__)

DATASET_NAME = "monailabel"
MIN_VALIDATION_VOLUMES = 5  # below this many labelled volumes, every one trains (validation scores them all)
VALIDATION_SHARE = 5  # one volume in five validates, taken from the least completely labelled ones


def split(references: DatastoreReferences) -> tuple[list[int], list[int]]:
    """Indices of the training and the validation volumes.

    Volumes are ranked by how many classes they label (then by name); the most completely labelled always train. With
    ``MIN_VALIDATION_VOLUMES`` or more, the least complete fifth validates, as long as every class they label is also
    labelled in a training volume; with fewer, every volume trains and validation scores the training volumes (a fit
    to the annotator's labels, not generalisation).
    """
    order = sorted(range(len(references.images)), key=lambda i: (-len(references.per_volume[i]), references.images[i]))
    if len(order) < MIN_VALIDATION_VOLUMES:
        return order, order
    validation: list[int] = []
    for index in reversed(order):
        if len(validation) == len(order) // VALIDATION_SHARE:
            break
        others = [i for i in order if i != index and i not in validation]
        if set(references.per_volume[index]) <= {name for i in others for name in references.per_volume[i]}:
            validation.append(index)
    return [i for i in order if i not in validation], sorted(validation, key=order.index)


def write_pool(references: DatastoreReferences, modality: str, path: Path) -> tuple[Path, dict[str, list[str]]]:
    """A one-dataset pool (MSD-style ``dataset.json``) of the labelled volumes in the app's label values; returns it
    and the images of each split."""
    training, validation = split(references)
    records = [{"image": image, "label": label} for image, label in zip(references.images, references.labels)]
    content = {
        "name": DATASET_NAME,
        "modality": {"0": modality},
        "labels": {"0": "background", **{str(value): name for name, value in references.classes.items()}},
        "training": [records[i] for i in training],
        "validation": [records[i] for i in validation],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=4))
    return path, {split: [record["image"] for record in content[split]] for split in ("training", "validation")}


def json_safe(value: Any) -> Any:
    """``value`` with NaN/inf (e.g. the Dice of a class group with no class) as None, which JSON can carry."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_safe(item) for item in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


class IrisTrain(TrainTask):
    """Fine-tune from the active weights on the labelled volumes; the result replaces the weights of ``iris``.

    A class labelled in a single volume still trains: the bundle's ``self_support`` lets that volume be its own
    reference (another crop, augmented independently). Request options: ``max_iterations``, ``learning_rate``,
    ``batch_size``. Progress (``train_stats``, which 3D Slicer shows) comes from the run's ``progress.json`` and
    ``metrics.jsonl``.
    """

    def __init__(
        self,
        settings: IrisSettings,
        registry: LabelRegistry,
        datastore_root: Path,
        default_names: dict[str, int] | None = None,
    ) -> None:
        super().__init__("Fine-tune IRIS on the finished labels of the datastore (bundle train.json)")
        self.settings = settings
        self.registry = registry
        self.datastore_root = datastore_root
        self.default_names = default_names or {}

    def config(self) -> dict[str, Any]:
        return {"max_iterations": 200, "learning_rate": 2e-4, "batch_size": 2}

    def stats(self) -> dict[str, Any]:
        """Progress of the newest run, in the keys MONAI Label's clients read (``epoch`` counts iterations here)."""
        runs = sorted((self.settings.model_dir / "train").glob("*/logs/progress.json"))
        if not runs:
            return {}
        progress = json.loads(runs[-1].read_text())
        logs = runs[-1].parent
        validations = [json.loads(line) for line in (logs / "metrics.jsonl").read_text().splitlines() if line.strip()] \
            if (logs / "metrics.jsonl").is_file() else []  # fmt: skip
        best = max((line.get("val_seen_dice", float("nan")) for line in validations), default=None)
        stats = {
            "epoch": progress["iteration"],
            "total_epochs": progress["total_iterations"],
            "iteration": progress["iteration"],
            "total_iterations": progress["total_iterations"],
            "train_loss": progress.get("train_loss"),
            "best_metric": best,
            "key_metric_name": "val_seen_dice",
            "validations": validations,
            "start_ts": progress["started"],
        }
        stats["total_time" if progress.get("finished") else "current_time"] = progress["elapsed_seconds"]
        return json_safe(stats)

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        options = {**self.config(), **request}
        references = collect_references(datastore, self.registry, self.datastore_root, default_names=self.default_names)
        if not references.images:
            raise MONAILabelException(MONAILabelError.INVALID_INPUT, "No usable finished label in the datastore.")
        checkpoint = self.settings.active_checkpoint()
        if not checkpoint.is_file():
            raise MONAILabelException(MONAILabelError.INVALID_INPUT, f"IRIS checkpoint {checkpoint} does not exist.")

        run_dir = self.settings.model_dir / "train" / time.strftime("%Y%m%d_%H%M%S")
        modality = str(
            self.settings.overrides.get("modality") or self.settings.model_settings().get("modality") or "CT"
        )
        pool, splits = write_pool(references, modality, run_dir / "dataset.json")
        iterations = int(options["max_iterations"])
        logger.info(
            f"IRIS fine-tuning for {iterations} iterations: training {splits['training']}, validation "
            f"{splits['validation']}"
        )
        self.settings.run(
            "train.json",
            "train",
            **self.settings.training_ids(),
            data_pool=[str(pool)],
            pretrained_checkpoint=str(checkpoint),
            ckpt_dir=str(run_dir),
            output_dir=str(run_dir / "logs"),
            cache="memory",
            resume=False,
            self_support=True,
            total_iterations=iterations,
            warmup_iterations=max(1, iterations // 10),
            base_learning_rate=float(options["learning_rate"]),
            batch_size=int(options["batch_size"]),
            eval_every=iterations,
            checkpoint_every=iterations,
            num_workers=0,
            cache_workers=1,
        )
        trained = run_dir / "model.pt"
        if not trained.is_file():
            raise MONAILabelException(MONAILabelError.SERVER_ERROR, f"Fine-tuning wrote no {trained}.")
        self.settings.finetuned.parent.mkdir(parents=True, exist_ok=True)
        trained.replace(self.settings.finetuned)  # same folder tree: an atomic rename, never a half-written model
        report = run_dir / "logs" / "validation_report.json"
        return {
            "model": str(self.settings.finetuned),
            "iterations": iterations,
            "labelled_volumes": len(references.images),
            "splits": splits,
            "classes": references.classes,
            "warnings": references.warnings,
            "validation": json_safe(json.loads(report.read_text())) if report.is_file() else None,
        }
