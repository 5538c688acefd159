"""MONAI Label app for IRIS: label one volume, and every other volume gets the same structures segmented.

Start (offline, loopback):
    monailabel start_server --app scripts/monailabel --studies <dir> --host 127.0.0.1 --port 8000 \\
        --conf checkpoint bundle/models/model.pt [--conf base_channels 8 --conf patch_size "[32,32,32]" ...]

``--conf`` keys: ``checkpoint``, ``bundle_root``, ``model_dir`` (fine-tuned weights), ``labels`` (JSON name -> value
for label maps saved without names), ``retrieval_top_k`` and the bundle's network and preprocessing ids
(see ``lib/bundle.py``).
"""

from __future__ import annotations

import logging

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
        self.settings = IrisSettings.from_conf(app_dir, conf)
        self.label_names = {str(k): int(v) for k, v in (parse_setting(conf.get("labels", "{}")) or {}).items()}
        self.retrieval_top_k = int(conf.get("retrieval_top_k", "3"))
        logger.info(f"IRIS bundle {self.settings.bundle_root}, weights {self.settings.active_checkpoint()}")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="IRIS in-context segmentation",
            description="Label one volume; IRIS segments the same structures in the others, with no training.",
            version="0.2.0",
            labels=self.label_names,
        )

    def init_infers(self) -> dict[str, InferTask]:
        return {"iris": IrisInfer(self.settings, self.datastore(), self.label_names, self.retrieval_top_k)}

    def init_trainers(self) -> dict[str, TrainTask]:
        return {"iris": IrisTrain(self.settings, self.label_names)}

    def init_strategies(self) -> dict[str, Strategy]:
        return {"random": Random(), "first": First()}
