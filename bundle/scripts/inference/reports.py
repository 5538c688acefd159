"""Inference outputs besides the label maps: ``summary.json`` and a PNG preview per query."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events

from ..data.image_io import LoadImagesd
from ..data.transforms import voxel_volume
from ..drawing import overlay_panels, preview
from ..segmentation.inferers import InContextInferer

logger = logging.getLogger(__name__)


def query_stem(path: str) -> str:
    """File name without directory and image extensions, as ``SaveImaged`` names its outputs."""
    name = Path(path).name
    for extension in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".gz"):
        if name.endswith(extension):
            return name[: -len(extension)]
    return Path(name).stem


class InferenceReport:
    """Per query: voxels and volume (mL) of each class; writes ``summary.json`` at the end and a preview per query.

    Args:
        output_dir: where the label maps are written.
        classes: class name -> label value.
        strategy: the inference strategy, recorded in the summary.
        references: the reference images used (empty for the memory bank or an embeddings file).
        reference_labels: their label maps; the first reference is shown above each query in the previews.
        embeddings_file: the embeddings file used or written, if any.
        save_previews: write ``<query>_preview.png``.
        output_ext: suffix of the written segmentations (``.png`` for 2D queries).
        skipped: unreadable queries that were skipped (file -> reason), listed in the summary.
        inferer: the in-context inferer, whose match check (if any) gives each class's ``match_score`` and
            ``match_warning`` (a warning is also one log line), and whose reference-volume calibration (if any) gives
            each class's probability ``threshold``.
    """

    def __init__(
        self,
        output_dir: str,
        classes: Mapping[str, int],
        strategy: str,
        references: Sequence[str] = (),
        embeddings_file: str | None = None,
        save_previews: bool = True,
        output_ext: str = ".nii.gz",
        skipped: Mapping[str, str] | None = None,
        reference_labels: Sequence[str] = (),
        inferer: InContextInferer | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.skipped = dict(skipped or {})
        self.classes = dict(classes)
        self.strategy = strategy
        self.references = list(references)
        self.embeddings_file = embeddings_file
        self.save_previews = save_previews
        self.output_ext = output_ext
        self.queries: list[dict] = []
        self._loader = LoadImagesd("image")  # as the query was read (2D files with PIL)
        self.reference_labels = list(reference_labels)
        self._reference: tuple[str, np.ndarray] | None = None
        self.inferer = inferer

    def reference_panels(self) -> tuple[str, np.ndarray] | None:
        """The first reference with the requested classes coloured in (read once), or None without references."""
        if self._reference is None and self.references and self.reference_labels:
            data = LoadImagesd(["image", "label"])({"image": self.references[0], "label": self.reference_labels[0]})
            image, label = (np.asarray(data[key])[0] for key in ("image", "label"))
            values = list(self.classes.values())
            label = np.where(np.isin(label, values), label, 0)
            self._reference = (Path(self.references[0]).name, overlay_panels(image, label, values))
        return self._reference

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.record)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def start(self, engine: Engine) -> None:
        """Each run reports its own queries (a server may run the engine again on other queries)."""
        self.queries = []

    def record(self, engine: Engine) -> None:
        for item in engine.state.output:  # decollated: one dict per query
            labels = item["pred"]
            query = str(labels.meta["filename_or_obj"])
            voxel_ml = voxel_volume(labels) / 1000.0
            array = torch.as_tensor(labels).cpu().numpy()[0]
            counts = {name: int((array == value).sum()) for name, value in self.classes.items()}
            stem = query_stem(query)
            classes = {
                name: {"label_value": self.classes[name], "voxels": n, "volume_ml": round(n * voxel_ml, 4)}
                for name, n in counts.items()
            }
            calibration = getattr(self.inferer, "calibration", None)
            if calibration is not None:
                for entry, threshold in zip(classes.values(), calibration.thresholds):
                    entry["threshold"] = round(threshold, 4)
            matcher = getattr(self.inferer, "matcher", None)
            if matcher is not None:
                for (name, entry), score in zip(classes.items(), matcher.scores):
                    entry["match_score"] = None if score is None else round(score, 4)
                    entry["match_warning"] = matcher.warned(score)
                    if entry["match_warning"]:
                        logger.warning(
                            f"Check {name} in {query}: its match score {score:.2f} is below the model's "
                            f"{matcher.threshold:.2f}, so it may be another structure than the reference's"
                            + (" (left out of the label map)." if matcher.drop_warned else ".")
                        )
            self.queries.append(
                {
                    "query": query,
                    "segmentation": str(self.output_dir / f"{stem}_seg{self.output_ext}"),
                    "classes": classes,
                }
            )
            found = ", ".join(f"{name} {n} voxels" for name, n in counts.items())
            logger.info(f"Wrote {self.queries[-1]['segmentation']} ({found})")
            if self.save_previews:
                image = np.asarray(self._loader({"image": query})["image"])[0]
                path = self.output_dir / f"{stem}_preview.png"
                preview(image, array, self.classes, path, self.reference_panels())

    def write(self, engine: Engine) -> None:
        summary = {
            "strategy": self.strategy,
            "references": self.references,
            "embeddings_file": self.embeddings_file,
            "queries": self.queries,
            "skipped": self.skipped,
        }
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=4))
        logger.info(f"Wrote {self.output_dir / 'summary.json'} ({len(self.queries)} queries)")
