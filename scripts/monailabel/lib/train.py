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
from .references import DatastoreReferences, collect_references

logger = logging.getLogger(__name__)

DATASET_NAME = "monailabel"


def write_pool(references: DatastoreReferences, modality: str, path: Path) -> Path:
    """A one-dataset pool (MSD-style ``dataset.json``) of the labelled volumes.

    With three or more labelled volumes one in five (at least one) is kept for validation; with fewer, validation
    scores the training volumes themselves, which measures the fit to the annotator's labels, not generalisation.
    """
    records = [{"image": image, "label": label} for image, label in zip(references.images, references.labels)]
    held = max(1, len(records) // 5) if len(records) >= 3 else 0
    content = {
        "name": DATASET_NAME,
        "modality": {"0": modality},
        "labels": {"0": "background", **{str(value): name for name, value in references.classes.items()}},
        "training": records[held:],
        "validation": records[:held] if held else records,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=4))
    return path


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
    ``batch_size``.
    """

    def __init__(self, settings: IrisSettings, label_names: dict[str, int] | None = None) -> None:
        super().__init__("Fine-tune IRIS on the finished labels of the datastore (bundle train.json)")
        self.settings = settings
        self.default_names = label_names or {}

    def config(self) -> dict[str, Any]:
        return {"max_iterations": 200, "learning_rate": 2e-4, "batch_size": 2}

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        options = {**self.config(), **request}
        references = collect_references(datastore, default_names=self.default_names)
        if not references.images:
            raise MONAILabelException(MONAILabelError.INVALID_INPUT, "No finished label in the datastore to train on.")
        checkpoint = self.settings.active_checkpoint()
        if not checkpoint.is_file():
            raise MONAILabelException(MONAILabelError.INVALID_INPUT, f"IRIS checkpoint {checkpoint} does not exist.")

        run_dir = self.settings.model_dir / "train" / time.strftime("%Y%m%d_%H%M%S")
        modality = str(
            self.settings.overrides.get("modality") or self.settings.model_settings().get("modality") or "CT"
        )
        pool = write_pool(references, modality, run_dir / "dataset.json")
        iterations = int(options["max_iterations"])
        logger.info(f"IRIS fine-tuning on {len(references.images)} labelled volumes for {iterations} iterations")
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
            "classes": references.classes,
            "validation": json_safe(json.loads(report.read_text())) if report.is_file() else None,
        }
