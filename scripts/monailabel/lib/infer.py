"""The ``iris`` infer task: segment an image with the datastore's labelled volumes as references."""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from .bundle import IrisSettings
from .labels import LabelError, LabelRegistry, read_volume
from .references import collect_references

logger = logging.getLogger(__name__)

RESULT_DTYPES = {"uint8": 255, "int16": 32767}


class InferenceSession:
    """A run of the bundle's ``inference.json`` kept between requests of the same task (weights, classes,
    references, output format): the network is built and loaded and the task embeddings computed once; each request
    only swaps the query. Requests to one session are served one at a time."""

    def __init__(self, settings: IrisSettings, key: tuple, overrides: dict[str, Any], first_query: str) -> None:
        self.key = key
        self.output_dir = Path(tempfile.mkdtemp(prefix="iris_session_"))
        atexit.register(shutil.rmtree, self.output_dir, True)  # the last session's folder, when the server stops
        self.lock = threading.Lock()
        self.workflow = settings.workflow(
            "inference.json", "infer", query_images=[first_query], output_dir=str(self.output_dir), **overrides
        )

    def segment(self, image: str) -> tuple[str, dict[str, dict]]:
        """Run the workflow on ``image``; returns the label map, moved to a file of its own (MONAI Label deletes it
        once sent), and what the run's summary says of each class (voxels, match score and warning)."""
        with self.lock:
            self.workflow.parser.get_parsed_content("dataset").data = [{"image": image}]
            for old in self.output_dir.glob("*_seg.*"):
                old.unlink()
            self.workflow.run()
            results = sorted(self.output_dir.glob("*_seg.*"))
            if not results:
                raise HTTPException(status_code=500, detail=f"IRIS wrote no label map for {image}.")
            handle, kept = tempfile.mkstemp(prefix="iris_", suffix=results[0].name.rsplit("_seg", 1)[1])
            os.close(handle)
            shutil.move(results[0], kept)
            summary = json.loads((self.output_dir / "summary.json").read_text())
            return kept, summary["queries"][0]["classes"]

    def close(self) -> None:
        """End the workflow once the request it may be serving is done, and remove its folder."""
        with self.lock:
            self.workflow.finalize()
            shutil.rmtree(self.output_dir, ignore_errors=True)


class IrisInfer(InferTask):
    """Label one, segment the rest.

    With finished labels in the datastore, every labelled class is segmented by object-level retrieval: each class
    is re-segmented with the ``retrieval_top_k`` references whose object embedding is closest to what the first pass
    found in the query. With no labels yet, the memory bank segments every class seen in training. Classes are
    matched by name across the labelled volumes, and the result is written in the app's one name -> value map
    (``label_names`` lists all of it, so 3D Slicer names every segment right), in the format the client asks for
    (``result_extension``, ``result_dtype``). The JSON also says which ``strategy``, which references, which weights,
    and ``warnings`` for labels that could not be used.

    Args:
        settings: bundle, weights and overrides of this app.
        datastore: the app's datastore, read at every request so new labels count at once.
        registry: the app's name -> value map.
        datastore_root: the datastore folder (label copies in the app's values are cached in its ``.iris``).
        default_names: names for label values that a label does not name itself (``--conf labels``).
        retrieval_top_k: references averaged per class.
    """

    def __init__(
        self,
        settings: IrisSettings,
        datastore: Datastore,
        registry: LabelRegistry,
        datastore_root: Path,
        default_names: dict[str, int] | None = None,
        retrieval_top_k: int = 3,
    ) -> None:
        super().__init__(
            type=InferType.SEGMENTATION,
            labels=registry.values,
            dimension=3,
            description="IRIS in-context segmentation: the classes of the labelled volumes, or the memory bank",
            config={"retrieval_top_k": retrieval_top_k},
        )
        self.settings = settings
        self.datastore = datastore
        self.registry = registry
        self.datastore_root = datastore_root
        self.default_names = default_names or {}
        # interactive answers in seconds: one network pass per window unless --conf sw_mirror_axes asks for more
        self.mirror_axes = settings.overrides.get("sw_mirror_axes", [])
        self._session: InferenceSession | None = None
        self._sessions_lock = threading.Lock()

    def info(self) -> dict[str, Any]:
        self.labels = self.registry.values  # names registered since start-up count at once
        return {**super().info(), "description": f"{self.description}; {self.settings.describe_weights()}"}

    def is_valid(self) -> bool:
        return self.settings.active_checkpoint().is_file()

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        start = time.perf_counter()
        image = str(request["image"])
        try:
            read_volume(image)
        except LabelError as error:
            raise HTTPException(status_code=422, detail=f"Image {image} cannot be segmented: {error}.")
        checkpoint = self.settings.active_checkpoint()
        references = collect_references(
            self.datastore, self.registry, self.datastore_root, exclude_image=image, default_names=self.default_names
        )
        if references.classes:
            strategy = "retrieval"
            task: dict[str, Any] = {
                "support_images": references.images,
                "support_labels": references.labels,
                "classes": references.classes,
                "retrieval_top_k": int(request.get("retrieval_top_k", self._config["retrieval_top_k"])),
            }
        else:
            strategy = "memory"
            memory_classes = self.settings.memory_classes()
            if not memory_classes:
                raise HTTPException(
                    status_code=409,
                    detail=f"No usable label in the datastore, no memory bank in {checkpoint}: label a volume first.",
                )
            # the memory bank has no references whose volumes could set thresholds: that --conf waits for a label
            task = {"classes": self.registry.register(memory_classes), "threshold_from_reference_volume": False}
        extension, dtype = self._result_format(request)
        session = self._session_for(
            image, (str(checkpoint), checkpoint.stat().st_mtime_ns, strategy, repr(sorted(task.items())), extension,
                    dtype), {"ckpt_path": str(checkpoint), "strategy": strategy, "output_ext": extension,
                             "output_dtype": dtype, "save_previews": False, "sw_mirror_axes": self.mirror_axes, **task},
        )  # fmt: skip
        result, classes = session.segment(image)
        latency = time.perf_counter() - start
        logger.info(f"IRIS {strategy} on {image}: {len(task['classes'])} classes in {latency:.2f} s")
        match = {name: {"score": c["match_score"], "warning": c["match_warning"]} for name, c in classes.items()
                 if "match_score" in c}  # fmt: skip
        unsure = [f"check {name}: it may be another structure than its references show (match score "
                  f"{entry['score']:.2f})" for name, entry in match.items() if entry["warning"]]  # fmt: skip
        return result, {
            "strategy": strategy,
            "references": references.images,
            "label_names": self.registry.values,
            "classes": list(task["classes"]),
            "match": match,
            "checkpoint": str(checkpoint),
            "warnings": references.warnings + unsure,
            "latency": round(latency, 3),
        }

    def _result_format(self, request: dict[str, Any]) -> tuple[str, str]:
        """The file suffix and label dtype the client asks for (3D Slicer: ``.nrrd``, ``uint8``), else NIfTI int16."""
        extension = str(request.get("result_extension") or ".nii.gz")
        if extension not in (".nii.gz", ".nii", ".nrrd", ".mha"):
            raise HTTPException(status_code=422, detail=f"result_extension {extension!r} is not one of .nii.gz, .nii, "
                                                        ".nrrd, .mha.")  # fmt: skip
        dtype = str(request.get("result_dtype") or "int16")
        if dtype not in RESULT_DTYPES:
            raise HTTPException(status_code=422, detail=f"result_dtype {dtype!r} is not one of {list(RESULT_DTYPES)}.")
        largest = max(self.registry.values.values(), default=0)
        if largest > RESULT_DTYPES[dtype]:
            raise HTTPException(status_code=422, detail=f"result_dtype {dtype} cannot hold label value {largest}.")
        return extension, dtype

    def _session_for(self, image: str, key: tuple, overrides: dict[str, Any]) -> InferenceSession:
        """The session of this task (weights, classes, references, format), built when any of them changed."""
        with self._sessions_lock:
            if self._session is None or self._session.key != key:
                if self._session is not None:
                    self._session.close()
                started = time.perf_counter()
                self._session = InferenceSession(self.settings, key, overrides, image)
                logger.info(f"IRIS: new inference session ({time.perf_counter() - started:.2f} s)")
            return self._session
