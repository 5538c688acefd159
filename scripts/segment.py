"""Segment new scans from labelled references with the bundle's inference config (a thin wrapper around it).

Example::

    python scripts/segment.py --support ref.nii.gz:ref_label.nii.gz --query "scans/*.nii.gz" --out out/ \\
        --classes "{'liver': 1, 'spleen': 2}" --strategy ensemble

Every other bundle id can be given too (``--patch_size "[32,32,32]"``, ``--base_channels 8``, ...).
"""

from __future__ import annotations

import sys
from pathlib import Path

import fire
import numpy as np
from monai.bundle import run

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
sys.path.insert(0, str(BUNDLE))
from scripts.data.image_io import LoadImagesd, quiet_nvimagecodec_notices  # noqa: E402
from scripts.errors import install  # noqa: E402


def _pairs(support: str | list[str] | tuple[str, ...]) -> tuple[list[str], list[str]]:
    items = [support] if isinstance(support, str) else list(support)
    pairs = [item.split(":") for item in items]
    if any(len(pair) != 2 for pair in pairs):
        raise ValueError(f"--support takes image:label pairs, got {items}.")
    return [image for image, _ in pairs], [label for _, label in pairs]


def segment(
    query: str | list[str],
    out: str,
    support: str | list[str] | None = None,
    classes: dict[str, int] | list[str] | None = None,
    strategy: str = "one_shot",
    ckpt: str = str(BUNDLE / "models" / "model.pt"),
    **overrides,
) -> None:
    """Segment ``query`` (files, a glob or a folder) into ``out`` using references ``image:label``.

    Without ``classes``, every label value of the first reference label map becomes a class ``label_<value>``.
    Strategy ``memory`` needs no references: ``classes`` lists memory-bank class names.
    """
    images, labels = _pairs(support) if support else ([], [])
    if classes is None and labels:
        values = np.unique(np.asarray(LoadImagesd("label")({"label": labels[0]})["label"]))
        classes = {f"label_{int(v)}": int(v) for v in values if v != 0}
    run(
        config_file=str(BUNDLE / "configs" / "inference.json"),
        bundle_root=str(BUNDLE),
        ckpt_path=ckpt,
        output_dir=out,
        query_images=query,
        support_images=images,
        support_labels=labels,
        classes=classes or {},
        strategy=strategy,
        **overrides,
    )


if __name__ == "__main__":
    install()  # user errors end the command with their one-line message
    quiet_nvimagecodec_notices()
    fire.Fire(segment)
