"""The ``iris`` infer task: segment an image with the datastore's labelled volumes as references."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from .bundle import IrisSettings
from .references import collect_references

logger = logging.getLogger(__name__)


class IrisInfer(InferTask):
    """Label one, segment the rest.

    With finished labels in the datastore, every labelled class is segmented by object-level retrieval: each class
    is re-segmented with the ``retrieval_top_k`` references whose object embedding is closest to what the first pass
    found in the query. With no labels yet, the memory bank segments every class seen in training. The result's
    JSON says which (``strategy``), which references were used, and names the label values (``label_names``).

    Args:
        settings: bundle, weights and overrides of this app.
        datastore: the app's datastore, read at every request so new labels count at once.
        label_names: names for label values that the labels' own info does not name (``--conf labels``).
        retrieval_top_k: references averaged per class.
    """

    def __init__(
        self,
        settings: IrisSettings,
        datastore: Datastore,
        label_names: dict[str, int] | None = None,
        retrieval_top_k: int = 3,
    ) -> None:
        super().__init__(
            type=InferType.SEGMENTATION,
            labels=label_names or {},
            dimension=3,
            description="IRIS in-context segmentation: the classes of the labelled volumes, or the memory bank",
            config={"retrieval_top_k": retrieval_top_k},
        )
        self.settings = settings
        self.datastore = datastore
        self.default_names = label_names or {}

    def is_valid(self) -> bool:
        return self.settings.active_checkpoint().is_file()

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        start = time.perf_counter()
        image = str(request["image"])
        checkpoint = self.settings.active_checkpoint()
        if not checkpoint.is_file():
            raise MONAILabelException(MONAILabelError.INFERENCE_ERROR, f"IRIS checkpoint {checkpoint} does not exist.")
        references = collect_references(self.datastore, exclude_image=image, default_names=self.default_names)
        if references.classes:
            strategy = "retrieval"
            task: dict[str, Any] = {
                "support_images": references.images,
                "support_labels": references.labels,
                "classes": references.classes,
                "retrieval_top_k": int(request.get("retrieval_top_k", self._config["retrieval_top_k"])),
            }
            label_names = references.classes
        else:
            strategy = "memory"
            memory_classes = self.settings.memory_classes()
            if not memory_classes:
                raise MONAILabelException(
                    MONAILabelError.INFERENCE_ERROR,
                    f"No labelled volume in the datastore and no memory bank in {checkpoint}: label one volume first.",
                )
            from scripts.inference.task_setup import (
                resolve_classes,  # the bundle's (on sys.path once IrisSettings is made)
            )

            task = {"classes": memory_classes, "memory_classes": memory_classes}
            dataset_labels = self.settings.model_settings().get("dataset_labels", {})
            label_names = resolve_classes(memory_classes, "memory", dataset_labels=dataset_labels)

        with tempfile.TemporaryDirectory(prefix="iris_infer_") as output_dir:
            self.settings.run(
                "inference.json",
                "infer",
                ckpt_path=str(checkpoint),
                query_images=[image],
                strategy=strategy,
                output_dir=output_dir,
                save_previews=False,
                **task,
            )
            result = self._keep_label_map(Path(output_dir), image)
        latency = time.perf_counter() - start
        logger.info(f"IRIS {strategy} on {image}: {len(label_names)} classes in {latency:.2f} s")
        return result, {
            "strategy": strategy,
            "references": references.images,
            "label_names": label_names,
            "checkpoint": str(checkpoint),
            "latency": round(latency, 3),
        }

    @staticmethod
    def _keep_label_map(output_dir: Path, image: str) -> str:
        """Move the label map out of the run's folder into a file of its own, which MONAI Label deletes once sent;
        the folder (and the run's summary) goes with the ``TemporaryDirectory``."""
        results = sorted(output_dir.glob("*_seg.*"))
        if not results:
            raise MONAILabelException(MONAILabelError.INFERENCE_ERROR, f"IRIS wrote no label map for {image}.")
        handle, kept = tempfile.mkstemp(prefix="iris_", suffix=results[0].name.rsplit("_seg", 1)[1])
        os.close(handle)
        shutil.move(results[0], kept)
        return kept
