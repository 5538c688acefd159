"""MONAI Label app for IRIS: label one volume, and every other volume gets the same structures segmented.

Start (offline, loopback):
    monailabel start_server --app scripts/monailabel --studies <dir> --host 127.0.0.1 --port 8000 \\
        [--conf checkpoint bundle/models/model.pt]

``--conf`` keys: ``checkpoint`` (else the bundle's ``models/model.pt``; fine-tuned weights of ``/train`` are used
when newer, unless ``pin_checkpoint true``), ``bundle_root``, ``model_dir`` (fine-tuned weights), ``labels`` (JSON
name -> value, values 1..N, for label maps saved without names), ``memory_bank`` (``false``: no memory-bank answer
before the first label), ``retrieval_top_k``. The network size, patch size, spacing and modality come from the
weights; the bundle ids of ``lib/bundle.py`` may be given to state them, and are refused when they contradict the
weights. See docs/monailabel.md.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from lib.bundle import IrisSettings, parse_setting
from lib.datastore import CheckedDatastore
from lib.infer import IrisInfer
from lib.labels import REGISTRY_FILE, LabelRegistry
from lib.train import IrisTrain
from monailabel.config import settings as monailabel_settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

logger = logging.getLogger(__name__)


class IrisApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.settings = IrisSettings.from_conf(app_dir, conf)  # puts the bundle's ``scripts`` on sys.path
        from scripts.data.image_io import quiet_nvimagecodec_notices
        from scripts.errors import IrisInputError, install
        from scripts.segmentation.model_io import bundle_version

        install()  # user errors in the log in one line
        quiet_nvimagecodec_notices()
        self.input_error = IrisInputError
        self.default_names = {str(k): int(v) for k, v in (parse_setting(conf.get("labels", "{}")) or {}).items()}
        self.retrieval_top_k = int(conf.get("retrieval_top_k", "3"))
        self.registry = LabelRegistry(Path(studies) / REGISTRY_FILE, self.default_names)
        if str(conf.get("memory_bank", "true")).lower() == "true" and self.settings.active_checkpoint().is_file():
            self.registry.register(self.settings.memory_classes())  # segments the app may answer before any label
        logger.info(f"IRIS bundle {self.settings.bundle_root}, {self.settings.describe_weights()}")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="IRIS in-context segmentation",
            description="Label one volume; IRIS segments the same structures in the others, with no training.",
            version=bundle_version(),
            labels=self.registry.values,
        )

    def init_datastore(self) -> Datastore:
        """MONAI Label's local datastore, with every upload checked (:class:`CheckedDatastore`)."""
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        return CheckedDatastore(
            self.studies,
            extensions=monailabel_settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=monailabel_settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=monailabel_settings.MONAI_LABEL_DATASTORE_READ_ONLY,
            registry=self.registry,
            default_names=self.default_names,
        )

    def info(self) -> dict[str, Any]:
        self.labels = self.registry.values  # names saved since start-up count at once
        return super().info()

    def infer(self, request: dict[str, Any], datastore: Any = None) -> dict[str, Any]:
        """MONAI Label's inference, answering with a status and a ``detail`` that says what went wrong: 404 for an
        image id that is neither a file nor in the datastore, 422 for input IRIS cannot use, 500 (with the cause)
        for anything else."""
        image = request.get("image")
        datastore = datastore or self.datastore()
        if isinstance(image, str) and not os.path.exists(image) and image not in datastore.list_images():
            raise HTTPException(status_code=404, detail=f"Unknown image id {image!r}: it is not in the datastore.")
        try:
            return super().infer(request, datastore)
        except HTTPException:
            raise
        except self.input_error as error:
            raise HTTPException(status_code=422, detail=str(error)) from error
        except Exception as error:  # the client gets the cause, not a bare "Internal Server Error"
            logger.exception("IRIS inference failed")
            raise HTTPException(status_code=500, detail=f"IRIS inference failed: {type(error).__name__}: {error}")

    def init_infers(self) -> dict[str, InferTask]:
        return {
            "iris": IrisInfer(
                self.settings,
                self.datastore(),
                self.registry,
                Path(self.studies),
                self.default_names,
                self.retrieval_top_k,
            )
        }

    def init_trainers(self) -> dict[str, TrainTask]:
        return {"iris": IrisTrain(self.settings, self.registry, Path(self.studies), self.default_names)}

    def init_strategies(self) -> dict[str, Strategy]:
        return {"random": Random(), "first": First()}
