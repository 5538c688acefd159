"""MONAI Label app for IRIS: label one volume, and every other volume gets the same structures segmented.

Start (offline, loopback):
    monailabel start_server --app scripts/monailabel --studies <dir> --host 127.0.0.1 --port 8000 \\
        [--conf checkpoint bundle/models/model.pt]

``--conf`` keys: ``checkpoint`` (always used when given; without it, the weights of an earlier ``/train`` win over
the bundle's ``models/model.pt``), ``bundle_root``, ``model_dir`` (fine-tuned weights), ``labels`` (JSON name ->
value for label maps saved without names), ``retrieval_top_k``. The network size, patch size, spacing and modality
come from the weights; the bundle ids of ``lib/bundle.py`` may be given to state them, and are refused when they
contradict the weights.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from fastapi import HTTPException
from lib.bundle import IrisSettings, parse_setting
from lib.infer import IrisInfer
from lib.train import IrisTrain
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

logger = logging.getLogger(__name__)


class IrisApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.settings = IrisSettings.from_conf(app_dir, conf)  # puts the bundle's ``scripts`` on sys.path
        from scripts.training.model_settings import bundle_version

        self.label_names = {str(k): int(v) for k, v in (parse_setting(conf.get("labels", "{}")) or {}).items()}
        self.retrieval_top_k = int(conf.get("retrieval_top_k", "3"))
        logger.info(f"IRIS bundle {self.settings.bundle_root}, {self.settings.describe_weights()}")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="IRIS in-context segmentation",
            description="Label one volume; IRIS segments the same structures in the others, with no training.",
            version=bundle_version(),
            labels=self.label_names,
        )

    def infer(self, request: dict[str, Any], datastore: Any = None) -> dict[str, Any]:
        """MONAI Label's inference, after answering an image id that is neither a file nor in the datastore with 404
        (MONAI Label would try to read a DICOM folder of that name and answer 500)."""
        image = request.get("image")
        datastore = datastore or self.datastore()
        if isinstance(image, str) and not os.path.exists(image) and image not in datastore.list_images():
            raise HTTPException(status_code=404, detail=f"Unknown image id {image!r}: it is not in the datastore.")
        return super().infer(request, datastore)

    def init_infers(self) -> dict[str, InferTask]:
        return {"iris": IrisInfer(self.settings, self.datastore(), self.label_names, self.retrieval_top_k)}

    def init_trainers(self) -> dict[str, TrainTask]:
        return {"iris": IrisTrain(self.settings, self.label_names)}

    def init_strategies(self) -> dict[str, Strategy]:
        return {"random": Random(), "first": First()}
