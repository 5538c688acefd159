"""Inference outputs besides the label maps: ``summary.json`` and a PNG preview per query."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from PIL import Image, ImageDraw

from .image_io import LoadImagesd

logger = logging.getLogger(__name__)

PALETTE = np.array(
    [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180], [70, 240, 240],
     [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [220, 190, 255], [170, 110, 40], [128, 0, 0]],
    dtype=np.float32,
)  # fmt: skip


def query_stem(path: str) -> str:
    """File name without directory and image extensions, as ``SaveImaged`` names its outputs."""
    name = Path(path).name
    for extension in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".gz"):
        if name.endswith(extension):
            return name[: -len(extension)]
    return Path(name).stem


def overlay_panels(
    image: np.ndarray, labels: np.ndarray, values: Sequence[int], centre: Sequence[int] | None = None
) -> np.ndarray:
    """Three orthogonal slices (through ``centre``, else the labelled voxels' centre, else the volume centre) of a
    grey image with the label values coloured in, side by side: an H x W x 3 uint8 array. A 2D image (``labels``
    H x W) gives one panel, the image itself."""
    if centre is None:
        foreground = np.argwhere(labels > 0)
        centre = foreground.mean(0).astype(int) if len(foreground) else np.array(image.shape) // 2
    low, high = np.percentile(image, [1, 99])
    grey = np.clip((image - low) / max(high - low, 1e-6), 0, 1) * 255
    if labels.ndim == 2:
        slices = [(grey, labels)]
    else:
        slices = [
            (np.take(grey, centre[axis], axis=axis), np.take(labels, centre[axis], axis=axis)) for axis in range(3)
        ]
    panels = []
    for gray_slice, label_slice in slices:
        rgb = np.repeat(gray_slice[..., None], 3, axis=-1)
        for index, value in enumerate(values):
            mask = label_slice == value
            rgb[mask] = 0.5 * rgb[mask] + 0.5 * PALETTE[index % len(PALETTE)]
        panels.append(np.rot90(rgb).astype(np.uint8))
    height = max(panel.shape[0] for panel in panels)
    padded = [np.pad(panel, ((0, height - panel.shape[0]), (0, 2), (0, 0))) for panel in panels]
    return np.concatenate(padded, axis=1)


PREVIEW_WIDTH = 512  # pixels at least, so that a preview is readable at a glance


def annotated(panels: np.ndarray, lines: Sequence[tuple[str, tuple[int, int, int]]]) -> np.ndarray:
    """``panels`` (H x W x 3 uint8) enlarged to at least ``PREVIEW_WIDTH`` pixels (by whole factors, so voxels stay
    sharp) above one line of text per entry, each with a colour swatch: a picture readable at a glance."""
    factor = max(1, -(-PREVIEW_WIDTH // panels.shape[1]))
    picture = Image.fromarray(panels.repeat(factor, axis=0).repeat(factor, axis=1))
    line = 16
    canvas = Image.new("RGB", (picture.width, picture.height + line * len(lines) + 8))
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for index, (text, colour) in enumerate(lines):
        top = picture.height + 4 + index * line
        draw.rectangle([4, top + 2, 14, top + 12], fill=colour)
        draw.text((20, top), text, fill=colour)
    return np.asarray(canvas)


def preview(
    image: np.ndarray,
    labels: np.ndarray,
    classes: Mapping[str, int],
    path: Path,
    reference: tuple[str, np.ndarray] | None = None,
) -> None:
    """Save :func:`overlay_panels` of a segmented query as a PNG with a legend: each class name and label value in
    its colour. With ``reference`` (its name and its own panels), the reference is shown above the query."""
    panels = overlay_panels(image, labels, list(classes.values()))
    legend = [(f"{name} ({value})", palette_colour(index)) for index, (name, value) in enumerate(classes.items())]
    if reference is not None:
        name, reference_panels = reference
        width = max(panels.shape[1], reference_panels.shape[1])
        rows = [np.pad(p, ((0, 2), (0, width - p.shape[1]), (0, 0))) for p in (reference_panels, panels)]
        panels = np.concatenate(rows, axis=0)
        legend = [(f"top: reference {name}; bottom: the query", (255, 255, 255)), *legend]
    Image.fromarray(annotated(panels, legend)).save(path)


def palette_colour(index: int) -> tuple[int, int, int]:
    """The colour :func:`overlay_panels` gives the ``index``-th label value."""
    return tuple(int(c) for c in PALETTE[index % len(PALETTE)])


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
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.record)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def record(self, engine: Engine) -> None:
        for item in engine.state.output:  # decollated: one dict per query
            labels = item["pred"]
            query = str(labels.meta["filename_or_obj"])
            voxel_ml = abs(float(torch.det(torch.as_tensor(labels.affine)[:3, :3].double()))) / 1000.0
            array = torch.as_tensor(labels).cpu().numpy()[0]
            counts = {name: int((array == value).sum()) for name, value in self.classes.items()}
            stem = query_stem(query)
            self.queries.append(
                {
                    "query": query,
                    "segmentation": str(self.output_dir / f"{stem}_seg{self.output_ext}"),
                    "classes": {
                        name: {"label_value": self.classes[name], "voxels": n, "volume_ml": round(n * voxel_ml, 4)}
                        for name, n in counts.items()
                    },
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
