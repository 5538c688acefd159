"""Pictures of volumes with their label maps: orthogonal slices with coloured labels and a legend.

Shared by training's validation overlays and inference's previews.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PALETTE = np.array(
    [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180], [70, 240, 240],
     [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [220, 190, 255], [170, 110, 40], [128, 0, 0]],
    dtype=np.float32,
)  # fmt: skip


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
